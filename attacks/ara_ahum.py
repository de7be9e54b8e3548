"""A-ra and A-hum (Rong et al., IJCAI 2022, "Poisoning Deep Learning Based Recommender Model in Federated
Learning Scenarios"; official code github.com/rdz98/PoisonFedDLRS, ``attack.py``: ``AttackClient``).

Neither attack needs prior knowledge: no public interactions, no popularity. The malicious client stands in
for the genuine users it cannot see by random ones:

* ``attack=ara`` (A-ra, random approximation): ``n_samples`` user representations drawn from a Gaussian
  N(0, ``user_std``^2) (official: 10 samples, ``nn.init.normal_(std=0.01)``, fresh at every upload);
* ``attack=ahum`` (A-hum, hard user mining): the same draws, each then moved ``hum_steps`` gradient steps
  of rate ``hum_lr`` (official: 30 steps at the training lr 0.001) *down* the loss
  BCE(sigmoid(s(u, target)), 0) against the current global model: users who dislike the target, the
  hardest to promote it to.

Both then craft the item-side gradient of ``mean_s BCE(sigmoid(s(u_s, target)), 1)`` (mean over the samples
and the targets, as the official ``total_loss``), which raises the target's score for such users.

What is crafted (``attacks.crafted``: item sides, kappa rows, clip, upload scaling):

* BPR-MF: a user is a d-vector, s(u, j) = u . v_j; only the targets' rows get a gradient (the official
  client likewise uploads the target rows only, plus its MLP's gradients: MF has no shared MLP);
* DiffRec: a user is an input row; the Gaussian draw is a (n_items,) real vector, the literal counterpart
  of a random embedding (DiffRec normalises its input, so only the draw's direction matters), and s(u, j)
  is the denoiser's t = 0 prediction (:func:`attacks.crafted.denoise`). The gradient reaches every item's
  input column and the targets' output slices; kappa rows are the targets and kappa - 1 by gradient norm.

Deviations, with reasons: each malicious client draws its users from a keyed stream (seed, round, client)
instead of torch's global generator (runs are reproducible and every node agrees); its rows are capped at
``kappa`` and each clipped to ``grad_clip`` and scaled by ``upload_scale`` like FedRecAttack's
(:mod:`attacks.crafted`: the official server adds raw gradients at the training rate with no clip, which
fedrec's FedAvg over the sampled users' models would divide by the round's user count); the official
victim is NCF, here BPR-MF and DiffRec (fedrec's zoo). Every malicious client crafts its own upload
(``shared = False``), as the official clients do.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from attacks.crafted import CraftCenter, CraftConfig, CraftedItemAttack, check_positive, item_gradient
from fedrec.mechanisms import register
from fedrec.rng import numpy_stream

STREAM_ARA = 0x4152414D  # "ARAM": this module's randomness


@dataclass(frozen=True)
class RandomUsersConfig(CraftConfig):
    target_selection: str = "unpopular"  # official: the least popular item
    n_samples: int = 10  # random users per upload (official s = 10)
    user_std: float = 0.01  # their Gaussian's standard deviation (official nn.init.normal_ std)
    hum_steps: int = 30  # A-hum: gradient steps mining each hard user (official 30; A-ra ignores it)
    hum_lr: float = 0.001  # A-hum: their rate (official: the training lr, 0.001)

    def __post_init__(self):
        super().__post_init__()
        check_positive(self, "user_std", "hum_lr")
        check_positive(self, "n_samples", "hum_steps", integer=True)


def bce_to_one(scores: torch.Tensor) -> torch.Tensor:
    """BCE(sigmoid(scores), 1) = softplus(-scores), elementwise."""
    return torch.nn.functional.softplus(-scores)


def mine_hard_users(side, users: torch.Tensor, targets: torch.Tensor, steps: int, lr: float) -> torch.Tensor:
    """A-hum's hard users: ``steps`` gradient steps of each user down mean_t BCE(sigmoid(s(u, t)), 0)
    (= softplus(s)) against the current item side (each user its own loss: the sum over users)."""
    u = users.clone()
    matrix = side.matrix
    for _ in range(int(steps)):
        leaf = u.clone().requires_grad_(True)
        loss = torch.nn.functional.softplus(side.scores(leaf, matrix)[:, targets]).mean(1).sum()
        (g,) = torch.autograd.grad(loss, leaf)
        u = u - float(lr) * g
    return u


class RandomUsersCenter(CraftCenter):
    shared = False  # each official attack client crafts its own upload
    hard = False

    def random_users(self, rnd: int, k: int) -> torch.Tensor:
        width = self.side.width if self.side.kind == "mf" else self.data.n_items
        rng = numpy_stream(self.seed, STREAM_ARA, rnd, int(self.bad[k]))
        draw = rng.standard_normal((int(self.c.n_samples), width)).astype(np.float32)
        return torch.from_numpy(draw) * float(self.c.user_std)

    def gradient(self, targets: np.ndarray, rnd: int, k: int | None = None) -> torch.Tensor:
        t = torch.from_numpy(targets)
        users = self.random_users(rnd, int(k))
        if self.hard:
            users = mine_hard_users(self.side, users, t, int(self.c.hum_steps), float(self.c.hum_lr))
        users = users.detach()
        return item_gradient(self.side, lambda m: bce_to_one(self.side.scores(users, m)[:, t]).mean())


class HardUsersCenter(RandomUsersCenter):
    hard = True


@register
class ARandomAttack(CraftedItemAttack):
    """``attack=ara``: A-ra, random user approximation."""

    name = "ara"
    Config = RandomUsersConfig
    center = RandomUsersCenter


@register
class AHardUserAttack(CraftedItemAttack):
    """``attack=ahum``: A-hum, hard user mining."""

    name = "ahum"
    Config = RandomUsersConfig
    center = HardUsersCenter
