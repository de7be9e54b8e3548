"""BPR-MF (Rendle et al., "BPR: Bayesian Personalized Ranking from Implicit Feedback", UAI 2009).

Implements matrix factorisation trained with the BPR pairwise loss as RecBole's ``BPR``
(github.com/RUCAIBox/RecBole ``recbole/model/general_recommender/bpr.py``): a user and an item
``nn.Embedding`` (xavier-normal init), score(u, i) = <e_u, e_i>, and per (u, i+, i-) triple the loss
``-log sigmoid(s(u, i+) - s(u, i-))``. As in RecBole there is no L2 term (RecBole's BPR loss has
none and its optimizer's ``weight_decay`` defaults to 0); ``reg_weight`` > 0 adds the paper's
Gaussian prior as an L2 penalty on the three embeddings a triple touches.

Training unit (``sampling``):

* ``interaction`` (default; central and silo training through ``fedrec.train.train_epoch``):
  RecBole's epoch. The model's ``train_unit`` is "interaction", so the trainer shuffles the
  training interactions and feeds each (u, i+) once per epoch in batches of ``optim.batch_size``
  interactions (RecBole's ``train_batch_size``, 2048), each with one negative drawn uniformly from
  the items outside the user's training row (RecBole's default ``train_neg_sample_args``). An
  example, and so a DP-SGD clipping unit if one were applied to it, is then one interaction.
* ``all_pairs`` (FedRecAttack's client, Rong et al., ICDE 2022): every example is a user, whose
  loss is the *sum* over all its training positives, each once with one uniform negative outside the
  row, plus ``reg_weight / 2 (||e_u||^2 + sum over the pairs' item rows ||e_i||^2)`` (the official
  ``0.5 * reg * (||u||^2 + ||items[train_all]||^2)``). Deviation: the official client draws its
  negatives once for the whole run; here they are drawn afresh every round (keyed by seed, round, user).
* ``user``: every example is a user: ``n_samples_per_user`` positives drawn with replacement
  from the user's row and as many uniform negatives outside it; the user's loss is the mean over
  those pairs. Users are weighted equally, not by their number of interactions.

DP-SGD (``fedrec.privacy.dpsgd``) and cross-device training (``federation.mode=device``, one client
per user, vmapped with the draws of :meth:`BPRMF.draw_randomness`) build user batches themselves,
so they always use the per-user loss whatever ``sampling`` says: their privacy unit and their
client is the user, and one user's pairs are clipped / trained together (user-level DP).

Privacy role: ``user_emb.weight`` is the only user-specific parameter. In a federation each
client holds its own row (it is a direct encoding of the user's taste: its dot products with the
public item embeddings reproduce the user's ranking), so it is declared private and never leaves
the client; the item embeddings are global and aggregated. They are row-sparse
(``row_sparse_parameter_names``): in cross-device per-user uploads a user sends only the rows of the
items its pairs touched.

Deviations from RecBole:

* the loss is computed as ``-logsigmoid(d)`` (stable) instead of ``-log(1e-10 + sigmoid(d))``;
  they differ only where sigmoid(d) is below ~1e-8, i.e. d < -18;
* negatives are drawn by vectorised rejection sampling (a fixed number of redraw rounds for the
  whole batch, no Python loop); a draw still inside the user's row after every round (only for
  users who interacted with nearly every item) makes its example's loss exactly 0, as does a user
  with an empty row in ``user`` mode.
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
SAMPLINGS = ("interaction", "user", "all_pairs")


@dataclass
class BPRConfig:
    embedding_size: int = 64  # dimension of user and item embeddings
    sampling: str = "interaction"  # interaction: RecBole's epoch over interactions | user: per-user pairs
    n_samples_per_user: int = 8  # sampling=user (and DP-SGD, cross-device): pairs per user per step
    reg_weight: float = 0.0  # L2 weight on the embeddings of each sampled triple (RecBole: none)
    init_std: float | None = None  # null: xavier-normal (RecBole); else normal(0, init_std) (FedRecAttack: 0.01)

    def __post_init__(self) -> None:
        if int(self.embedding_size) < 1:
            raise ConfigError(f"model.embedding_size: must be >= 1, got {self.embedding_size}")
        if self.sampling not in SAMPLINGS:
            raise ConfigError(f"model.sampling: expected one of {SAMPLINGS}, got {self.sampling!r}")
        if int(self.n_samples_per_user) < 1:
            raise ConfigError(f"model.n_samples_per_user: must be >= 1, got {self.n_samples_per_user}")
        if float(self.reg_weight) < 0:
            raise ConfigError(f"model.reg_weight: must be >= 0, got {self.reg_weight}")
        if self.init_std is not None and not float(self.init_std) > 0:
            raise ConfigError(f"model.init_std: must be null or positive, got {self.init_std}")


class BPRMF(Recommender):
    """Matrix factorisation with the BPR loss; see the module docstring."""

    name = "bpr"

    def __init__(self, cfg: BPRConfig, shape: DataShape):
        super().__init__()
        self.cfg = cfg
        self.n_items = shape.n_items
        self.user_emb = nn.Embedding(shape.n_users, cfg.embedding_size)
        self.item_emb = nn.Embedding(shape.n_items, cfg.embedding_size)
        if cfg.init_std is None:
            nn.init.xavier_normal_(self.user_emb.weight)
            nn.init.xavier_normal_(self.item_emb.weight)
        else:
            nn.init.normal_(self.user_emb.weight, std=float(cfg.init_std))
            nn.init.normal_(self.item_emb.weight, std=float(cfg.init_std))

    @property
    def train_unit(self) -> str:
        return "user" if self.cfg.sampling == "all_pairs" else self.cfg.sampling

    @staticmethod
    def _all_positives(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``sampling=all_pairs``: (B, S) every positive of each row once (S = the batch's largest row,
        at least 1) and the (B, S) mask of real (not padding) entries."""
        pos_mask = x > 0
        counts = pos_mask.sum(1)
        s = max(1, int(counts.max())) if len(x) else 1
        pos = torch.sort(pos_mask.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :s]
        return pos, torch.arange(s, device=x.device)[None, :] < counts[:, None]

    # -------------------------------------------------------------- sampling
    @staticmethod
    def _negatives(x: torch.Tensor, s: int, draw) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, s) uniform item ids outside each row of ``x`` (> 0 = in the row) and the (B, s) mask of
        failed draws. ``draw(r)`` returns a fresh (B, s) uniform draw for round r (0 = the first draw).

        Only the drawn entries of ``x`` are read (no (B, n_items) mask is built): with interaction
        batches of 2048 rows that full comparison cost more than the rest of the step.
        """
        neg = draw(0)
        bad = x.gather(1, neg) > 0
        for r in range(_NEG_ROUNDS):
            if not bool(bad.any()):
                break
            neg = torch.where(bad, draw(r + 1), neg)
            bad = x.gather(1, neg) > 0
        return neg, bad

    def _sample_pairs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, S) positive ids, (B, S) negative ids, (B, S) bool mask of valid pairs."""
        b, n = x.shape
        if self.cfg.sampling == "all_pairs":
            pos, real = self._all_positives(x)
            neg, bad = self._negatives(x, pos.shape[1], lambda r: torch.randint(0, n, pos.shape, device=x.device))
            return pos, neg, real & ~bad
        s = int(self.cfg.n_samples_per_user)
        pos_mask = x > 0
        has_pos = pos_mask.any(dim=1)
        # multinomial needs a non-zero row: give empty rows a uniform dummy row, masked out below.
        w = torch.where(has_pos[:, None], pos_mask.float(), torch.ones_like(x, dtype=torch.float32))
        pos = torch.multinomial(w, s, replacement=True)
        neg, bad = self._negatives(x, s, lambda r: torch.randint(0, n, (b, s), device=x.device))
        return pos, neg, has_pos[:, None] & ~bad

    # -------------------------------------------------------------- interface
    def draw_randomness(self, batch: Batch, rnd) -> dict[str, torch.Tensor]:
        """Per-user pairs (cross-device): positives by inverse CDF over the user's row, negatives
        uniform with rejection rounds."""
        x = batch.x
        b, n = x.shape
        if self.cfg.sampling == "all_pairs":
            pos, real = self._all_positives(x)
            neg, bad = self._negatives(x, pos.shape[1], lambda r: rnd.randint(1 + r, pos.shape[1], n))
            return {"pos": pos, "neg": neg, "valid": (real & ~bad).float()}
        s = int(self.cfg.n_samples_per_user)
        pos_mask = x > 0
        has_pos = pos_mask.any(dim=1)
        w = torch.where(has_pos[:, None], pos_mask.float(), torch.ones_like(x, dtype=torch.float32))
        cdf = torch.cumsum(w, 1)
        u = rnd.uniform(0, s) * cdf[:, -1:]
        pos = torch.searchsorted(cdf, u, right=True).clamp(max=n - 1)
        neg, bad = self._negatives(x, s, lambda r: rnd.randint(1 + r, s, n))
        return {"pos": pos, "neg": neg, "valid": (has_pos[:, None] & ~bad).float()}

    def _pair_loss(self, u: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        """BPR loss (plus the optional L2 prior) of triples; ``u`` broadcasts against the item ids' shape."""
        ep, en = self._item_vectors(pos), self._item_vectors(neg)
        diff = (u * (ep - en)).sum(-1)  # s(u, i+) - s(u, i-)
        loss = -F.logsigmoid(diff)
        if self.cfg.reg_weight > 0:
            loss = loss + self.cfg.reg_weight * (u.pow(2).sum(-1) + ep.pow(2).sum(-1) + en.pow(2).sum(-1))
        return loss

    def loss(self, batch: Batch) -> torch.Tensor:
        """Per interaction when ``batch.items`` is set (one sampled negative each), else per user."""
        u = self._user_vectors(batch.users)  # (B, d)
        if batch.items is not None:
            with torch.no_grad():
                n = batch.x.shape[1]
                neg, bad = self._negatives(batch.x, 1, lambda r: torch.randint(0, n, (len(u), 1),
                                                                               device=batch.x.device))
            return self._pair_loss(u, batch.items, neg[:, 0]) * (~bad[:, 0]).to(u.dtype)
        if batch.rand is not None:
            pos, neg, valid = batch.rand["pos"], batch.rand["neg"], batch.rand["valid"]
        else:
            with torch.no_grad():
                pos, neg, valid = self._sample_pairs(batch.x)
        vf = valid.to(u.dtype)
        if self.cfg.sampling == "all_pairs":  # FedRecAttack's client loss: a sum, L2 once per user and per row
            ep, en = self._item_vectors(pos), self._item_vectors(neg)
            diff = (u[:, None, :] * (ep - en)).sum(-1)
            loss = (-F.logsigmoid(diff) * vf).sum(1)
            if self.cfg.reg_weight > 0:
                rows = ((ep.pow(2).sum(-1) + en.pow(2).sum(-1)) * vf).sum(1)
                loss = loss + 0.5 * self.cfg.reg_weight * (u.pow(2).sum(-1) * (vf.sum(1) > 0) + rows)
            return loss
        pair = self._pair_loss(u[:, None, :], pos, neg)  # (B, S)
        return (pair * vf).sum(1) / vf.sum(1).clamp(min=1.0)

    def scores(self, batch: Batch) -> torch.Tensor:
        return self._user_vectors(batch.users) @ self._item_vectors(None).T

    # The score is <user vector, item vector>; VBPR (fedrec/models/vbpr.py) extends both vectors.
    def _user_vectors(self, users: torch.Tensor) -> torch.Tensor:
        return self.user_emb(users)

    def _item_vectors(self, items: torch.Tensor | None) -> torch.Tensor:
        """The vectors of item ids ``items`` (any shape), or of every item for None."""
        return self.item_emb.weight if items is None else self.item_emb(items)

    def private_parameter_names(self) -> set[str]:
        return {"user_emb.weight"}

    def row_sparse_parameter_names(self) -> set[str]:
        # A user's pairs look up only its sampled positives and negatives (and the L2 prior touches
        # the same rows), so every other item row of its update is exactly zero.
        return {"item_emb.weight"}
