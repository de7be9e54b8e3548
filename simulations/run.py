"""``python -m simulations.run [overrides]``: one experiment; ``-m`` sweeps with Hydra multirun.

Examples::

    python -m simulations.run                                   # synthetic data, DiffRec, 10 silos, FedAvg
    python -m simulations.run federation=none train.epochs=50   # the centralised reference
    python -m simulations.run dataset=ml-100k strategy=fedprox
    python -m simulations.run -m strategy=fedavg,fedadam seed=0,1

Bad input (a config value, a data file) prints one line ``error: ...`` and exits with status 2,
leaving no run folder behind.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from fedrec.errors import FedrecInputError


def run(cfg: DictConfig, run_dir: str | Path | None = None, progress: bool = True) -> dict:
    """Plain function behind the CLI (tests call it with a composed config)."""
    from fedrec.experiment import execute, result_table
    from fedrec.logs import quiet_flower

    quiet_flower(bool(cfg.get("verbose", False)))
    summary = execute(cfg, run_dir, progress=progress)
    print(result_table(summary))
    data = summary.get("dataset") or {}
    if data.get("injected_users"):  # fake users train but never count: say so next to the results
        print(f"data: {data['users']} users, {data['injected_users']} of them injected (trained on, never evaluated)")
    print(f"wall time {summary['wall_s']:.1f} s; best {summary['select_metric']} at round/epoch "
          f"{summary['best_round']}")
    print(f"run folder: {summary['run_dir']}")
    return summary


def _remove_if_empty(path: Path) -> None:
    """Remove a run folder that holds nothing but Hydra's job log."""
    if path.exists() and {p.name for p in path.iterdir()} <= {"run.log"}:
        shutil.rmtree(path, ignore_errors=True)


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    out = Path(HydraConfig.get().runtime.output_dir)
    try:
        summary = run(cfg, out)
        if Path(summary["run_dir"]).resolve() != out.resolve():
            _remove_if_empty(out)  # resumed an earlier folder; Hydra's new one stays unused
    except FedrecInputError as e:
        _remove_if_empty(out)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
