"""User-level DP-FedAvg (McMahan et al., ICLR 2018; adaptive clipping: Andrew et al., NeurIPS 2021).

The privacy unit is the user; in cross-device mode every user is a client. Each round, in order:

1. users are Poisson-sampled with probability q inside the nodes (``federation.sampling=poisson``);
2. on its node, every sampled user's update (its trained model minus the global model) is clipped to
   L2 norm C, and only the sum of clipped updates is uploaded (the server never sees one user's update);
3. the clipped updates are summed, Gaussian noise N(0, (z C)^2) is added to each coordinate, and
   the sum is divided by the *expected* number of users q N (a fixed denominator, so one user
   changes the average by at most C / (q N));
4. the round is accounted as one sampled Gaussian mechanism (rate q, noise multiplier z) by an
   RDP or PRV accountant; epsilon at delta is logged every round, and the run stops cleanly, results
   kept, before a round that would exceed ``max_epsilon``;
5. adaptive clipping (optional): C <- C * exp(-eta (b - gamma)) with b the noisy share of users whose
   update was not clipped; the count noise takes part of the budget: z_update = (z^-2 - (2 sigma_b)^-2)^-1/2.

Flower's own DP wrappers assume one update per node with equal weights and no sampling
amplification; here every node carries many users, so the mechanism is implemented on the per-user
updates the nodes upload, with Opacus's accountants.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy import Strategy

from fedrec.errors import ConfigError
from fedrec.federated import protocol as P
from fedrec.mechanisms import RunStopped
from fedrec.privacy.accounting import check_noise_or_target
from strategies import ClientFailure, FedrecMixin, _Reply, _summed_counts


class PrivacyBudgetExhausted(RunStopped):
    """Raised before a round that would exceed ``max_epsilon``; the server ends the run cleanly."""


@dataclass
class UserDPConfig:
    noise_multiplier: float | None = 1.0  # z: noise std / clipping bound (None: from target_epsilon)
    target_epsilon: float | None = None  # calibrate z to reach this epsilon after all rounds (inf: z = 0)
    clip: float = 1.0  # C: initial per-user update bound
    adaptive_clip: bool = False
    target_quantile: float = 0.5  # gamma: share of users to leave unclipped
    clip_lr: float = 0.2  # eta
    count_noise: float | None = None  # sigma_b; None: expected users / 20 (Andrew et al.)
    delta: float | None = None  # None: 1 / number of users
    max_epsilon: float | None = None  # stop before exceeding it (None: never)
    accountant: str = "rdp"  # rdp | prv

    def __post_init__(self):
        check_noise_or_target(self.noise_multiplier, self.target_epsilon)
        if self.clip <= 0:
            raise ConfigError(f"privacy.clip: must be positive, got {self.clip}")
        if self.accountant not in ("rdp", "prv"):
            raise ConfigError(f"privacy.accountant: expected rdp or prv, got {self.accountant!r}")
        if not 0 < self.target_quantile < 1:
            raise ConfigError(f"privacy.target_quantile: must be in (0, 1), got {self.target_quantile}")


def user_dp_config(cfg) -> UserDPConfig:
    from fedrec.typed_config import typed_block

    return typed_block(UserDPConfig, cfg, "privacy")


class UserLevelDP(Strategy):
    """User-level DP around any fedrec strategy, in Flower's wrapper style: nodes clip every sampled
    user's update to ``clip`` and upload only the sum of clipped updates (as DP-FedAvg's clients clip
    locally); this wrapper adds the noise and divides by q N, and hands the noisy mean to the wrapped
    strategy as the round's one update, so FedAvg keeps it and FedAdam/FedYogi/FedAvgM take their
    server step on it (post-processing: the guarantee is unchanged)."""

    def __init__(self, strategy: FedrecMixin, cfg: UserDPConfig, *, n_users: int, sample_rate: float, seed: int,
                 rounds: int = 1):
        from dataclasses import replace

        from opacus.accountants import PRVAccountant, RDPAccountant
        from opacus.accountants.utils import get_noise_multiplier

        if strategy.batch_rule is not None:
            raise ConfigError("privacy=user_dp: the nodes upload clipped sums, so a rule over every user's "
                              "update (strategy.batch_rule) cannot run; use a mean-based strategy")
        self.strategy = strategy
        delta = cfg.delta if cfg.delta is not None else 1.0 / n_users
        if cfg.target_epsilon is not None:
            z = 0.0 if math.isinf(cfg.target_epsilon) else get_noise_multiplier(
                target_epsilon=cfg.target_epsilon, target_delta=delta, sample_rate=sample_rate, steps=rounds,
                accountant=cfg.accountant)
            cfg = replace(cfg, noise_multiplier=float(z), target_epsilon=None)
        self.dp = cfg
        self.q = sample_rate
        self.n_users = n_users
        self.expected_users = sample_rate * n_users
        self.delta = delta
        self.clip = cfg.clip
        self.sigma_b = cfg.count_noise if cfg.count_noise is not None else self.expected_users / 20.0
        z = cfg.noise_multiplier
        if cfg.adaptive_clip and z > 0:
            if z >= 2 * self.sigma_b:
                raise ConfigError("privacy.count_noise: too small for the noise multiplier (needs 2 sigma_b > z)")
            self.z_update = (z ** -2 - (2 * self.sigma_b) ** -2) ** -0.5
        else:
            self.z_update = z
        self.accountant = RDPAccountant() if cfg.accountant == "rdp" else PRVAccountant()
        self.noise_rng = np.random.default_rng([seed, 7])

    @property
    def last_train(self) -> dict:
        return self.strategy.last_train

    def epsilon(self) -> float:
        if self.dp.noise_multiplier == 0:
            return math.inf
        if not self.accountant.history:
            return 0.0
        return float(self.accountant.get_epsilon(self.delta))

    def _epsilon_after_one_more(self) -> float:
        from copy import deepcopy

        acc = deepcopy(self.accountant)
        acc.step(noise_multiplier=self.dp.noise_multiplier, sample_rate=self.q)
        return float(acc.get_epsilon(self.delta))

    def configure_train(self, server_round, arrays, config, grid):
        if self.dp.max_epsilon is not None and self.dp.noise_multiplier > 0 \
                and self._epsilon_after_one_more() > self.dp.max_epsilon:
            raise PrivacyBudgetExhausted(
                f"round {self.strategy.round_offset + server_round} would exceed max_epsilon={self.dp.max_epsilon}")
        self._global = {k: a.numpy().astype(np.float64) for k, a in arrays.items()}
        # the bound every node clips each user's update to (it moves under adaptive clipping)
        config = ConfigRecord(dict(config) | {P.CLIP: float(self.clip)})
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies):
        t0 = self.strategy._t_train
        replies = self.strategy._in_partition_order(list(replies))
        for msg in replies:
            if msg.has_error():
                raise ClientFailure(f"a ClientApp failed: {msg.error.reason}")
        key = self.strategy.weighted_by_key
        total = {k: np.zeros_like(v) for k, v in self._global.items()}
        users = unclipped = rejected = 0
        for msg in replies:
            metrics = msg.content.metric_records.get("metrics")
            if metrics is None or not int(metrics.get("clipped-sum", 0)):
                rejected += 1  # DP needs clipped sums; anything else is dropped, not aggregated
                continue
            rejected += int(metrics.get("rejected-users", 0))
            if float(metrics.get(key, 0)) == 0:
                continue
            arrays = msg.content.array_records.get(self.strategy.arrayrecord_key)
            sums = {k: a.numpy().astype(np.float64) for k, a in arrays.items()} if arrays is not None else {}
            if set(sums) != set(self._global) or any(v.shape != self._global[k].shape for k, v in sums.items()) \
                    or not all(np.isfinite(v).all() for v in sums.values()):
                rejected += 1
                continue
            # a node's clipped sum over n users has norm <= n C; anything larger was not clipped
            n = float(metrics[key])
            norm = math.sqrt(sum(float((v ** 2).sum()) for v in sums.values()))
            if norm > n * self.clip * (1 + 1e-4):
                rejected += 1
                continue
            for k, v in sums.items():
                total[k] += v
            users += int(n)
            unclipped += int(metrics.get("unclipped-users", 0))
        z = self.dp.noise_multiplier
        std = self.z_update * self.clip
        new = {}
        for k, s in total.items():
            noisy = s + (self.noise_rng.normal(0.0, std, size=s.shape) if std > 0 else 0.0)
            new[k] = (self._global[k] + noisy / self.expected_users).astype(np.float32)
        self.accountant.step(noise_multiplier=z, sample_rate=self.q)
        clip_used = self.clip
        if self.dp.adaptive_clip:
            b = (unclipped + (self.noise_rng.normal(0.0, self.sigma_b) if z > 0 else 0.0)) / self.expected_users
            self.clip *= math.exp(-self.dp.clip_lr * (b - self.dp.target_quantile))
        eps = self.epsilon()
        # The noisy mean is the round's one update for the wrapped strategy's own aggregation.
        mean = _Reply(RecordDict({self.strategy.arrayrecord_key: ArrayRecord({k: Array(v) for k, v in new.items()}),
                                  "metrics": MetricRecord({key: 1.0})}))
        arrays, _ = self.strategy.aggregate_train(server_round, [mean])
        self.strategy.last_train = {"clients": sum(1 for m in replies if not m.has_error()), "users": users,
                                    "rejected-updates": rejected, "clip": clip_used, "unclipped-share":
                                    unclipped / max(users, 1), "epsilon": eps} | _summed_counts(replies)
        self.strategy.last_train_s = time.perf_counter() - t0
        return arrays, MetricRecord({"users": float(users), "epsilon": eps})

    def configure_evaluate(self, server_round, arrays, config, grid):
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round, replies):
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.strategy.summary()

    STATE_ATTRS = ("clip", "accountant", "noise_rng")

    def state(self) -> dict:
        return {a: getattr(self, a) for a in self.STATE_ATTRS}

    def load_state(self, st: dict) -> None:
        for k, v in st.items():
            setattr(self, k, v)
