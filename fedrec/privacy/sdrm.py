"""SDRM (``generator=sdrm``): the Score-based Diffusion Recommendation Module, as the paper and its code.

Paper: D. Lilienthal, P. Mello, M. Eirinaki, S. Tiomkin, "Multi-Resolution Diffusion for Privacy-Sensitive
Recommender Systems", IEEE Access 12 (2024) 58275-58287, doi:10.1109/ACCESS.2024.3388299 (arXiv:2311.03488).
Official code: github.com/Multi-resolution-diffusion-recommender/SDRM (``train_SDRM.py``, ``main.py``),
read at commit 345e858; this module is written from it, not copied.

Algorithm as implemented (numbered as the official pipeline runs):

1. MultVAE (fedrec's ``multvae``: L2-normalised input, dropout 0.5, tanh encoder/decoder, multinomial
   likelihood, KL weight ``min(vae_anneal_cap, updates / vae_anneal_steps)``) trained with Adam on the
   members' rows; the members' posterior means (eval mode) are the latents x0 (no standardisation).
2. The short linear schedule: beta_t = beta_min + (beta_max - beta_min) * t / T for t = 0..T,
   alpha_t = 1 - beta_t, alpha_bar_t = prod_{s<=t} alpha_s (from s = 0, as the official cumulative product),
   alpha_bar_0 := 1 (T = ``steps``, e.g. 83).
3. The forward process with the noise diminisher lambda (``noise_diminisher``): t ~ U{1..T},
   eps = lambda * N(0, I), x_t = sqrt(alpha_bar_t) x0 + (1 - alpha_bar_t) eps — the official code
   scales the noise by (1 - alpha_bar_t), not by sqrt(1 - alpha_bar_t).
4. The denoiser f(x, t): input dropout (p = ``dropout``), concatenated with Linear(T, T) of a T-dim
   sinusoidal timestep embedding; Linear -> PReLU; ``hidden_layers`` x (Linear -> PReLU) with the same
   Linear and PReLU each time (the official ``[Linear, PReLU] * n`` repeats one module pair); Linear ->
   tanh. Three passes per user, each with its own dropout mask.
5. The modified score-matching objective, mu = ``mu`` (official 0.1):
   e = f(x_t, t), s = f(x0, t), d = (f(x0 + mu eps, t) - s) / mu^2, r = e - x0,
   loss = 0.5 * (mean (d - r)^2 + mean (r - s)^2) / (1e-8 + var(r)); the official var(r) is over the whole
   batch (``loss_norm=batch``); ``user`` takes each user's own variance over the latent dimensions.
   Adam (``lr``, L2 ``weight_decay``), the learning rate decayed linearly per epoch, lr * (1 - e / epochs).
6. Sampling from x ~ N(0, I): x <- (x - f(x, i) (1 - alpha_i) / sqrt(1 - alpha_bar_i)) / sqrt(alpha_i)
   + sqrt(beta_i) lambda z (no noise at i = 1), for i = k..1. F-SDRM (``sampling=full``): k = T for
   every user; M-SDRM (``sampling=multi``, multi-resolution): k ~ U{1..T-1} per synthetic user (the
   official ``np.random.randint(1, T)``). The official denoiser keeps its input dropout at sampling
   (``F.dropout`` defaults to training=True): ``sample_dropout``.
7. Decoding by the MultVAE decoder; binarisation (``binarize``, ``generators.py``): ``quantile`` is the
   official one (ones where a score reaches the (1 - density) quantile of all scores, density = the
   members' share of ones); ``sample`` / ``topk`` are fedrec's per-user activity draws.

Defaults (``conf/generator/sdrm.yaml``) are the official ML-100K row of the README's table for the SVD
recommender (its best Recall@10). Deviations, and why:

* The VAE trains a fixed ``vae_epochs`` (default 500, the official maximum) instead of early stopping
  on validation users' Recall@10: a generator here sees the members only, and DP needs every stage's
  length before training.
* M-SDRM is vectorised: at step i the users with k >= i are denoised together (the official loops
  over users one by one); same chains, different order of random draws.
* The score model's draws (t, noise, dropout masks) and every sampling draw come from explicit
  ``torch.Generator`` s seeded from ``seed`` (the official uses the global RNGs of torch and NumPy); the
  MultVAE stage (fedrec's model, shared with ``latent_ddpm``) and the weight initialisations draw from
  torch's global RNG, which ``fit`` seeds from ``seed``.
* Fedrec's MultVAE initialises N(0, 2/(fan_in+fan_out)) where the official VAE uses Xavier-uniform
  (the same variance); the denoiser keeps PyTorch's default initialisation, as the official.
* The quantile's density is the members' (the official takes all training users'); under DP it is
  the mean of the noisy activity histogram.
* DP (``generator.dp``, not in the paper): both stages run DP-SGD per user through ``generators.py``.
  The official batch variance couples the users of a batch, so under DP ``loss_norm`` must be ``user``
  (the default ``null`` picks ``batch`` without DP and ``user`` with it). The objective evaluates every
  layer several times per user, which Opacus's ghost clipping does not sum correctly (it keeps the
  last evaluation's norm), so SDRM trains with per-sample hooks (``grad_sample_mode`` auto or hooks),
  which accumulate them; PReLU's per-sample gradient, ``prelu_grad_sample``, is registered with Opacus.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from fedrec.errors import ConfigError
from fedrec.models.base import Batch, Recommender
from fedrec.models.denoiser import timestep_embedding
from fedrec.privacy.generator_base import SyntheticGenerator
from fedrec.train import DenseRows

SAMPLING = ("multi", "full")
LOSS_NORMS = ("batch", "user")


@dataclass
class SDRMConfig:
    vae_hidden: list[int] = field(default_factory=lambda: [930])  # VAE hidden layer neurons
    latent_dim: int = 830  # VAE latent size (official: --MLP-latent-neurons)
    vae_epochs: int = 500
    vae_batch_size: int = 780
    vae_lr: float = 6e-4
    vae_anneal_cap: float = 0.2
    vae_anneal_steps: int = 20000
    steps: int = 83  # T
    beta_min: float = 1e-4
    beta_max: float = 0.02
    noise_diminisher: float = 1.0
    denoiser_hidden: int = 830  # official: --MLP-latent-neurons as well
    hidden_layers: int = 2
    dropout: float = 0.5
    sample_dropout: bool = True
    mu: float = 0.1
    batch_size: int = 550
    epochs: int = 265
    lr: float = 2.1e-5
    weight_decay: float = 1e-4
    sampling: str = "multi"
    loss_norm: str | None = None  # batch | user | None (batch without DP, user with it)

    def __post_init__(self) -> None:
        positive_ints = ("latent_dim", "vae_epochs", "vae_batch_size", "vae_anneal_steps", "denoiser_hidden",
                         "batch_size", "epochs")
        for key in positive_ints:
            if int(getattr(self, key)) < 1:
                raise ConfigError(f"generator.{key}: must be >= 1, got {getattr(self, key)}")
        if not self.vae_hidden or any(int(d) < 1 for d in self.vae_hidden):
            raise ConfigError(f"generator.vae_hidden: a non-empty list of dims >= 1, got {list(self.vae_hidden)}")
        for key in ("vae_lr", "lr", "mu"):
            if not float(getattr(self, key)) > 0:
                raise ConfigError(f"generator.{key}: must be positive, got {getattr(self, key)}")
        for key in ("vae_anneal_cap", "weight_decay", "noise_diminisher"):
            if float(getattr(self, key)) < 0:
                raise ConfigError(f"generator.{key}: must be >= 0, got {getattr(self, key)}")
        if self.sampling not in SAMPLING:
            raise ConfigError(f"generator.sampling: expected multi (M-SDRM) or full (F-SDRM), got {self.sampling!r}")
        if int(self.steps) < (2 if self.sampling == "multi" else 1):
            raise ConfigError(f"generator.steps: must be >= 2 for sampling=multi (k ~ U{{1..T-1}}), got {self.steps}")
        if int(self.hidden_layers) < 0:
            raise ConfigError(f"generator.hidden_layers: must be >= 0, got {self.hidden_layers}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ConfigError(f"generator.dropout: must be in [0, 1), got {self.dropout}")
        if not 0.0 < float(self.beta_min) <= float(self.beta_max) < 1.0:
            raise ConfigError(f"generator.beta_min: need 0 < beta_min <= beta_max < 1, got {self.beta_min}, "
                              f"{self.beta_max}")
        if self.loss_norm not in (*LOSS_NORMS, None):
            raise ConfigError(f"generator.loss_norm: expected batch, user or null, got {self.loss_norm!r}")


# ---------------------------------------------------------------------------- schedule and forward process
class LinearSchedule(nn.Module):
    """beta_t linear on t = 0..T; alpha_bar_t the cumulative product of alpha_s for s <= t, alpha_bar_0 = 1."""

    def __init__(self, steps: int, beta_min: float, beta_max: float):
        super().__init__()
        self.steps = int(steps)
        betas = beta_min + (beta_max - beta_min) * np.linspace(0.0, 1.0, self.steps + 1)
        alpha_bar = np.cumprod(1.0 - betas)
        alpha_bar[0] = 1.0
        for name, arr in {"betas": betas, "alphas": 1.0 - betas, "alpha_bar": alpha_bar}.items():
            self.register_buffer(name, torch.tensor(arr, dtype=torch.float32), persistent=False)


def forward_process(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """SDRM's x_t = sqrt(alpha_bar_t) x0 + (1 - alpha_bar_t) noise (``noise`` already times the diminisher)."""
    ab = alpha_bar[t].unsqueeze(-1)
    return ab.sqrt() * x0 + (1.0 - ab) * noise


def sdrm_objective(f: Callable[[torch.Tensor, int], torch.Tensor], x0: torch.Tensor, x_t: torch.Tensor,
                   noise: torch.Tensor, mu: float, per_user: bool) -> torch.Tensor:
    """Per-user modified score-matching loss; ``f(x, pass)`` is the denoiser at the users' t (pass 0..2).

    Its mean over a batch is the official loss when ``per_user`` is false (batch variance).
    """
    eps_theta = f(x_t, 0)
    score = f(x0, 1)
    score_diff = (f(x0 + mu * noise, 2) - score) / mu ** 2
    residual = eps_theta - x0
    per = 0.5 * (((score_diff - residual) ** 2).mean(1) + ((residual - score) ** 2).mean(1))
    var = residual.var(dim=1) if per_user else residual.var()
    return per / (1e-8 + var)


# ---------------------------------------------------------------------------- denoiser
class SDRMDenoiser(nn.Module):
    """The official MLP: dropped-out x ++ Linear(T, T)(timestep embedding) -> PReLU MLP -> tanh."""

    def __init__(self, dim: int, hidden: int, steps: int, hidden_layers: int):
        super().__init__()
        self.emb_dim, self.hidden_layers = int(steps), int(hidden_layers)
        self.emb_layer = nn.Linear(self.emb_dim, self.emb_dim)
        self.first, self.first_act = nn.Linear(dim + self.emb_dim, hidden), nn.PReLU()
        if self.hidden_layers > 0:  # one pair, applied hidden_layers times (as the official module list)
            self.hidden, self.hidden_act = nn.Linear(hidden, hidden), nn.PReLU()
        self.out = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """``keep``: the inverted-dropout mask of the input (None: no dropout)."""
        emb = self.emb_layer(timestep_embedding(t, self.emb_dim))
        h = self.first_act(self.first(torch.cat([x if keep is None else x * keep, emb], dim=-1)))
        for _ in range(self.hidden_layers):
            h = self.hidden_act(self.hidden(h))
        return torch.tanh(self.out(h))


def dropout_mask(shape: tuple[int, ...], p: float, g: torch.Generator) -> torch.Tensor | None:
    if p <= 0:
        return None
    return (torch.rand(shape, generator=g) >= p).float() / (1.0 - p)


def prelu_grad_sample(layer: nn.PReLU, activations: list[torch.Tensor], backprops: torch.Tensor):
    """Opacus per-sample gradient of PReLU's slope: d out / d a = min(x, 0), summed over its positions."""
    x = activations[0].to(backprops.dtype)
    g = backprops * torch.clamp(x, max=0.0)
    if layer.weight.numel() == 1:
        return {layer.weight: g.reshape(len(g), -1).sum(1, keepdim=True)}
    return {layer.weight: g.reshape(len(g), g.shape[1], -1).sum(2)}  # one slope per channel (dim 1)


# ---------------------------------------------------------------------------- the score model
class SDRMScoreModel(Recommender):
    """The denoiser with its schedule and objective; ``loss`` is per user (one latent per user)."""

    name = "sdrm_denoiser"

    def __init__(self, cfg: SDRMConfig, per_user_norm: bool, seed: int):
        super().__init__()
        self.cfg, self.per_user_norm = cfg, per_user_norm
        self.schedule = LinearSchedule(cfg.steps, cfg.beta_min, cfg.beta_max)
        self.denoiser = SDRMDenoiser(cfg.latent_dim, cfg.denoiser_hidden, cfg.steps, cfg.hidden_layers)
        self.gen = torch.Generator().manual_seed(seed)  # training draws: t, noise, dropout masks

    def loss(self, batch: Batch) -> torch.Tensor:
        x0, c, g = batch.x, self.cfg, self.gen
        t = torch.randint(1, c.steps + 1, (len(x0),), generator=g)
        noise = c.noise_diminisher * torch.randn(x0.shape, generator=g)
        keep = [dropout_mask(tuple(x0.shape), c.dropout, g) for _ in range(3)]
        x_t = forward_process(x0, t, noise, self.schedule.alpha_bar)
        return sdrm_objective(lambda x, i: self.denoiser(x, t, keep[i]), x0, x_t, noise, c.mu, self.per_user_norm)

    def resolutions(self, n: int, g: torch.Generator) -> torch.Tensor:
        """Reverse steps per synthetic user: T (F-SDRM) or U{1..T-1} each (M-SDRM)."""
        if self.cfg.sampling == "full":
            return torch.full((n,), self.cfg.steps, dtype=torch.long)
        return torch.randint(1, self.cfg.steps, (n,), generator=g)

    @torch.no_grad()
    def reverse(self, x: torch.Tensor, k: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Denoise user j's x from step k_j down to 1 (official DDPM update); users advance together."""
        c, s = self.cfg, self.schedule
        p = c.dropout if c.sample_dropout else 0.0
        x = x.clone()
        for i in range(int(k.max()), 0, -1):
            rows = torch.nonzero(k >= i).squeeze(1)
            xi = x[rows]
            eps = self.denoiser(xi, torch.full((len(rows),), i, dtype=torch.long), dropout_mask(tuple(xi.shape), p, g))
            xi = (xi - eps * (1 - s.alphas[i]) / torch.sqrt(1 - s.alpha_bar[i])) / torch.sqrt(s.alphas[i])
            if i > 1:
                xi = xi + torch.sqrt(s.betas[i]) * c.noise_diminisher * torch.randn(xi.shape, generator=g)
            x[rows] = xi
        return x


class SDRM(SyntheticGenerator):
    name = "sdrm"

    def __init__(self, cfg: SDRMConfig, n_items: int, seed: int = 0, **common):
        super().__init__(n_items, seed, **common)
        self.cfg = cfg
        if self.dp is not None and cfg.loss_norm == "batch":
            raise ConfigError("generator.loss_norm: the batch variance couples the users of a batch, so per-user "
                              "clipping would not bound a user's influence; under generator.dp use user (or null)")
        if self.dp is not None and self.dp.grad_sample_mode == "ghost":
            raise ConfigError("generator.dp.grad_sample_mode: SDRM evaluates each layer several times per user and "
                              "ghost clipping keeps only the last evaluation's norm; use auto or hooks")
        if self.dp is not None:
            from opacus.grad_sample import register_grad_sampler

            register_grad_sampler(nn.PReLU)(prelu_grad_sample)
        self.per_user_norm = (cfg.loss_norm or ("user" if self.dp is not None else "batch")) == "user"

    def stages(self) -> list[tuple[int, int]]:
        c = self.cfg
        return [(c.vae_batch_size, c.vae_epochs), (c.batch_size, c.epochs)]

    def _fit(self, rows: sp.csr_matrix) -> None:
        c = self.cfg
        self.vae, latents, _ = self.multvae_latents(rows, c.vae_hidden, c.latent_dim, c.vae_lr, c.vae_batch_size,
                                                    c.vae_epochs, c.vae_anneal_cap, c.vae_anneal_steps)
        self.model = SDRMScoreModel(c, self.per_user_norm, int(self.rng.integers(2**62)))
        opt = torch.optim.Adam(self.model.parameters(), lr=c.lr, weight_decay=c.weight_decay, eps=1e-8)
        self.train_stage(self.model, opt, DenseRows(latents), c.batch_size, c.epochs,
                         lr_at=lambda epoch: c.lr * (1 - epoch / c.epochs), grad_sample_mode="hooks")

    @torch.no_grad()
    def scores(self, n: int, g: torch.Generator) -> torch.Tensor:
        k = self.model.resolutions(n, g)
        x = torch.randn((n, self.cfg.latent_dim), generator=g)
        return self.vae.decoder(self.model.reverse(x, k, g))

