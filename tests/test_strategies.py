"""The fedrec strategy layer (``strategies/``) driven by hand-made Flower messages (no simulation)."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from omegaconf import OmegaConf

from fedrec.config import CONF_DIR
from fedrec.errors import ConfigError
from strategies import STRATEGIES, ClientFailure, FedrecFedAvg, build_strategy, exact_metric_mean



@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Outside a ServerApp, Flower's Message() needs the process's task identity; set a fake one."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_node_id", 1), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)


SHAPES = {"enc.weight": (4, 3), "enc.bias": (4,), "dec.weight": (3, 4)}


class FakeGrid:
    """The part of ``flwr.serverapp.Grid`` that ``configure_train`` touches: node ids, and answers to
    the partition query (node ``ids[i]`` hosts partition ``n - 1 - i``, so ids and partitions differ)."""

    def __init__(self, n: int = 10, ids=None, partitions=None):
        self.ids = [int(i) for i in ids] if ids is not None else [1000 + 7 * i for i in range(n)]
        self.partitions = [int(p) for p in partitions] if partitions is not None else None
        self.queries = 0

    def get_node_ids(self):
        return list(self.ids)

    def partition_of(self, node_id: int) -> int:
        i = self.ids.index(node_id)
        return self.partitions[i] if self.partitions is not None else len(self.ids) - 1 - i

    def send_and_receive(self, messages, timeout=None):
        out = []
        for m in messages:
            assert m.metadata.message_type == MessageType.QUERY
            self.queries += 1
            out.append(Message(RecordDict({"metrics": MetricRecord(
                {"partition-id": self.partition_of(m.metadata.dst_node_id)})}), reply_to=m))
        return out


def make_arrays(rng: np.random.Generator, shapes=SHAPES, scale: float = 1.0) -> dict[str, np.ndarray]:
    return {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()})


def reply(to: Message, arrays: dict[str, np.ndarray], n, **metrics) -> Message:
    content = RecordDict({"arrays": to_record(arrays), "metrics": MetricRecord({"num-examples": n, **metrics})})
    return Message(content, reply_to=to)


def strategy_cfg(name: str):
    return OmegaConf.load(CONF_DIR / "strategy" / f"{name}.yaml")


def fedavg(num_nodes=10, fraction=1.0, seed=0, **kw):
    return build_strategy({"name": "fedavg", **kw}, num_nodes=num_nodes, fraction=fraction, seed=seed,
                          client_evaluation=False)


def start_round(strategy, global_arrays, server_round=1, grid=None, config=None):
    msgs = list(strategy.configure_train(server_round, to_record(global_arrays), config or ConfigRecord({}),
                                         grid or FakeGrid()))
    return msgs


def as_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in record.items()}


# ----------------------------------------------------------------------------- aggregation
def test_weighted_average_matches_numpy():
    rng = np.random.default_rng(0)
    g = make_arrays(rng)
    s = fedavg()
    msgs = start_round(s, g)
    assert len(msgs) == 10
    weights = [5, 1, 30, 2, 7]
    client = [make_arrays(rng) for _ in weights]
    replies = [reply(m, a, w, loss=float(i)) for i, (m, a, w) in enumerate(zip(msgs, client, weights))]
    arrays, metrics = s.aggregate_train(1, replies)
    total = sum(weights)
    for k in SHAPES:
        want = sum(w * a[k].astype(np.float64) for w, a in zip(weights, client)) / total
        np.testing.assert_allclose(arrays[k].numpy(), want, rtol=1e-5, atol=1e-6)
    assert metrics["loss"] == pytest.approx(sum(w * i for i, w in enumerate(weights)) / total)
    assert s.last_train["clients"] == 5
    assert s.last_train["rejected-updates"] == 0
    assert s.last_train_s is not None and s.last_train_s >= 0


def test_reported_weights_are_capped_at_what_the_server_knows_of_the_partition():
    """A node claiming more examples than its partition holds weighs its partition's size, and is counted."""
    rng = np.random.default_rng(5)
    g = make_arrays(rng)
    s = fedavg(num_nodes=3)
    s.weight_bounds = {0: 10.0, 1: 20.0, 2: 30.0}
    msgs = start_round(s, g, grid=FakeGrid(3))
    client = [make_arrays(rng) for _ in range(3)]
    reported = [10, 1e6, 25]  # partition 1 inflates its num-examples
    replies = [reply(m, a, w, **{"partition-id": pid}) for pid, (m, a, w) in enumerate(zip(msgs, client, reported))]
    arrays, _ = s.aggregate_train(1, replies)
    used = [10, 20, 25]
    for k in SHAPES:
        want = sum(w * a[k].astype(np.float64) for w, a in zip(used, client)) / sum(used)
        np.testing.assert_allclose(arrays[k].numpy(), want, rtol=1e-5, atol=1e-6)
    assert s.last_train["capped-weights"] == 1


def test_partition_weight_bounds_follow_the_partition(tiny_cfg):
    from fedrec.data import load_dataset
    from fedrec.data.partition import partition_from_cfg
    from fedrec.federated.server_app import partition_weight_bounds
    from fedrec.run_config import federation

    cfg = tiny_cfg("federation=device", "federation.num_nodes=3", "federation.weighting=interactions",
                   "federation.max_user_interactions=5")
    data = load_dataset(cfg.dataset, 0)
    parts = partition_from_cfg(data, cfg.partition, 3, 0)
    counts = np.minimum(np.diff(data.train.indptr), 5)
    assert partition_weight_bounds(cfg, data, federation(cfg)) == {p: float(counts[u].sum()) for p, u in enumerate(parts)}
    silo = tiny_cfg("federation.num_nodes=3")
    assert partition_weight_bounds(silo, data, federation(silo)) == {p: float(len(u)) for p, u in enumerate(parts)}


def _bad_updates(rng):
    nan = make_arrays(rng)
    nan["enc.bias"][1] = np.nan
    inf = make_arrays(rng)
    inf["dec.weight"][0, 0] = -np.inf
    shape = make_arrays(rng)
    shape["enc.weight"] = np.zeros((3, 4), np.float32)
    extra = make_arrays(rng) | {"user_emb.weight": np.zeros((2, 2), np.float32)}
    missing = make_arrays(rng)
    del missing["dec.weight"]
    return {"nan": (nan, 3), "inf": (inf, 3), "shape": (shape, 3), "extra": (extra, 3),
            "missing": (missing, 3), "zero-examples": (make_arrays(rng), 0),
            "nan-examples": (make_arrays(rng), float("nan"))}


@pytest.mark.parametrize("bad", ["nan", "inf", "shape", "extra", "missing", "zero-examples", "nan-examples"])
def test_bad_update_rejected_and_counted(bad):
    rng = np.random.default_rng(1)
    g = make_arrays(rng)
    good = [(make_arrays(rng), 4), (make_arrays(rng), 6)]
    bad_arrays, bad_n = _bad_updates(rng)[bad]

    clean = fedavg()
    msgs = start_round(clean, g)
    want, _ = clean.aggregate_train(1, [reply(m, a, n) for m, (a, n) in zip(msgs, good)])

    s = fedavg()
    msgs = start_round(s, g)
    replies = [reply(msgs[0], *good[0]), reply(msgs[1], bad_arrays, bad_n), reply(msgs[2], *good[1])]
    got, _ = s.aggregate_train(1, replies)
    if bad == "zero-examples":  # a node none of whose users trained: skipped, not an attack
        assert s.last_train["empty-replies"] == 1 and s.last_train["rejected-updates"] == 0
    else:
        assert s.last_train["rejected-updates"] == 1
        assert len(s.last_train["rejected-reasons"]) == 1
    assert s.last_train["clients"] == 2
    for k in SHAPES:
        np.testing.assert_array_equal(got[k].numpy(), want[k].numpy())


def test_all_updates_rejected_gives_no_arrays():
    rng = np.random.default_rng(2)
    s = fedavg()
    msgs = start_round(s, make_arrays(rng))
    bad = _bad_updates(rng)
    arrays, metrics = s.aggregate_train(1, [reply(m, *bad[k]) for m, k in zip(msgs, ["nan", "shape"])])
    assert arrays is None and metrics is None
    assert s.last_train == {"clients": 0, "rejected-updates": 2, "empty-replies": 0,
                            "rejected-reasons": s.last_train["rejected-reasons"]}


def test_error_reply_raises_client_failure():
    rng = np.random.default_rng(3)
    s = fedavg()
    msgs = start_round(s, make_arrays(rng))
    replies = [reply(msgs[0], make_arrays(rng), 3), Message(Error(code=1, reason="boom in client"), reply_to=msgs[1])]
    with pytest.raises(ClientFailure, match="boom in client"):
        s.aggregate_train(1, replies)
    with pytest.raises(ClientFailure, match="boom in client"):
        s.aggregate_evaluate(1, replies)


# ----------------------------------------------------------------------------- exact metric mean
def test_exact_metric_mean_is_pooled_mean():
    rng = np.random.default_rng(4)
    users = {"valid": [3, 50, 1, 17], "test": [2, 49, 1, 0]}
    per_user = {s: [rng.random(n) for n in users[s]] for s in users}
    contents = []
    for i in range(4):
        m = {}
        for s in users:
            m[f"{s}/recall@10/sum"] = float(per_user[s][i].sum())
            m[f"{s}/users"] = users[s][i]
        m["num-examples"] = 1  # a weight key must not disturb the exact mean
        contents.append(RecordDict({"metrics": MetricRecord(m)}))
    out = exact_metric_mean(contents, "num-examples")
    for s in users:
        pooled = np.concatenate(per_user[s]).mean()
        assert out[f"{s}/recall@10"] == pytest.approx(pooled)
        # the mean of node means would be different here (uneven node sizes)
        node_means = np.mean([p.mean() for p in per_user[s] if len(p)])
        assert not math.isclose(out[f"{s}/recall@10"], node_means, rel_tol=1e-3)
    assert set(out.keys()) == {"valid/recall@10", "test/recall@10"}


def test_exact_metric_mean_no_users_is_nan():
    rd = RecordDict({"metrics": MetricRecord({"test/ndcg@5/sum": 0.0, "test/users": 0})})
    assert math.isnan(exact_metric_mean([rd], "num-examples")["test/ndcg@5"])


def test_aggregate_evaluate_uses_exact_mean():
    s = build_strategy(strategy_cfg("fedavg"), num_nodes=3, fraction=1.0, seed=0, client_evaluation=True)
    grid = FakeGrid(3)
    msgs = list(s.configure_evaluate(1, to_record(make_arrays(np.random.default_rng(0))), ConfigRecord({}), grid))
    assert len(msgs) == 3
    sums, users = [1.0, 9.0, 0.5], [2, 30, 1]
    replies = [Message(RecordDict({"metrics": MetricRecord({"valid/hr@5/sum": x, "valid/users": n,
                                                            "num-examples": n})}), reply_to=m)
               for m, x, n in zip(msgs, sums, users)]
    out = s.aggregate_evaluate(1, replies)
    assert out["valid/hr@5"] == pytest.approx(sum(sums) / sum(users))
    assert s.last_eval is out and s.last_eval_s >= 0


# ----------------------------------------------------------------------------- build_strategy
@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_builds_from_its_yaml(name):
    cfg = strategy_cfg(name)
    assert cfg.name == name
    s = build_strategy(cfg, num_nodes=4, fraction=0.5, seed=1, client_evaluation=True)
    assert isinstance(s, STRATEGIES[name])
    assert s.sample_size == 2 and s.min_available_nodes == 4
    assert s.fraction_evaluate == 1.0 and s.min_evaluate_nodes == 4
    s2 = build_strategy(cfg, num_nodes=4, fraction=1.0, seed=1, client_evaluation=False)
    assert s2.fraction_evaluate == 0.0
    assert list(s2.configure_evaluate(1, to_record(make_arrays(np.random.default_rng(0))), ConfigRecord({}),
                                      FakeGrid(4))) == []


def test_build_strategy_does_not_mutate_cfg():
    cfg = strategy_cfg("fedadam")
    before = OmegaConf.to_container(cfg)
    build_strategy(cfg, num_nodes=2, fraction=1.0, seed=0, client_evaluation=False)
    assert OmegaConf.to_container(cfg) == before


@pytest.mark.parametrize("name", ["nope", None, ""])
def test_unknown_strategy_name(name):
    with pytest.raises(ConfigError, match=r"strategy\.name"):
        build_strategy({"name": name}, num_nodes=2, fraction=1.0, seed=0, client_evaluation=False)


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_bad_fraction(fraction):
    with pytest.raises(ConfigError, match=r"federation\.fraction"):
        fedavg(fraction=fraction)


def test_unknown_strategy_kwarg():
    with pytest.raises(ConfigError, match="strategy"):
        build_strategy({"name": "fedavg", "learning_rate_typo": 0.1}, num_nodes=2, fraction=1.0, seed=0,
                       client_evaluation=False)


# ----------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("num_nodes,fraction,size", [(10, 0.3, 3), (10, 0.25, 3), (10, 1.0, 10), (10, 0.01, 1),
                                                     (49, 1 / 49, 1), (7, 0.5, 4)])
def test_sample_size(num_nodes, fraction, size):
    s = fedavg(num_nodes=num_nodes, fraction=fraction)
    assert s.sample_size == size
    assert s.min_train_nodes == size
    assert s.min_available_nodes == num_nodes  # round 1 waits for every node
    msgs = start_round(s, make_arrays(np.random.default_rng(0)), grid=FakeGrid(num_nodes))
    assert len(msgs) == size


def test_configure_train_samples_reproducibly_and_copies_config():
    g = make_arrays(np.random.default_rng(0))
    config = ConfigRecord({"fedrec-config": "yaml text"})
    s = fedavg(fraction=0.3, seed=5)
    msgs = start_round(s, g, server_round=2, config=config)
    assert len(msgs) == 3
    ids = [m.metadata.dst_node_id for m in msgs]
    assert len(set(ids)) == 3 and set(ids) <= set(FakeGrid().ids)
    assert all(m.metadata.message_type == MessageType.TRAIN for m in msgs)
    # the caller's record is untouched; the sent one carries the (offset) round
    assert dict(config) == {"fedrec-config": "yaml text"}
    sent = msgs[0].content["config"]
    assert sent["fedrec-round"] == 2 and sent["fedrec-config"] == "yaml text"
    np.testing.assert_array_equal(msgs[0].content["arrays"]["enc.weight"].numpy(), g["enc.weight"])

    # same seed and round -> same nodes, whatever happened to the global RNG in between
    import random

    random.seed(12345)
    again = [m.metadata.dst_node_id for m in start_round(fedavg(fraction=0.3, seed=5), g, server_round=2)]
    assert again == ids
    # a resumed strategy (round_offset) samples global round 2 like the original did
    resumed = fedavg(fraction=0.3, seed=5)
    resumed.round_offset = 1
    msgs_r = start_round(resumed, g, server_round=1)
    assert [m.metadata.dst_node_id for m in msgs_r] == ids
    assert msgs_r[0].content["config"]["fedrec-round"] == 2
    # other rounds/seeds sample differently (at least one of several)
    others = {tuple(m.metadata.dst_node_id for m in start_round(fedavg(fraction=0.3, seed=5), g, server_round=r))
              for r in range(3, 9)}
    assert len(others) > 1


# ----------------------------------------------------------------------------- server-optimiser state
def _drive(strategy, g, rounds, seed_base=100):
    """Run ``rounds`` (global round numbers) of configure/aggregate with deterministic client updates."""
    outs = []
    for rnd in rounds:
        local = rnd - strategy.round_offset
        msgs = start_round(strategy, g, server_round=local, grid=FakeGrid(4))
        rng = np.random.default_rng(seed_base + rnd)
        replies = [reply(m, {k: g[k] + 0.1 * rng.standard_normal(v.shape).astype(np.float32) for k, v in g.items()},
                         int(rng.integers(1, 20))) for m in msgs]
        arrays, _ = strategy.aggregate_train(local, replies)
        g = as_numpy(arrays)
        outs.append(g)
    return outs


def _roundtrip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)  # what a checkpoint does
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def _compare_resume(name):
    g0 = make_arrays(np.random.default_rng(9))
    full = build_strategy(strategy_cfg(name), num_nodes=4, fraction=1.0, seed=0, client_evaluation=False)
    want = _drive(full, g0, [1, 2, 3, 4])

    first = build_strategy(strategy_cfg(name), num_nodes=4, fraction=1.0, seed=0, client_evaluation=False)
    part = _drive(first, g0, [1, 2])
    state = _roundtrip(first.state())

    resumed = build_strategy(strategy_cfg(name), num_nodes=4, fraction=1.0, seed=0, client_evaluation=False)
    resumed.load_state(state)
    resumed.round_offset = 2  # as fedrec.federated.server_app.serve does
    got = part + _drive(resumed, part[-1], [3, 4])
    for r, (a, b) in enumerate(zip(want, got), start=1):
        for k in SHAPES:
            np.testing.assert_allclose(b[k], a[k], rtol=1e-6, atol=1e-7, err_msg=f"round {r} {k}")


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedavgm", "fedyogi"])
def test_state_roundtrip_resume_is_exact(name):
    _compare_resume(name)


def test_state_contains_server_moments():
    g0 = make_arrays(np.random.default_rng(9))
    s = build_strategy(strategy_cfg("fedadam"), num_nodes=4, fraction=1.0, seed=0, client_evaluation=False)
    _drive(s, g0, [1])
    st = _roundtrip(s.state())
    assert {"current_arrays", "m_t", "v_t"} <= set(st)
    fresh = build_strategy(strategy_cfg("fedadam"), num_nodes=4, fraction=1.0, seed=0, client_evaluation=False)
    fresh.load_state(st)
    for k in SHAPES:
        np.testing.assert_array_equal(fresh.m_t[k], s.m_t[k])
        np.testing.assert_array_equal(fresh.v_t[k], s.v_t[k])
    m = build_strategy(strategy_cfg("fedavgm"), num_nodes=4, fraction=1.0, seed=0, client_evaluation=False)
    _drive(m, g0, [1, 2])
    st = _roundtrip(m.state())
    assert st["momentum_vector"] is not None and st["current_arrays"] is not None


def test_fedadam_resume_is_exact():
    _compare_resume("fedadam")


def test_reply_without_arrays_is_rejected():
    rng = np.random.default_rng(6)
    s = fedavg()
    msgs = start_round(s, make_arrays(rng))
    no_arrays = Message(RecordDict({"metrics": MetricRecord({"num-examples": 3})}), reply_to=msgs[1])
    arrays, _ = s.aggregate_train(1, [reply(msgs[0], make_arrays(rng), 3), no_arrays])
    assert arrays is not None
    assert s.last_train["rejected-updates"] == 1


def test_per_user_upload_rejects_bad_users_and_averages_the_rest():
    """A node's stacked per-user reply: NaN users are dropped, the rest weighted as flat clients."""
    from flwr.app import Array

    rng = np.random.default_rng(7)
    s = fedavg()
    s.weighting = "interactions"  # the users' reported interaction counts are the weights (uncapped)
    msgs = start_round(s, make_arrays(rng))
    per_user = {k: rng.standard_normal((3, *shape)).astype(np.float32) for k, shape in SHAPES.items()}
    per_user["enc.bias"][1, 0] = np.nan  # user 1 is corrupt
    w = np.array([1.0, 5.0, 3.0])
    content = RecordDict({
        "arrays": ArrayRecord({k: Array(v) for k, v in per_user.items()}),
        "user-weights": ArrayRecord({"weights": Array(w)}),
        "metrics": MetricRecord({"num-examples": float(w.sum()), "per-user": 1}),
    })
    got, _ = s.aggregate_train(1, [Message(content, reply_to=msgs[0])])
    keep = np.array([0, 2])
    for k in SHAPES:
        want = (per_user[k][keep] * (w[keep] / w[keep].sum()).reshape(-1, *([1] * len(SHAPES[k])))).sum(0)
        np.testing.assert_allclose(got[k].numpy(), want, rtol=1e-6)
    assert s.last_train["rejected-updates"] == 1
    # the server derives the weights: under uniform weighting (the default) reported weights are ignored,
    # with a cap they are clipped to it
    for weighting, cap, w_used in (("uniform", None, np.ones(3)), ("interactions", 2, np.minimum(w, 2))):
        s2 = fedavg()
        s2.weighting, s2.weight_cap = weighting, cap
        got, _ = s2.aggregate_train(1, [Message(content, reply_to=start_round(s2, make_arrays(rng))[0])])
        for k in SHAPES:
            want = (per_user[k][keep] * (w_used[keep] / w_used[keep].sum()).reshape(-1, *([1] * len(SHAPES[k])))).sum(0)
            np.testing.assert_allclose(got[k].numpy(), want, rtol=1e-6)


# ----------------------------------------------------------------------------- silo choice and reply order (issue 8.4)
def _sampled_partitions(grid, seed=5, fraction=0.3, server_round=2):
    s = fedavg(fraction=fraction, seed=seed)
    msgs = start_round(s, make_arrays(np.random.default_rng(0)), server_round=server_round, grid=grid)
    return sorted(grid.partition_of(m.metadata.dst_node_id) for m in msgs)


def test_silo_sampling_depends_on_partitions_not_on_flower_node_ids():
    # Prepare: the same 10 partitions behind two sets of Flower node ids, registered in other orders
    a = FakeGrid(ids=[1000 + 7 * i for i in range(10)])
    b = FakeGrid(ids=[17 + 1_000_003 * i for i in range(10)], partitions=np.random.default_rng(3).permutation(10))
    # Execute / Assert: the same partitions train in every round, whatever the ids are
    for rnd in range(1, 8):
        assert _sampled_partitions(a, server_round=rnd) == _sampled_partitions(b, server_round=rnd)
    assert len({tuple(_sampled_partitions(a, server_round=r)) for r in range(1, 8)}) > 1  # rounds differ


def test_partitions_are_asked_once_and_must_cover_every_partition():
    grid = FakeGrid(4)
    s = fedavg(num_nodes=4, fraction=0.5)
    g = make_arrays(np.random.default_rng(0))
    for rnd in (1, 2, 3):
        start_round(s, g, server_round=rnd, grid=grid)
    assert grid.queries == 4
    bad = FakeGrid(4)
    bad.partition_of = lambda node_id: 0  # every node claims partition 0
    with pytest.raises(ConfigError, match="partition"):
        start_round(fedavg(num_nodes=4), g, grid=bad)


def test_aggregation_does_not_depend_on_reply_order():
    # float32 sums depend on their order; replies are summed in partition order
    import itertools

    s = fedavg(num_nodes=3)
    shapes = {"w": (1,)}
    g = {"w": np.zeros(1, np.float32)}
    msgs = start_round(s, g, grid=FakeGrid(3))
    values = [1e8, 1.0, -1e8]
    results = set()
    for order in itertools.permutations(range(3)):
        replies = [reply(msgs[i], {"w": np.array([values[i]], np.float32)}, 1, **{"partition-id": i}) for i in order]
        arrays, _ = s.aggregate_train(1, replies)
        results.add(float(arrays["w"].numpy()[0]))
    assert len(results) == 1, results
    del shapes


# ----------------------------------------------------------------------------- Flower's robust rules
def _robust_round(name, n=7, **params):
    rng = np.random.default_rng(11)
    g = make_arrays(rng)
    s = build_strategy({"name": name, **params}, num_nodes=n, fraction=1.0, seed=0, client_evaluation=False)
    msgs = start_round(s, g, grid=FakeGrid(n))
    uploads = [make_arrays(rng) for _ in range(n)]
    uploads[2] = {k: v + 50.0 for k, v in uploads[2].items()}  # one far-off (malicious) upload
    replies = [reply(m, a, 3, **{"partition-id": pid}) for pid, (m, a) in enumerate(zip(msgs, uploads))]
    arrays, _ = s.aggregate_train(1, replies)
    return {k: a.numpy() for k, a in arrays.items()}, uploads


def _flat(u):
    return np.concatenate([u[k].ravel().astype(np.float64) for k in SHAPES])


def _krum_scores(uploads, f):
    x = np.stack([_flat(u) for u in uploads])
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    k = len(uploads) - f - 2
    return np.array([np.sort(np.delete(d[i], i))[:k].sum() for i in range(len(uploads))])


def test_fedmedian_and_trimmed_mean_equal_numpy():
    from scipy.stats import trim_mean

    got, uploads = _robust_round("fedmedian")
    for k in SHAPES:
        np.testing.assert_allclose(got[k], np.median(np.stack([u[k] for u in uploads]), axis=0), rtol=1e-5, atol=1e-6)
    got, uploads = _robust_round("fedtrimmedavg", beta=0.2)
    for k in SHAPES:
        np.testing.assert_allclose(got[k], trim_mean(np.stack([u[k] for u in uploads]), 0.2, axis=0), rtol=1e-5, atol=1e-6)


def test_krum_and_multikrum_pick_by_numpy_scores():
    got, uploads = _robust_round("krum", num_malicious_nodes=1)
    best = int(np.argmin(_krum_scores(uploads, 1)))
    for k in SHAPES:
        np.testing.assert_allclose(got[k], uploads[best][k], rtol=1e-6)
    got, uploads = _robust_round("multikrum", num_malicious_nodes=1, num_nodes_to_select=3)
    chosen = np.argsort(_krum_scores(uploads, 1))[:3]
    assert 2 not in chosen  # the far-off upload is never selected
    for k in SHAPES:
        np.testing.assert_allclose(got[k], np.mean([uploads[i][k] for i in chosen], axis=0), rtol=1e-5, atol=1e-6)


def test_bulyan_runs_and_drops_the_far_upload():
    got, uploads = _robust_round("bulyan", n=7, num_malicious_nodes=1)
    for k in SHAPES:
        assert np.abs(got[k]).max() < 10  # the +50 upload did not pull the aggregate
