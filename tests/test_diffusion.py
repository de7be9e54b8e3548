"""The Gaussian diffusion core against independent re-implementations of the official DiffRec code
(github.com/YiyanXu/DiffRec ``models/gaussian_diffusion.py``) written here, not imported, against a frozen
copy of the core as it was at c1bf102 (DiffRec must not move by a bit), and its guided samplers against
NumPy samplers written here from the formulas (DDPM, DDIM, classifier-free and classifier guidance)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedrec.errors import ConfigError
from fedrec.models import build_model
from fedrec.models.base import DataShape
from fedrec.models.diffusion import (ClassifierFreeGuidance, ClassifierGuidance, DDIMSampler, DDPMSampler,
                                     GaussianDiffusion, few_step, make_betas)


# ------------------------------------------------------------------ references
def ref_betas_from_linear_variance(steps, variance, max_beta=0.999):
    alpha_bar = 1 - variance
    betas = [1 - alpha_bar[0]]
    for i in range(1, steps):
        betas.append(min(1 - alpha_bar[i] / alpha_bar[i - 1], max_beta))
    return np.array(betas)


def ref_betas(schedule, steps, scale, lo, hi, beta_fixed=False):
    start, end = scale * lo, scale * hi
    if schedule == "linear":
        betas = np.linspace(start, end, steps, dtype=np.float64)
    elif schedule == "linear-var":
        betas = ref_betas_from_linear_variance(steps, np.linspace(start, end, steps, dtype=np.float64))
    else:  # cosine: official betas_for_alpha_bar
        f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        betas = np.array([min(1 - f((i + 1) / steps) / f(i / steps), 0.999) for i in range(steps)])
    # official GaussianDiffusion.__init__: `if noise_scale != 0.: ... if beta_fixed: betas[0] = 0.00001`
    if beta_fixed and scale != 0.0:
        betas = betas.copy()
        betas[0] = 0.00001
    return betas


def ref_alphas_cumprod(betas):
    out, acc = [], 1.0
    for b in betas:
        acc *= 1.0 - b
        out.append(acc)
    return np.array(out)


class RefHistory:
    """The official sequential Lt_history / Lt_count update (shift left and append once full)."""

    def __init__(self, steps, h=10):
        self.h = h
        self.hist = np.zeros((steps, h), dtype=np.float32)
        self.count = np.zeros(steps, dtype=np.int64)

    def update(self, ts, losses):
        for t, loss in zip(ts, losses):
            if self.count[t] == self.h:
                old = self.hist.copy()
                self.hist[t, :-1] = old[t, 1:]
                self.hist[t, -1] = loss
            else:
                self.hist[t, self.count[t]] = loss
                self.count[t] += 1

    def probs(self, uniform_prob=1e-3):
        if not (self.count == self.h).all():
            return None
        lt = np.sqrt(np.mean(self.hist.astype(np.float64) ** 2, axis=-1))
        p = lt / lt.sum()
        return p * (1 - uniform_prob) + uniform_prob / len(p)


# ------------------------------------------------------------------ (a) schedules
@pytest.mark.parametrize("steps,scale,lo,hi", [(5, 0.005, 0.005, 0.01), (40, 0.1, 1e-4, 0.02),
                                               (100, 1.0, 0.001, 0.5), (1, 0.1, 0.01, 0.01)])
@pytest.mark.parametrize("schedule", ["linear", "linear-var", "cosine"])
def test_make_betas_matches_official(schedule, steps, scale, lo, hi):
    got = make_betas(schedule, steps, scale, lo, hi)
    ref = ref_betas(schedule, steps, scale, lo, hi)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=0)


@pytest.mark.parametrize("steps,scale,lo,hi", [(40, 0.005, 0.005, 0.01), (40, 0.005, 0.005, 0.02),
                                               (5, 0.1, 1e-4, 0.02), (1, 0.1, 0.01, 0.01), (6, 0.0, 0.01, 0.02)])
@pytest.mark.parametrize("schedule", ["linear", "linear-var", "cosine"])
def test_make_betas_beta_fixed_matches_official(schedule, steps, scale, lo, hi):
    got = make_betas(schedule, steps, scale, lo, hi, beta_fixed=True)
    ref = ref_betas(schedule, steps, scale, lo, hi, beta_fixed=True)
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=0)
    if scale != 0:
        assert got[0] == 1e-5
    else:  # official: no override when there is no noise
        np.testing.assert_array_equal(got, make_betas(schedule, steps, scale, lo, hi))


@pytest.mark.parametrize("beta_fixed", [False, True])
def test_buffers_follow_beta_fixed(beta_fixed):
    """The override moves every alpha_bar_t of linear-var (not only the first) and the posterior."""
    T, scale, lo, hi = 40, 0.005, 0.005, 0.01  # DiffRec's ML-1M clean schedule
    d = GaussianDiffusion(T, "linear-var", scale, lo, hi, beta_fixed=beta_fixed)
    betas = ref_betas("linear-var", T, scale, lo, hi, beta_fixed=beta_fixed)
    ac = ref_alphas_cumprod(betas)
    ac_prev = np.append(1.0, ac[:-1])
    np.testing.assert_allclose(d.betas.double().numpy(), betas, rtol=1e-6)
    np.testing.assert_allclose(d.alphas_cumprod.double().numpy(), ac, rtol=1e-6)
    np.testing.assert_allclose(d.posterior_coef1.double().numpy(), betas * np.sqrt(ac_prev) / (1 - ac), rtol=1e-5)
    np.testing.assert_allclose(d.snr.double().numpy(), ac / (1 - ac), rtol=1e-5)


@pytest.mark.parametrize("name,expected", [("diffrec", True), ("ldiffrec", False)])
def test_model_beta_fixed_defaults_are_official(name, expected):
    """Official DiffRec/models/gaussian_diffusion.py defaults beta_fixed=True, L-DiffRec's False;
    neither main.py passes it. The yaml files must carry the same value."""
    from omegaconf import OmegaConf

    from fedrec.models import model_config

    conf = Path(__file__).resolve().parents[1] / "conf" / "model" / f"{name}.yaml"
    assert model_config({"name": name}).beta_fixed is expected
    assert OmegaConf.load(conf).beta_fixed is expected
    shape = DataShape(10, 12, item_emb=np.random.default_rng(0).standard_normal((12, 3)))
    model = build_model({"name": name, "n_cate": 1} if name == "ldiffrec" else {"name": name}, shape)
    c = model.cfg
    ref = ref_betas(c.noise_schedule, c.steps, c.noise_scale, c.noise_min, c.noise_max, beta_fixed=expected)
    np.testing.assert_allclose(model.diffusion.betas.double().numpy(), ref, rtol=1e-6)
    assert (float(model.diffusion.betas[0]) == pytest.approx(1e-5)) is expected


def test_buffers_match_official_formulas():
    d = GaussianDiffusion(8, "linear-var", 0.1, 1e-3, 0.05)
    betas = ref_betas("linear-var", 8, 0.1, 1e-3, 0.05)
    ac = ref_alphas_cumprod(betas)
    ac_prev = np.append(1.0, ac[:-1])
    np.testing.assert_allclose(d.alphas_cumprod.numpy(), ac, rtol=1e-6)
    np.testing.assert_allclose(d.posterior_coef1.numpy(), betas * np.sqrt(ac_prev) / (1 - ac), rtol=1e-5)
    np.testing.assert_allclose(d.posterior_coef2.numpy(), (1 - ac_prev) * np.sqrt(1 - betas) / (1 - ac),
                               rtol=1e-5)


# ------------------------------------------------------------------ (b) the loss history
def _random_batches(rng, steps, n_batches):
    for k in range(n_batches):
        n = int(rng.integers(1, 60))
        if k % 3 == 0:  # heavy repeats of one t (> history length in one batch)
            t = np.where(rng.random(n) < 0.7, int(rng.integers(steps)), rng.integers(0, steps, n))
        else:
            t = rng.integers(0, steps, n)
        yield t.astype(np.int64), rng.random(n).astype(np.float32) * 10


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_record_losses_matches_sequential_fifo(seed):
    steps = 6
    rng = np.random.default_rng(seed)
    d = GaussianDiffusion(steps, "linear-var", 0.1, 1e-3, 0.05)
    ref = RefHistory(steps)
    saw_big_repeat = saw_full = False
    for t, losses in _random_batches(rng, steps, 120):
        saw_big_repeat |= np.bincount(t, minlength=steps).max() > 10
        d.record_losses(torch.as_tensor(t), torch.as_tensor(losses))
        ref.update(t, losses)
        np.testing.assert_array_equal(np.minimum(d.loss_written.numpy(), 10), ref.count)
        # same multiset per timestep (unfilled slots are zeros in both)
        np.testing.assert_array_equal(np.sort(d.loss_history.numpy(), axis=1), np.sort(ref.hist, axis=1))
        p, p_ref = d.timestep_probs(), ref.probs()
        assert (p is None) == (p_ref is None)
        if p is not None:
            saw_full = True
            np.testing.assert_allclose(p.double().numpy(), p_ref, rtol=1e-5)
    assert saw_big_repeat and saw_full


def test_record_losses_one_batch_with_many_repeats():
    d = GaussianDiffusion(3, "linear-var", 0.1, 1e-3, 0.05)
    t = torch.tensor([1] * 25 + [0, 2])
    losses = torch.arange(27, dtype=torch.float32)
    d.record_losses(t, losses)
    assert sorted(d.loss_history[1].tolist()) == list(range(15, 25))  # the last 10 of t=1 win
    assert d.loss_written.tolist() == [1, 25, 1]


# ------------------------------------------------------------------ (c) timestep sampling
def test_sample_timesteps_uniform_until_full_then_importance():
    torch.manual_seed(0)
    T = 4
    d = GaussianDiffusion(T, "linear-var", 0.1, 1e-3, 0.05)
    # fill all but the last slot of t=3
    for t in range(T):
        n = 10 if t < T - 1 else 9
        d.record_losses(torch.full((n,), t), torch.full((n,), float(t + 1)))
    t, pt = d.sample_timesteps(500)
    assert torch.equal(pt, torch.ones(500))
    assert t.min() >= 0 and t.max() < T and len(set(t.tolist())) == T
    d.record_losses(torch.tensor([3]), torch.tensor([4.0]))
    assert d.history_full()
    p = d.timestep_probs()
    lt = np.arange(1, T + 1, dtype=np.float64)
    p_ref = lt / lt.sum() * (1 - 1e-3) + 1e-3 / T
    np.testing.assert_allclose(p.double().numpy(), p_ref, rtol=1e-6)
    t, pt = d.sample_timesteps(2000)
    np.testing.assert_allclose(pt.numpy(), p_ref[t.numpy()] * T, rtol=1e-6)
    freq = np.bincount(t.numpy(), minlength=T) / 2000
    np.testing.assert_allclose(freq, p_ref, atol=0.05)


def test_no_importance_sampling_stays_uniform():
    d = GaussianDiffusion(3, "linear-var", 0.1, 1e-3, 0.05, importance_sampling=False)
    d.record_losses(torch.arange(3).repeat(20), torch.rand(60))
    assert d.timestep_probs() is None
    _, pt = d.sample_timesteps(10)
    assert torch.equal(pt, torch.ones(10))


# ------------------------------------------------------------------ (d) SNR reweighting
@pytest.mark.parametrize("steps,scale,lo,hi", [(5, 0.005, 0.005, 0.01), (10, 0.1, 1e-3, 0.05)])
def test_snr_weight(steps, scale, lo, hi):
    torch.manual_seed(0)
    d = GaussianDiffusion(steps, "linear-var", scale, lo, hi, mean_type="x0", importance_sampling=False)
    x0 = torch.ones(400, 7)
    out = d.training_loss(lambda x, t: torch.zeros_like(x), x0)  # mse == 1 for every example
    ac = ref_alphas_cumprod(ref_betas("linear-var", steps, scale, lo, hi))
    snr = ac / (1 - ac)
    t = out["t"].numpy()
    assert set(t.tolist()) == set(range(steps))
    w_ref = np.where(t == 0, 1.0, snr[np.maximum(t - 1, 0)] - snr[t])
    np.testing.assert_allclose(out["loss"].double().numpy(), w_ref, rtol=1e-4)


# L-DiffRec's ML-1M schedule, DiffRec's, and the smallest noise of the official DiffRec runs
SMALL_NOISE = [(40, 0.005, 0.005, 0.02), (40, 0.005, 0.005, 0.01), (5, 0.0001, 0.0005, 0.005)]


@pytest.mark.parametrize("steps,scale,lo,hi", SMALL_NOISE)
@pytest.mark.parametrize("mean_type", ["x0", "eps"])
def test_loss_weights_match_official_float64(steps, scale, lo, hi, mean_type):
    """The per-t reweighting as the official code forms it (float64 SNR / alpha_bar differences), to float32
    rounding. Formed from float32 buffers (before session 5) x0 was off by 2.7e-6 on L-DiffRec's schedule and
    eps by 0.3% to 23% (the cancellation in 1 - alpha_bar_{t-1})."""
    d = GaussianDiffusion(steps, "linear-var", scale, lo, hi, mean_type=mean_type, importance_sampling=False)
    betas = ref_betas("linear-var", steps, scale, lo, hi)
    ac = ref_alphas_cumprod(betas)
    ac_prev = np.append(1.0, ac[:-1])
    t = np.arange(1, steps)  # t = 0 has weight 1 (and, for eps, the likelihood term)
    if mean_type == "x0":
        w_ref = ac[t - 1] / (1 - ac[t - 1]) - ac[t] / (1 - ac[t])
    else:
        w_ref = (1 - ac[t]) / ((1 - ac_prev[t]) ** 2 * (1 - betas[t]))
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(len(t), 6, generator=g)
    noise = torch.randn(len(t), 6, generator=g)
    target = x0 if mean_type == "x0" else noise
    out = d.training_loss(lambda x, tt: target - 1.0, x0, t=torch.as_tensor(t), noise=noise)  # mse == 1
    np.testing.assert_allclose(out["loss"].double().numpy(), w_ref, rtol=2e-7)


@pytest.mark.parametrize("steps,scale,lo,hi", SMALL_NOISE)
def test_predict_x0_from_eps_matches_official_float64(steps, scale, lo, hi):
    """sqrt(1/alpha_bar) x_t - sqrt(1/alpha_bar - 1) eps with float64 coefficients (official
    ``_predict_xstart_from_eps``); from float32 alpha_bar (before session 5) it was off by 3e-6 to 2e-5."""
    d = GaussianDiffusion(steps, "linear-var", scale, lo, hi, mean_type="eps")
    ac = ref_alphas_cumprod(ref_betas("linear-var", steps, scale, lo, hi))
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(steps, 8, generator=g), torch.randn(steps, 8, generator=g)
    t = torch.arange(steps)
    ref = np.sqrt(1 / ac)[:, None] * x.double().numpy() - np.sqrt(1 / ac - 1)[:, None] * eps.double().numpy()
    got = d.predict_x0_from_eps(x, t, eps).double().numpy()
    assert np.abs(got - ref).max() <= 3e-7 * np.abs(ref).max()


def test_no_reweight_is_plain_mse():
    d = GaussianDiffusion(5, "linear-var", 0.1, 1e-3, 0.05, reweight=False, importance_sampling=False)
    out = d.training_loss(lambda x, t: torch.zeros_like(x), torch.full((20, 3), 2.0))
    assert torch.allclose(out["loss"], torch.full((20,), 4.0))


def test_training_loss_divides_by_pt_and_records_unweighted_by_pt():
    torch.manual_seed(0)
    T = 3
    d = GaussianDiffusion(T, "linear-var", 0.1, 1e-3, 0.05, reweight=False)
    for t in range(T):
        d.record_losses(torch.full((10,), t), torch.full((10,), float(t + 1)))
    x0 = torch.full((50, 4), 2.0)
    out = d.training_loss(lambda x, t: torch.zeros_like(x), x0)  # mse == 4
    ref_p = np.array([1.0, 2.0, 3.0]) / 6 * (1 - 1e-3) + 1e-3 / T
    t = out["t"].numpy()
    np.testing.assert_allclose(out["loss"].numpy(), 4.0 / (ref_p[t] * T), rtol=1e-5)
    # the history received the loss before the division (official: reweight_loss)
    assert set(np.unique(d.loss_history.numpy()).tolist()) <= {1.0, 2.0, 3.0, 4.0}
    assert (d.loss_history == 4.0).any()


# ------------------------------------------------------------------ (e) forward process
def test_q_sample_closed_form():
    T = 10
    d = GaussianDiffusion(T, "linear-var", 0.1, 1e-3, 0.05)
    ac = ref_alphas_cumprod(ref_betas("linear-var", T, 0.1, 1e-3, 0.05))
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(T, 6, generator=g)
    noise = torch.randn(T, 6, generator=g)
    t = torch.arange(T)
    got = d.q_sample(x0, t, noise).double().numpy()
    ref = np.sqrt(ac)[:, None] * x0.double().numpy() + np.sqrt(1 - ac)[:, None] * noise.double().numpy()
    np.testing.assert_allclose(got, ref, atol=1e-6)


# ------------------------------------------------------------------ (f) samplers
class Counting:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, x, t):
        self.calls += 1
        return self.fn(x, t)


def _fixed_net(n):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(n, n, generator=g) * 0.3
    return lambda x, t: torch.tanh(x @ w + 0.01 * t.float()[:, None])


def test_posterior_path_equals_official_loop():
    T, n = 7, 5
    d = GaussianDiffusion(T, "linear-var", 0.1, 1e-3, 0.05)
    betas = ref_betas("linear-var", T, 0.1, 1e-3, 0.05)
    ac = ref_alphas_cumprod(betas)
    ac_prev = np.append(1.0, ac[:-1])
    c1 = betas * np.sqrt(ac_prev) / (1 - ac)
    c2 = (1 - ac_prev) * np.sqrt(1 - betas) / (1 - ac)
    net = _fixed_net(n)
    x0 = torch.rand(4, n)
    x = x0.double()
    for i in reversed(range(T)):
        x = c1[i] * net(x.float(), torch.full((4,), i)).double() + c2[i] * x
    for k in (None, 0, T):
        got = d.reverse(net, x0, inference_steps=k).double()
        assert torch.allclose(got, x, atol=1e-5), k


@pytest.mark.parametrize("k", [1, 2, 3, 5, 6])
def test_ddim_runs_exactly_k_denoiser_calls(k):
    T, n = 7, 5
    d = GaussianDiffusion(T, "linear-var", 0.1, 1e-3, 0.05)
    net = Counting(_fixed_net(n))
    out = d.reverse(net, torch.rand(3, n), inference_steps=k)
    assert net.calls == k
    assert out.shape == (3, n) and torch.isfinite(out).all()


def test_full_path_runs_T_calls():
    d = GaussianDiffusion(7, "linear-var", 0.1, 1e-3, 0.05)
    net = Counting(_fixed_net(5))
    d.reverse(net, torch.rand(3, 5))
    assert net.calls == 7


@pytest.mark.parametrize("mean_type", ["x0", "eps"])
@pytest.mark.parametrize("k", [None, 1, 3, 7])
@pytest.mark.parametrize("sampling_steps", [0, 4])
def test_perfect_denoiser_recovers_x0(mean_type, k, sampling_steps):
    torch.manual_seed(0)
    T, n = 7, 6
    d = GaussianDiffusion(T, "linear-var", 0.1, 1e-3, 0.05, mean_type=mean_type)
    x0 = (torch.rand(5, n) < 0.4).float()
    x_start = torch.rand(5, n)  # anything: a perfect denoiser knows x0

    def perfect(x_t, t):
        if mean_type == "x0":
            return x0
        # the float64-derived coefficients (float32 1 - alpha_bar cancels; 1e-4 here)
        return (x_t - d.sqrt_ac[t].unsqueeze(-1) * x0) / d.sqrt_one_minus_ac[t].unsqueeze(-1)

    got = d.reverse(perfect, x_start, sampling_steps=sampling_steps, inference_steps=k)
    assert torch.allclose(got, x0, atol=1e-5), float((got - x0).abs().max())


def test_zero_noise_scale_applies_denoiser_T_times():
    d = GaussianDiffusion(4, "linear-var", 0.0, 1e-3, 0.05)
    net = Counting(lambda x, t: x + 1)
    out = d.reverse(net, torch.zeros(2, 3))
    assert net.calls == 4 and torch.equal(out, torch.full((2, 3), 4.0))


# ------------------------------------------------------------------ (g) bad configs
@pytest.mark.parametrize("kwargs,key", [
    ({"steps": 0}, "model.steps"),
    ({"steps": 5, "noise_min": 0.1, "noise_max": 0.01}, "model.noise_min"),
    ({"steps": 5, "noise_schedule": "sigmoid"}, "model.noise_schedule"),
    ({"steps": 5, "mean_type": "v"}, "model.mean_type"),
])
def test_bad_diffusion_config_names_key(kwargs, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        GaussianDiffusion(**kwargs)


def test_make_betas_unknown_schedule():
    with pytest.raises(ConfigError, match=r"model\.noise_schedule"):
        make_betas("nope", 5, 0.1, 0.001, 0.01)


@pytest.mark.parametrize("kwargs,key", [
    ({"inference_steps": 6}, "model.inference_steps"),
    ({"inference_steps": -1}, "model.inference_steps"),
    ({"sampling_steps": 6}, "model.sampling_steps"),
])
def test_bad_inference_config_at_reverse(kwargs, key):
    d = GaussianDiffusion(5, "linear-var", 0.1, 1e-3, 0.05)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        d.reverse(lambda x, t: x, torch.zeros(2, 3), **kwargs)


@pytest.mark.parametrize("name", ["diffrec", "ldiffrec"])
@pytest.mark.parametrize("kwargs,key", [
    ({"steps": 0}, "model.steps"),
    ({"noise_min": 0.5, "noise_max": 0.1}, "model.noise_min"),
    ({"noise_schedule": "sigmoid"}, "model.noise_schedule"),
])
def test_bad_model_config_at_build(name, kwargs, key):
    cfg = {"name": name, "steps": 5, **kwargs}
    shape = DataShape(10, 12, item_emb=np.random.default_rng(0).standard_normal((12, 3)))
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_model(cfg, shape)


@pytest.mark.parametrize("name", ["diffrec", "ldiffrec"])
@pytest.mark.parametrize("kwargs,key", [
    ({"inference_steps": 6}, "model.inference_steps"),
    ({"sampling_steps": 6}, "model.sampling_steps"),
    ({"sampling_steps": -1}, "model.sampling_steps"),
])
def test_bad_inference_config_at_build(name, kwargs, key):
    cfg = {"name": name, "steps": 5, **kwargs}
    shape = DataShape(10, 12, item_emb=np.random.default_rng(0).standard_normal((12, 3)))
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_model(cfg, shape)


# ------------------------------------------------------------------ (h) DiffRec unchanged: a frozen copy of c1bf102
def frozen_training_loss(d, denoise, x0, record=True, t=None, noise=None):
    """``GaussianDiffusion.training_loss`` (with ``sample_timesteps``) as it was at c1bf102, verbatim logic,
    except the per-t loss weights and the eps -> x0 coefficients, which are formed in float64 since session 5
    (as official; ``test_loss_weights_match_official_float64``)."""
    n = x0.shape[0]
    if t is None:
        p = d.timestep_probs()
        if p is None:
            t, pt = torch.randint(0, d.steps, (n,)), torch.ones(n)
        else:
            t = torch.multinomial(p, n, replacement=True)
            pt = p[t] * d.steps
    else:
        pt, record = torch.ones(t.shape, dtype=x0.dtype), False
    if noise is None:
        noise = torch.randn_like(x0)
    x_t = d.sqrt_ac[t].unsqueeze(-1) * x0 + d.sqrt_one_minus_ac[t].unsqueeze(-1) * noise if d.noise_scale > 0 else x0
    out = denoise(x_t, t)

    def x0_from_eps(eps):
        return d.sqrt_recip_ac[t].unsqueeze(-1) * x_t - d.sqrt_recipm1_ac[t].unsqueeze(-1) * eps

    target = x0 if d.mean_type == "x0" else noise
    mse = ((target - out) ** 2).mean(dim=-1)
    if d.reweight:
        if d.mean_type == "x0":
            loss = d.loss_weight_x0[t] * mse
        else:
            weight = d.loss_weight_eps[t]
            likelihood = ((x0 - x0_from_eps(out)) ** 2).mean(dim=-1) / 2.0
            loss = weight * torch.where(t == 0, likelihood, mse)
    else:
        loss = mse
    if record and d.training and d.importance_sampling:
        d.record_losses(t, loss)
    return {"loss": loss / pt, "pred_x0": out if d.mean_type == "x0" else x0_from_eps(out), "t": t}


@torch.no_grad()
def frozen_reverse(d, denoise, x_start, sampling_steps=0, inference_steps=None, sampling_noise=False):
    """``GaussianDiffusion.reverse`` as it was at c1bf102 (draws from torch's global generator), except the
    eps -> x0 coefficients (float64 since session 5, as official)."""
    T, n = d.steps, x_start.shape[0]
    x = x_start
    if sampling_steps:
        t = torch.full((n,), sampling_steps - 1, dtype=torch.long)
        x = d.sqrt_ac[t].unsqueeze(-1) * x_start + d.sqrt_one_minus_ac[t].unsqueeze(-1) * torch.randn_like(x_start)

    def x0_hat(x, t):
        out = denoise(x, t)
        if d.mean_type == "x0":
            return out
        return d.sqrt_recip_ac[t].unsqueeze(-1) * x - d.sqrt_recipm1_ac[t].unsqueeze(-1) * out

    k = T if inference_steps in (None, 0) else int(inference_steps)
    if k == T:
        for i in reversed(range(T)):
            x0 = x0_hat(x, torch.full((n,), i, dtype=torch.long))
            mean = d.posterior_coef1[i] * x0 + d.posterior_coef2[i] * x
            if sampling_noise and i > 0:
                var = d.betas[i] * (1 - d.alphas_cumprod_prev[i]) / (1 - d.alphas_cumprod[i])
                mean = mean + torch.sqrt(var) * torch.randn_like(x)
            x = mean
        return x
    seq = np.unique(np.linspace(0, T - 1, k).round().astype(int))[::-1]
    for j, i in enumerate(seq):
        x0 = x0_hat(x, torch.full((n,), int(i), dtype=torch.long))
        if j == len(seq) - 1:
            return x0
        s = int(seq[j + 1])
        eps = (x - d.sqrt_ac[i] * x0) / d.sqrt_one_minus_ac[i]
        x = d.sqrt_ac[s] * x0 + d.sqrt_one_minus_ac[s] * eps


def _diffrec(**over):
    torch.manual_seed(0)
    model = build_model({"name": "diffrec", "dims": [32, 64], **over}, DataShape(64, 300))  # steps: T = 40
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(64, 300, generator=g) < 0.05).float()
    return model, x


@pytest.mark.parametrize("over", [{}, {"inference_steps": 7}, {"sampling_steps": 10}, {"mean_type": "eps"},
                                  {"mean_type": "eps", "inference_steps": 3}])
def test_diffrec_scores_bit_identical_to_c1bf102_reverse(over):
    model, x = _diffrec(**over)
    model.eval()
    c = model.cfg
    torch.manual_seed(5)  # the noised start (sampling_steps > 0) draws from the global generator, then as now
    ref = frozen_reverse(model.diffusion, model.denoiser, x, c.sampling_steps, c.inference_steps)
    torch.manual_seed(5)
    got = model.scores(type("B", (), {"x": x})())
    assert torch.equal(got, ref)


def test_diffrec_sampling_noise_matches_c1bf102_reverse():
    """With posterior noise: the same draws; the posterior variance is now computed in float64 (as the
    official code) where c1bf102 computed 1 - alpha_bar in float32, so the noise term moves by < 0.2%."""
    model, x = _diffrec(sampling_noise=True)
    model.eval()
    torch.manual_seed(5)
    ref = frozen_reverse(model.diffusion, model.denoiser, x, 0, None, sampling_noise=True)
    torch.manual_seed(5)
    got = model.diffusion.reverse(model.denoiser, x, 0, None, sampling_noise=True)
    noise_effect = (ref - frozen_reverse(model.diffusion, model.denoiser, x)).abs().max()
    assert noise_effect > 1e-3
    assert (got - ref).abs().max() < 2e-3 * noise_effect


@pytest.mark.parametrize("mean_type,reweight", [("x0", True), ("eps", True), ("x0", False)])
def test_training_loss_and_importance_history_bit_identical_to_c1bf102(mean_type, reweight):
    """30 importance-sampled steps from the same global seed: same t, losses, history and gradients."""
    model, x = _diffrec(mean_type=mean_type, reweight=reweight, steps=5)
    model.train()
    old = copy.deepcopy(model)
    for step in range(30):
        rows = slice(step % 4 * 16, step % 4 * 16 + 16)
        torch.manual_seed(100 + step)  # the denoiser's dropout and the core's draws
        new_out = model.diffusion.training_loss(model.denoiser, x[rows])
        torch.manual_seed(100 + step)
        old_out = frozen_training_loss(old.diffusion, old.denoiser, x[rows])
        for key in ("loss", "pred_x0", "t"):
            assert torch.equal(new_out[key], old_out[key]), (step, key)
    assert model.diffusion.history_full()  # the importance-sampled branch ran
    assert torch.equal(model.diffusion.loss_history, old.diffusion.loss_history)
    assert torch.equal(model.diffusion.loss_written, old.diffusion.loss_written)
    new_out["loss"].mean().backward()
    old_out["loss"].mean().backward()
    for p, q in zip(model.denoiser.parameters(), old.denoiser.parameters()):
        assert torch.equal(p.grad, q.grad)


# ------------------------------------------------------------------ (i) a toy 2-D conditional problem, NumPy samplers
MUS = np.array([[-1.0, 0.5], [1.0, -0.5]])  # the two clusters; the condition (one-hot) picks one
SPREAD = 0.4  # each cluster is N(mu_c, SPREAD^2 I)


def np_cluster_eps(x, ab, mu):
    """E[eps | x_t] when x0 ~ N(mu, s^2 I): x_t ~ N(sqrt(ab) mu, v I), v = ab s^2 + 1 - ab."""
    v = ab * SPREAD ** 2 + 1 - ab
    return np.sqrt(1 - ab) / v * (x - np.sqrt(ab) * mu)


def np_toy_eps(x, ab, onehot):
    """The exact eps-denoiser: the picked cluster's, or under the null (all-zero) condition the mixture's."""
    cond = np_cluster_eps(x, ab, onehot @ MUS)
    v = ab * SPREAD ** 2 + 1 - ab
    logits = np.stack([-((x - np.sqrt(ab) * m) ** 2).sum(1) / (2 * v) for m in MUS], 1)
    r = np.exp(logits - logits.max(1, keepdims=True))
    r /= r.sum(1, keepdims=True)
    mix = sum(r[:, k:k + 1] * np_cluster_eps(x, ab, MUS[k]) for k in range(2))
    return np.where(onehot.sum(1, keepdims=True) > 0, cond, mix)


def torch_toy(d, mean_type="eps"):
    """The same denoiser in torch, on the core's (x_t, t, cond=...) call; x0-prediction by conversion."""
    mus = torch.tensor(MUS, dtype=torch.float32)

    def cluster_eps(x, ab, mu):
        v = ab * SPREAD ** 2 + 1 - ab
        return torch.sqrt(1 - ab) / v * (x - torch.sqrt(ab) * mu)

    def fn(x, t, cond):
        ab = d.alphas_cumprod[t][:, None]
        v = ab * SPREAD ** 2 + 1 - ab
        logits = torch.stack([-((x - torch.sqrt(ab) * m) ** 2).sum(1) / (2 * v[:, 0]) for m in mus], 1)
        r = torch.softmax(logits, 1)
        mix = sum(r[:, k:k + 1] * cluster_eps(x, ab, mus[k]) for k in range(2))
        eps = torch.where(cond.sum(1, keepdim=True) > 0, cluster_eps(x, ab, cond @ mus), mix)
        return eps if mean_type == "eps" else (x - torch.sqrt(1 - ab) * eps) / torch.sqrt(ab)
    return fn


def np_schedule(T):
    betas = ref_betas("linear", T, 1.0, 1e-4, 0.2)
    ac = ref_alphas_cumprod(betas)
    return betas, ac, np.append(1.0, ac[:-1])


def np_logistic_grad(x, a, b):
    """grad_x log sigmoid(a.x + b) = (1 - sigmoid(a.x + b)) a."""
    return (1 - 1 / (1 + np.exp(-(x @ a + b))))[:, None] * a[None]


def np_guided_eps(x, ab, onehot, w):
    """Classifier-free guidance: (1 + w) eps(x, c) - w eps(x, null)."""
    return (1 + w) * np_toy_eps(x, ab, onehot) - w * np_toy_eps(x, ab, np.zeros_like(onehot))


def np_ddpm(x, noise, onehot, w, T, clf=None):
    """Ancestral DDPM from the formulas: x0_hat from eps, the posterior mean, + Sigma g, + sqrt(beta~) z."""
    betas, ac, ac_prev = np_schedule(T)
    for i in range(T - 1, -1, -1):
        eps = np_guided_eps(x, ac[i], onehot, w)
        x0 = (x - np.sqrt(1 - ac[i]) * eps) / np.sqrt(ac[i])
        c1 = betas[i] * np.sqrt(ac_prev[i]) / (1 - ac[i])
        c2 = (1 - ac_prev[i]) * np.sqrt(1 - betas[i]) / (1 - ac[i])
        mean = c1 * x0 + c2 * x
        var = betas[i] * (1 - ac_prev[i]) / (1 - ac[i])
        if clf is not None:
            mean = mean + var * clf[2] * np_logistic_grad(x, clf[0], clf[1])
        x = mean + (np.sqrt(var) * noise[T - 1 - i] if i > 0 else 0)
    return x


def np_ddim(x, noise, onehot, w, T, seq, eta, clf=None):
    """DDIM from the formulas on the subsequence ``seq`` (descending to 0); the last step returns x0_hat."""
    _, ac, _ = np_schedule(T)
    for j, i in enumerate(seq):
        eps = np_guided_eps(x, ac[i], onehot, w)
        if clf is not None:
            eps = eps - np.sqrt(1 - ac[i]) * clf[2] * np_logistic_grad(x, clf[0], clf[1])
        x0 = (x - np.sqrt(1 - ac[i]) * eps) / np.sqrt(ac[i])
        if j == len(seq) - 1:
            return x0
        s = seq[j + 1]
        sigma = eta * np.sqrt((1 - ac[s]) / (1 - ac[i])) * np.sqrt(1 - ac[i] / ac[s])
        x = np.sqrt(ac[s]) * x0 + np.sqrt(1 - ac[s] - sigma ** 2) * eps + (sigma * noise[j] if eta else 0)


def one_hot(labels):
    return torch.nn.functional.one_hot(labels, 2).float()


def _toy(T=30, n=64, mean_type="eps", seed=0):
    """The diffusion (the schedule of ``np_schedule``), alternating conditions (B, 2) and the generator."""
    d = GaussianDiffusion(T, "linear", 1.0, 1e-4, 0.2, mean_type=mean_type)
    return d, one_hot(torch.arange(n) % 2), torch.Generator().manual_seed(seed)


def _replay(seed, n_draws, shape):
    """The draws the core makes from generator ``seed`` (x_T first, then one per noisy step), as NumPy."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).double().numpy() for _ in range(n_draws)]


@pytest.mark.parametrize("w", [0.0, 1.5, 4.0])
@pytest.mark.parametrize("mean_type", ["eps", "x0"])
def test_cfg_ddpm_on_toy_matches_numpy_given_the_same_noise(w, mean_type):
    T, n = 30, 64
    d, onehot, g = _toy(T, n, mean_type)
    x_T = torch.randn((n, 2), generator=g)
    guidance = ClassifierFreeGuidance(w, torch.zeros(2))
    got = DDPMSampler().sample(d, torch_toy(d, mean_type), x_T, g, cond=onehot, guidance=guidance)
    draws = _replay(0, T, (n, 2))  # x_T, then z for steps T-1..1
    ref = np_ddpm(draws[0], draws[1:], onehot.double().numpy(), w, T)
    np.testing.assert_allclose(got.double().numpy(), ref, atol=2e-4, rtol=0)
    if w:  # the weight moves the samples, and the other common convention u + w (c - u) would be seen
        unguided = np_ddpm(draws[0], draws[1:], onehot.double().numpy(), 0.0, T)
        other_convention = np_ddpm(draws[0], draws[1:], onehot.double().numpy(), w - 1.0, T)
        assert np.abs(unguided - ref).max() > 0.1 and np.abs(other_convention - ref).max() > 0.01  # >> 2e-4


def test_ddpm_on_toy_samples_the_conditional_clusters():
    """w = 0 with the exact denoiser: samples of condition c are N(mu_c, SPREAD^2 I) (up to the
    discretisation of 400 steps); guidance pushes them away from the other cluster."""
    n = 4000
    d = GaussianDiffusion(400, "linear", 1.0, 1e-4, 0.04, mean_type="eps")  # sqrt(alpha_bar_T) = 0.017
    onehot, g = one_hot(torch.arange(n) % 2), torch.Generator().manual_seed(0)
    x_T = torch.randn((n, 2), generator=g)
    fn = torch_toy(d)
    plain = DDPMSampler().sample(d, fn, x_T, g, cond=onehot).double().numpy()
    free = ClassifierFreeGuidance(3.0, torch.zeros(2))
    guided = DDPMSampler().sample(d, fn, x_T, g, cond=onehot, guidance=free).double().numpy()
    for c in (0, 1):
        rows = np.arange(n) % 2 == c
        np.testing.assert_allclose(plain[rows].mean(0), MUS[c], atol=0.03)
        np.testing.assert_allclose(plain[rows].std(0), SPREAD, rtol=0.07)
        other = MUS[1 - c]
        assert np.linalg.norm(guided[rows] - other, axis=1).mean() > np.linalg.norm(plain[rows] - other, axis=1).mean()


@pytest.mark.parametrize("k,eta", [(30, 0.0), (8, 0.0), (1, 0.0), (8, 0.7)])
@pytest.mark.parametrize("w", [0.0, 2.0])
def test_cfg_ddim_on_toy_matches_numpy(k, eta, w):
    T, n = 30, 64
    d, onehot, g = _toy(T, n, seed=3)
    x_T = torch.randn((n, 2), generator=g)
    sampler = DDIMSampler(steps=k, eta=eta)
    got = sampler.sample(d, torch_toy(d), x_T, g, cond=onehot, guidance=ClassifierFreeGuidance(w, torch.zeros(2)))
    seq = [int(i) for i in np.unique(np.linspace(0, T - 1, k).round().astype(int))[::-1]]
    assert len(seq) == k
    draws = _replay(3, 1 + (k - 1 if eta else 0), (n, 2))
    ref = np_ddim(draws[0], draws[1:], onehot.double().numpy(), w, T, seq, eta)
    np.testing.assert_allclose(got.double().numpy(), ref, atol=2e-4, rtol=0)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "ddim-eta"])
@pytest.mark.parametrize("mean_type", ["eps", "x0"])
def test_classifier_guidance_matches_numpy_with_an_analytic_classifier(sampler, mean_type):
    """log p(y=1 | x_t) = log sigmoid(a.x + b), its gradient in closed form on the NumPy side."""
    T, n, scale = 30, 64, 2.5
    a, b = np.array([1.5, -0.5]), 0.3
    d, onehot, g = _toy(T, n, mean_type, seed=7)
    x_T = torch.randn((n, 2), generator=g)
    at = torch.tensor(a, dtype=torch.float32)
    guide = ClassifierGuidance(lambda x, t: torch.nn.functional.logsigmoid(x @ at + b), scale)
    null = np.zeros((n, 2))
    fn = torch_toy(d, mean_type)
    if sampler == "ddpm":
        got = DDPMSampler().sample(d, fn, x_T, g, cond=torch.zeros(n, 2), guidance=guide)
        draws = _replay(7, T, (n, 2))
        ref = np_ddpm(draws[0], draws[1:], null, 0.0, T, clf=(a, b, scale))
        unguided = np_ddpm(draws[0], draws[1:], null, 0.0, T)
    else:
        eta = 0.5 if sampler == "ddim-eta" else 0.0
        seq = [int(i) for i in np.unique(np.linspace(0, T - 1, 10).round().astype(int))[::-1]]
        got = DDIMSampler(10, eta).sample(d, fn, x_T, g, cond=torch.zeros(n, 2), guidance=guide)
        draws = _replay(7, 1 + (9 if eta else 0), (n, 2))
        ref = np_ddim(draws[0], draws[1:], null, 0.0, T, seq, eta, clf=(a, b, scale))
        unguided = np_ddim(draws[0], draws[1:], null, 0.0, T, seq, eta)
    np.testing.assert_allclose(got.double().numpy(), ref, atol=2e-4, rtol=0)
    assert (ref @ a + b > 0).mean() > (unguided @ a + b > 0).mean()  # pushed towards y = 1


def test_classifier_free_and_classifier_guidance_combine():
    T, n = 30, 64
    a, b, scale, w = np.array([1.5, -0.5]), 0.3, 1.5, 2.0
    d, onehot, g = _toy(T, n, seed=11)
    x_T = torch.randn((n, 2), generator=g)
    at = torch.tensor(a, dtype=torch.float32)
    both = [ClassifierFreeGuidance(w, torch.zeros(2)),
            ClassifierGuidance(lambda x, t: torch.nn.functional.logsigmoid(x @ at + b), scale)]
    got = DDPMSampler().sample(d, torch_toy(d), x_T, g, cond=onehot, guidance=both)
    draws = _replay(11, T, (n, 2))
    ref = np_ddpm(draws[0], draws[1:], onehot.double().numpy(), w, T, clf=(a, b, scale))
    np.testing.assert_allclose(got.double().numpy(), ref, atol=2e-4, rtol=0)
    with pytest.raises(ConfigError, match="guidance"):
        DDPMSampler().sample(d, torch_toy(d), x_T, g, cond=onehot, guidance=[both[0], both[0]])


# ------------------------------------------------------------------ (j) condition dropout in training
def _recording(out_fn=lambda x: x * 0.5):
    seen = []

    def fn(x, t, cond=None):
        seen.append(cond)
        return out_fn(x)
    return fn, seen


def test_condition_dropout_draws_its_mask_after_t_and_noise():
    d = GaussianDiffusion(5, "linear-var", 0.1, 1e-3, 0.05, importance_sampling=False)
    x0, cond = torch.rand(200, 3), torch.randn(200, 4)
    null = torch.full((4,), 9.0)
    fn, seen = _recording()
    d.training_loss(fn, x0, cond=cond, null_cond=null, cond_drop_prob=0.3, generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(2)
    torch.randint(0, 5, (200,), generator=g)
    torch.randn((200, 3), generator=g)
    drop = torch.rand(200, generator=g) < 0.3
    assert 30 < int(drop.sum()) < 90
    expected = torch.where(drop[:, None], null, cond)
    assert torch.equal(seen[0], expected)


def test_condition_dropout_explicit_mask_learned_null_and_no_dropout():
    d = GaussianDiffusion(5, "linear-var", 0.1, 1e-3, 0.05, importance_sampling=False)
    x0, cond = torch.rand(6, 3), torch.randn(6, 2, 4)  # a (B, L, d) condition, e.g. a history
    null = torch.zeros(4, requires_grad=True)
    mask = torch.tensor([True, False, False, True, False, False])
    fn, seen = _recording(lambda x: x * 0.5)

    def cond_fn(x, t, cond):
        seen.append(cond)
        return x * 0.5 + cond.sum((1, 2))[:, None]
    out = d.training_loss(cond_fn, x0, t=torch.arange(6) % 5, noise=torch.zeros(6, 3), cond=cond, null_cond=null,
                          drop_mask=mask)
    assert torch.equal(seen[0][mask], torch.zeros(2, 2, 4)) and torch.equal(seen[0][~mask], cond[~mask])
    out["loss"].sum().backward()
    assert null.grad is not None and bool(null.grad.abs().sum() > 0)  # the learned null embedding trains
    state = torch.get_rng_state()
    g = torch.Generator().manual_seed(0)
    before = g.get_state()
    d.training_loss(fn, x0, t=torch.zeros(6, dtype=torch.long), noise=torch.zeros(6, 3), cond=cond, generator=g)
    assert seen[-1] is cond and torch.equal(g.get_state(), before) and torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("kwargs,key", [({"cond_drop_prob": 1.5, "null_cond": 0.0}, "model.cond_drop_prob"),
                                        ({"cond_drop_prob": 0.2}, "model.cond_drop_prob")])
def test_condition_dropout_bad_config(kwargs, key):
    d = GaussianDiffusion(5, "linear-var", 0.1, 1e-3, 0.05)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        d.training_loss(lambda x, t, cond: x, torch.rand(4, 3), cond=torch.rand(4, 2), **kwargs)


# ------------------------------------------------------------------ (k) shapes (B, d) and (B, L, d)
def _rowwise(x, t, cond=None):
    """A denoiser acting elementwise: its output does not depend on how a row's values are laid out."""
    out = torch.tanh(0.7 * x + 0.05 * expand(t.float(), x))
    return out if cond is None else out + 0.1 * cond


def expand(v, x):
    return v.reshape(-1, *([1] * (x.dim() - 1)))


@pytest.mark.parametrize("mean_type", ["x0", "eps"])
def test_sequence_shaped_x_equals_the_flattened_rows(mean_type):
    B, L, dim, T = 3, 4, 5, 6  # B != L: a coefficient broadcast on the last dim only would fail here
    d = GaussianDiffusion(T, "linear", 1.0, 1e-3, 0.3, mean_type=mean_type)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(B, L, dim, generator=g), torch.randn(B, L, dim, generator=g)
    t = torch.tensor([0, 3, 5])
    flat = lambda v: v.reshape(B, L * dim)  # noqa: E731
    assert torch.equal(flat(d.q_sample(x0, t, noise)), d.q_sample(flat(x0), t, flat(noise)))
    seq_out = d.training_loss(_rowwise, x0, t=t, noise=noise)
    flat_out = d.training_loss(_rowwise, flat(x0), t=t, noise=flat(noise))
    assert seq_out["loss"].shape == (B,)
    torch.testing.assert_close(seq_out["loss"], flat_out["loss"], rtol=1e-6, atol=0)
    torch.testing.assert_close(flat(seq_out["pred_x0"]), flat_out["pred_x0"])
    d.train()
    assert d.training_loss(_rowwise, x0, generator=torch.Generator().manual_seed(1))["loss"].shape == (B,)
    cond = torch.rand(B, L, dim, generator=g)
    free = ClassifierFreeGuidance(1.0, torch.zeros(dim))
    for sampler in (DDPMSampler(), DDIMSampler(3, eta=0.5), few_step(2)):
        x = torch.randn(B, L, dim, generator=g)
        seq_x = sampler.sample(d, _rowwise, x, torch.Generator().manual_seed(4), cond=cond, guidance=free)
        flat_x = sampler.sample(d, _rowwise, flat(x), torch.Generator().manual_seed(4), cond=flat(cond),
                                guidance=ClassifierFreeGuidance(1.0, torch.zeros(L * dim)))
        assert seq_x.shape == (B, L, dim)
        torch.testing.assert_close(flat(seq_x), flat_x, rtol=1e-5, atol=1e-6)
    gen = GaussianDiffusion(T, "cosine", 1.0).generate(_rowwise, (B, L, dim), torch.Generator().manual_seed(0))
    assert gen.shape == (B, L, dim) and torch.isfinite(gen).all()


# ------------------------------------------------------------------ (l) samplers are interchangeable
class CountingCond(Counting):
    def __call__(self, x, t, cond=None):
        self.calls += 1
        return self.fn(x, t) if cond is None else self.fn(x, t, cond)


SAMPLERS = [DDPMSampler(noise=False), DDPMSampler(), DDIMSampler(), DDIMSampler(3), DDIMSampler(4, eta=1.0),
            few_step(1)]


@pytest.mark.parametrize("sampler", SAMPLERS, ids=lambda s: f"{type(s).__name__}{vars(s)}")
@pytest.mark.parametrize("mean_type", ["x0", "eps"])
@pytest.mark.parametrize("start", [None, 3])
def test_every_sampler_recovers_x0_from_a_perfect_denoiser(sampler, mean_type, start):
    T = 7
    d = GaussianDiffusion(T, "linear", 1.0, 1e-3, 0.3, mean_type=mean_type)
    x0 = torch.rand(5, 2, 3)

    def perfect(x_t, t, cond=None):
        if mean_type == "x0":
            return x0
        return (x_t - expand(d.sqrt_ac[t], x_t) * x0) / expand(d.sqrt_one_minus_ac[t], x_t)

    net = Counting(perfect)
    got = sampler.sample(d, net, torch.randn(5, 2, 3), torch.Generator().manual_seed(0), start=start)
    torch.testing.assert_close(got, x0, atol=1e-5, rtol=0)
    steps = T if start is None else start + 1
    assert net.calls == (getattr(sampler, "steps", None) or steps)


def test_classifier_free_guidance_calls_the_denoiser_twice_per_step_and_not_at_zero_weight():
    d = GaussianDiffusion(7, "linear", 1.0, 1e-3, 0.3)
    for w, calls in ((0.0, 7), (2.0, 14)):
        net = CountingCond(lambda x, t, cond: x * 0.1 + cond)
        DDPMSampler(noise=False).sample(d, net, torch.rand(3, 2), cond=torch.ones(3, 2),
                                        guidance=ClassifierFreeGuidance(w, torch.zeros(2)))
        assert net.calls == calls


def test_reverse_accepts_any_sampler_and_defaults_to_diffrecs():
    d = GaussianDiffusion(7, "linear-var", 0.1, 1e-3, 0.05)
    net, x = _fixed_net(5), torch.rand(4, 5)
    assert torch.equal(d.reverse(net, x), DDPMSampler(noise=False).sample(d, net, x))
    assert torch.equal(d.reverse(net, x, inference_steps=3), DDIMSampler(3).sample(d, net, x))
    assert torch.equal(d.reverse(net, x, sampler=few_step(2)), few_step(2).sample(d, net, x))


# ------------------------------------------------------------------ (m) explicit generators only
def test_sampling_is_a_function_of_the_generator_alone():
    d = GaussianDiffusion(10, "cosine", 1.0, mean_type="eps")
    net = lambda x, t: 0.3 * x  # noqa: E731
    state = torch.get_rng_state()
    runs = []
    for global_seed, seed in ((0, 1), (99, 1), (0, 2)):
        torch.manual_seed(global_seed)
        state = torch.get_rng_state()
        runs.append(d.generate(net, (6, 3), torch.Generator().manual_seed(seed)))
        assert torch.equal(state, torch.get_rng_state())  # nothing drawn from the global generator
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    # the draws are x_T then one per noisy step, nothing else (the old core drew a seed in between)
    g = torch.Generator().manual_seed(1)
    x_T = torch.randn((6, 3), generator=g)
    assert torch.equal(DDPMSampler().sample(d, net, x_T, g), runs[0])


@pytest.mark.parametrize("sampler", [DDPMSampler(), DDIMSampler(4, eta=0.3)])
def test_samplers_that_draw_refuse_no_generator(sampler):
    d = GaussianDiffusion(10, "cosine", 1.0, mean_type="eps")
    with pytest.raises(ValueError, match="torch.Generator"):
        sampler.sample(d, lambda x, t: x, torch.rand(2, 3))
    DDPMSampler(noise=False).sample(d, lambda x, t: x, torch.rand(2, 3))  # draws nothing: no generator needed
    with pytest.raises(ValueError, match="torch.Generator"):
        d.generate(lambda x, t: x, (2, 3), None)


# ------------------------------------------------------------------ (n) purification, bad sampler configs
def test_purify_noises_to_t_star_then_reverses_from_there():
    T, t_star = 10, 4
    d = GaussianDiffusion(T, "linear", 1.0, 1e-3, 0.3)
    x0 = torch.rand(5, 3)
    net = Counting(lambda x_t, t: x0)
    got = d.purify(net, torch.rand(5, 3), t_star, torch.Generator().manual_seed(0))
    torch.testing.assert_close(got, x0, atol=1e-6, rtol=0)
    assert net.calls == t_star + 1
    # the forward noise first, then the sampler's: the same as doing both by hand
    x, g = torch.rand(5, 3), torch.Generator().manual_seed(1)
    fn = lambda x_t, t: 0.5 * x_t  # noqa: E731
    x_t = d.q_sample(x, torch.full((5,), t_star), generator=g)
    assert torch.equal(d.purify(fn, x, t_star, torch.Generator().manual_seed(1)),
                       DDPMSampler().sample(d, fn, x_t, g, start=t_star))
    with pytest.raises(ConfigError, match=r"purification\.t_star"):
        d.purify(fn, x, T, g)


@pytest.mark.parametrize("make,key", [(lambda: DDIMSampler(0), "sampler.steps"),
                                      (lambda: DDIMSampler(3, eta=-1), "sampler.eta"),
                                      (lambda: DDIMSampler(9).timesteps(5), "sampler.steps")])
def test_bad_sampler_config(make, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        make()


def test_sampler_start_out_of_range_and_no_noise_schedule():
    d = GaussianDiffusion(5, "linear", 1.0, 1e-3, 0.3)
    with pytest.raises(ConfigError, match=r"sampler\.start"):
        DDPMSampler(noise=False).sample(d, lambda x, t: x, torch.rand(2, 3), start=5)
    flat = GaussianDiffusion(5, "linear", 0.0, 1e-3, 0.3)
    with pytest.raises(ConfigError, match=r"model\.noise_scale"):
        DDIMSampler().sample(flat, lambda x, t: x, torch.rand(2, 3))
