"""Data transforms: configured changes to the loaded interactions, identical in every process.

A transform (fake-user injection from :mod:`attacks.shilling`, later profile purification from a
defense) is the *data* hook of a mechanism: it runs inside dataset loading, on the server and on
every Flower node, and nothing but its parameters and the run's seed reaches it. Two processes must
therefore derive exactly the same data from (dataset config, seed, transforms) without exchanging
it, which is what the protocol asks for:

* ``key() -> str``: stable text naming the transform and *every* parameter that changes its
  output; a node's per-process dataset cache (:mod:`fedrec.federated.node`) is keyed by it, so two
  transforms with equal keys must give equal data;
* ``apply(data, seed) -> Interactions``: pure and deterministic given ``seed`` (draw only from
  streams seeded by the seed and a constant of the transform's own, never from global state), and
  it returns a new object: the input may be shared with a cache and must not change.

:func:`load_run_data` is the one way any process gets a run's data: :func:`~fedrec.data.loaders.load_dataset`
then each transform in order, each result checked by :func:`check_transformed` (shapes agree, the
catalogue is unchanged, sequences and the injected mask cover every user), so a faulty transform
fails at load with its key in the message instead of as a shape error inside training.
"""

from __future__ import annotations

from typing import Iterable, Protocol, Sequence, runtime_checkable

import numpy as np
import scipy.sparse as sp

from fedrec.data.interactions import Interactions
from fedrec.errors import DataError


@runtime_checkable
class DataTransform(Protocol):
    def key(self) -> str:
        """Stable text naming the transform and all its parameters (a cache key)."""
        ...

    def apply(self, data: Interactions, seed: int) -> Interactions:
        """A new ``Interactions``; the same for the same ``data`` and ``seed`` in any process."""
        ...


def transform_keys(transforms: Iterable[DataTransform]) -> tuple[str, ...]:
    """The keys of ``transforms`` in order (what a cache of transformed data is keyed by)."""
    keys = []
    for t in transforms:
        if not isinstance(t, DataTransform):
            raise TypeError(f"data transform {t!r}: needs key() and apply(data, seed)")
        k = t.key()
        if not isinstance(k, str) or not k:
            raise TypeError(f"data transform {t!r}: key() must return non-empty text, got {k!r}")
        keys.append(k)
    return tuple(keys)


def load_run_data(dataset_cfg, seed: int, transforms: Sequence[DataTransform] = ()) -> Interactions:
    """The run's data: ``load_dataset(dataset_cfg, seed)`` then every transform in order, checked."""
    from fedrec.data.loaders import load_dataset

    return apply_transforms(load_dataset(dataset_cfg, seed), seed, transforms)


def apply_transforms(data: Interactions, seed: int, transforms: Sequence[DataTransform] = ()) -> Interactions:
    """``data`` through ``transforms`` in order, each result checked by :func:`check_transformed`."""
    for key, t in zip(transform_keys(transforms), transforms):
        sizes = _sizes(data)  # to catch a transform that changed its input in place
        out = t.apply(data, int(seed))
        if _sizes(data) != sizes:
            raise DataError(f"data transform {key}: changed its input in place (transforms must return new data)")
        check_transformed(data, out, key)
        data = out
    return data


def _sizes(d: Interactions) -> tuple:
    return (d.train.shape, d.train.nnz, d.valid.nnz, d.test.nnz, len(d.user_ids), d.n_injected)


def check_transformed(before: Interactions, after: Interactions, key: str) -> None:
    """Reject a transform result whose parts disagree; ``key`` names the transform in the message."""
    where = f"data transform {key}"
    if not isinstance(after, Interactions):
        raise DataError(f"{where}: returned {type(after).__name__}, not Interactions")
    n_users, n_items = after.train.shape
    for name in ("train", "valid", "test"):
        m = getattr(after, name)
        if not sp.issparse(m) or m.format != "csr":
            raise DataError(f"{where}: {name} is not a CSR matrix")
        if m.shape != (n_users, n_items):
            raise DataError(f"{where}: {name} has shape {m.shape}, train has {(n_users, n_items)}")
        if m.nnz and not np.all(m.data == 1):
            raise DataError(f"{where}: {name} is not binary (implicit feedback: every stored value is 1)")
    # The catalogue is fixed: models, item side data and item-id metrics are sized by it.
    if n_items != before.n_items or len(after.item_ids) != n_items:
        raise DataError(f"{where}: changed the catalogue ({before.n_items} items -> {n_items}, "
                        f"{len(after.item_ids)} item ids); transforms may change users, not items")
    if len(after.user_ids) != n_users:
        raise DataError(f"{where}: {len(after.user_ids)} user ids for {n_users} users")
    if after.injected is not None and after.injected.shape != (n_users,):
        raise DataError(f"{where}: injected mask has shape {after.injected.shape}, expected ({n_users},)")
    # A user injected before stays injected: a later transform must not turn a fake user into one
    # that metrics count. Rows are matched by user id because a transform may reorder or drop users.
    if before.n_injected:
        was = {str(u) for u in before.user_ids[before.injected]}
        now_genuine = after.user_ids.astype(str)[~after.injected] if after.injected is not None \
            else after.user_ids.astype(str)
        lost = sorted(str(u) for u in was.intersection(now_genuine))
        if lost:
            raise DataError(f"{where}: user {lost[0]!r} was injected and is no longer marked (the mask must survive)")
    for k, v in after.user_features.items():
        if not k.endswith("_vocab") and np.ndim(v) >= 1 and len(v) != n_users:
            raise DataError(f"{where}: user feature {k!r} has {len(v)} rows for {n_users} users")
    if after.train_timestamps is not None and len(after.train_timestamps) != after.train.nnz:
        raise DataError(f"{where}: {len(after.train_timestamps)} training timestamps for {after.train.nnz} "
                        "training interactions")
    for name in ("train_seq", "valid_seq"):
        had, seq = getattr(before, name), getattr(after, name)
        if had is not None and seq is None:
            raise DataError(f"{where}: dropped the dataset's {name} (sequence models would lose their input)")
        if seq is not None and len(seq.lengths) != n_users:
            raise DataError(f"{where}: {name} covers {len(seq.lengths)} users, the data has {n_users}: "
                            "this transform does not support sequence data (it added users without sequences)")
