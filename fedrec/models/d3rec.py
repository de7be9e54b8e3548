"""D3Rec (Han, Kweon, Kim and Yu, "Controlling Diversity at Inference: Guiding Diffusion Recommender
Models with Targeted Category Preferences", KDD 2025, arXiv 2411.11240; the survey's "D3Rec (Han et
al., 2024)", category-controlled diversity). Official code: github.com/c0natus/D3Rec (``Real-world/``:
``models.py``, ``model_utils.py``, ``utils_train.py``, ``utils.py``), read and followed here.

Algorithm as implemented (the official one):

* Category data: F (n_categories x n_items), F[c, i] = 1 / |categories of i| for each category of item
  i (official ``make_cate_multihot_matrix_F``), from the item side data (``fedrec/data/side.py``:
  ML-100K's genres). A user's category preference p_u = normalised x_u F^T (each interacted item adds
  1/|its categories| to each of its categories; official ``make_user_cate_pref``), from the training row.
* Forward process: DiffRec's Gaussian diffusion of the interaction vector (the shared core
  :class:`fedrec.models.diffusion.GaussianDiffusion`, ``linear-var`` schedule, first beta 1e-5),
  importance-sampled timesteps.
* Denoiser (official ``MyMLP``): input dropout on [x_t, time embedding]; an encoder of two tanh
  branches per layer, a category-independent one and a category-dependent one, the projected
  preference embedding e_p = p_u E (E: a category embedding table) concatenated to the
  category-dependent branch at every layer; a tanh decoder that re-concatenates the projected e_p
  after every hidden layer (the projections are shared between encoder and decoder).
* Condition and classifier-free guidance: the condition is p_u; training replaces it by the null
  condition (p = 0, so e_p = 0, the official ``emb_pref[probs_mask == 1] = 0``) with probability
  ``drop_div`` (``fedrec.models.diffusion`` ``drop_condition``); inference uses
  :class:`~fedrec.models.diffusion.ClassifierFreeGuidance` with weight ``guide_w``,
  out = (1 + w) f(x_t, t, p) - w f(x_t, t, 0) (official ``sample_new_interaction``).
* Loss per user (official ``calculate_loss``): L = L_recon + L_cate + lambda (L_ortho + L_emb) with
  - L_recon: the squared error of x0_hat, each item weighted by a category balance weight
    (positives: the min-max-scaled (1 - p_u) F in [w_min, w_max], negatives: p_u F scaled likewise),
    averaged over items, times the SNR weight 0.5 (SNR(t-1) - SNR(t)) (1 at t = 0), divided by the
    importance-sampling probability p(t) T;
  - L_cate: the decoder applied to the category-dependent half of the latent alone ([0, h]) must give
    back p_u: MSE(softmax(x_hat_prob F^T), p_u), 0 for users whose condition was dropped;
  - L_ortho: |cos(z, h)| of the two latent halves;
  - L_emb: the decoder applied to each category's embedding alone ([0, E_c]) must give F_c: MSE over
    the (n_categories, n_items) table (a term independent of the user).
* Inference (official ``sample_new_interaction``): from the user's history (no added noise), the
  posterior mean through all T steps **twice** (the official ``reverse_t = range(T)[::-1] * 2``: the
  survey's "denoises for more iterations than the forward process"), guided as above, conditioned on
  the *target* category proportions: p_u sharpened or flattened by the temperature ``div_temperature``
  (official ``adjust_div``: softmax(log(p + 1e-7) / tau); tau > 1 flattens p, raising diversity, tau < 1
  concentrates it; tau = 1 the user's own proportions). This is the control at inference the paper is about.

Defaults: the official ML-1M run (``Real-world/train.sh``): dims [600, 200], time embedding 10, dropout
0.3, T = 5, noise_scale 1, beta 0.005 .. 0.05, lambda 1, w in [1, 1.6], drop_div 0.3, guide_w -0.5,
AdamW lr 5e-5, weight decay 1e-3, batch 400. Report coverage@K / entropy@K / ILD with
``eval.fairness=true`` (``fedrec/eval/fairness.py``: D3Rec's "Coverage" and "Entropy").

Deviations, each with its reason:
* L_ortho: the official code *sums* |cos| over the batch where every other term is a batch mean, so
  its weight grows with the batch size. fedrec's loss is per user (DP-SGD clips it, cross-device
  vmaps it), so the per-user term is multiplied by ``ortho_scale`` = 400, the official batch size:
  the central mean over a full batch of 400 equals the official loss.
* The balance weights divide by max - min of the user's p_u F; where that is 0 (a user whose items
  have no category) the official code gives NaN, fedrec the weight w_min.
* Coefficients in float64 (the shared core) where the official code forms alpha_bar in float32.
* Cross-device users draw timesteps uniformly (explicit draws; importance sampling needs a history).
* DP-SGD is refused: L_emb decodes the category table, a batch of categories rather than of users,
  which Opacus' per-sample gradients cannot attribute to a user.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedrec.errors import ConfigError
from fedrec.models.base import Batch, DataShape, Recommender
from fedrec.models.diffrec import DiffusionConfig
from fedrec.models.diffusion import ClassifierFreeGuidance, DDPMSampler, drop_condition


@dataclass
class D3RecConfig(DiffusionConfig):
    dims: list[int] = field(default_factory=lambda: [600, 200])  # encoder dims (official --dims)
    dim_step: int = 10  # timestep embedding size
    dropout: float = 0.3  # input dropout (official ML-1M: 0.3)
    steps: int = 5
    noise_scale: float = 1.0
    noise_min: float = 0.005  # official --beta_start
    noise_max: float = 0.05  # official --beta_end
    beta_fixed: bool = True
    lamda: float = 1.0  # weight of L_ortho + L_emb
    w_min: float = 1.0  # balance weight range
    w_max: float = 1.6
    drop_div: float = 0.3  # condition dropout probability (classifier-free training)
    guide_w: float = -0.5  # classifier-free guidance weight at inference
    div_temperature: float = 1.0  # temperature of the target category proportions at inference
    reverse_passes: int = 2  # passes of the T-step reverse chain (official: 2)
    ortho_scale: float = 400.0  # per-user weight of L_ortho (official: summed over a batch of 400)
    snr: bool = True  # SNR loss weights (official --snr)

    DPSGD_REFUSAL: ClassVar[str] = ("decodes the category table in its category-matching loss (a batch of "
                                    "categories, not of users), which Opacus' per-user gradients cannot attribute to a user")

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.dims) < 2 or any(int(d) < 4 or int(d) % 4 for d in self.dims):
            # the official layer sizes (d/2 and d/4 branches re-joined to d) only fit for multiples of 4
            raise ConfigError(f"model.dims: expected at least two encoder dims, multiples of 4, got {list(self.dims)}")
        if self.dim_step < 4 or self.dim_step % 2:
            raise ConfigError(f"model.dim_step: must be an even number >= 4, got {self.dim_step}")
        if not 0.0 <= self.drop_div <= 1.0:
            raise ConfigError(f"model.drop_div: must be in [0, 1], got {self.drop_div}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout: must be in [0, 1), got {self.dropout}")
        if not self.div_temperature > 0:
            raise ConfigError(f"model.div_temperature: must be > 0, got {self.div_temperature}")
        if self.reverse_passes < 1:
            raise ConfigError(f"model.reverse_passes: must be >= 1, got {self.reverse_passes}")
        if self.w_min > self.w_max:
            raise ConfigError(f"model.w_min: {self.w_min} must not exceed model.w_max {self.w_max}")


class StepEmbedding(nn.Module):
    """Official ``PosEmb``: [sin(t w_k), cos(t w_k)], w_k = 1 / 10000^(k / (half - 1)), then a linear layer."""

    def __init__(self, dim: int):
        super().__init__()
        self.half = dim // 2
        self.linear = nn.Linear(dim, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        k = torch.arange(self.half, device=t.device, dtype=torch.float32)
        w = 1.0 / (10000.0 ** (k / (self.half - 1)))
        arg = t.float().unsqueeze(-1) * w
        return self.linear(torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1))


class D3RecDenoiser(nn.Module):
    """The official ``MyMLP`` (encoder with a category-independent and a category-dependent branch,
    decoder re-injecting the preference embedding); layer sizes as official."""

    def __init__(self, n_items: int, n_cate: int, dims: list[int], dim_step: int, dropout: float):
        super().__init__()
        dims = [int(d) for d in dims]
        self.dropout = dropout
        self.step = StepEmbedding(dim_step)
        self.cond_dim = dims[-1] // 4
        self.latent_half = dims[-1] // 2
        self.half_dims = [d // 2 for d in dims]
        self.proj = nn.ModuleList(nn.Linear(self.cond_dim, d // 2 - d // 4) for d in dims[:-1])
        in_dims = [n_items + dim_step] + [d // 2 for d in dims[:-1]]
        self.enc_ind = nn.ModuleList(nn.Linear(i, d // 2) for i, d in zip(in_dims, dims))
        self.enc_cate = nn.ModuleList(nn.Linear(i, d // 2 - d // 4) for i, d in zip(in_dims, dims))
        rev = dims[::-1]
        outs = [d - d // 4 for d in rev[1:]] + [n_items]
        self.dec = nn.ModuleList(nn.Linear(i, o) for i, o in zip(rev, outs))
        self.cate_embedding = nn.Parameter(torch.empty(n_cate, self.cond_dim))
        for m in self.modules():  # official init_weights
            if isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                nn.init.normal_(m.bias, 0.0, 0.001)
        nn.init.xavier_normal_(self.cate_embedding)

    def encode(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        z, c = h, h
        for i in range(len(self.enc_ind)):
            z, c = torch.tanh(self.enc_ind[i](z)), torch.tanh(self.enc_cate[i](c))
            pe = self.proj[i](e) if c.shape[-1] != self.cond_dim else e
            latent = torch.cat([z, c, pe], dim=-1)
            z, c = latent[..., :self.half_dims[i]], latent[..., self.half_dims[i]:]
        return torch.cat([z, c], dim=-1)

    def decode(self, latent: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        proj = list(self.proj)[::-1]
        for i in range(len(self.dec) - 1):
            latent = torch.cat([torch.tanh(self.dec[i](latent)), proj[i](e)], dim=-1)
        return self.dec[-1](latent)

    def inputs(self, x_t, t, keep=None):
        h = torch.cat([x_t, self.step(t)], dim=-1)
        return h * keep if keep is not None else F.dropout(h, self.dropout, self.training)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x0_hat given the condition ``cond`` = category proportions (B, n_categories) (0: the null condition)."""
        e = cond @ self.cate_embedding
        return self.decode(self.encode(self.inputs(x_t, t), e), e)

    def training_outputs(self, x_t, t, cond, keep=None):
        """(x_hat_recon, x_hat_prob, x_hat_cate, |cos(z, h)| per user): the official training forward."""
        e = cond @ self.cate_embedding
        latent = self.encode(self.inputs(x_t, t, keep), e)
        recon = self.decode(latent, e)
        z, h = latent[..., :self.latent_half], latent[..., self.latent_half:]
        ortho = torch.abs((F.normalize(z, dim=-1) * F.normalize(h, dim=-1)).sum(-1))
        x_prob = self.decode(torch.cat([torch.zeros_like(h), h], dim=-1), e)
        emb = self.cate_embedding
        latent_cate = torch.cat([emb.new_zeros(emb.shape[0], 2 * self.latent_half - self.cond_dim), emb], dim=-1)
        x_cate = self.decode(latent_cate, emb)
        return recon, x_prob, x_cate, ortho


def category_matrix(shape: DataShape, who: str) -> np.ndarray:
    """F (n_categories, n_items), F[c, i] = 1 / |categories of i| (official ``matrix_F``)."""
    cats = shape.item_side.categories
    if cats is None:
        raise ConfigError(f"model.name={who}: the dataset has no item categories (item side data, e.g. ML-100K's "
                          "genres) to condition on")
    m = np.asarray(cats.matrix.toarray() > 0, dtype=np.float64)
    per_item = m.sum(1, keepdims=True)
    return (m / np.maximum(per_item, 1.0)).T.astype(np.float32)


def preference(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """p_u = normalised x_u F^T (0 for a user with no categorised item)."""
    counts = x @ f.T
    total = counts.sum(-1, keepdim=True)
    return torch.where(total > 0, counts / total.clamp(min=1e-12), torch.zeros_like(counts))


def temperature_adjusted(p: torch.Tensor, tau: float) -> torch.Tensor:
    """Official ``adjust_div``: softmax(log(p + 1e-7) / tau); the identity at tau = 1 (official skips it)."""
    if tau == 1.0:
        return p
    return torch.softmax(torch.log(p + 1e-7) / tau, dim=-1)


def balance_weights(p: torch.Tensor, f: torch.Tensor, w_min: float, w_max: float) -> torch.Tensor:
    """Official ``reweight_loss``: p F min-max scaled per user to [w_min, w_max]."""
    r = p @ f
    lo, hi = r.min(-1, keepdim=True).values, r.max(-1, keepdim=True).values
    return w_min + (w_max - w_min) * (r - lo) / (hi - lo).clamp(min=1e-12)


class D3Rec(Recommender):
    name = "d3rec"

    def __init__(self, cfg: D3RecConfig, shape: DataShape):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("F", torch.from_numpy(category_matrix(shape, self.name)), persistent=False)
        self.denoiser = D3RecDenoiser(shape.n_items, self.F.shape[0], cfg.dims, cfg.dim_step, cfg.dropout)
        self.diffusion = cfg.build()
        if self.diffusion.noise_scale == 0:
            raise ConfigError("model.noise_scale: D3Rec needs a noised forward process (> 0)")

    def _loss(self, x0, t, pt, noise, drop, keep, record: bool):
        c, d, f = self.cfg, self.diffusion, self.F
        p = preference(x0, f)
        cond = drop_condition(p, 0.0, drop)
        x_t = d.q_sample(x0, t, noise)
        recon, x_prob, x_cate, ortho = self.denoiser.training_outputs(x_t, t, cond, keep)
        balance = torch.where(x0 == 1, balance_weights(1 - p, f, c.w_min, c.w_max),
                              balance_weights(p, f, c.w_min, c.w_max))
        mse = ((recon - x0) ** 2 * balance).mean(-1)
        w = torch.where(t == 0, torch.ones_like(mse), 0.5 * d.loss_weight_x0[t]) if c.snr else torch.ones_like(mse)
        weighted = w * mse
        if record and self.training and d.importance_sampling:
            d.record_losses(t, weighted)
        cate = ((torch.softmax(x_prob @ f.T, -1) - p) ** 2).mean(-1)
        cate = torch.where(drop, torch.zeros_like(cate), cate)
        emb = ((x_cate - f) ** 2).mean()
        return weighted / pt + cate + c.lamda * (c.ortho_scale * ortho + emb)

    def loss(self, batch: Batch) -> torch.Tensor:
        x0, r, n = batch.x, batch.rand, batch.x.shape[0]
        if r is not None:
            return self._loss(x0, r["t"], torch.ones(n, device=x0.device), r["noise"], r["drop"] < self.cfg.drop_div,
                              r["keep"], record=False)
        t, pt = self.diffusion.sample_timesteps(n, x0.device)
        noise = torch.randn_like(x0)
        drop = torch.rand(n, device=x0.device) < self.cfg.drop_div
        return self._loss(x0, t, pt, noise, drop, None, record=True)

    def draw_randomness(self, batch: Batch, rnd) -> dict[str, torch.Tensor]:
        n = batch.x.shape[1]
        return {"t": rnd.randint(0, 1, self.diffusion.steps)[:, 0], "noise": rnd.normal(1, n),
                "keep": rnd.keep_mask(2, n + self.cfg.dim_step, self.cfg.dropout), "drop": rnd.uniform(3, 1)[:, 0]}

    def target_proportions(self, x: torch.Tensor) -> torch.Tensor:
        """The inference condition: the user's category proportions at temperature ``div_temperature``."""
        return temperature_adjusted(preference(x, self.F), self.cfg.div_temperature)

    def scores(self, batch: Batch) -> torch.Tensor:
        c = self.cfg
        cond = self.target_proportions(batch.x)
        guidance = ClassifierFreeGuidance(c.guide_w, torch.zeros_like(cond)) if c.guide_w != 0 else None
        x = batch.x
        for _ in range(c.reverse_passes):
            x = DDPMSampler(noise=False).sample(self.diffusion, self.denoiser, x, cond=cond, guidance=guidance)
        return x
