"""DifFaiRec (Jiang and Fan, "DifFaiRec: Generative Fair Recommender with Conditional Diffusion Model",
ICDM 2024, arXiv 2410.02791; survey section "Fairness").

No official code exists as far as fedrec could find (``find_repos``/``find_string`` "DifFaiRec", the
code, docs and pages corpora: only reading lists cite the paper), and the stored copies of the paper
hold its abstract and introduction only. What the sources say, and fedrec implements:

* the survey: "Given a rating vector, the diffusion model adds Gaussian noise in the forward process,
  and the reverse process incorporates user group vectors through cross-attention to improve
  fairness ... the resulting rating vector contains the rating predictions for unseen items";
* the abstract: a conditional diffusion model of the users' preference vectors and "a counterfactual
  module to reduce the model sensitivity to protected attributes"; its summaries: the counterfactual
  module "maps users to the other groups", the diffusion model is "conditioned on the counterfactual
  module", and "the two objectives of accuracy and fairness are compressed into one".

Algorithm as implemented:

* Forward process and loss: DiffRec's (the shared core :class:`fedrec.models.diffusion.GaussianDiffusion`,
  DiffRec's ML-1M defaults: ``linear-var`` schedule, x0 prediction, SNR reweighting, importance-sampled
  timesteps), on the user's binary interaction vector.
* Group vectors: each user group (``model.groups``: ``activity`` = the 20% most active users vs the
  rest, or a protected attribute of the user side data, ML-100K's ``gender`` / ``age`` / ``occupation``;
  :func:`fedrec.eval.fairness.user_groups`) owns ``group_tokens`` learned vectors; a null group (index
  n_groups) is the unconditional condition of classifier-free guidance.
* Denoiser: DiffRec's MLP ([x_t, timestep embedding] -> tanh layers -> bottleneck -> tanh layers ->
  items) with a cross-attention block at the bottleneck: the bottleneck h queries the condition's
  group vectors (``heads`` heads, scaled dot-product softmax over the tokens) and the attended values
  are added to h (residual), so the group enters the reverse process by cross-attention.
* Counterfactual module, one objective: every user u of group s is mapped to a counterfactual group
  s' != s (uniform among the other groups; the other group when there are two). The loss is the
  diffusion loss of reconstructing x_u under the factual condition and under the counterfactual one,
  with the same x_t: L = (1 - rho) L(x_u | s) + rho L(x_u | s'), rho = ``counterfactual_weight`` (0.5:
  both worlds count alike). A model that must give the same reconstruction whichever group it is told
  the user is in cannot make its recommendations depend on the protected attribute beyond what the
  interactions say: accuracy and fairness are one reconstruction objective, no separate fairness
  penalty to balance.
* Classifier-free training: the factual condition is replaced by the null group with probability
  ``cond_drop_prob`` (the core's ``drop_condition``). Both worlds go through ONE denoiser call, stacked
  as (B, 2, n_items) with the same x_t, timestep, noise and dropout mask; the loss weights are the
  core's DiffRec x0 SNR weights and its importance-sampling history.
* Inference: DiffRec's (from the history, all T steps, posterior mean), conditioned on the user's own
  group with :class:`~fedrec.models.diffusion.ClassifierFreeGuidance` weight ``guidance_weight``
  (0: the conditional model alone).

Deviations: the whole design above past the survey's and the abstract's sentences (cross-attention
layout, learned group vectors, the form of the counterfactual objective) is fedrec's reading, since
neither the paper's method section nor code was available; the paper's own figures are not compared.
DifFaiRec is refused in federations (``FEDERATION_REFUSAL``): the activity groups rank every user
against all others, and fedrec's node views do not share the user side data the groups come from.
Under DP-SGD it trains (each user's loss reads only its own row and its own group; the activity
threshold itself is a statistic of all users' counts that the accountant does not cover).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from fedrec.errors import ConfigError
from fedrec.models.base import Batch, DataShape, Recommender
from fedrec.models.denoiser import _init_linear, timestep_embedding
from fedrec.models.diffrec import DiffusionConfig
from fedrec.models.diffusion import ClassifierFreeGuidance, drop_condition


@dataclass
class DifFaiRecConfig(DiffusionConfig):
    dims: list[int] = field(default_factory=lambda: [200, 600])  # decoder-side hidden dims (DiffRec's --dims)
    emb_size: int = 10  # timestep embedding size
    dropout: float = 0.5  # input dropout
    beta_fixed: bool = True
    groups: str = "activity"  # activity | a categorical user feature (gender, age, occupation)
    group_top: float = 0.2  # share of most active users forming the active group (groups=activity)
    group_tokens: int = 4  # group vectors per group (the keys/values of the cross-attention)
    heads: int = 2  # attention heads
    counterfactual_weight: float = 0.5  # rho: weight of the counterfactual-group reconstruction
    cond_drop_prob: float = 0.1  # classifier-free training: the group replaced by the null group
    guidance_weight: float = 0.0  # classifier-free guidance weight at inference

    FEDERATION_REFUSAL: ClassVar[str] = ("conditions on user groups from the dataset's user side data (activity: a "
                                         "rank of every user against all others), which the federated node views "
                                         "do not share")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.counterfactual_weight <= 1.0:
            raise ConfigError(f"model.counterfactual_weight: must be in [0, 1], got {self.counterfactual_weight}")
        if not 0.0 <= self.cond_drop_prob <= 1.0:
            raise ConfigError(f"model.cond_drop_prob: must be in [0, 1], got {self.cond_drop_prob}")
        if self.group_tokens < 1:
            raise ConfigError(f"model.group_tokens: must be >= 1, got {self.group_tokens}")
        if self.mean_type != "x0":
            raise ConfigError(f"model.mean_type: DifFaiRec predicts x0 (DiffRec's ML-1M setting), got {self.mean_type!r}")
        if self.noise_scale <= 0:
            raise ConfigError("model.noise_scale: DifFaiRec needs a noised forward process (> 0)")
        if self.heads < 1 or int(self.dims[0]) % self.heads:
            raise ConfigError(f"model.heads: must divide the bottleneck width model.dims[0]={self.dims[0]}, got {self.heads}")


class GroupCrossAttention(nn.Module):
    """h + W_o softmax(Q K^T / sqrt(d_h)) V, Q from h (B, d), K and V from the group vectors (B, m, d)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.d_head = heads, dim // heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        for layer in (self.q, self.k, self.v, self.o):
            _init_linear(layer, 0.001)

    def forward(self, h: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """h (..., d), tokens (..., m, d), any leading dims (training stacks the factual and counterfactual worlds)."""
        lead, m = h.shape[:-1], tokens.shape[-2]
        q = self.q(h).reshape(*lead, self.heads, 1, self.d_head)
        flat = tokens.reshape(tokens.shape[0], -1, tokens.shape[-1])  # 3-d into the layers: Opacus' ghost norms
        k = self.k(flat).reshape(*lead, m, self.heads, self.d_head).transpose(-2, -3)
        v = self.v(flat).reshape(*lead, m, self.heads, self.d_head).transpose(-2, -3)
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.d_head), dim=-1)  # (..., heads, 1, m)
        return h + self.o((attn @ v).reshape(*lead, self.heads * self.d_head))


class GroupConditionedDenoiser(nn.Module):
    """DiffRec's MLP with group cross-attention at the bottleneck; ``cond`` (B,) group ids (n_groups: null)."""

    def __init__(self, n_items: int, dims: list[int], emb_size: int, dropout: float, n_groups: int,
                 tokens: int, heads: int):
        super().__init__()
        out_dims = [int(d) for d in dims] + [n_items]
        in_dims = out_dims[::-1]
        self.emb_size, self.tokens = emb_size, tokens
        self.emb_layer = nn.Linear(emb_size, emb_size)
        dims_in = [n_items + emb_size] + in_dims[1:]
        self.in_layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims_in[:-1], dims_in[1:]))
        self.out_layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(out_dims[:-1], out_dims[1:]))
        for layer in [*self.in_layers, *self.out_layers, self.emb_layer]:
            _init_linear(layer, 0.001)
        self.group_vectors = nn.Embedding((n_groups + 1) * tokens, out_dims[0])
        nn.init.normal_(self.group_vectors.weight, 0.0, 1.0 / math.sqrt(out_dims[0]))
        self.attention = GroupCrossAttention(out_dims[0], heads)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, keep: torch.Tensor | None = None):
        """x (B, n_items) or (B, W, n_items) (W conditions of one user: ``cond`` (B, W)); t (B,)."""
        emb = self.emb_layer(timestep_embedding(t, self.emb_size))
        if x.dim() == 3:
            emb = emb.unsqueeze(1).expand(-1, x.shape[1], -1)
        h = torch.cat([x * keep if keep is not None else self.drop(x), emb], dim=-1)
        for layer in self.in_layers:
            h = torch.tanh(layer(h))
        idx = cond.long().unsqueeze(-1) * self.tokens + torch.arange(self.tokens, device=cond.device)
        h = self.attention(h, self.group_vectors(idx))
        for i, layer in enumerate(self.out_layers):
            h = layer(h)
            if i != len(self.out_layers) - 1:
                h = torch.tanh(h)
        return h.float()


def counterfactual_groups(groups: torch.Tensor, n_groups: int, u: torch.Tensor) -> torch.Tensor:
    """A group != groups[b] for each b, uniform among the n_groups - 1 others from u[b] in [0, 1)."""
    shift = 1 + torch.clamp((u * (n_groups - 1)).long(), max=n_groups - 2)
    return (groups + shift) % n_groups


class DifFaiRec(Recommender):
    name = "diffairec"

    def __init__(self, cfg: DifFaiRecConfig, shape: DataShape):
        super().__init__()
        self.cfg = cfg
        if shape.user_groups_fn is None:
            raise ConfigError("model.groups: DifFaiRec needs the users' groups (build the model with fedrec.models.data_shape)")
        groups, names = shape.user_groups_fn(cfg.groups, cfg.group_top)
        if len(names) < 2:
            raise ConfigError(f"model.groups={cfg.groups!r}: needs at least two user groups, found {len(names)}")
        self.n_groups = len(names)
        self.group_names = list(names)
        # users outside every group (a missing attribute) are conditioned on the null group
        table = np.where(np.asarray(groups) >= 0, groups, self.n_groups).astype(np.int64)
        self.register_buffer("user_group", torch.from_numpy(table), persistent=False)
        self.denoiser = GroupConditionedDenoiser(shape.n_items, cfg.dims, cfg.emb_size, cfg.dropout, self.n_groups,
                                                 cfg.group_tokens, cfg.heads)
        self.diffusion = cfg.build()

    def _group(self, users: torch.Tensor) -> torch.Tensor:
        return self.user_group.to(users.device)[users.long()]

    def loss(self, batch: Batch) -> torch.Tensor:
        c, d, x0, r = self.cfg, self.diffusion, batch.x, batch.rand
        n = x0.shape[0]
        g = self._group(batch.users)
        null = torch.full_like(g, self.n_groups)
        if r is None:
            t, pt = d.sample_timesteps(n, x0.device)
            noise = torch.randn_like(x0)
            keep = None
            u = torch.rand(n, device=x0.device)
            drop = torch.rand(n, device=x0.device) < c.cond_drop_prob
        else:
            t, pt, noise, keep = r["t"], torch.ones(n, device=x0.device), r["noise"], r["keep"]
            u, drop = r["u"][:, 0], r["u"][:, 1] < c.cond_drop_prob
        g_cf = torch.where(g < self.n_groups, counterfactual_groups(g.clamp(max=self.n_groups - 1), self.n_groups, u),
                           null)  # a user in no group has no counterfactual: null in both worlds
        if keep is None and self.training:
            keep = self.denoiser.drop(torch.ones_like(x0))  # one dropout mask for both worlds

        # One denoiser call on both worlds, stacked (B, 2, n_items): the same x_t, the factual condition
        # (dropped to the null group for classifier-free training) and the counterfactual one. One call,
        # not two, so that DP-SGD's ghost clipping (no parameter reuse) sees each layer once per user.
        x_t = d.q_sample(x0, t, noise)
        cond = torch.stack([drop_condition(g, null, drop), g_cf], dim=1)
        mask = None if keep is None else keep.unsqueeze(1)
        out = self.denoiser(x_t.unsqueeze(1).expand(-1, 2, -1), t, cond, mask)
        mse = ((out - x0.unsqueeze(1)) ** 2).mean(-1)  # (B, 2)
        weight = d.loss_weight_x0[t] if d.reweight else torch.ones_like(pt)  # DiffRec's x0 SNR weights (the core's)
        loss = weight * ((1 - c.counterfactual_weight) * mse[:, 0] + c.counterfactual_weight * mse[:, 1])
        if r is None and self.training and d.importance_sampling:
            d.record_losses(t, loss)
        return loss / pt

    def draw_randomness(self, batch: Batch, rnd) -> dict[str, torch.Tensor]:
        n = batch.x.shape[1]
        return {"t": rnd.randint(0, 1, self.diffusion.steps)[:, 0], "noise": rnd.normal(1, n),
                "keep": rnd.keep_mask(2, n, self.cfg.dropout), "u": rnd.uniform(3, 2)}

    def scores(self, batch: Batch) -> torch.Tensor:
        c = self.cfg
        g = self._group(batch.users)
        guidance = (ClassifierFreeGuidance(c.guidance_weight, torch.full_like(g, self.n_groups))
                    if c.guidance_weight != 0 else None)
        return self.diffusion.reverse(self.denoiser, batch.x, c.sampling_steps, c.inference_steps, c.sampling_noise,
                                      cond=g, guidance=guidance)
