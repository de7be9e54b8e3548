"""Target-item metrics of a promotion attack: how high the attacker's target items rank for genuine users.

For every genuine user u (injected users never count) and target item t that u never interacted with
(in train, valid or test), t's rank among all items u did not train on (1 = top; ties broken by item
index, as a stable top-K would) gives:

* ``er@K`` -- exposure ratio (FedRecAttack, Rong et al., ICDE 2022): the share of (user, target) pairs
  with t in u's top-K, averaged over pairs (one target: the share of eligible users);
* ``hr@K`` -- the share of users with at least one eligible target that have one of them in their
  top-K (equal to ``er@K`` for one target);
* ``ndcg@K`` -- 1 / log2(rank + 1) when the rank is <= K, averaged over pairs;
* ``mean_rank`` -- the mean rank over pairs, and ``eligible_users`` / ``eligible_pairs``.

The sums are exact (counts and sums over users), so node-level sums add up like the ranking metrics'.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fedrec.eval.metrics import check_ks, dense_rows, evaluated_users


@torch.no_grad()
def target_metric_sums(score_fn, data, targets, ks: list[int], batch_size: int = 1024,
                       users: np.ndarray | None = None, device=None, inputs=None) -> dict[str, float]:
    """Sums behind :func:`target_metrics` for ``score_fn(user_ids, train_rows) -> (B, n_items)``; ``train_rows``
    are ``inputs``' rows (a model's weighted input; None: ``data.train``), the masks the binary interactions."""
    ks = check_ks(ks, data.n_items)
    targets = torch.as_tensor(np.asarray(targets, dtype=np.int64), device=device)
    users = evaluated_users(data, users)
    sums = {"pairs": 0.0, "users": 0.0, "rank": 0.0} | {f"{m}@{k}": 0.0 for m in ("er", "hr", "ndcg") for k in ks}
    items = torch.arange(data.n_items, device=device)
    for start in range(0, len(users), batch_size):
        rows = users[start:start + batch_size]
        seen = dense_rows(data.train, rows, device)
        x = seen if inputs is None or inputs is data.train else dense_rows(inputs, rows, device)
        seen_any = (seen + dense_rows(data.valid, rows, device) + dense_rows(data.test, rows, device)) > 0
        eligible = ~seen_any[:, targets]  # (B, T): pairs where the user never touched the target
        scores = score_fn(rows, x).float().masked_fill(seen > 0, float("-inf"))
        st = scores[:, targets]  # (B, T)
        higher = (scores.unsqueeze(1) > st.unsqueeze(2)).sum(2)
        tied_before = ((scores.unsqueeze(1) == st.unsqueeze(2)) & (items.view(1, 1, -1) < targets.view(1, -1, 1))).sum(2)
        rank = (1 + higher + tied_before).double()  # (B, T)
        e = eligible.double()
        has = eligible.any(1)
        sums["pairs"] += float(e.sum())
        sums["users"] += float(has.sum())
        sums["rank"] += float((rank * e).sum())
        for k in ks:
            hit = (rank <= k).double() * e
            sums[f"er@{k}"] += float(hit.sum())
            sums[f"ndcg@{k}"] += float((hit / torch.log2(rank + 1)).sum())
            sums[f"hr@{k}"] += float(((hit.sum(1) > 0) & has).sum())
    return sums


def target_metrics_from_sums(sums: dict[str, float]) -> dict[str, float]:
    pairs, users = sums["pairs"], sums["users"]
    out = {"eligible_users": int(users), "eligible_pairs": int(pairs),
           "mean_rank": sums["rank"] / pairs if pairs else math.nan}
    for key, value in sums.items():
        if "@" in key:  # hr@K counts users, er@K and ndcg@K count (user, target) pairs
            n = users if key.startswith("hr@") else pairs
            out[key] = value / n if n else math.nan
    return out


def target_metrics(model, data, targets, ks: list[int], batch_size: int = 1024,
                   users: np.ndarray | None = None) -> dict[str, float]:
    """Target-item metrics of ``model`` (a user-vector recommender) over genuine users."""
    from fedrec.devices import model_device
    from fedrec.models.base import Batch, input_matrix

    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        if model.input_kind == "sequence":
            length = int(model.max_len)

            def score(rows, x):  # the next item after the training sequence
                seq = data.input_sequences("valid").padded(rows, length, pad=data.n_items).to(device)
                return model.scores(Batch(users=torch.as_tensor(rows, device=device), x=x, seq=seq))
        else:
            def score(rows, x):
                return model.scores(Batch(users=torch.as_tensor(rows, device=device), x=x))
        return target_metrics_from_sums(target_metric_sums(score, data, targets, ks, batch_size, users, device,
                                                           inputs=input_matrix(model, data)))
    finally:
        model.train(was_training)
