"""The Gaussian diffusion core against independent re-implementations of the official DiffRec code
(github.com/YiyanXu/DiffRec ``models/gaussian_diffusion.py``) written here, not imported."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedrec.errors import ConfigError
from fedrec.models import build_model
from fedrec.models.base import DataShape
from fedrec.models.diffusion import GaussianDiffusion, make_betas


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
        ac = d.alphas_cumprod[t].unsqueeze(-1)
        return (x_t - torch.sqrt(ac) * x0) / torch.sqrt(1 - ac)

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
    ({"steps": 5, "noise_schedule": "quadratic"}, "model.noise_schedule"),
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
    ({"noise_schedule": "quadratic"}, "model.noise_schedule"),
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
