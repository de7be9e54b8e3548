"""DiffKG (Jiang, Yang, Xia and Huang, "DiffKG: Knowledge Graph Diffusion Model for Recommendation",
WSDM 2024, arXiv:2312.16890; survey section 3.4), after the official PyTorch code
github.com/HKUDS/DiffKG (``Model.py``, ``Main.py``, ``DataHandler.py``, ``Utils/Utils.py``,
``Params.py``), read line by line.

The knowledge graph (KG) is the dataset's public one: ``dataset.kg_file`` (``head relation tail``
lines, :func:`fedrec.data.side.load_kg_file`), else the item categories as a KG — on ML-100K the
genres: item --has_category--> genre (:func:`fedrec.data.side.kg_from_categories`; 19 genre
entities, one relation). Items are entities 0..n_items-1, as in the official files.

Algorithm as implemented (the official code's):

* **KG** (official ``readTriplets`` / ``buildGraphs``): unique triples plus their inverses with
  relation r + R (R relations); the first relation seen for a (head, tail) pair is kept. The KG
  adjacency K (entities x entities, 0/1) is the diffusion data: one row per entity. The "original"
  KG view keeps, for every head with more than ``triplet_num`` edges, ``triplet_num`` of them drawn
  once when the model is built (official ``sampleEdgeFromDict``; -1 keeps all).
* **Recommender** (official ``Model``): user, entity and relation embeddings (Xavier-uniform); a
  relation-aware graph attention over the KG (``RGAT``, ``kg_layers`` hops): for an edge (h, r, t)
  the score ((e_h | e_t) W) . e_r, LeakyReLU(0.2), softmax over h's edges, e_h <- e_h + sum_t att e_t,
  message dropout, L2 row normalisation, residual res <- res_lambda res + e. The items' KG-aware
  embeddings and the user embeddings are propagated ``gnn_layers`` times over the bipartite graph
  D^-1/2 (A + I) D^-1/2 (official ``makeTorchAdj``), the final embedding the *sum* of all layers;
  score(u, i) = <e_u, e_i>.
* **Every epoch** (official ``trainEpoch``) begins with the KG diffusion (:meth:`on_epoch_start`):
  (1) a pass over all entity rows of K in shuffled batches of ``kg_batch_size``: the shared
  :class:`fedrec.models.diffusion.GaussianDiffusion` (``linear-var``, T = 5, noise_scale 0.1,
  bounds 1e-4 / 0.02, first beta fixed at 1e-4, x0 prediction, SNR weights, t uniform) trains a
  DiffRec MLP denoiser (:class:`fedrec.models.denoiser.DenoiserMLP`, [n_entities -> 1000 ->
  n_entities], timestep embedding 10, L2-normalised input, dropout 0.5) with the loss
  (1 - e_loss) diffusion + e_loss UKGC, where UKGC is the collaborative KG constraint
  mean_d((x0_hat[:, items] R^T) U - E_entity)^2 with U, E the recommender's current (detached) user
  and entity embeddings and R the training matrix; its own Adam (lr 1e-3);
  (2) the KG is rebuilt: each entity row is denoised from itself (posterior mean through all T
  steps, no noise), its top-``rebuild_k`` columns are its new neighbours, reverse edges are added,
  only edges of the original KG are kept (with their relation), and each survives with probability
  ``keep_rate``: the denoised KG.
  Then the interaction pass (BPR over every training interaction, one uniform negative each): the
  main view propagates over the denoised KG and the contrast view over the original sampled KG
  (``cl_pattern`` 0; 1 swaps them); the loss is BPR + ``reg`` * sum of the squared norms of all
  recommender parameters + ``ssl_reg`` (InfoNCE(items of the batch's positives) + InfoNCE(users of
  the batch)) between the two views (L2-normalised, temperature ``temp``, all items / all users as
  the candidates).
* **Scoring** uses the main view (the denoised KG of the last rebuild), no message dropout.

Defaults (conf/model/diffkg.yaml) are ``Params.py``'s: d = 64, 2 GCN layers, 1 KG hop, message
dropout 0.1, res_lambda 0.5, triplet_num 10, reg 1e-7, ssl_reg 0.1, temp 0.1, keep_rate 0.5,
rebuild_k 1, e_loss 0.5, lr 1e-3, batch 1024 interactions, 25 epochs.

Deviations, each with its reason:

* BPR is ``-logsigmoid(d)`` instead of ``-log(sigmoid(d))`` (the same value, stable), and InfoNCE is
  computed with ``logsumexp`` (the same value); negatives are BPR-MF's vectorised rejection draws
  (:mod:`fedrec.models.bpr`); the reg term is the same per example, so its batch mean is the
  official term.
* The bipartite degrees get + 1e-7 (LightGCN's normalisation, shared): a relative change of < 1e-7,
  the self-loop already makes every degree >= 1.
* The per-head edge sampling and the keep mask draw from torch's generator (the official code:
  Python's ``random`` and torch's); the denoiser's Adam state is not checkpointed (a resumed run
  restarts its moments), and the denoised KG is rebuilt from the current denoiser whenever its
  parameters changed since the last rebuild (the server of a federation scores with the
  aggregated denoiser; a run resumed from a checkpoint rebuilds it).
* The official code runs on one GPU with ``torch_scatter``; the grouped softmax and sums here are
  ``scatter_reduce`` / ``index_add`` (the same values).

Federation and privacy: like LightGCN (``couples_users``), a user's embedding mixes in other users'
rows through the bipartite graph, so DP-SGD and cross-device per-user clients are refused with one
line; in a silo each node propagates and trains the denoiser over its own users' rows (``fit``),
keeps its users' embeddings private and FedAvg averages the rest (entities, relations, attention,
denoiser). The KG itself (a file or the genres) is public item side data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from fedrec.data.side import KnowledgeGraph, kg_from_categories
from fedrec.errors import ConfigError
from fedrec.models.base import Batch, DataShape, Recommender
from fedrec.models.bpr import BPRMF
from fedrec.models.denoiser import DenoiserMLP
from fedrec.models.diffusion import GaussianDiffusion
from fedrec.models.lightgcn import _SymmetricSpMM, normalized_adjacency


@dataclass
class DiffKGConfig:
    embedding_size: int = 64  # latdim
    gnn_layers: int = 2  # bipartite propagation layers (official gnn_layer)
    kg_layers: int = 1  # RGAT hops (official layer_num_kg)
    mess_dropout: float = 0.1  # RGAT message dropout (official mess_dropout_rate)
    res_lambda: float = 0.5  # RGAT residual weight
    triplet_num: int = 10  # edges kept per head in the original KG view (-1: all)
    reg: float = 1e-7  # weight of the squared norms of all recommender parameters
    ssl_reg: float = 0.1  # weight of the contrastive term
    temp: float = 0.1  # InfoNCE temperature
    cl_pattern: int = 0  # 0: main view = denoised KG; 1: main view = original KG
    keep_rate: float = 0.5  # share of the denoised KG's edges kept (official keepRate)
    rebuild_k: int = 1  # neighbours per entity in the rebuilt KG
    e_loss: float = 0.5  # weight of the UKGC term against the diffusion loss
    denoiser_dims: list[int] = field(default_factory=lambda: [1000])  # official dims
    emb_size: int = 10  # timestep embedding size (official d_emb_size)
    norm: bool = True  # L2-normalise the denoiser input
    denoiser_dropout: float = 0.5  # denoiser input dropout (official Denoise default)
    steps: int = 5  # T
    noise_scale: float = 0.1
    noise_min: float = 0.0001
    noise_max: float = 0.02
    first_beta: float = 0.0001  # official betas[0] = 0.0001
    sampling_steps: int = 0  # noise the rows to this step before the rebuild's reverse pass (official 0)
    kg_batch_size: int = 1024  # entity rows per diffusion step (official: args.batch)
    denoiser_lr: float = 0.001  # Adam learning rate of the denoiser (official: args.lr)

    def __post_init__(self) -> None:
        for key in ("embedding_size", "rebuild_k", "kg_batch_size", "emb_size"):
            if int(getattr(self, key)) < 1:
                raise ConfigError(f"model.{key}: must be >= 1, got {getattr(self, key)}")
        for key in ("gnn_layers", "kg_layers"):
            if int(getattr(self, key)) < 0:
                raise ConfigError(f"model.{key}: must be >= 0, got {getattr(self, key)}")
        for key in ("mess_dropout", "denoiser_dropout"):
            if not 0.0 <= float(getattr(self, key)) < 1.0:
                raise ConfigError(f"model.{key}: must be in [0, 1), got {getattr(self, key)}")
        if not 0.0 < self.keep_rate <= 1.0:
            raise ConfigError(f"model.keep_rate: must be in (0, 1], got {self.keep_rate}")
        if not 0.0 <= self.e_loss <= 1.0:
            raise ConfigError(f"model.e_loss: must be in [0, 1], got {self.e_loss}")
        if self.cl_pattern not in (0, 1):
            raise ConfigError(f"model.cl_pattern: expected 0 or 1, got {self.cl_pattern}")
        if self.temp <= 0 or self.reg < 0 or self.ssl_reg < 0 or self.denoiser_lr <= 0:
            raise ConfigError("model.temp / model.denoiser_lr: must be > 0; model.reg / model.ssl_reg: >= 0")
        if self.triplet_num < 1 and self.triplet_num != -1:
            raise ConfigError(f"model.triplet_num: must be >= 1 or -1 (all), got {self.triplet_num}")

    def build_diffusion(self) -> GaussianDiffusion:
        return GaussianDiffusion(self.steps, "linear-var", self.noise_scale, self.noise_min, self.noise_max,
                                 "x0", reweight=True, importance_sampling=False, beta_fixed=True,
                                 first_beta=self.first_beta)


# ---------------------------------------------------------------------------- the KG as the official code reads it
@dataclass
class KGEdges:
    """Edges (head, tail, relation) of the official ``kg_edges``: unique triples and their inverses
    (relation + R), the first relation of each (head, tail) kept."""

    head: np.ndarray
    tail: np.ndarray
    relation: np.ndarray
    n_entities: int
    n_relations: int

    @staticmethod
    def from_kg(kg: KnowledgeGraph) -> "KGEdges":
        can = np.unique(kg.triples, axis=0)
        inv = np.stack([can[:, 2], can[:, 1] + kg.n_relations, can[:, 0]], 1)
        trip = np.concatenate([can, inv])  # official order: canonical (sorted), then their inverses
        n_ent = kg.n_entities
        key = trip[:, 0] * n_ent + trip[:, 2]
        _, first = np.unique(key, return_index=True)  # first occurrence of each (head, tail)
        first = np.sort(first)
        t = trip[first]
        return KGEdges(t[:, 0], t[:, 2], t[:, 1], n_ent, 2 * kg.n_relations)

    def adjacency(self) -> sp.csr_matrix:
        return sp.csr_matrix((np.ones(len(self.head), dtype=np.float32), (self.head, self.tail)),
                             shape=(self.n_entities, self.n_entities))

    def relation_of(self, head: np.ndarray, tail: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(is a KG edge, its relation) for each (head, tail) pair (official ``relation_dict`` lookup)."""
        keys = self.head * self.n_entities + self.tail
        order = np.argsort(keys)
        sk = keys[order]
        q = np.asarray(head, dtype=np.int64) * self.n_entities + np.asarray(tail, dtype=np.int64)
        pos = np.clip(np.searchsorted(sk, q), 0, max(len(sk) - 1, 0))
        hit = (sk[pos] == q) if len(sk) else np.zeros(len(q), dtype=bool)
        return hit, self.relation[order][pos]

    def sample_per_head(self, k: int, generator: torch.Generator | None = None) -> np.ndarray:
        """Indices of at most k edges per head, drawn uniformly without replacement (k = -1: all)."""
        if k == -1:
            return np.arange(len(self.head))
        score = torch.rand(len(self.head), generator=generator).numpy()
        order = np.lexsort((score, self.head))  # by head, random within a head
        h = self.head[order]
        start = np.searchsorted(h, h, side="left")
        rank = np.arange(len(h)) - start
        return np.sort(order[rank < k])


def _edge_tensor(edges: KGEdges, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (torch.from_numpy(edges.head[idx].astype(np.int64)), torch.from_numpy(edges.tail[idx].astype(np.int64)),
            torch.from_numpy(edges.relation[idx].astype(np.int64)))


class RGAT(nn.Module):
    """The official relation-aware graph attention over the KG (see the module docstring)."""

    def __init__(self, dim: int, hops: int, dropout: float, res_lambda: float):
        super().__init__()
        self.W = nn.Parameter(torch.empty(2 * dim, dim))
        nn.init.xavier_uniform_(self.W, gain=nn.init.calculate_gain("relu"))
        self.hops, self.p, self.res_lambda = hops, dropout, res_lambda

    def aggregate(self, ent: torch.Tensor, rel: torch.Tensor, kg) -> torch.Tensor:
        head, tail, rtype = kg
        score = F.leaky_relu(((torch.cat([ent[head], ent[tail]], -1) @ self.W) * rel[rtype]).sum(-1), 0.2)
        # softmax over each head's edges (official scatter_softmax); the max shift is a constant
        top = torch.full((ent.shape[0],), -torch.inf, dtype=score.dtype, device=score.device)
        top = top.scatter_reduce(0, head, score.detach(), "amax")
        ex = torch.exp(score - top[head])
        att = ex / torch.zeros_like(top).index_add(0, head, ex)[head]
        return torch.zeros_like(ent).index_add(0, head, ent[tail] * att[:, None]) + ent

    def forward(self, ent: torch.Tensor, rel: torch.Tensor, kg, dropout: bool) -> torch.Tensor:
        res = ent
        for _ in range(self.hops):
            ent = self.aggregate(ent, rel, kg)
            if dropout:
                ent = F.dropout(ent, self.p, training=True)
            ent = F.normalize(ent)
            res = self.res_lambda * res + ent
        return res


def info_nce(view1: torch.Tensor, view2: torch.Tensor, nodes: torch.Tensor, temp: float) -> torch.Tensor:
    """Per node: -log( exp(<a_n, b_n>/temp) / sum_j exp(<a_n, b_j>/temp) ), a, b the L2-normalised views
    (official ``contrastLoss`` before its mean)."""
    a, b = F.normalize(view1), F.normalize(view2)
    an = a[nodes]
    return torch.logsumexp(an @ b.T / temp, dim=-1) - (an * b[nodes]).sum(-1) / temp


class DiffKG(Recommender):
    name = "diffkg"
    couples_users = True

    def __init__(self, cfg: DiffKGConfig, shape: DataShape):
        super().__init__()
        self.cfg = cfg
        side = shape.item_side
        kg = side.kg
        if kg is None and side.categories is not None:
            kg = kg_from_categories(side.categories)
        if kg is None:
            raise ConfigError("dataset.kg_file: diffkg needs a knowledge graph: a 'head relation tail' file "
                              "(dataset.kg_file) or item categories (e.g. ML-100K's genres)")
        if kg.n_items != shape.n_items:
            raise ConfigError(f"dataset.kg_file: the knowledge graph has {kg.n_items} items, the data {shape.n_items}")
        self.kg_source = kg.source
        self.n_users, self.n_items = shape.n_users, shape.n_items
        self.edges = KGEdges.from_kg(kg)
        self.kg_rows = self.edges.adjacency()  # the diffusion data: one 0/1 row per entity
        d = int(cfg.embedding_size)
        self.user_emb = nn.Embedding(shape.n_users, d)
        self.entity_emb = nn.Parameter(torch.empty(self.edges.n_entities, d))
        self.relation_emb = nn.Parameter(torch.empty(self.edges.n_relations, d))
        for w in (self.user_emb.weight, self.entity_emb, self.relation_emb):
            nn.init.xavier_uniform_(w)
        self.rgat = RGAT(d, int(cfg.kg_layers), float(cfg.mess_dropout), float(cfg.res_lambda))
        n_ent = self.edges.n_entities
        dims = [int(h) for h in cfg.denoiser_dims]
        self.denoiser = DenoiserMLP([n_ent, *dims], [*dims[::-1], n_ent], int(cfg.emb_size), bool(cfg.norm),
                                    float(cfg.denoiser_dropout))
        self.diffusion = cfg.build_diffusion()
        self.sampled_kg = _edge_tensor(self.edges, self.edges.sample_per_head(int(cfg.triplet_num)))
        self.denoised_kg: tuple[torch.Tensor, ...] | None = None
        self._denoised_at: tuple | None = None  # the denoiser parameters' versions when it was built
        self._adj: torch.Tensor | None = None
        self._train: torch.Tensor | None = None  # R^T as a sparse (items x users) tensor, for UKGC
        self._denoiser_opt: torch.optim.Optimizer | None = None

    # ------------------------------------------------------------------ graphs
    @property
    def train_unit(self) -> str:
        return "interaction"

    def fit(self, train: sp.csr_matrix) -> None:
        if train.shape != (self.n_users, self.n_items):
            raise ConfigError(f"model.fit: training matrix {train.shape}, model ({self.n_users}, {self.n_items})")
        adj = normalized_adjacency(train, self_loops=True)
        idx = torch.from_numpy(np.vstack([adj.row, adj.col]).astype(np.int64))
        self._adj = torch.sparse_coo_tensor(idx, torch.from_numpy(adj.data), adj.shape,
                                            check_invariants=True).coalesce().to_sparse_csr()
        rt = sp.csr_matrix((train > 0).astype(np.float32)).T.tocoo()
        self._train = torch.sparse_coo_tensor(torch.from_numpy(np.vstack([rt.row, rt.col]).astype(np.int64)),
                                              torch.from_numpy(rt.data), rt.shape, check_invariants=True).coalesce()

    def _device(self) -> torch.device:
        return self.entity_emb.device

    def _need_fit(self) -> None:
        if self._adj is None:
            raise RuntimeError("model 'diffkg' needs its graph: call fit(train) before training or scoring")
        dev = self._device()
        if self._adj.device != dev:
            self._adj, self._train = self._adj.to(dev), self._train.to(dev)

    def propagate(self, kg, dropout: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Final user and item embeddings with the KG view ``kg`` (official ``Model.forward``)."""
        self._need_fit()
        kg = tuple(k.to(self._device()) for k in kg)
        ent = self.rgat(self.entity_emb, self.relation_emb, kg, dropout)
        e = torch.cat([self.user_emb.weight, ent[:self.n_items]], 0)
        total = e
        for _ in range(int(self.cfg.gnn_layers)):
            e = _SymmetricSpMM.apply(self._adj, e)
            total = total + e
        return total[:self.n_users], total[self.n_users:]

    # ------------------------------------------------------------------ the KG diffusion
    def _versions(self) -> tuple:
        return tuple(p._version for p in self.denoiser.parameters())

    def _kg_batch(self, idx: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(self.kg_rows[idx].toarray()).to(self._device())

    def diffusion_losses(self, rows: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row diffusion loss and UKGC loss (official ``training_losses``) for entity rows ``rows``."""
        out = self.diffusion.training_loss(self.denoiser, rows)
        item_users = torch.sparse.mm(self._train.t(), out["pred_x0"][:, :self.n_items].T).T
        kg_emb = item_users @ self.user_emb.weight.detach()
        ukgc = ((kg_emb - self.entity_emb.detach()[idx]) ** 2).mean(-1)
        return out["loss"], ukgc

    def train_denoiser(self) -> float:
        """One pass over every entity row (official first loop of ``trainEpoch``); the mean loss."""
        self._need_fit()
        c = self.cfg
        if self._denoiser_opt is None:
            self._denoiser_opt = torch.optim.Adam(self.denoiser.parameters(), lr=float(c.denoiser_lr))
        self.denoiser.train()
        order = torch.randperm(self.edges.n_entities).numpy()
        total = 0.0
        with torch.enable_grad():
            for start in range(0, len(order), int(c.kg_batch_size)):
                idx = order[start:start + int(c.kg_batch_size)]
                diff, ukgc = self.diffusion_losses(self._kg_batch(idx), torch.from_numpy(idx).to(self._device()))
                loss = diff.mean() * (1 - c.e_loss) + ukgc.mean() * c.e_loss
                self._denoiser_opt.zero_grad(set_to_none=True)
                loss.backward()
                self._denoiser_opt.step()
                total += float(loss.detach()) * len(idx)
        return total / max(len(order), 1)

    @torch.no_grad()
    def rebuild_kg(self) -> tuple[torch.Tensor, ...]:
        """The denoised KG (official "re-build kg"): each entity's top-k denoised columns, reverse edges
        added, only original KG edges kept (with their relation), each kept with probability keep_rate."""
        c = self.cfg
        was = self.denoiser.training
        self.denoiser.eval()
        heads, tails = [], []
        n = self.edges.n_entities
        for start in range(0, n, int(c.kg_batch_size)):
            idx = np.arange(start, min(n, start + int(c.kg_batch_size)))
            den = self.diffusion.reverse(self.denoiser, self._kg_batch(idx), int(c.sampling_steps))
            top = torch.topk(den, int(c.rebuild_k), dim=1).indices.cpu().numpy()
            heads.append(np.repeat(idx, top.shape[1]))
            tails.append(top.ravel())
        self.denoiser.train(was)
        h, t = np.concatenate(heads), np.concatenate(tails)
        key = np.unique(np.concatenate([h * n + t, t * n + h]))  # the pairs plus their reverses
        h, t = key // n, key % n
        hit, rel = self.edges.relation_of(h, t)
        h, t, rel = h[hit], t[hit], rel[hit]
        keep = torch.floor(torch.rand(len(h)) + float(c.keep_rate)).bool().numpy()
        kg = (torch.from_numpy(h[keep].astype(np.int64)), torch.from_numpy(t[keep].astype(np.int64)),
              torch.from_numpy(rel[keep].astype(np.int64)))
        self.denoised_kg, self._denoised_at = kg, self._versions()
        return kg

    def current_denoised_kg(self) -> tuple[torch.Tensor, ...]:
        if self.denoised_kg is None or self._denoised_at != self._versions():
            return self.rebuild_kg()
        return self.denoised_kg

    def on_epoch_start(self) -> None:
        self.last_denoiser_loss = self.train_denoiser()
        self.rebuild_kg()

    # ------------------------------------------------------------------ recommender
    def _views(self, dropout: bool):
        denoised = self.current_denoised_kg()
        main, other = (denoised, self.sampled_kg) if self.cfg.cl_pattern == 0 else (self.sampled_kg, denoised)
        return self.propagate(main, dropout), self.propagate(other, dropout)

    def optimizer_groups(self, lr: float, weight_decay: float):
        own = [p for n, p in self.named_parameters() if not n.startswith("denoiser.") and p.requires_grad]
        return [{"params": own, "lr": lr, "weight_decay": weight_decay}]

    def _param_norms(self) -> torch.Tensor:
        return sum(p.pow(2).sum() for n, p in self.named_parameters() if not n.startswith("denoiser."))

    def loss(self, batch: Batch) -> torch.Tensor:
        """Per interaction (the trainer's examples: ``train_unit`` is "interaction"); a batch of users
        without ``items`` (a caller feeding users) gets one positive per user drawn from its row."""
        c = self.cfg
        x = batch.x
        with torch.no_grad():
            neg, bad = BPRMF._negatives(x, 1, lambda r: torch.randint(0, x.shape[1], (len(x), 1), device=x.device))
            pos = batch.items
            if pos is None:
                has = x.sum(1) > 0
                pos = torch.multinomial(torch.where(has[:, None], (x > 0).float(), torch.ones_like(x)), 1)[:, 0]
                bad = bad | ~has[:, None]
        (u1, i1), (u2, i2) = self._views(dropout=True)
        users, neg = batch.users, neg[:, 0]
        diff = (u1[users] * (i1[pos] - i1[neg])).sum(-1)
        bpr = -F.logsigmoid(diff) * (~bad[:, 0]).to(diff.dtype)
        cl = info_nce(i2, i1, pos, float(c.temp)) + info_nce(u2, u1, users, float(c.temp))
        return bpr + float(c.reg) * self._param_norms() + float(c.ssl_reg) * cl

    def draw_randomness(self, batch: Batch, rnd) -> dict[str, torch.Tensor]:
        raise ConfigError("model diffkg: a user's loss reads other users' rows through the graph, so it "
                          "cannot train as independent per-user clients")

    @torch.no_grad()
    def scores(self, batch: Batch) -> torch.Tensor:
        main = self.current_denoised_kg() if self.cfg.cl_pattern == 0 else self.sampled_kg
        users, items = self.propagate(main, dropout=False)
        return users[batch.users] @ items.T

    def private_parameter_names(self) -> set[str]:
        return {"user_emb.weight"}
