"""Mult-VAE (Liang et al., "Variational Autoencoders for Collaborative Filtering", WWW 2018).

Implements the official code (github.com/dawenl/vae_cf) as RecBole's ``MultVAE`` does: the
user's binary history is L2-normalised, dropped out (``dropout``, training only) and encoded by a
tanh MLP into the mean and log-variance of a Gaussian latent; training samples the latent with
the reparameterisation trick (inference uses the mean); a tanh MLP decodes it into item logits.
The per-user loss is the multinomial negative log-likelihood ``-sum_i x_i log softmax(logits)_i``
plus ``beta * KL(q(z|x) || N(0, I))``, with ``beta`` annealed linearly per training update,
``beta = min(anneal_cap, updates / total_anneal_steps)`` (the official schedule: the first update
has beta 0). The update counter is a registered buffer, so it is saved in checkpoints and is not a
parameter (never aggregated).

Layer sizes: encoder ``[n_items, *hidden_dims, 2*latent_dim]``, decoder
``[latent_dim, *reversed(hidden_dims), n_items]``; tanh between layers, none after the last.
Weights are initialised N(0, 2/(fan_in+fan_out)) and biases N(0, 0.001), as the official code.

No parameter is user-specific (the encoder is amortised), so nothing is private in a federation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from fedrec.errors import ConfigError
from fedrec.models.base import Batch, DataShape, Recommender


@dataclass
class MultVAEConfig:
    hidden_dims: list[int] = field(default_factory=lambda: [600])  # encoder hidden dims (decoder mirrors)
    latent_dim: int = 200  # dimension of the Gaussian latent z
    dropout: float = 0.5  # input dropout probability (training only)
    anneal_cap: float = 0.2  # maximum KL weight beta
    total_anneal_steps: int = 200000  # updates over which beta rises linearly from 0 (0: cap at once)

    def __post_init__(self) -> None:
        if any(int(d) < 1 for d in self.hidden_dims):
            raise ConfigError(f"model.hidden_dims: every dim must be >= 1, got {list(self.hidden_dims)}")
        if int(self.latent_dim) < 1:
            raise ConfigError(f"model.latent_dim: must be >= 1, got {self.latent_dim}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ConfigError(f"model.dropout: must be in [0, 1), got {self.dropout}")
        if float(self.anneal_cap) < 0:
            raise ConfigError(f"model.anneal_cap: must be >= 0, got {self.anneal_cap}")
        if int(self.total_anneal_steps) < 0:
            raise ConfigError(f"model.total_anneal_steps: must be >= 0, got {self.total_anneal_steps}")


def _mlp(dims: list[int]) -> nn.Sequential:
    mods: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layer = nn.Linear(a, b)
        nn.init.normal_(layer.weight, 0.0, math.sqrt(2.0 / (a + b)))
        nn.init.normal_(layer.bias, 0.0, 0.001)
        mods.append(layer)
        if i != len(dims) - 2:
            mods.append(nn.Tanh())
    return nn.Sequential(*mods)


class MultVAE(Recommender):
    """Mult-VAE; see the module docstring."""

    name = "multvae"

    def __init__(self, cfg: MultVAEConfig, shape: DataShape):
        super().__init__()
        self.cfg = cfg
        self.latent_dim = int(cfg.latent_dim)
        hidden = [int(d) for d in cfg.hidden_dims]
        self.encoder = _mlp([shape.n_items, *hidden, 2 * self.latent_dim])
        self.decoder = _mlp([self.latent_dim, *hidden[::-1], shape.n_items])
        self.drop = nn.Dropout(cfg.dropout)
        self.register_buffer("anneal_updates", torch.zeros((), dtype=torch.long))

    def encode(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.normalize(x, dim=1)
        h = self.encoder(x * keep if keep is not None else self.drop(x))
        return h[:, :self.latent_dim], h[:, self.latent_dim:]

    def beta(self) -> float:
        c = self.cfg
        if c.total_anneal_steps <= 0:
            return float(c.anneal_cap)
        return min(float(c.anneal_cap), float(self.anneal_updates) / c.total_anneal_steps)

    def loss(self, batch: Batch) -> torch.Tensor:
        r = batch.rand
        if r is None:
            mu, logvar = self.encode(batch.x)
            z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
            beta = self.beta()
            if self.training:
                self.anneal_updates += 1
        else:  # explicit draws; beta from the schedule position the cross-device step set
            mu, logvar = self.encode(batch.x, r["keep"])
            z = mu + r["eps"] * torch.exp(0.5 * logvar)
            beta = r["beta"]
        logits = self.decoder(z)
        nll = -(F.log_softmax(logits, dim=1) * batch.x).sum(1)
        kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)
        return nll + beta * kl

    def set_schedule_position(self, epochs: int, updates: int) -> None:
        self.anneal_updates.fill_(int(updates))

    def draw_randomness(self, batch: Batch, rnd) -> dict[str, torch.Tensor]:
        b, n = batch.x.shape
        return {"keep": rnd.keep_mask(0, n, float(self.cfg.dropout)), "eps": rnd.normal(1, self.latent_dim),
                "beta": torch.full((b,), self.beta(), device=batch.x.device)}

    def scores(self, batch: Batch) -> torch.Tensor:
        mu, _ = self.encode(batch.x)
        return self.decoder(mu)

    def generate(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Decoded samples of the N(0, I) prior (a VAE baseline generator, not a diffusion model)."""
        return self.decoder(torch.randn(n, self.latent_dim, generator=generator, device=generator.device))
