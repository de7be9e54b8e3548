"""Every rejectable federation/mechanism value fails before the run folder exists (issue 8.6), and DP
runs use nothing data-dependent outside the accountant (issue 8.3)."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from fedrec.errors import ConfigError
from fedrec.experiment import execute

DEVICE = ["federation=device", "federation.num_nodes=2"]
BAD = {
    "strategy-kwarg": (["+strategy.bogus=1"], "strategy"),
    "fraction": (["federation.fraction=1.5"], "federation.fraction"),
    "nodes-over-users": (["federation.num_nodes=500"], "federation.num_nodes"),
    "partition": (["partition=dirichlet", "partition.alpha=-1"], "alpha"),
    "client-threads": (["federation.client_threads=0"], "federation.client_threads"),
    "sampling": (DEVICE + ["federation.sampling=weird"], "federation.sampling"),
    "user-fraction": (DEVICE + ["federation.user_fraction=0"], "federation.user_fraction"),
    "users-per-round": (DEVICE + ["federation.users_per_round=100000"], "federation.users_per_round"),
    "local-optimizer": (DEVICE + ["federation.local_optimizer=rmsprop"], "federation.local_optimizer"),
    "local-lr": (DEVICE + ["federation.local_lr=-1"], "federation.local_lr"),
    "chunk-size": (DEVICE + ["federation.chunk_size=0"], "federation.chunk_size"),
    "memory-budget": (DEVICE + ["federation.memory_budget_gb=0"], "federation.memory_budget_gb"),
    "dropout-rate": (DEVICE + ["federation.dropout_rate=1.5"], "federation.dropout_rate"),
    "weighting": (DEVICE + ["federation.weighting=foo"], "federation.weighting"),
    "cap": (DEVICE + ["federation.max_user_interactions=0"], "federation.max_user_interactions"),
    "upload": (DEVICE + ["federation.upload=all"], "federation.upload"),
    "sparse-rows": (DEVICE + ["federation.sparse_rows=maybe"], "federation.sparse_rows"),
    "mechanism-federation": (["privacy=user_dp"], "privacy=user_dp"),
    "mechanism-strategy": (DEVICE + ["privacy=user_dp", "federation.sampling=poisson", "strategy=user_median"],
                           "strategy=user_median"),
    "evaluation": (["federation.evaluation=somewhere"], "federation.evaluation"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_federation_value_fails_before_the_run_folder(tiny_cfg, tmp_path, case):
    overrides, key = BAD[case]
    cfg = tiny_cfg(*overrides)
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError) as e:
        execute(cfg, run_dir, progress=False)
    assert key in str(e.value) and "\n" not in str(e.value)
    assert not run_dir.exists()


def test_dp_switches_off_importance_sampling_and_records_it(tiny_cfg, tmp_path):
    from fedrec.data import load_dataset
    from fedrec.privacy.public_only import enforce_public_only

    cfg = tiny_cfg("federation=none", "privacy=dpsgd")
    assert cfg.model.importance_sampling
    notes = enforce_public_only(cfg, load_dataset(cfg.dataset, 0))
    assert cfg.model.importance_sampling is False and "importance_sampling" in notes[0]
    # without DP nothing changes
    plain = tiny_cfg("federation=none")
    assert enforce_public_only(plain, load_dataset(plain.dataset, 0)) == [] and plain.model.importance_sampling
    # the run's written config says what was trained
    cfg = tiny_cfg("federation=none", "privacy=dpsgd", "train.epochs=1")
    execute(cfg, tmp_path / "run", progress=False)
    assert OmegaConf.load(tmp_path / "run" / "config.yaml").model.importance_sampling is False


def test_dp_refuses_item_clusters_from_private_interactions(tiny_cfg, tmp_path):
    cfg = tiny_cfg("federation=none", "privacy=dpsgd", "model.n_cate=2", model="ldiffrec")
    with pytest.raises(ConfigError, match="n_cate"):
        execute(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    ok = tiny_cfg("federation=none", "privacy=dpsgd", "model.n_cate=1", "train.epochs=1", model="ldiffrec")
    execute(ok, tmp_path / "ok", progress=False)
