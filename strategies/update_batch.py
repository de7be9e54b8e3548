"""One round's updates as one batch: every sampled user's model, from every node, with its ids.

A rule that must see every user at once (a coordinate-wise median, Krum, trimmed means, detection)
gets an :class:`UpdateBatch`: the users' updated global parameters stacked over all nodes, the
users' global ids, the partitions they came from and the aggregation weights the *server* derived
(uniform, or the reported interaction count capped at ``federation.max_user_interactions``: a
client's self-reported weight is never trusted beyond what the config allows). The arithmetic of
each rule is a pure function of the batch, testable against numpy without a federation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class UpdateBatch:
    arrays: dict[str, np.ndarray]  # name -> (U, ...) each user's updated global parameters
    users: np.ndarray  # (U,) global user ids
    nodes: np.ndarray  # (U,) partition id of the node each user trained on
    weights: np.ndarray  # (U,) server-derived aggregation weights

    def __len__(self) -> int:
        return len(self.users)

    @staticmethod
    def concat(parts: list["UpdateBatch"]) -> "UpdateBatch":
        names = list(parts[0].arrays)
        return UpdateBatch(arrays={k: np.concatenate([p.arrays[k] for p in parts]) for k in names},
                           users=np.concatenate([p.users for p in parts]),
                           nodes=np.concatenate([p.nodes for p in parts]),
                           weights=np.concatenate([p.weights for p in parts]))


def derive_weights(reported: np.ndarray, weighting: str, cap: int | None) -> np.ndarray:
    """The weights the server uses: 1 per user (``uniform``), or the reported interaction count
    clipped to [0, cap] (``interactions``; without a cap, the reported count)."""
    if weighting == "uniform":
        return np.ones(len(reported))
    w = np.asarray(reported, dtype=np.float64)
    return np.clip(w, 0, cap) if cap else w


def weighted_mean(batch: UpdateBatch, block: int = 8) -> dict[str, np.ndarray]:
    """sum_u w_u x_u / sum_u w_u, accumulated in float64 a few users at a time (never a float64 copy
    of the whole stack: at ML-1M scale a page of users is hundreds of MB)."""
    w = batch.weights / batch.weights.sum()
    out = {}
    for k, v in batch.arrays.items():
        acc = np.zeros(v.shape[1:], dtype=np.float64)
        for start in range(0, len(w), block):
            acc += np.tensordot(w[start:start + block], v[start:start + block].astype(np.float64), axes=1)
        out[k] = acc.astype(v.dtype)
    return out


def coordinate_median(batch: UpdateBatch) -> dict[str, np.ndarray]:
    """Coordinate-wise median over all users of the round (Yin et al., ICML 2018), unweighted."""
    return {k: np.median(v, axis=0).astype(v.dtype) for k, v in batch.arrays.items()}
