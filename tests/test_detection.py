"""Detection figures against brute-force references."""

import numpy as np
import pytest

from fedrec.eval.detection import detection_report, roc_auc


def _pairwise_auc(scores, positive):
    pos, neg = scores[positive], scores[~positive]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_equals_the_pairwise_count_with_ties(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 6, size=200).astype(float)  # many ties
    positive = rng.random(200) < 0.2
    scores[positive] += rng.integers(0, 3, size=positive.sum())
    assert roc_auc(scores, positive) == pytest.approx(_pairwise_auc(scores, positive), abs=1e-12)


def test_auc_extremes_and_undefined():
    labels = np.array([0, 0, 1, 1], bool)
    assert roc_auc([0.1, 0.2, 0.8, 0.9], labels) == 1.0
    assert roc_auc([0.9, 0.8, 0.2, 0.1], labels) == 0.0
    assert roc_auc([1, 1, 1, 1], labels) == 0.5
    assert roc_auc([1, 2], [False, False]) is None


def test_precision_recall_of_the_flagged_set():
    truth = np.array([1, 1, 1, 0, 0, 0, 0, 0], bool)
    flagged = np.array([1, 1, 0, 1, 0, 0, 0, 0], bool)
    r = detection_report(np.arange(8)[::-1], truth, flagged)
    assert r["precision"] == pytest.approx(2 / 3) and r["recall"] == pytest.approx(2 / 3)
    assert (r["flagged"], r["malicious"], r["examples"]) == (3, 3, 8) and r["auc"] == 1.0
    assert detection_report([0, 1], [False, False], [False, False])["precision"] is None
