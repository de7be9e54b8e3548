"""Which users each federated (Flower) node hosts.

A node holds the complete histories of its users, so partitioning users is how the simulation
controls heterogeneity across nodes:

* ``iid``       -- a seeded random, equal-size split (the homogeneous baseline);
* ``dirichlet`` -- the standard FL label-skew recipe: each user gets a taste label (the argmax
  genre of the user's training items; else ``user_features["cluster"]``; else the most-used item
  id bucket), and every label's users are spread over nodes with Dirichlet(``alpha``)
  proportions -- small ``alpha`` gives nodes that each see few tastes;
* ``attribute`` -- natural groups from a user attribute (e.g. ML-100K ``occupation``), whole groups
  placed greedily on the least-loaded node (largest groups first) to balance node sizes;
* ``user``      -- one user per node (cross-device FL: every user is a client).

Injected users (``Interactions.injected``: fake profiles added by a data transform) are users like
any other here: ``iid`` and ``user`` treat them alike, ``dirichlet`` labels them by their own items
like everyone. ``attribute`` is the exception: injected users have no attribute of their own (the
transform gives them the "missing" value), so they do not form a group; the genuine users' groups
are placed exactly as without them, and the injected users are then dealt round-robin, in a seeded
order, over all nodes -- fake accounts spread over the organisations rather than all landing in
the node that hosts the "missing" group.

Every method returns ``num_nodes`` sorted, disjoint int64 arrays covering all users, and every node
gets at least one user.
"""

from __future__ import annotations

import numpy as np

from fedrec.data.interactions import Interactions
from fedrec.errors import ConfigError

PARTITION_METHODS = ("iid", "dirichlet", "attribute", "user")
N_ITEM_BUCKETS = 10  # label proxy granularity when a dataset has neither genres nor clusters


def user_labels(data: Interactions) -> np.ndarray:
    """One taste label per user (see module docstring for the fallbacks)."""
    genre = data.item_features.get("genre")
    if genre is not None and np.ndim(genre) == 2 and genre.shape[0] == data.n_items and genre.shape[1] > 0:
        counts = np.asarray(data.train @ np.asarray(genre, dtype=np.float32))
        return counts.argmax(axis=1).astype(np.int64)
    cluster = data.user_features.get("cluster")
    if cluster is not None and np.ndim(cluster) == 1 and len(cluster) == data.n_users:
        return np.asarray(cluster, dtype=np.int64)
    n_buckets = max(1, min(N_ITEM_BUCKETS, data.n_items))
    bucket = np.arange(data.n_items) * n_buckets // max(data.n_items, 1)
    onehot = np.zeros((data.n_items, n_buckets), dtype=np.float32)
    onehot[np.arange(data.n_items), bucket] = 1.0
    return np.asarray(data.train @ onehot).argmax(axis=1).astype(np.int64)


def _as_parts(node_of_user: np.ndarray, num_nodes: int) -> list[np.ndarray]:
    order = np.argsort(node_of_user, kind="stable")  # users ascending inside each node
    bounds = np.cumsum(np.bincount(node_of_user, minlength=num_nodes))[:-1]
    return [p.astype(np.int64) for p in np.split(order, bounds)]


def _dirichlet(labels: np.ndarray, num_nodes: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    n_users = len(labels)
    node = np.empty(n_users, dtype=np.int64)
    for label in np.unique(labels):  # a loop over labels (tens), not users
        members = rng.permutation(np.flatnonzero(labels == label))
        props = rng.dirichlet(np.full(num_nodes, alpha))
        cuts = np.round(np.cumsum(props)[:-1] * len(members)).astype(np.int64)
        node[members] = np.repeat(np.arange(num_nodes), np.diff(np.concatenate(([0], cuts, [len(members)]))))
    # Small alpha can leave nodes empty; a node must host someone, so move one random user from
    # the currently largest node into each empty one (possible because num_nodes <= n_users).
    sizes = np.bincount(node, minlength=num_nodes)
    for empty in np.flatnonzero(sizes == 0):
        donor = int(np.argmax(sizes))
        user = rng.choice(np.flatnonzero(node == donor))
        node[user] = empty
        sizes[donor] -= 1
        sizes[empty] += 1
    return node


def _attribute(values: np.ndarray, num_nodes: int, attribute: str, injected: np.ndarray | None = None,
               rng: np.random.Generator | None = None) -> np.ndarray:
    if injected is not None and injected.any():
        node = np.empty(len(values), dtype=np.int64)
        node[~injected] = _attribute(values[~injected], num_nodes, attribute)
        fakes = rng.permutation(np.flatnonzero(injected))
        node[fakes] = np.arange(len(fakes)) % num_nodes
        return node
    groups, inv = np.unique(values, return_inverse=True)
    if len(groups) < num_nodes:
        raise ConfigError(
            f"partition.attribute={attribute!r}: has {len(groups)} distinct values, fewer than num_nodes={num_nodes}"
        ) from None
    sizes = np.bincount(inv.reshape(-1))
    load = np.zeros(num_nodes, dtype=np.int64)
    node_of_group = np.empty(len(groups), dtype=np.int64)
    # Largest groups first onto the least-loaded node (LPT); ties by group order keep it deterministic.
    for g in np.argsort(-sizes, kind="stable"):
        n = int(np.argmin(load))
        node_of_group[g] = n
        load[n] += sizes[g]
    return node_of_group[inv.reshape(-1)]


def partition_users(data: Interactions, method: str, num_nodes: int | None, seed: int,
                    alpha: float = 0.5, attribute: str | None = None) -> list[np.ndarray]:
    """Split the users of ``data`` over ``num_nodes`` nodes; see the module docstring for methods."""
    n_users = data.n_users
    if method not in PARTITION_METHODS:
        raise ConfigError(
            f"partition.method={method!r}: unknown partition method (expected one of {', '.join(PARTITION_METHODS)})"
        ) from None
    if method == "user":
        if num_nodes in (None, 0):
            num_nodes = n_users
        if num_nodes != n_users:
            injected = getattr(data, "injected", None)
            n_fake = 0 if injected is None else int(np.sum(injected))
            fakes = f", {n_fake} of them injected" if n_fake else ""
            raise ConfigError(
                f"num_nodes={num_nodes}: partition.method=user needs one node per user "
                f"(num_nodes = {n_users}{fakes}, or 0)"
            ) from None
    if num_nodes is None or isinstance(num_nodes, bool) or int(num_nodes) != num_nodes:
        raise ConfigError(f"num_nodes={num_nodes!r}: expected an integer number of nodes") from None
    num_nodes = int(num_nodes)
    if not 1 <= num_nodes <= n_users:
        raise ConfigError(f"num_nodes={num_nodes}: must be between 1 and the number of users ({n_users})") from None
    rng = np.random.default_rng(seed)

    if method == "user":
        return [np.array([u], dtype=np.int64) for u in range(n_users)]
    if method == "iid":
        perm = rng.permutation(n_users)
        return [np.sort(p).astype(np.int64) for p in np.array_split(perm, num_nodes)]
    if method == "dirichlet":
        try:
            alpha = float(alpha)
        except (TypeError, ValueError):
            raise ConfigError(f"partition.alpha={alpha!r}: expected a positive number") from None
        if not alpha > 0 or not np.isfinite(alpha):
            raise ConfigError(f"partition.alpha={alpha}: must be a positive number") from None
        return _as_parts(_dirichlet(user_labels(data), num_nodes, alpha, rng), num_nodes)
    # attribute
    if not attribute:
        raise ConfigError("partition.attribute: required for partition.method=attribute (e.g. occupation)") from None
    values = data.user_features.get(attribute)
    if values is None or attribute.endswith("_vocab"):
        available = sorted(k for k in data.user_features if not k.endswith("_vocab"))
        raise ConfigError(
            f"partition.attribute={attribute!r}: dataset {data.name!r} has no such user feature (available: {available})"
        ) from None
    values = np.asarray(values)
    if values.ndim != 1 or len(values) != n_users:
        raise ConfigError(
            f"partition.attribute={attribute!r}: expected one value per user, got shape {values.shape}"
        ) from None
    return _as_parts(_attribute(values, num_nodes, attribute, getattr(data, "injected", None), rng), num_nodes)


def partition_from_cfg(data: Interactions, cfg_partition, num_nodes: int | None, seed: int) -> list[np.ndarray]:
    """:func:`partition_users` with ``method``/``alpha``/``attribute`` read from a ``conf/partition`` node."""

    from fedrec.data.options import get_option

    def get(key, default=None):
        return get_option(cfg_partition, key, default, where="partition")

    return partition_users(data, get("method"), num_nodes, seed, alpha=get("alpha", 0.5), attribute=get("attribute"))
