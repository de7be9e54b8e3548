"""Typed config blocks of a run: ``federation``, ``train`` and ``eval``.

One dataclass per block holds every key with its type and default (one place, instead of a default
at every ``.get``), checks its values when built, and names a bad key as ``<block>.<key>`` in a
one-line ``ConfigError``. Build them with :func:`federation`, :func:`train` and :func:`evaluation`
from the composed config; the YAML files in ``conf/`` document the same keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedrec.errors import ConfigError
from fedrec.typed_config import typed_block

FEDERATION_MODES = ("none", "silo", "device")
_METRICS = ("recall", "ndcg", "hr", "precision", "mrr", "capped_recall")  # fedrec.eval.metrics.METRICS


def _positive(value, key: str) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ConfigError(f"federation.{key}: must be a positive number, got {value}")


def _share(value, key: str) -> None:
    if not 0.0 <= float(value) < 1.0:
        raise ConfigError(f"federation.{key}: must be in [0, 1), got {value}")


@dataclass(frozen=True)
class FederationConfig:
    mode: str = "silo"  # none | silo | device
    num_nodes: int = 10
    rounds: int = 20
    fraction: float = 1.0  # share of nodes contacted per round
    evaluation: str = "auto"  # auto | server | clients
    client_cpus: float = 1.0
    client_gpus: float = 0.0
    client_threads: int = 1
    ray_cpus: int | None = None
    round_timeout: float = 3600.0
    backend: str = "ray"  # ray (Flower's simulation engine) | inprocess (fedrec.federated.inprocess)
    # cross-device (federation=device)
    user_fraction: float = 0.1
    users_per_round: int | None = None
    sampling: str = "fixed"  # fixed | poisson | permutation
    local_optimizer: str = "sgd"  # sgd | adam
    local_lr: float = 0.1
    chunk_size: int | None = None
    memory_budget_gb: float = 2.0
    dropout_rate: float = 0.0
    straggler_rate: float = 0.0
    max_user_interactions: int | None = None
    weighting: str = "uniform"  # uniform | interactions
    upload: str = "auto"  # auto | sum | per_user
    sparse_rows: str = "auto"  # auto | off
    personalize_steps: int = 0

    def __post_init__(self):
        if self.mode not in FEDERATION_MODES:
            raise ConfigError(f"federation.mode: expected one of {FEDERATION_MODES}, got {self.mode!r}")
        if self.mode == "none":
            return
        if self.num_nodes < 1:
            raise ConfigError(f"federation.num_nodes: must be >= 1, got {self.num_nodes}")
        if self.rounds < 1:
            raise ConfigError(f"federation.rounds: must be >= 1, got {self.rounds}")
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"federation.fraction: must be in (0, 1], got {self.fraction}")
        if self.evaluation not in ("auto", "server", "clients"):
            raise ConfigError(f"federation.evaluation: expected auto, server or clients, got {self.evaluation!r}")
        if self.backend not in ("ray", "inprocess"):
            raise ConfigError(f"federation.backend: expected ray or inprocess, got {self.backend!r}")
        _positive(self.client_cpus, "client_cpus")
        _positive(self.round_timeout, "round_timeout")
        if self.client_gpus < 0:
            raise ConfigError(f"federation.client_gpus: must be >= 0, got {self.client_gpus}")
        if self.client_threads < 1:
            raise ConfigError(f"federation.client_threads: must be >= 1, got {self.client_threads}")
        if self.ray_cpus is not None and self.ray_cpus < 1:
            raise ConfigError(f"federation.ray_cpus: must be null or >= 1, got {self.ray_cpus}")
        if self.mode != "device":
            return
        for key, allowed in (("sampling", ("fixed", "poisson", "permutation")), ("local_optimizer", ("sgd", "adam")),
                             ("weighting", ("uniform", "interactions")), ("upload", ("auto", "sum", "per_user")),
                             ("sparse_rows", ("auto", "off"))):
            if getattr(self, key) not in allowed:
                raise ConfigError(f"federation.{key}: expected {' or '.join(allowed)}, got {getattr(self, key)!r}")
        _positive(self.local_lr, "local_lr")
        _positive(self.memory_budget_gb, "memory_budget_gb")
        _share(self.dropout_rate, "dropout_rate")
        _share(self.straggler_rate, "straggler_rate")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ConfigError(f"federation.chunk_size: must be >= 1, got {self.chunk_size}")
        if self.max_user_interactions is not None and self.max_user_interactions < 1:
            raise ConfigError(f"federation.max_user_interactions: must be null or >= 1, got {self.max_user_interactions}")
        if self.personalize_steps < 0:
            raise ConfigError(f"federation.personalize_steps: must be >= 0, got {self.personalize_steps}")
        if self.users_per_round is None and not 0 < self.user_fraction <= 1:
            raise ConfigError(f"federation.user_fraction: must be in (0, 1], got {self.user_fraction}")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30  # centralised epochs
    local_epochs: int = 1  # local epochs (silo) / local steps (device) per round
    eval_every: int = 1
    patience: int = 20  # centralised early stop (0: never)
    select_metric: str = "recall@20"

    def __post_init__(self):
        for key in ("epochs", "local_epochs", "eval_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key}: must be >= 1, got {getattr(self, key)}")
        if self.patience < 0:
            raise ConfigError(f"train.patience: must be >= 0, got {self.patience}")

    @property
    def select(self) -> tuple[str, int]:
        metric, _, k = self.select_metric.partition("@")
        return metric, int(k) if k.isdigit() else -1


@dataclass(frozen=True)
class EvalConfig:
    ks: tuple = (10, 20)  # cut-offs
    batch_size: int = 1024
    fairness: bool = False  # the fedrec/eval/fairness.py metrics under summary.json "fairness"
    fairness_groups: str = "activity"  # activity | a categorical user feature
    fairness_top: float = 0.2  # the active share for fairness_groups=activity
    fairness_ild: str = "categories"  # categories | embeddings

    def __post_init__(self):
        object.__setattr__(self, "ks", tuple(int(k) for k in self.ks))
        if not self.ks or min(self.ks) < 1:
            raise ConfigError(f"eval.ks: must be a non-empty list of positive cut-offs, got {list(self.ks)}")
        if self.batch_size < 1:
            raise ConfigError(f"eval.batch_size: must be >= 1, got {self.batch_size}")
        if not isinstance(self.fairness, bool):
            raise ConfigError(f"eval.fairness: expected true or false, got {self.fairness!r}")
        if not 0.0 < self.fairness_top < 1.0:
            raise ConfigError(f"eval.fairness_top: must be in (0, 1), got {self.fairness_top}")
        if self.fairness_ild not in ("categories", "embeddings"):
            raise ConfigError(f"eval.fairness_ild={self.fairness_ild!r}: expected categories or embeddings")


def federation(cfg) -> FederationConfig:
    return typed_block(FederationConfig, cfg.federation, "federation")


def train(cfg) -> TrainConfig:
    return typed_block(TrainConfig, cfg.train, "train")


def evaluation(cfg) -> EvalConfig:
    block = typed_block(EvalConfig, cfg.eval, "eval")
    if block.fairness and cfg.federation.mode != "none":
        raise ConfigError(f"eval.fairness: only with federation=none (the federated evaluations pool metric sums "
                          f"per node, not the per-user lists the fairness metrics need), got federation={cfg.federation.mode}")
    metric, k = train(cfg).select
    if metric not in _METRICS or k not in block.ks:
        raise ConfigError(f"train.select_metric: {cfg.train.select_metric!r} must be <metric>@K with K in eval.ks")
    return block
