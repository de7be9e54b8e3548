"""Full-ranking evaluation over all items, vectorised over users.

Protocol (DiffRec's and RecBole's): score every item, mask the user's training items (and, at test,
validation items), take the top K. With binary relevance, per user:

* ``recall@K``    = hits in top K / number of the user's held-out items
* ``capped_recall@K`` = hits in top K / min(K, number of held-out items): GiffCF's "Recall"
  (github.com/VinciZhu/GiffCF ``models/recommender.py``: ``hits / minimum(target_sum, k)``), 1 when
  the top K is all hits however many items are held out; equal to recall@K for users with at most K
* ``precision@K`` = hits / K
* ``hr@K``        = 1 if any hit
* ``ndcg@K``      = sum_{hit at rank r} 1/log2(r+2) / sum_{r < min(n_target, K)} 1/log2(r+2)
* ``mrr@K``       = 1 / (rank of first hit + 1), 0 without a hit

each averaged over the users that have held-out items. (The official DiffRec ``computeTopNAccuracy``
divides by every user, counting one without held-out items as 0, and rounds to 4 decimals; on
DiffRec's splits every user has valid and test items, so the figures agree, see
``simulations/compare_ldiffrec.py``.) Both splits are scored from ONE forward
pass (the model reads the training row for both, as the official DiffRec evaluation does).

Sequence models (``input_kind == "sequence"``) are evaluated next-item, one pass per split: valid
scores the items following the training sequence, test the items following the training sequence
plus the valid items (``Interactions.input_sequences``); with the ``loo`` split each user has one
held-out item, so hr@K and ndcg@K are the usual next-item HR / NDCG. The masks are the same as
above, i.e. every item of the history before the target (the model reads only its last
``max_len``), and the metric sums are the same, so federated nodes pool them exactly.

Injected users (``data.injected``: fake profiles a data transform added) never count: whatever
``users`` a caller passes, :func:`evaluated_users` removes them before any scoring, so the server,
every node's metric sums and the next-item protocol all follow one rule, even for a transform that
gave its fake users valid/test items.

Explicit ratings: a model that reads ratings (``model.input_values == "rating"``, DGRM, EDGE-Rec) is
fed the user's rating row as ``x`` and its scores are predicted ratings. It is ranked exactly as
above (training items masked, binary held-out targets), and ``evaluate_model`` adds ``rmse``, the
root mean squared error of the scores on every held-out (user, item) rating of the split
(:func:`rating_error_sums`, pooled over users as squared-error sum / count), to that split's
metrics. Every other model's metrics are unchanged.

Precision: ``evaluate_model`` scores in the model's compute precision (``fedrec/precision.py``); the
scores are fp32 before masking, so top-K and the metric sums are fp32 whatever it is.

Device: scoring, masking, top-K and the metric sums run on the model's device (``evaluate_scores``:
``device``); only the sums come back, one transfer per batch and split.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import scipy.sparse as sp
import torch

from fedrec.errors import ConfigError

METRICS = ("recall", "ndcg", "hr", "precision", "mrr", "capped_recall")


def check_ks(ks: Iterable[int], n_items: int) -> list[int]:
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ConfigError(f"eval.ks: cut-offs must be positive integers, got {ks}")
    if ks[-1] > n_items:
        raise ConfigError(f"eval.ks: K={ks[-1]} is larger than the catalogue ({n_items} items)")
    return ks


def dense_rows(m: sp.csr_matrix, rows: np.ndarray, device=None) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(m[rows].toarray(), dtype=np.float32))
    return x if device is None else x.to(device)  # a no-op on the CPU


def topk_metric_sums(scores: torch.Tensor, target: torch.Tensor, ks: list[int]) -> tuple[dict[str, float], int]:
    """Sums over users (with targets) of every metric, and the number of such users.

    ``scores`` (B, n) already masked with -inf; ``target`` (B, n) 0/1, on any one device.
    """
    n_target = target.sum(1)
    has = n_target > 0
    if not bool(has.any()):
        return {f"{m}@{k}": 0.0 for m in METRICS for k in ks}, 0
    scores, target, n_target = scores[has], target[has], n_target[has]
    kmax = ks[-1]
    top = torch.topk(scores, kmax, dim=1).indices
    hits = torch.gather(target, 1, top)  # (B, kmax) 0/1
    disc = 1.0 / torch.log2(torch.arange(kmax, dtype=torch.float32, device=scores.device) + 2.0)
    cum_dcg = torch.cumsum(hits * disc, 1)
    cum_idcg = torch.cumsum(disc, 0)
    cum_hits = torch.cumsum(hits, 1)
    first = torch.where(hits.any(1), hits.argmax(1), torch.full_like(n_target, kmax, dtype=torch.long))
    out: dict[str, torch.Tensor] = {}
    for k in ks:
        h = cum_hits[:, k - 1]
        capped = torch.clamp(n_target, max=k)
        ideal = cum_idcg[(capped - 1).long()]
        out[f"recall@{k}"] = (h / n_target).sum()
        out[f"capped_recall@{k}"] = (h / capped).sum()
        out[f"precision@{k}"] = (h / k).sum()
        out[f"hr@{k}"] = (h > 0).float().sum()
        out[f"ndcg@{k}"] = (cum_dcg[:, k - 1] / ideal).sum()
        out[f"mrr@{k}"] = torch.where(first < k, 1.0 / (first.float() + 1.0), torch.zeros_like(h)).sum()
    # One transfer for every sum (the same float32 values float() would read one by one).
    return dict(zip(out, torch.stack(list(out.values())).tolist())), int(has.sum())


def rating_error_sums(scores: torch.Tensor, ratings: torch.Tensor) -> tuple[float, int]:
    """(Sum of squared errors, count) of ``scores`` on the observed entries (> 0) of ``ratings``, both (B, n)."""
    seen = ratings > 0
    err = torch.where(seen, scores.float() - ratings, torch.zeros_like(ratings))
    return float((err * err).sum()), int(seen.sum())


def rmse(sse: float, count: int) -> float:
    """sqrt(sse / count); NaN without a held-out rating."""
    return float("nan") if count == 0 else float(np.sqrt(sse / count))


class RankingAccumulator:
    """Adds metric sums over batches (or over federated nodes) and reports the user mean."""

    def __init__(self, ks: list[int]):
        self.ks = ks
        self.sums = {f"{m}@{k}": 0.0 for m in METRICS for k in ks}
        self.users = 0

    def add(self, sums: dict[str, float], users: int) -> None:
        for key in self.sums:
            self.sums[key] += sums[key]
        self.users += users

    def result(self) -> dict[str, float]:
        if self.users == 0:
            return {k: float("nan") for k in self.sums}
        return {k: v / self.users for k, v in self.sums.items()}


def evaluated_users(data, users: np.ndarray | None = None) -> np.ndarray:
    """``users`` (default: all of ``data``'s) minus the injected ones: the users metrics may count."""
    users = np.arange(data.n_users, dtype=np.int64) if users is None else np.asarray(users, dtype=np.int64)
    injected = getattr(data, "injected", None)
    return users if injected is None else users[~np.asarray(injected, dtype=bool)[users]]


@torch.no_grad()
def evaluate_model(model, data, ks: list[int], batch_size: int = 1024,
                   users: np.ndarray | None = None, splits=("valid", "test"), observer=None) -> dict[str, dict]:
    """Valid and test metrics of ``model`` on ``data`` from one scoring pass per user batch.

    ``observer(split, rows, masked_scores, target)``, when given, sees every batch's masked scores
    (e.g. :class:`fedrec.eval.fairness.FairnessAccumulator`, the ``eval.fairness`` metrics).

    ``users`` (default: all) are the users to evaluate; injected users among them are skipped.
    Returns ``{"valid": {...}, "test": {...}}`` plus the raw sums and user counts under
    ``"_sums"`` so federated nodes can be combined exactly.
    """
    from fedrec.models.base import Batch, input_matrix

    from fedrec.devices import model_device

    from fedrec.precision import autocast

    was_training = model.training
    model.eval()
    device = model_device(model)
    try:
        if model.input_kind == "sequence":
            length = int(model.max_len)

            def next_item(rows, x, split):
                seq = data.input_sequences(split).padded(rows, length, pad=data.n_items).to(device)
                return model.scores(Batch(users=torch.as_tensor(rows, device=device), x=x, seq=seq))

            with autocast(model, device, "eval"):  # scores are cast to fp32 before masking and top-K
                return evaluate_scores(next_item, data, ks, batch_size, users, splits, per_split=True, device=device,
                                       inputs=input_matrix(model, data), observer=observer)
        values = getattr(model, "input_values", "binary")
        with autocast(model, device, "eval"):
            return evaluate_scores(lambda rows, x: model.scores(Batch(users=torch.as_tensor(rows, device=device), x=x)),
                                   data, ks, batch_size, users, splits, device=device,
                                   inputs=input_matrix(model, data), with_rmse=values == "rating", observer=observer)
    finally:
        model.train(was_training)


@torch.no_grad()
def evaluate_scores(score_fn, data, ks: list[int], batch_size: int = 1024,
                    users: np.ndarray | None = None, splits=("valid", "test"), per_split: bool = False,
                    device=None, inputs: sp.csr_matrix | None = None, with_rmse: bool = False,
                    observer=None) -> dict[str, dict]:
    """Like ``evaluate_model`` for any ``score_fn(user_ids, train_rows) -> (B, n_items)`` scores;
    with ``per_split``, ``score_fn(user_ids, train_rows, split)`` is called once per split.
    ``train_rows``, the masks and the targets are built on ``device`` (None: the CPU). ``train_rows`` are
    ``inputs``' rows (the rows the model reads, :func:`fedrec.models.base.input_matrix`: a rating model's
    ratings, a model's weighted input; None: the binary ``data.train``); the seen-item mask is always the
    binary training interactions. ``with_rmse`` adds ``rmse`` of the scores on ``data.ratings[split]``."""
    ks = check_ks(ks, data.n_items)
    users = evaluated_users(data, users)  # the one place injected users leave every metric
    acc = {s: RankingAccumulator(ks) for s in splits}
    errors = {s: [0.0, 0] for s in splits}
    inputs = data.train if inputs is None else inputs
    for start in range(0, len(users), batch_size):
        rows = users[start:start + batch_size]
        x = dense_rows(inputs, rows, device)
        shared = None if per_split else score_fn(rows, x).float()
        # validation masks training items; test also masks validation items
        seen = x > 0 if inputs is None or inputs is data.train else dense_rows(data.train, rows, device) > 0
        for split in splits:
            scores = score_fn(rows, x, split).float() if per_split else shared
            mask = seen | (dense_rows(data.valid, rows, device) > 0) if split == "test" else seen
            target = dense_rows(getattr(data, split), rows, device)
            masked = scores.masked_fill(mask, float("-inf"))
            sums, n = topk_metric_sums(masked, target, ks)
            if observer is not None:
                observer(split, rows, masked, target)
            acc[split].add(sums, n)
            if with_rmse:
                sse, count = rating_error_sums(scores, dense_rows(data.input_matrix("rating", split), rows, device))
                errors[split][0] += sse
                errors[split][1] += count
    out: dict[str, dict] = {s: acc[s].result() for s in splits}
    if with_rmse:
        for s in splits:
            out[s]["rmse"] = rmse(*errors[s])
    out["_sums"] = {s: {"sums": acc[s].sums, "users": acc[s].users} for s in splits}
    return out
