"""Update anomaly detection at the server (``defense=update_detect``): score every sampled user's upload
of the round, drop the flagged ones, FedAvg's mean of the rest.

A poisoning client must move the global model far more than a genuine one to win against the mean of
~m genuine updates (FedRecAttack scales its crafted rows by the m sampled users, attacks/fedrecattack.py),
so its upload is an outlier of the round in size. Per user u, three features of its upload
(delta = trained - global, over every global table; row-sparse tables by their uploaded rows):

* ``log ||delta_u||`` -- the whole upload's L2 norm;
* ``log max_r ||delta_u[r]||`` -- its largest item row (row-sparse tables; a push concentrated on a few
  rows, e.g. a target item, stands out even if the whole norm does not);
* ``log median_r ||delta_u[r]||`` -- its typical item row (row-sparse tables): an upload scaled as a
  whole (FedRecAttack's m-fold crafted rows, ``attack=scaling``) moves every row, while a genuine user's
  typical row is small however many items it has (its norm and largest row grow with its history).

Item rows are those of the row-sparse tables and, for models without an item table, of the dense arrays
whose first axis has one entry per item (:func:`item_row_arrays`: DiffRec's output layer and its bias,
whose row i is item i's slice); a dense array's row counts as changed where its delta is nonzero. So
FedRecAttack's kappa crafted item slices on DiffRec stand out against a genuine user's dense update.

Each feature is standardised robustly over the round's users, ``z = (x - median) / (1.4826 MAD)`` (the
attackers are a minority of the round, so median and MAD are the genuine users'), the user's score is
the largest of its z's, and users with ``score > threshold`` are flagged (one-sided: a small update does
not harm). A round in which more than ``max_drop`` of the users would be flagged drops only the
``max_drop`` share with the highest scores (a guard against a benign round with a heavy tail).

Ground truth for the report: the data's injected users (``Interactions.injected``: FedRecAttack's fake
clients, shilling profiles); :func:`fedrec.eval.detection.detection_report` over every (round, user)
upload scored in the run: AUC of the scores, precision and recall of the flagged set. Not from a paper:
the standard robust-z outlier rule (Rousseeuw & Croux 1993 for the MAD) on the three upload statistics
the attacks here inflate; fedrec's own rule, so there is no reference implementation to compare with.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from fedrec.defenses.batch_rules import BatchRuleDefense
from fedrec.errors import ConfigError
from fedrec.mechanisms import register
from strategies.update_batch import UpdateBatch, weighted_mean

MAD_SCALE = 1.4826  # MAD -> standard deviation for normal data
FEATURE_BLOCK_BYTES = 64 * 2**20  # float64 working set of upload_features (a DiffRec upload: 18 MB a user)


@dataclass
class UpdateDetectConfig:
    threshold: float = 3.5  # float > 0: robust z above which an upload is flagged
    max_drop: float = 0.2  # float in (0, 1): at most this share of a round's users is dropped

    def __post_init__(self):
        if not self.threshold > 0:
            raise ConfigError(f"defense.threshold: must be positive, got {self.threshold}")
        if not 0 < self.max_drop < 1:
            raise ConfigError(f"defense.max_drop: must be in (0, 1), got {self.max_drop}")


def robust_z(x: np.ndarray) -> np.ndarray:
    """(x - median) / (1.4826 MAD); a zero MAD is replaced by the smallest positive deviation (or 1)."""
    med = np.median(x)
    dev = np.abs(x - med)
    mad = np.median(dev)
    if not mad > 0:
        pos = dev[dev > 0]
        mad = float(pos.min()) if len(pos) else 1.0
    return (x - med) / (MAD_SCALE * mad)


def upload_features(batch: UpdateBatch, base: dict[str, np.ndarray],
                    item_rows: frozenset | set = frozenset()) -> dict[str, np.ndarray]:
    """Per user, the L2 norm of its whole upload and of its largest and its median changed item row (0
    without item rows): rows of the row-sparse tables, and of the dense arrays named in ``item_rows``
    (one row per item, e.g. DiffRec's output layer and bias; a row is changed where its delta is nonzero)."""
    n = len(batch)
    sq = np.zeros(n)
    for k, v in batch.arrays.items():
        flat, b = v.reshape(n, -1), base[k].reshape(1, -1).astype(np.float64)
        step = max(1, FEATURE_BLOCK_BYTES // max(1, 8 * flat.shape[1]))  # float64 a few users at a time
        for s in range(0, n, step):
            d = flat[s:s + step].astype(np.float64) - b
            sq[s:s + step] += np.einsum("ij,ij->i", d, d)
    max_row, med_row = np.zeros(n), np.zeros(n)
    for ru in batch.rows.values():  # with several row-sparse tables: the largest over tables
        if not len(ru.rows):
            continue
        norms = np.sqrt((ru.values.reshape(len(ru.rows), -1).astype(np.float64) ** 2).sum(1))
        users = ru.entry_users()
        sq += np.bincount(users, weights=norms ** 2, minlength=n)
        np.maximum.at(max_row, users, norms)
        med_row = np.maximum(med_row, _group_medians(norms, ru.offsets))
    for k in sorted(item_rows):
        v = batch.arrays[k]
        b = base[k].reshape(1, base[k].shape[0], -1).astype(np.float64)
        step = max(1, FEATURE_BLOCK_BYTES // max(1, 8 * b.size))
        for s in range(0, n, step):
            d = v[s:s + step].reshape(-1, *b.shape[1:]).astype(np.float64) - b
            norms = np.sqrt(np.einsum("urd,urd->ur", d, d))  # (users, items)
            max_row[s:s + step] = np.maximum(max_row[s:s + step], norms.max(1))
            changed = np.where(norms > 0, norms, np.nan)
            with warnings.catch_warnings():  # a user who changed no row: an all-NaN row, median 0
                warnings.simplefilter("ignore", RuntimeWarning)
                med = np.nan_to_num(np.nanmedian(changed, axis=1) if changed.size else np.zeros(len(d)), nan=0.0)
            med_row[s:s + step] = np.maximum(med_row[s:s + step], med)
    return {"norm": np.sqrt(sq), "max_row": max_row, "median_row": med_row}


def _group_medians(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """(U,) the median of each user's ``values[offsets[u]:offsets[u+1]]`` (0 for a user without entries)."""
    counts = np.diff(offsets)
    users = np.repeat(np.arange(len(counts)), counts)
    s = values[np.lexsort((values, users))]  # by user, then value
    lo = offsets[:-1] + np.maximum(counts - 1, 0) // 2
    hi = offsets[:-1] + counts // 2
    out = np.zeros(len(counts))
    has = counts > 0
    out[has] = (s[lo[has]] + s[np.minimum(hi[has], len(s) - 1)]) / 2
    return out


def upload_scores(batch: UpdateBatch, base: dict[str, np.ndarray], item_rows: frozenset | set = frozenset()) -> np.ndarray:
    """Per user, the largest robust z of its log upload norm, log largest-row and log median-row norms."""
    feats = upload_features(batch, base, item_rows)
    tiny = 1e-30
    score = robust_z(np.log(feats["norm"] + tiny))
    if batch.rows or item_rows:
        for key in ("max_row", "median_row"):
            score = np.maximum(score, robust_z(np.log(feats[key] + tiny)))
    return score


def flag(scores: np.ndarray, threshold: float, max_drop: float) -> np.ndarray:
    """Users with ``score > threshold``, at most ``floor(max_drop * U)`` of them (the highest scores)."""
    flagged = scores > threshold
    cap = int(np.floor(max_drop * len(scores)))
    if flagged.sum() > cap:
        keep_flag = np.argsort(-scores, kind="stable")[:cap]
        flagged = np.zeros(len(scores), bool)
        flagged[keep_flag] = True
    return flagged


def item_row_arrays(batch: UpdateBatch, base: dict[str, np.ndarray], n_items: int) -> frozenset:
    """The dense uploaded arrays read as one row per item: those whose first axis has ``n_items`` entries
    (DiffRec's output layer weight and bias; an item embedding table sent dense)."""
    return frozenset(k for k in batch.arrays if base[k].ndim >= 1 and base[k].shape[0] == n_items)


def detect_and_average(batch: UpdateBatch, base: dict[str, np.ndarray], threshold: float,
                       max_drop: float, item_rows: frozenset | set = frozenset()
                       ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """(FedAvg's mean over the unflagged users, scores, flagged)."""
    scores = upload_scores(batch, base, item_rows)
    flagged = flag(scores, threshold, max_drop)
    return weighted_mean(batch, keep=~flagged), scores, flagged


@register
class UpdateDetect(BatchRuleDefense):
    name = "update_detect"
    Config = UpdateDetectConfig
    detects = True

    def setup_server(self, ctx) -> None:
        super().setup_server(ctx)
        self._n_items = int(ctx.data.n_items)

    def rule(self, batch: UpdateBatch, stats: dict | None = None) -> dict[str, np.ndarray]:
        base = {k: self.strategy._global_arrays[k].numpy() for k in batch.arrays}
        out, scores, flagged = detect_and_average(batch, base, float(self.config.threshold),
                                                  float(self.config.max_drop),
                                                  item_row_arrays(batch, base, self._n_items))
        self.record_detection(batch.users, scores, flagged)
        return out
