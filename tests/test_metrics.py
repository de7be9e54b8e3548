"""Ranking metrics against an independent reference (the official DiffRec ``computeTopNAccuracy``).

The reference below is written from the DiffRec evaluation code, in plain Python over item lists,
with HR added (1 if any hit). Score matrices are random floats, so there are no ties and the
top-K lists are unique.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from fedrec.errors import ConfigError
from fedrec.eval import METRICS, RankingAccumulator, check_ks, evaluate_model, topk_metric_sums
from fedrec.models.base import Recommender


# ----------------------------------------------------------------------------- reference
def reference_metrics(scores: np.ndarray, mask: np.ndarray, targets: list[list[int]], ks: list[int]) -> dict:
    """Mean over users with a non-empty target list; mirrors DiffRec's ``computeTopNAccuracy``."""
    n_items = scores.shape[1]
    predicted = []
    for u in range(scores.shape[0]):
        cand = [i for i in range(n_items) if not mask[u, i]]
        cand.sort(key=lambda i: -scores[u, i])
        predicted.append(cand)
    out = {}
    for k in ks:
        sums = dict.fromkeys(METRICS, 0.0)
        cnt = 0
        for u, truth in enumerate(targets):
            if len(truth) == 0:
                continue
            truth_set = set(truth)
            hits, dcg, idcg, mrr, idcg_count = 0, 0.0, 0.0, 0.0, len(truth)
            for j in range(k):
                # a user with fewer than k unmasked items gets masked fillers: never hits
                if j < len(predicted[u]) and predicted[u][j] in truth_set:
                    dcg += 1.0 / math.log2(j + 2)
                    if hits == 0:
                        mrr = 1.0 / (j + 1.0)
                    hits += 1
                if idcg_count > 0:
                    idcg += 1.0 / math.log2(j + 2)
                    idcg_count -= 1
            sums["precision"] += hits / k
            sums["recall"] += hits / len(truth)
            sums["capped_recall"] += hits / min(k, len(truth))
            sums["ndcg"] += dcg / idcg if idcg else 0.0
            sums["mrr"] += mrr
            sums["hr"] += 1.0 if hits else 0.0
            cnt += 1
        for m in METRICS:
            out[f"{m}@{k}"] = sums[m] / cnt if cnt else math.nan
    return out


def random_case(seed: int, n_users: int = 40, n_items: int = 30, p_mask: float = 0.3, p_target: float = 0.15):
    rng = np.random.default_rng(seed)
    scores = rng.random((n_users, n_items))
    mask = rng.random((n_users, n_items)) < p_mask
    target = (rng.random((n_users, n_items)) < p_target) & ~mask
    target[0] = False  # a user without held-out items
    target[1] = False
    target[2, :] = False
    target[2, rng.integers(n_items)] = not mask[2].all()  # a user with a single target (if possible)
    mask[2, target[2]] = False
    return scores, mask, target


def run_metrics(scores, mask, target, ks):
    s = torch.tensor(scores, dtype=torch.float64).masked_fill(torch.tensor(mask), float("-inf"))
    sums, users = topk_metric_sums(s, torch.tensor(target, dtype=torch.float32), ks)
    return sums, users


def assert_close(got: dict, want: dict, tol: float = 1e-5):
    assert set(got) == set(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=tol), key


# ----------------------------------------------------------------------------- topk_metric_sums
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("ks", [[1], [5], [1, 3, 10], [7, 30]])
def test_topk_metric_sums_matches_reference(seed, ks):
    scores, mask, target = random_case(seed)
    sums, users = run_metrics(scores, mask, target, ks)
    n_with = int((target.sum(1) > 0).sum())
    assert users == n_with
    got = {k: v / users for k, v in sums.items()}
    want = reference_metrics(scores, mask, [list(np.flatnonzero(r)) for r in target], ks)
    assert_close(got, want)


def test_topk_metric_sums_many_targets_and_full_rows():
    """Users with more targets than K (idcg over K positions) and with every candidate a target."""
    rng = np.random.default_rng(7)
    scores = rng.random((12, 20))
    mask = np.zeros((12, 20), dtype=bool)
    target = rng.random((12, 20)) < 0.7
    target[3] = True  # all items are targets: every metric at its maximum
    ks = [2, 5, 20]
    sums, users = run_metrics(scores, mask, target, ks)
    got = {k: v / users for k, v in sums.items()}
    want = reference_metrics(scores, mask, [list(np.flatnonzero(r)) for r in target], ks)
    assert_close(got, want)
    one = run_metrics(scores[3:4], mask[3:4], target[3:4], ks)[0]
    for k in ks:
        assert one[f"ndcg@{k}"] == pytest.approx(1.0)
        assert one[f"precision@{k}"] == pytest.approx(1.0)
        assert one[f"mrr@{k}"] == pytest.approx(1.0)
        assert one[f"recall@{k}"] == pytest.approx(k / 20)


def test_topk_metric_sums_no_targets():
    scores, mask, _ = random_case(0)
    sums, users = run_metrics(scores, mask, np.zeros_like(mask), [5, 10])
    assert users == 0
    assert set(sums) == {f"{m}@{k}" for m in METRICS for k in (5, 10)}
    assert all(v == 0.0 for v in sums.values())


def test_masked_items_never_ranked():
    """A masked item with the highest score is never a hit, even if it is (wrongly) a target."""
    n = 10
    scores = np.linspace(1.0, 0.0, n)[None, :]  # item 0 best, item 9 worst
    mask = np.zeros((1, n), dtype=bool)
    mask[0, 0] = True
    target = np.zeros((1, n), dtype=bool)
    target[0, 0] = True  # only target is masked ...
    target[0, 9] = True  # ... and the worst item
    sums, users = run_metrics(scores, mask, target, [1, 8, 9])
    assert users == 1
    assert sums["hr@8"] == 0.0 and sums["hr@1"] == 0.0
    assert sums["hr@9"] == 1.0  # item 9 is the 9th unmasked item
    assert sums["mrr@9"] == pytest.approx(1 / 9)


def test_mean_excludes_users_without_targets():
    """Adding users without held-out items changes neither the sums nor the user count."""
    scores, mask, target = random_case(5)
    ks = [3, 10]
    sums, users = run_metrics(scores, mask, target, ks)
    extra_scores = np.vstack([scores, np.random.default_rng(1).random((15, scores.shape[1]))])
    extra_mask = np.vstack([mask, np.zeros((15, scores.shape[1]), dtype=bool)])
    extra_target = np.vstack([target, np.zeros((15, scores.shape[1]), dtype=bool)])
    sums2, users2 = run_metrics(extra_scores, extra_mask, extra_target, ks)
    assert users2 == users
    assert_close(sums2, sums, tol=1e-9)


# ----------------------------------------------------------------------------- check_ks
def test_check_ks_sorts_and_dedups():
    assert check_ks([20, 10, 20], 50) == [10, 20]
    assert check_ks([50], 50) == [50]


@pytest.mark.parametrize("ks", [[51], [10, 51], [0], [-1, 5], []])
def test_check_ks_rejects(ks):
    with pytest.raises(ConfigError, match=r"eval\.ks"):
        check_ks(ks, 50)


# ----------------------------------------------------------------------------- accumulator
def test_accumulator_batches_equal_one_batch():
    """Federated client evaluation relies on sums over parts adding up to the whole."""
    scores, mask, target = random_case(11, n_users=57)
    ks = [1, 5, 10]
    whole, users = run_metrics(scores, mask, target, ks)
    acc = RankingAccumulator(ks)
    for part in np.array_split(np.arange(57), [3, 4, 20, 41]):  # uneven parts, one of size 1
        s, n = run_metrics(scores[part], mask[part], target[part], ks)
        acc.add(s, n)
    assert acc.users == users
    assert_close(acc.sums, whole, tol=1e-5)  # float32 sums: equal up to summation order
    assert_close(acc.result(), {k: v / users for k, v in whole.items()}, tol=1e-6)


def test_accumulator_empty_is_nan():
    acc = RankingAccumulator([5])
    acc.add(*run_metrics(*random_case(0)[:2], np.zeros((40, 30), dtype=bool), [5]))
    assert all(math.isnan(v) for v in acc.result().values())


# ----------------------------------------------------------------------------- evaluate_model
class FixedScores(Recommender):
    name = "fixed"

    def __init__(self, table: np.ndarray):
        super().__init__()
        self.table = torch.tensor(table, dtype=torch.float32)
        self.calls = []

    def scores(self, batch):
        self.calls.append(batch.users.tolist())
        assert batch.x.shape == (len(batch.users), self.table.shape[1])
        return self.table[batch.users]


class FakeData:
    def __init__(self, seed: int, n_users: int = 33, n_items: int = 25):
        rng = np.random.default_rng(seed)
        u = rng.random((n_users, n_items))
        train = u < 0.3
        valid = (u >= 0.3) & (u < 0.4)
        test = (u >= 0.4) & (u < 0.5)
        valid[:4] = False  # users without validation items
        test[4:7] = False  # users without test items
        test[0] = False
        self.train, self.valid, self.test = (sp.csr_matrix(m.astype(np.float32)) for m in (train, valid, test))
        self.n_users, self.n_items = n_users, n_items
        self.scores = rng.random((n_users, n_items)).astype(np.float32)
        # float32 scores must stay tie-free for the reference ranking to be unique
        assert len(np.unique(self.scores)) == self.scores.size


def _expected(data: FakeData, ks):
    tr, va, te = (m.toarray() > 0 for m in (data.train, data.valid, data.test))
    valid = reference_metrics(data.scores, tr, [list(np.flatnonzero(r)) for r in va], ks)
    test = reference_metrics(data.scores, tr | va, [list(np.flatnonzero(r)) for r in te], ks)
    return valid, test


@pytest.mark.parametrize("batch_size", [1, 4, 10, 33, 1000])
def test_evaluate_model_matches_reference(batch_size):
    data = FakeData(3)
    ks = [10, 1, 5]
    model = FixedScores(data.scores)
    model.train()
    out = evaluate_model(model, data, ks, batch_size=batch_size)
    want_valid, want_test = _expected(data, sorted(ks))
    assert_close(out["valid"], want_valid)
    assert_close(out["test"], want_test)
    assert model.training  # mode restored
    assert sum(len(c) for c in model.calls) == data.n_users  # one scoring pass per user
    va_users = int((data.valid.getnnz(axis=1) > 0).sum())
    te_users = int((data.test.getnnz(axis=1) > 0).sum())
    assert out["_sums"]["valid"]["users"] == va_users
    assert out["_sums"]["test"]["users"] == te_users
    for split, users in (("valid", va_users), ("test", te_users)):
        assert_close({k: v / users for k, v in out["_sums"][split]["sums"].items()}, out[split], tol=1e-9)


def test_evaluate_model_masks_seen_items():
    """Training items never appear in the valid top-K; training and valid items never in the test top-K.

    Scores put every seen item on top; if masking failed, the (empty-overlap) targets would be
    pushed out and, with a target that *is* a seen item, a hit would appear.
    """
    data = FakeData(4)
    tr, va = data.train.toarray() > 0, data.valid.toarray() > 0
    data.scores = (data.scores + 10 * tr + 5 * va).astype(np.float32)
    # make every seen item a target too: a hit on it would betray a missing mask
    data.valid = sp.csr_matrix((va | tr).astype(np.float32))
    data.test = sp.csr_matrix(((data.test.toarray() > 0) | tr | va).astype(np.float32))
    ks = [1, 3]
    out = evaluate_model(FixedScores(data.scores), data, ks, batch_size=7)
    # the reference ranks unmasked items only; seen targets still count in len(test)
    want_valid = reference_metrics(data.scores, tr, [list(np.flatnonzero(r)) for r in (va | tr)], ks)
    want_test = reference_metrics(data.scores, tr | va,
                                  [list(np.flatnonzero(r)) for r in (data.test.toarray() > 0)], ks)
    assert_close(out["valid"], want_valid)
    assert_close(out["test"], want_test)
    # and at test, top-1 is never a train/valid item: no user with only seen targets has a hit
    only_seen = [u for u in range(data.n_users)
                 if ((data.test.toarray()[u] > 0) & ~(tr[u] | va[u])).sum() == 0 and (tr[u] | va[u]).any()]
    assert only_seen, "fixture should contain users whose test targets are all seen items"
    sub = evaluate_model(FixedScores(data.scores), data, [3], users=np.array(only_seen), splits=("test",))
    assert sub["test"]["hr@3"] == 0.0


def test_evaluate_model_user_subset_sums_add_up():
    """Per-node evaluation (disjoint user subsets) adds up to the evaluation of all users."""
    data = FakeData(8)
    model = FixedScores(data.scores)
    ks = [5, 10]
    whole = evaluate_model(model, data, ks)
    parts = np.array_split(np.random.default_rng(0).permutation(data.n_users), 3)
    for split in ("valid", "test"):
        acc = RankingAccumulator(ks)
        for p in parts:
            r = evaluate_model(model, data, ks, users=p)["_sums"][split]
            acc.add(r["sums"], r["users"])
        assert_close(acc.result(), whole[split], tol=1e-6)


def test_evaluate_model_rejects_large_k():
    data = FakeData(0)
    with pytest.raises(ConfigError, match=r"eval\.ks"):
        evaluate_model(FixedScores(data.scores), data, [data.n_items + 1])


def test_evaluate_model_split_order_does_not_matter():
    data = FakeData(5)
    model = FixedScores(data.scores)
    a = evaluate_model(model, data, [5], splits=("valid", "test"))
    b = evaluate_model(model, data, [5], splits=("test", "valid"))
    assert_close(b["valid"], a["valid"])
    assert_close(b["test"], a["test"])


# ----------------------------------------------------------------------------- capped recall (GiffCF)
def giffcf_reference(scores: np.ndarray, mask: np.ndarray, target: np.ndarray, ks: list[int]) -> dict:
    """numpy transcription of the official GiffCF ``Recommender.evaluate`` (models/recommender.py):
    ``recall = hits / minimum(target_sum, k)``, ``ndcg = dcg / idcg[minimum(target_sum, k) - 1]``,
    averaged over the users given (here: the users with held-out items)."""
    has = target.sum(1) > 0
    scores, mask, target = scores[has], mask[has], target[has].astype(np.float64)
    top = np.argsort(-np.where(mask, -np.inf, scores), axis=1, kind="stable")[:, :max(ks)]
    hit = np.take_along_axis(target, top, axis=1)
    disc = 1.0 / np.log2(np.arange(2, max(ks) + 2))
    out = {}
    for k in ks:
        ideal = np.minimum(target.sum(1), k)
        out[f"capped_recall@{k}"] = float(np.mean(hit[:, :k].sum(1) / ideal))
        out[f"ndcg@{k}"] = float(np.mean((hit[:, :k] * disc[:k]).sum(1) / np.cumsum(disc)[ideal.astype(int) - 1]))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_capped_recall_matches_giffcf_evaluation(seed):
    rng = np.random.default_rng(seed)
    scores = rng.random((50, 40))
    mask = rng.random((50, 40)) < 0.2
    target = (rng.random((50, 40)) < rng.uniform(0.05, 0.8, size=(50, 1))) & ~mask  # few and many targets
    target[0] = False
    ks = [3, 10, 20]
    sums, users = run_metrics(scores, mask, target, ks)
    want = giffcf_reference(scores, mask, target, ks)
    for key, value in want.items():
        assert sums[key] / users == pytest.approx(value, abs=1e-6), key
    many = target.sum(1) > 3  # more held-out items than K = 3: capped recall exceeds plain recall there
    assert many.any() and sums["capped_recall@3"] > sums["recall@3"]


def test_capped_recall_equals_recall_with_few_targets():
    rng = np.random.default_rng(4)
    scores = rng.random((30, 25))
    mask = np.zeros((30, 25), dtype=bool)
    target = np.zeros((30, 25), dtype=bool)
    target[np.arange(30), rng.integers(0, 25, 30)] = True  # one held-out item each
    sums, _ = run_metrics(scores, mask, target, [1, 5])
    for k in (1, 5):
        assert sums[f"capped_recall@{k}"] == pytest.approx(sums[f"recall@{k}"])


def test_select_metric_names_follow_eval_metrics():
    from fedrec.run_config import _METRICS

    assert tuple(_METRICS) == tuple(METRICS)
