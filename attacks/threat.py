"""Who is malicious: a keyed, reproducible choice of clients that every process makes identically.

The choice depends only on (seed, population, budget): a node in cross-device mode finds its
malicious users without being told, and the server, a restarted node or another node agrees.
"""

from __future__ import annotations

import numpy as np

from fedrec.errors import ConfigError
from fedrec.rng import key_uniform, user_keys

STREAM_MALICIOUS = 201  # user_keys stream of the malicious-client draw (round 0: fixed for the run)


def budget(population: int, fraction: float | None, count: int | None, where: str = "attack") -> int:
    """Number of malicious clients: ``count`` if given, else ``round(fraction * population)``, at least 1."""
    if count is not None:
        if not 1 <= int(count) <= population:
            raise ConfigError(f"{where}.count: must be in 1..{population}, got {count}")
        return int(count)
    if fraction is None or not 0 < float(fraction) <= 1:
        raise ConfigError(f"{where}.fraction: must be in (0, 1], got {fraction}")
    return max(1, int(round(float(fraction) * population)))


def malicious_clients(seed: int, population: int, m: int) -> np.ndarray:
    """The ``m`` clients (sorted ids in 0..population-1) with the smallest keyed draws."""
    keys = key_uniform(user_keys(seed, 0, np.arange(population), STREAM_MALICIOUS))
    return np.sort(np.argsort(keys, kind="stable")[:m])
