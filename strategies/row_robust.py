"""FedRec-aware robust aggregation over one round's :class:`~strategies.update_batch.UpdateBatch`.

In a federated recommender each item row of the global table is updated by only the sampled users who
trained on the item (Spattack, Zhang et al., AAAI 2025, "Rethinking Byzantine Robustness in Federated
Recommendation from Sparse Aggregation Perspective": the aggregation of one item is the unit of
robustness). The rules here therefore work row by row over only the users who touched the row, and on
row-sparse tables only (BPR-MF's item table; a dense table is refused with the rule's name).

**The scale fix.** FedAvg's new row is ``global + sum_{u touched r} w_u d_u / W`` with W the weight of
*all* sampled users: the touching users' mean delta times their weight share ``W_r / W`` (uniform
weights: ``c_r / m``, the row's touching users over the round's sampled users; an unpopular item is
touched by 1-5 of m = 99). A robust statistic of the touching users' deltas (median, trimmed mean, the
Krum choice) replaces that *mean*, so it is multiplied by the same share (``rescale=True``): with
identical deltas every rule then equals FedAvg, and ``row_trimmed_mean(beta=0)`` is FedAvg exactly
(uniform weights). Without the share a row median applies the touching users' typical delta in full,
c_r / m times FedAvg's step, which at ``local_lr=1.0`` overshoots (``strategy=user_row_median``
measured in docs/RESULTS.md: clean recall@10 0.007 against FedAvg's 0.156).

Rules (each a pure function of the batch; tests/test_row_robust.py checks them against numpy loops):

* :func:`row_trimmed_mean` -- per row and coordinate, the mean of the touching users' deltas with
  ``floor(beta * c_r)`` cut from each end (Yin et al., ICML 2018, per row), times the share.
* :func:`row_krum` -- per row, the touching user's delta with the smallest sum of squared distances to
  its ``c_r - f - 2`` nearest others (Krum, Blanchard et al., NeurIPS 2017, per row), times the share;
  a row with ``c_r < 2f + 3`` touching users (Krum's n > 2f + 2 fails) takes their coordinate median.
* :func:`row_norm_bound` -- every uploaded row delta clipped to ``multiple`` x the median row-delta norm
  of the round, then FedAvg's mean (an adaptive per-row form of Sun et al.'s norm bound: a benign row
  is rarely clipped, a row scaled up by the attacker is cut to a benign size).
* :func:`hierarchical_clip` -- PSMU's countermeasure, see its docstring.
"""

from __future__ import annotations

import numpy as np

from strategies.update_batch import (RowUpdates, UpdateBatch, _median_of_groups, _row_groups, _sorted_groups,
                                     weighted_mean)


def _only_rows(batch: UpdateBatch, rule: str) -> None:
    if batch.arrays:
        raise ValueError(f"{rule}: dense global tables {sorted(batch.arrays)} have no item rows; the FedRec "
                         "row rules need row-sparse tables only (BPR-MF, federation.sparse_rows=auto)")


def touch_share(ru: RowUpdates, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows (R,), share (R,)): the touched rows and the weight share ``W_r / W`` of their users."""
    rows, starts, order = _row_groups(ru)
    w = np.asarray(weights, np.float64)
    per_entry = w[ru.entry_users()[order]]
    return rows, np.add.reduceat(per_entry, starts) / w.sum() if len(ru.rows) else np.zeros(0)


def _moved(ru: RowUpdates, rows: np.ndarray, deltas: np.ndarray) -> np.ndarray:
    """The global table with ``rows`` moved by ``deltas`` ((R, m), float64), in the table's dtype."""
    out = ru.base.astype(np.float64)
    if len(rows):
        out.reshape(len(out), -1)[rows] += deltas
    return out.astype(ru.base.dtype)


def _per_row(batch: UpdateBatch, rule: str, statistic, rescale: bool) -> dict[str, np.ndarray]:
    """Every row-sparse table with each touched row moved by ``statistic(ru)`` ((R, m) deltas of the
    touched rows, in row order), times the row's weight share when ``rescale``."""
    _only_rows(batch, rule)
    out = {}
    for k, ru in batch.rows.items():
        if not len(ru.rows):
            out[k] = ru.base.copy()
            continue
        rows, share = touch_share(ru, batch.weights)
        out[k] = _moved(ru, rows, statistic(ru).astype(np.float64) * (share[:, None] if rescale else 1.0))
    return out


def row_trimmed_mean(batch: UpdateBatch, beta: float, rescale: bool = True) -> dict[str, np.ndarray]:
    """Per row, the coordinate-wise trimmed mean of the touching users' deltas (``floor(beta c_r)`` cut
    from each end; unweighted), times the row's weight share when ``rescale``."""
    if not 0 <= beta < 0.5:
        raise ValueError(f"row_trimmed_mean: beta must be in [0, 0.5), got {beta}")

    def trimmed(ru: RowUpdates) -> np.ndarray:
        starts, counts, s = _sorted_groups(ru)
        cut = np.floor(beta * counts).astype(np.int64)
        csum = np.concatenate([np.zeros((1, s.shape[1])), np.cumsum(s.astype(np.float64), axis=0)])
        return (csum[starts + counts - cut] - csum[starts + cut]) / (counts - 2 * cut)[:, None]

    return _per_row(batch, "row_trimmed_mean", trimmed, rescale)


def row_median(batch: UpdateBatch, rescale: bool = True) -> dict[str, np.ndarray]:
    """Per row, the coordinate-wise median of the touching users' deltas, times the row's weight share
    when ``rescale`` (``strategies.update_batch.row_median`` is the unscaled form)."""
    return _per_row(batch, "row_median", lambda ru: _median_of_groups(*_sorted_groups(ru)), rescale)


def _padded_groups(ru: RowUpdates) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows (R,), counts (R,), padded (R, c_max, m) float64): each row's touching users' deltas in user
    order, zero-padded to the largest count."""
    rows, starts, order = _row_groups(ru)
    counts = np.diff(np.concatenate([starts, [len(order)]]))
    group = np.repeat(np.arange(len(rows)), counts)
    slot = np.arange(len(order)) - starts[group]
    v = ru.values.reshape(len(ru.rows), -1)[order].astype(np.float64)
    padded = np.zeros((len(rows), int(counts.max()), v.shape[1]))
    padded[group, slot] = v
    return rows, counts, padded


def krum_choice(padded: np.ndarray, counts: np.ndarray, f: int) -> np.ndarray:
    """(R,) per group, the slot of the member whose summed squared distance to its ``counts - f - 2``
    nearest other members is smallest (ties: the first). Only groups with ``counts >= 2f + 3`` are
    meaningful; others get slot 0."""
    R, c_max, _ = padded.shape
    sq = (padded ** 2).sum(-1)
    d = sq[:, :, None] + sq[:, None, :] - 2 * np.einsum("rim,rjm->rij", padded, padded)
    valid = np.arange(c_max)[None, :] < counts[:, None]
    d = np.where(valid[:, :, None] & valid[:, None, :], np.maximum(d, 0.0), np.inf)
    d[:, np.arange(c_max), np.arange(c_max)] = np.inf  # a member is not its own neighbour
    nearest = np.cumsum(np.sort(d, axis=-1), axis=-1)  # (R, c, c): sum of the j+1 nearest
    k = np.clip(counts - f - 2, 1, c_max - 1 if c_max > 1 else 1)
    score = np.take_along_axis(nearest, np.broadcast_to((k - 1)[:, None, None], (R, c_max, 1)), axis=-1)[..., 0]
    score = np.where(valid, score, np.inf)
    score = np.where(np.isnan(score), np.inf, score)
    return np.argmin(score, axis=1)


def row_krum(batch: UpdateBatch, f: int, rescale: bool = True) -> dict[str, np.ndarray]:
    """Per row, Krum over the touching users' deltas with ``f`` tolerated attackers, times the row's
    weight share when ``rescale``; rows touched by fewer than ``2f + 3`` users take the coordinate
    median of their deltas (Krum is undefined there)."""
    if int(f) < 0:
        raise ValueError(f"row_krum: f must be >= 0, got {f}")

    def krum(ru: RowUpdates) -> np.ndarray:
        rows, counts, padded = _padded_groups(ru)
        chosen = padded[np.arange(len(rows)), krum_choice(padded, counts, int(f))]
        small = counts < 2 * int(f) + 3
        if small.any():
            chosen[small] = _median_of_groups(*_sorted_groups(ru))[small]
        return chosen

    return _per_row(batch, "row_krum", krum, rescale)


# ------------------------------------------------------------------------------------------- clipping
def _entry_norms(ru: RowUpdates) -> np.ndarray:
    return np.sqrt((ru.values.reshape(len(ru.rows), -1).astype(np.float64) ** 2).sum(1))


def _scaled(ru: RowUpdates, factor: np.ndarray) -> RowUpdates:
    """The same entries with each value scaled by ``factor`` ((nnz,) float64)."""
    shape = (-1,) + (1,) * (ru.values.ndim - 1)
    return RowUpdates(ru.base, ru.offsets, ru.rows, (ru.values * factor.reshape(shape)).astype(ru.values.dtype))


def clip_factors(norms: np.ndarray, bound: float) -> np.ndarray:
    """min(1, bound / norm) per norm (a zero norm keeps factor 1)."""
    return np.minimum(1.0, bound / np.maximum(norms, 1e-300))


def row_norm_bound(batch: UpdateBatch, multiple: float, stats: dict | None = None) -> dict[str, np.ndarray]:
    """FedAvg's mean after every uploaded row delta is clipped to ``multiple`` x the median norm of the
    round's uploaded row deltas (per table). ``stats`` (optional) gets ``clipped-rows`` and ``row-bound``."""
    _only_rows(batch, "row_norm_bound")
    if not multiple > 0:
        raise ValueError(f"row_norm_bound: multiple must be positive, got {multiple}")
    rows = {}
    for k, ru in batch.rows.items():
        if not len(ru.rows):
            rows[k] = ru
            continue
        norms = _entry_norms(ru)
        bound = float(multiple) * float(np.median(norms))
        factor = clip_factors(norms, bound)
        rows[k] = _scaled(ru, factor)
        if stats is not None:
            stats["clipped-rows"] = stats.get("clipped-rows", 0) + int((factor < 1).sum())
            stats[f"row-bound/{k}"] = bound
    return weighted_mean(UpdateBatch({}, batch.users, batch.nodes, batch.weights, rows=rows))


def top_rows(ru: RowUpdates, k: int) -> RowUpdates:
    """Each user's ``k`` largest-norm row deltas (all of them if it has fewer), row ids kept increasing."""
    norms = _entry_norms(ru)
    users = ru.entry_users()
    order = np.lexsort((-norms, users))  # by user, then norm descending
    rank = np.arange(len(order)) - ru.offsets[users[order]]
    keep = np.zeros(len(norms), bool)
    keep[order[rank < k]] = True
    counts = np.bincount(users[keep], minlength=len(ru))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return RowUpdates(ru.base, offsets, ru.rows[keep], ru.values[keep])


def hierarchical_clip(batch: UpdateBatch, row_multiple: float, user_multiple: float, keep_rows: int | None = None,
                      stats: dict | None = None) -> dict[str, np.ndarray]:
    """Hierarchical clipping with sparsified updates, after PSMU's countermeasure (Yuan et al., SIGIR 2023,
    "Manipulating Federated Recommender Systems: Poisoning with Synthetic Users and Its Countermeasures").

    As implemented (the paper's text beyond its abstract was not available here, so the levels and their
    order are this module's reading of "hierarchical gradient clipping with sparsified updating"):

    1. sparsify: each user's upload keeps only its ``keep_rows`` largest-norm item rows (None: all);
    2. item level: every row delta clipped to ``row_multiple`` x the round's median row-delta norm;
    3. user level: each user's whole (row-clipped) upload clipped to ``user_multiple`` x the round's
       median user norm, so many rows at the row bound cannot add up to a large push;
    4. FedAvg's mean of what is left.

    The bounds are medians of the round (adaptive, as the attacker controls few of the sampled users)
    rather than fixed constants, so the rule needs no tuning to the local learning rate."""
    _only_rows(batch, "hierarchical_clip")
    if not (row_multiple > 0 and user_multiple > 0):
        raise ValueError(f"hierarchical_clip: row_multiple and user_multiple must be positive, got "
                         f"{row_multiple}, {user_multiple}")
    if keep_rows is not None and int(keep_rows) < 1:
        raise ValueError(f"hierarchical_clip: keep_rows must be >= 1 or None, got {keep_rows}")
    stats = {} if stats is None else stats
    rows = {}
    for k, ru in batch.rows.items():
        if keep_rows is not None:
            before = len(ru.rows)
            ru = top_rows(ru, int(keep_rows))
            stats["sparsified-rows"] = stats.get("sparsified-rows", 0) + before - len(ru.rows)
        if len(ru.rows):
            norms = _entry_norms(ru)
            factor = clip_factors(norms, float(row_multiple) * float(np.median(norms)))
            stats["clipped-rows"] = stats.get("clipped-rows", 0) + int((factor < 1).sum())
            ru = _scaled(ru, factor)
        rows[k] = ru
    # the user level over all tables together: a user's upload is one vector
    sq = np.zeros(len(batch))
    for ru in rows.values():
        if len(ru.rows):
            sq += np.bincount(ru.entry_users(), weights=_entry_norms(ru) ** 2, minlength=len(batch))
    user_norm = np.sqrt(sq)
    touched = user_norm > 0
    if touched.any():
        factor = clip_factors(user_norm, float(user_multiple) * float(np.median(user_norm[touched])))
        stats["clipped-users"] = stats.get("clipped-users", 0) + int((factor < 1).sum())
        rows = {k: _scaled(ru, factor[ru.entry_users()]) for k, ru in rows.items()}
    return weighted_mean(UpdateBatch({}, batch.users, batch.nodes, batch.weights, rows=rows))
