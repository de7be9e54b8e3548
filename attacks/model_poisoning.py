"""Model-poisoning baselines: malicious clients scale or flip the sign of their honest update.

A fraction of the clients (silo mode: nodes; cross-device mode: users) is malicious for the whole run
(``attacks.threat.malicious_clients``, keyed by the seed). In the rounds it is active, a malicious
client trains honestly and then sends ``start + s * (trained - start)``:

* ``attack=scaling``: ``s = scale`` (> 1 boosts the update, the "boosting" of Bhagoji et al., ICML
  2019, and the scaled updates of Bagdasaryan et al., AISTATS 2020, without a backdoor objective);
* ``attack=signflip``: ``s = -scale`` (sign-flipping, the Byzantine baseline of e.g. Li et al., AAAI
  2019 "RSA" and Fang et al., USENIX Security 2020).

For DiffRec's denoiser the whole global model is the item side, so the crafted update is the whole
flipped/scaled parameter delta. These are the untargeted baselines of the attacks issue; the
targeted attacks (FedRecAttack, PipAttack, ...) build on the same hooks.

Hooks: silo -> ``node_reply`` (the node's reply arrays); cross-device -> ``user_transform`` (the
malicious users' deltas inside the node's fold, before any defense bound or DP clipping applies).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from attacks.threat import budget, malicious_clients
from fedrec.errors import ConfigError
from fedrec.mechanisms import Mechanism, changes_only, register


@dataclass
class PoisoningConfig:
    fraction: float | None = 0.1  # share of clients that are malicious (silo: nodes; device: users)
    count: int | None = None  # exact number of malicious clients instead of a fraction
    scale: float = 10.0  # s: the malicious update is s (scaling) or -s (signflip) times the honest one
    start_round: int = 1  # first round the attack is active
    end_round: int | None = None  # last active round (None: to the end)

    def __post_init__(self):
        if not self.scale > 0:
            raise ConfigError(f"attack.scale: must be positive, got {self.scale}")
        if self.start_round < 1 or (self.end_round is not None and self.end_round < self.start_round):
            raise ConfigError(f"attack.start_round/end_round: need 1 <= start_round <= end_round, got "
                              f"{self.start_round}, {self.end_round}")


class UpdatePoisoning(Mechanism):
    kind = "attack"
    modes = ("silo", "device")
    Config = PoisoningConfig
    sign = 1.0

    @property
    def factor(self) -> float:
        return self.sign * float(self.config.scale)

    def population(self, cfg, n_users: int) -> int:
        return int(cfg.federation.num_nodes) if cfg.federation.mode == "silo" else n_users

    def malicious(self, cfg, n_users: int) -> np.ndarray:
        pop = self.population(cfg, n_users)
        return malicious_clients(int(cfg.seed), pop, budget(pop, self.config.fraction, self.config.count))

    def active(self, rnd: int) -> bool:
        c = self.config
        return rnd >= c.start_round and (c.end_round is None or rnd <= c.end_round)

    def check(self, cfg) -> None:
        if cfg.federation.mode == "silo":
            budget(int(cfg.federation.num_nodes), self.config.fraction, self.config.count)

    def check_model(self, cfg, model, data) -> None:
        if cfg.federation.mode == "device":  # the silo budget was checked from the config alone
            budget(data.n_users, self.config.fraction, self.config.count)

    # ------------------------------------------------------------------ silo: the node's reply
    def node_reply(self, ctx, content):
        # Every node reports the count (0 or 1) so that all replies carry the same metric keys, as
        # Flower's aggregation requires. The count is the simulator's bookkeeping for the report:
        # a defense must never read it.
        malicious = self.active(ctx.round) and ctx.partition_id in set(self.malicious(ctx.cfg, ctx.data.n_users).tolist())
        content["metrics"]["count/malicious-clients"] = int(malicious)
        if not malicious:
            return content
        arrays = content["arrays"]
        crafted = {}
        for name in arrays.keys():
            trained = arrays[name].numpy()
            start = ctx.start[name].detach().cpu().numpy()
            crafted[name] = (start + self.factor * (trained - start)).astype(trained.dtype)
        content["arrays"] = ArrayRecord({k: Array(v) for k, v in crafted.items()})
        return content

    # ------------------------------------------------------------------ device: users' deltas
    def user_transform(self, ctx):
        if not self.active(ctx.round):
            return None
        bad = self.malicious(ctx.cfg, ctx.data.n_users)
        factor = self.factor

        def craft(users, deltas):
            mask = torch.from_numpy(np.isin(np.asarray(users), bad))
            if not bool(mask.any()):
                return deltas, {"malicious-users": 0}
            scale = torch.where(mask, torch.tensor(factor), torch.tensor(1.0))
            out = {n: d * scale.view(-1, *([1] * (d.dim() - 1))).to(d.device, d.dtype) for n, d in deltas.items()}
            return out, {"malicious-users": int(mask.sum())}

        return changes_only(craft, bad)

    def report(self, ctx) -> dict:
        cfg = ctx.cfg
        bad = self.malicious(cfg, ctx.data.n_users)
        return {"name": self.name, "clients": "nodes" if cfg.federation.mode == "silo" else "users",
                "malicious": int(len(bad)), "fraction": len(bad) / self.population(cfg, ctx.data.n_users),
                "factor": self.factor, "start_round": self.config.start_round, "end_round": self.config.end_round}


@register
class ScalingAttack(UpdatePoisoning):
    """Malicious clients send their honest update times ``scale``."""

    name = "scaling"


@register
class SignFlipAttack(UpdatePoisoning):
    """Malicious clients send their honest update times ``-scale``."""

    name = "signflip"
    sign = -1.0
