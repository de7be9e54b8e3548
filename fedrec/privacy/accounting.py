"""Accounting helpers shared by the DP mechanisms that compose several releases.

``composed_epsilon``: epsilon of a list of (noise multiplier, sample rate, steps) subsampled
Gaussian mechanisms, by one Opacus accountant over the concatenated history.
``calibrate_noise``: the smallest noise multiplier (to 0.1%) whose epsilon meets a target, by
geometric bisection on any monotone ``epsilon_at(sigma)``.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable

import numpy as np

from fedrec.errors import ConfigError


def composed_epsilon(history: list[tuple[float, float, int]], delta: float, accountant: str) -> float:
    from opacus.accountants import PRVAccountant, RDPAccountant

    if any(sigma == 0 for sigma, _, _ in history):
        return math.inf
    acc = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    acc.history = list(history)
    with warnings.catch_warnings(), np.errstate(divide="ignore"):  # PRV's log(1 - q) at q = 1
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(acc.get_epsilon(delta))


def calibrate_noise(epsilon_at: Callable[[float], float], target: float, where: str) -> float:
    lo, hi = 0.05, 1.0
    while epsilon_at(hi) > target:
        lo, hi = hi, hi * 2
        if hi > 1e5:
            raise ConfigError(f"{where}: target epsilon {target} is out of reach")
    while hi / lo > 1.001:
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if epsilon_at(mid) <= target else (mid, hi)
    return hi


def check_noise_or_target(noise_multiplier: float | None, target_epsilon: float | None) -> None:
    """The rule every DP block shares: exactly one of a fixed multiplier (>= 0) or a target epsilon (> 0)."""
    if (noise_multiplier is None) == (target_epsilon is None):
        raise ConfigError("privacy.noise_multiplier/target_epsilon: set exactly one of them")
    if noise_multiplier is not None and noise_multiplier < 0:
        raise ConfigError(f"privacy.noise_multiplier: must be >= 0, got {noise_multiplier}")
    if target_epsilon is not None and target_epsilon <= 0:
        raise ConfigError(f"privacy.target_epsilon: must be positive, got {target_epsilon}")
