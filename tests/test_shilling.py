"""Heuristic shilling attacks (attacks/shilling.py) as data transforms, on tiny synthetic data."""

from __future__ import annotations

import dataclasses
import hashlib
import subprocess
import sys

import numpy as np
import pytest
from omegaconf import OmegaConf

from attacks.shilling import (ATTACKS, AverageAttack, BandwagonAttack, RandomAttack, SegmentAttack,
                              build_shilling)
from fedrec.data import load_dataset, load_run_data
from fedrec.errors import ConfigError
from tests.conftest import REPO
from tests.test_transforms import tiny_data_cfg

SIZES = {"n_users": 120, "n_items": 80}


@pytest.fixture(scope="module")
def cfg():
    return tiny_data_cfg(**SIZES)


@pytest.fixture(scope="module")
def base(cfg):
    return load_dataset(cfg, 0)


def popularity(data):
    return np.asarray(data.train[data.genuine()].sum(axis=0)).ravel()


def fakes(data):
    return data.train[np.flatnonzero(data.injected)]


def digest(data) -> str:
    h = hashlib.sha256()
    for m in (data.train, data.valid, data.test):
        for a in (m.indptr, m.indices, m.data):
            h.update(np.ascontiguousarray(a).tobytes())
    h.update(data.injected.tobytes())
    h.update(np.ascontiguousarray(data.train_seq.items).tobytes())
    h.update("|".join(data.user_ids.tolist()).encode())
    return h.hexdigest()


@pytest.mark.parametrize("kind", sorted(ATTACKS))
def test_fake_users_are_marked_train_only_and_hold_the_targets(cfg, base, kind):
    attack = ATTACKS[kind](count=12, targets=[base.item_ids[3], base.item_ids[7]])
    data = load_run_data(cfg, 0, (attack,))
    assert data.n_users == base.n_users + 12 and data.n_injected == 12 and data.injected[-12:].all()
    assert data.summary()["injected_users"] == 12
    f = fakes(data).toarray() > 0
    assert f[:, [3, 7]].all()  # every fake profile holds every target
    assert data.valid[-12:].nnz == 0 and data.test[-12:].nnz == 0  # training interactions only
    assert len(set(data.user_ids.tolist())) == data.n_users
    # sequences: each fake user's training sequence is its profile
    for u in range(base.n_users, data.n_users):
        assert sorted(data.train_seq.user(u).tolist()) == data.train[u].indices.tolist()
        assert len(data.valid_seq.user(u)) == 0


@pytest.mark.parametrize("kind", sorted(ATTACKS))
def test_profile_size_defaults_to_the_mean_genuine_profile(cfg, base, kind):
    sizes = np.diff(base.train.indptr)
    mean = int(round(sizes[sizes > 0].mean()))
    data = load_run_data(cfg, 0, (ATTACKS[kind](count=10, n_targets=2),))
    assert np.diff(fakes(data).indptr).tolist() == [mean] * 10


def test_explicit_sizes(cfg):
    data = load_run_data(cfg, 0, (BandwagonAttack(count=6, n_targets=2, selected_size=3, filler_size=5),))
    assert np.diff(fakes(data).indptr).tolist() == [10] * 6
    data = load_run_data(cfg, 0, (SegmentAttack(count=6, selected_size=4, segment_by="co_interaction"),))
    assert np.diff(fakes(data).indptr).tolist() == [5] * 6  # no filler by default (implicit feedback)


def test_fraction_counts_genuine_users(cfg, base):
    data = load_run_data(cfg, 0, (RandomAttack(fraction=0.05),))
    assert data.n_injected == 6  # 5% of 120
    assert RandomAttack().config.fraction == 0.01  # the default attack size


def test_bandwagon_uses_the_most_popular_items(cfg, base):
    pop = popularity(base)
    data = load_run_data(cfg, 0, (BandwagonAttack(count=8, targets=[base.item_ids[0]], selected_size=4),))
    top = [i for i in np.argsort(-pop, kind="stable") if i != 0][:4]
    assert (fakes(data).toarray()[:, top] > 0).all()


def test_average_filler_follows_popularity_random_filler_does_not(cfg, base):
    pop = popularity(base)
    target = [base.item_ids[int(np.argmin(pop))]]
    mean_pop = {}
    for attack in (AverageAttack(count=200, targets=target), RandomAttack(count=200, targets=target)):
        f = fakes(load_run_data(cfg, 0, (attack,))).toarray() > 0
        f[:, int(np.argmin(pop))] = False
        mean_pop[attack.kind] = pop[np.nonzero(f)[1]].mean()
    assert mean_pop["average"] > 1.3 * mean_pop["random"]
    assert mean_pop["random"] == pytest.approx(pop.mean(), rel=0.15)


def test_segment_by_genre_holds_items_sharing_a_category_with_the_target(cfg, base):
    cats = base.item_side.categories.matrix.toarray() > 0
    data = load_run_data(cfg, 0, (SegmentAttack(count=5, targets=[base.item_ids[11]], selected_size=6),))
    f = fakes(data).toarray() > 0
    for row in f:
        items = [i for i in np.flatnonzero(row) if i != 11]
        assert len(items) == 6 and all((cats[i] & cats[11]).any() for i in items)
    assert (f == f[0]).all()  # a fixed segment (segment_pool defaults to selected_size)
    wide = load_run_data(cfg, 0, (SegmentAttack(count=5, targets=[base.item_ids[11]], selected_size=6,
                                                segment_pool=20),))
    assert not (fakes(wide).toarray() == fakes(wide).toarray()[0]).all()  # profiles draw from the pool


def test_segment_by_co_interaction_takes_the_targets_most_co_interacted_items(cfg, base):
    t = 5
    fans = base.train[:, t].toarray().ravel() > 0
    co = np.asarray(base.train[fans].sum(axis=0)).ravel()
    co[t] = -1
    data = load_run_data(cfg, 0, (SegmentAttack(count=3, targets=[base.item_ids[t]], selected_size=4,
                                                segment_by="co_interaction"),))
    chosen = [i for i in fakes(data)[0].indices if i != t]
    assert sorted(co[chosen], reverse=True) == sorted(co, reverse=True)[:4]


def test_unpopular_targets_come_from_the_less_popular_half_and_are_shared_across_kinds(cfg, base):
    pop = popularity(base)
    half = set(np.argsort(pop, kind="stable")[:base.n_items // 2].tolist())
    chosen = {kind: ATTACKS[kind](n_targets=3).target_items(base, 4) for kind in ATTACKS}
    first = chosen["random"]
    assert len(first) == 3 and set(first.tolist()) <= half
    assert all(np.array_equal(t, first) for t in chosen.values())  # one seed, the same targets for every kind
    assert not np.array_equal(RandomAttack(n_targets=3).target_items(base, 5), first)
    anywhere = RandomAttack(n_targets=30, target_selection="random").target_items(base, 4)
    assert not set(anywhere.tolist()) <= half
    data = load_run_data(cfg, 0, (AverageAttack(count=4, n_targets=3),))
    assert (fakes(data).toarray()[:, AverageAttack(n_targets=3).target_items(base, 0)] > 0).all()


def test_deterministic_across_calls_and_processes(cfg):
    attack = SegmentAttack(count=7, n_targets=2, segment_pool=15, selected_size=5, filler_size=2)
    a, b = load_run_data(cfg, 9, (attack,)), load_run_data(cfg, 9, (SegmentAttack(attack.config),))
    assert digest(a) == digest(b)
    assert digest(load_run_data(cfg, 10, (attack,))) != digest(a)  # the seed matters
    code = (
        "import sys; from omegaconf import OmegaConf; from attacks.shilling import SegmentAttack;"
        "from fedrec.data import load_run_data; from tests.test_shilling import digest;"
        f"cfg = OmegaConf.create({OmegaConf.to_yaml(cfg)!r});"
        "a = SegmentAttack(count=7, n_targets=2, segment_pool=15, selected_size=5, filler_size=2);"
        "print(digest(load_run_data(cfg, 9, (a,))))"
    )
    other = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                           env={"PYTHONPATH": str(REPO), "PYTHONHASHSEED": "123", "PATH": "/usr/bin:/bin"})
    assert other.returncode == 0, other.stderr
    assert other.stdout.strip() == digest(a)


def test_key_names_every_parameter():
    alternatives = {"fraction": 0.2, "count": 3, "filler_size": 4, "targets": ("1",), "target_selection": "random",
                    "n_targets": 2, "selected_size": 2, "segment_by": "genre", "segment_pool": 9}
    for kind, cls in ATTACKS.items():
        plain = cls()
        assert plain.key().startswith(f"attacks.shilling.{kind}") and plain.key() == cls().key()
        for f in dataclasses.fields(cls.config_class):
            params = {f.name: alternatives[f.name]}
            if f.name == "count":
                params["fraction"] = None
            assert cls(**params).key() != plain.key(), (kind, f.name)
    assert RandomAttack().key() != AverageAttack().key()


def test_build_from_a_config_block(cfg, base):
    block = OmegaConf.create({"name": "bandwagon", "count": 4, "targets": [int(base.item_ids[2])], "selected_size": 2})
    attack = build_shilling(block)
    assert isinstance(attack, BandwagonAttack) and attack.config.targets == (base.item_ids[2],)
    assert build_shilling({"kind": "random", "fraction": "0.5"}).config.fraction == 0.5


@pytest.mark.parametrize("block,message", [
    ({"name": "nuke"}, r"attack\.kind: expected one of random, average, bandwagon, segment"),
    ({"name": "random", "fraction": 0.1, "count": 3}, r"attack\.fraction / attack\.count: give one"),
    ({"name": "random", "fraction": -1}, r"attack\.fraction: expected a positive share"),
    ({"name": "random", "count": 0}, r"attack\.count: expected an integer >= 1"),
    ({"name": "random", "target_selection": "popular"}, r"attack\.target_selection: expected one of"),
    ({"name": "random", "targets": []}, r"attack\.targets: expected a non-empty list"),
    ({"name": "random", "colour": 1}, r"attack\.colour: unknown key"),
    ({"name": "segment", "segment_by": "mood"}, r"attack\.segment_by: expected one of"),
])
def test_bad_config_values_name_their_key(block, message):
    with pytest.raises(ConfigError, match=message):
        build_shilling(block)


def test_bad_values_against_the_data_name_their_key(cfg):
    with pytest.raises(ConfigError, match=r"attack\.targets: item id 'no-such-item' is not in dataset"):
        load_run_data(cfg, 0, (RandomAttack(targets=["no-such-item"]),))
    with pytest.raises(ConfigError, match=r"attack\.filler_size/selected_size: .* only 79 items"):
        load_run_data(cfg, 0, (RandomAttack(count=2, filler_size=80),))
    with pytest.raises(ConfigError, match=r"attack\.n_targets: 41 targets"):
        load_run_data(cfg, 0, (RandomAttack(n_targets=41),))


def test_two_attacks_compose_and_the_second_imitates_genuine_users_only(cfg, base):
    data = load_run_data(cfg, 0, (RandomAttack(count=5), BandwagonAttack(count=5)))
    assert data.n_injected == 10 and data.n_users == base.n_users + 10
    assert len(set(data.user_ids.tolist())) == data.n_users
