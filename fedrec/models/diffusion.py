"""Gaussian diffusion core shared by every diffusion model of fedrec (DiffRec, L-DiffRec, the generators, ...).

No model keeps its own diffusion machinery: schedules, forward noising, the training loss, guidance and
the samplers live here, and a model hands the core its denoiser as a callable. What it implements:

1. Schedules (float64, stored float32): ``linear``, ``linear-var`` (DiffRec: the *variance*
   1 - alpha_bar grows linearly from ``noise_scale*noise_min`` to ``noise_scale*noise_max``) and
   ``cosine`` (Nichol & Dhariwal 2021); ``beta_fixed`` sets the first beta to 1e-5 (Sohl-Dickstein et
   al. 2015, 2.4.1) as the official DiffRec ``GaussianDiffusion(beta_fixed=...)`` does whenever
   ``noise_scale != 0`` (official default on in ``DiffRec/``, off in ``L-DiffRec/``); ``first_beta``
   sets another fixed value (DiffKG's official code: 1e-4).
2. The closed-form forward process q(x_t | x_0) (DDPM, Ho et al. 2020), ``q_sample``.
3. The training loss of DiffRec (Wang et al., SIGIR 2023, github.com/YiyanXu/DiffRec
   ``models/gaussian_diffusion.py``): x0- or eps-prediction, SNR reweighting (x0: SNR(t-1) - SNR(t),
   1 at t=0; the per-t weights and eps -> x0 coefficients formed in float64 as official, then stored
   float32; the loss itself is float32 where the official code multiplies in float64, a difference
   of < 1e-6 relative, see ``simulations/compare_ldiffrec.py``) and importance-sampled timesteps (pt ∝ sqrt(E[L_t^2]) over the last 10 losses of each t,
   1/1000 uniform mass, uniform until every t has 10 losses; Improved DDPM). Deviation: the history is
   a per-timestep ring buffer updated in one vectorised scatter instead of a Python loop over the batch;
   the kept set (the last 10 losses per t) and so the sampling distribution are identical.
4. A condition: the denoiser is called ``fn(x_t, t)`` without one and ``fn(x_t, t, cond=cond)`` with
   one, in training and in sampling. Classifier-free guidance (Ho & Salimans 2021): training drops
   the condition of each example with probability ``cond_drop_prob`` (or where an explicit
   ``drop_mask`` says), replacing it by the caller's null condition (a learned null embedding, a zero
   mask, a null label: anything ``torch.where`` can put in its place); sampling with
   :class:`ClassifierFreeGuidance` uses ``out = (1 + w) f(x_t, t, c) - w f(x_t, t, null)``, the
   convention of Ho & Salimans' eq. 6 (w = 0: the conditional model alone; their w is the weight on
   the difference). It is applied to the raw output (x0 or eps): since x0 and eps are affine in each
   other with weights summing to one, guiding either gives the same step.
5. Classifier guidance (Dhariwal & Nichol 2021, algorithms 1 and 2) with :class:`ClassifierGuidance`:
   g = scale * grad_x log p(y | x_t) from the caller's differentiable ``log_prob(x_t, t)`` (y is closed
   over; any differentiable log-likelihood or energy works). Ancestral steps add Sigma_t g to the
   posterior mean, Sigma_t the posterior variance beta~_t, whatever the model predicts (the mean is
   built from x0_hat either way). DDIM steps shift eps_hat <- eps_hat - sqrt(1 - alpha_bar_t) g and
   recompute x0_hat from it (for an x0-predicting model: eps_hat is first derived from x0_hat, so
   x0_hat moves by (1 - alpha_bar_t) / sqrt(alpha_bar_t) g).
6. Samplers, interchangeable objects with one call,
   ``sampler.sample(diffusion, denoise, x, generator, start=None, cond=None, guidance=None)``, reversing
   from x at step ``start`` (default T-1: x is x_T, or DiffRec's history) down to x_0:
   :class:`DDPMSampler` (ancestral: posterior mean plus posterior noise, Ho et al. 2020; ``noise=False``
   is DiffRec's inference, the posterior mean alone), :class:`DDIMSampler` (Song et al. 2021, ``eta``;
   eta = 0 deterministic, on an evenly spaced subsequence of ``steps`` steps) and :func:`few_step`,
   the few-step sampler: deterministic DDIM on k steps. ``reverse`` (DiffRec's inference from the
   history), ``generate`` (from pure noise) and ``purify`` (forward to step t*, then a guided reverse)
   run them.
7. Shapes: x is (B, d) or (B, L, d) (any (B, ...)); per-example quantities (t, the loss weights) are
   (B,) and per-t coefficients broadcast over all trailing dimensions; the loss is a per-example mean
   over them.
8. Randomness: every draw comes from an explicit ``torch.Generator``. Samplers need one whenever they
   draw (ancestral noise, DDIM with eta > 0) and refuse None, as do ``generate`` and ``purify``. The
   model-facing training and recommendation paths (``training_loss``: t, the noise, the
   condition-dropout mask; ``reverse``: a noised start, ``sampling_noise``) take ``generator=None`` to
   mean torch's global generator: the contract of ``Batch.rand is None`` and of ``Recommender.scores``
   (``fedrec/models/base.py``), whose trainers seed it per node and round (``fedrec.rng``);
   cross-device training passes every draw explicitly instead. Draws land on the device of the
   tensor they shape (``generate``: the generator's device), so a model on a GPU takes a CUDA
   generator (``fedrec.rng.torch_stream(..., device=...)``; ``global_generator(device)`` for None).

9. Graph-signal diffusion (:class:`GraphSignalDiffusion`, GiffCF: Zhu et al., SIGIR 2024,
   github.com/VinciZhu/GiffCF ``models/giff_cf.py``): a deterministic forward process that smooths
   the interaction vector over an item-item graph instead of drowning it in noise,
   z_t = x + alpha (t / T) (A x - x), t = 0..T (the first-order form of the heat equation
   dz/dt = -L z, L = I - A, that the official code uses), optionally plus Gaussian noise of std
   noise_scale * noise_decay^(T - t); its training loss (per-example *sum* of squared errors of the
   x0 prediction, t uniform in 1..T) and its DDIM-like sampler (predict x0 at z_t, re-smooth it to
   step s = t - 1 and carry the residual z_t - F_t(x0_hat) over scaled by noise_decay^(t - s)).
   The caller supplies the smoothing operator ``smooth(x) -> A x`` (row vectors) and the denoiser.

10. The forward chain drawn step by step (``GaussianDiffusion.q_chain``): x_t = sqrt(1 - beta_t)
   x_{t-1} + sqrt(beta_t) eps_t, one draw per step, with the diagonal-Gaussian log-densities
   ``log_normal_diag`` / ``log_standard_normal``: the DDGM objective of CODIGEM (Walker et al., KSEM
   2022) and RecFusion (Benedict et al. 2023) scores each transition of one such path. Schedules
   ``quadratic`` (linear in sqrt(beta) from ``noise_scale*noise_min`` to ``noise_scale*noise_max``,
   Ho et al. 2020 / RecFusion) and ``constant`` (``noise_scale*noise_min`` at every step, CODIGEM).

11. Binomial (bit-flip) diffusion of 0/1 vectors (:class:`BinomialDiffusion`, RecFusion:
   Benedict et al. 2023, github.com/gabriben/recfusion ``recfusionBin.py``): step t flips each bit
   with probability beta_t, q(x_t | x_{t-1}) = B(x_t; (1 - beta_t) x_{t-1} + beta_t (1 - x_{t-1}))
   (Sohl-Dickstein et al. 2015's binomial diffusion B(x_{t-1}(1 - b) + b/2) with b = 2 beta_t).
   Closed forms with g_t = prod_{s<=t} (1 - 2 beta_s): the marginal P(x_t = 1 | x_0) =
   g_t x_0 + (1 - g_t) / 2, and the posterior q(x_{t-1} | x_t, x_0) proportional to
   q(x_t | x_{t-1}) q(x_{t-1} | x_0); with a predicted probability x0_hat in place of x_0 this is
   D3PM's x0-parameterised reverse step (Austin et al. 2021, eq. 4: the marginal is linear in x_0).
   Its loss (``training_loss``): t uniform in 0..T-1, x_t ~ q(x_t | x_0), then the per-item mean of
   KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t, x0_hat)) for t >= 1 and of the Bernoulli NLL
   -log p(x_0 | x0_hat) at t = 0 (the ELBO's terms, one per example). Draws are uniforms
   u ~ U[0, 1): a bit is 1 where u < its probability (flips: where u < beta_t).

12. Directional (anisotropic) noise, :func:`directional_noise` (Yang et al., "Directional Diffusion
    Models for Graph Representation Learning", NeurIPS 2023; the noise DiffGT, Yi et al. 2024, puts on
    its node embeddings): eps = sgn(x0) * |mu + sigma * z|, z ~ N(0, I), where mu and sigma are the
    per-feature mean and standard deviation of the batch x0 (over every axis but the last). The noise
    keeps each coordinate's sign and the data's per-feature scale, so x_t = q_sample(x0, t, eps) drifts
    along the data's directions instead of isotropically. It is a noise *source* for ``q_sample`` /
    ``training_loss(noise=...)``; samplers still add isotropic noise where they draw.

Draw order (what a reference given "the same noise" must replay): training draws t, then the noise,
then the dropout mask; an ancestral sampler draws one ``randn(x.shape)`` per step from ``start`` down
to step 1; DDIM with eta > 0 one per step of its subsequence except the last.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence, Union

import numpy as np
import torch
from torch import nn

from fedrec.errors import ConfigError

#: ``fn(x_t, t)`` or ``fn(x_t, t, cond=cond)`` -> the predicted x0 or eps, shaped as x_t
Denoiser = Callable[..., torch.Tensor]


def betas_from_linear_variance(steps: int, variance: np.ndarray, max_beta: float = 0.999) -> np.ndarray:
    alpha_bar = 1.0 - variance
    betas = np.empty(steps, dtype=np.float64)
    betas[0] = 1.0 - alpha_bar[0]
    betas[1:] = np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], max_beta)
    return betas


#: the official ``beta_fixed`` value of the first beta (Sohl-Dickstein et al. 2015, section 2.4.1)
FIXED_FIRST_BETA = 1e-5


def make_betas(schedule: str, steps: int, noise_scale: float, noise_min: float, noise_max: float,
               beta_fixed: bool = False, first_beta: float = FIXED_FIRST_BETA) -> np.ndarray:
    """The schedule's betas in float64; ``beta_fixed`` sets the first to ``first_beta``
    (``FIXED_FIRST_BETA``, DiffRec's 1e-5; DiffKG's official code fixes it at 1e-4).

    As in the official code the override applies only when ``noise_scale != 0`` (with no noise the
    betas are never used) and after the schedule is computed: with ``linear-var`` it changes every
    alpha_bar_t, not only the first.
    """
    betas = _schedule_betas(schedule, steps, noise_scale, noise_min, noise_max)
    if beta_fixed and noise_scale != 0:
        betas[0] = first_beta
    return betas


def _schedule_betas(schedule: str, steps: int, noise_scale: float, noise_min: float, noise_max: float) -> np.ndarray:
    if schedule in ("linear", "linear-var"):
        start, end = noise_scale * noise_min, noise_scale * noise_max
        lin = np.linspace(start, end, steps, dtype=np.float64)
        return lin if schedule == "linear" else betas_from_linear_variance(steps, lin)
    if schedule == "quadratic":  # Ho et al. 2020's "quad": linear in sqrt(beta) (RecFusion's default)
        root = np.sqrt(np.array([noise_scale * noise_min, noise_scale * noise_max], dtype=np.float64))
        return np.linspace(root[0], root[1], steps, dtype=np.float64) ** 2
    if schedule == "constant":  # one beta for every step (CODIGEM's beta)
        return np.full(steps, noise_scale * noise_min, dtype=np.float64)
    if schedule == "cosine":
        s = 0.008
        f = lambda t: np.cos((t / steps + s) / (1 + s) * np.pi / 2) ** 2  # noqa: E731
        t = np.arange(steps + 1, dtype=np.float64)
        return np.minimum(1 - f(t[1:]) / f(t[:-1]), 0.999)
    raise ConfigError(f"model.noise_schedule: unknown schedule {schedule!r}; expected linear, linear-var, quadratic, constant or cosine")


# ---------------------------------------------------------------------------- shapes, draws, conditions
def expand_to(coef: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-example values (B,) viewed as (B, 1, ..., 1) so that they broadcast over all of x's trailing dims."""
    return coef.reshape(coef.shape + (1,) * (x.dim() - coef.dim()))


def per_example_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the first: (B, ...) -> (B,)."""
    return x.mean(dim=tuple(range(1, x.dim())))


def gaussian_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """N(0, I) noise shaped as x from ``generator`` (None: torch's global generator, as ``randn_like``)."""
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


def directional_noise(x0: torch.Tensor, generator: torch.Generator | None = None,
                      z: torch.Tensor | None = None, eps: float = 1e-12) -> torch.Tensor:
    """Directional noise sgn(x0) * |mu + sigma z| (item 12 of the module docstring), shaped as x0 (B, ..., d).

    mu, sigma: the per-feature mean and (unbiased) standard deviation of x0 over all axes but the last,
    treated as constants (no gradient flows through them); ``z`` an explicit N(0, I) draw, else one
    from ``generator`` (None: torch's global generator). A batch of one has no spread: sigma = 0 there.
    """
    flat = x0.detach().reshape(-1, x0.shape[-1])
    mu = flat.mean(0)
    sigma = flat.std(0) if flat.shape[0] > 1 else torch.zeros_like(mu)
    if z is None:
        z = gaussian_like(x0, generator)
    return torch.sign(x0.detach()) * (mu + sigma.clamp(min=eps) * z).abs()


def global_generator(device) -> torch.Generator:
    """torch's global generator of ``device`` (what ``generator=None`` means to torch's own functions)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.default_generators[torch.cuda.current_device() if device.index is None else device.index]
    return torch.default_generator


LOG_2PI = float(np.log(2.0 * np.pi))


def log_normal_diag(x: torch.Tensor, mean: torch.Tensor, log_var) -> torch.Tensor:
    """Elementwise log N(x; mean, exp(log_var)) (diagonal Gaussian; ``log_var`` a tensor or a number)."""
    log_var = torch.as_tensor(log_var, dtype=x.dtype, device=x.device)
    return -0.5 * LOG_2PI - 0.5 * log_var - 0.5 * torch.exp(-log_var) * (x - mean) ** 2


def log_standard_normal(x: torch.Tensor) -> torch.Tensor:
    """Elementwise log N(x; 0, 1)."""
    return -0.5 * LOG_2PI - 0.5 * x ** 2


def required(generator: torch.Generator | None, what: str) -> torch.Generator:
    if generator is None:
        raise ValueError(f"{what} draws random numbers: pass an explicit torch.Generator")
    return generator


def call_denoiser(denoise: Denoiser, x: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
    """``fn(x_t, t)`` when there is no condition, ``fn(x_t, t, cond=cond)`` when there is one."""
    return denoise(x, t) if cond is None else denoise(x, t, cond=cond)


def drop_condition(cond: Any, null_cond: Any, drop: torch.Tensor) -> Any:
    """The condition with example b replaced by ``null_cond`` where ``drop[b]`` (classifier-free training).

    ``cond`` is (B, ...); ``null_cond`` anything that broadcasts to one example's condition (a learned
    embedding, zeros, a null label); gradients reach a learned null through ``torch.where``.
    """
    null = null_cond if torch.is_tensor(null_cond) else torch.as_tensor(null_cond, dtype=cond.dtype, device=cond.device)
    return torch.where(expand_to(drop.to(torch.bool), cond), null, cond)


@dataclass(frozen=True)
class ClassifierFreeGuidance:
    """out = (1 + weight) f(x_t, t, cond) - weight f(x_t, t, null_cond) (Ho & Salimans 2021, eq. 6)."""

    weight: float
    null_cond: Any

    def __post_init__(self) -> None:
        if self.null_cond is None:
            raise ConfigError("guidance.null_cond: classifier-free guidance needs the null condition the model "
                              "was trained with")


@dataclass(frozen=True)
class ClassifierGuidance:
    """scale * grad_x log p(y | x_t), ``log_prob(x_t, t)`` -> (B,) (Dhariwal & Nichol 2021)."""

    log_prob: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    scale: float = 1.0

    def gradient(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.log_prob(xg, t).sum(), xg)
        return self.scale * grad


Guidance = Union[ClassifierFreeGuidance, ClassifierGuidance]


def split_guidance(guidance: Guidance | Sequence[Guidance] | None,
                   cond: Any) -> tuple[ClassifierFreeGuidance | None, list[ClassifierGuidance]]:
    """(the classifier-free guidance or None, the classifier guidances) of one guidance or a sequence of them.

    The null condition is broadcast to ``cond``'s batch once, so that the denoiser receives it shaped
    as in training (where ``drop_condition`` puts it in place of the dropped conditions).
    """
    if guidance is None or isinstance(guidance, (ClassifierFreeGuidance, ClassifierGuidance)):
        items = [] if guidance is None else [guidance]
    else:
        items = list(guidance)
    free = [g for g in items if isinstance(g, ClassifierFreeGuidance)]
    classifiers = [g for g in items if isinstance(g, ClassifierGuidance)]
    if len(free) > 1 or len(free) + len(classifiers) != len(items):
        raise ConfigError("guidance: at most one ClassifierFreeGuidance plus any ClassifierGuidance")
    if not free:
        return None, classifiers
    if cond is None:
        raise ConfigError("guidance: classifier-free guidance needs a condition (cond) to guide towards")
    null = free[0].null_cond
    if torch.is_tensor(cond):
        null = drop_condition(cond, null, torch.ones(cond.shape[0], dtype=torch.bool, device=cond.device))
    return replace(free[0], null_cond=null), classifiers


def classifier_gradient(classifiers: list[ClassifierGuidance], x: torch.Tensor, t: torch.Tensor) -> torch.Tensor | None:
    """The summed scaled gradients of every classifier at (x_t, t), or None without any."""
    grads = [c.gradient(x, t) for c in classifiers]
    return sum(grads[1:], grads[0]) if grads else None


class GaussianDiffusion(nn.Module):
    """Schedules, forward noising, the weighted training loss and what the samplers need.

    Parameters
    ----------
    steps : int
        Number of diffusion steps T.
    noise_schedule : str (default: "linear-var")
    noise_scale, noise_min, noise_max : float
        Schedule bounds (DiffRec's names).
    beta_fixed : bool (default: False)
        Override the first beta with ``first_beta`` (official DiffRec: on; official L-DiffRec: off).
    first_beta : float (default: ``FIXED_FIRST_BETA`` = 1e-5)
        The fixed first beta (DiffRec, G-Diff: 1e-5; DiffKG's official code: 1e-4).
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
                 beta_fixed: bool = False, first_beta: float = FIXED_FIRST_BETA):
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
        if not 0.0 < first_beta < 1.0:
            raise ConfigError(f"model.first_beta: must be in (0, 1), got {first_beta}")
        betas = make_betas(noise_schedule, steps, noise_scale, noise_min, noise_max, beta_fixed, first_beta)
        if noise_scale > 0 and not (np.all(betas > 0) and np.all(betas <= 1)):
            raise ConfigError("model.noise_*: the schedule gives betas outside (0, 1]")
        alphas = 1.0 - betas
        ac = np.cumprod(alphas)
        ac_prev = np.append(1.0, ac[:-1])
        with np.errstate(divide="ignore", invalid="ignore"):
            coef1 = betas * np.sqrt(ac_prev) / (1.0 - ac)
            coef2 = (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac)
            snr = ac / (1.0 - ac)
            posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
            # DiffRec's loss weights per t (1 at t = 0): x0: SNR(t-1) - SNR(t); eps: (1 - alpha_bar_t) /
            # ((1 - alpha_bar_{t-1})^2 (1 - beta_t)). Both are differences of nearly equal numbers for
            # DiffRec's small noise (alpha_bar ~ 1 - 1e-5), so they are formed here in float64, where the
            # official code forms them too; from float32 buffers they were off by up to 3e-6 (x0) and
            # 0.3% to 23% (eps; the cancellation in 1 - alpha_bar_{t-1}).
            weight_x0 = np.append(1.0, snr[:-1] - snr[1:])
            weight_eps = np.append(1.0, ((1.0 - ac) / ((1.0 - ac_prev) ** 2 * (1.0 - betas)))[1:])
        # Coefficients are computed in float64 (as the official code) and stored as float32.
        for name, arr in {
            "betas": betas, "alphas_cumprod": ac, "alphas_cumprod_prev": ac_prev,
            "sqrt_ac": np.sqrt(ac), "sqrt_one_minus_ac": np.sqrt(1.0 - ac),
            "sqrt_recip_ac": np.sqrt(1.0 / ac), "sqrt_recipm1_ac": np.sqrt(1.0 / ac - 1.0),
            "posterior_coef1": coef1, "posterior_coef2": coef2, "posterior_variance": posterior_variance,
            "snr": snr, "loss_weight_x0": weight_x0, "loss_weight_eps": weight_eps,
        }.items():
            self.register_buffer(name, torch.tensor(arr, dtype=torch.float32), persistent=False)
        # Importance-sampling state (persistent: it is part of a checkpoint, never aggregated).
        self.register_buffer("loss_history", torch.zeros(steps, history_per_step))
        self.register_buffer("loss_written", torch.zeros(steps, dtype=torch.long))

    # ----------------------------------------------------------------- forward process
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise, x0 of shape (B, ...), t of shape (B,)."""
        if noise is None:
            noise = gaussian_like(x0, generator)
        return expand_to(self.sqrt_ac[t], x0) * x0 + expand_to(self.sqrt_one_minus_ac[t], x0) * noise

    def q_chain(self, x0: torch.Tensor, noises: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """The forward chain drawn step by step: x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) eps_t.

        Returns [x_0', ..., x_{T-1}'] (entry t has the law of ``q_sample(x0, t)``, one Markov path of
        them); ``noises`` (T, *x0.shape) are the eps_t, else T draws of ``randn(x0.shape)`` in step order.
        The DDGM recommenders (CODIGEM, RecFusion) noise every step this way and score each transition.
        """
        if noises is None:
            noises = torch.stack([gaussian_like(x0, generator) for _ in range(self.steps)])
        if noises.shape != (self.steps,) + tuple(x0.shape):
            raise ValueError(f"q_chain: noises must be (T, *x.shape) = {(self.steps,) + tuple(x0.shape)}, got {tuple(noises.shape)}")
        keep, add = torch.sqrt(1.0 - self.betas), torch.sqrt(self.betas)
        chain, x = [], x0
        for t in range(self.steps):
            x = keep[t] * x + add[t] * noises[t]
            chain.append(x)
        return chain

    def predict_x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x0 = sqrt(1/alpha_bar_t) x_t - sqrt(1/alpha_bar_t - 1) eps, coefficients from float64 (official)."""
        return expand_to(self.sqrt_recip_ac[t], x_t) * x_t - expand_to(self.sqrt_recipm1_ac[t], x_t) * eps

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

    def sample_timesteps(self, n: int, device=None,
                         generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, p(t) * T): uniform while warming up, then importance-sampled."""
        p = self.timestep_probs()
        if p is None:
            t = torch.randint(0, self.steps, (n,), device=device, generator=generator)
            return t, torch.ones(n, device=device)
        t = torch.multinomial(p, n, replacement=True, generator=generator)
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
                      t: torch.Tensor | None = None, noise: torch.Tensor | None = None, cond: Any = None,
                      null_cond: Any = None, cond_drop_prob: float = 0.0, drop_mask: torch.Tensor | None = None,
                      generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Per-example weighted loss (already divided by the sampling probability), x0 of shape (B, ...).

        Given explicit ``t`` (uniformly drawn by the caller) and ``noise``, the loss is deterministic
        and the importance history is neither used nor updated (cross-device training). ``cond`` goes
        to the denoiser; with ``cond_drop_prob`` > 0 (or an explicit boolean ``drop_mask`` (B,)) the
        dropped examples get ``null_cond`` instead (classifier-free guidance training).
        """
        n = x0.shape[0]
        if t is None:
            t, pt = self.sample_timesteps(n, x0.device, generator)
        else:
            pt, record = torch.ones(t.shape, dtype=x0.dtype, device=x0.device), False
        if noise is None:
            noise = gaussian_like(x0, generator)
        cond = self._training_condition(cond, null_cond, cond_drop_prob, drop_mask, n, x0.device, generator)
        x_t = self.q_sample(x0, t, noise) if self.noise_scale > 0 else x0
        out = call_denoiser(denoise, x_t, t, cond)
        loss = self._weighted_loss(x0, x_t, t, noise, out)
        if record and self.training and self.importance_sampling:
            self.record_losses(t, loss)
        pred_x0 = out if self.mean_type == "x0" else self.predict_x0_from_eps(x_t, t, out)
        return {"loss": loss / pt, "pred_x0": pred_x0, "t": t}

    @staticmethod
    def _training_condition(cond, null_cond, p: float, drop_mask, n: int, device, generator):
        if not 0.0 <= p <= 1.0:
            raise ConfigError(f"model.cond_drop_prob: must be in [0, 1], got {p}")
        if cond is None or (p == 0.0 and drop_mask is None):
            return cond
        if null_cond is None:
            raise ConfigError("model.cond_drop_prob: condition dropout needs a null condition (null_cond)")
        if drop_mask is None:
            drop_mask = torch.rand(n, generator=generator, device=device) < p
        return drop_condition(cond, null_cond, drop_mask)

    def _weighted_loss(self, x0, x_t, t, noise, out) -> torch.Tensor:
        """The per-example loss before the division by p(t): MSE, SNR-reweighted (DiffRec) when ``reweight``."""
        target = x0 if self.mean_type == "x0" else noise
        mse = per_example_mean((target - out) ** 2)
        if not self.reweight:
            return mse
        if self.mean_type == "x0":
            return self.loss_weight_x0[t] * mse
        weight = self.loss_weight_eps[t]
        likelihood = per_example_mean((x0 - self.predict_x0_from_eps(x_t, t, out)) ** 2) / 2.0
        return weight * torch.where(t == 0, likelihood, mse)

    # ----------------------------------------------------------------- one reverse step's prediction
    def predict_x0(self, denoise: Denoiser, x_t: torch.Tensor, t: torch.Tensor, cond: Any = None,
                   free: ClassifierFreeGuidance | None = None) -> torch.Tensor:
        """x0_hat at (x_t, t), with classifier-free guidance on the raw output when ``free`` is given."""
        out = call_denoiser(denoise, x_t, t, cond)
        if free is not None and free.weight != 0:
            out = (1 + free.weight) * out - free.weight * call_denoiser(denoise, x_t, t, free.null_cond)
        return out if self.mean_type == "x0" else self.predict_x0_from_eps(x_t, t, out)

    # ----------------------------------------------------------------- reverse process
    def check_reaches_noise(self, what: str = "model", tol: float = 0.05) -> None:
        """Generation starts from N(0, I): x_T must carry (almost) no signal, sqrt(alpha_bar_T) <= tol."""
        signal = float(self.sqrt_ac[-1]) if self.noise_scale > 0 else 1.0
        if signal > tol:
            raise ConfigError(f"{what}.noise_*: the schedule keeps sqrt(alpha_bar_T) = {signal:.3f} of the signal at "
                              f"step T, so samples from pure noise are meaningless; use a generative schedule "
                              f"(e.g. noise_schedule=cosine, noise_scale=1) reaching <= {tol}")

    def default_sampler(self, inference_steps: int | None, noise: bool, what: str = "model") -> "Sampler":
        """All T steps (None, 0 or T): ancestral DDPM (posterior noise if ``noise``); k < T: DDIM (eta=0) on k steps."""
        T = self.steps
        k = T if inference_steps in (None, 0) else int(inference_steps)
        if not 1 <= k <= T:
            raise ConfigError(f"{what}.inference_steps: must be in 1..{T}, got {k}")
        return DDPMSampler(noise=noise) if k == T else DDIMSampler(steps=k)

    @torch.no_grad()
    def generate(self, denoise: Denoiser, shape: tuple[int, ...], generator: torch.Generator,
                 inference_steps: int | None = None, what: str = "model", cond: Any = None,
                 guidance: Guidance | Sequence[Guidance] | None = None,
                 sampler: "Sampler | None" = None) -> torch.Tensor:
        """Samples x_0 of ``shape`` by reversing the chain from x_T ~ N(0, I) drawn from ``generator``.

        Default sampler: all T steps, ancestral DDPM; fewer, DDIM (eta=0). Every draw comes from ``generator``.
        """
        self.check_reaches_noise(what)
        sampler = sampler or self.default_sampler(inference_steps, True, what)
        generator = required(generator, "generate")
        x_t = torch.randn(shape, generator=generator, device=generator.device)  # on the generator's device
        return sampler.sample(self, denoise, x_t, generator, cond=cond, guidance=guidance)

    @torch.no_grad()
    def purify(self, denoise: Denoiser, x: torch.Tensor, t_star: int, generator: torch.Generator,
               sampler: "Sampler | None" = None, cond: Any = None,
               guidance: Guidance | Sequence[Guidance] | None = None) -> torch.Tensor:
        """Diffusion purification: noise x to step ``t_star`` (q_sample), then reverse from there to x_0.

        Default sampler: ancestral DDPM. ``generator`` gives the forward noise, then the sampler's draws.
        """
        if not 0 <= t_star < self.steps:
            raise ConfigError(f"purification.t_star: must be in 0..{self.steps - 1}, got {t_star}")
        t = torch.full((x.shape[0],), t_star, dtype=torch.long, device=x.device)
        x_t = self.q_sample(x, t, gaussian_like(x, required(generator, "purify")))
        return (sampler or DDPMSampler()).sample(self, denoise, x_t, generator, start=t_star, cond=cond,
                                                guidance=guidance)

    @torch.no_grad()
    def reverse(self, denoise: Denoiser, x_start: torch.Tensor, sampling_steps: int = 0,
                inference_steps: int | None = None, sampling_noise: bool = False,
                generator: torch.Generator | None = None, cond: Any = None,
                guidance: Guidance | Sequence[Guidance] | None = None,
                sampler: "Sampler | None" = None) -> torch.Tensor:
        """DiffRec inference: start from the user's history and denoise down to t=0.

        ``sampling_steps`` > 0 first noises the history to step ``sampling_steps-1`` (official);
        0 starts from the history itself. Either way all T steps follow, from step T-1 (official).
        ``inference_steps`` None/T runs them with the posterior mean (official; plus posterior noise
        with ``sampling_noise``); fewer runs a deterministic DDIM subsequence of that length; an
        explicit ``sampler`` replaces both. ``generator`` gives the draws (a noised start, the noise);
        None is torch's global generator, as in training (``Recommender.scores`` has no generator).
        """
        T = self.steps
        if not 0 <= sampling_steps <= T:
            raise ConfigError(f"model.sampling_steps: must be in 0..{T} (model.steps), got {sampling_steps}")
        sampler = sampler or self.default_sampler(inference_steps, sampling_noise)
        generator = global_generator(x_start.device) if generator is None else generator
        n = x_start.shape[0]
        if sampling_steps == 0:
            x = x_start
        else:
            t = torch.full((n,), sampling_steps - 1, dtype=torch.long, device=x_start.device)
            x = self.q_sample(x_start, t, gaussian_like(x_start, generator))
        if self.noise_scale == 0:  # official: without noise the denoiser is applied T times
            for i in reversed(range(T)):
                x = call_denoiser(denoise, x, torch.full((n,), i, dtype=torch.long, device=x.device), cond)
            return x
        return sampler.sample(self, denoise, x, generator, cond=cond, guidance=guidance)


# ---------------------------------------------------------------------------- samplers
class Sampler:
    """One interface: ``sample(diffusion, denoise, x, generator, start=None, cond=None, guidance=None)``.

    ``x`` is the chain at step ``start`` (default T-1: x_T, or DiffRec's history); the result is x_0.
    """

    def sample(self, diffusion: GaussianDiffusion, denoise: Denoiser, x: torch.Tensor,
               generator: torch.Generator | None = None, start: int | None = None, cond: Any = None,
               guidance: Guidance | Sequence[Guidance] | None = None) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def _start(diffusion: GaussianDiffusion, start: int | None) -> int:
        if diffusion.noise_scale == 0:
            raise ConfigError("model.noise_scale: 0 has no reverse chain to sample")
        s = diffusion.steps - 1 if start is None else int(start)
        if not 0 <= s < diffusion.steps:
            raise ConfigError(f"sampler.start: must be in 0..{diffusion.steps - 1}, got {s}")
        return s


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a and b may share storage; True where storage cannot be read (vmap's batched tensors)."""
    try:
        return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    except (NotImplementedError, RuntimeError):
        return True


class DDPMSampler(Sampler):
    """Ancestral DDPM (Ho et al. 2020): x_{t-1} = mu~(x_t, x0_hat) + Sigma_t g + sqrt(beta~_t) z, z ~ N(0, I).

    ``noise=False`` drops the last term (DiffRec's inference: the posterior mean through every step).
    """

    def __init__(self, noise: bool = True):
        self.noise = bool(noise)

    @torch.no_grad()
    def sample(self, diffusion, denoise, x, generator=None, start=None, cond=None, guidance=None):
        d = diffusion
        s = self._start(d, start)
        free, classifiers = split_guidance(guidance, cond)
        if self.noise and s > 0:
            required(generator, "DDPMSampler(noise=True)")
        n = x.shape[0]
        # The chain is updated in place in one buffer of its own (the caller's x is left alone):
        # a fresh (B, n_items) tensor per step costs more than the arithmetic on the CPU (page faults).
        x = x.to(torch.float32, copy=True)
        for i in range(s, -1, -1):
            t = torch.full((n,), i, dtype=torch.long, device=x.device)
            x0 = d.predict_x0(denoise, x, t, cond, free)
            grad = classifier_gradient(classifiers, x, t)
            if _shares_memory(x0, x):  # a denoiser may hand back (a view of) its input
                x0 = x0.clone()
            # x <- coef1 x0 + coef2 x (+ Sigma g) (+ sqrt(Sigma) z), rounded as the out-of-place sum is
            x.mul_(d.posterior_coef2[i]).add_(x0.mul_(d.posterior_coef1[i]))
            if grad is not None:
                x.add_(d.posterior_variance[i] * grad)
            if self.noise and i > 0:
                x.add_(torch.sqrt(d.posterior_variance[i]) * gaussian_like(x, generator))
        return x


class DDIMSampler(Sampler):
    """DDIM (Song et al. 2021) on an evenly spaced subsequence of ``steps`` steps from ``start`` to 0.

    x_s = sqrt(alpha_bar_s) x0_hat + sqrt(1 - alpha_bar_s - sigma^2) eps_hat + sigma z, with
    sigma = eta sqrt((1 - alpha_bar_s) / (1 - alpha_bar_t)) sqrt(1 - alpha_bar_t / alpha_bar_s);
    eta = 0 is deterministic. The last step returns x0_hat. ``steps`` None: every step.
    """

    def __init__(self, steps: int | None = None, eta: float = 0.0):
        if steps is not None and int(steps) < 1:
            raise ConfigError(f"sampler.steps: must be >= 1, got {steps}")
        if eta < 0:
            raise ConfigError(f"sampler.eta: must be >= 0, got {eta}")
        self.steps = None if steps is None else int(steps)
        self.eta = float(eta)

    def timesteps(self, start: int) -> np.ndarray:
        """The visited steps, descending from ``start`` to 0."""
        k = start + 1 if self.steps is None else self.steps
        if k > start + 1:
            raise ConfigError(f"sampler.steps: must be in 1..{start + 1}, got {k}")
        return np.unique(np.linspace(0, start, k).round().astype(int))[::-1]

    @torch.no_grad()
    def sample(self, diffusion, denoise, x, generator=None, start=None, cond=None, guidance=None):
        d = diffusion
        seq = self.timesteps(self._start(d, start))
        free, classifiers = split_guidance(guidance, cond)
        if self.eta > 0 and len(seq) > 1:
            required(generator, "DDIMSampler(eta > 0)")
        n = x.shape[0]
        for j, i in enumerate(seq):
            i = int(i)
            t = torch.full((n,), i, dtype=torch.long, device=x.device)
            x0 = d.predict_x0(denoise, x, t, cond, free)
            eps = (x - d.sqrt_ac[i] * x0) / d.sqrt_one_minus_ac[i]
            grad = classifier_gradient(classifiers, x, t)
            if grad is not None:
                eps = eps - d.sqrt_one_minus_ac[i] * grad
                x0 = (x - d.sqrt_one_minus_ac[i] * eps) / d.sqrt_ac[i]
            x0, eps = self.refine(d, x, x0, eps, i)
            if j == len(seq) - 1:
                return x0
            x = self._step(d, x0, eps, i, int(seq[j + 1]), generator)
        return x

    def refine(self, d: GaussianDiffusion, x: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, i: int):
        """(x0_hat, eps_hat) at step i after guidance; a subclass may change the clean estimate here
        (e.g. backward universal guidance, Bansal et al. 2023), re-deriving eps_hat from x_t. Identity."""
        return x0, eps

    def _step(self, d: GaussianDiffusion, x0, eps, i: int, s: int, generator) -> torch.Tensor:
        if self.eta == 0:
            return d.sqrt_ac[s] * x0 + d.sqrt_one_minus_ac[s] * eps
        ac_t, ac_s = d.alphas_cumprod[i], d.alphas_cumprod[s]
        sigma = self.eta * torch.sqrt((1 - ac_s) / (1 - ac_t)) * torch.sqrt(1 - ac_t / ac_s)
        direction = torch.sqrt((1 - ac_s - sigma ** 2).clamp(min=0))
        return d.sqrt_ac[s] * x0 + direction * eps + sigma * gaussian_like(x0, generator)


def few_step(k: int) -> DDIMSampler:
    """The few-step sampler: deterministic DDIM (eta = 0) on k evenly spaced steps (Song et al. 2021, 4.2)."""
    return DDIMSampler(steps=k, eta=0.0)


# ---------------------------------------------------------------------------- graph-signal diffusion
#: ``smooth(x) -> A x`` for row vectors x (B, n_items): the graph filter of a graph-signal diffusion
Smoother = Callable[[torch.Tensor], torch.Tensor]


class GraphSignalDiffusion:
    """GiffCF's forward process, loss and sampler (item 9 of the module docstring).

    ``filter(x, ax, t) = x + alpha * t / T * (ax - x)`` with ``ax = smooth(x)`` is the official
    ``GiffCF.filter``; ``sigma(t) = noise_scale * noise_decay ** (T - t)`` its ``sigma``. Timesteps
    are integers 0..T: 0 is the data, T the most smoothed signal (official ``t = linspace(0, T, T+1)``).
    """

    def __init__(self, steps: int, alpha: float, noise_scale: float = 0.0, noise_decay: float = 0.5,
                 what: str = "model"):
        if int(steps) < 1:
            raise ConfigError(f"{what}.steps: must be >= 1, got {steps}")
        if not np.isfinite(alpha) or alpha <= 0:
            raise ConfigError(f"{what}.alpha: must be a positive number, got {alpha}")
        if noise_scale < 0:
            raise ConfigError(f"{what}.noise_scale: must be >= 0, got {noise_scale}")
        if noise_decay < 0:
            raise ConfigError(f"{what}.noise_decay: must be >= 0, got {noise_decay}")
        self.steps, self.alpha = int(steps), float(alpha)
        self.noise_scale, self.noise_decay = float(noise_scale), float(noise_decay)

    def _t(self, t, x: torch.Tensor) -> torch.Tensor:
        """t (an int or a (B,) tensor) as float32 broadcasting over x's trailing dimensions."""
        if not torch.is_tensor(t):
            return torch.tensor(float(t), dtype=x.dtype, device=x.device)
        return expand_to(t.to(x.dtype), x)

    def filter(self, x: torch.Tensor, ax: torch.Tensor, t) -> torch.Tensor:
        """The smoothed signal at step t: x + alpha (t / T) (A x - x)."""
        return x + self.alpha * self._t(t, x) / self.steps * (ax - x)

    def sigma(self, t, x: torch.Tensor) -> torch.Tensor:
        return self.noise_scale * self.noise_decay ** (self.steps - self._t(t, x))

    def q_sample(self, x0: torch.Tensor, ax0: torch.Tensor, t: torch.Tensor,
                 noise: torch.Tensor | None = None) -> torch.Tensor:
        """z_t = filter(x0, A x0, t) (+ sigma_t * noise when noise_scale > 0)."""
        z = self.filter(x0, ax0, t)
        if self.noise_scale > 0:
            if noise is None:
                raise ValueError("GraphSignalDiffusion.q_sample: noise_scale > 0 needs the noise")
            z = z + self.sigma(t, x0) * noise
        return z

    def sample_timesteps(self, n: int, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
        """t uniform in 1..T (official ``tf.random.uniform((B, 1), 1, T + 1, dtype=int32)``)."""
        return torch.randint(1, self.steps + 1, (n,), device=device, generator=generator)

    def training_loss(self, denoise: Denoiser, x0: torch.Tensor, ax0: torch.Tensor,
                      t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                      generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Per-example sum over items of (x0 - denoise(z_t, t))^2 (official ``train_step``).

        Draws t, then the noise (only when noise_scale > 0), unless given explicitly.
        """
        if t is None:
            t = self.sample_timesteps(x0.shape[0], x0.device, generator)
        if noise is None and self.noise_scale > 0:
            noise = gaussian_like(x0, generator)
        z_t = self.q_sample(x0, ax0, t, noise)
        pred = denoise(z_t, t)
        loss = ((x0 - pred) ** 2).sum(dim=tuple(range(1, x0.dim())))
        return {"loss": loss, "pred_x0": pred, "t": t}

    @torch.no_grad()
    def sample(self, denoise: Denoiser, x: torch.Tensor, smooth: Smoother,
               ax: torch.Tensor | None = None) -> torch.Tensor:
        """The official DDIM-like sampler from the user's history x (deterministic).

        z_T = filter(x, A x, T); for t = T..1, s = t - 1: x0_hat = denoise(z_t, t),
        z_s = filter(x0_hat, A x0_hat, s) + noise_decay^(t - s) (z_t - filter(x0_hat, A x0_hat, t))
        (the residual term only when noise_decay > 0, as the official code); returns z_0.
        """
        ax = smooth(x) if ax is None else ax
        z = self.filter(x, ax, self.steps)
        n = x.shape[0]
        for t in range(self.steps, 0, -1):
            s = t - 1
            x0 = denoise(z, torch.full((n,), t, dtype=torch.long, device=x.device))
            ax0 = smooth(x0)
            z_s = self.filter(x0, ax0, s)
            if self.noise_decay > 0:
                z = z_s + self.noise_decay ** (t - s) * (z - self.filter(x0, ax0, t))
            else:
                z = z_s
        return z


# ---------------------------------------------------------------------------- binomial (bit-flip) diffusion
class BinomialDiffusion(nn.Module):
    """Bit-flip diffusion of binary vectors (item 11 of the module docstring).

    ``flip`` beta_t (T,) are the per-step flip probabilities from ``schedule`` (``quadratic``,
    ``linear``, ``constant``: the official RecFusion ``get_beta_schedule`` 'quadratic' / 'linear' /
    'fixed', from ``beta_start`` to ``beta_end``), each in [0, 0.5]; ``keep_cumprod`` g_t.
    """

    def __init__(self, steps: int, schedule: str = "quadratic", beta_start: float = 1e-4, beta_end: float = 0.1,
                 what: str = "model"):
        super().__init__()
        if int(steps) < 1:
            raise ConfigError(f"{what}.steps: must be >= 1, got {steps}")
        if schedule not in ("quadratic", "linear", "constant"):
            raise ConfigError(f"{what}.schedule: expected quadratic, linear or constant, got {schedule!r}")
        flip = _schedule_betas(schedule, int(steps), 1.0, float(beta_start), float(beta_end))
        if not (np.all(flip >= 0) and np.all(flip <= 0.5)):
            raise ConfigError(f"{what}.beta_start/beta_end: flip probabilities must lie in [0, 0.5], got "
                              f"{flip.min():.4g}..{flip.max():.4g}")
        self.steps = int(steps)
        keep = np.cumprod(1.0 - 2.0 * flip)
        for name, arr in {"flip": flip, "keep_cumprod": keep, "keep_cumprod_prev": np.append(1.0, keep[:-1])}.items():
            self.register_buffer(name, torch.tensor(arr, dtype=torch.float32), persistent=False)

    @staticmethod
    def _uniform(x: torch.Tensor, u: torch.Tensor | None, generator) -> torch.Tensor:
        return torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device) if u is None else u

    def q_step(self, x_prev: torch.Tensor, t: int, u: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """One step: each bit of x_{t-1} flipped where u < beta_t (official ``make_noise``, not Jascha)."""
        flips = (self._uniform(x_prev, u, generator) < self.flip[t]).to(x_prev.dtype)
        return (1.0 - flips) * x_prev + flips * (1.0 - x_prev)

    def q_chain(self, x0: torch.Tensor, uniforms: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """[x_0', ..., x_{T-1}'] drawn step by step (one Markov path); ``uniforms`` (T, *x0.shape)."""
        chain, x = [], x0
        for t in range(self.steps):
            x = self.q_step(x, t, None if uniforms is None else uniforms[t], generator)
            chain.append(x)
        return chain

    def marginal(self, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """P(x_t = 1 | x_0) = g_t x_0 + (1 - g_t) / 2 for t (B,); x_0 may be a probability."""
        g = expand_to(self.keep_cumprod[t], x0)
        return g * x0 + 0.5 * (1.0 - g)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, u: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """x_t ~ q(x_t | x_0) in closed form: 1 where u < the marginal."""
        return (self._uniform(x0, u, generator) < self.marginal(x0, t)).to(x0.dtype)

    def posterior(self, x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """P(x_{t-1} = 1 | x_t, x_0) for t >= 1 (B,); x_0 may be a predicted probability (D3PM)."""
        b = expand_to(self.flip[t], x_t)
        g_prev = expand_to(self.keep_cumprod_prev[t], x0)
        prior1 = g_prev * x0 + 0.5 * (1.0 - g_prev)  # P(x_{t-1} = 1 | x_0)
        like1 = x_t * (1.0 - b) + (1.0 - x_t) * b  # q(x_t | x_{t-1} = 1)
        like0 = x_t * b + (1.0 - x_t) * (1.0 - b)  # q(x_t | x_{t-1} = 0)
        joint1, joint0 = prior1 * like1, (1.0 - prior1) * like0
        return joint1 / (joint1 + joint0)

    def sample_timesteps(self, n: int, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randint(0, self.steps, (n,), device=device, generator=generator)

    def training_loss(self, denoise: Denoiser, x0: torch.Tensor, t: torch.Tensor | None = None,
                      u: torch.Tensor | None = None, generator: torch.Generator | None = None,
                      eps: float = 1e-7) -> dict[str, torch.Tensor]:
        """Per-example ELBO term: mean over items of KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t,x0_hat)) at
        t >= 1, of -log p(x_0 | x0_hat) at t = 0; ``denoise(x_t, t)`` returns x0_hat in (0, 1).

        Draws t, then the uniforms of q_sample, unless given explicitly."""
        if t is None:
            t = self.sample_timesteps(x0.shape[0], x0.device, generator)
        x_t = self.q_sample(x0, t, u, generator)
        pred = denoise(x_t, t).clamp(eps, 1.0 - eps)
        nll = -(x0 * torch.log(pred) + (1.0 - x0) * torch.log(1.0 - pred))
        tp = t.clamp(min=1)  # t = 0 rows take the NLL; their posterior is computed and discarded
        q = self.posterior(x_t, x0, tp).clamp(eps, 1.0 - eps)
        p = self.posterior(x_t, pred, tp).clamp(eps, 1.0 - eps)
        kl = q * (torch.log(q) - torch.log(p)) + (1.0 - q) * (torch.log(1.0 - q) - torch.log(1.0 - p))
        per_item = torch.where(expand_to(t == 0, x0), nll, kl)
        return {"loss": per_example_mean(per_item), "pred_x0": pred, "t": t}
