"""Composing and checking the Hydra config outside ``@hydra.main`` (tests, ``flwr run``).

``conf/`` sits at the project root (the card's layout); ``compose`` finds it next to the package.
``validate`` checks the values every entry point relies on before any file is written, so a bad
value fails with one line naming the key.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from fedrec.run_config import FEDERATION_MODES  # noqa: F401  (re-exported)
from fedrec.typed_config import typed_block  # noqa: F401  (re-exported: fedrec.config.typed_block)

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


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
    from fedrec.precision import cfg_precision

    cfg_precision(cfg)  # precision: one of fp32 | bf16 | auto
    from fedrec import run_config

    # the typed blocks (fedrec/run_config.py): every key's type, default and range, one line per bad key
    run_config.federation(cfg)
    run_config.train(cfg)
    run_config.evaluation(cfg)  # with train.select_metric's cut-off among eval.ks
    from fedrec.mechanisms import build_mechanisms

    build_mechanisms(cfg)  # privacy/attack/defense: typed blocks and what each needs, before any file is read
    from fedrec.models import check_dataset_needs

    check_dataset_needs(cfg)  # e.g. GiffCF's item graph (dataset.item_graph=co_interaction)
