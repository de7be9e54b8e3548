"""GF-CF (Shen et al., "How Powerful is Graph Convolution for Recommendation?", CIKM 2021).

Official code: github.com/yshenaw/GF_CF (class ``GF_CF`` in ``Table3&4/model.py``; the same class is copied in
github.com/jeongwhanchoi/BSPM ``bspm/model.py``). As implemented there and here:

* R~ = D_U^-1/2 R D_I^-1/2 (user and item degrees of the training matrix R);
* linear filter: P~ = R~^T R~;
* ideal low-pass filter: D_I^-1/2 V_k V_k^T D_I^1/2 with V_k the top-``factor_dim`` right singular
  vectors of R~ (official: 256);
* score = ``x P~ + alpha x D_I^-1/2 V_k V_k^T D_I^1/2`` (official: alpha = 0.3; for amazon-book the
  official code drops the low-pass term, which ``alpha=0`` reproduces).

Both filters are folded into one item-item matrix, so scoring is one matmul. Deviations: the top-k
singular vectors come from an exact dense eigendecomposition of P~ (the same subspace as the
official ``sparsesvd``; deterministic); items without training interactions get D^{+-1/2} = 0
where the official ``1/d_inv`` is infinite and would make those items' scores NaN. Training-free:
no federation or DP-SGD (see :mod:`fedrec.models.closed_form`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from fedrec.errors import ConfigError
from fedrec.models.closed_form import ItemItemRecommender, ideal_low_pass, symmetric_item_graph


@dataclass
class GFCFConfig:
    alpha: float = 0.3  # weight of the ideal low-pass term (official: 0.3)
    factor_dim: int = 256  # k, singular vectors of the ideal low-pass filter (official: 256)

    def __post_init__(self) -> None:
        if float(self.alpha) < 0:
            raise ConfigError(f"model.alpha: must be >= 0, got {self.alpha}")
        if int(self.factor_dim) < 1:
            raise ConfigError(f"model.factor_dim: must be >= 1, got {self.factor_dim}")


class GFCF(ItemItemRecommender):
    name = "gfcf"

    def item_matrix(self, train: sp.csr_matrix) -> np.ndarray:
        p_tilde, degrees = symmetric_item_graph(train)
        if float(self.cfg.alpha) == 0:
            return p_tilde
        k = min(int(self.cfg.factor_dim), self.n_items)
        return p_tilde + float(self.cfg.alpha) * ideal_low_pass(p_tilde, degrees, k)
