"""GiffCF (Zhu, Wang, Zhang and Xiong, "Graph Signal Diffusion Model for Collaborative Filtering",
SIGIR 2024, arXiv:2311.08744; survey section 3.4), after the official TensorFlow code
github.com/VinciZhu/GiffCF (``models/giff_cf.py``, ``models/denoiser.py``, ``models/recommender.py``,
``configs/movielens.toml``), read line by line.

Algorithm as implemented (the official code's, which this follows where it differs from the paper):

* **Item graph.** R is the binarised training matrix (users x items), D_U / D_I its user / item
  degrees. The official ``adj_right = D_U^-1/4 R D_I^-1/2`` gives the item-item graph
  A = adj_right^T adj_right = D_I^-1/2 R^T D_U^-1/2 R D_I^-1/2 (self-loops kept), divided by its
  largest eigenvalue lambda_1 (official: ``svds(adj_right, k)``, lambda = sigma^2; here ``eigsh`` of A,
  the same values). fedrec builds it from the training interactions only, through
  ``DataShape.co_interaction_graph(user_power=-0.5, item_power=-0.5, diagonal=True)``
  (``dataset.item_graph=co_interaction``; :func:`fedrec.data.side.co_interaction_graph`).
* **Filters.** smooth(x) = x A / lambda_1 (the normalised graph filter), optionally mixed with the
  ideal low-pass filter x V_k^T V_k over the top ``ideal_cutoff`` eigenvectors V_k of A:
  smooth(x) = (x A / lambda_1 + w x V_k^T V_k) / (1 + w), w = ``ideal_weight`` (0 on ML-1M: then only
  lambda_1 is computed, official ``ideal_cutoff = 1``).
* **Forward process** (:class:`fedrec.models.diffusion.GraphSignalDiffusion`, the shared core): the
  heat equation dz/dt = -L z with L = I - A/lambda_1, in the official code's first-order form
  z_t = x + alpha (t/T) (smooth(x) - x), t = 0..T, plus Gaussian noise of std
  noise_scale * noise_decay^(T - t) when noise_scale > 0 (0 on ML-1M: deterministic smoothing).
* **Denoiser** (official ``Denoiser``): item embeddings E (n_items x d, Glorot-uniform), two
  timestep MLPs (20 sinusoids [sin | cos] -> Dense(20, swish) -> Dense(1)) tau_1(t), tau_2(t), and
  two "mixers" Dense(2, swish) -> Dense(1) applied per coordinate to stacked signals:
  z_e = (z_t / n_items) E, c_e = (c / max(||c||_1, 1)) E,
  h = mixer_1([z_e, c_e, tau_1(t)]) (per embedding dimension), m = h E^T,
  x0_hat = mixer_2([m, c, smooth(c), tau_2(t)]) (per item). c is the user's history: in training the
  clean x under inverted dropout (p = ``dropout``, kept entries scaled by 1/(1-p) as
  ``tf.nn.dropout``), at inference x itself.
* **Loss**: t uniform in 1..T, z_t from x, per-user sum over items of (x - x0_hat)^2, batch mean;
  Adam at lr 1e-3 for E and for the MLPs (the official code's two optimisers have equal settings,
  so one Adam is the same update).
* **Sampler** (official ``call(training=False)``, DDIM-like): z_T = filter(x, T); for t = T..1,
  s = t - 1: x0_hat = denoiser(z_t, x, smooth(x), t), z_s = F_s(x0_hat) + noise_decay^(t-s)
  (z_t - F_t(x0_hat)) with F_t(y) = y + alpha (t/T) (smooth(y) - y); the scores are z_0.
* **Evaluation**: the official "Recall" is hits / min(K, |test items|), fedrec's ``capped_recall@K``
  (:mod:`fedrec.eval.metrics`); NDCG is the usual one with idcg over min(K, |test|) positions; the
  epoch is chosen on validation ``capped_recall@20`` every 10 epochs, patience 200 epochs.

Defaults (conf/model/giffcf.yaml) are ``configs/movielens.toml``: d = 200, T = 3, alpha = 1.5,
ideal_weight = 0, noise_scale = 0, noise_decay = 0.5, dropout = 0.5, batch 100, lr 1e-3.

Checked: the official ML-1M checkpoints loaded into this module (``simulations/giffcf_official.py``)
score exactly the official README's test figures (legacy: Recall@20 0.1947, NDCG@20 0.1221), and
from the official initial weights fedrec's training losses follow the official run's epoch by epoch
(docs/RESULTS.md); tests/test_giffcf.py checks graph, filters, scores and loss against numpy
transcriptions of the official code.

Deviations, each with its reason:

* The graph filter multiplies by the item-item matrix A (dense when it is denser than 5%, as on
  ML-1M, else sparse) instead of the official two sparse products with adj_right: the model only
  sees the item graph (DataShape), never the user rows; the products are equal up to float32
  rounding.
* torch's Adam uses eps = 1e-8 (Keras: 1e-7); different random streams (TensorFlow's vs torch's).
* The official ``ablation`` variants and a custom inference grid ``t`` are not ported (the paper's
  ablations, not the model); the sampler runs every step T..1, the official default.
* In a federation the graph is each node's own: a node builds it from its own users' training rows
  (its DataShape), the server, scoring all users, from the whole training matrix. The graph is a
  buffer, never aggregated.
* Under DP (privacy=dpsgd|user_dp|node_dp) GiffCF is refused: its graph is computed from every
  user's interactions outside the accountant (:mod:`fedrec.privacy.public_only` refuses
  ``dataset.item_graph=co_interaction``), and a public graph is not a GiffCF graph (the official
  normalisation needs R's degrees), so GiffCF asks for the co-interaction graph and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from fedrec.errors import ConfigError
from fedrec.models.base import Batch, DataShape, Recommender
from fedrec.models.denoiser import timestep_embedding
from fedrec.models.diffusion import GraphSignalDiffusion

#: the official normalisation of the item graph (``adj_right = D_U^-1/4 R D_I^-1/2``, A = adj_right^T adj_right)
GIFFCF_WEIGHTING = {"user_power": -0.5, "item_power": -0.5, "diagonal": True}
#: a graph denser than this share of n_items^2 is multiplied as a dense matrix
DENSE_SHARE = 0.05
#: width of the timestep sinusoids and of the timestep MLP's hidden layer (official ``TimeEmbed(20, 1, ...)``)
TIME_DIM = 20


@dataclass
class GiffCFConfig:
    ITEM_GRAPH: ClassVar[str] = "co_interaction"  # checked by fedrec.config.validate (check_dataset_needs)

    embed_dim: int = 200  # d, item embedding size
    steps: int = 3  # T, diffusion steps
    alpha: float = 1.5  # smoothing strength at t = T
    ideal_weight: float = 0.0  # weight of the ideal low-pass filter in smooth()
    ideal_cutoff: int = 200  # eigenvectors of the ideal filter (used when ideal_weight > 0)
    noise_scale: float = 0.0  # std of the forward noise at t = T
    noise_decay: float = 0.5  # noise std ratio per step; also the sampler's residual decay
    dropout: float = 0.5  # dropout of the history condition c in training
    norm_ord: int | None = 1  # c is divided by max(||c||_ord, 1) before the embedding; null: not
    eigen_seed: int = 0  # start vector of the Lanczos eigen-solver (deterministic)

    def __post_init__(self) -> None:
        if self.embed_dim < 1:
            raise ConfigError(f"model.embed_dim: must be >= 1, got {self.embed_dim}")
        if self.ideal_weight < 0:
            raise ConfigError(f"model.ideal_weight: must be >= 0, got {self.ideal_weight}")
        if self.ideal_cutoff < 1:
            raise ConfigError(f"model.ideal_cutoff: must be >= 1, got {self.ideal_cutoff}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout: must be in [0, 1), got {self.dropout}")
        if self.norm_ord is not None and self.norm_ord < 1:
            raise ConfigError(f"model.norm_ord: must be null or >= 1, got {self.norm_ord}")
        GraphSignalDiffusion(self.steps, self.alpha, self.noise_scale, self.noise_decay)  # checks those keys


def top_eigen(a: sp.csr_matrix, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest eigenvalues (descending) and eigenvectors (k, n) of the symmetric PSD ``a``."""
    from scipy.sparse.linalg import eigsh

    n = a.shape[0]
    if k >= n - 1:  # Lanczos needs k < n; small graphs take the dense solver
        vals, vecs = np.linalg.eigh(a.toarray().astype(np.float64))
        order = np.argsort(vals)[::-1][:k]
        return vals[order], vecs[:, order].T
    v0 = np.random.default_rng(seed).standard_normal(n)
    vals, vecs = eigsh(a.astype(np.float64), k=k, which="LA", v0=v0)
    order = np.argsort(vals)[::-1]
    return vals[order], vecs[:, order].T


class Mixer(nn.Module):
    """Official ``SimpleMixer``: signals stacked on a last axis -> Dense(hidden, swish) -> Dense(1)."""

    def __init__(self, n_inputs: int, hidden: int = 2):
        super().__init__()
        self.hidden, self.out = nn.Linear(n_inputs, hidden), nn.Linear(hidden, 1)
        for layer in (self.hidden, self.out):  # Keras Dense: Glorot-uniform kernel, zero bias
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, signals: list[torch.Tensor]) -> torch.Tensor:
        return self.out(F.silu(self.hidden(torch.stack(signals, dim=-1)))).squeeze(-1)


class TimeEmbed(nn.Module):
    """Official ``TimeEmbed(20, 1, swish, T)``: sinusoids [sin | cos] -> Dense(20, swish) -> Dense(1)."""

    def __init__(self, dim: int = TIME_DIM):
        super().__init__()
        self.dim = dim
        self.hidden, self.out = nn.Linear(dim, dim), nn.Linear(dim, 1)
        for layer in (self.hidden, self.out):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.out(F.silu(self.hidden(timestep_embedding(t, self.dim, sin_first=True))))


class GiffCFDenoiser(nn.Module):
    """The official ``Denoiser``: x0_hat from (z_t, c, smooth(c), t); see the module docstring."""

    def __init__(self, n_items: int, embed_dim: int, norm_ord: int | None):
        super().__init__()
        self.n_items, self.norm_ord = n_items, norm_ord
        self.item_embed = nn.Parameter(torch.empty(n_items, embed_dim))
        nn.init.xavier_uniform_(self.item_embed)
        self.t_embed1, self.t_embed2 = TimeEmbed(), TimeEmbed()
        self.embed_mixer, self.score_mixer = Mixer(3), Mixer(4)

    def forward(self, z_t: torch.Tensor, c: torch.Tensor, ac: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        e = self.item_embed
        if self.norm_ord is not None:
            c_in = c / torch.linalg.vector_norm(c, ord=self.norm_ord, dim=-1, keepdim=True).clamp(min=1.0)
        else:
            c_in = c
        z_embed = (z_t / self.n_items) @ e
        c_embed = c_in @ e
        x_embed = self.embed_mixer([z_embed, c_embed, self.t_embed1(t).expand_as(z_embed)])
        x_mid = x_embed @ e.T
        return self.score_mixer([x_mid, c, ac, self.t_embed2(t).expand_as(x_mid)])


class GiffCF(Recommender):
    name = "giffcf"

    def __init__(self, cfg: GiffCFConfig, shape: DataShape):
        super().__init__()
        self.cfg = cfg
        graph = shape.co_interaction_graph(**GIFFCF_WEIGHTING)
        if graph is None:
            raise ConfigError("dataset.item_graph: giffcf smooths over the item graph of the training interactions; "
                              "set dataset.item_graph=co_interaction (refused under DP: the graph is private)")
        n = shape.n_items
        k = cfg.ideal_cutoff if cfg.ideal_weight > 0 else 1
        if k > n:
            raise ConfigError(f"model.ideal_cutoff: {k} exceeds the {n} items")
        vals, vecs = top_eigen(graph, k, cfg.eigen_seed)
        if not vals[0] > 0:
            raise ConfigError("dataset.item_graph: the co-interaction graph is empty (no training interactions)")
        a = (graph.astype(np.float64) / vals[0]).astype(np.float32)
        if a.nnz > DENSE_SHARE * n * n:
            self.register_buffer("graph", torch.from_numpy(a.toarray()), persistent=False)
        else:
            coo = a.tocoo()
            idx = torch.from_numpy(np.vstack([coo.row, coo.col]).astype(np.int64))
            self.register_buffer("graph", torch.sparse_coo_tensor(idx, torch.from_numpy(coo.data), (n, n),
                                                         check_invariants=True).coalesce(),
                                 persistent=False)
        self.register_buffer("eigen_vectors", torch.from_numpy(vecs.astype(np.float32)), persistent=False)
        self.register_buffer("top_eigenvalue", torch.tensor(float(vals[0])), persistent=False)
        self.denoiser = GiffCFDenoiser(n, cfg.embed_dim, cfg.norm_ord)
        self.diffusion = GraphSignalDiffusion(cfg.steps, cfg.alpha, cfg.noise_scale, cfg.noise_decay)

    # ----------------------------------------------------------------- filters
    def propagate(self, x: torch.Tensor) -> torch.Tensor:
        """x A / lambda_1 (A symmetric, so row vectors times A)."""
        if self.graph.is_sparse:
            return torch.sparse.mm(self.graph, x.T).T
        return x @ self.graph

    def ideal(self, x: torch.Tensor) -> torch.Tensor:
        """The ideal low-pass filter x V_k^T V_k."""
        return (x @ self.eigen_vectors.T) @ self.eigen_vectors

    def smooth(self, x: torch.Tensor) -> torch.Tensor:
        w = self.cfg.ideal_weight
        if w == 0:
            return self.propagate(x)
        return (self.propagate(x) + w * self.ideal(x)) / (1 + w)

    # ----------------------------------------------------------------- training and scoring
    def loss(self, batch: Batch) -> torch.Tensor:
        x, r = batch.x, batch.rand
        if r is None:
            c = F.dropout(x, self.cfg.dropout, training=True)
            t = noise = None
        else:
            c, t, noise = x * r["keep"], r["t"], r.get("noise")
        ac = self.smooth(c)
        out = self.diffusion.training_loss(lambda z, tt: self.denoiser(z, c, ac, tt), x, self.smooth(x),
                                           t=t, noise=noise)
        return out["loss"]

    def draw_randomness(self, batch: Batch, rnd) -> dict[str, torch.Tensor]:
        n = batch.x.shape[1]
        draws = {"t": rnd.randint(0, 1, self.cfg.steps)[:, 0] + 1, "keep": rnd.keep_mask(2, n, self.cfg.dropout)}
        if self.cfg.noise_scale > 0:
            draws["noise"] = rnd.normal(1, n)
        return draws

    @torch.no_grad()
    def scores(self, batch: Batch) -> torch.Tensor:
        x = batch.x
        ax = self.smooth(x)
        return self.diffusion.sample(lambda z, t: self.denoiser(z, x, ax, t), x, self.smooth, ax)
