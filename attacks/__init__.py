"""Attacks: the attacker's side of a run (see docs: never imported by ``fedrec.eval``).

* :mod:`attacks.shilling` -- heuristic fake-user profiles (random, average, bandwagon, segment),
  data transforms (:mod:`fedrec.data.transforms`) that inject users marked ``injected``.
"""

from attacks.shilling import (ATTACKS, AverageAttack, AverageAttackConfig, BandwagonAttack, BandwagonAttackConfig,
                              RandomAttack, RandomAttackConfig, SegmentAttack, SegmentAttackConfig, ShillingAttack,
                              ShillingConfig, build_shilling)

__all__ = [
    "ATTACKS", "AverageAttack", "AverageAttackConfig", "BandwagonAttack", "BandwagonAttackConfig", "RandomAttack",
    "RandomAttackConfig", "SegmentAttack", "SegmentAttackConfig", "ShillingAttack", "ShillingConfig", "build_shilling",
]
