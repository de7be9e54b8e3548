"""Synthetic-release generators: zoo models as generators, DP training and its composed accounting."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from fedrec.errors import ConfigError
from fedrec.privacy.dpsgd import DPSGDConfig
from fedrec.privacy.generators import PrivacyPlan, ZooGenerator, build_generator
from fedrec.privacy.sdrm import SDRM, SDRMConfig
from tests.dp_reference import epsilon_from_rdp, sgm_rdp

TINY_SDRM = dict(vae_epochs=3, diffusion_epochs=3, latent_dim=8, vae_hidden=[32], denoiser_hidden=32,
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


def test_dp_trained_sdrm_accounts_every_step_it_took():
    real = _clustered(n=80)
    gen = SDRM(SDRMConfig(**TINY_SDRM), 60, seed=0,
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
    gen = SDRM(SDRMConfig(**TINY_SDRM, latent_sampling="posterior"), 60, seed=0).fit(_clustered(n=60))
    assert gen.sample(10).shape == (10, 60)
    with pytest.raises(ConfigError, match="generator.latent_sampling"):
        SDRMConfig(latent_sampling="prior")


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
