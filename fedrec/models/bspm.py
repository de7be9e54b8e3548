"""BSPM (Choi, Hong, Park and Cho, "Blurring-Sharpening Process Models for Collaborative Filtering",
SIGIR 2023). Official code: github.com/jeongwhanchoi/BSPM (``bspm/model.py``, class ``BSPM``;
defaults of ``bspm/parse.py``). Training-free.

As implemented there and here, a user's training row r(0) is blurred, then sharpened, by ODEs on the
GF-CF item graph P~ = R~^T R~ (R~ = D_U^-1/2 R D_I^-1/2):

* blurring:   dr/dt = r P~ - r, t in [0, T_b], K_b steps of ``solver_blr``;
* ideal low-pass ("IDL"): dr/dt = r L - r with L = D_I^-1/2 V V^T D_I^1/2, V the top ``factor_dim``
  right singular vectors of R~, t in [0, T_idl], K_idl steps;
* sharpening: dr/dt = -r P~, t in [0, T_s], K_s steps of ``solver_shr``, started from
  ``idl_beta * IDL(T_idl) + blur(T_b)`` (``final_sharpening=true``, "early merge") or from
  ``blur(T_b)`` with ``idl_beta * IDL(T_idl)`` added after ("late merge");
* ``t_point_combination``: the result is the mean of every blurring and sharpening time point
  after t=0 instead of the last one; ``sharpening_off`` skips sharpening.

Every right-hand side is r times a constant matrix, so each solver step maps r to r M for a fixed
(n_items, n_items) M. The solvers therefore run once on the identity matrix and the whole process
becomes one item-item matrix: the score of any user is exactly ``r(0) @ M``, the value the official
per-batch ``odeint`` computes, at the cost of one matmul per user batch.

Deviations: the fixed-grid solvers are written out (Euler; classic RK4, which for a linear
autonomous ODE equals torchdiffeq's 3/8-rule ``rk4``: both give the degree-4 Taylor step) instead
of depending on torchdiffeq; V comes from an exact eigendecomposition of P~ (the official
``sparsesvd(R~, k)``'s subspace); zero item degrees give factor 0 (see :mod:`fedrec.models.gfcf`);
the official special case of amazon-book (no IDL term) is ``idl_beta=0``. No federation or DP-SGD
(see :mod:`fedrec.models.closed_form`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import scipy.sparse as sp

from fedrec.errors import ConfigError
from fedrec.models.closed_form import ItemItemRecommender, ideal_low_pass, symmetric_item_graph

SOLVERS = ("euler", "rk4")


@dataclass
class BSPMConfig:
    factor_dim: int = 256  # singular vectors of the ideal low-pass filter (official default 256)
    idl_beta: float = 0.3  # weight of the ideal low-pass term (official default 0.3)
    T_idl: float = 1.0  # terminal time of the IDL ODE
    K_idl: int = 1  # steps of the IDL ODE
    T_b: float = 1.0  # terminal time of blurring
    K_b: int = 1  # steps of blurring
    T_s: float = 1.0  # terminal time of sharpening
    K_s: int = 1  # steps of sharpening
    solver_idl: str = "euler"  # euler | rk4
    solver_blr: str = "euler"  # euler | rk4
    solver_shr: str = "euler"  # euler | rk4
    final_sharpening: bool = True  # true: early merge (sharpen blur + beta IDL) | false: late merge
    sharpening_off: bool = False  # skip the sharpening ODE
    t_point_combination: bool = False  # average every time point after 0 instead of the last

    def __post_init__(self) -> None:
        if int(self.factor_dim) < 1:
            raise ConfigError(f"model.factor_dim: must be >= 1, got {self.factor_dim}")
        for key in ("K_idl", "K_b", "K_s"):
            if int(getattr(self, key)) < 1:
                raise ConfigError(f"model.{key}: must be >= 1, got {getattr(self, key)}")
        for key in ("T_idl", "T_b", "T_s"):
            if not float(getattr(self, key)) > 0:
                raise ConfigError(f"model.{key}: must be positive, got {getattr(self, key)}")
        for key in ("solver_idl", "solver_blr", "solver_shr"):
            if getattr(self, key) not in SOLVERS:
                raise ConfigError(f"model.{key}: expected one of {SOLVERS}, got {getattr(self, key)!r}")


def solve_linear(f: Callable[[np.ndarray], np.ndarray], y0: np.ndarray, t_end: float, steps: int,
                 solver: str) -> list[np.ndarray]:
    """Fixed-grid solution of dy/dt = f(y) at t = 0, h, ..., t_end (h = t_end / steps), as torchdiffeq's
    ``odeint(..., t=linspace(0, t_end, steps + 1), method=solver)`` returns it."""
    h = float(t_end) / int(steps)
    out = [y0]
    y = y0
    for _ in range(int(steps)):
        if solver == "euler":
            y = y + h * f(y)
        else:
            k1 = f(y)
            k2 = f(y + 0.5 * h * k1)
            k3 = f(y + 0.5 * h * k2)
            k4 = f(y + h * k3)
            y = y + h / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
        out.append(y)
    return out


class BSPM(ItemItemRecommender):
    name = "bspm"

    def item_matrix(self, train: sp.csr_matrix) -> np.ndarray:
        c = self.cfg
        p_tilde, degrees = symmetric_item_graph(train)
        eye = np.eye(self.n_items)
        beta = float(c.idl_beta)
        idl = None
        if beta != 0:
            low = ideal_low_pass(p_tilde, degrees, min(int(c.factor_dim), self.n_items))
            idl = solve_linear(lambda r: r @ low - r, eye, c.T_idl, c.K_idl, c.solver_idl)[-1]
        blurred = solve_linear(lambda r: r @ p_tilde - r, eye, c.T_b, c.K_b, c.solver_blr)
        idl_term = beta * idl if idl is not None else 0.0
        if c.sharpening_off:
            points = blurred[1:]
        else:
            start = blurred[-1] + idl_term if c.final_sharpening else blurred[-1]
            sharpened = solve_linear(lambda r: -(r @ p_tilde), start, c.T_s, c.K_s, c.solver_shr)
            points = blurred[1:] + sharpened[1:]
        result = sum(points) / len(points) if c.t_point_combination else points[-1]
        if c.sharpening_off or not c.final_sharpening:
            result = result + idl_term  # late merge
        return result
