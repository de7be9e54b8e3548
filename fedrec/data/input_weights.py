"""Weighted input rows: what a model reads as ``Batch.x`` in place of the binary training matrix.

Most models read each user's binary training row. A model may instead declare an *input weighting*
(``Recommender.input_weighting``, a frozen, hashable spec of this module); the data layer then builds
a float-valued matrix with exactly the training matrix's sparsity pattern once per run and spec
(:meth:`fedrec.data.interactions.Interactions.input_rows`, cached on the data object), and every place
that builds a model's input rows from the training matrix reads it instead: the shared trainer's rows
(centralised and silo clients, :func:`fedrec.train.model_rows`), cross-device users' rows
(:mod:`fedrec.federated.device_node`), the personalised scorer, and the evaluation's history rows
(:func:`fedrec.eval.metrics.evaluate_model`). What stays binary: the evaluation's seen-item mask, the
targets, interaction counts (FedAvg weights, the per-user cap), graphs and every attack/defense that
reads ``data.train`` itself. See docs/ARCHITECTURE.md ("Weighted input rows").

Every weight must be > 0, so that a stored interaction stays visible in the dense row (a zero weight
would make it indistinguishable from a non-interaction).

Specs:

* :class:`TemporalLinspace` -- T-DiffRec / LT-DiffRec (Wang et al., SIGIR 2023; official
  github.com/YiyanXu/DiffRec ``T-DiffRec/data_utils.py``): each user's training interactions, in time
  order (oldest first), get ``np.linspace(w_min, w_max, n_u)``; a user with one interaction gets
  ``w_min`` (linspace's single point). The time order is ``Interactions.train_timestamps`` (for
  DiffRec's ``.npy`` splits the row position in ``train_list.npy``, the official order); equal
  timestamps keep the CSR order (item id), the stable tie-break. A dataset without training
  timestamps (sequence files, pre-split atomic files, a user subset) is refused with a ConfigError:
  the official code has no fallback (it always takes the file order).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from fedrec.errors import ConfigError


def temporal_linspace_weights(train: sp.csr_matrix, timestamps: np.ndarray, w_min: float,
                              w_max: float) -> np.ndarray:
    """The weight of every stored entry of ``train`` (CSR order): ``np.linspace(w_min, w_max, n_u)`` over
    user u's entries sorted by ``timestamps`` (stable: ties keep CSR order). float64, vectorised."""
    train = sp.csr_matrix(train)
    nnz = int(train.nnz)
    timestamps = np.asarray(timestamps)
    if timestamps.shape != (nnz,):
        raise ValueError(f"temporal_linspace_weights: {timestamps.shape} timestamps for {nnz} stored interactions")
    counts = np.diff(train.indptr)
    row = np.repeat(np.arange(train.shape[0]), counts)
    order = np.lexsort((np.arange(nnz), timestamps, row))  # by user, then time, then CSR position
    rank = np.empty(nnz, dtype=np.int64)
    rank[order] = np.arange(nnz) - train.indptr[row[order]]  # 0 = the user's oldest interaction
    n = counts[row]
    # np.linspace's own arithmetic: start + k * ((stop - start) / (n - 1)), the last point set to stop.
    step = np.where(n > 1, (w_max - w_min) / np.maximum(n - 1, 1), 0.0)
    w = w_min + rank * step
    w[(n > 1) & (rank == n - 1)] = w_max
    return w


@dataclass(frozen=True)
class TemporalLinspace:
    """T-DiffRec's time-aware weights (see the module docstring); ``what`` names the config keys in errors."""

    w_min: float
    w_max: float
    what: str = "model"

    def __post_init__(self) -> None:
        if not 0.0 < self.w_min <= self.w_max:
            raise ConfigError(f"{self.what}.w_min/w_max: need 0 < w_min <= w_max (a zero weight hides the "
                              f"interaction from the input row), got {self.w_min} / {self.w_max}")

    def build(self, data) -> sp.csr_matrix:
        if data.train_timestamps is None:
            raise ConfigError(f"{self.what}.w_min/w_max: time-aware weights need each user's training "
                              f"interactions in time order, but dataset {data.name!r} has none (train_timestamps "
                              "is None); use a dataset with timestamps or the unweighted model")
        train = sp.csr_matrix(data.train)
        w = temporal_linspace_weights(train, data.train_timestamps, self.w_min, self.w_max)
        return sp.csr_matrix((w.astype(np.float32), train.indices.copy(), train.indptr.copy()),
                             shape=train.shape)
