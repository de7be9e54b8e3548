"""EASE (Steck, "Embarrassingly Shallow Autoencoders for Sparse Data", WWW 2019).

The closed form of the paper's Algorithm 1 (official snippet in the paper; github.com/hasteck/EASE_WWW19):
``G = X^T X + lambda I``, ``P = G^-1``, ``B = -P / diag(P)`` column-wise (B_ij = -P_ij / P_jj) and
``diag(B) = 0``; score = ``x @ B``. This is the minimiser of ||X - XB||_F^2 + lambda ||B||_F^2
subject to diag(B) = 0. Dense float64 inverse of the (n_items, n_items) Gram (ML-1M: 3,706 items,
a second). Deviation: none. Training-free, so no federation or DP-SGD (see
:mod:`fedrec.models.closed_form`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from fedrec.errors import ConfigError
from fedrec.models.closed_form import ItemItemRecommender, gram


@dataclass
class EASEConfig:
    l2: float = 500.0  # lambda, the L2 weight on B (Steck: 500 for ML-20M)

    def __post_init__(self) -> None:
        if not float(self.l2) > 0:
            raise ConfigError(f"model.l2: must be positive (G + lambda I must be invertible), got {self.l2}")


def ease_weights(g: np.ndarray, l2: float) -> np.ndarray:
    """B of EASE from the item-item Gram ``g``."""
    p = np.linalg.inv(g + float(l2) * np.eye(g.shape[0]))
    b = -p / np.diag(p)[None, :]
    np.fill_diagonal(b, 0.0)
    return b


class EASE(ItemItemRecommender):
    name = "ease"

    def item_matrix(self, train: sp.csr_matrix) -> np.ndarray:
        return ease_weights(gram(train), float(self.cfg.l2))
