"""BPR-MF (Rendle et al., "BPR: Bayesian Personalized Ranking from Implicit Feedback", UAI 2009).

Implements matrix factorisation trained with the BPR pairwise loss, as RecBole's ``BPR``: a user
and an item ``nn.Embedding`` (xavier-normal init), score(u, i) = <e_u, e_i>, and per (u, i+, i-)
triple the loss ``-log sigmoid(s(u, i+) - s(u, i-))`` plus an L2 penalty on the embeddings that
the triple touches (the paper's Gaussian prior, lambda_Theta = ``reg_weight``).

Privacy role: ``user_emb.weight`` is the only user-specific parameter. In a federation each
client holds its own row (it is a direct encoding of the user's taste: its dot products with the
public item embeddings reproduce the user's ranking), so it is declared private and never leaves
the client; the item embeddings are global and aggregated.

Deviations from the paper's LearnBPR (bootstrap sampling of single (u, i+, i-) triples):

* training iterates over **batches of users** (the contract of :class:`Recommender`): for every
  user of the batch, ``n_samples_per_user`` positives are drawn with replacement from the user's
  history row and as many negatives uniformly from the items outside it; the per-user loss is
  the mean over those pairs (so each user is one example, as DP-SGD's per-user clipping needs);
* a user with an empty history row contributes a loss of exactly 0 (no pair can be formed), as
  does a pair for which no negative could be found (a user who interacted with every item);
* negatives are drawn by vectorised rejection sampling (a fixed number of redraw rounds for the
  whole batch, no Python loop over users).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedrec.errors import ConfigError
from fedrec.models.base import Batch, DataShape, Recommender

#: rejection-sampling rounds for negatives; a draw survives all of them with probability
#: density**rounds, i.e. never in practice for the sparse rows of recommendation data.
_NEG_ROUNDS = 32


@dataclass
class BPRConfig:
    embedding_size: int = 64  # dimension of user and item embeddings
    n_samples_per_user: int = 8  # (positive, negative) pairs sampled per user per training step
    reg_weight: float = 1e-5  # L2 weight on the embeddings of each sampled triple

    def __post_init__(self) -> None:
        if int(self.embedding_size) < 1:
            raise ConfigError(f"model.embedding_size: must be >= 1, got {self.embedding_size}")
        if int(self.n_samples_per_user) < 1:
            raise ConfigError(f"model.n_samples_per_user: must be >= 1, got {self.n_samples_per_user}")
        if float(self.reg_weight) < 0:
            raise ConfigError(f"model.reg_weight: must be >= 0, got {self.reg_weight}")


class BPRMF(Recommender):
    """Matrix factorisation with the BPR loss; see the module docstring."""

    name = "bpr"

    def __init__(self, cfg: BPRConfig, shape: DataShape):
        super().__init__()
        self.cfg = cfg
        self.n_items = shape.n_items
        self.user_emb = nn.Embedding(shape.n_users, cfg.embedding_size)
        self.item_emb = nn.Embedding(shape.n_items, cfg.embedding_size)
        nn.init.xavier_normal_(self.user_emb.weight)
        nn.init.xavier_normal_(self.item_emb.weight)

    # -------------------------------------------------------------- sampling
    def _sample_pairs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, S) positive ids, (B, S) negative ids, (B, S) bool mask of valid pairs."""
        b, n = x.shape
        s = int(self.cfg.n_samples_per_user)
        pos_mask = x > 0
        has_pos = pos_mask.any(dim=1)
        # multinomial needs a non-zero row: give empty rows a uniform dummy row, masked out below.
        w = torch.where(has_pos[:, None], pos_mask.float(), torch.ones_like(x, dtype=torch.float32))
        pos = torch.multinomial(w, s, replacement=True)
        neg = torch.randint(0, n, (b, s), device=x.device)
        bad = pos_mask.gather(1, neg)
        for _ in range(_NEG_ROUNDS):
            if not bool(bad.any()):
                break
            neg = torch.where(bad, torch.randint(0, n, (b, s), device=x.device), neg)
            bad = pos_mask.gather(1, neg)
        valid = has_pos[:, None] & ~bad
        return pos, neg, valid

    # -------------------------------------------------------------- interface
    def draw_randomness(self, batch: Batch, rnd) -> dict[str, torch.Tensor]:
        """Positives by inverse CDF over the user's row, negatives uniform with rejection rounds."""
        x = batch.x
        b, n = x.shape
        s = int(self.cfg.n_samples_per_user)
        pos_mask = x > 0
        has_pos = pos_mask.any(dim=1)
        w = torch.where(has_pos[:, None], pos_mask.float(), torch.ones_like(x, dtype=torch.float32))
        cdf = torch.cumsum(w, 1)
        u = rnd.uniform(0, s) * cdf[:, -1:]
        pos = torch.searchsorted(cdf, u, right=True).clamp(max=n - 1)
        neg = rnd.randint(1, s, n)
        bad = pos_mask.gather(1, neg)
        for r in range(_NEG_ROUNDS):
            if not bool(bad.any()):
                break
            neg = torch.where(bad, rnd.randint(2 + r, s, n), neg)
            bad = pos_mask.gather(1, neg)
        return {"pos": pos, "neg": neg, "valid": (has_pos[:, None] & ~bad).float()}

    def loss(self, batch: Batch) -> torch.Tensor:
        if batch.rand is not None:
            pos, neg, valid = batch.rand["pos"], batch.rand["neg"], batch.rand["valid"]
        else:
            with torch.no_grad():
                pos, neg, valid = self._sample_pairs(batch.x)
        u = self.user_emb(batch.users)  # (B, d)
        ep, en = self.item_emb(pos), self.item_emb(neg)  # (B, S, d)
        diff = (u[:, None, :] * (ep - en)).sum(-1)  # s(u, i+) - s(u, i-)
        reg = u.pow(2).sum(-1, keepdim=True) + ep.pow(2).sum(-1) + en.pow(2).sum(-1)
        pair = -F.logsigmoid(diff) + self.cfg.reg_weight * reg
        vf = valid.to(pair.dtype)
        return (pair * vf).sum(1) / vf.sum(1).clamp(min=1.0)

    def scores(self, batch: Batch) -> torch.Tensor:
        return self.user_emb(batch.users) @ self.item_emb.weight.T

    def private_parameter_names(self) -> set[str]:
        return {"user_emb.weight"}
