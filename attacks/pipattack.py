"""PipAttack (Zhang et al., WSDM 2022, "PipAttack: Poisoning Federated Recommender Systems for Manipulating
Item Promotion"; no official code was found: the search tools and GitHub show none, so this follows the
paper's description, with the deviations below).

Threat: the attacker knows item popularity (PipAttack's prior knowledge; here the genuine users' training
counts, the ``popular_fraction`` most popular items being "popular") and the target items; its fake
clients hold no data (:mod:`attacks.crafted`). The paper's insight: recommenders are popularity-biased, so
a target whose embedding looks like the popular items' is recommended widely. A malicious upload is
derived from three terms on the item side ``V`` of the round's global model:

* explicit promotion ``L_exp``: the malicious users rate the target high, BCE(sigmoid(s(u_m, t)), 1)
  summed over the malicious users and the targets (MF: each malicious client's own user vector ``u_m``,
  node state, trained by the same steps like a genuine client's private row; DiffRec: the malicious
  profile, the popular items plus the targets, as the denoiser's input);
* popularity alignment ``L_pop``: ``1/2 ||V_t - mean_{j popular} V_j||^2`` per target -- the target's row
  (MF: its embedding; DiffRec: its output row, output bias and input column) pulled toward the popular
  items' centroid (held fixed: the attack moves the target, not the popular items);
* distance constraint ``L_dis``: ``1/2 ||V' - V||^2``, the crafted model kept near the global one so the
  poisoned update resembles a benign one in size.

The attacker takes ``local_steps`` gradient steps of rate ``attack_lr`` on
``L_exp + alpha L_pop + beta L_dis`` from V' = V (a malicious "local training"), and its gradient is the
mean gradient along that path, (V - V') / (local_steps x attack_lr); then :mod:`attacks.crafted` turns it
into uploads: at most kappa rows (the targets first), each clipped to ``grad_clip``, scaled for the mean.

Deviations, with reasons: the paper trains a popularity *classifier* on item embeddings and uses its
cross-entropy toward the popular class as the alignment loss; here the alignment is the distance to the
popular centroid (no classifier to train each round; both pull the target into the popular region of
the embedding space). The distance constraint is a proximal term on the crafted model (the paper
constrains the poisoned gradients' distance to benign ones, which fake clients without data cannot
compute). The round's malicious clients are coordinated like FedRecAttack's (one gradient per round,
each client sending what the previous ones left, ``shared = True``), so five clients in one round do
not each push the same target row past the centroid. The victims are fedrec's BPR-MF and DiffRec (the
paper's are MF-style and NCF-style federated recommenders).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from attacks.crafted import CraftCenter, CraftConfig, CraftedItemAttack, check_positive
from fedrec.errors import ConfigError
from fedrec.mechanisms import register
from fedrec.rng import numpy_stream

STREAM_PIP = 0x50495041  # "PIPA": this module's randomness


@dataclass(frozen=True)
class PipAttackConfig(CraftConfig):
    target_selection: str = "unpopular"  # the paper promotes unpopular items
    popular_fraction: float = 0.1  # share of the items the attacker counts as popular (by genuine training counts)
    alpha: float = 1.0  # weight of the popularity alignment
    beta: float = 1.0  # weight of the distance constraint
    local_steps: int = 5  # the malicious local training's steps
    attack_lr: float = 0.1  # their rate (also the malicious users' own vectors' rate)
    user_std: float = 0.1  # MF: the malicious users' vectors start N(0, user_std^2)

    def __post_init__(self):
        super().__post_init__()
        if not 0 < float(self.popular_fraction) < 1:
            raise ConfigError(f"attack.popular_fraction: must be in (0, 1), got {self.popular_fraction}")
        if float(self.alpha) < 0 or float(self.beta) < 0:
            raise ConfigError(f"attack.alpha / attack.beta: must be >= 0, got {self.alpha}, {self.beta}")
        check_positive(self, "attack_lr", "user_std")
        check_positive(self, "local_steps", integer=True)


def popular_items(data, share: float, targets: np.ndarray) -> np.ndarray:
    """The ``ceil(share x n_items)`` items with the most genuine training interactions (ties by index),
    targets excluded: the attacker's popularity knowledge."""
    pop = np.asarray(data.train[data.genuine()].sum(axis=0)).ravel()
    order = np.lexsort((np.arange(len(pop)), -pop))
    order = order[~np.isin(order, targets)]
    return np.sort(order[:max(1, int(np.ceil(share * data.n_items)))])


def pip_loss(side, matrix, start, users, targets, popular, alpha: float, beta: float) -> torch.Tensor:
    """PipAttack's objective on a candidate item side ``matrix`` (``start``: the global one)."""
    t = torch.as_tensor(targets)
    explicit = torch.nn.functional.softplus(-side.scores(users, matrix)[:, t]).sum()
    centroid = start[torch.as_tensor(popular)].mean(0)
    align = 0.5 * (matrix[t] - centroid).pow(2).sum()
    distance = 0.5 * (matrix - start).pow(2).sum()
    return explicit + alpha * align + beta * distance


class PipCenter(CraftCenter):
    shared = True

    def initial_state(self) -> dict:
        if self.side.kind != "mf":
            return {}
        rng = numpy_stream(self.seed, STREAM_PIP, 0)
        return {"users": (rng.standard_normal((len(self.bad), self.side.width)) * float(self.c.user_std))
                .astype(np.float32)}

    def malicious_profiles(self, targets: np.ndarray, popular: np.ndarray) -> torch.Tensor:
        x = torch.zeros(1, self.data.n_items)
        x[0, torch.as_tensor(popular)] = 1.0
        x[0, torch.as_tensor(targets)] = 1.0
        return x

    def gradient(self, targets: np.ndarray, rnd: int, k: int | None = None) -> torch.Tensor:
        c = self.c
        popular = popular_items(self.data, float(c.popular_fraction), targets)
        start = self.side.matrix
        mf = self.side.kind == "mf"
        users = torch.from_numpy(self.state["users"]) if mf else self.malicious_profiles(targets, popular)
        v = start.clone()
        lr = float(c.attack_lr)
        for _ in range(int(c.local_steps)):
            leaf_v = v.clone().requires_grad_(True)
            leaf_u = users.clone().requires_grad_(mf)
            loss = pip_loss(self.side, leaf_v, start, leaf_u, targets, popular, float(c.alpha), float(c.beta))
            if mf:
                gv, gu = torch.autograd.grad(loss, [leaf_v, leaf_u])
                users = users - lr * gu
            else:
                (gv,) = torch.autograd.grad(loss, [leaf_v])
            v = v - lr * gv
        if mf:
            self.state["users"] = users.detach().numpy().astype(np.float32)
        return ((start - v) / (int(c.local_steps) * lr)).detach()


@register
class PipAttack(CraftedItemAttack):
    """``attack=pipattack``: popularity alignment + explicit promotion + distance constraint."""

    name = "pipattack"
    Config = PipAttackConfig
    center = PipCenter
