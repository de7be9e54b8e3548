"""Node-level (silo-level) DP-FedAvg through Flower's own DP wrapper and accountant.

In a cross-silo federation the privacy unit can be the silo (a hospital, a shop): neighbouring
federations differ by one node's whole data. This is exactly what Flower's
``DifferentialPrivacyServerSideFixedClipping`` protects (McMahan et al. 2018's DP-FedAvg with the node
as the unit): the server clips each node's update to C, averages with equal weights and adds Gaussian
noise of std ``noise_multiplier * C / n_nodes``. Every node trains every round, so there is no
sampling amplification, and Flower's RDP accountant (Google's dp-accounting behind it) composes one
Gaussian mechanism per round.

Where Flower's constraints bind, and what fedrec does about them:
* equal weights: the nodes' uploads are averaged by ``unit-weight`` (always 1), not by examples;
* Flower's in-wrapper accounting accepts only the unmodified ``FedAvg.aggregate_train`` and fedrec's
  FedAvg adds upload checks, so the wrapper runs without it and this class composes the same
  ``GaussianPrivacyEvent`` in Flower's ``RdpAccountant`` after every released aggregate;
* budget: the round that would exceed ``max_epsilon`` is not started (``PrivacyBudgetExhausted``).
User-level DP (many users per node) does not fit the wrapper: see ``strategies/user_dp.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping

from fedrec.errors import ConfigError
from fedrec.privacy.accounting import check_noise_or_target
from strategies.user_dp import PrivacyBudgetExhausted

UNIT_WEIGHT = "unit-weight"  # every node reports 1.0 under this key: equal weights in the average


@dataclass
class NodeDPConfig:
    noise_multiplier: float | None = 1.0  # z: noise std / C on the sum of clipped node updates
    target_epsilon: float | None = None  # calibrate z to reach this epsilon after all rounds (inf: z = 0)
    clipping_norm: float = 1.0  # C: bound on each node's update (L2 over all global parameters)
    delta: float = 1e-3
    max_epsilon: float | None = None

    def __post_init__(self):
        check_noise_or_target(self.noise_multiplier, self.target_epsilon)
        if self.clipping_norm <= 0:
            raise ConfigError(f"privacy.clipping_norm: must be positive, got {self.clipping_norm}")
        if not 0 < self.delta < 1:
            raise ConfigError(f"privacy.delta: must be in (0, 1), got {self.delta}")
        if self.max_epsilon is not None and self.max_epsilon <= 0:
            raise ConfigError(f"privacy.max_epsilon: must be positive, got {self.max_epsilon}")


def node_dp_config(cfg) -> NodeDPConfig:
    from fedrec.typed_config import typed_block

    return typed_block(NodeDPConfig, cfg, "privacy")


def flower_accountant(n_nodes: int, delta: float, max_epsilon: float | None = None):
    from flwr.supercore.privacy_accounting import NeighboringRelation, PrivacyConfig, SamplingMethod
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    return RdpAccountant(PrivacyConfig(target_delta=delta, population_size=n_nodes,
                                       neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                                       sampling_method=SamplingMethod.NO_AMPLIFICATION, max_epsilon=max_epsilon))


def node_dp_epsilon(noise_multiplier: float, rounds: int, n_nodes: int, delta: float) -> float:
    """Epsilon after ``rounds`` releases, by Flower's accountant."""
    from flwr.supercore.privacy_accounting import GaussianPrivacyEvent

    if noise_multiplier == 0:
        return math.inf
    acc = flower_accountant(n_nodes, delta)
    acc.compose(GaussianPrivacyEvent(noise_multiplier, n_nodes, n_nodes), rounds)
    return acc.get_epsilon(delta)


class NodeDPFedAvg(DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed-clipping wrapper around fedrec's FedAvg, accounted by Flower's RDP accountant."""

    def __init__(self, inner, cfg: NodeDPConfig, n_nodes: int, rounds: int, seed: int = 0):
        from fedrec.privacy.accounting import calibrate_noise

        z = cfg.noise_multiplier
        if cfg.target_epsilon is not None:
            z = 0.0 if math.isinf(cfg.target_epsilon) else calibrate_noise(
                lambda s: node_dp_epsilon(s, rounds, n_nodes, cfg.delta), cfg.target_epsilon, "privacy.target_epsilon")
        super().__init__(inner, float(z), cfg.clipping_norm, n_nodes)
        self.cfg, self.n_nodes, self.seed = cfg, n_nodes, seed
        self.accountant_ = flower_accountant(n_nodes, cfg.delta) if z > 0 else None
        self.rounds_released = 0  # aggregates released with noise: the accountant's composition count

    def state(self) -> dict:
        return {"rounds_released": self.rounds_released}

    def load_state(self, st: dict) -> None:
        """Resume: recompose the accountant with the rounds the interrupted run released."""
        self.rounds_released = int(st["rounds_released"])
        if self.accountant_ is not None and self.rounds_released:
            self.accountant_.compose(self._event(), self.rounds_released)

    def _event(self):
        from flwr.supercore.privacy_accounting import GaussianPrivacyEvent

        return GaussianPrivacyEvent(self.noise_multiplier, self.n_nodes, self.n_nodes)

    def epsilon(self) -> float:
        return math.inf if self.accountant_ is None else self.accountant_.get_epsilon(self.cfg.delta)

    def configure_train(self, server_round, arrays, config, grid):
        limit = self.cfg.max_epsilon
        if limit is not None and (self.accountant_ is None or self.accountant_.would_exceed(self._event(), limit)):
            raise PrivacyBudgetExhausted(f"privacy.max_epsilon: round {server_round} would exceed {limit} "
                                         f"(spent {self.epsilon():.4f})")
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        from fedrec.rng import PURPOSE_SERVER_NOISE, stream_seed

        replies = [self._nudge_if_unchanged(r) for r in self.strategy._in_partition_order(list(replies))]
        # Flower draws the noise from numpy's global generator: seed it for this round from
        # (seed, global round), and give the caller's generator state back afterwards.
        rnd = int(self.strategy.round_offset) + int(server_round)
        outer = np.random.get_state()
        np.random.seed(stream_seed(self.seed, rnd, PURPOSE_SERVER_NOISE) % 2**32)
        try:
            arrays, metrics = super().aggregate_train(server_round, replies)
        finally:
            np.random.set_state(outer)
        if arrays is not None and self.accountant_ is not None:
            self.accountant_.compose(self._event())
            self.rounds_released += 1
        return arrays, metrics

    def _nudge_if_unchanged(self, reply):
        """Flower 1.42's ``clip_inputs_inplace`` divides by the update's norm, so a node that did not train
        (an empty shard: update exactly 0) would crash the round. Its first entry moves by 1e-18 or one float
        step, whichever is larger (so the squared norm does not underflow), which clipping then leaves as it is."""
        from flwr.app import Array, ArrayRecord

        if reply.has_error() or "arrays" not in reply.content.array_records:
            return reply
        record = reply.content["arrays"]
        current = self.current_arrays
        if list(record.keys()) != list(current.keys()) or any(
                not np.array_equal(record[k].numpy(), current[k].numpy()) for k in record.keys()):
            return reply
        arrays = {k: record[k].numpy().copy() for k in record.keys()}
        first = next(k for k, v in arrays.items() if v.size and np.issubdtype(v.dtype, np.floating))
        flat = arrays[first].reshape(-1)
        flat[0] = flat[0] + max(float(np.spacing(np.abs(flat[0]))), 1e-18)
        reply.content["arrays"] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
        return reply
