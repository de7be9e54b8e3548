"""CFG-DiffRec: DiffRec with classifier-free guidance (Buchanan, Gauch and Mai, "Incorporating
Classifier-Free Guidance in Diffusion Model-Based Recommendation", arXiv 2409.10494, 2024; survey 3.1).

The paper trains one DiffRec-style network as both a conditional and an unconditional denoiser (the
condition replaced by a null one with a fixed probability, "p_uncond") and samples with classifier-free
guidance (Ho & Salimans 2021). No official code was found (searched: GitHub, the paper pages), and only
the paper's abstract and summaries were readable here, not its method section, so the conditioning is
this module's choice, stated here:

* Condition c: the user's *own* training history, item-dropped: c = x_0 * m with m_i ~ Bernoulli(1 -
  ``cond_item_dropout``) per item in training, the full history at inference. Conditioning on the
  complete x_0 would let the conditional denoiser copy its target (a zero-loss identity that
  recommends nothing new), so in training it sees a random part of the history and must reconstruct
  all of it -- the same item-dropout idea as DiffRec's input dropout (default 0.5 as DiffRec's).
* Null condition: the empty history (zeros). With probability ``cond_drop_prob`` an example trains
  unconditionally (the shared core's ``training_loss(cond_drop_prob=...)``; Ho & Salimans' p_uncond,
  0.1 by default, their best range 0.1-0.2).
* Denoiser: DiffRec's MLP (``denoiser.py``) reading [x_t, c] (2 * n_items inputs), predicting x_0.
* Inference: DiffRec's (``diffusion.reverse``: from the history, all T posterior-mean steps) with
  :class:`fedrec.models.diffusion.ClassifierFreeGuidance`: out = (1 + w) f(x_t, t, c) - w f(x_t, t, 0),
  w = ``guidance_weight`` (w = 0: the conditional model alone).

Everything else (schedule, SNR reweighting, importance-sampled timesteps, defaults) is DiffRec's
official ML-1M setting (``diffrec.py``). Cross-device users draw t, the noise, the input-dropout mask,
the condition's item mask and the unconditional coin explicitly (``draw_randomness``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fedrec.errors import ConfigError
from fedrec.models.base import Batch, DataShape, Recommender
from fedrec.models.denoiser import DenoiserMLP
from fedrec.models.diffrec import DiffRecConfig
from fedrec.models.diffusion import ClassifierFreeGuidance


@dataclass
class CFGDiffRecConfig(DiffRecConfig):
    cond_drop_prob: float = 0.1  # p_uncond: share of training examples with the null condition
    cond_item_dropout: float = 0.5  # share of history items hidden from the condition in training
    guidance_weight: float = 1.0  # w of (1 + w) f(c) - w f(null) at inference

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.cond_drop_prob <= 1.0:
            raise ConfigError(f"model.cond_drop_prob: must be in [0, 1], got {self.cond_drop_prob}")
        if not 0.0 <= self.cond_item_dropout < 1.0:
            raise ConfigError(f"model.cond_item_dropout: must be in [0, 1), got {self.cond_item_dropout}")
        if self.guidance_weight < 0:
            raise ConfigError(f"model.guidance_weight: must be >= 0, got {self.guidance_weight}")


class HistoryConditionedDenoiser(nn.Module):
    """DiffRec's MLP on the concatenation [x_t, c]: ``forward(x_t, t, cond, keep=None)``."""

    def __init__(self, cfg: CFGDiffRecConfig, n_items: int):
        super().__init__()
        out_dims = list(cfg.dims) + [n_items]
        in_dims = [2 * n_items] + out_dims[::-1][1:]
        self.mlp = DenoiserMLP(in_dims, out_dims, cfg.emb_size, cfg.norm, cfg.dropout)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        return self.mlp(torch.cat([x, cond.to(x.dtype)], dim=-1), t, keep)


class CFGDiffRec(Recommender):
    name = "cfgdiffrec"

    def __init__(self, cfg: CFGDiffRecConfig, shape: DataShape):
        super().__init__()
        self.cfg = cfg
        self.n_items = shape.n_items
        self.denoiser = HistoryConditionedDenoiser(cfg, shape.n_items)
        self.diffusion = cfg.build()

    def loss(self, batch: Batch) -> torch.Tensor:
        c, x, r = self.cfg, batch.x, batch.rand
        null = torch.zeros((), dtype=x.dtype, device=x.device)
        if r is None:
            item_keep = (torch.rand(x.shape, device=x.device) >= c.cond_item_dropout).to(x.dtype)
            return self.diffusion.training_loss(self.denoiser, x, cond=x * item_keep, null_cond=null,
                                                cond_drop_prob=c.cond_drop_prob)["loss"]
        return self.diffusion.training_loss(lambda xt, t, cond: self.denoiser(xt, t, cond, r["keep"]), x,
                                            t=r["t"], noise=r["noise"], cond=x * r["cond_keep"], null_cond=null,
                                            drop_mask=r["uncond"])["loss"]

    def draw_randomness(self, batch: Batch, rnd) -> dict[str, torch.Tensor]:
        # Timesteps are uniform here, as DiffRec's: a single user's few steps cannot feed an importance history.
        n = batch.x.shape[1]
        return {"t": rnd.randint(0, 1, self.diffusion.steps)[:, 0], "noise": rnd.normal(1, n),
                "keep": rnd.keep_mask(2, 2 * n, self.cfg.dropout),
                "cond_keep": (rnd.uniform(3, n) >= self.cfg.cond_item_dropout).to(batch.x.dtype),
                "uncond": rnd.uniform(4, 1)[:, 0] < self.cfg.cond_drop_prob}

    def scores(self, batch: Batch) -> torch.Tensor:
        c, x = self.cfg, batch.x
        guidance = ClassifierFreeGuidance(c.guidance_weight, torch.zeros((), dtype=x.dtype, device=x.device))
        return self.diffusion.reverse(self.denoiser, x, c.sampling_steps, c.inference_steps, c.sampling_noise,
                                      cond=x, guidance=guidance)
