"""The dataset unit every other module consumes: implicit feedback split into train/valid/test.

Rows are users, columns items, both re-indexed to ``0..n-1``; ``user_ids``/``item_ids`` keep the
original tokens so a run can be traced back to the source files. Matrices are binary
``scipy.sparse.csr_matrix`` (float32) so a user's row is cheap to slice on any node.

Sequence models read ``train_seq`` / ``valid_seq`` instead: each user's train and valid items in
time order (:mod:`fedrec.data.sequences`), kept by every loader that splits an ordered
interaction list (``synthetic``, ``atomic`` and ``movielens`` unsplit files, ``sequence``); None for
sources used as given without an order (DiffRec's ``.npy`` splits, pre-split atomic files).

``injected`` marks users added by a data transform (:mod:`fedrec.data.transforms`, e.g. shilling
profiles from :mod:`attacks.shilling`): one bool per user, None when nobody was injected. Injected
users train and are partitioned like any other user, but no metric ever counts them
(:func:`fedrec.eval.metrics.evaluate_scores` drops them), so the mask travels with every row
selection (:meth:`Interactions.subset_users`, :meth:`Interactions.append_users`).

Explicit ratings (``dataset.ratings=true``, sources with a rating column): ``ratings`` holds, beside
the binary matrices, float32 CSR matrices ``{"train", "valid", "test"}`` with exactly their sparsity
and the rating of each pair (1..5 on MovieLens). A model that reads ratings declares
``input_values = "rating"`` (:class:`fedrec.models.base.Recommender`); every trainer and the
evaluation then feed it :meth:`Interactions.input_matrix` rows (ratings, 0 = unobserved) instead of
the binary ones, which every other model keeps reading; masks and ranking targets stay binary.
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
    # True for users a data transform injected (fake profiles); None = no injected user.
    injected: np.ndarray | None = None
    # Internal ids of the items an injecting attack promotes, recorded by it (attacks/shilling.py), so
    # that a later transform changing the genuine rows (a profile defense) cannot change which items
    # the target metrics follow; None = no such attack.
    attack_targets: np.ndarray | None = None
    # What data transforms measured while applying themselves (transform key -> a JSON-able report, e.g. a
    # profile defense's detection figures), so that any process holding the data can report them.
    transform_reports: dict = field(default_factory=dict)
    # Explicit ratings aligned with train/valid/test ({"train", "valid", "test"} -> float32 CSR of the same
    # sparsity); None when the dataset config did not ask for them (dataset.ratings) or the source has none.
    ratings: dict | None = None

    def input_matrix(self, values: str = "binary", split: str = "train") -> sp.csr_matrix:
        """The ``split`` rows a model reads: binary, or the ratings for ``values == "rating"``
        (:func:`input_rows` does the same for any object with the splits as attributes)."""
        if values == "binary":
            return getattr(self, split)
        if values != "rating":
            raise ValueError(f"unknown input values {values!r}; expected 'binary' or 'rating'")
        if self.ratings is None:
            raise ConfigError(f"dataset.ratings: the model reads explicit ratings, but dataset {self.name!r} was "
                              "loaded without them (set dataset.ratings=true on a source with a rating column)")
        return self.ratings[split]

    def __post_init__(self):
        if self.injected is not None:
            self.injected = np.asarray(self.injected, dtype=bool)
            if self.injected.shape != (self.n_users,):
                raise ValueError(f"Interactions.injected: expected one flag per user ({self.n_users}), "
                                 f"got shape {self.injected.shape}")

    @property
    def n_injected(self) -> int:
        return 0 if self.injected is None else int(self.injected.sum())

    def genuine(self, users: np.ndarray | None = None) -> np.ndarray:
        """``users`` (default: all) without the injected ones, order kept: the users a metric may count."""
        users = np.arange(self.n_users, dtype=np.int64) if users is None else np.asarray(users, dtype=np.int64)
        if self.injected is None:
            return users
        return users[~self.injected[users]]

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
            injected=None if self.injected is None else self.injected[users],
            attack_targets=self.attack_targets,
            transform_reports=dict(self.transform_reports),
            ratings=None if self.ratings is None else {k: m[users] for k, m in self.ratings.items()},
        )

    def append_users(self, train: sp.csr_matrix, user_ids: np.ndarray, *, injected: bool,
                     valid: sp.csr_matrix | None = None, test: sp.csr_matrix | None = None,
                     train_seq: Sequences | None = None) -> "Interactions":
        """A new ``Interactions`` with ``len(user_ids)`` users appended after the existing ones.

        ``train`` (and optionally ``valid``/``test``, else empty) are the new users' rows over the
        same catalogue; existing users keep their row indices, so anything indexed by them
        (partitions of the genuine users, private tables) stays valid. The new users' flag is
        ``injected``. Per-user features get the loaders' "missing" value for the new users (-1 for
        integer codes, NaN for floats, "" for text). A dataset with sequences needs ``train_seq``
        (the new users' training items in order); their valid sequences are the order of their
        valid items by item id (they have no timestamps). The timestamps of the new training
        entries are the latest genuine one: appended users arrive after the data was collected.
        """
        n_new = len(user_ids)
        empty = sp.csr_matrix((n_new, self.n_items), dtype=np.float32)
        valid = empty if valid is None else valid
        test = empty if test is None else test
        for name, m in (("train", train), ("valid", valid), ("test", test)):
            if m.shape != (n_new, self.n_items):
                raise ValueError(f"append_users: {name} rows have shape {m.shape}, expected {(n_new, self.n_items)}")
        clash = np.intersect1d(np.asarray(user_ids).astype(str), self.user_ids.astype(str))
        if len(clash):
            raise ValueError(f"append_users: user id {clash[0]!r} already exists")
        if self.train_seq is not None and (train_seq is None or len(train_seq.lengths) != n_new):
            raise ValueError(f"append_users: dataset {self.name!r} keeps sequences; the new users' training "
                             "sequences are required")
        flags = np.concatenate([self.injected if self.injected is not None else np.zeros(self.n_users, bool),
                                np.full(n_new, bool(injected))])

        def stack(a, b):
            return sp.csr_matrix(sp.vstack([a, b.astype(np.float32)], format="csr"), dtype=np.float32)

        def extend(key, v):
            if key.endswith("_vocab") or np.ndim(v) == 0 or len(v) != self.n_users:
                return v
            v = np.asarray(v)
            if np.issubdtype(v.dtype, np.integer):
                pad = np.full((n_new,) + v.shape[1:], -1, dtype=v.dtype)
            elif np.issubdtype(v.dtype, np.floating):
                pad = np.full((n_new,) + v.shape[1:], np.nan, dtype=v.dtype)
            else:
                pad = np.full((n_new,) + v.shape[1:], "", dtype=v.dtype)
            return np.concatenate([v, pad])

        ts = self.train_timestamps
        if ts is not None:
            latest = ts.max() if len(ts) else 0
            ts = np.concatenate([ts, np.full(int(train.nnz), latest, dtype=ts.dtype)])
        seq_new = None
        if self.valid_seq is not None:
            v = sp.csr_matrix(valid)
            seq_new = self.valid_seq.append(Sequences(v.indptr.astype(np.int64), v.indices.astype(np.int64)))
        return Interactions(
            name=self.name,
            train=stack(self.train, train), valid=stack(self.valid, valid), test=stack(self.test, test),
            user_ids=np.concatenate([self.user_ids.astype(str), np.asarray(user_ids).astype(str)]),  # no truncation
            item_ids=self.item_ids,
            user_features={k: extend(k, v) for k, v in self.user_features.items()},
            item_features=self.item_features, item_emb=self.item_emb, train_timestamps=ts,
            item_side=self.item_side,
            train_seq=None if self.train_seq is None else self.train_seq.append(train_seq),
            valid_seq=seq_new,
            injected=flags,
            attack_targets=self.attack_targets,
            transform_reports=dict(self.transform_reports),
            # the appended rows' own values are their ratings (a binary fake profile rates its items 1)
            ratings=None if self.ratings is None else {k: stack(self.ratings[k], m) for k, m in
                                                       (("train", train), ("valid", valid), ("test", test))},
        )

    def input_rows(self, weighting=None) -> sp.csr_matrix:
        """The training rows a model reads as its input: ``train`` itself for ``weighting=None``, else the
        float matrix of the same sparsity that ``weighting`` (a :mod:`fedrec.data.input_weights` spec,
        ``Recommender.input_weighting``) builds, once per data object and spec. ``train`` stays the
        binary interactions every mask, count and target reads."""
        if weighting is None:
            return self.train
        cache = self.__dict__.setdefault("_input_rows", {})  # not a field: a replaced/subset copy rebuilds it
        if weighting not in cache:
            rows = weighting.build(self)
            if rows.shape != self.train.shape or rows.nnz != self.train.nnz:
                raise ValueError(f"input weighting {weighting!r}: built {rows.shape} with {rows.nnz} entries for "
                                 f"a {self.train.shape} training matrix with {self.train.nnz}")
            cache[weighting] = rows
        return cache[weighting]

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
        """Sizes, plus the users and items that have no training interaction, and the injected users.

        Pre-split benchmark files can hold users who are only evaluated, and any split can leave
        items that are only ever ranked (all their interactions in valid/test); counting them
        puts that next to the results. ``users`` includes the ``injected_users`` (fake profiles a
        data transform added), which train but are never evaluated.
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
            "injected_users": self.n_injected,
        }


def input_rows(data, values: str = "binary", split: str = "train") -> sp.csr_matrix:
    """``data.input_matrix(values, split)``, or the binary ``split`` matrix of a plain data object (a test's
    stand-in) when ``values`` is "binary"."""
    return getattr(data, split) if values == "binary" else data.input_matrix(values, split)
