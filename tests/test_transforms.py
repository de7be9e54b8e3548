"""The data seam (issue 9, item 3): data transforms at load, the injected-user mask, and the rule that
no metric ever counts an injected user (server side, node-side sums, next-item evaluation)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from omegaconf import OmegaConf

from fedrec.data import Interactions, load_dataset, load_run_data, partition_users
from fedrec.data.transforms import apply_transforms
from fedrec.errors import DataError
from fedrec.eval import RankingAccumulator, evaluate_model
from tests.test_strategies import task_identity  # noqa: F401  (autouse fixture: Message() needs it)

TINY_DATA = {"name": "synthetic", "kind": "synthetic", "n_users": 60, "n_items": 50, "n_clusters": 3,
             "mean_interactions": 12}


def tiny_data_cfg(**extra):
    from fedrec.data.loaders import REPO_ROOT

    return OmegaConf.merge(OmegaConf.load(REPO_ROOT / "conf" / "dataset" / "synthetic.yaml"), TINY_DATA, extra)


@dataclasses.dataclass(frozen=True)
class CopyUsers:
    """Test transform: injects copies of the first ``n`` users, WITH their valid/test items, so that
    only the mask keeps them out of the metrics (shilling fakes have no held-out items)."""

    n: int = 5

    def key(self) -> str:
        return f"test.copy_users(n={self.n})"

    def apply(self, data: Interactions, seed: int) -> Interactions:
        rows = np.arange(self.n)
        seq = None if data.train_seq is None else data.train_seq.subset(rows)
        return data.append_users(data.train[rows], np.array([f"copy-{u}" for u in rows]), injected=True,
                                 valid=data.valid[rows], test=data.test[rows], train_seq=seq)


# ----------------------------------------------------------------------------- load_run_data


def test_no_transform_is_load_dataset():
    cfg = tiny_data_cfg()
    a, b = load_dataset(cfg, 3), load_run_data(cfg, 3)
    assert b.injected is None and b.summary() == a.summary() and b.summary()["injected_users"] == 0
    assert (a.train != b.train).nnz == 0


def test_transform_appends_marked_users_and_keeps_the_rest():
    cfg = tiny_data_cfg()
    base = load_dataset(cfg, 0)
    data = load_run_data(cfg, 0, (CopyUsers(5),))
    assert data.n_users == base.n_users + 5 and data.summary()["injected_users"] == 5
    assert data.injected.dtype == bool and data.injected[-5:].all() and not data.injected[:-5].any()
    assert (data.train[:base.n_users] != base.train).nnz == 0  # genuine rows keep their index
    assert (data.test[-5:] != base.test[:5]).nnz == 0
    assert data.user_features["cluster"][-5:].tolist() == [-1] * 5  # the loaders' "missing" code
    assert data.train_seq.user(base.n_users).tolist() == base.train_seq.user(0).tolist()
    assert np.array_equal(data.genuine(), np.arange(base.n_users))


class _Bad:
    def __init__(self, name, fn):
        self.name, self.fn = name, fn

    def key(self):
        return f"test.bad.{self.name}"

    def apply(self, data, seed):
        return self.fn(data)


def _rows_only(d):  # adds training rows without valid/test rows
    return dataclasses.replace(d, train=sp.vstack([d.train, d.train[:2]], format="csr"))


def _items(d):
    return dataclasses.replace(d, train=d.train[:, :-1], valid=d.valid[:, :-1], test=d.test[:, :-1],
                               item_ids=d.item_ids[:-1])


def _in_place(d):
    d.train = d.train.copy()  # the input object itself changes: a cached copy would be corrupted
    d.train.data[0] = 0
    d.train.eliminate_zeros()
    return dataclasses.replace(d)


def _no_seq(d):  # adds users but leaves the sequences as they were
    grown = d.append_users(d.train[:2], np.array(["x", "y"]), injected=True, train_seq=d.train_seq.subset([0, 1]))
    return dataclasses.replace(grown, train_seq=d.train_seq)


def _unmark(d):
    return dataclasses.replace(d, injected=np.zeros(d.n_users, bool))


@pytest.mark.parametrize("name,fn,message", [
    ("rows", _rows_only, r"valid has shape"),
    ("items", _items, r"changed the catalogue"),
    ("in_place", _in_place, r"changed its input in place"),
    ("seq", _no_seq, r"train_seq covers 62 users, the data has 64: this transform does not support sequence data"),
    ("unmark", _unmark, r"user 'copy-0' was injected and is no longer marked"),
])
def test_inconsistent_transforms_are_refused_naming_the_transform(name, fn, message):
    cfg = tiny_data_cfg()
    first = (CopyUsers(2),) if name in ("unmark", "seq") else ()
    with pytest.raises(DataError, match=rf"data transform test\.bad\.{name}: " + message):
        load_run_data(cfg, 0, first + (_Bad(name, fn),))


def test_not_a_transform_is_refused():
    with pytest.raises(TypeError, match="needs key"):
        apply_transforms(load_dataset(tiny_data_cfg(), 0), 0, (object(),))


def test_append_users_refuses_sequence_data_without_sequences():
    data = load_dataset(tiny_data_cfg(), 0)
    with pytest.raises(ValueError, match="keeps sequences"):
        data.append_users(data.train[:2], np.array(["x", "y"]), injected=True)


# ----------------------------------------------------------------------------- the mask travels


def test_mask_survives_subset_users_and_partitions():
    data = load_run_data(tiny_data_cfg(), 0, (CopyUsers(7),))
    pick = np.array([61, 3, 65, 0])
    sub = data.subset_users(pick)
    assert sub.injected.tolist() == [True, False, True, False] and sub.summary()["injected_users"] == 2
    assert sub.genuine().tolist() == [1, 3]
    for method, kw in (("iid", {}), ("dirichlet", {"alpha": 0.5}), ("attribute", {"attribute": "cluster"})):
        parts = partition_users(data, method, 3, seed=1, **kw)
        assert sorted(np.concatenate(parts).tolist()) == list(range(data.n_users))
        assert sum(data.subset_users(p).n_injected for p in parts) == 7
    parts = partition_users(data, "user", data.n_users, seed=1)
    assert [data.subset_users(p).injected[0] for p in parts] == data.injected.tolist()


def test_attribute_partition_places_genuine_groups_as_before_and_spreads_injected_users():
    cfg = tiny_data_cfg()
    base = load_dataset(cfg, 0)
    data = load_run_data(cfg, 0, (CopyUsers(7),))
    before = partition_users(base, "attribute", 3, seed=1, attribute="cluster")
    after = partition_users(data, "attribute", 3, seed=1, attribute="cluster")
    for b, a in zip(before, after):
        assert a[a < base.n_users].tolist() == b.tolist()  # genuine users: the same node as without fakes
    fakes = [int((a >= base.n_users).sum()) for a in after]
    assert sum(fakes) == 7 and max(fakes) - min(fakes) <= 1  # not all on the "missing" group's node


def test_user_partition_error_counts_injected_users():
    from fedrec.errors import ConfigError

    data = load_run_data(tiny_data_cfg(), 0, (CopyUsers(3),))
    with pytest.raises(ConfigError, match=r"num_nodes = 63, 3 of them injected"):
        partition_users(data, "user", 60, seed=0)


# ----------------------------------------------------------------------------- no metric counts them


def _trained_multvae(data, seed=0):
    from fedrec.models import build_model, data_shape
    from fedrec.config import compose
    from fedrec.train import make_optimizer, model_rows, train_epoch

    cfg = compose(["model=multvae", "model.hidden_dims=[16]", "model.latent_dim=8"])
    torch.manual_seed(seed)
    model = build_model(cfg.model, data_shape(data, seed=seed))
    opt = make_optimizer(model, cfg.model.optim)
    train_epoch(model, opt, model_rows(model, data, np.arange(data.n_users)), 16, np.random.default_rng(seed))
    return model


def _same(a: dict, b: dict, tol: float = 1e-9):
    for split in ("valid", "test"):
        assert a["_sums"][split]["users"] == b["_sums"][split]["users"]
        for k, v in a["_sums"][split]["sums"].items():
            assert v == pytest.approx(b["_sums"][split]["sums"][k], abs=tol), (split, k)
        assert a[split] == pytest.approx(b[split], abs=tol)


def test_injected_users_with_held_out_items_never_count_in_full_ranking():
    cfg = tiny_data_cfg()
    plain = load_dataset(cfg, 0)
    data = load_run_data(cfg, 0, (CopyUsers(10),))
    model = _trained_multvae(data)  # trained with the fakes, as an attacked run would be
    ks = [5, 10]
    with_fakes, without = evaluate_model(model, data, ks), evaluate_model(model, plain, ks)
    _same(with_fakes, without)
    # the mask is what keeps them out: unmasked, the copies (which have test items) would count
    unmasked = dataclasses.replace(data, injected=None)
    assert evaluate_model(model, unmasked, ks)["_sums"]["test"]["users"] > without["_sums"]["test"]["users"]
    # an explicit user list with injected users in it is filtered too (other batches: float32 sums
    # in another order, hence the tolerance)
    _same(evaluate_model(model, data, ks, users=np.arange(data.n_users)[::-1]), without, tol=1e-5)


def test_injected_users_never_count_in_next_item_evaluation(tmp_path):
    from tests.test_sequences import LastItemScores, _seq_cfg

    rng = np.random.default_rng(3)
    lines = [" ".join(map(str, [u + 1, *(rng.permutation(12)[:rng.integers(3, 8)] + 1)])) for u in range(9)]
    cfg = _seq_cfg(tmp_path, "\n".join(lines) + "\n")
    plain, data = load_dataset(cfg, 0), load_run_data(cfg, 0, (CopyUsers(4),))
    assert data.input_sequences("test").lengths[-4:].tolist() == plain.input_sequences("test").lengths[:4].tolist()
    model = LastItemScores(rng.random((plain.n_items + 1, plain.n_items)), 4)
    _same(evaluate_model(model, data, [1, 3], batch_size=4), evaluate_model(model, plain, [1, 3], batch_size=4))


def test_node_side_sums_add_up_to_the_server_result_with_injected_users(tiny_cfg, monkeypatch):
    """The ClientApp's evaluate on every partition, its sums pooled, equals the server's evaluation."""
    from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

    from fedrec.federated import client_app, node
    from fedrec.federated import protocol as P
    from fedrec.federated.arrays import global_arrays
    from fedrec.models import build_model, data_shape

    cfg = tiny_cfg("federation=silo", "federation.num_nodes=3", "partition=iid", model="multvae")
    transforms = (CopyUsers(8),)
    cfg_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    # the mechanism layer will build the transforms from the config; here they are handed in
    monkeypatch.setattr(client_app, "node_view", lambda y, nc: node.node_view(y, nc, transforms))
    server_data = load_run_data(cfg.dataset, int(cfg.seed), transforms)
    torch.manual_seed(int(cfg.seed))
    model = build_model(cfg.model, data_shape(server_data, seed=int(cfg.seed)))
    ks = list(cfg.eval.ks)
    server = evaluate_model(model, server_data, ks, int(cfg.eval.batch_size))
    assert server["_sums"]["test"]["users"] == server_data.n_users - 8
    totals: dict[str, float] = {}
    for pid in range(3):
        conf = ConfigRecord({P.CONFIG: cfg_yaml, P.ROUND: 1})
        msg = Message(RecordDict({"arrays": global_arrays(model), "config": conf}), dst_node_id=1,
                      message_type=MessageType.EVALUATE)
        ctx = Context(run_id=1, node_id=pid + 1, node_config={"partition-id": pid, "num-partitions": 3},
                      state=RecordDict(), run_config={})
        view = node.node_view(cfg_yaml, {"partition-id": pid}, transforms)
        assert view.data.n_injected == 8  # every node sees the same injected users
        reply = client_app.evaluate(msg, ctx)
        for k, v in reply.content["metrics"].items():
            totals[k] = totals.get(k, 0) + v
    for split in ("valid", "test"):
        acc = RankingAccumulator(sorted(ks))
        acc.add({k: totals[f"{split}/{k}/sum"] for k in acc.sums}, int(totals[f"{split}/users"]))
        assert acc.users == server["_sums"][split]["users"]
        assert acc.result() == pytest.approx(server[split], abs=1e-6)  # float32 sums per batch


def test_node_cache_is_keyed_by_the_transform_keys(tiny_cfg):
    from fedrec.federated.node import node_view

    cfg_yaml = OmegaConf.to_yaml(tiny_cfg("federation=silo", "federation.num_nodes=2"), resolve=True)
    plain = node_view(cfg_yaml, {"partition-id": 0})
    a = node_view(cfg_yaml, {"partition-id": 0}, (CopyUsers(3),))
    b = node_view(cfg_yaml, {"partition-id": 1}, [CopyUsers(3)])  # another object, the same key
    c = node_view(cfg_yaml, {"partition-id": 0}, (CopyUsers(4),))
    assert plain.data.n_injected == 0 and a.data.n_injected == 3 and c.data.n_injected == 4
    assert a.data is b.data  # loaded and transformed once per process
    assert sorted(np.concatenate([a.users, b.users]).tolist()) == list(range(a.data.n_users))


def test_run_summary_counts_injected_users(tiny_cfg, tmp_path, capsys):
    from fedrec.experiment import execute

    cfg = tiny_cfg("federation=none", "train.epochs=1", model="multvae")
    summary = execute(cfg, tmp_path / "run", progress=False, transforms=(CopyUsers(4),))
    assert summary["dataset"]["injected_users"] == 4 and summary["dataset"]["users"] == 64
    from simulations.report import collect

    assert [r["injected_users"] for r in collect(tmp_path)] == [4]  # and the sweep table shows it
