"""Latent DDPM (``generator=latent_ddpm``): synthetic users from a DDPM over MultVAE latents.

fedrec's own design, loosely following the two-stage idea of SDRM (Lilienthal et al. 2024; the
paper's method itself is ``generator=sdrm``, ``sdrm.py``) but **not** SDRM: a different objective
(plain eps-prediction MSE), schedule (cosine, T=200), denoiser (DiffRec's tanh MLP), sampler (DDIM
from pure noise) and binarisation (per-user activity draws).

1. fedrec's MultVAE trained on the members' rows;
2. the latent posterior means, standardised per dimension (not under DP: the mean and spread would
   be released unaccounted), modelled by an eps-prediction DDPM (fedrec's diffusion core, cosine
   schedule, an MLP denoiser with timestep embedding and ``denoiser_layers`` hidden layers per side);
   ``latent_sampling=posterior`` trains on a fresh z ~ q(z|x) per step instead; optional weight EMA;
3. generation by deterministic DDIM from pure noise (``sampling_steps``), decoding, and the release's
   binarisation (``generators.py``): a number of items k per synthetic user drawn from the members'
   activity distribution, then k items drawn without replacement from softmax(scores / temperature)
   (``binarize=sample``) or the k best (``topk``).

Both stages are trained through fedrec's per-user losses, so ``generator.dp`` trains them with
DP-SGD (``generators.py``). Before issue 8 this module was called ``sdrm.py`` / ``generator=sdrm``;
the results measured under that name are this generator's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import scipy.sparse as sp
import torch

from fedrec.errors import ConfigError
from fedrec.models.base import Batch, Recommender
from fedrec.models.denoiser import DenoiserMLP
from fedrec.models.diffusion import GaussianDiffusion
from fedrec.privacy.generator_base import SyntheticGenerator
from fedrec.train import DenseRows


@dataclass
class LatentDDPMConfig:
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


class LatentEpsModel(Recommender):
    """The latent score model: eps-prediction DDPM over (standardised) user latents, one latent per user."""

    name = "latent_ddpm_eps"

    def __init__(self, cfg: LatentDDPMConfig):
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


class LatentDDPM(SyntheticGenerator):
    name = "latent_ddpm"

    def __init__(self, cfg: LatentDDPMConfig, n_items: int, seed: int = 0, **common):
        super().__init__(n_items, seed, **common)
        self.cfg = cfg

    def stages(self) -> list[tuple[int, int]]:
        return [(self.cfg.batch_size, self.cfg.vae_epochs), (self.cfg.batch_size, self.cfg.diffusion_epochs)]

    def _fit(self, rows: sp.csr_matrix) -> None:
        c = self.cfg
        self.vae, mu, sd = self.multvae_latents(rows, c.vae_hidden, c.latent_dim, c.vae_lr, c.batch_size, c.vae_epochs,
                                                c.vae_anneal_cap, c.vae_anneal_steps)
        if self.plan is None:
            self.mean, self.std = mu.mean(0), mu.std(0).clamp(min=1e-6)
        else:
            self.mean, self.std = torch.zeros(c.latent_dim), torch.ones(c.latent_dim)
        self.latent = LatentEpsModel(c)
        latents = torch.cat([(mu - self.mean) / self.std, sd / self.std], dim=1)
        self.train_stage(self.latent, torch.optim.Adam(self.latent.parameters(), lr=c.diffusion_lr),
                         DenseRows(latents), c.batch_size, c.diffusion_epochs)
        self.latent.use_average()

    def scores(self, n: int, g: torch.Generator) -> torch.Tensor:
        z = self.latent.diffusion.generate(self.latent.denoiser, (n, self.cfg.latent_dim), g, self.cfg.sampling_steps,
                                           what="generator")
        return self.vae.decoder(z * self.std + self.mean)
