"""Typed blocks federation / train / eval (fedrec/run_config.py): one place for every key's type,
default and range; a bad value or an unknown key is one line naming it, before any work."""

from __future__ import annotations

import pytest

from fedrec.errors import ConfigError
from fedrec.run_config import FederationConfig, evaluation, federation, train


def test_blocks_from_the_composed_config_match_the_yaml(tiny_cfg):
    cfg = tiny_cfg("federation=device")
    fed = federation(cfg)
    assert fed.mode == "device" and fed.user_fraction == float(cfg.federation.user_fraction)
    assert fed.sampling == "fixed" and fed.max_user_interactions is None
    assert train(cfg).local_epochs == int(cfg.train.local_epochs) and evaluation(cfg).ks == (10, 20)
    silo = federation(tiny_cfg())
    assert silo.mode == "silo" and silo.sampling == "fixed"  # device keys take their defaults in silo mode
    assert federation(tiny_cfg("federation=none")).mode == "none"


@pytest.mark.parametrize("overrides,message", [
    (["+federation.fractoin=0.5"], "federation.fractoin: unknown key"),
    (["federation.fraction=1.5"], "federation.fraction: must be in"),
    (["federation.rounds=0"], "federation.rounds: must be >= 1"),
    (["federation.client_cpus=0"], "federation.client_cpus: must be a positive number"),
    (["federation.client_gpus=-1"], "federation.client_gpus: must be >= 0"),
    (["federation.backend=grpc"], "federation.backend: expected ray or inprocess"),
    (["federation=device", "federation.sampling=random"], "federation.sampling: expected fixed or poisson"),
    (["federation=device", "federation.local_lr=0"], "federation.local_lr: must be a positive number"),
    (["federation=device", "federation.dropout_rate=1.0"], "federation.dropout_rate: must be in"),
    (["federation=device", "federation.upload=all"], "federation.upload: expected auto or sum or per_user"),
    (["federation=device", "federation.sparse_rows=maybe"], "federation.sparse_rows: expected auto or off"),
    (["federation=device", "federation.local_lr=fast"], "federation.local_lr: expected a number"),
    (["train.eval_every=0"], "train.eval_every: must be >= 1"),
    (["+train.lr=0.1"], "train.lr: unknown key"),
    (["eval.batch_size=0"], "eval.batch_size: must be >= 1"),
    (["train.select_metric=recall@50"], "train.select_metric"),
])
def test_bad_values_fail_in_validate_with_one_line(tiny_cfg, overrides, message):
    from fedrec.config import validate

    with pytest.raises(ConfigError, match=message):
        validate(tiny_cfg(*overrides))


def test_blocks_are_immutable_and_defaults_live_in_one_place():
    fed = FederationConfig()
    with pytest.raises(Exception):
        fed.rounds = 3  # frozen: a run's config is read, never patched in place
    assert FederationConfig(mode="none", rounds=0).mode == "none"  # a centralised run ignores federation values
