"""Defenses that replace the server's aggregation (Hydra group ``defense``).

Two kinds:

* **Batch-rule defenses** (cross-device, ``strategy=fedavg``): the defense installs a rule over the round's
  :class:`~strategies.update_batch.UpdateBatch` (every sampled user's upload, from all nodes) as the
  strategy's ``batch_rule``, so the nodes upload per user and the rule's result is the new global model.
  ``row_median``, ``row_trimmedmean``, ``row_krum``, ``row_norm_bound``, ``hierarchical_clip``
  (:mod:`strategies.row_robust`) and ``update_detect`` (:mod:`fedrec.defenses.update_detect`).
* **Flower's rules** (``krum``, ``multikrum``, ``bulyan``, ``median``, ``trimmedmean``): the defense
  switches the strategy to Flower's Krum / MultiKrum / Bulyan / FedMedian / FedTrimmedAvg with fedrec's
  layer (``strategy_overrides`` sets ``strategy.name`` and the rule's parameters). They aggregate the
  round's *node-level* uploads: in silo mode one per silo, in cross-device mode one mean per Flower node
  of users (so they need ``federation.num_nodes`` well above ``2 f + 2``). ``defense=krum`` is the same
  run as ``strategy=krum`` with the defense's parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
import numpy as np

from fedrec.errors import ConfigError
from fedrec.eval.detection import detection_report
from fedrec.mechanisms import Mechanism, register
from strategies import row_robust


def ground_truth(cfg, data) -> np.ndarray:
    """(n_users,) bool: the malicious users of the run, for the detection report only (a defense's rule
    never reads it): the users a data transform injected (FedRecAttack's fake clients, shilling profiles)
    and, for an attack that turns genuine clients malicious (``attacks.model_poisoning``), its keyed choice."""
    from fedrec.mechanisms import build_mechanisms

    injected = getattr(data, "injected", None)
    bad = np.zeros(data.n_users, bool) if injected is None else np.asarray(injected, bool).copy()
    if cfg.federation.mode == "device":
        for m in build_mechanisms(cfg, check=False):
            if m.kind == "attack" and hasattr(m, "malicious"):
                bad[m.malicious(cfg, data.n_users)] = True
    return bad


class BatchRuleDefense(Mechanism):
    """A defense whose :meth:`rule` (``UpdateBatch -> new global arrays``) replaces FedAvg's mean.
    Detecting defenses call :meth:`record_detection` each round; the report then holds the run's
    detection figures against :func:`ground_truth`."""

    kind = "defense"
    modes = ("device",)
    strategies = ("fedavg",)
    detects = False

    def __init__(self, config, cfg):
        super().__init__(config, cfg)
        self.counts: dict[str, float] = {}
        self._scores, self._truth, self._flagged, self._dropped = [], [], [], set()
        self._malicious = None

    def setup_server(self, ctx) -> None:
        self.strategy = ctx.strategy
        self._malicious = ground_truth(ctx.cfg, ctx.data)
        ctx.strategy.batch_rule = self._counted_rule

    def _counted_rule(self, batch):
        stats: dict = {}
        out = self.rule(batch, stats)
        for k, v in stats.items():
            if k.startswith(("clipped-", "sparsified-")):
                self.counts[k] = self.counts.get(k, 0.0) + float(v)
        self.counts["rounds"] = self.counts.get("rounds", 0.0) + 1
        return out

    def rule(self, batch, stats: dict) -> dict[str, np.ndarray]:
        """The round's new global arrays; ``stats`` collects the rule's counts (``clipped-...``)."""
        raise NotImplementedError

    def record_detection(self, users: np.ndarray, scores: np.ndarray, flagged: np.ndarray) -> None:
        self._scores.append(np.asarray(scores, np.float64))
        self._truth.append(self._malicious[users])
        self._flagged.append(np.asarray(flagged, bool))
        self._dropped.update(int(u) for u in users[flagged])

    def report(self, ctx) -> dict:
        params = {k: v for k, v in vars(self.config).items()} if self.config is not None else {}
        out = {"name": self.name, **params, **{k: v for k, v in self.counts.items()}}
        if self.detects:
            if self._scores:
                rep = detection_report(np.concatenate(self._scores), np.concatenate(self._truth),
                                       np.concatenate(self._flagged))
                out["detection"] = rep  # over every (round, user) upload scored
                scores, truth = np.concatenate(self._scores), np.concatenate(self._truth)
                out["score_quantiles"] = {  # where the threshold sits between the two groups (min/median/max)
                    group: [float(np.quantile(scores[mask], q)) for q in (0.0, 0.5, 0.99, 1.0)]
                    for group, mask in (("malicious", truth), ("genuine", ~truth)) if mask.any()}
            dropped = np.array(sorted(self._dropped), dtype=np.int64)
            out["dropped_uploads"] = int(sum(int(f.sum()) for f in self._flagged))
            out["dropped_users"] = len(dropped)
            out["dropped_malicious_users"] = int(self._malicious[dropped].sum()) if len(dropped) else 0
        return out

    def state(self) -> dict:
        # a resumed run restarts the detection tallies (documented in the report's "rounds" count)
        return {}


@dataclass
class RowMedianConfig:
    rescale: bool = True  # bool: multiply each row's median by its touching users' weight share (FedAvg's scale)


@register
class RowMedian(BatchRuleDefense):
    name = "row_median"
    Config = RowMedianConfig

    def rule(self, batch, stats=None):
        return row_robust.row_median(batch, rescale=bool(self.config.rescale))


@dataclass
class RowTrimmedMeanConfig:
    beta: float = 0.1  # float in [0, 0.5): share cut from each end of a row's touching users, per coordinate
    rescale: bool = True

    def __post_init__(self):
        if not 0 <= self.beta < 0.5:
            raise ConfigError(f"defense.beta: must be in [0, 0.5), got {self.beta}")


@register
class RowTrimmedMean(BatchRuleDefense):
    name = "row_trimmedmean"
    Config = RowTrimmedMeanConfig

    def rule(self, batch, stats=None):
        return row_robust.row_trimmed_mean(batch, float(self.config.beta), rescale=bool(self.config.rescale))


@dataclass
class RowKrumConfig:
    f: int = 2  # int >= 0: attackers tolerated among a row's touching users
    rescale: bool = True

    def __post_init__(self):
        if int(self.f) < 0:
            raise ConfigError(f"defense.f: must be >= 0, got {self.f}")


@register
class RowKrum(BatchRuleDefense):
    name = "row_krum"
    Config = RowKrumConfig

    def rule(self, batch, stats=None):
        return row_robust.row_krum(batch, int(self.config.f), rescale=bool(self.config.rescale))


@dataclass
class RowNormBoundConfig:
    multiple: float = 3.0  # float > 0: a row delta is clipped to this multiple of the round's median row-delta norm

    def __post_init__(self):
        if not self.multiple > 0:
            raise ConfigError(f"defense.multiple: must be positive, got {self.multiple}")


@register
class RowNormBound(BatchRuleDefense):
    name = "row_norm_bound"
    Config = RowNormBoundConfig

    def rule(self, batch, stats=None):
        return row_robust.row_norm_bound(batch, float(self.config.multiple), stats=stats)


@dataclass
class HierarchicalClipConfig:
    row_multiple: float = 3.0  # float > 0: item-level bound, x the round's median row-delta norm
    user_multiple: float = 3.0  # float > 0: user-level bound, x the round's median (row-clipped) user norm
    keep_rows: int | None = None  # int >= 1 | null: each user's upload sparsified to its largest rows

    def __post_init__(self):
        if not (self.row_multiple > 0 and self.user_multiple > 0):
            raise ConfigError(f"defense.row_multiple / defense.user_multiple: must be positive, got "
                              f"{self.row_multiple}, {self.user_multiple}")
        if self.keep_rows is not None and int(self.keep_rows) < 1:
            raise ConfigError(f"defense.keep_rows: must be >= 1 or null, got {self.keep_rows}")


@register
class HierarchicalClip(BatchRuleDefense):
    name = "hierarchical_clip"
    Config = HierarchicalClipConfig

    def rule(self, batch, stats=None):
        c = self.config
        return row_robust.hierarchical_clip(batch, float(c.row_multiple), float(c.user_multiple),
                                            None if c.keep_rows is None else int(c.keep_rows), stats=stats)


# ----------------------------------------------------------------------------------- Flower's rules
#: defense name -> the fedrec strategy name of Flower's rule, and the rule's parameters
FLOWER_RULES = {"krum": ("krum", ("num_malicious_nodes",)),
                "multikrum": ("multikrum", ("num_malicious_nodes", "num_nodes_to_select")),
                "bulyan": ("bulyan", ("num_malicious_nodes",)),
                "median": ("fedmedian", ()),
                "trimmedmean": ("fedtrimmedavg", ("beta",))}


@dataclass
class FlowerRuleConfig:
    rule: str = "krum"  # krum | multikrum | bulyan | median | trimmedmean: Flower's aggregation rule
    num_malicious_nodes: int = 1  # int >= 0: f, malicious node uploads tolerated (Krum, MultiKrum, Bulyan)
    num_nodes_to_select: int = 1  # int >= 1: uploads MultiKrum averages
    beta: float = 0.2  # float in [0, 0.5): FedTrimmedAvg's cut from each end

    def __post_init__(self):
        if self.rule not in FLOWER_RULES:
            raise ConfigError(f"defense.rule: expected one of {', '.join(FLOWER_RULES)}, got {self.rule!r}")
        if int(self.num_malicious_nodes) < 0 or int(self.num_nodes_to_select) < 1:
            raise ConfigError("defense.num_malicious_nodes must be >= 0 and defense.num_nodes_to_select >= 1")
        if not 0 <= self.beta < 0.5:
            raise ConfigError(f"defense.beta: must be in [0, 0.5), got {self.beta}")


@register
class FlowerRule(Mechanism):
    kind = "defense"
    name = "flower_rule"
    modes = ("silo", "device")
    strategies = ("fedavg",)  # the defense replaces FedAvg by Flower's rule
    Config = FlowerRuleConfig

    def check(self, cfg) -> None:
        f = int(self.config.num_malicious_nodes)
        nodes = int(cfg.federation.num_nodes)
        if self.config.rule in ("krum", "multikrum", "bulyan") and nodes <= 2 * f + 2:
            raise ConfigError(f"defense={self.config.rule}: needs federation.num_nodes > 2 x num_malicious_nodes + 2 "
                              f"= {2 * f + 2} node uploads per round, got {nodes}")

    def strategy_overrides(self) -> dict:
        strategy, keys = FLOWER_RULES[self.config.rule]
        return {"name": strategy} | {k: getattr(self.config, k) for k in keys}

    def report(self, ctx) -> dict:
        strategy, keys = FLOWER_RULES[self.config.rule]
        return {"name": self.config.rule, "strategy": strategy} | {k: getattr(self.config, k) for k in keys}
