"""Pop: most-popular ranking, the floor every recommender must beat.

Score of item i for every user = the number of training users who interacted with i (RecBole's
``Pop``, github.com/RUCAIBox/RecBole ``recbole/model/general_recommender/pop.py``, which counts
training interactions per item; with binary interactions the two are the same). Evaluation masks the
user's own training items as for every model, so each user gets the most popular items they have not
seen. Training-free: ``fit(train)`` counts; no SGD, so it neither federates nor runs under DP-SGD
(see :mod:`fedrec.models.closed_form`). Deviation from RecBole: none in the ranking (RecBole
normalises counts by the maximum, which does not change the order).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from fedrec.models.base import Batch, DataShape
from fedrec.models.closed_form import ItemItemRecommender


@dataclass
class PopConfig:
    """Pop has no hyperparameters."""


class Pop(ItemItemRecommender):
    name = "pop"

    def __init__(self, cfg: PopConfig, shape: DataShape):
        super().__init__(cfg, shape)
        self.register_buffer("popularity", torch.zeros(0))  # (n_items,) training counts once fitted

    def fit(self, train: sp.csr_matrix) -> None:
        counts = np.asarray((train > 0).sum(axis=0), dtype=np.float32).ravel()
        self.popularity = torch.from_numpy(counts).to(self.popularity.device)

    def scores(self, batch: Batch) -> torch.Tensor:
        if self.popularity.numel() == 0:
            raise RuntimeError("model 'pop' is training-free: call fit(train) before scoring")
        return self.popularity[None, :].expand(len(batch.x), -1)
