"""EDGE-Rec: diffusion over rating-matrix patches with a graph diffusion transformer.

Paper: Utkarsh Priyam, Hemit Shah, Edoardo Botta. "EDGE-Rec: Efficient and Data-Guided Edge
Diffusion For Recommender Systems Graphs". GenAIRecP workshop at KDD 2024; arXiv:2409.14689.
Official code: github.com/EdoardoBotta/EDGE-Rec (read at commit 935c6d5: ``edge_rec/diffusion/
diffusion.py``, ``edge_rec/model/graph_transformer.py``, ``edge_rec/model/attend/{base,rcsa}.py``,
``edge_rec/model/embed/features/movie_lens.py``, ``run_training.py``, ``execute.ipynb``).

As implemented (official choices unless marked *deviation*):

* A training example is a patch, a submatrix of ``patch_users`` users x ``patch_items`` items of the
  training rating matrix (official ``subgraph_size=50``; items drawn uniformly without replacement,
  the official ``target_density=None``). The users of a patch are consecutive users of the trainer's
  shuffled batch; each group of users gets ``item_blocks`` patches with independent item draws.
  Known ratings are mapped to [-1, 1] and unknown entries are 0 with a known mask.
  *Deviation*: the official ``RatingsTransform.ToGaussian`` maps each rating to a random point of its
  normal-quantile band; here the map is linear, (r - r_mid) / r_half (1..5 -> -1..1), and inverted the
  same way.
* Forward process: the shared core's ``GaussianDiffusion`` with the official ``T = 1000`` cosine schedule,
  eps-prediction, loss weight 1 (``min_snr_loss_weight=False``), offset noise of strength 0.15 (one
  extra normal per patch and channel, ``run_training.py``). Loss: the eps-MSE on the known entries only,
  unknown entries set to 0 in both output and target (``train_mask_unknown_ratings=True``), averaged
  over all entries of the patch; a user's loss is its row's part (the patch mean is the mean of its rows).
  The official ``run_training.py`` mixes in a pairwise ranking term with an adaptive weight; the
  notebook run (``execute.ipynb``) switches it off (``bayes_personalized_ranking_loss_weight=0``), as here.
* Denoiser: the Graph Diffusion Transformer (GDiT) with Row-Column Separable Attention (RCSA), as
  ``graph_transformer.py``: per block, (1) a feature encoder (self-attention over the patch's users,
  and over its items, RMSNorm, 1x1 feed-forward with hidden widths (2, 2) x sqrt(d_in d_out), SiLU);
  (2) three decoder steps on the rating map, each ``x + s2 * core(s0 * RMSNorm(x) + s1)`` with the 9
  scales from the timestep embedding: RCSA self-attention (row / column features = the mean of the
  map over columns / rows; the first block's a masked mean over known entries), RCSA cross-attention
  with the user and item features, and the same self-attention module again (the official forward
  calls ``self_attn_block`` twice and never its ``feed_forward_block``, which is therefore not built
  here). RCSA (``speed_hack=True``): each row attends, with its feature as the single query, over the
  items' features as keys and its own entries as values (and each column likewise over the users),
  with ``num_mem_kv`` learned memory key/values, ``heads`` x ``dim_head``, attention dropout; the two
  results are broadcast back over the patch, concatenated and reduced by a 1x1 layer.
  *Deviations*: the official first self-attention block fills the *known* entries with 0 before its
  masked mean (``x.masked_fill(mask, 0.)`` with the known mask), which looks like an inverted mask; the
  mean over known entries that the normalisation by the known count implies is used instead. The
  official forward never applies its ``initial_linear`` 1x1 conv (the 1-channel map broadcasts into the
  internal channels); here it lifts the map to ``channels`` channels.
* Conditioning features (``MovieLensFeatureEmbedder``): a user-id embedding (``user_id_dim``, official 64)
  plus embeddings of the dataset's user side codes listed in ``user_features`` (ML-100K: age, gender,
  occupation; sizes ``user_feature_dim`` each), and an item-id embedding (``item_id_dim``, official 64)
  plus a linear embedding of the item's genres (the item side data's categories, ``genre_dim``). The
  official runs set the side features to None (ids only); they are on by default here because the
  paper conditions on them (``user_features=[]`` and ``genre_dim=0`` give the official run).
* Inference (scores): the batch's users are tiled with every item into patches (users and items
  permuted and wrapped around as the official ``_subsample_graph``) and each patch is sampled from
  pure noise with the known training ratings inpainted. *Deviation*: the official scoring runs the full
  1000-step ancestral chain over the whole graph 10 times and averages; here one deterministic DDIM
  chain of ``sampling_steps`` steps (:class:`fedrec.models.diffusion.InpaintingDDIM`, known entries
  replaced in x0-space each step, x0 clipped to [-1, 1] as the official ``clip_denoised``), for cost.
  Scores are the predicted ratings on the rating scale (ranked; RMSE on held-out ratings beside).
  *Deviation*: no EMA of the weights (the shared trainers keep none).

Federation and privacy: a patch spans several users, so one user's loss depends on the other users'
ratings in its patch (``couples_users``): DP-SGD and cross-device training refuse it. In a silo a
patch only ever holds that node's own users (the node's batches), so silo training works; the user-id
embeddings are private (never leave the node). The user side codes are side data every process
loads with the dataset (as the item side data is); a deployment would keep each user's codes on
the user's node.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedrec.errors import ConfigError
from fedrec.models.base import Batch, DataShape, Recommender
from fedrec.models.denoiser import timestep_embedding
from fedrec.models.diffusion import GaussianDiffusion, InpaintingDDIM, gaussian_like


@dataclass
class EDGERecConfig:
    RATINGS = True  # learns from explicit ratings: fedrec.models.check_dataset_needs asks for dataset.ratings
    patch_users: int = 50  # users per patch (official subgraph_size)
    patch_items: int = 50  # items per patch (official subgraph_size)
    item_blocks: int = 4  # patches (independent item draws) per group of users in a batch
    n_blocks: int = 8  # GDiT blocks (official run_training.py)
    channels: int = 3  # internal channels of the rating map (official n_channels_internal)
    heads: int = 4  # attention heads
    dim_head: int = 32  # per-head width
    num_mem_kv: int = 3  # learned memory key/values per attention
    attn_dropout: float = 0.25  # attention dropout
    ff_hidden: list[float] = field(default_factory=lambda: [2.0, 2.0])  # feed-forward widths x sqrt(d_in d_out)
    time_dim: int = 16  # sinusoidal timestep embedding size
    user_id_dim: int = 64  # user-id embedding size (0: none)
    item_id_dim: int = 64  # item-id embedding size (0: none)
    user_features: list[str] = field(default_factory=lambda: ["age", "gender", "occupation"])  # user side codes
    user_feature_dim: int = 4  # embedding size of each user side code
    genre_dim: int = 8  # linear embedding size of the item genres (0: none)
    rating_min: float = 1.0  # rating scale bottom (maps to -1)
    rating_max: float = 5.0  # rating scale top (maps to +1)
    steps: int = 1000  # diffusion steps T
    noise_schedule: str = "cosine"  # official beta_schedule
    offset_noise: float = 0.15  # offset-noise strength
    sampling_steps: int = 10  # DDIM steps at inference
    sample_batch: int = 64  # patches per denoiser call at inference

    def __post_init__(self) -> None:
        for key in ("patch_users", "patch_items", "item_blocks", "n_blocks", "channels", "heads", "dim_head",
                    "time_dim", "sampling_steps", "sample_batch"):
            if int(getattr(self, key)) < 1:
                raise ConfigError(f"model.{key}: must be a positive integer, got {getattr(self, key)}")
        for key in ("num_mem_kv", "user_id_dim", "item_id_dim", "user_feature_dim", "genre_dim"):
            if int(getattr(self, key)) < 0:
                raise ConfigError(f"model.{key}: must be non-negative, got {getattr(self, key)}")
        if not 0.0 <= self.attn_dropout < 1.0:
            raise ConfigError(f"model.attn_dropout: must be in [0, 1), got {self.attn_dropout}")
        if self.rating_max <= self.rating_min:
            raise ConfigError(f"model.rating_max: must exceed model.rating_min ({self.rating_min}), got {self.rating_max}")
        if not 1 <= self.sampling_steps <= self.steps:
            raise ConfigError(f"model.sampling_steps: must be in 1..{self.steps} (model.steps), got {self.sampling_steps}")
        if self.offset_noise < 0:
            raise ConfigError(f"model.offset_noise: must be non-negative, got {self.offset_noise}")


# --------------------------------------------------------------------------- layers


def rms_norm(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """RMSNorm over the last (channel) dimension: normalize(x) * g * sqrt(C) (official RMSNorm)."""
    return F.normalize(x, dim=-1) * g * math.sqrt(x.shape[-1])


def feed_forward(d_in: int, d_out: int, hidden: list[float]) -> nn.Sequential:
    """Official ``build_feed_forward``: widths int(sqrt(d_in d_out) * h), SiLU between layers."""
    avg = math.sqrt(d_in * d_out)
    widths = [d_in, *[int(avg * h) for h in hidden], d_out]
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.SiLU()]
    return nn.Sequential(*layers[:-1])


class Attention(nn.Module):
    """Official ``AttentionBase``: projections without bias, ``num_mem_kv`` memory key/values, softmax
    attention scaled by dim_head^-1/2 with dropout, an output projection with bias."""

    def __init__(self, d_q: int, d_k: int, d_v: int, heads: int, dim_head: int, num_mem_kv: int, dropout: float):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        hidden = heads * dim_head
        self.to_q = nn.Linear(d_q, hidden, bias=False)
        self.to_k = nn.Linear(d_k, hidden, bias=False)
        self.to_v = nn.Linear(d_v, hidden, bias=False)
        self.to_out = nn.Linear(hidden, d_v)
        self.mem_kv = nn.Parameter(torch.randn(2, heads, num_mem_kv, dim_head))
        self.drop = nn.Dropout(dropout)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(*x.shape[:-1], self.heads, self.dim_head)

    def self_attend(self, x: torch.Tensor) -> torch.Tensor:
        """Self-attention over the sequence axis of x (P, L, d) (the feature encoders)."""
        scale = self.dim_head ** -0.5
        q, k, v = (self.split(f(x)) for f in (self.to_q, self.to_k, self.to_v))  # (P, L, H, D)
        mem_k, mem_v = self.mem_kv[0], self.mem_kv[1]
        sim = torch.cat([torch.einsum("pqhd,hmd->phqm", q, mem_k), torch.einsum("pqhd,pkhd->phqk", q, k)], -1)
        attn = self.drop((sim * scale).softmax(dim=-1))
        M = mem_k.shape[1]
        out = torch.einsum("phqk,pkhd->pqhd", attn[..., M:], v) + torch.einsum("phqm,hmd->pqhd", attn[..., :M], mem_v)
        return self.to_out(out.reshape(*out.shape[:-2], -1))


def _separable(att: Attention, q_ft: torch.Tensor, k_ft: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """One side of RCSA: every row r of x (P, R, C, c) attends, with its feature q_ft[r] (P, R, f_q) as the
    single query, over the columns' features k_ft (P, C, f_k) as keys and its own entries x[r, :] as
    values (plus the memory key/values). Returns (P, R, c).

    The value projection has no bias, so sum_j a_j W_v x_j = W_v (sum_j a_j x_j): the attention weights
    average the raw c-channel entries first and the projection follows, the same numbers as projecting
    every entry to heads x dim_head first, with c instead of heads x dim_head values per entry."""
    H, D = att.heads, att.dim_head
    scale = D ** -0.5
    q = att.split(att.to_q(q_ft))  # (P, R, H, D)
    k = att.split(att.to_k(k_ft))  # (P, C, H, D)
    mem_k, mem_v = att.mem_kv[0], att.mem_kv[1]  # (H, M, D)
    sim = torch.einsum("prhd,pchd->phrc", q, k) * scale
    sim_mem = torch.einsum("prhd,hmd->phrm", q, mem_k) * scale
    attn = att.drop(torch.cat([sim_mem, sim], dim=-1).softmax(dim=-1))
    M = mem_k.shape[1]
    pooled = torch.einsum("phrc,prcx->prhx", attn[..., M:], x)  # (P, R, H, c): weights on the raw entries
    w_v = att.to_v.weight.reshape(H, D, -1)  # (H, D, c)
    out = torch.einsum("prhx,hdx->prhd", pooled, w_v) + torch.einsum("phrm,hmd->prhd", attn[..., :M], mem_v)
    return att.to_out(out.reshape(*out.shape[:-2], H * D))


def rcsa(row_attn: Attention, col_attn: Attention, reduce: nn.Linear, x: torch.Tensor,
         row_ft: torch.Tensor, col_ft: torch.Tensor) -> torch.Tensor:
    """Official ``_rcsa_forward`` on x (P, n, m, c), row features (P, n, f_r), column features (P, m, f_c).

    Row i attends with its feature as the single query over the columns' features (keys) and its own
    entries x[i, :] (values); column j likewise over the rows. Both are broadcast back and reduced."""
    rows = _separable(row_attn, row_ft, col_ft, x)  # (P, n, c)
    cols = _separable(col_attn, col_ft, row_ft, x.transpose(1, 2))  # (P, m, c)
    n, m = x.shape[1], x.shape[2]
    merged = torch.cat([rows.unsqueeze(2).expand(-1, -1, m, -1), cols.unsqueeze(1).expand(-1, n, -1, -1)], dim=-1)
    return reduce(merged)


class FeatureEncoder(nn.Module):
    """Official ``FeatureEncoderBlock``: self-attention, RMSNorm, feed-forward, RMSNorm (residuals)."""

    def __init__(self, dim: int, cfg: EDGERecConfig):
        super().__init__()
        self.attn = Attention(dim, dim, dim, cfg.heads, cfg.dim_head, cfg.num_mem_kv, cfg.attn_dropout)
        self.g1, self.g2 = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.ones(dim))
        self.ff = feed_forward(dim, dim, list(cfg.ff_hidden))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        f = rms_norm(self.attn.self_attend(f) + f, self.g1)
        return rms_norm(self.ff(f) + f, self.g2)


class GDiTBlock(nn.Module):
    def __init__(self, d_user: int, d_item: int, cfg: EDGERecConfig):
        super().__init__()
        c, a = cfg.channels, (cfg.heads, cfg.dim_head, cfg.num_mem_kv, cfg.attn_dropout)
        self.user_enc, self.item_enc = FeatureEncoder(d_user, cfg), FeatureEncoder(d_item, cfg)
        self.time = nn.Linear(4 * c, 9 * c)
        self.self_row, self.self_col = Attention(c, c, c, *a), Attention(c, c, c, *a)  # share_weights=False
        self.self_reduce = nn.Linear(2 * c, c, bias=False)
        self.cross_row, self.cross_col = Attention(d_user, d_item, c, *a), Attention(d_item, d_user, c, *a)
        self.cross_reduce = nn.Linear(2 * c, c, bias=False)
        self.g_self, self.g_cross = nn.Parameter(torch.ones(c)), nn.Parameter(torch.ones(c))

    def self_attention(self, x: torch.Tensor, known: torch.Tensor | None) -> torch.Tensor:
        if known is None:
            row_ft, col_ft = x.mean(2), x.mean(1)
        else:  # masked means over the known entries (first block)
            k = known.unsqueeze(-1).to(x.dtype)
            xk = x * k
            row_ft = xk.sum(2) / (k.sum(2) + 1e-7)
            col_ft = xk.sum(1) / (k.sum(1) + 1e-7)
        return rcsa(self.self_row, self.self_col, self.self_reduce, x, row_ft, col_ft)

    def forward(self, x, users, items, temb, known):
        users, items = self.user_enc(users), self.item_enc(items)
        s = [v[:, None, None, :] for v in self.time(F.silu(temb)).chunk(9, dim=-1)]
        x = x + s[2] * self.self_attention(s[0] * rms_norm(x, self.g_self) + s[1], known)
        h = s[3] * rms_norm(x, self.g_cross) + s[4]
        x = x + s[5] * rcsa(self.cross_row, self.cross_col, self.cross_reduce, h, users, items)
        # the official forward calls the self-attention block (and its norm) a second time here
        x = x + s[8] * self.self_attention(s[6] * rms_norm(x, self.g_self) + s[7], None)
        return x, users, items


# --------------------------------------------------------------------------- model


class EDGERec(Recommender):
    name = "edgerec"
    input_values = "rating"
    couples_users = True
    coupling = "denoises rating-matrix patches that span several users"

    def __init__(self, cfg: EDGERecConfig, shape: DataShape):
        super().__init__()
        self.cfg = cfg
        self.n_items = shape.n_items
        c = cfg.channels
        missing = [f for f in cfg.user_features if f not in shape.user_features]
        if missing:
            raise ConfigError(f"model.user_features: the dataset has no user feature {missing[0]!r} "
                              f"(it has: {sorted(shape.user_features) or 'none'})")
        # user side codes, -1 (missing) -> 0; a buffer: side data, never trained or aggregated
        for f in cfg.user_features:
            self.register_buffer(f"code_{f}", torch.as_tensor(shape.user_features[f] + 1, dtype=torch.long),
                                 persistent=False)
        self.user_codes = nn.ModuleDict({f: nn.Embedding(int(shape.user_features[f].max()) + 2, cfg.user_feature_dim)
                                         for f in cfg.user_features}) if cfg.user_feature_dim else nn.ModuleDict()
        self.user_id = nn.Embedding(shape.n_users, cfg.user_id_dim) if cfg.user_id_dim else None
        self.item_id = nn.Embedding(shape.n_items, cfg.item_id_dim) if cfg.item_id_dim else None
        cats = shape.item_side.categories
        genre = None if cats is None or not cfg.genre_dim else cats.matrix.toarray().astype(np.float32)
        self.register_buffer("genre", torch.as_tensor(genre if genre is not None else np.zeros((shape.n_items, 0),
                                                                                              np.float32)),
                             persistent=False)
        self.genre_embed = nn.Linear(self.genre.shape[1], cfg.genre_dim, bias=False) if genre is not None else None
        d_user = cfg.user_id_dim + len(self.user_codes) * cfg.user_feature_dim
        d_item = cfg.item_id_dim + (cfg.genre_dim if genre is not None else 0)
        if d_user == 0 or d_item == 0:
            raise ConfigError("model.user_id_dim/item_id_dim: users and items each need at least one feature "
                              "(an id embedding, user_features or genre_dim)")
        self.time_mlp = nn.Sequential(nn.Linear(cfg.time_dim, 4), nn.SiLU(), nn.Linear(4, 4 * c))
        self.initial = nn.Linear(1, c)
        self.blocks = nn.ModuleList(GDiTBlock(d_user, d_item, cfg) for _ in range(cfg.n_blocks))
        self.final = nn.Linear(c, 1)
        self.diffusion = GaussianDiffusion(cfg.steps, cfg.noise_schedule, noise_scale=1.0, mean_type="eps",
                                           reweight=False, importance_sampling=False)

    def private_parameter_names(self) -> set[str]:
        return {"user_id.weight"} if self.user_id is not None else set()

    # ----------------------------------------------------------------- features and denoiser
    def features(self, users: torch.Tensor, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(P, n, d_user) and (P, m, d_item) conditioning features of a patch's global user / item ids."""
        u = [self.user_id(users)] if self.user_id is not None else []
        u += [emb(getattr(self, f"code_{f}")[users]) for f, emb in self.user_codes.items()]
        i = [self.item_id(items)] if self.item_id is not None else []
        if self.genre_embed is not None:
            i.append(self.genre_embed(self.genre[items]))
        return torch.cat(u, dim=-1), torch.cat(i, dim=-1)

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, users: torch.Tensor, items: torch.Tensor,
                known: torch.Tensor) -> torch.Tensor:
        """Predicted noise of patches x_t (P, n, m) at steps t (P,)."""
        uf, itf = self.features(users, items)
        temb = self.time_mlp(timestep_embedding(t, self.cfg.time_dim).to(x_t.dtype))
        x = self.initial(x_t.unsqueeze(-1))
        k = known
        for block in self.blocks:
            x, uf, itf = block(x, uf, itf, temb, k)
            k = None  # the mask enters the first block only (official)
        return self.final(x)[..., 0].float()

    # ----------------------------------------------------------------- rating scale
    def to_unit(self, r: torch.Tensor) -> torch.Tensor:
        mid, half = (self.cfg.rating_max + self.cfg.rating_min) / 2, (self.cfg.rating_max - self.cfg.rating_min) / 2
        return torch.where(r > 0, (r - mid) / half, torch.zeros_like(r))

    def to_rating(self, x: torch.Tensor) -> torch.Tensor:
        mid, half = (self.cfg.rating_max + self.cfg.rating_min) / 2, (self.cfg.rating_max - self.cfg.rating_min) / 2
        return x * half + mid

    # ----------------------------------------------------------------- training
    def training_patches(self, n_users: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(row positions (P, n) into the batch, validity (P, n), item ids (P, m)) of a batch's patches."""
        c = self.cfg
        n = min(c.patch_users, n_users)
        groups = -(-n_users // n)
        pos = torch.arange(groups * n, device=device)
        valid = pos < n_users
        rows = (pos % n_users).reshape(groups, n).repeat_interleave(c.item_blocks, dim=0)
        valid = valid.reshape(groups, n).repeat_interleave(c.item_blocks, dim=0)
        m = min(c.patch_items, self.n_items)
        items = torch.rand(rows.shape[0], self.n_items, device=device).argsort(dim=1)[:, :m]
        return rows, valid, items

    def patch_loss(self, x: torch.Tensor, users: torch.Tensor, rows: torch.Tensor, items: torch.Tensor,
                   t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Per-(patch, row) masked eps-MSE (P, n): the mean over the row's m entries of known * (eps_hat - eps)^2."""
        r = x[rows.unsqueeze(-1), items.unsqueeze(1)]  # (P, n, m) ratings, 0 unknown
        known = r > 0
        x0 = self.to_unit(r)
        x_t = self.diffusion.q_sample(x0, t, noise)
        out = self.denoise(x_t, t, users[rows], items, known)
        return torch.where(known, (out - noise) ** 2, torch.zeros_like(out)).mean(-1)

    def loss(self, batch: Batch) -> torch.Tensor:
        x, c = batch.x, self.cfg
        rows, valid, items = self.training_patches(x.shape[0], x.device)
        p, n, m = rows.shape[0], rows.shape[1], items.shape[1]
        t = torch.randint(0, c.steps, (p,), device=x.device)
        noise = gaussian_like(torch.empty(p, n, m, device=x.device), None)
        noise = noise + c.offset_noise * torch.randn(p, 1, 1, device=x.device)
        per_row = self.patch_loss(x, batch.users, rows, items, t, noise)
        w = valid.to(per_row.dtype)
        total = torch.zeros(x.shape[0], device=x.device).index_add(0, rows.reshape(-1), (per_row * w).reshape(-1))
        count = torch.zeros(x.shape[0], device=x.device).index_add(0, rows.reshape(-1), w.reshape(-1))
        return total / count.clamp(min=1.0)

    # ----------------------------------------------------------------- inference
    def inference_patches(self, n_users: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Every (user, item) of the batch in (P, n) x (P, m) tiles, permuted and wrapped (official tiling)."""
        def blocks(size: int, block: int) -> torch.Tensor:
            block = min(block, size)
            k = -(-size // block)
            perm = torch.randperm(size, device=device)
            return torch.cat([perm, perm[: k * block - size]]).reshape(k, block)

        ub, ib = blocks(n_users, self.cfg.patch_users), blocks(self.n_items, self.cfg.patch_items)
        return ub.repeat_interleave(len(ib), dim=0), ib.repeat(len(ub), 1)

    def scores(self, batch: Batch) -> torch.Tensor:
        """Predicted ratings: each tile sampled from noise by DDIM with the known training ratings inpainted."""
        x, c = batch.x, self.cfg
        rows, items = self.inference_patches(x.shape[0], x.device)
        r = x[rows.unsqueeze(-1), items.unsqueeze(1)]
        known = r > 0
        users = batch.users[rows]
        out = torch.empty_like(r)
        for s in range(0, rows.shape[0], c.sample_batch):
            sl = slice(s, s + c.sample_batch)
            k, u, it = known[sl], users[sl], items[sl]
            sampler = InpaintingDDIM(self.to_unit(r[sl]), k, steps=c.sampling_steps, clip=(-1.0, 1.0))
            x_T = gaussian_like(r[sl], None)
            out[sl] = sampler.sample(self.diffusion, lambda xt, t: self.denoise(xt, t, u, it, k), x_T)
        pred = torch.zeros_like(x)
        pred[rows.unsqueeze(-1), items.unsqueeze(1)] = self.to_rating(out)
        return pred


__all__ = ["EDGERec", "EDGERecConfig", "Attention", "rcsa"]
