"""Target-item metrics (fedrec/eval/targets.py) against a per-user numpy reference."""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp
import torch

from fedrec.eval.targets import target_metric_sums, target_metrics_from_sums


class _Data:
    def __init__(self, train, valid, test, injected=None):
        self.train, self.valid, self.test = (sp.csr_matrix(m.astype(np.float32)) for m in (train, valid, test))
        self.n_users, self.n_items = train.shape
        self.injected = injected


def _reference(scores, data, targets, ks):
    train, seen = data.train.toarray() > 0, (data.train + data.valid + data.test).toarray() > 0
    pairs, users, er, hr, nd, ranks = 0, 0, {k: 0 for k in ks}, {k: 0 for k in ks}, {k: 0.0 for k in ks}, []
    for u in range(data.n_users):
        if data.injected is not None and data.injected[u]:
            continue
        eligible = [t for t in targets if not seen[u, t]]
        if not eligible:
            continue
        users += 1
        # stable order: score descending, then item index; training items are never ranked
        order = [i for i in sorted(range(data.n_items), key=lambda i: (-scores[u, i], i)) if not train[u, i]]
        best = math.inf
        for t in eligible:
            r = order.index(t) + 1
            pairs += 1
            ranks.append(r)
            best = min(best, r)
            for k in ks:
                er[k] += r <= k
                nd[k] += (r <= k) / math.log2(r + 1)
        for k in ks:
            hr[k] += best <= k
    return {"pairs": pairs, "users": users, "rank": sum(ranks), **{f"er@{k}": er[k] for k in ks},
            **{f"hr@{k}": hr[k] for k in ks}, **{f"ndcg@{k}": nd[k] for k in ks}}


def test_target_metrics_match_a_per_user_reference():
    rng = np.random.default_rng(0)
    n_users, n_items = 37, 23
    train = rng.random((n_users, n_items)) < 0.2
    valid = (rng.random((n_users, n_items)) < 0.05) & ~train
    test = (rng.random((n_users, n_items)) < 0.05) & ~train & ~valid
    scores = np.round(rng.standard_normal((n_users, n_items)), 1)  # rounded: ties happen
    injected = np.zeros(n_users, bool)
    injected[-4:] = True
    data = _Data(train, valid, test, injected)
    targets, ks = [3, 11], [1, 5, 10]
    score = lambda rows, x: torch.from_numpy(scores[rows].astype(np.float32))  # noqa: E731
    got = target_metric_sums(score, data, targets, ks, batch_size=8)
    want = _reference(scores, data, targets, ks)
    assert set(got) == set(want)
    for key in want:
        assert abs(got[key] - want[key]) < 1e-9, key
    metrics = target_metrics_from_sums(got)
    assert metrics["eligible_users"] == want["users"] and metrics["er@10"] == want["er@10"] / want["pairs"]
    assert metrics["hr@5"] == want["hr@5"] / want["users"] and 1 <= metrics["mean_rank"] <= n_items


def test_a_promoted_target_ranks_first_for_every_eligible_user():
    rng = np.random.default_rng(1)
    train = rng.random((20, 15)) < 0.3
    data = _Data(train, np.zeros_like(train), np.zeros_like(train))
    scores = rng.random((20, 15))
    scores[:, 7] = 10.0
    m = target_metrics_from_sums(target_metric_sums(lambda r, x: torch.from_numpy(scores[r].astype(np.float32)),
                                                    data, [7], [1, 3]))
    assert m["er@1"] == 1.0 and m["hr@3"] == 1.0 and m["ndcg@1"] == 1.0 and m["mean_rank"] == 1.0
    assert m["eligible_users"] == int((~train[:, 7]).sum())


def test_node_sums_pool_to_the_server_metrics(tiny_cfg):
    """Target sums of two nodes' users, pooled as the strategy pools metric sums, equal the metrics over all users."""
    from attacks.target_tracking import TargetTracking
    from fedrec.data import load_dataset
    from fedrec.eval.targets import target_metrics
    from fedrec.models import build_model, data_shape
    from strategies import exact_metric_mean

    class Tracker(TargetTracking):
        def target_ids(self, data, seed):
            return np.array([4, 17])

    cfg = tiny_cfg(model="multvae")
    data = load_dataset(cfg.dataset, 0)
    torch.manual_seed(0)
    model = build_model(cfg.model, data_shape(data, seed=0))
    halves = np.array_split(np.arange(data.n_users), 2)

    class _Reply:
        def __init__(self, values):
            from flwr.app import MetricRecord, RecordDict

            self.content = RecordDict({"metrics": MetricRecord(values)})

    pooled = dict(exact_metric_mean([_Reply(Tracker().node_eval(cfg, model, data, h)).content for h in halves], ""))
    whole = target_metrics(model, data, [4, 17], list(cfg.eval.ks))
    for k in cfg.eval.ks:
        assert abs(pooled[f"target/er@{k}"] - whole[f"er@{k}"]) < 1e-9
        assert abs(pooled[f"target/ndcg@{k}"] - whole[f"ndcg@{k}"]) < 1e-9
        assert abs(pooled[f"target_users/hr@{k}"] - whole[f"hr@{k}"]) < 1e-9
    assert abs(pooled["target/rank"] - whole["mean_rank"]) < 1e-9
