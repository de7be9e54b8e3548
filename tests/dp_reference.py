"""An accountant independent of Opacus's: the sampled Gaussian mechanism's RDP from its definition.

RDP at order alpha (Mironov et al. 2019): (1/(alpha-1)) log E_{z~N(0,s^2)}[((1-q) + q e^{(2z-1)/(2s^2)})^alpha],
integrated numerically on a fine grid in log space (not Opacus's series); q = 1 is the plain Gaussian
mechanism, alpha / (2 s^2) in closed form. The (eps, delta) conversion is Balle et al. 2020's, over
Opacus's grid of orders, so the two accountants differ only in how the RDP is computed.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import special, stats

ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))  # Opacus's default orders


def sgm_rdp(q: float, sigma: float, alpha: float) -> float:
    if q == 1.0:
        return alpha / (2 * sigma ** 2)
    z = np.linspace(-40 * sigma, 40 * sigma + 4 * alpha, 400_001)
    log_ratio = np.logaddexp(math.log(1 - q), math.log(q) + (2 * z - 1) / (2 * sigma ** 2))
    log_f = stats.norm.logpdf(z, scale=sigma) + alpha * log_ratio
    return (special.logsumexp(log_f) + math.log(z[1] - z[0])) / (alpha - 1)


def epsilon_from_rdp(rdp_at, delta: float) -> float:
    """min over orders of rdp + log((a-1)/a) - (log delta + log a) / (a-1)."""
    return min(rdp_at(a) + math.log((a - 1) / a) - (math.log(delta) + math.log(a)) / (a - 1) for a in ORDERS)
