"""User partitioning over federated nodes: coverage, determinism, skew, and config errors."""

from __future__ import annotations

import numpy as np
import pytest
from omegaconf import OmegaConf

from fedrec.data import load_dataset, partition_from_cfg, partition_users, resolve_data_path
from fedrec.data.loaders import REPO_ROOT
from fedrec.data.partition import user_labels
from fedrec.errors import ConfigError, DataError

CONF = REPO_ROOT / "conf"


@pytest.fixture(scope="module")
def data():
    c = OmegaConf.merge(OmegaConf.load(CONF / "dataset" / "synthetic.yaml"),
                        {"n_users": 300, "n_items": 200, "mean_interactions": 20})
    return load_dataset(c, seed=0)


def check_cover(parts, n_users, num_nodes):
    assert len(parts) == num_nodes
    assert all(len(p) >= 1 for p in parts)
    for p in parts:
        assert p.dtype == np.int64 and (np.diff(p) > 0).all()
    allu = np.concatenate(parts)
    assert len(allu) == n_users and np.array_equal(np.sort(allu), np.arange(n_users))


@pytest.mark.parametrize("method,kw", [("iid", {}), ("dirichlet", {"alpha": 0.5}),
                                       ("dirichlet", {"alpha": 0.01}), ("attribute", {"attribute": "cluster"})])
def test_cover_and_determinism(data, method, kw):
    a = partition_users(data, method, 6, seed=1, **kw)
    b = partition_users(data, method, 6, seed=1, **kw)
    check_cover(a, data.n_users, 6)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    if method != "attribute":  # attribute is deterministic by design
        c = partition_users(data, method, 6, seed=2, **kw)
        assert any(not np.array_equal(x, y) for x, y in zip(a, c))


def test_iid_equal_sizes(data):
    sizes = [len(p) for p in partition_users(data, "iid", 7, seed=0)]
    assert max(sizes) - min(sizes) <= 1


def test_user_partition(data):
    parts = partition_users(data, "user", 0, seed=0)
    check_cover(parts, data.n_users, data.n_users)
    assert [p.tolist() for p in parts[:3]] == [[0], [1], [2]]
    assert len(partition_users(data, "user", None, seed=0)) == data.n_users


def skew(data, parts):
    """Size-weighted total-variation distance between node and global label distributions."""
    labels = user_labels(data)
    k = labels.max() + 1
    glob = np.bincount(labels, minlength=k) / len(labels)
    tv = [0.5 * np.abs(np.bincount(labels[p], minlength=k) / len(p) - glob).sum() * len(p) for p in parts]
    return sum(tv) / len(labels)


def test_dirichlet_alpha_controls_skew(data):
    low = np.mean([skew(data, partition_users(data, "dirichlet", 5, seed=s, alpha=0.05)) for s in range(3)])
    high = np.mean([skew(data, partition_users(data, "dirichlet", 5, seed=s, alpha=100.0)) for s in range(3)])
    assert low > high + 0.2


def test_labels_use_genre(data):
    labels = user_labels(data)
    assert labels.shape == (data.n_users,)
    # The synthetic cluster's home genre dominates each user's items, so labels track clusters.
    cl = data.user_features["cluster"]
    agree = sum(np.bincount(labels[cl == c]).max() for c in np.unique(cl)) / len(cl)
    assert agree > 0.8


def test_dirichlet_fallback_labels_without_features(data):
    bare = data.subset_users(np.arange(data.n_users))
    bare.item_features = {}
    bare.user_features = {}
    check_cover(partition_users(bare, "dirichlet", 4, seed=0, alpha=0.3), bare.n_users, 4)


def test_attribute_balances_groups(data):
    parts = partition_users(data, "attribute", 4, seed=0, attribute="cluster")
    cl = data.user_features["cluster"]
    # Whole groups: no cluster is split across nodes.
    node_of = np.empty(data.n_users, dtype=int)
    for n, p in enumerate(parts):
        node_of[p] = n
    for c in np.unique(cl):
        assert len(np.unique(node_of[cl == c])) == 1


def test_partition_from_cfg(data):
    for m in ("iid", "dirichlet"):
        check_cover(partition_from_cfg(data, OmegaConf.load(CONF / "partition" / f"{m}.yaml"), 3, 0), data.n_users, 3)
    check_cover(partition_from_cfg(data, OmegaConf.load(CONF / "partition" / "user.yaml"), 0, 0),
                data.n_users, data.n_users)
    c = OmegaConf.merge(OmegaConf.load(CONF / "partition" / "attribute.yaml"), {"attribute": "cluster"})
    check_cover(partition_from_cfg(data, c, 3, 0), data.n_users, 3)


def test_attribute_ml100k_occupation():
    c = OmegaConf.load(CONF / "dataset" / "ml-100k.yaml")
    try:
        folder = resolve_data_path(c)
    except DataError:
        folder = None
    if folder is None or not folder.is_dir():
        pytest.skip("ML-100K data not found (set FEDREC_DATA or provide ../shared/data/ml-100k)")
    d = load_dataset(c, seed=0)
    parts = partition_from_cfg(d, OmegaConf.load(CONF / "partition" / "attribute.yaml"), 10, 0)
    check_cover(parts, d.n_users, 10)
    occ = d.user_features["occupation"]
    for p in parts:  # each occupation lives on exactly one node
        others = np.setdiff1d(np.arange(d.n_users), p)
        assert not np.intersect1d(occ[p], occ[others]).size
    with pytest.raises(ConfigError, match=r"partition\.attribute='occupation'.*21 distinct values"):
        partition_users(d, "attribute", 22, 0, attribute="occupation")


@pytest.mark.parametrize("method,num_nodes,kw,match", [
    ("bogus", 3, {}, r"partition\.method='bogus'"),
    ("iid", 0, {}, r"num_nodes=0"),
    ("iid", 10_000, {}, r"num_nodes=10000"),
    ("dirichlet", 3, {"alpha": 0}, r"partition\.alpha"),
    ("dirichlet", 3, {"alpha": -1}, r"partition\.alpha"),
    ("attribute", 3, {}, r"partition\.attribute"),
    ("attribute", 3, {"attribute": "occupation"}, r"partition\.attribute='occupation'.*no such user feature"),
    ("attribute", 9, {"attribute": "cluster"}, r"partition\.attribute='cluster'.*fewer than num_nodes=9"),
    ("user", 5, {}, r"num_nodes=5.*one node per user"),
])
def test_bad_partition_config(data, method, num_nodes, kw, match):
    with pytest.raises(ConfigError, match=match):
        partition_users(data, method, num_nodes, 0, **kw)
