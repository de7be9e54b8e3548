"""Server strategies: Flower's own (``flwr.serverapp.strategy``) with one thin fedrec layer.

``FedrecMixin`` changes three things and defers everything else to Flower:

1. **Full rounds from round 1.** Flower's FedAvg sizes a round from the nodes registered *so far*;
   in simulation round 1 can start before all nodes registered and train on ``min_train_nodes``
   only. We require ``min_available_nodes = num_nodes`` and sample exactly
   ``ceil(fraction * num_nodes)`` nodes, so every round has the configured number of clients.
2. **Reproducible sampling.** Node sampling uses Python's ``random``; it is re-seeded from
   (seed, round) each round, so a resumed run samples the same nodes.
3. **Bad uploads never reach aggregation.** Replies whose arrays have other names or shapes than
   the global model, or contain NaN/Inf, or carry no examples, are dropped and counted
   (``rejected-updates``); a client that *raised* fails the run with its error message.

Client-side evaluation replies carry metric *sums* and user counts; they are combined exactly.
"""

from __future__ import annotations

import math
import random
import time
from typing import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedProx, FedYogi

from fedrec.errors import ConfigError
from fedrec.federated.arrays import check_update


class _Reply:
    """A stand-in reply carrying node-level content rebuilt from per-user uploads."""

    def __init__(self, content: RecordDict):
        self.content = content

    def has_error(self) -> bool:
        return False


class ClientFailure(RuntimeError):
    """A ClientApp raised; the run stops with its message instead of silently losing a client."""


def exact_metric_mean(contents: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Combine per-node metric sums ``<split>/<metric>/sum`` and ``<split>/users`` into means."""
    totals: dict[str, float] = {}
    for rd in contents:
        for key, value in rd["metrics"].items():
            totals[key] = totals.get(key, 0.0) + float(value)
    out = {}
    for key, value in totals.items():
        if key.endswith("/sum"):
            split = key.split("/")[0]
            users = totals.get(f"{split}/users", 0.0)
            out[key[:-4]] = value / users if users else math.nan
    return MetricRecord(out)


class FedrecMixin:
    #: set by the server in cross-device mode: round -> user-sampling threshold (device_node.py)
    user_threshold = None
    #: a strategy that must see every user's update (robust aggregation) sets True
    needs_per_user_updates = False
    per_user_uploads = False  # federation.upload=per_user forces per-user replies
    node_clip = None  # user-level DP: the bound nodes clip each user's update to

    def setup(self, *, num_nodes: int, fraction: float, seed: int, round_offset: int = 0) -> None:
        self.num_nodes = num_nodes
        self.seed = seed
        self.round_offset = round_offset
        self.sample_size = max(1, math.ceil(fraction * num_nodes))
        self.fraction_train = self.sample_size / num_nodes
        self.min_train_nodes = self.sample_size
        self.min_available_nodes = num_nodes
        if self.fraction_evaluate > 0:
            self.min_evaluate_nodes = num_nodes
            self.fraction_evaluate = 1.0
        self.last_train: dict = {}
        self.last_train_s: float | None = None
        self.last_eval: MetricRecord | None = None
        self.last_eval_s: float | None = None


    def _round_config(self, server_round: int, config: ConfigRecord) -> ConfigRecord:
        cfg = ConfigRecord(dict(config))  # never write into the caller's record
        rnd = self.round_offset + server_round
        cfg["fedrec-round"] = rnd
        if self.user_threshold is not None:
            cfg["fedrec-user-threshold"] = float(self.user_threshold(rnd))
            cfg["fedrec-per-user"] = int(self.needs_per_user_updates or self.per_user_uploads)
        if self.node_clip is not None:  # user-level DP: nodes clip each user's update and send the sum
            cfg["fedrec-clip"] = float(self.node_clip)
        return cfg



    def combine_user_updates(self, arrays: dict[str, np.ndarray], weights: np.ndarray) -> dict[str, np.ndarray]:
        """Per-user updated parameters (U, ...) -> one array each; override for robust/DP rules."""
        w = weights / weights.sum()
        return {k: np.tensordot(w, v, axes=1).astype(v.dtype) for k, v in arrays.items()}

    def _collapse_per_user(self, msg: Message) -> tuple[RecordDict | None, int, list[str]]:
        """A node's stacked per-user reply -> (node-level content, users rejected, reasons)."""
        arrays = msg.content.array_records.get(self.arrayrecord_key)
        wrec = msg.content.array_records.get("user-weights")
        if arrays is None or wrec is None:
            return None, 0, ["per-user reply without arrays or user-weights"]
        weights = wrec["weights"].numpy().astype(np.float64)
        n = len(weights)
        stacked = {k: a.numpy() for k, a in arrays.items()}
        if set(stacked) != set(self._reference):
            return None, n, ["array names differ from the global model's"]
        good = np.isfinite(weights) & (weights > 0)
        reasons = []
        for k, a in stacked.items():
            if a.shape != (n, *self._reference[k]):
                return None, n, [f"array {k!r} has shape {a.shape}, expected {(n, *self._reference[k])}"]
            if a.dtype.kind == "f":
                finite = np.isfinite(a.reshape(n, -1)).all(1)
                if not finite.all():
                    reasons.append(f"array {k!r} contains NaN or Inf")
                good &= finite
        if not good.any():
            return None, n, reasons or ["no user with a positive weight"]
        combined = self.combine_user_updates({k: v[good] for k, v in stacked.items()}, weights[good])
        metrics = MetricRecord(dict(msg.content["metrics"]) | {self.weighted_by_key: float(weights[good].sum())})
        content = RecordDict({self.arrayrecord_key: ArrayRecord({k: Array(v) for k, v in combined.items()}),
                              "metrics": metrics})
        return content, int((~good).sum()), reasons

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        random.seed(self.seed * 1_000_003 + self.round_offset + server_round)
        self._reference = {k: tuple(a.numpy().shape) for k, a in arrays.items()}
        self._t_train = time.perf_counter()
        return super().configure_train(server_round, arrays, self._round_config(server_round, config), grid)

    def _raise_on_errors(self, replies: list[Message]) -> None:
        for msg in replies:
            if msg.has_error():
                raise ClientFailure(f"a ClientApp failed: {msg.error.reason}")

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        self._raise_on_errors(replies)
        good, rejected, reasons, empty = [], 0, [], 0
        for msg in replies:
            metrics = msg.content.metric_records.get("metrics")
            if metrics is not None and float(metrics.get(self.weighted_by_key, -1)) == 0:
                empty += 1  # a node none of whose users trained this round: nothing to aggregate
                continue
            if metrics is not None and int(metrics.get("per-user", 0)):
                content, bad_users, why_users = self._collapse_per_user(msg)
                rejected += bad_users
                reasons += why_users
                if content is None:
                    continue
                msg = _Reply(content)
            arrays = msg.content.array_records.get(self.arrayrecord_key)
            metrics = msg.content.metric_records.get("metrics")
            if arrays is None or metrics is None:
                why = "no ArrayRecord/MetricRecord in the reply"
            else:
                why = check_update(self._reference, arrays)
                n = float(metrics.get(self.weighted_by_key, 0))
                if why is None and not (math.isfinite(n) and n > 0):
                    why = f"{self.weighted_by_key} is {n}"
            if why is None:
                good.append(msg)
            else:
                rejected += 1
                reasons.append(why)
        # The global round (not the resumed session's local one): FedAdam's bias correction uses it.
        arrays, metrics = super().aggregate_train(self.round_offset + server_round, good) if good else (None, None)
        self.last_train = dict(metrics or {}) | {"clients": len(good), "rejected-updates": rejected,
                                                 "empty-replies": empty}
        def reported(key: str) -> list[float]:
            return [float(m.content["metrics"][key]) for m in replies
                    if m.content.metric_records.get("metrics") is not None and key in m.content["metrics"]]

        for key in ("sampled-users", "trained-users", "dropped-users", "straggler-users", "empty-users"):
            if reported(key):
                self.last_train[key] = sum(reported(key))
        for key in ("dp-epsilon", "dp-noise-multiplier"):  # per-silo DP-SGD: the weakest silo's guarantee
            if reported(key):
                self.last_train[key] = max(reported(key))
        if reasons:
            self.last_train["rejected-reasons"] = sorted(set(reasons))[:5]
        self.last_train_s = time.perf_counter() - self._t_train
        return arrays, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        self._t_eval = time.perf_counter()
        return super().configure_evaluate(server_round, arrays, self._round_config(server_round, config), grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        self._raise_on_errors(replies)
        self.last_eval = super().aggregate_evaluate(server_round, replies)
        self.last_eval_s = time.perf_counter() - self._t_eval
        return self.last_eval

    # State a resumed run needs (server optimiser moments / momentum).
    STATE_ATTRS = ("current_arrays", "m_t", "v_t", "momentum_vector")

    def state(self) -> dict:
        return {a: getattr(self, a) for a in self.STATE_ATTRS if hasattr(self, a)}

    def load_state(self, st: dict) -> None:
        for k, v in st.items():
            setattr(self, k, v)


class FedrecFedAvg(FedrecMixin, FedAvg):
    """FedAvg (McMahan et al., 2017)."""


class FedrecFedProx(FedrecMixin, FedProx):
    """FedProx (Li et al., 2020): clients add mu/2 ||w - w_global||^2."""


class FedrecFedAdam(FedrecMixin, FedAdam):
    """FedAdam (Reddi et al., 2021): server-side Adam on the pseudo-gradient."""


class FedrecFedYogi(FedrecMixin, FedYogi):
    """FedYogi (Reddi et al., 2021)."""


class FedrecFedAvgM(FedrecMixin, FedAvgM):
    """FedAvgM (Hsu et al., 2019): server momentum."""


STRATEGIES = {"fedavg": FedrecFedAvg, "fedprox": FedrecFedProx, "fedadam": FedrecFedAdam,
              "fedyogi": FedrecFedYogi, "fedavgm": FedrecFedAvgM}


def build_strategy(cfg_strategy, *, num_nodes: int, fraction: float, seed: int, client_evaluation: bool,
                   round_offset: int = 0, cls=None) -> FedrecMixin:
    """A configured strategy from ``conf/strategy/<name>.yaml`` (keys = the Flower constructor's)."""
    from omegaconf import OmegaConf

    params = OmegaConf.to_container(cfg_strategy, resolve=True) if OmegaConf.is_config(cfg_strategy) else dict(cfg_strategy)
    name = params.pop("name", None)
    if name not in STRATEGIES:
        raise ConfigError(f"strategy.name: unknown strategy {name!r}; expected one of {sorted(STRATEGIES)}")
    if not 0 < fraction <= 1:
        raise ConfigError(f"federation.fraction: must be in (0, 1], got {fraction}")
    try:
        strategy = (cls or STRATEGIES[name])(fraction_evaluate=1.0 if client_evaluation else 0.0,
                                    evaluate_metrics_aggr_fn=exact_metric_mean, **params)
    except TypeError as e:
        raise ConfigError(f"strategy: {e}") from None
    strategy.setup(num_nodes=num_nodes, fraction=fraction, seed=seed, round_offset=round_offset)
    return strategy
