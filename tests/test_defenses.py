"""The defense mechanisms in a tiny in-process federation: each batch-rule defense's global model equals its
rule on the users' decoded uploads, the detector reports against the attack's ground truth, and the Flower
rule names switch the strategy."""

from __future__ import annotations

import numpy as np
import pytest

from fedrec.errors import ConfigError
from fedrec.federated import protocol as P
from strategies.update_batch import RowUpdates, UpdateBatch
from tests.test_mechanisms import _serve
from tests.test_strategies import task_identity  # noqa: F401  (autouse fixture: Message() needs it)

ITEMS = "item_emb.weight"
BASE = ["federation=device", "federation.num_nodes=3", "federation.rounds=1", "federation.user_fraction=0.6"]


def _batch(replies, g0) -> UpdateBatch:
    """The round's per-user row-sparse uploads, decoded independently of the server's code path."""
    rows_key, offsets_key, values_key = P.row_keys(ITEMS)
    parts = []
    for r in replies:
        a = {k: v.numpy() for k, v in r.content["arrays"].items()}
        users = r.content[P.USER_WEIGHTS]["users"].numpy()
        parts.append(UpdateBatch({}, users, np.zeros(len(users), int), np.ones(len(users)),
                                 rows={ITEMS: RowUpdates(g0[ITEMS].astype(np.float32), a[offsets_key].astype(np.int64),
                                                         a[rows_key].astype(np.int64), a[values_key])}))
    return UpdateBatch.concat(parts)


def test_row_trimmedmean_without_trim_is_fedavg_in_a_run(tiny_cfg, tmp_path):
    """The scale fix end to end: beta = 0 gives the global rows plus the sum of every user's deltas over all
    sampled users (FedAvg's mean), computed here from the uploads by a numpy loop."""
    g0, got, replies, _ = _serve(tiny_cfg(*BASE, "defense=row_trimmedmean", "defense.beta=0.0", model="bpr"),
                                 tmp_path, "rtm")
    b = _batch(replies, g0)
    want = g0[ITEMS].copy()
    ru = b.rows[ITEMS]
    for u in range(len(b)):
        sl = slice(ru.offsets[u], ru.offsets[u + 1])
        want[ru.rows[sl]] += ru.values[sl].astype(np.float64) / len(b)
    np.testing.assert_allclose(got[ITEMS], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("defense,rule", [
    ("row_krum", lambda b: __import__("strategies.row_robust", fromlist=["x"]).row_krum(b, 1)),
    ("hierarchical_clip", lambda b: __import__("strategies.row_robust", fromlist=["x"]).hierarchical_clip(b, 3.0, 3.0)),
])
def test_batch_rule_defenses_apply_their_rule_to_the_round(tiny_cfg, tmp_path, defense, rule):
    extra = ["defense.f=1"] if defense == "row_krum" else []
    g0, got, replies, recorder = _serve(tiny_cfg(*BASE, f"defense={defense}", *extra, model="bpr"), tmp_path, defense)
    np.testing.assert_allclose(got[ITEMS], rule(_batch(replies, g0))[ITEMS], rtol=1e-5, atol=1e-6)
    assert recorder.extra["defense"]["name"] == defense


def test_update_detect_reports_detection_against_the_scaling_attackers(tiny_cfg, tmp_path):
    from fedrec.defenses.update_detect import detect_and_average

    cfg = tiny_cfg(*BASE, "federation.user_fraction=1.0", "defense=update_detect", "attack=scaling",
                   "attack.scale=100", "attack.fraction=0.1", model="bpr")
    g0, got, replies, recorder = _serve(cfg, tmp_path, "ud")
    b = _batch(replies, g0)
    want, scores, flagged = detect_and_average(b, {}, 3.5, 0.2)
    np.testing.assert_allclose(got[ITEMS], want[ITEMS], rtol=1e-5, atol=1e-6)
    section = recorder.extra["defense"]
    det = section["detection"]
    assert det["examples"] == len(b) and det["malicious"] >= 1
    assert det["auc"] == 1.0 and det["recall"] == 1.0  # 100x uploads: every attacker flagged
    assert section["dropped_uploads"] == int(flagged.sum()) and section["dropped_malicious_users"] == det["malicious"]


@pytest.mark.parametrize("name,strategy", [("krum", "krum"), ("median", "fedmedian"), ("trimmedmean", "fedtrimmedavg"),
                                           ("multikrum", "multikrum"), ("bulyan", "bulyan")])
def test_flower_rule_names_switch_the_strategy(tiny_cfg, name, strategy):
    from fedrec.mechanisms import build_mechanisms

    cfg = tiny_cfg("federation=silo", "federation.num_nodes=8", f"defense={name}")
    (m,) = [x for x in build_mechanisms(cfg) if x.kind == "defense"]  # beside attack=none's inactive one
    assert m.strategy_overrides()["name"] == strategy


def test_flower_krum_run_uses_flowers_krum(tiny_cfg, tmp_path):
    from strategies import FedrecKrum

    g0, got, replies, recorder = _serve(tiny_cfg("federation=silo", "federation.num_nodes=5", "federation.rounds=1",
                                                 "defense=krum"), tmp_path, "krum")
    uploads = [{k: a.numpy().astype(np.float64) for k, a in r.content["arrays"].items()} for r in replies]
    # Krum returns one of the uploads unchanged
    assert any(all(np.allclose(got[k], u[k], atol=1e-6) for k in got) for u in uploads)
    assert recorder.extra["defense"]["strategy"] == "krum" and FedrecKrum is not None


@pytest.mark.parametrize("overrides,message", [
    (["defense=krum", "federation=silo", "federation.num_nodes=4"], "needs federation.num_nodes > 2 x num_malicious_nodes"),
    (["defense=row_trimmedmean", "defense.beta=0.5", *BASE], "defense.beta: must be in"),
    (["defense=update_detect", "defense.max_drop=1.0", *BASE], "defense.max_drop"),
    (["defense=row_krum", "federation=silo"], "defense=row_krum: needs federation=device"),
    (["defense=hierarchical_clip", "defense.keep_rows=0", *BASE], "defense.keep_rows"),
])
def test_bad_defense_configs_fail_with_one_line(tiny_cfg, overrides, message):
    from fedrec.config import validate

    with pytest.raises(ConfigError, match=message):
        validate(tiny_cfg(*overrides))


@pytest.mark.slow  # the attack center's pass over the users: ~20 s on an idle core
def test_fedrecattack_on_several_nodes_reports_the_same_metric_keys(tiny_cfg, tmp_path):
    """Nodes without a malicious client report the attack's counts as zeros: Flower's FedAvg refuses replies
    whose metric keys differ (the defense grid runs FedRecAttack on 10 nodes)."""
    cfg = tiny_cfg("federation=device", "federation.num_nodes=3", "federation.rounds=1", "federation.user_fraction=1.0",
                   "federation.local_optimizer=sgd", "attack=fedrecattack", "attack.count=1", "model.sampling=all_pairs",
                   model="bpr")
    _, _, replies, recorder = _serve(cfg, tmp_path, "fra3")
    keys = [sorted(k for k in r.content["metrics"] if k.startswith("count/")) for r in replies]
    assert len(replies) == 3 and all(k == keys[0] for k in keys) and "count/malicious-rows" in keys[0]
    assert recorder.rounds_done == 1


def test_inprocess_backend_runs_without_a_task_identity(tiny_cfg, tmp_path, monkeypatch):
    """`simulations.run ... federation.backend=inprocess` in a fresh process (no Ray, no ServerApp) has no Flower
    task identity; the backend sets the server's, or Message() fails before round 1."""
    from flwr.supercore.task_identity import TaskIdentity

    from fedrec.experiment import execute

    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, None)
    summary = execute(tiny_cfg(*BASE, "federation.backend=inprocess", "defense=update_detect", model="bpr"),
                      tmp_path / "run", progress=False)
    assert summary["rounds"] == 1 and summary["defense"]["name"] == "update_detect"
