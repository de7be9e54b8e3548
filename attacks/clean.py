"""``attack=none`` as a mechanism: no attacker, but the clean run can track target items' exposure exactly as an
attack does (:class:`attacks.target_tracking.TargetTracking`), so an attack's success has a baseline."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from attacks.shilling import TARGET_SELECTIONS, select_targets
from attacks.target_tracking import TargetTracking
from fedrec.errors import ConfigError
from fedrec.mechanisms import Mechanism, register


@dataclass(frozen=True)
class CleanTargetsConfig:
    targets: tuple[str, ...] | None = None  # item ids as in the data files
    target_selection: str | None = None  # unpopular | random: a keyed draw, as every attack's under one seed
    n_targets: int = 1

    def __post_init__(self):
        if self.target_selection is not None and self.target_selection not in TARGET_SELECTIONS:
            raise ConfigError(f"attack.target_selection: expected one of {', '.join(TARGET_SELECTIONS)} or null, "
                              f"got {self.target_selection!r}")
        if isinstance(self.n_targets, bool) or int(self.n_targets) < 1:
            raise ConfigError(f"attack.n_targets: must be >= 1, got {self.n_targets}")
        if self.targets is not None:
            targets = (self.targets,) if isinstance(self.targets, (str, int)) else self.targets
            object.__setattr__(self, "targets", tuple(str(t) for t in targets))

    @property
    def active(self) -> bool:
        return self.targets is not None or self.target_selection is not None


@register
class CleanTargets(TargetTracking, Mechanism):
    """``attack=none``: no attacker. Given ``attack.targets`` (or ``attack.target_selection``), the run tracks
    those items' ER@K / HR@K / NDCG@K / mean rank exactly as an attack does (same metric code, same keyed
    target draw as every attack under the seed), so a clean run is the baseline of an attacked one; without
    either it does nothing and writes no ``attack`` section."""

    kind, name = "attack", "none"
    Config = CleanTargetsConfig

    def target_ids(self, data, seed: int) -> np.ndarray:
        return select_targets(self.config, data, int(seed))

    def node_eval(self, cfg, model, data, users) -> dict[str, float]:
        return super().node_eval(cfg, model, data, users) if self.config.active else {}

    def report(self, ctx) -> dict | None:
        if not self.config.active:
            return None
        targets = self.target_ids(ctx.data, int(ctx.cfg.seed))
        return {"name": self.name, "injected_users": 0,
                "targets": [str(ctx.data.item_ids[t]) for t in targets]} | self.target_section(ctx)
