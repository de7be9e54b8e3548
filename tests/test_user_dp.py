"""User-level DP-FedAvg: aggregation math against numpy, accounting against an independent RDP computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from strategies import FedrecFedAvg
from strategies.user_dp import PrivacyBudgetExhausted, UserDPConfig, UserLevelDP
from tests.dp_reference import epsilon_from_rdp, sgm_rdp
from tests.test_strategies import FakeGrid, task_identity  # noqa: F401  (autouse fixture: Message() needs it)


def _strategy(inner=None, **dp):
    inner = inner or FedrecFedAvg(fraction_evaluate=0.0)
    inner.setup(num_nodes=2, fraction=1.0, seed=0)
    return UserLevelDP(inner, UserDPConfig(**dp), n_users=100, sample_rate=0.1, seed=0)


def _reply(to, stacked, clip, start):
    """What a node sends under user-level DP: the sum of its users' clipped updates."""
    import torch

    from fedrec.federated.device_node import clipped_sum

    sums, kept, unclipped, dropped = clipped_sum({k: torch.from_numpy(v.astype(np.float32)) for k, v in stacked.items()},
                                                 {k: torch.from_numpy(v) for k, v in start.items()}, clip)
    return Message(RecordDict({
        "arrays": ArrayRecord({k: Array(v.numpy()) for k, v in sums.items()}),
        "metrics": MetricRecord({"num-examples": float(kept), "clipped-sum": 1, "unclipped-users": unclipped,
                                 "rejected-users": dropped}),
    }), reply_to=to)


def test_clipped_noiseless_aggregate_matches_numpy():
    rng = np.random.default_rng(0)
    g = {"w": rng.standard_normal((3, 4)).astype(np.float32), "b": rng.standard_normal(4).astype(np.float32)}
    s = _strategy(noise_multiplier=0.0, clip=0.5)
    msgs = list(s.configure_train(1, ArrayRecord({k: Array(v) for k, v in g.items()}), ConfigRecord(), FakeGrid(2)))
    assert all(float(m.content["config"]["fedrec-clip"]) == 0.5 for m in msgs)
    users = [{k: g[k] + rng.standard_normal((5, *v.shape)) * 0.4 for k, v in g.items()} for _ in range(2)]
    users[1]["w"][2, 0, 0] = np.nan  # a corrupt user is dropped on its node
    arrays, _ = s.aggregate_train(1, [_reply(m, u, 0.5, g) for m, u in zip(msgs, users)])
    # numpy reference: clip each finite user's delta to 0.5, sum, divide by q*N = 10
    total = {k: np.zeros_like(v, dtype=np.float64) for k, v in g.items()}
    for u in users:
        for i in range(5):
            d = {k: u[k][i].astype(np.float32).astype(np.float64) - g[k] for k in g}
            norm = math.sqrt(sum((v ** 2).sum() for v in d.values()))
            if not np.isfinite(norm):
                continue
            for k in g:
                total[k] += d[k] * min(1.0, 0.5 / norm)
    for k in g:
        np.testing.assert_allclose(arrays[k].numpy(), g[k] + total[k] / 10.0, rtol=1e-5, atol=1e-6)
    assert s.last_train["users"] == 9 and s.last_train["rejected-updates"] == 1


def test_unclipped_upload_is_rejected():
    rng = np.random.default_rng(3)
    g = {"w": np.zeros(4, np.float32)}
    s = _strategy(noise_multiplier=0.0, clip=0.5)
    msgs = list(s.configure_train(1, ArrayRecord({k: Array(v) for k, v in g.items()}), ConfigRecord(), FakeGrid(2)))
    cheat = Message(RecordDict({"arrays": ArrayRecord({"w": Array(np.full(4, 10.0, np.float32))}),
                                "metrics": MetricRecord({"num-examples": 2.0, "clipped-sum": 1})}), reply_to=msgs[0])
    honest = _reply(msgs[1], {"w": rng.standard_normal((3, 4))}, 0.5, g)
    arrays, _ = s.aggregate_train(1, [cheat, honest])
    assert s.last_train["rejected-updates"] == 1 and s.last_train["users"] == 3
    assert np.linalg.norm(arrays["w"].numpy()) <= 3 * 0.5 / 10 + 1e-6


def test_epsilon_agrees_with_independent_rdp_within_one_percent():
    s = _strategy(noise_multiplier=1.1, clip=1.0)
    steps = 50
    for _ in range(steps):
        s.accountant.step(noise_multiplier=1.1, sample_rate=0.1)
    ours = s.epsilon()
    best = epsilon_from_rdp(lambda a: steps * sgm_rdp(0.1, 1.1, a), 1.0 / 100)
    assert ours == pytest.approx(best, rel=0.01)


def test_budget_stops_before_exceeding():
    s = _strategy(noise_multiplier=1.0, clip=1.0, max_epsilon=1.0)
    g = ArrayRecord({"w": Array(np.zeros(3, np.float32))})
    rounds = 0
    with pytest.raises(PrivacyBudgetExhausted):
        for r in range(1, 1000):
            s.configure_train(r, g, ConfigRecord(), FakeGrid(2))
            s.accountant.step(noise_multiplier=1.0, sample_rate=0.1)
            rounds += 1
    assert rounds > 0 and s.epsilon() <= 1.0


def test_adaptive_clip_moves_towards_quantile():
    rng = np.random.default_rng(1)
    g = {"w": np.zeros(8, np.float32)}
    s = _strategy(noise_multiplier=0.0, clip=10.0, adaptive_clip=True, target_quantile=0.5)
    for r in range(1, 30):
        msgs = list(s.configure_train(r, ArrayRecord({k: Array(v) for k, v in g.items()}), ConfigRecord(), FakeGrid(2)))
        users = [{"w": rng.standard_normal((5, 8)) * 0.1} for _ in range(2)]  # norms ~ 0.28
        s.aggregate_train(r, [_reply(m, u, s.clip, g) for m, u in zip(msgs, users)])
    assert 0.1 < s.clip < 1.0
