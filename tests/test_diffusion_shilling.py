"""The diffusion shilling attacker (attacks/diffusion_shilling.py) and the core's classifier-free guidance
it samples with, on tiny synthetic data."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from attacks.diffusion_shilling import DiffusionAttack, DiffusionAttackConfig, audience_label
from fedrec.data import load_dataset
from fedrec.errors import ConfigError
from fedrec.models.diffusion import ClassifierFreeGuidance, DDIMSampler, GaussianDiffusion
from tests.test_transforms import tiny_data_cfg

FAST = dict(epochs=3, hidden=16, bottleneck=8, steps=10, sampling_steps=5)


# --------------------------------------------------------------------------- CFG sampling math
def _linear_denoiser(a: float, b: np.ndarray):
    """x0_hat = a * x + cond @ b: conditional and unconditional (null = 0) outputs in closed form."""
    B = torch.as_tensor(b, dtype=torch.float32)

    def fn(x, t, cond=None):
        out = a * x
        return out if cond is None else out + cond @ B
    return fn


def _numpy_ddim(x, cond, b, a, w, d: GaussianDiffusion, seq):
    """Deterministic DDIM with x0_hat = (1 + w)(a x + c b) - w (a x): the reference the core must equal."""
    ac = d.alphas_cumprod.double().numpy()
    for j, i in enumerate(seq):
        x0 = (1 + w) * (a * x + cond @ b) - w * (a * x)
        if j == len(seq) - 1:
            return x0
        eps = (x - np.sqrt(ac[i]) * x0) / np.sqrt(1 - ac[i])
        s = seq[j + 1]
        x = np.sqrt(ac[s]) * x0 + np.sqrt(1 - ac[s]) * eps
    return x


@pytest.mark.parametrize("w", [-1.0, 0.0, 2.0])
def test_cfg_sampling_equals_numpy_and_w_minus_one_is_the_unconditional_model(w):
    rng = np.random.default_rng(0)
    b = rng.normal(size=(2, 3))
    a = 0.3
    d = GaussianDiffusion(20, "cosine", noise_scale=1.0, mean_type="x0", reweight=False, importance_sampling=False)
    x_T = torch.as_tensor(rng.normal(size=(5, 3)), dtype=torch.float32)
    cond = torch.tensor([[1.0, 0.0]]).expand(5, 2)
    fn, sampler = _linear_denoiser(a, b), DDIMSampler(steps=6)
    got = sampler.sample(d, fn, x_T, cond=cond, guidance=ClassifierFreeGuidance(w, torch.zeros(2))).double().numpy()
    seq = [int(i) for i in sampler.timesteps(19)]
    ref = _numpy_ddim(x_T.double().numpy(), cond.double().numpy(), b, a, w, d, seq)
    np.testing.assert_allclose(got, ref, atol=1e-4)
    unconditional = sampler.sample(d, fn, x_T).double().numpy()  # the model without any condition
    conditional = sampler.sample(d, fn, x_T, cond=cond).double().numpy()
    if w == -1.0:  # the core's convention (Ho & Salimans eq. 6): w = -1 is the unconditional model
        np.testing.assert_allclose(got, unconditional, atol=1e-5)
    if w == 0.0:  # ... and w = 0 the conditional one
        np.testing.assert_allclose(got, conditional, atol=1e-5)
    if w > 0:  # beyond the conditional sample, on the side away from the unconditional one
        step = conditional - unconditional
        assert (((got - conditional) * step).sum(axis=1) > 0).all()
        assert np.linalg.norm(got - unconditional) > np.linalg.norm(conditional - unconditional)


# --------------------------------------------------------------------------- the audience label
def test_audience_label_equals_a_brute_force_reference():
    rng = np.random.default_rng(1)
    x = (rng.random((40, 15)) < 0.25).astype(np.float64)
    targets, k = np.array([3]), 2
    pop = x.sum(0)
    sim = np.array([(x[:, 3] * x[:, j]).sum() / np.sqrt(max(pop[3], 1) * max(pop[j], 1)) for j in range(15)])
    sim[3] = -np.inf
    ranked = sorted((j for j in range(15) if sim[j] > 0), key=lambda j: (-sim[j], j))[:k]
    want = x[:, [3] + ranked].sum(1) > 0
    np.testing.assert_array_equal(audience_label(sp.csr_matrix(x), targets, k), want)
    np.testing.assert_array_equal(audience_label(sp.csr_matrix(x), targets, 0), x[:, 3] > 0)


# --------------------------------------------------------------------------- fake profiles
@pytest.fixture(scope="module")
def base():
    return load_dataset(tiny_data_cfg(n_users=120, n_items=80), 0)


@pytest.fixture(scope="module")
def attacked(base):
    attack = DiffusionAttack(count=7, **FAST)
    return attack, attack.apply(base, 0)


def test_fake_profiles_have_the_heuristic_size_and_hold_the_targets(base, attacked):
    attack, out = attacked
    fakes = out.train[np.flatnonzero(out.injected)]
    targets = attack.target_items(base, 0)
    sizes = np.diff(base.train.indptr)
    assert out.n_injected == 7 and fakes.shape[0] == 7
    np.testing.assert_array_equal(np.diff(fakes.indptr), int(round(sizes[sizes > 0].mean())))
    assert (fakes[:, targets].toarray() == 1).all()
    np.testing.assert_array_equal(out.attack_targets, targets)
    assert out.valid[np.flatnonzero(out.injected)].nnz == 0  # training rows only


def test_filler_is_the_top_of_the_generated_scores_and_explicit_size(base):
    attack = DiffusionAttack(count=3, filler_size=5, **FAST)
    out = attack.apply(base, 0)
    fakes = out.train[np.flatnonzero(out.injected)]
    np.testing.assert_array_equal(np.diff(fakes.indptr), 5 + len(attack.target_items(base, 0)))


def test_deterministic_per_seed(base, attacked):
    _, out = attacked
    again = DiffusionAttack(count=7, **FAST).apply(base, 0)
    assert (again.train != out.train).nnz == 0
    other = DiffusionAttack(count=7, **FAST).apply(base, 1)
    assert (other.train[-7:] != out.train[-7:]).nnz > 0


def test_guidance_moves_generated_profiles_toward_the_targets_audience():
    """Planted: half the users hold the target's block of items (0-9, the target 0 among them), half the
    other block (10-19). Guided generation (w = 2) fills the profiles with the target's block; the
    unconditional model (w = -1) draws from both."""
    rng = np.random.default_rng(0)
    n, items = 120, 20
    x = np.zeros((n, items))
    for u in range(n):
        block = np.arange(0, 10) if u % 2 == 0 else np.arange(10, 20)
        x[u, rng.choice(block, 5, replace=False)] = 1
    x[1::2, 0] = 0
    rows = sp.csr_matrix(x)
    label = audience_label(rows, np.array([0]), 0)
    from attacks.diffusion_shilling import ProfileDiffusion

    c = DiffusionAttackConfig(count=1, epochs=150, hidden=64, bottleneck=32, steps=20, sampling_steps=10,
                              cond_drop_prob=0.2)
    model = ProfileDiffusion(c, items, seed=0)
    model.fit(rows, label)
    share = {}
    for w in (-1.0, 2.0):
        s = model.sample(200, w, items)
        top = np.argsort(-s, axis=1)[:, :5]
        share[w] = float((top < 10).mean())
    assert share[2.0] > 0.9 and share[-1.0] < 0.8, share


@pytest.mark.parametrize("key,value", [("guidance", "x"), ("cond_drop_prob", 1.0), ("knowledge", 0.0),
                                       ("sampling_steps", 500), ("filler_draw", "best"), ("temperature", 0.0)])
def test_bad_values_name_their_key(key, value):
    with pytest.raises(ConfigError, match=f"attack.{key}"):
        DiffusionAttackConfig(**{key: value})


def test_sampled_filler_and_partial_knowledge(base):
    attack = DiffusionAttack(count=4, filler_draw="sample", temperature=0.5, knowledge=0.5, **FAST)
    out = attack.apply(base, 0)
    assert out.n_injected == 4 and (out.train[-4:][:, attack.target_items(base, 0)].toarray() == 1).all()
    assert len(attack.known_users(base, 0)) == 60


# --------------------------------------------------------------------------- target orientation
def test_promotion_surrogate_equals_a_numpy_reference():
    """PureSVD factors of the known rows, each counted user's K-th unseen non-target score, and the smooth
    share of users whose score for the profile's mean item factor beats it -- recomputed with numpy."""
    from attacks.diffusion_shilling import PromotionSurrogate

    rng = np.random.default_rng(3)
    x = (rng.random((40, 25)) < 0.25).astype(np.float64)
    targets = np.array([4])
    sur = PromotionSurrogate(sp.csr_matrix(x), targets, dim=6, k=3, temperature=0.1, seed=0)
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    q = vt[:6].T * np.sqrt(s[:6])
    p = u[:, :6] * np.sqrt(s[:6])
    # the factors are those of the top-6 singular triplets, up to each component's sign (p q^T is sign-free)
    np.testing.assert_allclose(sur.p.numpy() @ sur.q.numpy().T, (p @ q.T)[x[:, 4] == 0], rtol=1e-4, atol=1e-5)
    scores = p @ q.T
    scores[x > 0] = -np.inf
    scores[:, 4] = -np.inf
    thr = np.sort(scores, axis=1)[:, -3][x[:, 4] == 0]
    np.testing.assert_allclose(sur.thr.numpy(), thr, rtol=1e-4, atol=1e-5)
    prof = (rng.random((5, 25)) < 0.3).astype(np.float32)
    qx = prof @ q / prof.sum(1, keepdims=True)
    tau = 0.1 * thr.std()
    want = (1 / (1 + np.exp(-((qx @ p[x[:, 4] == 0].T) - thr) / tau))).mean(1)
    np.testing.assert_allclose(sur.objective(torch.as_tensor(prof)).numpy(), want, rtol=1e-4, atol=1e-6)


def test_candidates_keep_the_profiles_the_surrogate_credits_most(base):
    """With 4 candidates per fake user the kept profiles' surrogate credit is at least the unselected draw's."""
    one = DiffusionAttack(count=5, candidates=1, promotion=0.0, **FAST)
    one.apply(base, 0)
    four = DiffusionAttack(count=5, candidates=4, **FAST)
    out = four.apply(base, 0)
    assert out.n_injected == 5 and (out.train[-5:][:, four.target_items(base, 0)].toarray() == 1).all()
    assert not hasattr(one, "promotion_share")  # no surrogate without promotion or candidates
    sel = DiffusionAttack(count=20, candidates=1, promotion=1e-9, **FAST)  # a surrogate, no selection
    sel.apply(base, 0)
    assert four.promotion_share >= sel.promotion_share
