"""Turbo-CF (Park, Shin and Shin, "Turbo-CF: Matrix Decomposition-Free Graph Filtering for Fast
Recommendation", SIGIR 2024). Official code: github.com/jindeok/Turbo-CF (``main.py``, ``utils.py``).

As implemented there and here:

* R~ = D_U^-alpha R D_I^(alpha-1) (``normalize_sparse_adjacency_matrix(R, alpha)``);
* item-item graph P = R~^T R~, then raised elementwise to ``power`` (``P.data **= power``, the
  paper's s);
* polynomial low-pass filter of P (``filter``): 1: P; 2: 2P - P^2; 3: P + 0.01 (-P^3 + 10 P^2 - 29 P)
  (the official third-order approximation of the ideal low-pass filter);
* score = ``x @ filter(P)``, no matrix decomposition.

Deviations: none in the filter; degrees of 0 (items or users without training interactions) give
factor 0 (the official sparse product never touches them either). The official repository tunes
on test (its README lists per-dataset optima and says it filters train + validation); here every
hyperparameter is chosen on validation by ``simulations.leaderboard``. Training-free: no federation
or DP-SGD (see :mod:`fedrec.models.closed_form`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from fedrec.errors import ConfigError
from fedrec.models.closed_form import ItemItemRecommender, normalized_interactions

FILTERS = (1, 2, 3)


@dataclass
class TurboCFConfig:
    alpha: float = 0.5  # degree normalisation exponent of R~ (official default 0.5)
    power: float = 1.0  # elementwise power s of P (official default 1)
    filter: int = 1  # 1: linear | 2: 2nd order | 3: polynomial approximation of the ideal low-pass

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.alpha) <= 1.0:
            raise ConfigError(f"model.alpha: must be in [0, 1], got {self.alpha}")
        if not float(self.power) > 0:
            raise ConfigError(f"model.power: must be positive, got {self.power}")
        if int(self.filter) not in FILTERS:
            raise ConfigError(f"model.filter: expected one of {FILTERS}, got {self.filter}")


def turbo_filter(p: np.ndarray, order: int) -> np.ndarray:
    """The official polynomial filters of P."""
    if order == 1:
        return p
    p2 = p @ p
    if order == 2:
        return 2 * p - p2
    return p + 0.01 * (-(p2 @ p) + 10 * p2 - 29 * p)


class TurboCF(ItemItemRecommender):
    name = "turbocf"

    def item_matrix(self, train: sp.csr_matrix) -> np.ndarray:
        alpha = float(self.cfg.alpha)
        r = normalized_interactions(train, -alpha, alpha - 1.0)
        p = np.asarray((r.T @ r).toarray(), dtype=np.float64) ** float(self.cfg.power)
        return turbo_filter(p, int(self.cfg.filter))
