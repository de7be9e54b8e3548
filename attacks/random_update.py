"""``attack=random_update``: the random-update baseline of model poisoning (Gaussian updates, as the "Gaussian
attack" of the Byzantine-robust FL literature, e.g. Fang et al., USENIX Security 2020; Blanchard et al.,
NeurIPS 2017), on :mod:`attacks.crafted`'s fake clients. Not ``attack=random``: that is the random
*shilling* attack (fake profiles as data, :mod:`attacks.shilling`).

Each malicious client uploads ``kappa`` item rows (drawn once per client, uniformly: the gradient is
unit-norm noise rows, so the norm-weighted draw of :meth:`attacks.crafted.CraftCenter.rows_of` is
uniform) whose values are N(0, I) directions rescaled so every row has the norm of an average benign
row times ``scale``: the mean L2 norm of the nonzero item rows of the genuine users' deltas in the same
chunk of the node's fold (an omniscient choice -- the simulator knows the honest uploads; a real attacker
would estimate the size by honest training on data of its own, which fake clients do not have). A chunk
without a genuine user reuses the last measured norm (node state), and the first one, before any
measurement, ``local_lr x grad_clip`` (the size of one clipped SGD row). No upload scaling for the mean:
the baseline asks what noise of the benign size does, so under FedAvg a malicious client weighs what one
genuine client weighs. No target is promoted (the target's exposure is still reported, for the grid).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from attacks.crafted import CraftCenter, CraftConfig, CraftedItemAttack, check_positive
from fedrec.errors import ConfigError
from fedrec.mechanisms import register
from fedrec.rng import numpy_stream

STREAM_RANDOM_UPDATE = 0x52414E44  # "RAND": this module's randomness


@dataclass(frozen=True)
class RandomUpdateConfig(CraftConfig):
    scale: float = 1.0  # each crafted row's norm = scale x the mean benign row norm

    def __post_init__(self):
        super().__post_init__()
        check_positive(self, "scale")
        if self.upload_scale is not None:  # refused rather than ignored
            raise ConfigError("attack.upload_scale: random_update's rows have the benign norm x attack.scale; "
                              "it scales nothing")


class GaussianCenter(CraftCenter):
    shared = False

    def initial_state(self) -> dict:
        return {"benign_norm": np.full(1, np.nan)}

    def promoted(self, targets: np.ndarray) -> np.ndarray:
        return targets[:0]

    def gradient(self, targets: np.ndarray, rnd: int, k: int | None = None) -> torch.Tensor:
        rng = numpy_stream(self.seed, STREAM_RANDOM_UPDATE, rnd, int(self.bad[int(k)]))
        g = rng.standard_normal(tuple(self.side.matrix.shape)).astype(np.float32)
        return torch.from_numpy(g / np.linalg.norm(g, axis=1, keepdims=True))  # unit rows: the clip leaves them


@register
class RandomUpdateAttack(CraftedItemAttack):
    name = "random_update"
    Config = RandomUpdateConfig
    center = GaussianCenter

    reads_genuine_deltas = True  # the crafted rows' size is the chunk's mean genuine row norm

    def chunk_factor(self, cen, side, deltas, genuine, factor):
        """The mean nonzero row norm of the chunk's genuine deltas x scale, per unit (clipped) crafted row
        (the crafted delta is ``-factor x`` unit rows, so its sign is the noise's)."""
        if len(genuine):
            norms = side.row_norms(deltas, torch.as_tensor(genuine))
            nonzero = norms[norms > 0]
            if len(nonzero):
                cen.state["benign_norm"] = np.array([float(nonzero.mean())])
        measured = float(cen.state["benign_norm"][0])
        if np.isnan(measured):
            measured = float(self.cfg.federation.local_lr) * float(self.config.grad_clip)
        return float(self.config.scale) * measured / min(1.0, float(self.config.grad_clip))
