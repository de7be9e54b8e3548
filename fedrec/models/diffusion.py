"""Gaussian diffusion core shared by every diffusion recommender (DiffRec, L-DiffRec, ...).

Follows the official DiffRec implementation (Wang et al., SIGIR 2023,
github.com/YiyanXu/DiffRec ``models/gaussian_diffusion.py``) and the survey's section 2
(DDPM forward process, importance-sampled timesteps from Improved DDPM):

* schedules ``linear`` and ``linear-var`` (DiffRec: the *variance* 1 - alpha_bar grows linearly
  from ``noise_scale*noise_min`` to ``noise_scale*noise_max``), plus ``cosine``;
* ``beta_fixed`` overrides the first beta with 1e-5 (Sohl-Dickstein et al. 2015, section 2.4.1), as
  the official ``GaussianDiffusion(beta_fixed=...)`` does whenever ``noise_scale != 0``.
  Its official default is on in ``DiffRec/`` and ``T-DiffRec/`` and off in ``L-DiffRec/`` and
  ``LT-DiffRec/``; no official ``main.py`` passes it, so those defaults are what every official run used;
* ``q_sample`` (closed-form forward), x0- or eps-prediction;
* training loss with DiffRec's SNR reweighting (x0: ``SNR(t-1) - SNR(t)``, 1 at t=0) and
  importance-sampled timesteps (``pt ∝ sqrt(E[L_t^2])`` over the last 10 losses of each t, with
  1/1000 uniform mass; uniform until every t has 10 losses). Deviation: the loss history is a
  per-timestep ring buffer updated in one vectorised scatter instead of a Python loop over the
  batch; the kept set (the last 10 losses per t) and so the sampling distribution are identical;
* reverse process from a given start (the user's history, DiffRec's inference) through all T steps
  with the posterior mean and no added noise (official), or a DDIM-style deterministic subsequence
  of ``inference_steps`` steps (faster; see the benchmark for its effect on the metrics).

The core never imports a model: it takes the denoiser as a callable ``fn(x_t, t) -> output``.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from fedrec.errors import ConfigError

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def betas_from_linear_variance(steps: int, variance: np.ndarray, max_beta: float = 0.999) -> np.ndarray:
    alpha_bar = 1.0 - variance
    betas = np.empty(steps, dtype=np.float64)
    betas[0] = 1.0 - alpha_bar[0]
    betas[1:] = np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], max_beta)
    return betas


#: the official ``beta_fixed`` value of the first beta (Sohl-Dickstein et al. 2015, section 2.4.1)
FIXED_FIRST_BETA = 1e-5


def make_betas(schedule: str, steps: int, noise_scale: float, noise_min: float, noise_max: float,
               beta_fixed: bool = False) -> np.ndarray:
    """The schedule's betas in float64; ``beta_fixed`` sets the first to ``FIXED_FIRST_BETA``.

    As in the official code the override applies only when ``noise_scale != 0`` (with no noise the
    betas are never used) and after the schedule is computed: with ``linear-var`` it changes every
    alpha_bar_t, not only the first.
    """
    betas = _schedule_betas(schedule, steps, noise_scale, noise_min, noise_max)
    if beta_fixed and noise_scale != 0:
        betas[0] = FIXED_FIRST_BETA
    return betas


def _schedule_betas(schedule: str, steps: int, noise_scale: float, noise_min: float, noise_max: float) -> np.ndarray:
    if schedule in ("linear", "linear-var"):
        start, end = noise_scale * noise_min, noise_scale * noise_max
        lin = np.linspace(start, end, steps, dtype=np.float64)
        return lin if schedule == "linear" else betas_from_linear_variance(steps, lin)
    if schedule == "cosine":
        s = 0.008
        f = lambda t: np.cos((t / steps + s) / (1 + s) * np.pi / 2) ** 2  # noqa: E731
        t = np.arange(steps + 1, dtype=np.float64)
        return np.minimum(1 - f(t[1:]) / f(t[:-1]), 0.999)
    raise ConfigError(f"model.noise_schedule: unknown schedule {schedule!r}; expected linear, linear-var or cosine")


class GaussianDiffusion(nn.Module):
    """Schedules, forward noising, the weighted training loss and the samplers.

    Parameters
    ----------
    steps : int
        Number of diffusion steps T.
    noise_schedule : str (default: "linear-var")
    noise_scale, noise_min, noise_max : float
        Schedule bounds (DiffRec's names).
    beta_fixed : bool (default: False)
        Override the first beta with 1e-5 (official DiffRec: on; official L-DiffRec: off).
    mean_type : str (default: "x0")
        What the denoiser predicts: "x0" or "eps".
    reweight : bool (default: True)
        DiffRec's SNR-difference weighting of the per-timestep loss.
    importance_sampling : bool (default: True)
        Sample t proportionally to the recent loss magnitude (uniform while warming up).
    history_per_step : int (default: 10)
    """

    def __init__(self, steps: int, noise_schedule: str = "linear-var", noise_scale: float = 0.1,
                 noise_min: float = 1e-4, noise_max: float = 0.02, mean_type: str = "x0",
                 reweight: bool = True, importance_sampling: bool = True, history_per_step: int = 10,
                 beta_fixed: bool = False):
        super().__init__()
        if steps < 1:
            raise ConfigError(f"model.steps: must be >= 1, got {steps}")
        if noise_scale < 0 or noise_min < 0 or noise_max < 0:
            raise ConfigError("model.noise_scale/noise_min/noise_max: must be non-negative")
        if noise_min > noise_max:
            raise ConfigError(f"model.noise_min: {noise_min} must not exceed model.noise_max {noise_max}")
        if mean_type not in ("x0", "eps"):
            raise ConfigError(f"model.mean_type: expected 'x0' or 'eps', got {mean_type!r}")
        self.steps = steps
        self.mean_type = mean_type
        self.reweight = reweight
        self.importance_sampling = importance_sampling
        self.history_per_step = history_per_step
        self.noise_scale = noise_scale
        betas = make_betas(noise_schedule, steps, noise_scale, noise_min, noise_max, beta_fixed)
        if noise_scale > 0 and not (np.all(betas > 0) and np.all(betas <= 1)):
            raise ConfigError("model.noise_*: the schedule gives betas outside (0, 1]")
        alphas = 1.0 - betas
        ac = np.cumprod(alphas)
        ac_prev = np.append(1.0, ac[:-1])
        with np.errstate(divide="ignore", invalid="ignore"):
            coef1 = betas * np.sqrt(ac_prev) / (1.0 - ac)
            coef2 = (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac)
            snr = ac / (1.0 - ac)
        # Coefficients are computed in float64 (as the official code) and stored as float32.
        for name, arr in {
            "betas": betas, "alphas_cumprod": ac, "alphas_cumprod_prev": ac_prev,
            "sqrt_ac": np.sqrt(ac), "sqrt_one_minus_ac": np.sqrt(1.0 - ac),
            "posterior_coef1": coef1, "posterior_coef2": coef2, "snr": snr,
        }.items():
            self.register_buffer(name, torch.tensor(arr, dtype=torch.float32), persistent=False)
        # Importance-sampling state (persistent: it is part of a checkpoint, never aggregated).
        self.register_buffer("loss_history", torch.zeros(steps, history_per_step))
        self.register_buffer("loss_written", torch.zeros(steps, dtype=torch.long))

    # ----------------------------------------------------------------- forward process
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        if noise is None:
            noise = torch.randn_like(x0)
        return self.sqrt_ac[t].unsqueeze(-1) * x0 + self.sqrt_one_minus_ac[t].unsqueeze(-1) * noise

    # ----------------------------------------------------------------- timestep sampling
    def history_full(self) -> bool:
        return bool((self.loss_written >= self.history_per_step).all())

    def timestep_probs(self, uniform_prob: float = 1e-3) -> torch.Tensor | None:
        """Importance-sampling distribution over t, or None while still warming up."""
        if not (self.importance_sampling and self.history_full()):
            return None
        lt = torch.sqrt(torch.mean(self.loss_history ** 2, dim=-1))
        p = lt / lt.sum()
        return p * (1 - uniform_prob) + uniform_prob / self.steps

    def sample_timesteps(self, n: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.timestep_probs()
        if p is None:
            t = torch.randint(0, self.steps, (n,), device=device)
            return t, torch.ones(n, device=device)
        t = torch.multinomial(p, n, replacement=True)
        return t, p[t] * self.steps

    @torch.no_grad()
    def record_losses(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Append each (t, loss) to t's FIFO of the last ``history_per_step`` losses, vectorised.

        Later entries of the batch win, as in the official sequential loop.
        """
        h = self.history_per_step
        t = t.detach().long()
        order = torch.sort(t, stable=True).indices
        ts, ls = t[order], losses.detach().float()[order]
        counts = torch.bincount(ts, minlength=self.steps)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(len(ts), device=ts.device) - starts[ts]
        keep = rank >= counts[ts] - h  # only the last h of each t survive
        pos = (self.loss_written[ts] + rank) % h
        self.loss_history[ts[keep], pos[keep]] = ls[keep]
        self.loss_written += counts

    # ----------------------------------------------------------------- training loss
    def training_loss(self, denoise: Denoiser, x0: torch.Tensor, record: bool = True,
                      t: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Per-example weighted loss (already divided by the sampling probability).

        Given explicit ``t`` (uniformly drawn by the caller) and ``noise``, the loss is deterministic
        and the importance history is neither used nor updated (cross-device training).
        """
        n = x0.shape[0]
        if t is None:
            t, pt = self.sample_timesteps(n, x0.device)
        else:
            pt, record = torch.ones(t.shape, dtype=x0.dtype, device=x0.device), False
        if noise is None:
            noise = torch.randn_like(x0)
        x_t = self.q_sample(x0, t, noise) if self.noise_scale > 0 else x0
        out = denoise(x_t, t)
        target = x0 if self.mean_type == "x0" else noise
        mse = ((target - out) ** 2).mean(dim=-1)
        if self.reweight:
            if self.mean_type == "x0":
                weight = self.snr[(t - 1).clamp(min=0)] - self.snr[t]
                weight = torch.where(t == 0, torch.ones_like(weight), weight)
                loss = weight * mse
            else:
                weight = (1 - self.alphas_cumprod[t]) / (
                    (1 - self.alphas_cumprod_prev[t]) ** 2 * (1 - self.betas[t]))
                weight = torch.where(t == 0, torch.ones_like(weight), weight)
                x0_hat = self.predict_x0_from_eps(x_t, t, out)
                likelihood = ((x0 - x0_hat) ** 2).mean(dim=-1) / 2.0
                loss = weight * torch.where(t == 0, likelihood, mse)
        else:
            loss = mse
        if record and self.training and self.importance_sampling:
            self.record_losses(t, loss)
        pred_x0 = out if self.mean_type == "x0" else self.predict_x0_from_eps(x_t, t, out)
        return {"loss": loss / pt, "pred_x0": pred_x0, "t": t}

    def predict_x0_from_eps(self, x_t, t, eps):
        ac = self.alphas_cumprod[t].unsqueeze(-1)
        return (x_t - torch.sqrt(1 - ac) * eps) / torch.sqrt(ac)

    def _x0_hat(self, denoise: Denoiser, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = denoise(x_t, t)
        return out if self.mean_type == "x0" else self.predict_x0_from_eps(x_t, t, out)

    # ----------------------------------------------------------------- reverse process
    def check_reaches_noise(self, what: str = "model", tol: float = 0.05) -> None:
        """Generation starts from N(0, I): x_T must carry (almost) no signal, sqrt(alpha_bar_T) <= tol."""
        signal = float(self.sqrt_ac[-1]) if self.noise_scale > 0 else 1.0
        if signal > tol:
            raise ConfigError(f"{what}.noise_*: the schedule keeps sqrt(alpha_bar_T) = {signal:.3f} of the signal at "
                              f"step T, so samples from pure noise are meaningless; use a generative schedule "
                              f"(e.g. noise_schedule=cosine, noise_scale=1) reaching <= {tol}")

    @torch.no_grad()
    def generate(self, denoise: Denoiser, shape: tuple[int, int], generator: torch.Generator,
                 inference_steps: int | None = None, what: str = "model") -> torch.Tensor:
        """Samples x_0 by reversing the chain from x_T ~ N(0, I).

        All T steps: ancestral DDPM sampling (posterior mean plus posterior noise); fewer: DDIM (eta=0).
        Every draw comes from ``generator``.
        """
        self.check_reaches_noise(what)
        x_t = torch.randn(shape, generator=generator)
        with torch.random.fork_rng():  # reverse() draws the posterior noise from the global generator
            torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
            return self.reverse(denoise, x_t, 0, inference_steps, sampling_noise=True)


    @torch.no_grad()
    def reverse(self, denoise: Denoiser, x_start: torch.Tensor, sampling_steps: int = 0,
                inference_steps: int | None = None, sampling_noise: bool = False) -> torch.Tensor:
        """DiffRec inference: start from the user's history and denoise down to t=0.

        ``sampling_steps`` > 0 first noises the history to step ``sampling_steps-1`` (official);
        0 starts from the history itself. ``inference_steps`` None/T runs all T steps with the
        posterior mean (official); fewer runs a deterministic DDIM subsequence of that length.
        """
        T = self.steps
        if not 0 <= sampling_steps <= T:
            raise ConfigError(f"model.sampling_steps: must be in 0..{T} (model.steps), got {sampling_steps}")
        n = x_start.shape[0]
        if sampling_steps == 0:
            x = x_start
        else:
            x = self.q_sample(x_start, torch.full((n,), sampling_steps - 1, dtype=torch.long, device=x_start.device))
        if self.noise_scale == 0:
            for i in reversed(range(T)):
                x = denoise(x, torch.full((n,), i, dtype=torch.long, device=x.device))
            return x
        k = T if inference_steps in (None, 0) else int(inference_steps)
        if not 1 <= k <= T:
            raise ConfigError(f"model.inference_steps: must be in 1..{T}, got {k}")
        if k == T:
            for i in reversed(range(T)):
                t = torch.full((n,), i, dtype=torch.long, device=x.device)
                x0 = self._x0_hat(denoise, x, t)
                mean = self.posterior_coef1[i] * x0 + self.posterior_coef2[i] * x
                if sampling_noise and i > 0:
                    var = self.betas[i] * (1 - self.alphas_cumprod_prev[i]) / (1 - self.alphas_cumprod[i])
                    mean = mean + torch.sqrt(var) * torch.randn_like(x)
                x = mean
            return x
        # DDIM (eta=0) on an evenly spaced subsequence ending at t=0.
        seq = np.unique(np.linspace(0, T - 1, k).round().astype(int))[::-1]
        for j, i in enumerate(seq):
            t = torch.full((n,), int(i), dtype=torch.long, device=x.device)
            x0 = self._x0_hat(denoise, x, t)
            if j == len(seq) - 1:
                return x0
            s = int(seq[j + 1])
            eps = (x - self.sqrt_ac[i] * x0) / self.sqrt_one_minus_ac[i]
            x = self.sqrt_ac[s] * x0 + self.sqrt_one_minus_ac[s] * eps
        return x
