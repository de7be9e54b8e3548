"""SASRec-lite: a small self-attentive next-item model (Kang & McAuley, "Self-Attentive Sequential
Recommendation", ICDM 2018), the framework's sequence baseline.

Input: ``Batch.seq`` (B, L), the user's last ``max_len`` items left-padded with the pad id
``n_items`` (:mod:`fedrec.data.sequences`). Item embeddings (scaled by sqrt(d)) plus learned
positional embeddings, dropout, ``n_blocks`` pre-LayerNorm blocks of causal multi-head
self-attention and a ReLU feed-forward layer with residuals, a final LayerNorm. The hidden state at
position t scores every item by a dot product with the (shared) item embeddings.

Training (one example = one user, so DP-SGD clipping and cross-device vmap see users): position t
predicts item t+1 of the same sequence; the per-user loss is the mean full-softmax cross-entropy
over the user's predicted positions (0 for a one-item sequence). Scoring uses the last position.

Deviations from the paper, stated: full softmax cross-entropy over all items instead of one sampled
negative with binary cross-entropy (RecBole's ``loss_type=CE``, which is stronger at full ranking);
pre-LN blocks as in the official code, default 1 block and 1 head ("lite"); dropout masks can be
given explicitly (``draw_randomness``) so a user's step is the same alone or vmapped. Attention is
written out (no ``nn.MultiheadAttention``) so ``torch.func.vmap`` batches it. All parameters are
global (item and position tables, blocks); nothing is private.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedrec.errors import ConfigError
from fedrec.models.base import Batch, DataShape, Recommender


@dataclass
class SASRecConfig:
    hidden_dim: int = 64  # embedding / hidden size d
    max_len: int = 50  # items of the user's most recent history the model reads
    n_blocks: int = 1  # self-attention blocks
    n_heads: int = 1  # attention heads (must divide hidden_dim)
    dropout: float = 0.2  # dropout on embeddings, attention output and feed-forward (training only)

    def __post_init__(self) -> None:
        for key in ("hidden_dim", "max_len", "n_blocks", "n_heads"):
            if int(getattr(self, key)) < 1:
                raise ConfigError(f"model.{key}: must be >= 1, got {getattr(self, key)}")
        if int(self.max_len) < 2:
            raise ConfigError(f"model.max_len: must be >= 2 (one input and one target), got {self.max_len}")
        if int(self.hidden_dim) % int(self.n_heads):
            raise ConfigError(f"model.n_heads: {self.n_heads} does not divide model.hidden_dim={self.hidden_dim}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ConfigError(f"model.dropout: must be in [0, 1), got {self.dropout}")


class _Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.ff1, self.ff2 = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, h, allowed, drop):
        b, n, d = h.shape
        q, k, v = self.qkv(self.ln1(h)).view(b, n, 3, self.heads, d // self.heads).unbind(2)
        att = torch.einsum("bqhe,bkhe->bhqk", q, k) / math.sqrt(d // self.heads)
        att = att.masked_fill(~allowed.unsqueeze(1), float("-inf")).softmax(-1)
        h = h + drop(self.out(torch.einsum("bhqk,bkhe->bqhe", att, v).reshape(b, n, d)), 0)
        return h + drop(self.ff2(F.relu(self.ff1(self.ln2(h)))), 1)


class SASRecLite(Recommender):
    """SASRec-lite; see the module docstring."""

    name = "sasrec_lite"
    input_kind = "sequence"

    def __init__(self, cfg: SASRecConfig, shape: DataShape):
        super().__init__()
        self.cfg = cfg
        self.n_items = shape.n_items
        self.max_len = int(cfg.max_len)
        d = int(cfg.hidden_dim)
        self.item_emb = nn.Embedding(self.n_items + 1, d, padding_idx=self.n_items)  # last row: pad
        self.pos_emb = nn.Embedding(self.max_len, d)
        nn.init.normal_(self.item_emb.weight, 0.0, d ** -0.5)
        with torch.no_grad():
            self.item_emb.weight[self.n_items].zero_()
        self.blocks = nn.ModuleList(_Block(d, int(cfg.n_heads)) for _ in range(int(cfg.n_blocks)))
        self.ln = nn.LayerNorm(d)

    # Dropout sites: the embeddings, then two per block (attention output, feed-forward output).
    def _n_sites(self) -> int:
        return 1 + 2 * len(self.blocks)

    def hidden(self, seq: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L, d) hidden states; ``keep`` (B, sites, L, d) explicit inverted-dropout masks."""
        b, n = seq.shape
        real = seq != self.n_items
        d = self.item_emb.embedding_dim
        p = float(self.cfg.dropout)

        def drop(x, site):
            if keep is not None:
                return x * keep[:, site]
            return F.dropout(x, p, self.training)

        pos = torch.arange(self.max_len - n, self.max_len, device=seq.device)  # right-aligned positions
        h = drop(self.item_emb(seq) * math.sqrt(d) + self.pos_emb(pos), 0) * real.unsqueeze(-1)
        # causal, real keys only; every query may see itself so padded rows stay finite
        causal = torch.ones(n, n, dtype=torch.bool, device=seq.device).tril()
        allowed = (causal & real.unsqueeze(1)) | torch.eye(n, dtype=torch.bool, device=seq.device)
        for i, block in enumerate(self.blocks):
            h = block(h, allowed, lambda x, j, i=i: drop(x, 1 + 2 * i + j)) * real.unsqueeze(-1)
        return self.ln(h)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return h @ self.item_emb.weight[: self.n_items].T

    def loss(self, batch: Batch) -> torch.Tensor:
        seq = batch.seq
        keep = None if batch.rand is None else batch.rand["keep"]
        h = self.hidden(seq[:, :-1], None if keep is None else keep[:, :, :-1])
        target = seq[:, 1:]
        # a position counts when both its input and its target are real items
        valid = (target != self.n_items) & (seq[:, :-1] != self.n_items)
        if keep is None:
            # Full-catalogue logits only at real positions: short histories are mostly padding
            # (Beauty: ~7 of 49 positions), and the logits are the whole cost.
            b_idx, t_idx = valid.nonzero(as_tuple=True)
            ce = F.cross_entropy(self._logits(h[b_idx, t_idx]), target[b_idx, t_idx], reduction="none")
            total = torch.zeros(seq.shape[0], dtype=ce.dtype, device=ce.device).index_add(0, b_idx, ce)
        else:
            # Explicit draws come from cross-device training, whose per-user function is vmapped and
            # needs static shapes: every position, padding weighted 0. Same value as above.
            ce = F.cross_entropy(self._logits(h).transpose(1, 2), target.clamp(max=self.n_items - 1),
                                 reduction="none")
            total = (ce * valid).sum(1)
        return total / valid.sum(1).clamp(min=1)

    def draw_randomness(self, batch: Batch, rnd) -> dict[str, torch.Tensor]:
        b, n = batch.seq.shape
        d = self.item_emb.embedding_dim
        keep = rnd.keep_mask(0, self._n_sites() * n * d, float(self.cfg.dropout))
        return {"keep": keep.view(b, self._n_sites(), n, d)}

    def scores(self, batch: Batch) -> torch.Tensor:
        return self._logits(self.hidden(batch.seq)[:, -1])
