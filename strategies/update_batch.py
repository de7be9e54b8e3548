"""One round's updates as one batch: every sampled user's model, from every node, with its ids.

A rule that must see every user at once (a coordinate-wise median, Krum, trimmed means, detection)
gets an :class:`UpdateBatch`: the users' updated global parameters stacked over all nodes, the
users' global ids, the partitions they came from and the aggregation weights the *server* derived
(uniform, or the reported interaction count capped at ``federation.max_user_interactions``: a
client's self-reported weight is never trusted beyond what the config allows). The arithmetic of
each rule is a pure function of the batch, testable against numpy without a federation.

Row-sparse tables (item-indexed, e.g. BPR-MF's item embeddings) are not stacked: a user's update of
such a table is zero outside the rows its local training touched, so the batch keeps, per user, only
those rows' deltas (:class:`RowUpdates`, the FedRec upload: "an MF client sends its item rows").
Each rule defines what an untouched row means; every rule here reads it as what it is in the dense
computation, a zero delta (the user's model keeps the global row), so its result equals the rule on
the dense (U, n_rows, ...) stack up to float rounding, and that stack is never built. Rules that
want the other reading (only the users who touched a row have a say on it, as FedRec-aware robust
aggregation does) say so: :func:`row_median`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class RowUpdates:
    """A row-sparse table's per-user updates: user u changed rows ``rows[offsets[u]:offsets[u + 1]]``
    (strictly increasing ids) by ``values[offsets[u]:offsets[u + 1]]`` (deltas: trained minus global);
    every other row of its update is zero. ``base`` is the round's global table they apply to."""

    base: np.ndarray  # (n_rows, ...) the global table the users trained from
    offsets: np.ndarray  # (U + 1,) int64
    rows: np.ndarray  # (nnz,) int64
    values: np.ndarray  # (nnz, ...) deltas, the table's dtype

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def counts(self) -> np.ndarray:
        """(U,) rows each user touched."""
        return np.diff(self.offsets)

    def entry_users(self) -> np.ndarray:
        """(nnz,) the user (position in the batch) of each entry."""
        return np.repeat(np.arange(len(self)), self.counts)

    def select(self, keep: np.ndarray) -> "RowUpdates":
        """The users where ``keep`` (bool (U,)) is true, in order."""
        counts = self.counts
        entries = np.repeat(keep, counts)
        offsets = np.concatenate([[0], np.cumsum(counts[keep])]).astype(np.int64)
        return RowUpdates(self.base, offsets, self.rows[entries], self.values[entries])

    @staticmethod
    def from_dense(stack: np.ndarray, base: np.ndarray) -> "RowUpdates":
        """(U, n_rows, ...) updated tables -> their nonzero-delta rows (a node that sent full arrays)."""
        deltas = stack - base[None]
        touched = (deltas.reshape(len(stack), len(base), -1) != 0).any(-1)
        users, rows = np.nonzero(touched)  # row-major: grouped by user, rows increasing
        offsets = np.concatenate([[0], np.cumsum(touched.sum(1))]).astype(np.int64)
        return RowUpdates(base, offsets, rows.astype(np.int64), deltas[users, rows])

    @staticmethod
    def concat(parts: list["RowUpdates"]) -> "RowUpdates":
        shift = np.cumsum([0] + [len(p.rows) for p in parts[:-1]])
        offsets = np.concatenate([parts[0].offsets[:1]] + [p.offsets[1:] + s for p, s in zip(parts, shift)])
        return RowUpdates(parts[0].base, offsets.astype(np.int64), np.concatenate([p.rows for p in parts]),
                          np.concatenate([p.values for p in parts]))


@dataclass
class UpdateBatch:
    arrays: dict[str, np.ndarray]  # name -> (U, ...) each user's updated global parameters (dense tables)
    users: np.ndarray  # (U,) global user ids
    nodes: np.ndarray  # (U,) partition id of the node each user trained on
    weights: np.ndarray  # (U,) server-derived aggregation weights
    rows: dict[str, RowUpdates] = field(default_factory=dict)  # name -> row-sparse tables' touched rows

    def __len__(self) -> int:
        return len(self.users)

    @staticmethod
    def concat(parts: list["UpdateBatch"]) -> "UpdateBatch":
        if len(parts) == 1:  # one node's batch (cross-device with one node): no copy of its stack
            return parts[0]
        # A table sparse in one node's reply and dense in another's (a node with federation.sparse_rows=off)
        # is made sparse in all: the same updates, and never a dense stack of every user.
        sparse = sorted({k for p in parts for k in p.rows})
        names = [k for k in parts[0].arrays if k not in sparse]

        def rows_of(p: UpdateBatch, k: str) -> RowUpdates:
            return p.rows[k] if k in p.rows else RowUpdates.from_dense(p.arrays[k], next(
                q.rows[k].base for q in parts if k in q.rows))

        return UpdateBatch(arrays={k: np.concatenate([p.arrays[k] for p in parts]) for k in names},
                           users=np.concatenate([p.users for p in parts]),
                           nodes=np.concatenate([p.nodes for p in parts]),
                           weights=np.concatenate([p.weights for p in parts]),
                           rows={k: RowUpdates.concat([rows_of(p, k) for p in parts]) for k in sparse})


def derive_weights(reported: np.ndarray, weighting: str, cap: int | None) -> np.ndarray:
    """The weights the server uses: 1 per user (``uniform``), or the reported interaction count
    clipped to [0, cap] (``interactions``; without a cap, the reported count)."""
    if weighting == "uniform":
        return np.ones(len(reported))
    w = np.asarray(reported, dtype=np.float64)
    return np.clip(w, 0, cap) if cap else w


def weighted_mean(batch: UpdateBatch, block: int = 8, keep: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """sum_u w_u x_u / sum_u w_u, accumulated in float64 a few users at a time (never a float64 copy
    of the whole stack: at ML-1M scale a page of users is hundreds of MB). ``keep`` (a boolean mask)
    restricts the mean to those users without copying the stack (a dropped user's NaN stays out).

    A row-sparse table's mean is the global table plus the weighted sum of the touched rows' deltas
    (an untouched row adds a zero delta): the dense mean up to float rounding."""
    if keep is not None:
        idx = np.flatnonzero(keep)
        rows = {k: ru.select(keep) for k, ru in batch.rows.items()}
        w = batch.weights[idx] / batch.weights[idx].sum()
    else:
        idx, rows = None, batch.rows
        w = batch.weights / batch.weights.sum()
    out = {}
    for k, v in batch.arrays.items():
        acc = np.zeros(v.shape[1:], dtype=np.float64)
        for start in range(0, len(w), block):
            part = v[start:start + block] if idx is None else v[idx[start:start + block]]
            acc += np.tensordot(w[start:start + block], part.astype(np.float64), axes=1)
        out[k] = acc.astype(v.dtype)
    for k, ru in rows.items():
        acc = ru.base.astype(np.float64)
        if len(ru.rows):
            rows, starts, order = _row_groups(ru)
            flat = ru.values.reshape(len(ru.rows), -1)[order]  # nnz > 0 here
            # per row, the weighted deltas summed in user order (a stable sort), so sums are reproducible
            summed = np.add.reduceat(w[ru.entry_users()[order], None] * flat.astype(np.float64), starts, axis=0)
            acc.reshape(len(acc), -1)[rows] += summed
        out[k] = acc.astype(ru.base.dtype)
    return out


def coordinate_median(batch: UpdateBatch) -> dict[str, np.ndarray]:
    """Coordinate-wise median over all users of the round (Yin et al., ICML 2018), unweighted.

    Row-sparse tables: the median over *all* users, a user who did not touch a row counting with its
    unchanged global row (a zero delta), as on the dense stack: global + median of the deltas."""
    out = {k: np.median(v, axis=0).astype(v.dtype) for k, v in batch.arrays.items()}
    for k, ru in batch.rows.items():
        out[k] = _apply(ru, lambda groups: _median_with_zeros(*groups, n_users=len(ru)))
    return out


def row_median(batch: UpdateBatch) -> dict[str, np.ndarray]:
    """Per row of a row-sparse table, the coordinate-wise median over only the users who touched it
    (rows no user touched keep the global row): the FedRec reading, in which an item's row is decided
    by the users who trained on the item, not outvoted by the zeros of all the others. Dense tables,
    which every user updates, get the coordinate-wise median over all users."""
    out = {k: np.median(v, axis=0).astype(v.dtype) for k, v in batch.arrays.items()}
    for k, ru in batch.rows.items():
        out[k] = _apply(ru, lambda groups: _median_of_groups(*groups))
    return out


# ---------------------------------------------------------------------------------------- row groups
def _row_groups(ru: RowUpdates) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The touched rows (R,), where each row's entries start in the row-sorted order (R,), and that
    order (nnz,): a stable sort by row, so a row's entries stay in user order."""
    order = np.argsort(ru.rows, kind="stable")
    r = ru.rows[order]
    starts = np.flatnonzero(np.concatenate([[True], r[1:] != r[:-1]]))
    return r[starts], starts, order


def _sorted_groups(ru: RowUpdates) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(starts (R,), counts (R,), values (nnz, m)): the entries grouped by row and, within a row, sorted
    per coordinate (m = the row's flattened size). Memory is a few copies of the uploaded entries."""
    _, starts, order = _row_groups(ru)
    v = ru.values.reshape(len(ru.rows), -1)[order]
    counts = np.diff(np.concatenate([starts, [len(v)]]))
    group = np.repeat(np.arange(len(starts)), counts)
    by_value = np.argsort(v, axis=0, kind="stable")  # per coordinate ...
    by_group = np.argsort(group[by_value], axis=0, kind="stable")  # ... then by row, keeping value order
    return starts, counts, np.take_along_axis(v, np.take_along_axis(by_value, by_group, axis=0), axis=0)


def _apply(ru: RowUpdates, median) -> np.ndarray:
    """The global table with each touched row moved by ``median(groups)`` ((R, m) deltas)."""
    out = ru.base.copy()
    if len(ru.rows):
        rows = _row_groups(ru)[0]
        flat = out.reshape(len(out), -1)
        flat[rows] = flat[rows] + median(_sorted_groups(ru)).astype(out.dtype)
    return out


def _pick(s: np.ndarray, starts: np.ndarray, k: np.ndarray) -> np.ndarray:
    """s[starts[r] + k[r, j], j]: the k-th smallest value of each row group and coordinate."""
    return np.take_along_axis(s, starts[:, None] + k, axis=0)


def _median_of_groups(starts, counts, s) -> np.ndarray:
    """The median of each row group's values: numpy's (for an even count the mean of the two middle)."""
    lo, hi = ((counts - 1) // 2)[:, None], (counts // 2)[:, None]
    m = s.shape[1]
    return (_pick(s, starts, np.broadcast_to(lo, (len(starts), m)))
            + _pick(s, starts, np.broadcast_to(hi, (len(starts), m)))) / 2


def _median_with_zeros(starts, counts, s, n_users: int) -> np.ndarray:
    """The median over ``n_users`` values per row group and coordinate: the group's values plus one zero
    for each user who did not touch the row. In sorted order the zeros sit right after the group's
    negative values, so the k-th smallest is read off the group's sorted values without building them."""
    neg = np.add.reduceat((s < 0).astype(np.int64), starts, axis=0)  # (R, m) values below the zeros
    zeros = (n_users - counts)[:, None]

    def kth(k: int) -> np.ndarray:
        in_zeros = (k >= neg) & (k < neg + zeros)
        idx = np.where(k < neg, k, k - zeros)
        idx = np.clip(idx, 0, (counts - 1)[:, None])  # only read where not in_zeros
        return np.where(in_zeros, np.zeros((), s.dtype), _pick(s, starts, idx))

    return (kth((n_users - 1) // 2) + kth(n_users // 2)) / 2


def row_clip_sum(batch: UpdateBatch, bound: float) -> dict[str, np.ndarray]:
    """The global parameters plus the *sum* (not the mean) over users of their updates, each row of a
    row-sparse table clipped to L2 norm ``bound`` first (FedRecAttack's server, Rong et al., ICDE 2022:
    every client's item-row gradient clipped to norm 1, summed over the batch of clients, one SGD step;
    on deltas of one local SGD step at rate lr that is ``bound = lr * 1``). Untouched rows add nothing.
    Dense tables are refused: the batch holds users' updated dense tables, not their deltas, and the
    FedRec item-side setting (MF, private user rows) has only row-sparse global tables.

    Unweighted: each client's clipped gradient counts once, whatever its interactions."""
    if batch.arrays:
        raise ValueError(f"row_clip_sum: dense global tables {sorted(batch.arrays)} have no per-row clip; "
                         "only row-sparse tables (federation.sparse_rows=auto) are summed")
    if not bound > 0:
        raise ValueError(f"row_clip_sum: bound must be positive, got {bound}")
    out = {}
    for k, ru in batch.rows.items():
        acc = ru.base.astype(np.float64)
        if len(ru.rows):
            rows, starts, order = _row_groups(ru)
            flat = ru.values.reshape(len(ru.rows), -1).astype(np.float64)
            norms = np.sqrt((flat ** 2).sum(1))
            scale = np.minimum(1.0, bound / np.maximum(norms, 1e-300))
            clipped = (flat * scale[:, None])[order]
            acc.reshape(len(acc), -1)[rows] += np.add.reduceat(clipped, starts, axis=0)
        out[k] = acc.astype(ru.base.dtype)
    return out
