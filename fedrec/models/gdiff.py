"""G-Diff (Chen, Fan, Wu, Cheng and Song, "G-Diff: A Graph-Based Decoding Network for Diffusion
Recommender Model", IEEE TNNLS 2024, doi:10.1109/TNNLS.2024.3491827; survey section 3.4), after the
official PyTorch code github.com/crx1729/G-Diff (``model/main.py``, ``model/models/DNN.py``,
``model/data_utils.py``, ``model/models/gaussian_diffusion.py``), read line by line.

G-Diff is DiffRec (:mod:`fedrec.models.diffrec`) with its MLP denoiser replaced by a graph-based
decoding network (GDN). Algorithm as implemented (the official code's):

* **Item graph** (official ``get_graph``): G[a, b] = how many times item b directly follows item a in
  a user's time-ordered training items (:func:`fedrec.data.side.transition_graph`), row-normalised
  into the random-walk matrix P = D_out^-1 G (an item without successors: a zero row). The official
  ``torch.sparse.mm(g.t() @ diag(1/deg), x.t()).t()`` is x P for row vectors x.
* **GDN** (official ``GDN.forward``): graph(x) applies ``graph_layers`` times x <- x P + x (then
  L2-normalised per user when ``norm``); xx = graph(x) + x, L2-normalised when ``norm``;
  h = [dropout(xx) | Linear(sinusoid(t))] (the DiffRec timestep embedding, [cos | sin], size
  ``emb_size``); then every Linear of ``[n_items + emb_size, *hidden_dims, n_items]`` is followed by
  tanh and dropout (the last one too); the output is h + xx (the skip connection). Linear weights
  Xavier-normal, biases and the timestep Linear PyTorch's default initialisation (official).
* **Diffusion**: the shared :class:`fedrec.models.diffusion.GaussianDiffusion` with the official
  defaults: T = 2, ``linear-var`` schedule, noise_scale 1.0, noise bounds 5e-4 / 5e-3, first beta
  fixed at 1e-5, x0 prediction, SNR-reweighted MSE, t uniform (official ``sample_style=uniform``).
  Inference as DiffRec: from the history, the posterior mean through all T steps, no noise.
* **Training**: AdamW, lr 1e-4, weight decay 0, batch 400 users; the official loop validates every
  5 epochs on Recall@20 and stops 20 epochs after the best one (``train.eval_every=5``,
  ``train.patience=20`` (epochs) in conf/leaderboard/spaces.yaml).

Deviations, each with its reason:

* **No temporal interaction weights.** The official ``data_load`` weights each user's training
  items by ``np.linspace(w_min=0.1, w_max=1.0, n)`` along the user's order (T-DiffRec's reweighting)
  both as the diffusion target and as the inference input. fedrec's trainers feed binary rows
  (``Batch.x``) to every model, so G-Diff here diffuses the binary vector (w_min = w_max = 1).
* The graph comes from ``DataShape.transition_graph()``: it is built from the training
  interactions only and needs each user's time order (``Interactions.train_seq``; a dataset
  without one is refused with one line). The official code builds it from the training list order,
  which is the same thing on DiffRec's time-ordered ``train_list.npy``.
* Cross-device users draw t and the dropout masks explicitly (``draw_randomness``), as DiffRec's;
  that needs the dense transition matrix (kept dense up to 2^24 entries: ML-1M's 3706 items), since
  ``torch.func.vmap`` cannot batch sparse products; larger catalogues are refused cross-device.

Federation and privacy: the graph is each process's own buffer, never aggregated: ``fit`` rebuilds
it from the users whose rows the trainer shows, so a silo node decodes over the transitions of its
own users only and the server (scoring everyone) over all of them. A user's loss reads only the fixed
graph and the user's own row, so silo and cross-device training run. Under any DP mechanism G-Diff
is refused: its graph is private (``dataset.item_graph=co_interaction``, which asks the dataset
for the private graphs, is refused by :mod:`fedrec.privacy.public_only`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from fedrec.errors import ConfigError
from fedrec.models.base import Batch, DataShape, Recommender
from fedrec.models.denoiser import timestep_embedding
from fedrec.models.diffrec import DiffusionConfig
from fedrec.models.giffcf import DENSE_SHARE


@dataclass
class GDiffConfig(DiffusionConfig):
    ITEM_GRAPH: ClassVar[str] = "co_interaction"  # the private graphs of the training data (fedrec.config.validate)

    steps: int = 2  # T (official --steps)
    noise_scale: float = 1.0  # official --noise_scale
    noise_min: float = 0.0005  # official --noise_min
    noise_max: float = 0.005  # official --noise_max
    beta_fixed: bool = True  # first beta 1e-5 (official GaussianDiffusion default)
    importance_sampling: bool = False  # official --sample_style uniform
    hidden_dims: list[int] = field(default_factory=lambda: [1000])  # official --mlp_hidden_dims
    emb_size: int = 10  # timestep embedding size (official --emb_size)
    norm: bool = True  # L2-normalise inside the GDN (official --norm)
    dropout: float = 0.1  # dropout of the GDN input and of every layer's output (official --drop_out)
    graph_layers: int = 1  # propagations x <- x P + x (official --graph_layers)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.graph_layers < 0:
            raise ConfigError(f"model.graph_layers: must be >= 0, got {self.graph_layers}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout: must be in [0, 1), got {self.dropout}")
        if self.emb_size < 1 or any(int(d) < 1 for d in self.hidden_dims):
            raise ConfigError("model.emb_size / model.hidden_dims: sizes must be >= 1")


def random_walk_matrix(g: sp.csr_matrix) -> sp.csr_matrix:
    """P = D_out^-1 G (rows of items without successors stay zero), float32."""
    deg = np.asarray(g.sum(axis=1)).ravel().astype(np.float64)
    inv = np.zeros_like(deg)
    np.divide(1.0, deg, out=inv, where=deg > 0)
    return sp.csr_matrix(sp.diags(inv) @ g.astype(np.float64), dtype=np.float32)


#: a transition matrix with at most this many entries (64 MB in float32; ML-1M's 3706 items) is kept dense
DENSE_ENTRIES = 2 ** 24


def graph_buffer(m: sp.spmatrix) -> torch.Tensor:
    """The matrix as a torch tensor: dense when small (``DENSE_ENTRIES``) or denser than GiffCF's
    ``DENSE_SHARE`` (cheaper, and vmap-able for cross-device training), else sparse COO."""
    n = m.shape[0] * m.shape[1]
    if n <= DENSE_ENTRIES or m.nnz > DENSE_SHARE * n:
        return torch.from_numpy(m.toarray().astype(np.float32))
    coo = m.tocoo()
    idx = torch.from_numpy(np.vstack([coo.row, coo.col]).astype(np.int64))
    return torch.sparse_coo_tensor(idx, torch.from_numpy(coo.data.astype(np.float32)), coo.shape,
                                   check_invariants=True).coalesce()


class GraphDecodingNetwork(nn.Module):
    """The official ``GDN``: x0_hat from (x_t, t) through the item graph and an MLP with a skip."""

    def __init__(self, n_items: int, hidden_dims: list[int], emb_size: int, norm: bool, dropout: float,
                 graph_layers: int):
        super().__init__()
        self.emb_size, self.norm, self.graph_layers, self.p = emb_size, norm, graph_layers, dropout
        self.emb_layer = nn.Linear(emb_size, emb_size)
        dims = [n_items + emb_size, *map(int, hidden_dims), n_items]
        self.mlp = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        for layer in self.mlp:
            nn.init.xavier_normal_(layer.weight)
        self.walk: torch.Tensor | None = None  # P^T (sparse), set by the model

    def propagate(self, x: torch.Tensor) -> torch.Tensor:
        """x P for row vectors (P^T is stored: P^T x^T is one sparse product)."""
        if self.walk.is_sparse:
            return torch.sparse.mm(self.walk, x.T).T
        return x @ self.walk.T

    def graph(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.graph_layers):
            x = self.propagate(x) + x
            if self.norm:
                x = F.normalize(x)
        return x

    def _drop(self, h: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        return h * keep if keep is not None else F.dropout(h, self.p, self.training)

    def forward(self, x: torch.Tensor, t: torch.Tensor, keeps: list[torch.Tensor] | None = None) -> torch.Tensor:
        """``keeps``: explicit inverted-dropout masks, one for the input and one per layer (cross-device)."""
        keeps = keeps or [None] * (len(self.mlp) + 1)
        emb = self.emb_layer(timestep_embedding(t, self.emb_size))
        xx = self.graph(x) + x
        if self.norm:
            xx = F.normalize(xx)
        h = torch.cat([self._drop(xx, keeps[0]), emb], dim=-1)
        for layer, keep in zip(self.mlp, keeps[1:]):
            h = self._drop(torch.tanh(layer(h)), keep)
        return h + xx


class GDiff(Recommender):
    name = "gdiff"

    def __init__(self, cfg: GDiffConfig, shape: DataShape):
        super().__init__()
        self.cfg = cfg
        g = shape.transition_graph()
        if g is None:
            raise ConfigError("dataset.item_graph: gdiff decodes over the item transition graph of the training "
                              "interactions; set dataset.item_graph=co_interaction (refused under DP: the graph is private)")
        self.denoiser = GraphDecodingNetwork(shape.n_items, cfg.hidden_dims, cfg.emb_size, cfg.norm, cfg.dropout,
                                             cfg.graph_layers)
        self._graph_of = shape.transition_graph  # fit() rebuilds it from the rows it is shown
        self.register_buffer("walk_t", graph_buffer(random_walk_matrix(g).T), persistent=False)
        self.diffusion = cfg.build()

    def fit(self, train: sp.csr_matrix) -> None:
        """The graph of the users whose training rows this trainer shows (a silo node: its own users;
        centrally every user, the same graph as at construction)."""
        users = np.flatnonzero(np.diff(train.indptr))
        g = self._graph_of(users)
        self.walk_t = graph_buffer(random_walk_matrix(g).T).to(self.walk_t.device)

    def _denoise(self, keeps=None):
        self.denoiser.walk = self.walk_t  # the buffer follows .to(device); the module reads it from here

        def fn(x, t):
            return self.denoiser(x, t, keeps)
        return fn

    def loss(self, batch: Batch) -> torch.Tensor:
        r = batch.rand
        if r is None:
            return self.diffusion.training_loss(self._denoise(), batch.x)["loss"]
        keeps = [r[f"keep{i}"] for i in range(len(self.denoiser.mlp) + 1)]
        return self.diffusion.training_loss(self._denoise(keeps), batch.x, t=r["t"], noise=r["noise"])["loss"]

    def draw_randomness(self, batch: Batch, rnd) -> dict[str, torch.Tensor]:
        if self.walk_t.is_sparse:
            raise ConfigError(f"federation=device: gdiff's transition graph over {self.walk_t.shape[0]} items is "
                              "sparse, which torch.func.vmap cannot batch; use federation=silo")
        widths = [batch.x.shape[1]] + [layer.out_features for layer in self.denoiser.mlp]
        draws = {"t": rnd.randint(0, 1, self.diffusion.steps)[:, 0], "noise": rnd.normal(1, batch.x.shape[1])}
        for i, w in enumerate(widths):
            draws[f"keep{i}"] = rnd.keep_mask(2 + i, w, self.cfg.dropout)
        return draws

    @torch.no_grad()
    def scores(self, batch: Batch) -> torch.Tensor:
        c = self.cfg
        return self.diffusion.reverse(self._denoise(), batch.x, c.sampling_steps, c.inference_steps, c.sampling_noise)
