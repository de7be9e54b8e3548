"""Split one user-item interaction list into train/valid/test CSR matrices.

Four protocols, all vectorised (argsort/lexsort over the whole list, no loop over users) so a
million interactions split in well under a second. Names follow RecBole's ``eval_args``:

* ``ratio``    -- per user, a seeded random permutation of the user's items cut by ``ratios``
  (RecBole's ``RO`` + ``RS`` grouped by user).
* ``temporal`` -- per user, the user's interactions in time order cut by ``ratios``: the earliest
  ~80% train, the next ~10% valid, the latest ~10% test (RecBole's ``TO`` + ``RS`` grouped by user).
* ``temporal_global`` -- one global time cut: all interactions sorted by timestamp, cut at the
  ``ratios`` quantiles. Users whose interactions all fall after the train cut would have no
  training history ("empty users"); they are dropped from every split, and
  :attr:`Split.kept_users` says which users remain.
* ``loo``      -- leave-one-out by time, RecBole's ``LS: valid_and_test``: a user with 3 or more
  interactions puts the latest in test, the second latest in valid and the rest in train; a user
  with 2 puts the earlier in train and the later in test (no valid item); a user with 1 keeps
  it in train. ``ratios`` are not used.

Per-user counts for ``ratio`` and ``temporal`` follow RecBole's ``_calcu_split_ids`` exactly
(:func:`ratio_counts`): ratios are normalised by their sum, valid and test get
``int(r * n)`` (truncated, no tolerance for float error), train the rest; then test, and after it
valid, are bumped to one item when ``0 < r * n < 1`` as long as train keeps more than one.
Every user therefore keeps at least one training item.

Time order ties (equal timestamps) are broken by the interaction's position in the input list,
earliest row first -- the order a stable sort on the timestamp gives, as RecBole's ``TO`` does.

Duplicated (user, item) pairs collapse to one interaction (the earliest one) before splitting,
because the feedback is binary.

Every split also keeps each user's train and valid items as time-ordered sequences
(:class:`fedrec.data.sequences.Sequences`) for sequence models: by timestamp with the same
input-row tie-break, or in input order when the data has no timestamps.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np
import scipy.sparse as sp

from fedrec.data.sequences import Sequences
from fedrec.errors import ConfigError

SPLIT_METHODS = ("ratio", "temporal", "temporal_global", "loo")
TIMED_METHODS = ("temporal", "temporal_global", "loo")


class Split(NamedTuple):
    train: sp.csr_matrix
    valid: sp.csr_matrix
    test: sp.csr_matrix
    # Timestamp of each stored training entry, aligned with ``train.data``; None without timestamps.
    train_timestamps: np.ndarray | None
    # Original row indices (into ``0..n_users-1``) of the rows kept; all users unless
    # ``temporal_global`` dropped empty users. The matrices have ``len(kept_users)`` rows.
    kept_users: np.ndarray
    # Each user's train and valid items in time order (ties, or no timestamps: input order), for
    # sequence models; the test input is train then valid (``Interactions.input_sequences``).
    train_seq: Sequences | None = None
    valid_seq: Sequences | None = None


def check_ratios(ratios: Sequence[float], key: str = "dataset.split.ratios") -> tuple[float, float, float]:
    """Validate ``[train, valid, test]`` fractions; ConfigError naming ``key`` otherwise."""
    try:
        r = tuple(float(x) for x in ratios)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={ratios!r}: expected three numbers [train, valid, test]") from None
    if len(r) != 3:
        raise ConfigError(f"{key}={list(r)}: expected three numbers [train, valid, test]") from None
    if any(x < 0 or not math.isfinite(x) for x in r):
        raise ConfigError(f"{key}={list(r)}: ratios must be non-negative") from None
    if abs(sum(r) - 1.0) > 1e-6:
        raise ConfigError(f"{key}={list(r)}: ratios must sum to 1 (they sum to {sum(r):g})") from None
    if r[0] <= 0:
        raise ConfigError(f"{key}={list(r)}: the train ratio must be positive") from None
    return r  # type: ignore[return-value]


def dedupe_index(users: np.ndarray, items: np.ndarray, timestamps: np.ndarray | None, n_items: int) -> np.ndarray:
    """Sorted row indices of the unique (user, item) pairs: each pair's earliest row (first row on ties)."""
    key = users.astype(np.int64) * np.int64(n_items) + items.astype(np.int64)
    if timestamps is not None:
        # Sort by time first so np.unique's "first occurrence" is the earliest interaction.
        order = np.argsort(timestamps, kind="stable")
        _, first = np.unique(key[order], return_index=True)
        return np.sort(order[first])
    _, keep = np.unique(key, return_index=True)
    return np.sort(keep)


def dedupe(users: np.ndarray, items: np.ndarray, timestamps: np.ndarray | None, n_items: int):
    """Unique (user, item) pairs, keeping each pair's earliest timestamp (first row on ties)."""
    keep = dedupe_index(users, items, timestamps, n_items)
    return users[keep], items[keep], None if timestamps is None else timestamps[keep]


def values_like(mat: sp.csr_matrix, users: np.ndarray, items: np.ndarray, values: np.ndarray,
                row_users: np.ndarray | None = None) -> sp.csr_matrix:
    """A float32 CSR with ``mat``'s sparsity holding ``values`` of the unique pairs (``users``, ``items``).

    Row r of ``mat`` is user ``row_users[r]`` (default: r) of the pair list; every stored entry of
    ``mat`` must be one of the pairs (a split of them). Vectorised: one sorted-key lookup.
    """
    n_items = mat.shape[1]
    key = users.astype(np.int64) * np.int64(n_items) + items.astype(np.int64)
    order = np.argsort(key, kind="stable")
    rows = np.repeat(np.arange(mat.shape[0]), np.diff(mat.indptr))
    if row_users is not None:
        rows = np.asarray(row_users, dtype=np.int64)[rows]
    want = rows.astype(np.int64) * np.int64(n_items) + mat.indices.astype(np.int64)
    pos = order[np.searchsorted(key[order], want)]
    out = sp.csr_matrix((np.asarray(values, dtype=np.float32)[pos], mat.indices.copy(), mat.indptr.copy()),
                        shape=mat.shape)
    out.has_sorted_indices = mat.has_sorted_indices
    return out


def to_csr(users: np.ndarray, items: np.ndarray, n_users: int, n_items: int,
           timestamps: np.ndarray | None = None) -> tuple[sp.csr_matrix, np.ndarray | None]:
    """Binary float32 CSR from unique pairs, plus the timestamps re-ordered to match ``.data``.

    The matrix is built directly from (indptr, indices) after a (user, item) lexsort, so the
    CSR order is known and timestamps can be aligned with it without a second lookup.
    """
    users = np.asarray(users, dtype=np.int64)
    items = np.asarray(items, dtype=np.int64)
    order = np.lexsort((items, users))
    indptr = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(np.bincount(users, minlength=n_users), out=indptr[1:])
    mat = sp.csr_matrix(
        (np.ones(len(users), dtype=np.float32), items[order].astype(np.int32), indptr),
        shape=(n_users, n_items),
    )
    mat.has_sorted_indices = True
    ts = None if timestamps is None else np.asarray(timestamps)[order]
    return mat, ts


def _group_positions(sorted_users: np.ndarray, n_users: int) -> tuple[np.ndarray, np.ndarray]:
    """For a user-sorted list: each row's position within its user group, and each row's group size."""
    counts = np.bincount(sorted_users, minlength=n_users)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    pos = np.arange(len(sorted_users)) - starts[sorted_users]
    return pos, counts[sorted_users]


def ratio_counts(n: np.ndarray, ratios: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-user (train, valid, test) counts for ``n`` interactions, RecBole's rounding rule.

    Mirrors ``Dataset._calcu_split_ids`` of RecBole 1.2, vectorised over users, including its
    plain truncation: with ratios ``[0.7, 0.01, 0.29]`` and ``n = 100`` test gets
    ``int(28.999999999999996) = 28`` items, as in RecBole.
    """
    n = np.asarray(n, dtype=np.int64)
    total = float(sum(ratios))
    rv, rt = ratios[1] / total, ratios[2] / total
    n_valid = np.trunc(rv * n).astype(np.int64)
    n_test = np.trunc(rt * n).astype(np.int64)
    n_train = n - n_valid - n_test
    # Test first, then valid, as RecBole does: a split with a non-zero ratio that rounds to zero
    # gets one item as long as train keeps more than one.
    for cnt, r in ((n_test, rt), (n_valid, rv)):
        bump = (n_train > 1) & (r * n > 0) & (r * n < 1)
        cnt += bump
        n_train -= bump
    return n_train, n_valid, n_test


def _cut_by_ratio(order: np.ndarray, users: np.ndarray, n_users: int, ratios) -> np.ndarray:
    """Part (0 train, 1 valid, 2 test) of each row, cutting each user's rows in ``order``.

    ``order`` must group the rows by user; inside a group it is the order the cut follows
    (random for ``ratio``, chronological for ``temporal``).
    """
    pos, size = _group_positions(users[order], n_users)
    n_tr, n_va, _ = ratio_counts(size, ratios)
    part = np.empty(len(order), dtype=np.int8)
    part[order] = np.where(pos < n_tr, 0, np.where(pos < n_tr + n_va, 1, 2))
    return part


def _leave_one_out(order: np.ndarray, users: np.ndarray, n_users: int) -> np.ndarray:
    """Part of each row for RecBole's ``LS: valid_and_test`` over the user-grouped, timed ``order``.

    RecBole leaves ``min(2, n - 1)`` items out and fills the parts from the end: test always
    gets the latest item once ``n >= 2``, valid the second latest only once ``n >= 3``.
    """
    pos, size = _group_positions(users[order], n_users)
    from_end = size - 1 - pos
    part = np.zeros(len(order), dtype=np.int8)
    part[order] = np.where((from_end == 0) & (size >= 2), 2, np.where((from_end == 1) & (size >= 3), 1, 0))
    return part


def _global_time_cut(timestamps: np.ndarray, ratios) -> np.ndarray:
    """Part of each row for one global cut at the ``ratios`` quantiles of time."""
    nnz = len(timestamps)
    order = np.argsort(timestamps, kind="stable")  # ties: earlier input row first
    c1 = int(round(ratios[0] * nnz))
    c2 = int(round((ratios[0] + ratios[1]) * nnz))
    part = np.zeros(nnz, dtype=np.int8)
    part[order[c1:c2]] = 1
    part[order[c2:]] = 2
    return part


def split_interactions(users, items, timestamps, n_users: int, n_items: int, method: str,
                       ratios: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0) -> Split:
    """Split interactions (internal ids) into binary train/valid/test matrices of one shape.

    Returns a :class:`Split` (unpacks as ``train, valid, test, train_timestamps, kept_users``).
    ``timestamps`` may be None for ``ratio``; the other methods need them.
    """
    if method not in SPLIT_METHODS:
        raise ConfigError(
            f"dataset.split.method={method!r}: unknown split method (expected one of {', '.join(SPLIT_METHODS)})"
        ) from None
    ratios = check_ratios(ratios)
    users = np.asarray(users, dtype=np.int64)
    items = np.asarray(items, dtype=np.int64)
    if timestamps is not None:
        timestamps = np.asarray(timestamps)
    elif method in TIMED_METHODS:
        raise ConfigError(
            f"dataset.split.method={method}: needs interaction timestamps, but the data has none (use ratio)"
        ) from None
    users, items, timestamps = dedupe(users, items, timestamps, n_items)
    nnz = len(users)
    if method == "ratio":
        rng = np.random.default_rng(seed)
        part = _cut_by_ratio(np.lexsort((rng.random(nnz), users)), users, n_users, ratios)
    elif method == "temporal_global":
        part = _global_time_cut(timestamps, ratios)
    else:
        # Per user by time; the row index as last key is the stable tie-break on equal times.
        order = np.lexsort((np.arange(nnz), timestamps, users))
        if method == "temporal":
            part = _cut_by_ratio(order, users, n_users, ratios)
        else:
            part = _leave_one_out(order, users, n_users)

    kept_users = np.arange(n_users, dtype=np.int64)
    if method == "temporal_global":
        has_train = np.bincount(users[part == 0], minlength=n_users) > 0
        kept_users = np.flatnonzero(has_train)
        remap = np.full(n_users, -1, dtype=np.int64)
        remap[kept_users] = np.arange(len(kept_users))
        keep = has_train[users]
        users, items, part = remap[users[keep]], items[keep], part[keep]
        timestamps = timestamps[keep]
        n_users = len(kept_users)

    # Time order per user (the input row breaks ties; no timestamps: input order, which dedupe keeps).
    when = np.arange(len(users)) if timestamps is None else timestamps
    chrono = np.lexsort((np.arange(len(users)), when, users))
    seqs = [Sequences.from_sorted(users[sel], items[sel], n_users)
            for sel in (chrono[part[chrono] == k] for k in (0, 1))]

    mats = []
    train_ts = None
    for k in range(3):
        m = part == k
        mat, ts = to_csr(users[m], items[m], n_users, n_items, None if timestamps is None else timestamps[m])
        mats.append(mat)
        if k == 0:
            train_ts = ts
    return Split(mats[0], mats[1], mats[2], train_ts, kept_users, seqs[0], seqs[1])
