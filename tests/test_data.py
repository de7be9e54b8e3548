"""Data layer: synthetic generator, splitters, file loaders, and one test per kind of bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from fedrec.data import generate_synthetic, load_dataset, resolve_data_path, split_interactions
from fedrec.data.loaders import REPO_ROOT
from fedrec.data.splits import ratio_counts
from fedrec.errors import ConfigError, DataError

CONF = REPO_ROOT / "conf" / "dataset"
SHARED = REPO_ROOT.parent / "shared" / "data"


def cfg(**kw):
    base = {
        "name": "toy", "kind": "atomic", "path": None, "subdir": None, "rating_threshold": None,
        "min_user_interactions": 1, "split": {"method": "ratio", "ratios": [0.8, 0.1, 0.1]},
    }
    split = kw.pop("split", {})
    base.update(kw)
    base["split"] = {**base["split"], **split}
    return OmegaConf.create(base)


def synth_cfg(**kw):
    c = OmegaConf.load(CONF / "synthetic.yaml")
    return OmegaConf.merge(c, kw)


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def dense(m):
    return m.toarray().astype(int)


# --------------------------------------------------------------------------- synthetic


def test_synthetic_deterministic_and_shapes():
    c = synth_cfg(n_users=200, n_items=150, n_clusters=5, mean_interactions=20)
    a, b = load_dataset(c, seed=3), load_dataset(c, seed=3)
    other = load_dataset(c, seed=4)
    for x, y in ((a.train, b.train), (a.valid, b.valid), (a.test, b.test)):
        assert (x != y).nnz == 0
    np.testing.assert_array_equal(a.train_timestamps, b.train_timestamps)
    assert (a.train != other.train).nnz > 0
    assert a.n_users == 200 and a.n_items <= 150
    for m in (a.train, a.valid, a.test):
        assert m.shape == (a.n_users, a.n_items) and m.dtype == np.float32 and m.format == "csr"
    assert a.item_features["genre"].shape == (a.n_items, 18)
    assert a.user_features["cluster"].shape == (a.n_users,)
    assert len(a.user_ids) == a.n_users and len(a.item_ids) == a.n_items
    assert a.train_timestamps.shape == (a.train.nnz,)


def test_synthetic_structure():
    raw = generate_synthetic(synth_cfg(), seed=0)
    genres = raw.item_genre.sum(axis=1)
    assert genres.min() >= 1 and genres.max() <= 3
    # Timestamps strictly increase within each user (rows are grouped by user).
    same_user = raw.users[1:] == raw.users[:-1]
    assert (np.diff(raw.timestamps)[same_user] > 0).all()
    # Power-law popularity: top 10% of items hold far more than 10% of interactions.
    counts = np.sort(np.bincount(raw.items, minlength=raw.n_items))[::-1]
    assert counts[: raw.n_items // 10].sum() / counts.sum() > 0.25
    # Cluster structure: far more of a user's items come from the user's cluster than chance (1/8).
    same = raw.item_cluster[raw.items] == raw.user_cluster[raw.users]
    assert same.mean() > 0.5
    per_user = np.bincount(raw.users, minlength=raw.n_users)
    assert per_user.min() >= 5 and 25 < per_user.mean() < 50


def test_synthetic_is_vectorised_fast():
    import time

    t = time.perf_counter()
    d = load_dataset(synth_cfg(n_users=10000, n_items=2000), seed=0)
    assert d.n_users == 10000
    assert time.perf_counter() - t < 5


def test_synthetic_bad_config():
    with pytest.raises(ConfigError, match=r"dataset\.n_users"):
        load_dataset(synth_cfg(n_users=-5), 0)
    with pytest.raises(ConfigError, match=r"dataset\.cluster_strength"):
        load_dataset(synth_cfg(cluster_strength=1.5), 0)
    with pytest.raises(ConfigError, match=r"dataset\.popularity_exponent"):
        load_dataset(synth_cfg(popularity_exponent=-1), 0)


# --------------------------------------------------------------------------- splits


def random_interactions(n_users=60, n_items=50, seed=0):
    rng = np.random.default_rng(seed)
    n = rng.integers(1, 30, size=n_users)
    users = np.repeat(np.arange(n_users), n)
    items = rng.integers(n_items, size=len(users))
    ts = rng.permutation(len(users)).astype(float) * 10  # distinct times
    return users, items, ts, n_users, n_items


def unique_pairs(users, items):
    return {(int(u), int(i)) for u, i in zip(users, items)}


def pairs(m):
    c = m.tocoo()
    return set(zip(c.row.tolist(), c.col.tolist()))


@pytest.mark.parametrize("method", ["ratio", "temporal", "temporal_global", "loo"])
def test_split_invariants(method):
    users, items, ts, nu, ni = random_interactions()
    s = split_interactions(users, items, ts, nu, ni, method, [0.8, 0.1, 0.1], seed=1)
    tr, va, te = pairs(s.train), pairs(s.valid), pairs(s.test)
    assert not (tr & va) and not (tr & te) and not (va & te)
    for m in (s.train, s.valid, s.test):
        assert m.shape == (len(s.kept_users), ni) and m.dtype == np.float32
        assert (m.data == 1).all()
    kept = set(s.kept_users.tolist())
    expected = {(int(np.searchsorted(s.kept_users, u)), i) for u, i in unique_pairs(users, items) if u in kept}
    assert tr | va | te == expected
    # Every kept user has training data.
    assert (np.diff(s.train.indptr) > 0).all()
    # train_timestamps aligned with CSR order: each stored entry's time is that pair's earliest time.
    first = {}
    for u, i, t in zip(users, items, ts):
        first[(int(u), int(i))] = min(first.get((int(u), int(i)), np.inf), t)
    c = s.train.tocoo()
    got = [first[(int(s.kept_users[r]), int(col))] for r, col in zip(c.row, c.col)]
    np.testing.assert_array_equal(s.train_timestamps, got)


def test_ratio_split_proportions_and_seed():
    users, items, ts, nu, ni = random_interactions(n_users=300, n_items=200)
    a = split_interactions(users, items, None, nu, ni, "ratio", [0.7, 0.2, 0.1], seed=0)
    b = split_interactions(users, items, None, nu, ni, "ratio", [0.7, 0.2, 0.1], seed=0)
    c = split_interactions(users, items, None, nu, ni, "ratio", [0.7, 0.2, 0.1], seed=1)
    assert (a.test != b.test).nnz == 0 and (a.test != c.test).nnz > 0
    total = a.train.nnz + a.valid.nnz + a.test.nnz
    assert abs(a.train.nnz / total - 0.7) < 0.05
    assert abs(a.valid.nnz / total - 0.2) < 0.05
    assert abs(a.test.nnz / total - 0.1) < 0.05
    assert a.train_timestamps is None


def test_ratio_counts_small_users():
    n = np.arange(1, 12)
    tr, va, te = ratio_counts(n, (0.8, 0.1, 0.1))
    assert (tr + va + te == n).all()
    assert (tr >= 1).all()
    assert tr[2] == 1 and va[2] == 1 and te[2] == 1  # n = 3: one each
    assert (tr[9], va[9], te[9]) == (8, 1, 1)  # n = 10


def recbole_counts(tot, ratios):
    """RecBole 1.2's ``Dataset._calcu_split_ids`` as counts, one user at a time (the reference)."""
    ratios = [r / sum(ratios) for r in ratios]
    cnt = [int(r * tot) for r in ratios]
    cnt[0] = tot - sum(cnt[1:])
    for i in range(1, len(ratios)):
        if cnt[0] <= 1:
            break
        if 0 < ratios[-i] * tot < 1:
            cnt[-i] += 1
            cnt[0] -= 1
    return tuple(cnt)


@pytest.mark.parametrize("ratios", [(0.8, 0.1, 0.1), (0.7, 0.2, 0.1), (0.6, 0.2, 0.2), (0.7, 0.01, 0.29),
                                    (0.98, 0.01, 0.01), (0.9, 0.0, 0.1)])
def test_ratio_counts_match_recbole(ratios):
    n = np.arange(1, 400)
    got = np.stack(ratio_counts(n, ratios), axis=1)
    np.testing.assert_array_equal(got, [recbole_counts(int(k), ratios) for k in n])


def test_ratio_counts_truncate_like_recbole():
    # 0.29 * 100 is 28.999999999999996 in floats; RecBole's int() keeps 28 test items.
    assert [int(c[0]) for c in ratio_counts([100], (0.7, 0.01, 0.29))] == [71, 1, 28]


def first_times(users, items, ts):
    """Earliest time of each unique (user, item) pair, and that row's index (the tie-break)."""
    first = {}
    for row, (u, i, t) in enumerate(zip(users, items, ts)):
        key = (int(u), int(i))
        if key not in first or t < first[key][0]:
            first[key] = (t, row)
    return first


def user_timeline(first, u):
    """User ``u``'s items, earliest first; equal times in input-row order."""
    mine = {i: v for (uu, i), v in first.items() if uu == u}
    return sorted(mine, key=mine.get)


def test_loo_latest_is_test():
    users, items, ts, nu, ni = random_interactions()
    ts = np.floor(ts / 50)  # many equal timestamps: the tie-break matters
    s = split_interactions(users, items, ts, nu, ni, "loo", [0.8, 0.1, 0.1], seed=0)
    first = first_times(users, items, ts)
    sizes = set()
    for u in range(nu):
        ranked = user_timeline(first, u)
        sizes.add(min(len(ranked), 3))
        n_valid = 1 if len(ranked) >= 3 else 0
        n_test = 1 if len(ranked) >= 2 else 0
        assert s.test[u].indices.tolist() == ranked[len(ranked) - n_test:]
        assert s.valid[u].indices.tolist() == ranked[len(ranked) - n_test - n_valid:len(ranked) - n_test]
        assert sorted(s.train[u].indices.tolist()) == sorted(ranked[:len(ranked) - n_test - n_valid])
    assert sizes == {1, 2, 3}  # the data has users of each kind


def test_loo_small_users_like_recbole():
    # Users with 1, 2, 3 interactions; user 2's last two share a time: row order breaks the tie.
    users = np.array([0, 1, 1, 2, 2, 2])
    items = np.array([0, 1, 0, 2, 0, 1])
    ts = np.array([5.0, 2.0, 1.0, 1.0, 3.0, 3.0])
    s = split_interactions(users, items, ts, 3, 3, "loo", [0.8, 0.1, 0.1], seed=0)
    assert dense(s.train).tolist() == [[1, 0, 0], [1, 0, 0], [0, 0, 1]]
    assert dense(s.valid).tolist() == [[0, 0, 0], [0, 0, 0], [1, 0, 0]]
    assert dense(s.test).tolist() == [[0, 0, 0], [0, 1, 0], [0, 1, 0]]


def test_temporal_is_per_user_chronological():
    users, items, ts, nu, ni = random_interactions(n_users=80)
    ts = np.floor(ts / 50)  # many equal timestamps
    s = split_interactions(users, items, ts, nu, ni, "temporal", [0.8, 0.1, 0.1], seed=0)
    assert s.kept_users.tolist() == list(range(nu))
    first = first_times(users, items, ts)
    for u in range(nu):
        ranked = user_timeline(first, u)
        n_tr, n_va, n_te = recbole_counts(len(ranked), [0.8, 0.1, 0.1])
        assert sorted(s.train[u].indices.tolist()) == sorted(ranked[:n_tr])
        assert sorted(s.valid[u].indices.tolist()) == sorted(ranked[n_tr:n_tr + n_va])
        assert sorted(s.test[u].indices.tolist()) == sorted(ranked[n_tr + n_va:])
        assert s.test[u].nnz == n_te


def test_temporal_hand_example():
    # User 0: ten items given in reverse time order; user 1: three items, two at the same time.
    users = np.array([0] * 10 + [1, 1, 1])
    items = np.array(list(range(10)) + [4, 2, 3])
    ts = np.array([float(100 - k) for k in range(10)] + [7.0, 7.0, 1.0])
    s = split_interactions(users, items, ts, 2, 10, "temporal", [0.8, 0.1, 0.1], seed=0)
    assert s.train[0].indices.tolist() == [2, 3, 4, 5, 6, 7, 8, 9]  # the 8 earliest
    assert s.valid[0].indices.tolist() == [1] and s.test[0].indices.tolist() == [0]  # then 9th, 10th
    # User 1: 3 (t=1) train; 4 and 2 tie at t=7: the earlier row (item 4) is valid, item 2 test.
    assert s.train[1].indices.tolist() == [3]
    assert s.valid[1].indices.tolist() == [4] and s.test[1].indices.tolist() == [2]


def test_temporal_global_cut_and_empty_users():
    # User 2 only interacts late: it ends up with no training data and is dropped.
    users = np.array([0, 0, 0, 1, 1, 1, 0, 1, 2, 2])
    items = np.arange(10)
    ts = np.arange(10, dtype=float)
    s = split_interactions(users, items, ts, 3, 10, "temporal_global", [0.6, 0.2, 0.2], seed=0)
    assert s.kept_users.tolist() == [0, 1]
    assert s.train.nnz == 6 and pairs(s.valid) == {(0, 6), (1, 7)} and s.test.nnz == 0
    users, items, ts, nu, ni = random_interactions()
    s = split_interactions(users, items, ts, nu, ni, "temporal_global", [0.8, 0.1, 0.1], seed=0)
    assert s.train_timestamps.max() <= ts.max()


def test_split_bad_args():
    users, items, ts, nu, ni = random_interactions()
    with pytest.raises(ConfigError, match=r"dataset\.split\.method"):
        split_interactions(users, items, ts, nu, ni, "random", [0.8, 0.1, 0.1], 0)
    for method in ("loo", "temporal", "temporal_global"):
        with pytest.raises(ConfigError, match=rf"dataset\.split\.method={method}: needs interaction timestamps"):
            split_interactions(users, items, None, nu, ni, method, [0.8, 0.1, 0.1], 0)


# --------------------------------------------------------------------------- atomic


INTER = [
    "user_id:token\titem_id:token\trating:float\ttimestamp:float",
    "u1\ti1\t5\t100",
    "u1\ti2\t3\t101",
    "u1\ti3\t4\t102",
    "u1\ti1\t5\t99",  # duplicate, earlier: collapses to one entry at time 99
    "u2\ti2\t4\t200",
    "u2\ti3\t5\t201",
    "u2\ti4\t4\t202",
    "u3\ti4\t1\t300",  # only a low rating: dropped with threshold 4
]


def atomic_dir(tmp_path, inter=INTER):
    write(tmp_path / "toy.inter", inter)
    write(tmp_path / "toy.item", [
        "item_id:token\tmovie_title:token_seq\tclass:token_seq",
        "i1\tA Film\tDrama Comedy",
        "i2\tB Film\tAction",
        "i3\tC\tComedy",
        "i9\tUnused\tHorror",
    ])
    write(tmp_path / "toy.user", [
        "user_id:token\tage:token\toccupation:token",
        "u1\t24\twriter",
        "u2\t30\tartist",
        "u3\t41\twriter",
    ])
    return tmp_path


def test_atomic_loader(tmp_path):
    d = load_dataset(cfg(path=str(atomic_dir(tmp_path)), split={"method": "loo"}), seed=0)
    assert d.user_ids.tolist() == ["u1", "u2", "u3"] and d.item_ids.tolist() == ["i1", "i2", "i3", "i4"]
    assert d.train.nnz + d.valid.nnz + d.test.nnz == 7
    # loo: u1's latest pair is i3 (102), then i2 (101); i1 keeps its earliest time 99.
    assert d.test[0].indices.tolist() == [2] and d.valid[0].indices.tolist() == [1]
    assert d.train[0].indices.tolist() == [0] and d.train_timestamps[0] == 99
    assert d.train[2].indices.tolist() == [3]  # u3 has a single interaction: all in train
    genre, names = d.item_features["genre"], d.item_features["genre_names"].tolist()
    assert names == ["Action", "Comedy", "Drama", "Horror"]
    assert genre.shape == (4, 4) and genre.dtype == np.float32
    assert genre[0].tolist() == [0, 1, 1, 0] and genre[3].tolist() == [0, 0, 0, 0]  # i4 has no .item row
    occ = d.user_features["occupation"]
    assert d.user_features["occupation_vocab"][occ].tolist() == ["writer", "artist", "writer"]
    assert d.user_features["age_vocab"][d.user_features["age"]].tolist() == ["24", "30", "41"]


def test_atomic_threshold_and_min_user(tmp_path):
    d = load_dataset(cfg(path=str(atomic_dir(tmp_path)), rating_threshold=4), seed=0)
    assert d.user_ids.tolist() == ["u1", "u2"]  # u3 has no positive left
    assert d.item_ids.tolist() == ["i1", "i2", "i3", "i4"]
    assert d.train.nnz + d.valid.nnz + d.test.nnz == 5  # (u1: i1, i3), (u2: i2, i3, i4)
    d = load_dataset(cfg(path=str(atomic_dir(tmp_path)), rating_threshold=4, min_user_interactions=3), seed=0)
    assert d.user_ids.tolist() == ["u2"] and d.item_ids.tolist() == ["i2", "i3", "i4"]


def test_atomic_without_rating_or_timestamp(tmp_path):
    write(tmp_path / "toy.inter", ["item_id:token\tuser_id:token", "7\t1", "8\t1", "7\t2"])
    d = load_dataset(cfg(path=str(tmp_path)), seed=0)
    assert d.user_ids.tolist() == ["1", "2"] and d.item_ids.tolist() == ["7", "8"]
    assert d.train_timestamps is None


def presplit_dir(tmp_path, test_lines=None, threshold_rows=False):
    h = "user_id:token\titem_id:token\trating:float\ttimestamp:float"
    write(tmp_path / "toy.train.inter", [h, "a\tx\t5\t1", "a\ty\t5\t2", "b\ty\t5\t3", "b\tz\t5\t4",
                                         "c\tz\t1\t5"])
    write(tmp_path / "toy.valid.inter", [h, "a\tz\t5\t6", "b\tx\t5\t7"])
    write(tmp_path / "toy.test.inter", [h] + (test_lines or ["a\tz\t5\t8", "c\tx\t5\t9"]))
    return tmp_path


def test_atomic_presplit_used_exactly(tmp_path):
    d = load_dataset(cfg(path=str(presplit_dir(tmp_path)), split={"method": "loo"}), seed=0)
    assert d.user_ids.tolist() == ["a", "b", "c"] and d.item_ids.tolist() == ["x", "y", "z"]
    assert dense(d.train).tolist() == [[1, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert dense(d.valid).tolist() == [[0, 0, 1], [1, 0, 0], [0, 0, 0]]
    assert dense(d.test).tolist() == [[0, 0, 1], [0, 0, 0], [1, 0, 0]]  # overlap with valid kept as given
    assert d.train_timestamps.tolist() == [1, 2, 3, 4, 5]


def presplit_extra_dir(tmp_path):
    """Pre-split files with ids outside train: user d and item w only in valid, user e and item v
    only in test, user f only in test with a low rating on item u (seen nowhere else)."""
    h = "user_id:token\titem_id:token\trating:float\ttimestamp:float"
    write(tmp_path / "toy.train.inter", [h, "a\tx\t5\t1", "a\ty\t5\t2", "b\ty\t5\t3", "b\tz\t5\t4",
                                         "c\tz\t1\t5"])
    write(tmp_path / "toy.valid.inter", [h, "a\tz\t5\t6", "d\tw\t5\t7"])
    write(tmp_path / "toy.test.inter", [h, "c\tx\t5\t8", "e\tv\t5\t9", "f\tu\t2\t9"])
    return tmp_path


def test_presplit_ids_over_all_files(tmp_path):
    d = load_dataset(cfg(path=str(presplit_extra_dir(tmp_path))), seed=0)
    assert d.user_ids.tolist() == ["a", "b", "c", "d", "e", "f"]
    assert d.item_ids.tolist() == ["u", "v", "w", "x", "y", "z"]
    assert dense(d.train).tolist() == [[0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 1],
                                       [0] * 6, [0] * 6, [0] * 6]
    assert pairs(d.valid) == {(0, 5), (3, 2)}
    assert pairs(d.test) == {(2, 3), (4, 1), (5, 0)}
    s = d.summary()
    assert (s["users"], s["items"], s["train"], s["valid"], s["test"]) == (6, 6, 5, 2, 3)
    assert s["users_without_train"] == 3 and s["items_without_train"] == 3  # d, e, f; u, v, w


def test_presplit_threshold_keeps_evaluated_users(tmp_path):
    # Threshold 4: c's only training row goes but c keeps its test item; f has no positive left
    # anywhere and is dropped; item u stays in the catalogue (the files name it).
    d = load_dataset(cfg(path=str(presplit_extra_dir(tmp_path)), rating_threshold=4), seed=0)
    assert d.user_ids.tolist() == ["a", "b", "c", "d", "e"]
    assert d.item_ids.tolist() == ["u", "v", "w", "x", "y", "z"]
    assert d.train[2].nnz == 0 and d.test[2].indices.tolist() == [3]
    s = d.summary()
    assert (s["users"], s["train"], s["valid"], s["test"]) == (5, 4, 2, 2)
    assert s["users_without_train"] == 3 and s["items_without_train"] == 3  # c, d, e; u, v, w


def test_summary_counts_ratio_split():
    d = load_dataset(synth_cfg(n_users=50, n_items=300, mean_interactions=8), seed=0)
    s = d.summary()
    assert s["users_without_train"] == 0  # every user keeps a training item
    trained = set(d.train.indices.tolist())
    assert s["items_without_train"] == d.n_items - len(trained) > 0


# --------------------------------------------------------------------------- movielens


def test_movielens_udata(tmp_path):
    write(tmp_path / "u.data", ["1\t10\t5\t881250949", "1\t20\t3\t881250950", "2\t10\t4\t881250951",
                                "2\t30\t4\t881250952", "3\t30\t2\t881250953"])
    flags = ["0"] * 19
    g1 = flags.copy()
    g1[1] = "1"
    write(tmp_path / "u.item", ["10|Film A|01-Jan-1995||http://x|" + "|".join(g1),
                                "20|Film B|01-Jan-1995||http://x|" + "|".join(flags)])
    write(tmp_path / "u.user", ["1|24|M|technician|85711", "2|53|F|other|94043", "3|23|M|writer|32067"])
    d = load_dataset(cfg(kind="movielens", path=str(tmp_path), rating_threshold=4), seed=0)
    assert d.user_ids.tolist() == ["1", "2"] and d.item_ids.tolist() == ["10", "30"]
    assert d.train.nnz + d.valid.nnz + d.test.nnz == 3
    assert d.item_features["genre"].shape == (2, 19)
    assert d.item_features["genre"][0, 1] == 1 and d.item_features["genre_names"][1] == "Action"
    assert d.user_features["occupation_vocab"][d.user_features["occupation"]].tolist() == ["technician", "other"]


def test_movielens_ratings_dat(tmp_path):
    write(tmp_path / "ratings.dat", ["1::1193::5::978300760", "1::661::3::978302109", "2::1193::4::978298413"])
    write(tmp_path / "movies.dat", ["1193::One Flew (1975)::Drama", "661::James (1996)::Animation|Children's"])
    d = load_dataset(cfg(kind="movielens", path=str(tmp_path)), seed=0)
    assert d.n_users == 2 and d.item_ids.tolist() == ["661", "1193"]
    assert d.train.nnz + d.valid.nnz + d.test.nnz == 3
    names = d.item_features["genre_names"].tolist()
    assert d.item_features["genre"][1, names.index("Drama")] == 1


# --------------------------------------------------------------------------- diffrec


def diffrec_dir(tmp_path, train=None, valid=None, test=None, emb_rows=5):
    arrays = {
        "train": train if train is not None else np.array([[0, 0], [0, 1], [1, 2], [2, 3], [2, 4]]),
        "valid": valid if valid is not None else np.array([[0, 2], [1, 0]]),
        "test": test if test is not None else np.array([[2, 1]]),
    }
    for k, a in arrays.items():
        np.save(tmp_path / f"{k}_list.npy", a)
    if emb_rows:
        np.save(tmp_path / "item_emb.npy", np.ones((emb_rows, 64), dtype=np.float32))
    return tmp_path


def test_diffrec_loader(tmp_path):
    d = load_dataset(cfg(kind="diffrec", path=str(diffrec_dir(tmp_path, emb_rows=7))), seed=0)
    assert (d.n_users, d.n_items) == (3, 7)  # item_emb rows win when larger
    assert dense(d.train)[:, :5].tolist() == [[1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 1, 1]]
    assert pairs(d.valid) == {(0, 2), (1, 0)} and pairs(d.test) == {(2, 1)}
    assert d.item_emb.shape == (7, 64) and d.user_ids.tolist() == ["0", "1", "2"]
    assert d.train_timestamps.tolist() == [0, 1, 2, 3, 4]  # file rows, in CSR order


def test_diffrec_loader_keeps_the_file_order_as_time(tmp_path):
    """T-DiffRec reads each user's training list in file order as time: CSR sorts items, the ranks stay."""
    train = np.array([[1, 4], [0, 3], [1, 0], [0, 1], [1, 2], [0, 3]])  # (0, 3) twice: its first row counts
    d = load_dataset(cfg(kind="diffrec", path=str(diffrec_dir(tmp_path, train=train, valid=np.array([[0, 2]]),
                                                              test=np.array([[1, 1]])))), seed=0)
    assert d.train[0].indices.tolist() == [1, 3] and d.train[1].indices.tolist() == [0, 2, 4]
    assert d.train_timestamps.tolist() == [3, 1, 2, 4, 0]


# --------------------------------------------------------------------------- path resolution


def test_resolve_data_path(tmp_path, monkeypatch):
    assert resolve_data_path(cfg(path=str(tmp_path))) == tmp_path
    monkeypatch.setenv("FEDREC_DATA", str(tmp_path))
    assert resolve_data_path(cfg(subdir="ml")) == tmp_path / "ml"
    monkeypatch.delenv("FEDREC_DATA")
    with pytest.raises(DataError, match=r"dataset\.path.*FEDREC_DATA"):
        resolve_data_path(cfg(subdir="no-such-dataset-here"))
    with pytest.raises(ConfigError, match=r"dataset\.path"):  # atomic.yaml: path unset, nothing found
        load_dataset(OmegaConf.merge(OmegaConf.load(CONF / "atomic.yaml"), {"name": "no-such-dataset-here"}), 0)


# --------------------------------------------------------------------------- bad input: DataError


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match=r"nowhere: not found"):
        load_dataset(cfg(path=str(tmp_path / "nowhere")), 0)


def test_missing_inter_file(tmp_path):
    with pytest.raises(DataError, match=r"toy\.inter: not found"):
        load_dataset(cfg(path=str(tmp_path)), 0)


def test_missing_movielens_file(tmp_path):
    with pytest.raises(DataError, match=r"u\.data: not found"):
        load_dataset(cfg(kind="movielens", path=str(tmp_path)), 0)


def test_missing_npy_file(tmp_path):
    diffrec_dir(tmp_path)
    (tmp_path / "valid_list.npy").unlink()
    with pytest.raises(DataError, match=r"valid_list\.npy: not found"):
        load_dataset(cfg(kind="diffrec", path=str(tmp_path)), 0)


def test_wrong_column_count(tmp_path):
    bad = INTER[:3] + ["u1\ti9\t5"] + INTER[3:]
    with pytest.raises(DataError, match=r"toy\.inter: line 4: expected 4 tab-separated columns.*got 3"):
        load_dataset(cfg(path=str(atomic_dir(tmp_path, bad))), 0)


def test_non_numeric_rating(tmp_path):
    bad = INTER[:2] + ["u1\ti9\tfive\t100"] + INTER[2:]
    with pytest.raises(DataError, match=r"toy\.inter: line 3: rating 'five' is not a finite number"):
        load_dataset(cfg(path=str(atomic_dir(tmp_path, bad))), 0)


def test_non_numeric_timestamp(tmp_path):
    bad = INTER + ["u2\ti1\t4\tyesterday"]
    with pytest.raises(DataError, match=r"toy\.inter: line 10: timestamp 'yesterday'"):
        load_dataset(cfg(path=str(atomic_dir(tmp_path, bad))), 0)


def test_movielens_malformed_row(tmp_path):
    write(tmp_path / "u.data", ["1\t10\t5\t881250949", "1\t20\t3"])
    with pytest.raises(DataError, match=r"u\.data: line 2: expected 4 tab-separated columns"):
        load_dataset(cfg(kind="movielens", path=str(tmp_path)), 0)
    write(tmp_path / "u.data", ["1\t10\t5\t881250949", "1\t20\tx\t881250949"])
    with pytest.raises(DataError, match=r"u\.data: line 2: rating 'x'"):
        load_dataset(cfg(kind="movielens", path=str(tmp_path)), 0)


@pytest.mark.parametrize("field", ["user_id", "item_id"])
def test_header_without_id(tmp_path, field):
    header = INTER[0].replace(field, "who" if field == "user_id" else "what")
    with pytest.raises(DataError, match=rf"toy\.inter: line 1: header has no {field} field"):
        load_dataset(cfg(path=str(atomic_dir(tmp_path, [header] + INTER[1:]))), 0)


def test_presplit_no_training_rows(tmp_path):
    presplit_dir(tmp_path)
    msg = r"toy\.train\.inter: no training interactions with rating >= 6 \(dataset\.rating_threshold\)$"
    with pytest.raises(DataError, match=msg):
        load_dataset(cfg(path=str(tmp_path), rating_threshold=6), 0)


def test_diffrec_unknown_item(tmp_path):
    diffrec_dir(tmp_path, test=np.array([[2, 1], [1, 6]]), emb_rows=0)
    with pytest.raises(DataError, match=r"test_list\.npy: row 1 \(0-based\): item 6 never appears in train_list\.npy"):
        load_dataset(cfg(kind="diffrec", path=str(tmp_path)), 0)


def test_diffrec_empty_user(tmp_path):
    diffrec_dir(tmp_path, valid=np.array([[0, 2], [5, 0]]))
    with pytest.raises(DataError, match=r"valid_list\.npy: row 1 \(0-based\): user 5 has no interactions.*empty user"):
        load_dataset(cfg(kind="diffrec", path=str(tmp_path)), 0)


def test_npy_wrong_shape(tmp_path):
    diffrec_dir(tmp_path, train=np.array([0, 1, 2]))
    with pytest.raises(DataError, match=r"train_list\.npy: expected an integer array of shape \(n, 2\)"):
        load_dataset(cfg(kind="diffrec", path=str(tmp_path)), 0)


def test_npy_wrong_dtype(tmp_path):
    diffrec_dir(tmp_path, test=np.array([[2.0, 1.0]]))
    with pytest.raises(DataError, match=r"test_list\.npy: expected an integer array.*float64"):
        load_dataset(cfg(kind="diffrec", path=str(tmp_path)), 0)


def test_item_emb_too_small(tmp_path):
    diffrec_dir(tmp_path, emb_rows=3)
    with pytest.raises(DataError, match=r"item_emb\.npy: has 3 rows"):
        load_dataset(cfg(kind="diffrec", path=str(tmp_path)), 0)


def test_zero_users(tmp_path):
    with pytest.raises(DataError, match=r"toy\.inter: no users left after rating_threshold=5\.5"):
        load_dataset(cfg(path=str(atomic_dir(tmp_path)), rating_threshold=5.5), 0)


def test_zero_users_diffrec(tmp_path):
    diffrec_dir(tmp_path, train=np.zeros((0, 2), dtype=np.int64), valid=np.zeros((0, 2), dtype=np.int64),
                test=np.zeros((0, 2), dtype=np.int64), emb_rows=0)
    with pytest.raises(DataError, match=r"train_list\.npy: no training interactions"):
        load_dataset(cfg(kind="diffrec", path=str(tmp_path)), 0)


def test_threshold_without_rating_column(tmp_path):
    write(tmp_path / "toy.inter", ["user_id:token\titem_id:token", "1\t2"])
    with pytest.raises(DataError, match=r"toy\.inter: has no rating column.*dataset\.rating_threshold"):
        load_dataset(cfg(path=str(tmp_path), rating_threshold=4), 0)


def test_messages_are_one_line(tmp_path):
    with pytest.raises(DataError) as exc:
        load_dataset(cfg(path=str(atomic_dir(tmp_path, INTER[:2] + ["u1\ti9\tfive\t100"]))), 0)
    assert "\n" not in str(exc.value)
    assert exc.value.__suppress_context__


# --------------------------------------------------------------------------- bad input: ConfigError


@pytest.mark.parametrize("ratios", [[0.8, 0.1], [0.8, 0.3, 0.1], [1.2, -0.1, -0.1], [0.0, 0.5, 0.5]])
def test_bad_ratios(tmp_path, ratios):
    with pytest.raises(ConfigError, match=r"dataset\.split\.ratios"):
        load_dataset(cfg(path=str(atomic_dir(tmp_path)), split={"ratios": ratios}), 0)


@pytest.mark.parametrize("key,value", [
    ("rating_threshold", -1), ("kind", "parquet"), ("min_user_interactions", -2),
])
def test_bad_config_values(tmp_path, key, value):
    with pytest.raises(ConfigError, match=rf"dataset\.{key}"):
        load_dataset(cfg(path=str(atomic_dir(tmp_path)), **{key: value}), 0)


@pytest.mark.parametrize("key,value,match", [
    ("rating_threshold", "${nope}", r"^dataset\.rating_threshold: cannot be read \(InterpolationKeyError: .*'nope'"),
    ("rating_threshold", "???", r"^dataset\.rating_threshold: mandatory value '\?\?\?' is not set$"),
    ("min_user_interactions", "${oc.env:FEDREC_NO_SUCH_VARIABLE}", r"^dataset\.min_user_interactions: cannot be read"),
    ("split", "ratio", r"^dataset\.split='ratio': expected a mapping"),
    ("split", {"method": "${nope}", "ratios": [0.8, 0.1, 0.1]}, r"^dataset\.split\.method: cannot be read"),
    ("split", {"method": "ratio", "ratios": 0.8}, r"^dataset\.split\.ratios=0\.8: expected three numbers"),
])
def test_unreadable_option_is_config_error(tmp_path, key, value, match):
    c = cfg(path=str(atomic_dir(tmp_path)))
    c[key] = value
    with pytest.raises(ConfigError, match=match) as exc:
        load_dataset(c, 0)
    assert "\n" not in str(exc.value)


def test_unreadable_synthetic_option_is_config_error():
    with pytest.raises(ConfigError, match=r"^dataset\.n_users: cannot be read \(InterpolationKeyError"):
        load_dataset(synth_cfg(n_users="${nope}"), 0)


def test_absent_options_take_defaults(tmp_path):
    # Only the required keys, in struct mode as Hydra gives them: everything else defaults.
    c = OmegaConf.create({"name": "toy", "kind": "atomic", "path": str(atomic_dir(tmp_path))})
    OmegaConf.set_struct(c, True)
    d = load_dataset(c, seed=0)
    assert d.n_users == 3 and d.train.nnz + d.valid.nnz + d.test.nnz == 7  # no threshold: u3 kept


def test_unknown_split_method(tmp_path):
    with pytest.raises(ConfigError, match=r"dataset\.split\.method='random'"):
        load_dataset(cfg(path=str(atomic_dir(tmp_path)), split={"method": "random"}), 0)


def test_dataset_yamls_share_keys():
    for path in sorted(CONF.glob("*.yaml")):
        assert path.read_text().startswith("# "), path
        c = OmegaConf.load(path)
        common = {"name", "kind", "path", "subdir", "rating_threshold", "min_user_interactions", "split"}
        assert common <= set(c.keys()), path
        assert {"method", "ratios"} <= set(c.split.keys()), path


# --------------------------------------------------------------------------- real data


def real_cfg(name, **kw):
    c = OmegaConf.load(CONF / f"{name}.yaml")
    try:
        resolve_data_path(c)
    except DataError:
        pytest.skip(f"real data for {name} not found (no FEDREC_DATA and no {SHARED})")
    folder = resolve_data_path(c)
    if not folder.is_dir():
        pytest.skip(f"real data folder {folder} is absent")
    return OmegaConf.merge(c, kw)


def test_real_ml100k():
    c = real_cfg("ml-100k")
    raw = load_dataset(OmegaConf.merge(c, {"rating_threshold": None}), seed=0)
    assert (raw.n_users, raw.n_items) == (943, 1682)
    assert raw.train.nnz + raw.valid.nnz + raw.test.nnz == 100000
    ratings = np.loadtxt(resolve_data_path(c) / "ml-100k.inter", skiprows=1, usecols=2)
    d = load_dataset(c, seed=0)
    assert d.train.nnz + d.valid.nnz + d.test.nnz == int((ratings >= 4).sum())
    assert d.item_features["genre"].shape[0] == d.n_items and d.item_features["genre"].sum(1).min() >= 1
    assert d.user_features["occupation"].shape == (d.n_users,) and (d.user_features["occupation"] >= 0).all()
    assert len(d.user_features["occupation_vocab"]) == 21
    assert d.train_timestamps.shape == (d.train.nnz,)


def test_real_diffrec_ml1m_clean():
    d = load_dataset(real_cfg("diffrec-ml-1m-clean"), seed=0)
    assert (d.n_users, d.n_items) == (5949, 2810)
    assert (d.train.nnz, d.valid.nnz, d.test.nnz) == (403277, 110722, 57532)
    assert d.item_emb.shape == (2810, 64)


def test_real_ml100k_per_user_splits():
    c = real_cfg("ml-100k")
    temporal = load_dataset(OmegaConf.merge(c, {"split": {"method": "temporal"}}), seed=0)
    loo = load_dataset(OmegaConf.merge(c, {"split": {"method": "loo"}}), seed=0)
    counts = [np.diff(m.indptr) for m in (temporal.train, temporal.valid, temporal.test)]
    n = sum(counts)
    for got, want in zip(counts, ratio_counts(n, (0.8, 0.1, 0.1))):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.diff(loo.test.indptr), (n >= 2).astype(int))
    np.testing.assert_array_equal(np.diff(loo.valid.indptr), (n >= 3).astype(int))
