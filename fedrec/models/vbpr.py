"""VBPR: visually-aware BPR (He & McAuley, AAAI 2016, "VBPR: Visual Bayesian Personalized Ranking
from Implicit Feedback").

Score of user u for item i (the paper's eq. 2 without the global and user biases, which cancel in
every BPR pair):

    x_ui = gamma_u^T gamma_i  +  theta_u^T (E f_i)  +  beta_i  +  beta'^T f_i

gamma_u, gamma_i: latent factors (``embedding_size``); theta_u: the user's visual factors
(``visual_size``); E: the (visual_size x F) projection of the item's visual feature f_i; beta_i the
item bias; beta' the visual bias. Trained with BPR exactly as :class:`fedrec.models.bpr.BPRMF` (the same
sampling modes, negatives and loss): VBPR extends the user vector to [gamma_u, theta_u, 1] and the item
vector to [gamma_i, E f_i, beta_i + beta'^T f_i], so BPR-MF's code computes eq. 2.

Visual features f_i: the paper takes the 4096-d fc7 layer of a Caffe CNN pretrained on ImageNet.
**Deviation**: no pretrained weights can be downloaded here, so the extractor is a small *fixed*
random CNN (``extractor_channels`` 3x3 conv + ReLU layers, the first ones followed by 2x2 average
pooling, then an adaptive average pool to ``feature_pool`` x ``feature_pool``; Kaiming-normal weights
drawn from ``extractor_seed``, never trained, stored as buffers so that no optimiser or aggregation
touches them). Random conv features keep colour and texture statistics, which is what the synthetic
catalogue's genre look is made of (:func:`fedrec.data.side.genre_images`). Features are standardised
per dimension with the mean and std of the catalogue the model was built on (kept fixed afterwards,
so a changed image moves only its own feature). They are computed once from
``shape.item_side.images`` and recomputed for an item whose image changes
(:meth:`VBPR.set_item_images`; attacks and image purification go through
:func:`fedrec.mechanisms.install_item_images`). The extractor is differentiable
(:meth:`VBPR.visual_features`): white-box image attacks (IPDGI, image poisoning) backpropagate
through it, as they do through the public pretrained CNN in the papers.

Regularisation: ``reg_weight`` applies BPR-MF's L2 term to the extended vectors, i.e. to
gamma, theta, E f_i and the item's total bias; the paper regularises E and beta' themselves
(deviation: it keeps BPR-MF's one code path; off by default, as in RecBole's BPR).

Federation: gamma_u and theta_u are private (they never leave the client); gamma_i and beta_i are
row-sparse item tables; E and beta' are dense global parameters that every user's update touches.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedrec.errors import ConfigError
from fedrec.models.base import DataShape
from fedrec.models.bpr import BPRConfig, BPRMF


@dataclass
class VBPRConfig(BPRConfig):
    embedding_size: int = 32  # dimension of gamma_u, gamma_i (VBPR splits its factors: latent + visual)
    visual_size: int = 32  # dimension of theta_u and of E f_i
    extractor_channels: list = field(default_factory=lambda: [16, 32, 32])  # conv widths of the fixed CNN
    extractor_seed: int = 0  # seed of the fixed CNN's weights (public: attackers know the extractor)
    feature_pool: int = 2  # adaptive average pool size: F = last width x feature_pool^2

    def __post_init__(self) -> None:
        super().__post_init__()
        if int(self.visual_size) < 1:
            raise ConfigError(f"model.visual_size: must be >= 1, got {self.visual_size}")
        chans = list(self.extractor_channels)
        if not chans or any(int(c) < 1 for c in chans):
            raise ConfigError(f"model.extractor_channels: expected a non-empty list of positive widths, got {chans}")
        if int(self.feature_pool) < 1:
            raise ConfigError(f"model.feature_pool: must be >= 1, got {self.feature_pool}")


def check_visual_run(cfg, what: str, unsaved: str) -> None:
    """An image mechanism's config check: it needs ``model=vbpr`` and cannot resume (``unsaved`` is what
    its checkpoint would lack)."""
    if str(cfg.model.name) != "vbpr":
        raise ConfigError(f"{what}: needs a visually-aware recommender (model=vbpr), got model={cfg.model.name}")
    if cfg.get("resume"):
        raise ConfigError(f"{what}: resume=true is not supported ({unsaved} not checkpointed)")


class FixedCNN(nn.Module):
    """The fixed random feature extractor (see the module docstring); weights are buffers."""

    def __init__(self, channels: list[int], seed: int, pool: int, in_channels: int = 3):
        super().__init__()
        g = torch.Generator().manual_seed(int(seed))
        self.n_layers, self.pool = len(channels), int(pool)
        c_in = in_channels
        for k, c in enumerate(channels):
            w = torch.randn(int(c), c_in, 3, 3, generator=g) * np.sqrt(2.0 / (c_in * 9))  # Kaiming normal
            self.register_buffer(f"w{k}", w)
            c_in = int(c)
        self.out_dim = c_in * self.pool * self.pool

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h = images * 2.0 - 1.0  # [0, 1] pixels centred
        for k in range(self.n_layers):
            h = F.relu(F.conv2d(h, getattr(self, f"w{k}"), padding=1))
            if k < self.n_layers - 1 and min(h.shape[-2:]) >= 2 * self.pool:
                h = F.avg_pool2d(h, 2)
        return F.adaptive_avg_pool2d(h, self.pool).flatten(1)


class VBPR(BPRMF):
    """VBPR; see the module docstring."""

    name = "vbpr"

    def __init__(self, cfg: VBPRConfig, shape: DataShape):
        super().__init__(cfg, shape)
        if shape.item_side.images is None:
            raise ConfigError("model=vbpr: the dataset has no item images (set dataset.images=synthetic or a folder)")
        images = shape.item_side.all_images()
        if images.shape[0] != shape.n_items:
            raise ConfigError(f"model=vbpr: {images.shape[0]} item images for {shape.n_items} items")
        self.extractor = FixedCNN(list(cfg.extractor_channels), cfg.extractor_seed, cfg.feature_pool,
                                  in_channels=images.shape[1])
        with torch.no_grad():
            raw = torch.cat([self.extractor(images[s:s + 512]) for s in range(0, len(images), 512)])
        self.register_buffer("feature_mean", raw.mean(0))
        self.register_buffer("feature_std", raw.std(0).clamp(min=1e-6))
        self.register_buffer("item_features", (raw - self.feature_mean) / self.feature_std)
        v, f_dim = int(cfg.visual_size), self.extractor.out_dim
        self.user_visual = nn.Embedding(shape.n_users, v)  # theta_u
        self.visual_proj = nn.Parameter(torch.empty(v, f_dim))  # E
        self.visual_bias = nn.Parameter(torch.zeros(f_dim))  # beta'
        self.item_bias = nn.Embedding(shape.n_items, 1)  # beta_i
        nn.init.zeros_(self.item_bias.weight)
        if cfg.init_std is None:
            nn.init.xavier_normal_(self.user_visual.weight)
            nn.init.xavier_normal_(self.visual_proj)
        else:
            nn.init.normal_(self.user_visual.weight, std=float(cfg.init_std))
            nn.init.normal_(self.visual_proj, std=float(cfg.init_std))

    # -------------------------------------------------------------- visual features
    def visual_features(self, images: torch.Tensor) -> torch.Tensor:
        """Standardised features f of (B, C, H, W) images in [0, 1]; differentiable in the images."""
        return (self.extractor(images) - self.feature_mean) / self.feature_std

    @torch.no_grad()
    def set_item_images(self, items, images: torch.Tensor) -> None:
        """Recompute the features of ``items`` from their new images."""
        idx = torch.as_tensor(np.atleast_1d(np.asarray(items)), dtype=torch.long, device=self.item_features.device)
        self.item_features[idx] = self.visual_features(images.to(self.item_features.device).float())

    def visual_scores(self, features: torch.Tensor, users: torch.Tensor | None = None) -> torch.Tensor:
        """(n_users or B, n) visual part theta_u^T E f + beta'^T f of items with ``features`` (n, F)."""
        theta = self.user_visual.weight if users is None else self.user_visual(users)
        return theta @ (features @ self.visual_proj.T).T + (features @ self.visual_bias)[None, :]

    # -------------------------------------------------------------- BPR's vectors, extended
    def _user_vectors(self, users: torch.Tensor) -> torch.Tensor:
        gamma, theta = self.user_emb(users), self.user_visual(users)
        return torch.cat([gamma, theta, torch.ones_like(gamma[..., :1])], -1)

    def _item_vectors(self, items: torch.Tensor | None) -> torch.Tensor:
        feats = self.item_features if items is None else self.item_features[items]
        gamma = self.item_emb.weight if items is None else self.item_emb(items)
        bias = (self.item_bias.weight if items is None else self.item_bias(items)).squeeze(-1)
        return torch.cat([gamma, feats @ self.visual_proj.T, (bias + feats @ self.visual_bias)[..., None]], -1)

    def private_parameter_names(self) -> set[str]:
        return {"user_emb.weight", "user_visual.weight"}

    def row_sparse_parameter_names(self) -> set[str]:
        return {"item_emb.weight", "item_bias.weight"}
