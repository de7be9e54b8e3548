"""Node-level DP through Flower's wrapper: clipping/averaging/noise against numpy, Flower's accountant against
an independent RDP computation, the budget stop, and a Flower run end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from flwr.app import ConfigRecord

from fedrec.errors import ConfigError
from strategies.node_dp import UNIT_WEIGHT, NodeDPConfig, NodeDPFedAvg, node_dp_epsilon
from strategies.user_dp import PrivacyBudgetExhausted
from tests.dp_reference import epsilon_from_rdp
from tests.test_strategies import FakeGrid, fedavg, reply, task_identity, to_record  # noqa: F401

SHAPES = {"w": (40, 50), "b": (50,)}


def _wrapped(n=4, rounds=3, **cfg):
    inner = fedavg(num_nodes=n, weighted_by_key=UNIT_WEIGHT)
    return NodeDPFedAvg(inner, NodeDPConfig(**cfg), n, rounds)


def _round(s, g, updates, rnd=1):
    msgs = list(s.configure_train(rnd, to_record(g), ConfigRecord(), FakeGrid(len(updates))))
    replies = [reply(m, {k: g[k] + u[k] for k in g}, n=7 * (i + 1), **{UNIT_WEIGHT: 1.0})
               for i, (m, u) in enumerate(zip(msgs, updates))]
    arrays, _ = s.aggregate_train(rnd, replies)
    return {k: v.numpy() for k, v in arrays.items()}


def _updates(rng, n, scales):
    return [{k: (sc * rng.standard_normal(shape)).astype(np.float32) for k, shape in SHAPES.items()} for sc in scales]


def test_noiseless_aggregate_is_the_equal_weight_mean_of_clipped_updates():
    rng = np.random.default_rng(0)
    g = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    ups = _updates(rng, 4, [0.001, 0.01, 0.1, 1.0])  # norms ~0.05 .. 45: some clipped, some not
    out = _round(_wrapped(noise_multiplier=0.0, clipping_norm=1.0), g, ups)
    ref = {k: np.zeros(s) for k, s in SHAPES.items()}
    for u in ups:  # numpy: clip the whole update to C = 1, equal weights (the nodes' example counts differ)
        norm = math.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in u.values()))
        for k in u:
            ref[k] += u[k] * min(1.0, 1.0 / norm) / 4
    for k in g:
        np.testing.assert_allclose(out[k], g[k] + ref[k], rtol=1e-4, atol=1e-5)


def test_noise_has_std_z_c_over_n_and_untrained_nodes_do_not_crash_the_clipping():
    g = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    zero = [{k: np.zeros(s, np.float32) for k, s in SHAPES.items()} for _ in range(4)]  # nodes that did not train
    np.random.seed(4)  # Flower draws the noise from numpy's global generator
    out = _round(_wrapped(noise_multiplier=2.0, clipping_norm=0.5), g, zero)
    noise = np.concatenate([v.ravel() for v in out.values()])
    std = 2.0 * 0.5 / 4
    # bounds of ~3-4 standard errors over the 2,050 draws
    assert noise.std() == pytest.approx(std, rel=0.05) and abs(noise.mean()) < 4 * std / np.sqrt(noise.size)


def test_flower_accountant_agrees_with_independent_gaussian_rdp_within_one_percent():
    s = _wrapped(n=4, rounds=10, noise_multiplier=3.0, clipping_norm=1.0, delta=1e-4)
    rng = np.random.default_rng(2)
    g = {k: np.zeros(sh, np.float32) for k, sh in SHAPES.items()}
    for rnd in range(1, 11):
        _round(s, g, _updates(rng, 4, [0.1] * 4), rnd)
    # ten Gaussian mechanisms of multiplier 3 on the sum (sensitivity C): RDP 10 * a / (2 * 9)
    reference = epsilon_from_rdp(lambda a: 10 * a / 18, 1e-4)
    assert s.epsilon() == pytest.approx(reference, rel=0.01)
    assert s.epsilon() == pytest.approx(node_dp_epsilon(3.0, 10, 4, 1e-4))


def test_target_epsilon_calibrates_and_budget_stops_before_exceeding():
    s = _wrapped(n=4, rounds=5, noise_multiplier=None, target_epsilon=8.0)
    assert node_dp_epsilon(s.noise_multiplier, 5, 4, 1e-3) <= 8.0 < node_dp_epsilon(s.noise_multiplier / 1.01, 5, 4, 1e-3)
    capped = _wrapped(n=4, rounds=100, noise_multiplier=2.0, max_epsilon=4.0)
    rng = np.random.default_rng(3)
    g = {k: np.zeros(sh, np.float32) for k, sh in SHAPES.items()}
    done = 0
    with pytest.raises(PrivacyBudgetExhausted, match="max_epsilon"):
        for rnd in range(1, 100):
            _round(capped, g, _updates(rng, 4, [0.1] * 4), rnd)
            done += 1
    assert done > 0 and capped.epsilon() <= 4.0
    assert node_dp_epsilon(2.0, done + 1, 4, 1e-3) > 4.0


def test_node_dp_needs_every_silo_every_round(tiny_cfg):
    from fedrec.config import validate

    with pytest.raises(ConfigError, match="privacy=node_dp: needs federation.fraction=1.0"):
        validate(tiny_cfg("federation=silo", "federation.fraction=0.5", "privacy=node_dp"))
    with pytest.raises(ConfigError, match="privacy=node_dp: works with strategy=fedavg"):
        validate(tiny_cfg("federation=silo", "privacy=node_dp", "strategy=fedadam"))
    with pytest.raises(ConfigError, match="privacy.clipping_norm"):
        validate(tiny_cfg("federation=silo", "privacy=node_dp", "privacy.clipping_norm=0"))


def test_node_dp_silo_run_through_flower(tiny_cfg, tmp_path):
    from fedrec.experiment import execute

    cfg = tiny_cfg("federation=silo", "federation.num_nodes=3", "federation.rounds=2", "privacy=node_dp",
                   "privacy.noise_multiplier=1.5", "privacy.clipping_norm=0.5")
    summary = execute(cfg, tmp_path / "run", progress=False)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [1, 2] and all(x["train"]["clients"] == 3 for x in lines)
    assert summary["privacy"]["mechanism"] == "node_dp"
    assert summary["privacy"]["epsilon"] == pytest.approx(node_dp_epsilon(1.5, 2, 3, 1e-3))


def test_noise_is_seeded_per_round_and_leaves_numpy_alone():
    # issue 8.3: same seed -> same noisy aggregate; Flower's global-numpy noise is seeded by (seed, round)
    rng = np.random.default_rng(1)
    g = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    ups = _updates(rng, 4, [0.1] * 4)
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    a = _round(_wrapped(noise_multiplier=1.0), g, ups, rnd=1)
    np.testing.assert_array_equal(np.random.get_state()[1], before)  # the caller's generator is untouched
    np.random.seed(999)  # whatever happened to numpy's global generator in between
    b = _round(_wrapped(noise_multiplier=1.0), g, ups, rnd=1)
    c = _round(_wrapped(noise_multiplier=1.0), g, ups, rnd=2)
    for k in g:
        np.testing.assert_array_equal(a[k], b[k])
    assert any(not np.array_equal(a[k], c[k]) for k in g)


def test_resume_recomposes_the_accountant():
    rng = np.random.default_rng(2)
    g = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    full = _wrapped(noise_multiplier=1.5, rounds=3)
    for rnd in (1, 2, 3):
        _round(full, g, _updates(rng, 4, [0.1] * 4), rnd=rnd)
    first = _wrapped(noise_multiplier=1.5, rounds=3)
    for rnd in (1, 2):
        _round(first, g, _updates(rng, 4, [0.1] * 4), rnd=rnd)
    resumed = _wrapped(noise_multiplier=1.5, rounds=3)
    resumed.load_state(first.state())
    resumed.strategy.round_offset = 2
    _round(resumed, g, _updates(rng, 4, [0.1] * 4), rnd=1)
    assert resumed.epsilon() == pytest.approx(full.epsilon(), rel=1e-9) and full.epsilon() > first.epsilon()
