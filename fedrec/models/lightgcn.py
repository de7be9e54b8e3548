"""LightGCN (He et al., "LightGCN: Simplifying and Powering Graph Convolution Network for
Recommendation", SIGIR 2020). Official code: github.com/gusye1234/LightGCN-PyTorch; implemented as
RecBole's ``LightGCN`` (github.com/RUCAIBox/RecBole ``recbole/model/general_recommender/lightgcn.py``,
defaults of ``recbole/properties/model/LightGCN.yaml``).

As implemented: user and item ego embeddings E^(0) (xavier-uniform), the symmetric normalised
bipartite adjacency A^ = D^-1/2 A D^-1/2 of the training interactions (A = [[0, R], [R^T, 0]],
D its degrees plus 1e-7, as RecBole), ``n_layers`` propagations E^(l+1) = A^ E^(l) without weights or
non-linearities, the final embeddings the mean of E^(0..L), score(u, i) = <e_u, e_i>, and the BPR
loss on (u, i+, i-) triples plus ``reg_weight`` times the L2 of the triple's *ego* embeddings. The
whole graph is propagated for every mini-batch, as in RecBole.

Training examples, negatives and mini-batches are BPR-MF's (:mod:`fedrec.models.bpr`, of which this
is a subclass): ``sampling=interaction`` (RecBole's epoch over interactions, one uniform negative
each) or ``sampling=user`` (``n_samples_per_user`` pairs per user).

The graph is read by :meth:`fit`: centrally from every training row; in a silo federation each node
propagates over its own users' rows only (the other users are isolated nodes of its graph), keeps
its users' embeddings private (``user_emb.weight``, as BPR-MF) and FedAvg averages the item
embeddings: a federated LightGCN on node-local subgraphs, which equals the central model for one
node. Deviations and limits:

* the regulariser is the per-example ``reg_weight / 2 (||u||^2 + ||i+||^2 + ||i-||^2)`` (RecBole's
  ``EmbLoss`` with ``require_pow=True``); RecBole's default (``require_pow=False``) sums the batch
  matrices' Frobenius norms, which is not a sum over examples, as the trainer's per-example loss
  contract needs;
* ``couples_users``: a user's propagated embedding mixes in other users' rows (two hops away), so
  clipping one example's gradient does not bound one user's influence: DP-SGD and cross-device
  per-user clients refuse the model with a ConfigError saying so;
* no row-sparse item table: propagation changes every item row of an update.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from fedrec.errors import ConfigError
from fedrec.models.base import Batch, DataShape
from fedrec.models.bpr import BPRConfig, BPRMF


# torch marks CSR tensors "beta" on every construction; the product used here is stable and tested.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


@dataclass
class LightGCNConfig(BPRConfig):
    n_layers: int = 2  # propagation layers (RecBole: 2)
    reg_weight: float = 1e-5  # L2 weight on the triple's ego embeddings (RecBole: 1e-5)

    def __post_init__(self) -> None:
        super().__post_init__()
        if int(self.n_layers) < 0:
            raise ConfigError(f"model.n_layers: must be >= 0, got {self.n_layers}")
        if self.sampling == "all_pairs":
            raise ConfigError("model.sampling: LightGCN trains by interaction or user; all_pairs is "
                              "FedRecAttack's BPR-MF client")


def normalized_adjacency(train: sp.csr_matrix, self_loops: bool = False) -> sp.coo_matrix:
    """RecBole's A^ = D^-1/2 A D^-1/2 of the user-item bipartite graph (users first), D + 1e-7;
    ``self_loops``: of A + I (DiffKG's official ``makeTorchAdj``; D then counts the loop)."""
    n_users, n_items = train.shape
    r = sp.csr_matrix((train > 0).astype(np.float32))
    a = sp.bmat([[None, r], [r.T, None]], format="csr", dtype=np.float32)
    if self_loops:
        a = sp.csr_matrix(a + sp.eye(n_users + n_items, dtype=np.float32))
    d = np.power(np.asarray(a.sum(axis=1)).ravel() + 1e-7, -0.5)
    return sp.coo_matrix(sp.diags(d) @ a @ sp.diags(d))


class _SymmetricSpMM(torch.autograd.Function):
    """``A @ E`` for a symmetric sparse CSR ``A``, whose gradient in E is ``A @ grad`` (A^T = A).

    torch's own backward of a sparse product transposes and converts A on every call; with A in CSR
    and this backward a propagation step forward and back costs about a quarter (ML-100K, CPU)."""

    @staticmethod
    def forward(ctx, adj: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        ctx.adj = adj
        return adj @ e

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, ctx.adj @ grad


class LightGCN(BPRMF):
    name = "lightgcn"
    couples_users = True

    def __init__(self, cfg: LightGCNConfig, shape: DataShape):
        super().__init__(cfg, shape)
        self.n_users = shape.n_users
        if cfg.init_std is None:  # RecBole's LightGCN: xavier-uniform (its BPR: xavier-normal)
            nn.init.xavier_uniform_(self.user_emb.weight)
            nn.init.xavier_uniform_(self.item_emb.weight)
        self._adj: torch.Tensor | None = None  # the graph of fit(); not a parameter, not aggregated

    def fit(self, train: sp.csr_matrix) -> None:
        if train.shape != (self.n_users, self.n_items):
            raise ConfigError(f"model.fit: training matrix {train.shape}, model ({self.n_users}, {self.n_items})")
        adj = normalized_adjacency(train)
        idx = torch.from_numpy(np.vstack([adj.row, adj.col]).astype(np.int64))
        self._adj = torch.sparse_coo_tensor(idx, torch.from_numpy(adj.data), adj.shape,
                                            check_invariants=False).coalesce().to_sparse_csr()

    def propagate(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The final (mean over layers) user and item embeddings."""
        if self._adj is None:
            raise RuntimeError("model 'lightgcn' needs its graph: call fit(train) before training or scoring")
        ego = torch.cat([self.user_emb.weight, self.item_emb.weight], 0)
        if self._adj.device != ego.device:
            self._adj = self._adj.to(ego.device)
        layers, e = [ego], ego
        for _ in range(int(self.cfg.n_layers)):
            e = _SymmetricSpMM.apply(self._adj, e)
            layers.append(e)
        final = torch.stack(layers, 1).mean(1)
        return final[:self.n_users], final[self.n_users:]

    def draw_randomness(self, batch: Batch, rnd) -> dict[str, torch.Tensor]:
        raise ConfigError("model lightgcn: a user's loss reads other users' rows through the graph, so it "
                          "cannot train as independent per-user clients")

    def _triple_loss(self, users, pos, neg, users_all, items_all) -> torch.Tensor:
        """(B, S) losses of the triples (users[b], pos[b, s], neg[b, s])."""
        diff = (users_all[users][:, None, :] * (items_all[pos] - items_all[neg])).sum(-1)
        reg = (self.user_emb(users).pow(2).sum(-1)[:, None] + self.item_emb(pos).pow(2).sum(-1)
               + self.item_emb(neg).pow(2).sum(-1))
        return -F.logsigmoid(diff) + 0.5 * float(self.cfg.reg_weight) * reg

    def loss(self, batch: Batch) -> torch.Tensor:
        users_all, items_all = self.propagate()
        x = batch.x
        if batch.items is not None:  # one interaction per example
            with torch.no_grad():
                neg, bad = self._negatives(x, 1, lambda r: torch.randint(0, x.shape[1], (len(x), 1), device=x.device))
            loss = self._triple_loss(batch.users, batch.items[:, None], neg, users_all, items_all)[:, 0]
            return loss * (~bad[:, 0]).to(loss.dtype)
        with torch.no_grad():
            pos, neg, valid = self._sample_pairs(x)
        vf = valid.to(users_all.dtype)
        pair = self._triple_loss(batch.users, pos, neg, users_all, items_all)  # (B, S)
        return (pair * vf).sum(1) / vf.sum(1).clamp(min=1.0)

    def scores(self, batch: Batch) -> torch.Tensor:
        users_all, items_all = self.propagate()
        return users_all[batch.users] @ items_all.T

    def row_sparse_parameter_names(self) -> set[str]:
        return set()  # propagation spreads every update over the item table
