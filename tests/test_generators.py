"""Synthetic-release generators: SDRM, the latent DDPM, zoo models as generators, DP training and its accounting."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from fedrec.errors import ConfigError
from fedrec.privacy.dpsgd import DPSGDConfig
from fedrec.privacy.generators import PrivacyPlan, ZooGenerator, build_generator
from fedrec.privacy.latent_ddpm import LatentDDPM, LatentDDPMConfig
from tests.dp_reference import epsilon_from_rdp, sgm_rdp

TINY_LATENT = dict(vae_epochs=3, diffusion_epochs=3, latent_dim=8, vae_hidden=[32], denoiser_hidden=32,
                 diffusion_steps=20, sampling_steps=5, batch_size=16)


def _clustered(n=120, items=60, seed=0) -> sp.csr_matrix:
    """Two taste groups over disjoint halves of the catalogue: a generator must learn which items co-occur."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, items), np.float32)
    half = items // 2
    for u in range(n):
        lo = 0 if u % 2 == 0 else half
        x[u, lo + rng.choice(half, size=8, replace=False)] = 1
    return sp.csr_matrix(x)


def _generator_cfg(name: str, **model) -> dict:
    from omegaconf import OmegaConf

    from fedrec.config import compose

    cfg = OmegaConf.to_container(compose([f"generator={name}"]).generator, resolve=True)
    cfg["model"].update(model)
    return cfg


@pytest.mark.parametrize("name,model", [
    ("diffrec", {"dims": [32], "steps": 50, "inference_steps": 10}),
    ("ldiffrec", {"in_dims": [16], "mlp_dims": [32], "steps": 50, "inference_steps": 10}),
    ("multvae", {"hidden_dims": [32], "latent_dim": 8}),
])
def test_zoo_generators_learn_which_items_go_together(name, model):
    real = _clustered()
    cfg = _generator_cfg(name, **model)
    cfg["epochs"] = 150
    cfg["model"]["optim"]["batch_size"] = 32
    gen = build_generator(cfg, real.shape[1], seed=0).fit(real)
    # a real user's items all lie in one half; 8 items drawn at random put 63% in their majority half
    with torch.no_grad():
        top = torch.topk(gen.scores(200, torch.Generator().manual_seed(5)), 8, dim=1).indices.numpy()
    top_share = np.maximum((top < 30).mean(1), (top >= 30).mean(1))
    assert top_share.mean() >= 0.85, top_share.mean()  # each generated user's best items: one taste group
    syn = gen.sample(200).toarray()
    assert syn.shape == (200, 60) and syn.sum(1).min() >= 1
    share_in_major = np.maximum(syn[:, :30].sum(1), syn[:, 30:].sum(1)) / syn.sum(1)
    assert share_in_major.mean() >= 0.7, share_in_major.mean()  # the sampled release keeps it, more diverse
    # a fixed seed gives the same release
    assert (gen.sample(50, seed=3) != gen.sample(50, seed=3)).nnz == 0


def test_zoo_generator_refuses_a_schedule_that_never_reaches_noise():
    cfg = _generator_cfg("diffrec", dims=[16], steps=40, noise_schedule="linear-var", noise_scale=0.005,
                         noise_min=0.005, noise_max=0.01, inference_steps=10)
    gen = build_generator(cfg, 60, seed=0)
    with pytest.raises(ConfigError, match="generator.model.noise_.*sqrt\\(alpha_bar_T\\)"):
        gen.fit(_clustered())


def test_models_without_a_prior_and_bad_generator_configs_fail_clearly():
    with pytest.raises(ConfigError, match="'bpr' has no prior"):
        ZooGenerator({"name": "bpr", "optim": {"lr": 0.01, "weight_decay": 0.0, "batch_size": 16}}, 1, 60).fit(_clustered())
    with pytest.raises(ConfigError, match="generator.name"):
        build_generator({"name": "gan"}, 60, 0)
    with pytest.raises(ConfigError, match="generator.latent_dimension"):
        build_generator({"name": "sdrm", "latent_dimension": 3}, 60, 0)
    with pytest.raises(ConfigError, match="generator.temperature"):
        build_generator({"name": "sdrm", "temperature": 0}, 60, 0)
    with pytest.raises(ConfigError, match="generator.dp.max_grad_norm"):
        build_generator({"name": "sdrm", "dp": {"target_epsilon": 1.0, "max_grad_norm": -1}}, 60, 0)
    dp_ldiffrec = _generator_cfg("ldiffrec", n_cate=2)
    dp_ldiffrec["dp"]["target_epsilon"] = 4.0
    with pytest.raises(ConfigError, match="n_cate=1"):
        build_generator(dp_ldiffrec, 60, 0)


def test_generator_dp_off_unless_a_multiplier_or_target_is_set():
    cfg = _generator_cfg("multvae")
    assert build_generator(cfg, 60, 0).dp is None
    cfg["dp"]["noise_multiplier"] = 2.0
    assert build_generator(cfg, 60, 0).dp.noise_multiplier == 2.0


def test_privacy_plan_calibrates_the_composition_against_an_independent_accountant():
    dp = DPSGDConfig(noise_multiplier=None, target_epsilon=3.0, accountant="rdp")
    plan = PrivacyPlan(dp, n_users=200, stages=[(20, 5), (50, 8)])
    sigma, delta = plan.noise_multiplier, plan.delta
    assert delta == pytest.approx(1 / 200)
    # two DP-SGD stages (rates 1/10 and 1/4 over 50 and 32 steps) and the activity histogram (q = 1, once)
    assert plan.mechanisms == [(0.1, 50), (0.25, 32), (1.0, 1)]
    ours = plan.epsilon_at(sigma)
    reference = epsilon_from_rdp(lambda a: 50 * sgm_rdp(0.1, sigma, a) + 32 * sgm_rdp(0.25, sigma, a)
                                 + sgm_rdp(1.0, sigma, a), delta)
    assert ours == pytest.approx(reference, rel=0.01)
    assert ours <= 3.0 and plan.epsilon_at(sigma / 1.01) > 3.0  # the smallest multiplier that meets the target


def test_dp_trained_latent_ddpm_accounts_every_step_it_took():
    real = _clustered(n=80)
    gen = LatentDDPM(LatentDDPMConfig(**TINY_LATENT), 60, seed=0,
               dp=DPSGDConfig(noise_multiplier=None, target_epsilon=2.0, accountant="rdp")).fit(real)
    # the histories Opacus recorded while training equal the plan the multiplier was calibrated on
    assert all(sigma == gen.plan.noise_multiplier for sigma, _, _ in gen.history)
    assert sorted((q, s) for _, q, s in gen.history) == sorted(gen.plan.mechanisms)
    assert gen.epsilon() == pytest.approx(gen.plan.epsilon_at(gen.plan.noise_multiplier)) and gen.epsilon() <= 2.0
    assert torch.equal(gen.mean, torch.zeros(8))  # nothing unaccounted is read from the latents
    syn = gen.sample(40)
    assert syn.shape == (40, 60) and syn.sum(1).min() >= 1


def test_dp_activity_histogram_is_noisy_but_in_range():
    from fedrec.privacy.generators import ActivityDistribution

    activity = np.full(500, 8)
    rng = np.random.default_rng(0)
    exact = ActivityDistribution(activity, 100, None, 16, rng)
    assert set(exact.draw(100, rng)) == {8}
    noisy = ActivityDistribution(activity, 100, 50.0, 16, rng)
    k = noisy.draw(2000, rng)
    assert k.min() >= 1 and k.max() <= 100
    assert len(set(k)) > 5  # noise of std 50 on the empty bins spreads the draws
    nearly_exact = ActivityDistribution(activity, 100, 0.01, 16, rng)
    b = np.searchsorted(nearly_exact.edges, 8, side="right") - 1
    ks = nearly_exact.draw(500, rng)
    assert np.all((ks >= nearly_exact.edges[b]) & (ks < nearly_exact.edges[b + 1]))


def test_posterior_latent_sampling_trains_and_samples():
    gen = LatentDDPM(LatentDDPMConfig(**TINY_LATENT, latent_sampling="posterior"), 60, seed=0).fit(_clustered(n=60))
    assert gen.sample(10).shape == (10, 60)
    with pytest.raises(ConfigError, match="generator.latent_sampling"):
        LatentDDPMConfig(latent_sampling="prior")


def test_dp_trained_zoo_generator_reports_its_composed_epsilon():
    cfg = _generator_cfg("diffrec", dims=[16], steps=20, inference_steps=5)
    cfg["epochs"] = 2
    cfg["model"]["optim"]["batch_size"] = 20
    cfg["dp"]["noise_multiplier"] = 1.5
    gen = build_generator(cfg, 60, seed=0).fit(_clustered(n=60))
    # one DP-SGD stage (rate 1/3, 6 steps) and the activity histogram, both at multiplier 1.5
    reference = epsilon_from_rdp(lambda a: 6 * sgm_rdp(1 / 3, 1.5, a) + sgm_rdp(1.0, 1.5, a), gen.plan.delta)
    assert gen.epsilon() == pytest.approx(reference, rel=0.01)
    assert gen.sample(10).shape == (10, 60)


# ---------------------------------------------------------------------------- SDRM (the paper's method)
TINY_SDRM = dict(vae_hidden=[32], latent_dim=8, vae_epochs=20, vae_batch_size=32, steps=12, denoiser_hidden=32,
                 hidden_layers=2, batch_size=32, epochs=20, lr=1e-3)


def _np_denoiser(den, x, t, keep):
    """The official denoiser in numpy from its weights: x*keep ++ Linear(T,T)(sin emb) -> PReLU MLP -> tanh."""
    w = {k: v.detach().double().numpy() for k, v in den.state_dict().items()}
    half = den.emb_dim // 2
    args = t[:, None] * np.exp(-np.log(10000.0) * np.arange(half) / half)[None]
    emb = np.concatenate([np.cos(args), np.sin(args)] + ([np.zeros((len(t), 1))] if den.emb_dim % 2 else []), 1)
    prelu = lambda h, a: np.where(h > 0, h, a * h)  # noqa: E731
    h = np.concatenate([x * keep, emb @ w["emb_layer.weight"].T + w["emb_layer.bias"]], 1)
    h = prelu(h @ w["first.weight"].T + w["first.bias"], w["first_act.weight"])
    for _ in range(den.hidden_layers):  # the official [Linear, PReLU] * n: one pair, n times
        h = prelu(h @ w["hidden.weight"].T + w["hidden.bias"], w["hidden_act.weight"])
    return np.tanh(h @ w["out.weight"].T + w["out.bias"])


def _np_alpha_bar(T, beta_min=1e-4, beta_max=0.02):
    b = beta_min + (beta_max - beta_min) * np.linspace(0, 1, T + 1)
    ab = np.cumprod(1 - b)
    ab[0] = 1.0
    return b, ab


def test_sdrm_forward_process_and_objective_match_a_numpy_reference():
    from fedrec.privacy.sdrm import SDRMConfig, SDRMScoreModel, forward_process, sdrm_objective

    cfg = SDRMConfig(**{**TINY_SDRM, "steps": 13})  # odd T: the embedding is zero-padded
    model = SDRMScoreModel(cfg, per_user_norm=False, seed=0)
    for p in model.parameters():  # move the PReLU slopes off their 0.25 init so they are distinguishable
        p.data.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    rng = np.random.default_rng(1)
    n, d, mu, lam = 7, cfg.latent_dim, 0.1, 0.5
    x0 = rng.normal(size=(n, d))
    t = rng.integers(1, cfg.steps + 1, n)
    noise = lam * rng.normal(size=(n, d))  # the diminisher scales the noise
    keep = (rng.random((3, n, d)) >= 0.5) * 2.0
    b, ab = _np_alpha_bar(cfg.steps)
    # the paper's forward process: sqrt(alpha_bar_t) x0 + (1 - alpha_bar_t) eps
    x_t = np.sqrt(ab[t])[:, None] * x0 + (1 - ab[t])[:, None] * noise
    f = lambda x, i: _np_denoiser(model.denoiser, x, t, keep[i])  # noqa: E731
    e, s = f(x_t, 0), f(x0, 1)
    diff, r = (f(x0 + mu * noise, 2) - s) / mu ** 2, f(x_t, 0) - x0
    core = 0.5 * (((diff - r) ** 2).mean(1) + ((r - s) ** 2).mean(1))
    official = 0.5 * (((diff - r) ** 2).mean() + ((r - s) ** 2).mean()) / (1e-8 + r.var(ddof=1))
    per_user = core / (1e-8 + r.var(axis=1, ddof=1))

    T = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    tt = torch.as_tensor(t)
    assert np.allclose(model.schedule.alpha_bar.numpy(), ab, rtol=1e-6)
    got_xt = forward_process(T(x0), tt, T(noise), model.schedule.alpha_bar)
    assert np.allclose(got_xt.numpy(), x_t, rtol=1e-5, atol=1e-6)
    tf = lambda x, i: model.denoiser(x, tt, T(keep[i]))  # noqa: E731
    batch = sdrm_objective(tf, T(x0), got_xt, T(noise), mu, per_user=False)
    user = sdrm_objective(tf, T(x0), got_xt, T(noise), mu, per_user=True)
    assert float(batch.detach().mean()) == pytest.approx(official, rel=1e-4)
    assert np.allclose(user.detach().numpy(), per_user, rtol=1e-4)
    assert not np.allclose(user.detach().numpy(), batch.detach().numpy(), rtol=1e-3)  # the two norms differ


def _sdrm(**over):
    from fedrec.privacy.sdrm import SDRM, SDRMConfig

    common = {k: over.pop(k) for k in ("binarize", "dp") if k in over}
    return SDRM(SDRMConfig(**{**TINY_SDRM, **over}), 60, seed=0, **common)


def test_sdrm_reverse_chain_is_the_official_update_per_user_step_count():
    """Deterministic chain (no injected noise, no sampling dropout) against numpy, for M- and F-SDRM."""
    gen = _sdrm(noise_diminisher=0.0, sample_dropout=False, epochs=2, vae_epochs=2).fit(_clustered())
    model, T = gen.model, gen.cfg.steps
    b, ab = _np_alpha_bar(T)
    a = 1 - b
    x = torch.randn(9, gen.cfg.latent_dim, generator=torch.Generator().manual_seed(3))
    k = torch.tensor([1, 2, 3, 5, 7, 11, 11, 4, 12])
    ref = x.double().numpy().copy()
    for j in range(len(k)):  # the official per-user loop
        for i in range(int(k[j]), 0, -1):
            eps = _np_denoiser(model.denoiser, ref[j:j + 1], np.array([i]), np.ones((1, ref.shape[1])))
            ref[j] = ((ref[j:j + 1] - eps * (1 - a[i]) / np.sqrt(1 - ab[i])) / np.sqrt(a[i]))[0]
    got = model.reverse(x, k, torch.Generator().manual_seed(0))
    assert np.allclose(got.numpy(), ref, rtol=1e-4, atol=1e-5)


def _record_calls(model):
    calls, forward = [], model.denoiser.forward

    def spy(x, t, keep=None):
        assert bool((t == t[0]).all())
        calls.append((int(t[0]), len(t)))
        return forward(x, t, keep)

    model.denoiser.forward = spy
    return calls


def test_m_sdrm_draws_a_seeded_number_of_reverse_steps_per_user():
    gen = _sdrm(epochs=2, vae_epochs=2).fit(_clustered())
    T, n = gen.cfg.steps, 400
    k = gen.model.resolutions(n, torch.Generator().manual_seed(4))
    assert k.min() >= 1 and k.max() <= T - 1 and len(set(k.tolist())) == T - 1  # U{1..T-1}: all occur in 400
    assert torch.equal(k, gen.model.resolutions(n, torch.Generator().manual_seed(4)))
    assert not torch.equal(k, gen.model.resolutions(n, torch.Generator().manual_seed(5)))
    calls = _record_calls(gen.model)
    gen.scores(n, torch.Generator().manual_seed(4))  # draws k first from the same generator
    # step i denoises exactly the users whose chain is at least i long, from max(k) down to 1
    assert calls == [(i, int((k >= i).sum())) for i in range(int(k.max()), 0, -1)]


def test_f_sdrm_runs_the_full_chain_for_every_user():
    gen = _sdrm(sampling="full", epochs=2, vae_epochs=2).fit(_clustered())
    T = gen.cfg.steps
    calls = _record_calls(gen.model)
    gen.scores(50, torch.Generator().manual_seed(0))
    assert calls == [(i, 50) for i in range(T, 0, -1)]


def test_quantile_binarisation_keeps_the_members_share_of_ones():
    real = _clustered()
    density = real.nnz / (real.shape[0] * real.shape[1])
    for gen in (_sdrm(), build_generator({**_generator_cfg("multvae", hidden_dims=[32], latent_dim=8),
                                          "epochs": 5, "binarize": "quantile"}, 60, seed=0)):
        gen.fit(real)
        assert gen.activity.density() == pytest.approx(density)
        syn = gen.sample(300)
        cells = 300 * 60
        assert abs(syn.nnz / cells - density) <= 2 / cells, (syn.nnz / cells, density)
        assert (gen.sample(40, seed=9) != gen.sample(40, seed=9)).nnz == 0


def test_sdrm_fits_and_samples_from_its_config():
    from omegaconf import OmegaConf

    from fedrec.config import compose
    from fedrec.privacy.sdrm import SDRM, SDRMConfig

    cfg = OmegaConf.to_container(compose(["generator=sdrm"]).generator, resolve=True)
    default = build_generator(cfg, 60, seed=0)
    assert isinstance(default, SDRM) and default.cfg == SDRMConfig() and default.binarize == "quantile"
    assert not default.per_user_norm  # the official batch variance without DP
    real = _clustered()
    for sampling in ("multi", "full"):
        cfg.update(TINY_SDRM, sampling=sampling)
        gen = build_generator(cfg, 60, seed=0).fit(real)
        syn = gen.sample(120)
        assert syn.shape == (120, 60) and 0 < syn.nnz <= 120 * 60
        assert np.isfinite(gen.scores(5, torch.Generator()).numpy()).all()
    for bad, key in (({"sampling": "partial"}, "generator.sampling"), ({"steps": 1, "sampling": "multi"}, "generator.steps"),
                     ({"loss_norm": "item"}, "generator.loss_norm"), ({"dropout": 1.0}, "generator.dropout"),
                     ({"beta_max": 1.5}, "generator.beta_min"), ({"binarize": "median"}, "generator.binarize")):
        with pytest.raises(ConfigError, match=key):
            build_generator({**cfg, **bad}, 60, seed=0)
    with pytest.raises(ConfigError, match="generator.loss_norm"):
        build_generator({**cfg, "loss_norm": "batch", "dp": {"noise_multiplier": 1.0}}, 60, seed=0)
    with pytest.raises(ConfigError, match="generator.dp.grad_sample_mode"):
        build_generator({**cfg, "dp": {"noise_multiplier": 1.0, "grad_sample_mode": "ghost"}}, 60, seed=0)


def test_sdrm_per_user_gradients_under_opacus_equal_autograd():
    """DP-SGD clips what Opacus computes: it must be each user's own gradient, although the objective runs
    the denoiser three times and reuses its hidden layer (accumulated per-sample hooks, PReLU sampler)."""
    import copy

    from opacus.grad_sample import GradSampleModule, register_grad_sampler

    from fedrec.models.base import Batch
    from fedrec.privacy.dpsgd import LossModule
    from fedrec.privacy.sdrm import SDRMConfig, SDRMScoreModel, prelu_grad_sample

    register_grad_sampler(torch.nn.PReLU)(prelu_grad_sample)
    model = SDRMScoreModel(SDRMConfig(**TINY_SDRM), per_user_norm=True, seed=0)
    ref = copy.deepcopy(model)
    wrapped = GradSampleModule(LossModule(model), batch_first=True, loss_reduction="mean")
    x, users = torch.randn(5, 8, generator=torch.Generator().manual_seed(1)), torch.arange(5)
    model.gen.manual_seed(7)
    wrapped(users, x).mean().backward()
    ref.gen.manual_seed(7)
    per = ref.loss(Batch(users=users, x=x))
    params = dict(ref.named_parameters())
    for i in range(5):
        grads = torch.autograd.grad(per[i], list(params.values()), retain_graph=True)
        for (name, p), g in zip(model.named_parameters(), grads):
            assert torch.allclose(p.grad_sample[i], g, rtol=1e-4, atol=1e-6), name
    wrapped._close()


def test_dp_trained_sdrm_accounts_every_step_it_took():
    gen = _sdrm(dp=DPSGDConfig(noise_multiplier=None, target_epsilon=2.0, accountant="rdp"), epochs=3,
                vae_epochs=3).fit(_clustered(n=80))
    assert gen.per_user_norm  # null picks the per-user variance under DP
    assert all(sigma == gen.plan.noise_multiplier for sigma, _, _ in gen.history)
    assert sorted((q, s) for _, q, s in gen.history) == sorted(gen.plan.mechanisms)
    assert gen.plan.mechanisms[:2] == [(1 / 3, 9), (1 / 3, 9)]  # 80 users in batches of 32: 3 steps an epoch
    assert gen.epsilon() == pytest.approx(gen.plan.epsilon_at(gen.plan.noise_multiplier)) and gen.epsilon() <= 2.0
    assert 0 < gen.activity.density() < 1  # the quantile's density from the noisy histogram
    syn = gen.sample(40)
    assert syn.shape == (40, 60) and np.isfinite(gen.scores(4, torch.Generator()).numpy()).all()
