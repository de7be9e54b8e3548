"""SDRM: synthetic users from a diffusion model over a MultVAE latent space.

Lilienthal et al. 2024, "Multi-Resolution Diffusion for Privacy-Sensitive Recommender Systems":
a MultVAE-style encoder densifies the sparse 0/1 interaction rows into continuous latents, a
score-based diffusion model learns the latent distribution, and sampled latents are decoded and
binarised to the real data's sparsity, giving synthetic users that can be released instead of real
ones.

Implemented here: (1) fedrec's MultVAE trained on the real rows; (2) the latent means, standardised,
modelled by a DDPM with eps-prediction (fedrec's diffusion core, cosine schedule, an MLP denoiser with
timestep embedding, three hidden layers per side) — the DDPM is the discrete-time score model; (3) generation by deterministic DDIM
from pure noise, decoding, and binarising each synthetic user to a number of items k drawn from the real
users' activity distribution: k items drawn without replacement from the softmax of the decoded
scores (``binarize=sample``, the multinomial the MultVAE decoder models) or the k best (``topk``).
Deviations: a single latent resolution (the paper's multi-resolution variant is not built). Both
stages are trained through fedrec's per-user losses, so ``generator.dp`` trains them with DP-SGD
(``generators.py``); under DP the latents are not standardised (their mean and spread would be
released unaccounted).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch

from fedrec.errors import ConfigError
from fedrec.models import DataShape, build_model
from fedrec.models.base import Batch, Recommender
from fedrec.models.denoiser import DenoiserMLP
from fedrec.models.diffusion import GaussianDiffusion
from fedrec.privacy.generators import SyntheticGenerator
from fedrec.train import DenseRows, TrainRows


@dataclass
class SDRMConfig:
    vae_hidden: list[int] = field(default_factory=lambda: [600])
    latent_dim: int = 64
    vae_epochs: int = 100
    vae_lr: float = 1e-3
    vae_anneal_cap: float = 0.2  # MultVAE's KL weight cap beta
    vae_anneal_steps: int = 200  # updates over which beta rises to the cap
    batch_size: int = 128
    diffusion_steps: int = 200
    denoiser_hidden: int = 512
    denoiser_layers: int = 3  # hidden layers on each side of the denoiser MLP's bottleneck
    diffusion_epochs: int = 600
    diffusion_lr: float = 1e-3
    sampling_steps: int = 50  # DDIM steps at generation
    latent_sampling: str = "mean"  # mean: model the posterior means; posterior: a fresh z ~ q(z|x) per step
    ema: float = 0.0  # per-epoch exponential moving average of the denoiser's weights, used to sample (0: off)

    def __post_init__(self) -> None:
        if not 0.0 <= self.ema < 1.0:
            raise ConfigError(f"generator.ema: must be in [0, 1), got {self.ema}")
        if self.latent_sampling not in ("mean", "posterior"):
            raise ConfigError(f"generator.latent_sampling: expected mean or posterior, got {self.latent_sampling!r}")


class LatentDDPM(Recommender):
    """SDRM's score model: eps-prediction DDPM over (standardised) user latents, one latent per user."""

    name = "sdrm_latent"

    def __init__(self, cfg: SDRMConfig):
        super().__init__()
        self.posterior = cfg.latent_sampling == "posterior"
        d, h = cfg.latent_dim, cfg.denoiser_hidden
        depth = max(1, int(cfg.denoiser_layers))
        self.denoiser = DenoiserMLP([d] + [h] * depth, [h] * depth + [d], emb_size=16, dropout=0.0)
        self.diffusion = GaussianDiffusion(cfg.diffusion_steps, "cosine", mean_type="eps", reweight=False,
                                           importance_sampling=False, noise_scale=1.0)
        self.ema = float(cfg.ema)
        self.averaged = [p.detach().clone() for p in self.denoiser.parameters()] if self.ema > 0 else None

    def on_epoch_end(self) -> None:
        if self.averaged is not None:
            with torch.no_grad():
                for avg, p in zip(self.averaged, self.denoiser.parameters()):
                    avg.mul_(self.ema).add_(p.detach(), alpha=1 - self.ema)

    def use_average(self) -> None:
        """Sample with the averaged weights (post-processing of the trained ones: no privacy cost)."""
        if self.averaged is not None:
            with torch.no_grad():
                for avg, p in zip(self.averaged, self.denoiser.parameters()):
                    p.copy_(avg)

    def loss(self, batch: Batch) -> torch.Tensor:
        """``batch.x`` = [mean, std] of each user's (standardised) latent posterior."""
        mean, std = batch.x.chunk(2, dim=1)
        z = mean + std * torch.randn_like(std) if self.posterior else mean
        return self.diffusion.training_loss(self.denoiser, z, record=False)["loss"]


class SDRM(SyntheticGenerator):
    name = "sdrm"

    def __init__(self, cfg: SDRMConfig, n_items: int, seed: int = 0, **common):
        super().__init__(n_items, seed, **common)
        self.cfg = cfg

    def stages(self) -> list[tuple[int, int]]:
        return [(self.cfg.batch_size, self.cfg.vae_epochs), (self.cfg.batch_size, self.cfg.diffusion_epochs)]

    def _fit(self, rows: sp.csr_matrix) -> None:
        c = self.cfg
        self.vae = build_model({"name": "multvae", "hidden_dims": list(c.vae_hidden), "latent_dim": c.latent_dim,
                                "anneal_cap": c.vae_anneal_cap, "total_anneal_steps": c.vae_anneal_steps},
                               DataShape(rows.shape[0], self.n_items))
        real = TrainRows(rows, np.arange(rows.shape[0]))
        self.train_stage(self.vae, torch.optim.Adam(self.vae.parameters(), lr=c.vae_lr), real, c.batch_size,
                         c.vae_epochs)
        with torch.no_grad():
            enc = [self.vae.encode(real.batch(np.arange(s, min(s + 1024, len(real)))).x) for s in range(0, len(real), 1024)]
        mu = torch.cat([m for m, _ in enc])
        sd = torch.cat([torch.exp(0.5 * lv) for _, lv in enc])
        if self.plan is None:
            self.mean, self.std = mu.mean(0), mu.std(0).clamp(min=1e-6)
        else:
            self.mean, self.std = torch.zeros(c.latent_dim), torch.ones(c.latent_dim)
        self.latent = LatentDDPM(c)
        latents = torch.cat([(mu - self.mean) / self.std, sd / self.std], dim=1)
        self.train_stage(self.latent, torch.optim.Adam(self.latent.parameters(), lr=c.diffusion_lr),
                         DenseRows(latents), c.batch_size, c.diffusion_epochs)
        self.latent.use_average()

    def scores(self, n: int, g: torch.Generator) -> torch.Tensor:
        z = self.latent.diffusion.generate(self.latent.denoiser, (n, self.cfg.latent_dim), g, self.cfg.sampling_steps,
                                           what="generator")
        return self.vae.decoder(z * self.std + self.mean)
