"""Composing and checking the Hydra config outside ``@hydra.main`` (tests, ``flwr run``).

``conf/`` sits at the project root (the card's layout); ``compose`` finds it next to the package.
``validate`` checks the values every entry point relies on before any file is written, so a bad
value fails with one line naming the key.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from fedrec.errors import ConfigError
from fedrec.typed_config import typed_block  # noqa: F401  (re-exported: fedrec.config.typed_block)

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
FEDERATION_MODES = ("none", "silo", "device")


def compose(overrides: list[str] | None = None) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides or []))


def validate(cfg: DictConfig) -> None:
    from fedrec.devices import cfg_device

    cfg_device(cfg)  # device=cuda without a GPU fails here, before any data is read
    mode = cfg.federation.mode
    if mode not in FEDERATION_MODES:
        raise ConfigError(f"federation.mode: expected one of {FEDERATION_MODES}, got {mode!r}")
    if mode == "device" and cfg.federation.get("upload", "auto") not in ("auto", "sum", "per_user"):
        raise ConfigError(f"federation.upload: expected auto, sum or per_user, got {cfg.federation.upload!r}")
    if int(cfg.train.epochs) < 1:
        raise ConfigError(f"train.epochs: must be >= 1, got {cfg.train.epochs}")
    if int(cfg.train.local_epochs) < 1:
        raise ConfigError(f"train.local_epochs: must be >= 1, got {cfg.train.local_epochs}")
    if int(cfg.train.eval_every) < 1:
        raise ConfigError(f"train.eval_every: must be >= 1, got {cfg.train.eval_every}")
    if int(cfg.train.patience) < 0:
        raise ConfigError(f"train.patience: must be >= 0, got {cfg.train.patience}")
    metric, _, k = str(cfg.train.select_metric).partition("@")
    if metric not in ("recall", "ndcg", "hr", "precision", "mrr") or not k.isdigit() or int(k) not in list(cfg.eval.ks):
        raise ConfigError(f"train.select_metric: {cfg.train.select_metric!r} must be <metric>@K with K in eval.ks")
    from fedrec.mechanisms import build_mechanisms

    build_mechanisms(cfg)  # privacy/attack/defense: typed blocks and what each needs, before any file is read
    if mode != "none":
        if int(cfg.federation.num_nodes) < 1:
            raise ConfigError(f"federation.num_nodes: must be >= 1, got {cfg.federation.num_nodes}")
        if int(cfg.federation.rounds) < 1:
            raise ConfigError(f"federation.rounds: must be >= 1, got {cfg.federation.rounds}")
