"""The dataset unit every other module consumes: implicit feedback split into train/valid/test.

Rows are users, columns items, both re-indexed to ``0..n-1``; ``user_ids``/``item_ids`` keep the
original tokens so a run can be traced back to the source files. Matrices are binary
``scipy.sparse.csr_matrix`` (float32) so a user's row is cheap to slice on any node.

Sequence models read ``train_seq`` / ``valid_seq`` instead: each user's train and valid items in
time order (:mod:`fedrec.data.sequences`), kept by every loader that splits an ordered
interaction list (``synthetic``, ``atomic`` and ``movielens`` unsplit files, ``sequence``); None for
sources used as given without an order (DiffRec's ``.npy`` splits, pre-split atomic files).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from fedrec.data.side import ItemSideData
from fedrec.data.sequences import Sequences
from fedrec.errors import ConfigError


@dataclass
class Interactions:
    name: str
    train: sp.csr_matrix
    valid: sp.csr_matrix
    test: sp.csr_matrix
    user_ids: np.ndarray  # original user tokens, index = internal user id
    item_ids: np.ndarray  # original item tokens, index = internal item id
    # Side information. Keys are free-form (e.g. "genre" multi-hot, "occupation" codes).
    user_features: dict[str, np.ndarray] = field(default_factory=dict)
    item_features: dict[str, np.ndarray] = field(default_factory=dict)
    # Pretrained item embeddings (L-DiffRec clusters items with them); None when absent.
    item_emb: np.ndarray | None = None
    # Timestamp of each stored training interaction, aligned with ``train.data`` (CSR order).
    train_timestamps: np.ndarray | None = None
    # Public item side data (categories, embeddings, images, public graph): fedrec.data.side.
    item_side: ItemSideData = field(default_factory=ItemSideData)
    # Each user's train / valid items in time order; None when the source has no order.
    train_seq: Sequences | None = None
    valid_seq: Sequences | None = None

    @property
    def n_users(self) -> int:
        return self.train.shape[0]

    @property
    def n_items(self) -> int:
        return self.train.shape[1]

    def subset_users(self, users: np.ndarray) -> "Interactions":
        """The same catalogue restricted to ``users`` (rows keep their order in ``users``)."""
        users = np.asarray(users, dtype=np.int64)
        return Interactions(
            name=self.name,
            train=self.train[users],
            valid=self.valid[users],
            test=self.test[users],
            user_ids=self.user_ids[users],
            item_ids=self.item_ids,
            user_features={k: (v if k.endswith("_vocab") else v[users]) for k, v in self.user_features.items()},
            item_features=self.item_features,
            item_emb=self.item_emb,
            train_timestamps=None,
            item_side=self.item_side,
            train_seq=None if self.train_seq is None else self.train_seq.subset(users),
            valid_seq=None if self.valid_seq is None else self.valid_seq.subset(users),
        )

    def input_sequences(self, split: str) -> Sequences:
        """What a sequence model reads to predict ``split``'s items: the training sequence for
        "train" and "valid", the training sequence followed by the valid items for "test"."""
        if self.train_seq is None or self.valid_seq is None:
            raise ConfigError(f"model: a sequence model needs time-ordered interactions, but dataset "
                              f"{self.name!r} has none (its splits are used as given without an order)")
        if split == "test":
            if getattr(self, "_test_input", None) is None:
                self._test_input = self.train_seq.then(self.valid_seq)
            return self._test_input
        return self.train_seq

    def summary(self) -> dict:
        """Sizes, plus the users and items that have no training interaction.

        Pre-split benchmark files can hold users who are only evaluated, and any split can leave
        items that are only ever ranked (all their interactions in valid/test); counting them
        puts that next to the results.
        """
        return {
            "dataset": self.name,
            "users": self.n_users,
            "items": self.n_items,
            "train": int(self.train.nnz),
            "valid": int(self.valid.nnz),
            "test": int(self.test.nnz),
            "users_without_train": int((np.diff(self.train.indptr) == 0).sum()),
            "items_without_train": int(self.n_items - len(np.unique(self.train.indices))),
        }
