"""CF-Diff (Hou, Park and Shin, "Collaborative Filtering Based on Diffusion Models: Unveiling the
Potential of High-Order Connectivity", SIGIR 2024, arXiv:2404.14240; survey section 3.1). Official
code: github.com/jackfrost168/CF_Diff (``main.py``, ``models/CAM_AE_multihops.py``, ``models/CAM_AE.py``,
``models/gaussian_diffusion.py``, ``data_preprocessing/data_preprocessing_item_2nd_hop.py``), read
line by line.

Algorithm as implemented (the official code's):

* **Diffusion**: DiffRec's (the official ``gaussian_diffusion.py`` is DiffRec's with the condition
  passed through): the shared core's :class:`GaussianDiffusion`, ``linear-var`` schedule with the
  first beta fixed to 1e-5, x0-prediction, SNR reweighting, importance-sampled timesteps; inference
  from the user's history through all T posterior means (``sampling_steps`` 0, no noise). The
  denoiser is called ``f(x_t, t, cond=c_u)`` in training and at every reverse step.
* **Multi-hop condition** c_u = [c2_u | c3_u] (two item vectors), built by :meth:`fit` from the
  training rows it is shown (R binary, N the users with a training row):
  - 2 hops, the official ``get_2hop_item_based``: c2_u[i] = R_ui deg(i) / N (each item of u carries
    the share of users reached through it; 0 elsewhere);
  - 3 hops: c3_u[j] = |{v != u : v shares an item with u, R_vj = 1}| / N, the share of u's 2-hop
    users who hold item j (the items u reaches in three hops, weighted by how many paths of
    distinct users reach them). The official 3-hop tensor (``multi_hop_inters_ML_1M.pt``) is only a
    Git LFS pointer in the repository and its construction is not in the code; this is a
    reconstruction from the paper's definition in the normalisation of the official 2-hop file.
* **Denoiser** CAM-AE (official ``CAM_AE_multihops``, ``hops: 3``; ``CAM_AE`` for ``hops: 2``):
  a shared encoder Linear(n_items, 512) maps x_t, c2 and c3 to 512 values, each concatenated with
  the timestep embedding (10 sinusoids [cos | sin] -> Linear(10, 10)) and lifted per coordinate
  to d = 16 (a Linear(1, 16) per hop): three sequences of 522 tokens. Two layers of cross-attention
  (4 heads; 2 for hops 2; attention dropout 0.5) with the 2-hop tokens as queries and the x_t
  tokens as keys and values, each followed by h <- drop(h + 0.15 normalize(drop(att))) (normalised
  over the token axis, as ``F.normalize``'s default dim=1 on (B, L, d)), a Linear(16, 16) and tanh
  between layers; the same layers again with the 3-hop tokens as queries, weight 0.5, from the
  x_t tokens; h = 0.9 h_2hop + 0.1 h_3hop, Linear(16, 1) per token, tanh, Linear(522, n_items).
  Input dropout 0.5 on the encoded x_t. ``hops: 2`` is ``CAM_AE``: one pass, h + att without the
  normalisation. torch's default initialisation as official.

Defaults (conf/model/cfdiff.yaml) are the official ``main.py`` ML-1M ones: T = 20, noise_scale
0.01, noise_min 0.001, noise_max 0.01, lr 1e-4, batch 128, AdamW, weight decay 0, 3 hops.

Deviations: the official encoder2, in_layers, out_layers, final_out, norm1 and norm2 layers are
built but never used by its forward; they are not built here (no output changes; fewer
parameters). Scores are computed in chunks of ``score_chunk`` users (the attention of 522 tokens
costs B x heads x 522^2 floats), and ``need_weights=False`` (the official discards the weights).
``torch.squeeze`` is ``squeeze(-1)`` (the official also squeezes a batch of one user). The
normaliser N is the number of users with a training row among those shown to ``fit`` (official:
every user of the dataset; equal when every user has a training interaction).

Federation and privacy: the condition of user u reads other users' rows (``couples_users``).
A silo node builds it from its own users' rows (``fit`` is shown only those: a node-local graph,
as LightGCN), and the server, which scores every user in server-side evaluation, from the whole
training matrix. Cross-device training (each user a client holding only its own row) and DP-SGD
(per-user clipping does not bound a user's influence on the other users' conditions) are refused
with one line (``fedrec.federated.validation``, ``fedrec.privacy.mechanisms``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from fedrec.errors import ConfigError
from fedrec.models.base import Batch, DataShape, Recommender
from fedrec.models.denoiser import timestep_embedding
from fedrec.models.diffrec import DiffusionConfig


def multi_hop_condition(train: sp.csr_matrix) -> np.ndarray:
    """[c2 | c3] (n_users, 2 n_items) float32 of the module docstring, from the binary training rows."""
    r = sp.csr_matrix((train > 0).astype(np.float32))
    n = max(int((np.diff(r.indptr) > 0).sum()), 1)
    deg = np.asarray(r.sum(axis=0)).ravel()
    c2 = r.multiply(deg[None, :] / n).toarray()
    shares = (r @ r.T).tocsr()
    shares.data[:] = 1.0
    shares.setdiag(0.0)
    shares.eliminate_zeros()
    c3 = np.asarray((shares @ r).todense()) / n
    return np.concatenate([c2, c3], axis=1).astype(np.float32)


class CAMAE(nn.Module):
    """The official cross-attention-guided multi-hop autoencoder (module docstring)."""

    def __init__(self, n_items: int, hops: int = 3, d_model: int = 16, num_heads: int = 4, num_layers: int = 2,
                 latent: int = 512, emb_size: int = 10, norm: bool = False, dropout: float = 0.5,
                 attn_dropout: float = 0.5, weights: tuple[float, float, float] = (0.15, 0.5, 0.9)):
        super().__init__()
        self.n_items, self.hops, self.norm, self.emb_size = n_items, hops, norm, emb_size
        self.w2, self.w3, self.mix = weights
        self.emb_layer = nn.Linear(emb_size, emb_size)
        self.encoder = nn.Linear(n_items, latent)
        self.decoder = nn.Linear(latent + emb_size, n_items)
        self.first_hop_embedding = nn.Linear(1, d_model)
        self.first_hop_decoding = nn.Linear(d_model, 1)
        self.second_hop_embedding = nn.Linear(1, d_model)
        if hops == 3:
            self.third_hop_embedding = nn.Linear(1, d_model)
        self.forward_layers = nn.ModuleList(nn.Linear(d_model, d_model) for _ in range(num_layers))
        self.attentions = nn.ModuleList(nn.MultiheadAttention(d_model, num_heads, dropout=attn_dropout, batch_first=True)
                                        for _ in range(num_layers))
        self.drop = nn.Dropout(dropout)
        self.drop1 = nn.Dropout(0.5)  # official: a fixed 0.5 on the attention output
        self.drop2 = nn.Dropout(dropout)

    def _tokens(self, v: torch.Tensor, emb: torch.Tensor, lift: nn.Linear) -> torch.Tensor:
        return lift(torch.cat([v, emb], dim=-1).unsqueeze(-1))  # (B, latent + emb, d_model)

    def _attend(self, query: torch.Tensor, h: torch.Tensor, weight: float, normalise: bool) -> torch.Tensor:
        last = len(self.attentions) - 1
        for i, (att, fwd) in enumerate(zip(self.attentions, self.forward_layers)):
            a = att(query, h, h, need_weights=False)[0]
            if normalise:
                a = F.normalize(a)  # official default dim=1: over the tokens of (B, L, d)
            h = self.drop2(h + weight * self.drop1(a))
            h = fwd(h)
            if i != last:
                h = torch.tanh(h)
        return h

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        n = self.n_items
        z = self.encoder(x)
        emb = self.emb_layer(timestep_embedding(t, self.emb_size).to(x.dtype))
        if self.norm:
            z = F.normalize(z)
        h = self._tokens(self.drop(z), emb, self.first_hop_embedding)
        q2 = self._tokens(self.encoder(cond[:, :n]), emb, self.second_hop_embedding)
        if self.hops == 2:
            h = self._attend(q2, h, 1.0, normalise=False)
        else:
            q3 = self._tokens(self.encoder(cond[:, n:]), emb, self.third_hop_embedding)
            h2 = self._attend(q2, h, self.w2, normalise=True)
            h3 = self._attend(q3, h, self.w3, normalise=True)
            h = self.mix * h2 + (1.0 - self.mix) * h3
        h = torch.tanh(self.first_hop_decoding(h).squeeze(-1))
        return self.decoder(h)


@dataclass
class CFDiffConfig(DiffusionConfig):
    steps: int = 20  # T (official ML-1M: 20)
    noise_scale: float = 0.01  # official ML-1M
    noise_min: float = 0.001
    noise_max: float = 0.01
    beta_fixed: bool = True  # official gaussian_diffusion.py default
    hops: int = 3  # 3: CAM_AE_multihops (2- and 3-hop queries, official default) | 2: CAM_AE
    d_model: int = 16  # token width d (official 16)
    num_heads: int = 4  # attention heads (official 4 for 3 hops, 2 for 2 hops)
    num_layers: int = 2  # cross-attention layers (official 2)
    latent: int = 512  # encoder width k (official dim_inters 512)
    emb_size: int = 10  # timestep embedding size (official 10)
    norm: bool = False  # L2-normalise the encoded input (official False)
    dropout: float = 0.5  # input / residual dropout (official 0.5)
    attn_dropout: float = 0.5  # attention dropout (official 0.5)
    score_chunk: int = 128  # users per denoiser call when scoring (memory of the 522-token attention)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.hops not in (2, 3):
            raise ConfigError(f"model.hops: expected 2 or 3, got {self.hops}")
        if self.d_model % self.num_heads:
            raise ConfigError(f"model.num_heads: must divide model.d_model {self.d_model}, got {self.num_heads}")
        if self.score_chunk < 1:
            raise ConfigError(f"model.score_chunk: must be >= 1, got {self.score_chunk}")


class CFDiff(Recommender):
    name = "cfdiff"
    couples_users = True  # the multi-hop condition reads other users' rows

    def __init__(self, cfg: CFDiffConfig, shape: DataShape):
        super().__init__()
        self.cfg = cfg
        self.n_users, self.n_items = shape.n_users, shape.n_items
        self.denoiser = CAMAE(shape.n_items, cfg.hops, cfg.d_model, cfg.num_heads, cfg.num_layers, cfg.latent,
                              cfg.emb_size, cfg.norm, cfg.dropout, cfg.attn_dropout)
        self.diffusion = cfg.build()
        self._cond: torch.Tensor | None = None  # fit()'s multi-hop condition; not a parameter, not aggregated

    def fit(self, train: sp.csr_matrix) -> None:
        if train.shape != (self.n_users, self.n_items):
            raise ConfigError(f"model.fit: training matrix {train.shape}, model ({self.n_users}, {self.n_items})")
        self._cond = torch.from_numpy(multi_hop_condition(train))

    def condition(self, batch: Batch) -> torch.Tensor:
        if self._cond is None:
            raise RuntimeError("model 'cfdiff' needs its multi-hop condition: call fit(train) before training or scoring")
        return self._cond[batch.users.cpu()].to(batch.x.device)

    def loss(self, batch: Batch) -> torch.Tensor:
        return self.diffusion.training_loss(self.denoiser, batch.x, cond=self.condition(batch))["loss"]

    def scores(self, batch: Batch) -> torch.Tensor:
        c, cond = self.cfg, self.condition(batch)
        k = int(c.score_chunk)
        parts = [self.diffusion.reverse(self.denoiser, batch.x[s:s + k], c.sampling_steps, c.inference_steps,
                                        c.sampling_noise, cond=cond[s:s + k])
                 for s in range(0, batch.x.shape[0], k)]
        return torch.cat(parts, 0)
