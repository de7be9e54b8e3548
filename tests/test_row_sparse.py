"""Row-sparse per-user uploads (issue 9.2): an MF user uploads only its item rows' deltas, and the
aggregates equal those of full-array uploads; bad sparse uploads are rejected user by user."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from fedrec.federated import protocol as P
from tests.test_mechanisms import _close, _serve
from tests.test_strategies import fedavg, make_arrays, start_round, task_identity  # noqa: F401  (autouse fixture)

ITEMS = "item_emb.weight"
BPR = ["federation=device", "federation.num_nodes=2", "federation.user_fraction=0.5", "train.local_epochs=2",
       "federation.local_lr=0.05", "federation.upload=per_user"]


def _decode(reply, g0: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A per-user reply -> (user ids, name -> (U, ...) updated parameters), row-sparse tables made dense."""
    arrays = {k: a.numpy() for k, a in reply.content["arrays"].items()}
    users = reply.content[P.USER_WEIGHTS]["users"].numpy()
    out = {k: v.astype(np.float64) for k, v in arrays.items() if k in g0}
    for k in g0:
        rows, offsets, values = P.row_keys(k)
        if rows in arrays:
            full = np.repeat(g0[k][None], len(users), axis=0)
            who = np.repeat(np.arange(len(users)), np.diff(arrays[offsets]))
            full[who, arrays[rows]] += arrays[values]
            out[k] = full
    return users, out


def _train_lines(tmp_path, name):
    return [json.loads(line)["train"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]


def test_bpr_uploads_only_touched_item_rows_and_aggregates_as_full_arrays(tiny_cfg, tmp_path):
    from fedrec.data import load_dataset
    from fedrec.models import build_model, data_shape
    from fedrec.models.base import Batch
    from fedrec.rng import UserRandom
    import torch

    g0, sparse, sparse_replies, _ = _serve(tiny_cfg(*BPR, "federation.rounds=2", model="bpr"), tmp_path, "sparse")
    _, dense, dense_replies, _ = _serve(tiny_cfg(*BPR, "federation.rounds=2", "federation.sparse_rows=off",
                                                 model="bpr"), tmp_path, "dense")
    _close(sparse, dense, tol=1e-6)  # two rounds: the private user rows carried on the nodes agree too
    assert ITEMS in dense_replies[0].content["arrays"]
    first = sparse_replies[0].content["arrays"]
    assert ITEMS not in first and ITEMS + P.ROWS_SUFFIX in first

    # Round 1, user by user: the rows sent are exactly those whose full-array update differs from the
    # global table, and they are the user's sampled positives and negatives of its two local steps.
    cfg = tiny_cfg(*BPR, model="bpr")
    data = load_dataset(cfg.dataset, int(cfg.seed))
    model = build_model(cfg.model, data_shape(data, seed=int(cfg.seed)))
    for s_reply, d_reply in zip(sparse_replies[:2], dense_replies[:2]):
        users, decoded = _decode(s_reply, g0)
        d_users, d_arrays = _decode(d_reply, g0)
        np.testing.assert_array_equal(users, d_users)
        _close(decoded, d_arrays, tol=1e-6)
        arrays = s_reply.content["arrays"]
        offsets, rows = arrays[ITEMS + P.OFFSETS_SUFFIX].numpy(), arrays[ITEMS + P.ROWS_SUFFIX].numpy()
        x = torch.from_numpy(data.train[users].toarray().astype(np.float32))
        for i, u in enumerate(users):
            sent = rows[offsets[i]:offsets[i + 1]]
            changed = np.flatnonzero((d_arrays[ITEMS][i] != g0[ITEMS]).any(1))
            np.testing.assert_array_equal(sent, changed)
            pairs = set()
            for step in range(2):
                r = model.draw_randomness(Batch(users=torch.as_tensor(users[i:i + 1]), x=x[i:i + 1]),
                                          UserRandom(int(cfg.seed), 1, users[i:i + 1], step))
                valid = r["valid"][0] > 0
                pairs |= set(r["pos"][0][valid].tolist()) | set(r["neg"][0][valid].tolist())
            assert set(sent.tolist()) == pairs, u
    # ... so the upload shrinks: rows sent vs n_items per user, in metrics.jsonl
    for got, full in zip(_train_lines(tmp_path, "sparse"), _train_lines(tmp_path, "dense")):
        n_users = got["trained-users"]
        assert got[P.UPLOADED_ROWS_DENSE] == full[P.UPLOADED_ROWS_DENSE] == n_users * 50
        assert full[P.UPLOADED_ROWS] == full[P.UPLOADED_ROWS_DENSE]
        assert got[P.UPLOADED_ROWS] <= n_users * 2 * 2 * 8 < got[P.UPLOADED_ROWS_DENSE]
        assert got[P.UPLOADED_BYTES] < full[P.UPLOADED_BYTES]


def test_paged_sparse_uploads_fold_into_the_full_array_mean(tiny_cfg, tmp_path):
    """Pages of row-sparse replies (a budget of one or two users a page) fold into the same mean."""
    _, paged, replies, _ = _serve(tiny_cfg(*BPR, "federation.rounds=1", "federation.memory_budget_gb=0.00005",
                                           model="bpr"), tmp_path, "paged")
    _, full, _, _ = _serve(tiny_cfg(*BPR, "federation.rounds=1", "federation.sparse_rows=off", model="bpr"),
                           tmp_path, "full")
    assert len(replies) >= 6 and all(ITEMS + P.ROWS_SUFFIX in r.content["arrays"] for r in replies)
    assert max(int(r.content["metrics"][P.PAGES]) for r in replies) >= 3
    _close(paged, full, tol=1e-6)
    line = _train_lines(tmp_path, "paged")[0]
    assert line[P.UPLOADED_ROWS] < line[P.UPLOADED_ROWS_DENSE] == line["trained-users"] * 50


def test_user_median_with_bpr_equals_numpy_median_over_the_dense_updates(tiny_cfg, tmp_path):
    """strategy=user_median over three nodes' row-sparse uploads: numpy's median over every user's full
    item table (untouched rows = the global row), as with full-array uploads."""
    base = ["federation=device", "federation.num_nodes=3", "federation.rounds=1", "strategy=user_median",
            "federation.user_fraction=0.6"]
    g0, got, replies, _ = _serve(tiny_cfg(*base, model="bpr"), tmp_path, "sparse")
    assert len(replies) == 3 and all(ITEMS + P.ROWS_SUFFIX in r.content["arrays"] for r in replies)
    decoded = [_decode(r, g0) for r in replies]
    assert len(np.concatenate([u for u, _ in decoded])) > 3 * 5
    want = np.median(np.concatenate([d[ITEMS] for _, d in decoded]), axis=0)
    np.testing.assert_allclose(got[ITEMS], want, rtol=1e-6, atol=1e-7)
    _, full, full_replies, _ = _serve(tiny_cfg(*base, "federation.sparse_rows=off", model="bpr"), tmp_path, "dense")
    np.testing.assert_allclose(full[ITEMS], np.median(np.concatenate(
        [r.content["arrays"][ITEMS].numpy() for r in full_replies]), axis=0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got[ITEMS], full[ITEMS], rtol=1e-6, atol=1e-7)


def test_attacks_transform_dense_deltas_before_the_sparse_upload(tiny_cfg, tmp_path):
    """The fold's per-user transforms see dense deltas; the rows a scaled user uploads are its honest
    rows, their deltas scaled."""
    from attacks.threat import malicious_clients

    g0, _, honest, _ = _serve(tiny_cfg(*BPR, "federation.rounds=1", model="bpr"), tmp_path, "honest")
    _, _, attacked, _ = _serve(tiny_cfg(*BPR, "federation.rounds=1", "attack=scaling", "attack.fraction=0.2",
                                        "attack.scale=3", model="bpr"), tmp_path, "attacked")
    bad = set(malicious_clients(0, 60, 12).tolist())
    seen = 0
    for h, a in zip(honest, attacked):
        users, hd = _decode(h, g0)
        _, ad = _decode(a, g0)
        for i, u in enumerate(users):
            factor = 3.0 if int(u) in bad else 1.0
            seen += int(u) in bad
            np.testing.assert_allclose(ad[ITEMS][i] - g0[ITEMS], factor * (hd[ITEMS][i] - g0[ITEMS]),
                                       rtol=1e-5, atol=1e-6)
        for k in (P.ROWS_SUFFIX, P.OFFSETS_SUFFIX):
            np.testing.assert_array_equal(a.content["arrays"][ITEMS + k].numpy(),
                                          h.content["arrays"][ITEMS + k].numpy())
    assert seen > 0


# ------------------------------------------------------------------ the server's checks of a sparse upload
SHAPES = {ITEMS: (6, 2), "enc.bias": (4,)}
ROWS = [[0, 2], [1, 3, 5], [4]]  # the three users' touched rows


def _sparse_reply(msg, rng, rows=ROWS, offsets=None, corrupt=None):
    flat = np.array([r for rs in rows for r in rs], dtype=np.int64)
    values = rng.standard_normal((len(flat), 2)).astype(np.float32)
    dense = {"enc.bias": rng.standard_normal((3, 4)).astype(np.float32)}
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])]) if offsets is None else np.asarray(offsets)
    if corrupt is not None:
        corrupt(values)
    keys = P.row_keys(ITEMS)
    arrays = {k: Array(v) for k, v in dense.items()} | {keys[0]: Array(flat), keys[1]: Array(offsets.astype(np.int64)),
                                                         keys[2]: Array(values)}
    content = RecordDict({"arrays": ArrayRecord(arrays),
                          P.USER_WEIGHTS: ArrayRecord({"weights": Array(np.ones(3)),
                                                       "users": Array(np.array([10, 11, 12]))}),
                          "metrics": MetricRecord({P.NUM_EXAMPLES: 3.0, P.PER_USER_REPLY: 1})})
    return Message(content, reply_to=msg), dense, values


def _reference(g, dense, values, rows, keep):
    full = np.repeat(g[ITEMS][None].astype(np.float64), 3, axis=0)
    at = 0
    for i, rs in enumerate(rows):
        if keep[i]:
            full[i, rs] += values[at:at + len(rs)]
        at += len(rs)
    return {ITEMS: full[keep].mean(0), "enc.bias": dense["enc.bias"][keep].astype(np.float64).mean(0)}


def test_a_good_sparse_upload_averages_as_full_arrays():
    rng = np.random.default_rng(1)
    g = make_arrays(rng, SHAPES)
    s = fedavg()
    msg, dense, values = _sparse_reply(start_round(s, g)[0], rng)
    got, _ = s.aggregate_train(1, [msg])
    want = _reference(g, dense, values, ROWS, np.ones(3, bool))
    for k in SHAPES:
        np.testing.assert_allclose(got[k].numpy(), want[k], rtol=1e-6, atol=1e-7)
    assert s.last_train["rejected-updates"] == 0
    assert s.last_train[P.UPLOADED_ROWS] == 6 and s.last_train[P.UPLOADED_ROWS_DENSE] == 18


BAD_USERS = {  # case -> (rows, how the values are corrupted, the user rejected, reason)
    "row-out-of-range": ([[0, 2], [1, 3, 6], [4]], None, 1, "row ids out of range"),
    "negative-row": ([[0, 2], [1, 3, 5], [-1]], None, 2, "row ids out of range"),
    "repeated-row": ([[0, 2], [1, 3, 3], [4]], None, 1, "not strictly increasing"),
    "unsorted-rows": ([[2, 0], [1, 3, 5], [4]], None, 0, "not strictly increasing"),
    "nan": (ROWS, lambda v: v.__setitem__((5, 1), np.nan), 2, "NaN or Inf"),
    "inf": (ROWS, lambda v: v.__setitem__((0, 0), np.inf), 0, "NaN or Inf"),
}


@pytest.mark.parametrize("case", sorted(BAD_USERS))
def test_a_bad_users_sparse_rows_reject_that_user_only(case):
    rows, corrupt, bad_user, why = BAD_USERS[case]
    rng = np.random.default_rng(2)
    g = make_arrays(rng, SHAPES)
    s = fedavg()
    msg, dense, values = _sparse_reply(start_round(s, g)[0], rng, rows=rows, corrupt=corrupt)
    got, _ = s.aggregate_train(1, [msg])
    keep = np.arange(3) != bad_user
    want = _reference(g, dense, values, rows, keep)
    for k in SHAPES:
        np.testing.assert_allclose(got[k].numpy(), want[k], rtol=1e-6, atol=1e-7)
    assert s.last_train["rejected-updates"] == 1
    assert any(why in r and ITEMS in r for r in s.last_train["rejected-reasons"]), s.last_train["rejected-reasons"]


@pytest.mark.parametrize("offsets,why", [
    ([0, 3, 2, 6], "offsets do not rise monotonically"),  # decreasing: no user's rows are known for sure
    ([0, 2, 5, 5], "offsets do not rise monotonically"),  # ends before the 6 rows sent
    ([1, 2, 5, 6], "offsets do not rise monotonically"),
    ([0, 2, 6], "offsets must be integer arrays"),  # one user short
])
def test_offsets_that_do_not_partition_the_rows_reject_the_reply(offsets, why):
    rng = np.random.default_rng(3)
    g = make_arrays(rng, SHAPES)
    s = fedavg()
    msg, _, _ = _sparse_reply(start_round(s, g)[0], rng, offsets=offsets)
    got, _ = s.aggregate_train(1, [msg])
    assert got is None
    assert s.last_train["rejected-updates"] == 3
    assert any(why in r for r in s.last_train["rejected-reasons"]), s.last_train["rejected-reasons"]


def test_user_row_median_takes_each_row_over_the_users_who_touched_it(tiny_cfg, tmp_path):
    """strategy=user_row_median over three nodes' row-sparse uploads: per item row, numpy's median over only
    the users whose upload carries that row (untouched rows keep the global row)."""
    base = ["federation=device", "federation.num_nodes=3", "federation.rounds=1", "strategy=user_row_median",
            "federation.user_fraction=0.6"]
    g0, got, replies, _ = _serve(tiny_cfg(*base, model="bpr"), tmp_path, "rowmed")
    rows_key, offsets_key, values_key = P.row_keys(ITEMS)
    touched: dict[int, list[np.ndarray]] = {}
    for r in replies:
        arrays = {k: a.numpy() for k, a in r.content["arrays"].items()}
        for row, value in zip(arrays[rows_key], arrays[values_key]):
            touched.setdefault(int(row), []).append(g0[ITEMS][row] + value.astype(np.float64))
    want = g0[ITEMS].copy()
    for row, values in touched.items():
        want[row] = np.median(np.stack(values), axis=0)
    n_users = sum(len(r.content[P.USER_WEIGHTS]["users"].numpy()) for r in replies)
    assert any(len(v) < n_users for v in touched.values())  # rows some users did not touch: differs from user_median
    np.testing.assert_allclose(got[ITEMS], want, rtol=1e-5, atol=1e-6)
