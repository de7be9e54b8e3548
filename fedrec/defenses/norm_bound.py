"""Norm bounding (Sun et al., 2019, "Can You Really Backdoor Federated Learning?"): before
aggregation, every client's update ``delta = trained - global`` is scaled to L2 norm at most
``bound`` (over all global parameters): ``delta * min(1, bound / ||delta||)``.

Where it runs: in silo mode the server bounds each node's upload (``setup_server`` installs a
per-update rule on the strategy). In cross-device mode every user is a client and the node that
hosts it only simulates the transport, so the bound is applied to each user's update inside the
node's fold, before the node sums its users (``user_transform``): the same arithmetic the server
would apply to per-user uploads, without uploading them one by one. It runs after an attack's
transform (the attacker cannot skip it) and before user-level DP's clipping, which then bounds
what is left by its own ``clip``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict

from fedrec.errors import ConfigError
from fedrec.mechanisms import Mechanism, register


@dataclass
class NormBoundConfig:
    bound: float = 1.0  # M: the largest L2 norm an update may have

    def __post_init__(self):
        if not self.bound > 0:
            raise ConfigError(f"defense.bound: must be positive, got {self.bound}")


def bound_deltas(deltas: dict[str, np.ndarray], bound: float) -> tuple[dict[str, np.ndarray], bool]:
    """One update's deltas scaled to norm <= ``bound``; whether it was scaled."""
    norm = float(np.sqrt(sum(float(np.square(d.astype(np.float64)).sum()) for d in deltas.values())))
    if norm <= bound:
        return deltas, False
    factor = bound / norm
    return {k: (d.astype(np.float64) * factor).astype(d.dtype) for k, d in deltas.items()}, True


@register
class NormBound(Mechanism):
    kind = "defense"
    name = "norm_bound"
    modes = ("silo", "device")
    Config = NormBoundConfig

    # ------------------------------------------------------------------ silo: at the server
    def setup_server(self, ctx) -> None:
        if ctx.cfg.federation.mode != "silo":
            return
        bound = float(self.config.bound)
        arrays_key = ctx.strategy.arrayrecord_key

        def bound_reply(content: RecordDict, global_arrays) -> tuple[RecordDict, dict]:
            arrays = content[arrays_key]
            start = {k: global_arrays[k].numpy() for k in arrays.keys()}
            deltas = {k: arrays[k].numpy() - start[k] for k in arrays.keys()}
            bounded, scaled = bound_deltas(deltas, bound)
            out = RecordDict({arrays_key: ArrayRecord({k: Array((start[k] + v).astype(start[k].dtype))
                                                       for k, v in bounded.items()}),
                              "metrics": content["metrics"]})
            return out, {"count/bounded-updates": int(scaled)}

        ctx.strategy.reply_transforms = tuple(ctx.strategy.reply_transforms) + (bound_reply,)

    # ------------------------------------------------------------------ device: each user's update
    def user_transform(self, ctx):
        bound = float(self.config.bound)

        def bound_users(users, deltas):
            n = next(iter(deltas.values())).shape[0]
            sq = sum(d.reshape(n, -1).double().pow(2).sum(1) for d in deltas.values())
            factor = torch.clamp(bound / sq.sqrt().clamp(min=1e-12), max=1.0)
            out = {k: d * factor.view(-1, *([1] * (d.dim() - 1))).to(d.dtype) for k, d in deltas.items()}
            return out, {"bounded-users": int((factor < 1).sum())}

        return bound_users

    def report(self, ctx) -> dict:
        return {"name": self.name, "bound": float(self.config.bound)}
