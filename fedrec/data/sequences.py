"""Per-user item sequences in time order, stored CSR-like, and their padded batches.

``Sequences(indptr, items)``: user ``u``'s items are ``items[indptr[u]:indptr[u+1]]``, oldest first.
Built by :func:`fedrec.data.splits.split_interactions` for the train and valid parts of every
split (order: timestamp, ties by input row; without timestamps, the input order), so every dataset
with a per-interaction order has sequences, and sequence models train on any of them.

Padded batches (:meth:`Sequences.padded`) hold the **last** ``length`` items of each user,
**left**-padded with the pad id ``n_items`` (one past the last item id), so the most recent item
is always in the last column; the mask of real items is ``seq != n_items``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Sequences:
    indptr: np.ndarray  # (n_users + 1,) int64
    items: np.ndarray  # (nnz,) int64, each user's items oldest first

    @staticmethod
    def from_sorted(users: np.ndarray, items: np.ndarray, n_users: int) -> "Sequences":
        """From interactions already grouped by user and in time order inside each user."""
        indptr = np.zeros(n_users + 1, dtype=np.int64)
        np.cumsum(np.bincount(np.asarray(users, dtype=np.int64), minlength=n_users), out=indptr[1:])
        return Sequences(indptr, np.asarray(items, dtype=np.int64))

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.indptr)

    def user(self, u: int) -> np.ndarray:
        return self.items[self.indptr[u]:self.indptr[u + 1]]

    def subset(self, users: np.ndarray) -> "Sequences":
        """The sequences of ``users``, in that order (rows 0..len(users)-1)."""
        users = np.asarray(users, dtype=np.int64)
        lens = self.lengths[users]
        indptr = np.concatenate(([0], np.cumsum(lens))).astype(np.int64)
        # position of every kept item: its user's start plus its offset inside the user
        offset = np.arange(indptr[-1]) - np.repeat(indptr[:-1], lens)
        return Sequences(indptr, self.items[np.repeat(self.indptr[users], lens) + offset])

    def append(self, other: "Sequences") -> "Sequences":
        """``other``'s users after this one's (rows n..n+m-1): how a data transform adds users."""
        indptr = np.concatenate((self.indptr, self.indptr[-1] + np.asarray(other.indptr[1:], dtype=np.int64)))
        return Sequences(indptr.astype(np.int64), np.concatenate((self.items, np.asarray(other.items, dtype=np.int64))))

    def then(self, other: "Sequences") -> "Sequences":
        """Each user's sequence followed by the same user's sequence in ``other`` (test input = train + valid)."""
        la, lb = self.lengths, other.lengths
        indptr = np.concatenate(([0], np.cumsum(la + lb))).astype(np.int64)
        items = np.empty(indptr[-1], dtype=np.int64)
        offset = np.arange(indptr[-1]) - np.repeat(indptr[:-1], la + lb)  # position inside the user
        user = np.repeat(np.arange(len(la)), la + lb)
        first = offset < la[user]
        items[first] = self.items[self.indptr[user[first]] + offset[first]]
        items[~first] = other.items[other.indptr[user[~first]] + offset[~first] - la[user[~first]]]
        return Sequences(indptr, items)

    def padded(self, users: np.ndarray, length: int, pad: int, keep: int | None = None) -> torch.Tensor:
        """(B, length) int64: the last ``min(length, keep)`` items of each user, left-padded with ``pad``."""
        users = np.asarray(users, dtype=np.int64)
        take = min(int(length), int(keep)) if keep else int(length)
        n = np.minimum(self.lengths[users], take)
        out = np.full((len(users), int(length)), pad, dtype=np.int64)
        row = np.repeat(np.arange(len(users)), n)
        back = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)  # 0..n-1 inside each user
        # item j of the user's last n goes to column length - n + j
        src = np.repeat(self.indptr[users + 1] - n, n) + back
        out[row, int(length) - np.repeat(n, n) + back] = self.items[src]
        return torch.from_numpy(out)
