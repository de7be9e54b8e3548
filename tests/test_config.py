"""Every config group option composes and validates; model options build; bad values name their key."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import pytest
from omegaconf import OmegaConf

from fedrec.config import CONF_DIR, FEDERATION_MODES, compose, validate
from fedrec.errors import ConfigError
from fedrec.models import REGISTRY, build_model
from fedrec.models.base import DataShape

# conf/leaderboard/ holds simulations.leaderboard's own options and search spaces, not a run-config group
OPTIONS = sorted((p.parent.name, p.stem) for p in Path(CONF_DIR).glob("*/*.yaml") if p.parent.name != "leaderboard")
# groups named in config.yaml's defaults list (override as group=name; others need +group=name)
DEFAULT_GROUPS = {k for d in OmegaConf.to_container(OmegaConf.load(CONF_DIR / "config.yaml").defaults)
                  if isinstance(d, dict) for k in d}
NOT_IMPLEMENTED: set = set()
# options that only validate together with others (the mechanism/ sweep points bundle them)
COMPANIONS = {("privacy", "dpsgd"): ["federation=none"],
              ("privacy", "user_dp"): ["federation=device", "federation.sampling=poisson"],
              ("privacy", "node_dp"): ["federation=silo"],
              **{("attack", a): ["federation=device", "model=bpr"]
                 for a in ("fedrecattack", "fedrecattack_unpopular", "pipattack", "ara", "ahum", "untargeted", "random_update")},
              ("strategy", "row_clip_sum"): ["federation=device", "model=bpr"],
              **{("defense", d): ["federation=device", "model=bpr"]
                 for d in ("row_median", "row_trimmedmean", "row_krum", "row_norm_bound", "hierarchical_clip",
                           "update_detect")},
              ("attack", "ipdgi"): ["federation=none", "model=vbpr"],
              ("attack", "image_poison"): ["federation=none", "model=vbpr"],
              ("defense", "image_purify"): ["federation=none", "model=vbpr"],
              ("model", "giffcf"): ["dataset.item_graph=co_interaction"],  # GiffCF smooths over that graph
              ("model", "gdiff"): ["dataset.item_graph=co_interaction"],  # G-Diff decodes over its transition graph
              ("model", "diffairec"): ["federation=none"],
              ("model", "dgrm"): ["dataset.ratings=true"],  # rating models need the ratings kept
              ("model", "edgerec"): ["dataset.ratings=true"]}  # DifFaiRec refuses federations (user-group side data)


def test_groups_found():
    groups = {g for g, _ in OPTIONS}
    assert {"dataset", "partition", "model", "federation", "strategy"} <= groups
    assert {n for g, n in OPTIONS if g == "model"} == set(REGISTRY)


def test_defaults_validate():
    cfg = compose()
    validate(cfg)
    assert cfg.federation.mode == "silo" and cfg.model.name == "diffrec" and cfg.strategy.name == "fedavg"
    assert cfg.train.select_metric == "recall@20" and list(cfg.eval.ks) == [10, 20]


@pytest.mark.parametrize("group,name", OPTIONS, ids=[f"{g}={n}" for g, n in OPTIONS])
def test_option_composes_and_validates(group, name):
    path = CONF_DIR / group / f"{name}.yaml"
    if "@package _global_" in path.read_text().splitlines()[0]:  # presets (experiment=...) patch the root
        cfg = compose([f"{group}={name}" if group in DEFAULT_GROUPS else f"+{group}={name}"])
        validate(cfg)
        return
    cfg = compose([f"{group}={name}" if group in DEFAULT_GROUPS else f"+{group}={name}",
                   *COMPANIONS.get((group, name), [])])
    node = cfg[group]
    # the composed group is the file's content (plus what its own defaults list pulls in)
    own = OmegaConf.to_container(OmegaConf.load(path))
    nested = own.pop("defaults", [])
    composed = OmegaConf.to_container(node)
    for d in nested:
        if isinstance(d, dict):
            (sub, choice), = d.items()
            assert composed.pop(sub) == OmegaConf.to_container(OmegaConf.load(CONF_DIR / group / sub / f"{choice}.yaml"))
        elif d != "_self_":  # a sibling file of the same group as the base (e.g. attack/fedrecattack_unpopular)
            own = OmegaConf.to_container(OmegaConf.merge(OmegaConf.load(CONF_DIR / group / f"{d}.yaml"), own))
    assert composed == own
    if group == "generator":
        from fedrec.privacy.generators import build_generator

        assert build_generator(node, 50, 0).dp is None  # builds; DP is off by default
    if (group, name) in NOT_IMPLEMENTED:
        return
    validate(cfg)
    if group == "federation":
        assert node.mode == name and name in FEDERATION_MODES
    if group in ("model", "strategy"):
        assert node.name == name
    if group == "partition":
        assert node.method == name


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_model_option_builds(name):
    cfg = compose([f"model={name}"])
    rng = np.random.default_rng(0)
    import scipy.sparse as sp

    from fedrec.data.side import ItemCategories, ItemSideData, co_interaction_graph, transition_graph

    images = torch.from_numpy(rng.random((40, 3, 8, 8)).astype(np.float32))  # item images for VBPR
    train = sp.csr_matrix((rng.random((20, 40)) < 0.2).astype(np.float32))  # for models smoothing over it (giffcf)
    categories = ItemCategories(sp.csr_matrix((rng.random((40, 3)) < 0.4).astype(np.float32)), np.array(list("abc")))
    shape = DataShape(n_users=20, n_items=40, item_emb=rng.standard_normal((40, 8)).astype(np.float32),
                      item_side=ItemSideData(images=images, categories=categories),  # categories: DiffKG's KG
                      item_graph_fn=lambda **weighting: co_interaction_graph(train, **weighting),
                      item_transitions_fn=lambda users=None: transition_graph(train.indices, train.indptr, 40),
                      user_groups_fn=lambda grouping, top: (np.arange(20) % 2, ["g0", "g1"]),  # for diffairec
                      user_features={f: rng.integers(0, 3, 20) for f in ("age", "gender", "occupation")})  # edgerec
    model = build_model(cfg.model, shape)
    assert model.name == name
    if not model.trains_by_sgd:  # training-free (EASE, GF-CF, ...): fitted in closed form, no optimiser
        assert "optim" not in cfg.model and not list(model.parameters())
        return
    assert sum(p.numel() for p in model.parameters()) > 0
    for key in ("lr", "weight_decay", "batch_size"):
        assert key in cfg.model.optim


def test_federation_device_validates_upload():
    validate(compose(["federation=device"]))
    with pytest.raises(ConfigError, match=r"federation\.upload"):
        validate(compose(["federation=device", "federation.upload=everything"]))


@pytest.mark.parametrize("value", ["foo@20", "recall@7", "recall", "recall@", "ndcg@x", "@20", "Recall@20"])
def test_bad_select_metric(value):
    with pytest.raises(ConfigError, match=r"train\.select_metric"):
        validate(compose([f"train.select_metric={value}"]))


@pytest.mark.parametrize("value", ["recall@10", "ndcg@20", "hr@10", "precision@20", "mrr@10"])
def test_good_select_metric(value):
    validate(compose([f"train.select_metric={value}"]))


@pytest.mark.parametrize("override,key", [
    ("train.epochs=0", "train.epochs"),
    ("train.local_epochs=0", "train.local_epochs"),
    ("train.eval_every=0", "train.eval_every"),
    ("train.patience=-1", "train.patience"),
    ("federation.num_nodes=0", "federation.num_nodes"),
    ("federation.rounds=0", "federation.rounds"),
    ("federation.mode=cloud", "federation.mode"),
])
def test_bad_values_name_their_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(compose([override]))


def test_centralised_ignores_federation_counts():
    validate(compose(["federation=none", "train.epochs=1"]))


def test_compose_is_repeatable():
    """compose() re-initialises Hydra each call, so tests can compose any number of configs."""
    a = compose(["seed=3"])
    b = compose(["seed=3"])
    assert a == b and a.seed == 3


@pytest.mark.parametrize("name,federation", [("dpsgd", "device"), ("user_dp", "silo"), ("node_dp", "device")])
def test_privacy_mechanism_rejects_wrong_federation(name, federation):
    with pytest.raises(ConfigError, match=f"privacy={name}"):
        validate(compose([f"privacy={name}", f"federation={federation}"]))


def test_dpsgd_validates_centralised_and_in_silos():
    for federation in ("none", "silo"):
        validate(compose(["privacy=dpsgd", f"federation={federation}"]))
