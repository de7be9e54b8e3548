"""How well a detector separates malicious users or clients from genuine ones, against the ground truth.

Every detector (fake-profile detectors on the data, update anomaly detectors at the server, the image
purification detector) reports the same figures, from its per-example suspicion ``scores`` (higher =
more suspicious), the ground truth ``is_malicious`` and the set it ``flagged`` (dropped):

* ``auc`` -- the ROC AUC of the scores: the probability that a random malicious example scores higher
  than a random genuine one, ties counting one half (the Mann-Whitney U statistic over the two groups,
  from average ranks, so it is exact with ties);
* ``precision`` / ``recall`` of the flagged set, and the counts ``flagged``, ``malicious``, ``examples``.

AUC is undefined (None) when either group is empty, e.g. a clean run with no attacker.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def roc_auc(scores, is_malicious) -> float | None:
    """ROC AUC of ``scores`` for the positives ``is_malicious`` (Mann-Whitney, ties as one half)."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    positive = np.asarray(is_malicious, dtype=bool).ravel()
    if scores.shape != positive.shape:
        raise ValueError(f"roc_auc: {scores.size} scores for {positive.size} labels")
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(scores)  # average ranks of ties
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def detection_report(scores, is_malicious, flagged) -> dict:
    """AUC of ``scores`` and precision/recall of the boolean mask ``flagged`` against ``is_malicious``."""
    positive = np.asarray(is_malicious, dtype=bool).ravel()
    flagged = np.asarray(flagged, dtype=bool).ravel()
    if flagged.shape != positive.shape:
        raise ValueError(f"detection_report: {flagged.size} flags for {positive.size} labels")
    hits = int((flagged & positive).sum())
    return {
        "auc": roc_auc(scores, positive),
        "precision": hits / int(flagged.sum()) if flagged.any() else None,
        "recall": hits / int(positive.sum()) if positive.any() else None,
        "flagged": int(flagged.sum()),
        "malicious": int(positive.sum()),
        "examples": int(positive.size),
    }
