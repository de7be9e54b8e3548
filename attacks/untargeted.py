"""Untargeted poisoning by hard samples, in the style of FedAttack (Wu et al., KDD 2022, "FedAttack: Effective
and Covert Poisoning Attack on Federated Recommendation via Hard Sampling"; the paper's code is not public in
the index searched here). The goal is to degrade the global model for everyone, not to promote an item:
the success measure is the drop of the clean metrics (test recall/NDCG of the same run vs ``attack=none``).

FedAttack's malicious clients train on *reversed hard samples*: for the user's representation, the items
the model ranks highest (the most similar, the hardest negatives) are used as negatives and the items it
ranks lowest as positives, so the BPR update pushes the model to rank what users like below what they do
not. Here, on :mod:`attacks.crafted`'s machinery:

1. the users the malicious clients reason about are FedRecAttack's approximated genuine users (the same 1%
   public interactions: MF embeddings fitted by Adam, DiffRec's public rows; :class:`attacks.fedrecattack.Center`);
2. per user, ``n_hard`` negatives = its top-``n_hard`` items under the round's global model (public items
   excluded) and ``n_hard`` positives = its bottom-``n_hard`` items; the loss is the BPR loss
   ``sum softplus(-(s(u, pos) - s(u, neg)))`` over every (pos, neg) pair of the same rank position, its
   gradient w.r.t. the item side;
3. one gradient per round, split among the round's malicious clients, at most kappa rows each (chosen by
   gradient norm; no target rows are forced), clipped and scaled for the mean like FedRecAttack's.

Deviations, with reasons: FedAttack's malicious clients are compromised genuine clients using their own
user embedding and data; here they are injected fake clients (fedrec's threat: the budget adds clients)
using the approximated users, the knowledge FedRecAttack assumes; the original samples a few hard items
per local step, here the fixed top/bottom ``n_hard`` of the current ranking.
The run still reports the (randomly selected) target's exposure, so the grid's columns line up.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from attacks.crafted import CraftedItemAttack, check_positive, item_gradient
from attacks.fedrecattack import Center, FedRecAttackConfig
from fedrec.mechanisms import register


@dataclass(frozen=True)
class UntargetedConfig(FedRecAttackConfig):
    n_hard: int = 10  # hard negatives (the user's top items) and reversed positives (its bottom items) per user

    def __post_init__(self):
        super().__post_init__()
        check_positive(self, "n_hard", integer=True)


def reversed_hard_loss(scores: torch.Tensor, seen: torch.Tensor, n_hard: int) -> torch.Tensor:
    """BPR with reversed hard samples: positives the bottom-n_hard, negatives the top-n_hard unseen items."""
    with torch.no_grad():
        top = torch.topk(scores.masked_fill(seen > 0, -float("inf")), n_hard, dim=1).indices
        bottom = torch.topk(-scores.masked_fill(seen > 0, float("inf")), n_hard, dim=1).indices
    pos, neg = scores.gather(1, bottom), scores.gather(1, top)
    return torch.nn.functional.softplus(-(pos - neg)).sum()


class HardSampleCenter(Center):
    def promoted(self, targets: np.ndarray) -> np.ndarray:
        return targets[:0]  # untargeted: no row is forced into the uploads

    def gradient(self, targets: np.ndarray, rnd: int, k: int | None = None) -> torch.Tensor:
        users = self.users(rnd)
        seen = torch.from_numpy(self.public[self.known].toarray())
        n_hard = min(int(self.c.n_hard), self.data.n_items // 2)
        return item_gradient(self.side, lambda m: reversed_hard_loss(self.side.scores(users, m), seen, n_hard))


@register
class UntargetedAttack(CraftedItemAttack):
    """``attack=untargeted``: reversed hard samples on approximated users, to degrade the model."""

    name = "untargeted"
    Config = UntargetedConfig
    center = HardSampleCenter
