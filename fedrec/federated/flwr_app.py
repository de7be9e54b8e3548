"""The ServerApp ``flwr run .`` deploys (``[tool.flwr.app.components]`` in pyproject.toml).

It composes the Hydra config from the run-config key ``overrides`` and runs the same experiment
``python -m simulations.run`` runs, on the Grid Flower hands it (SuperLink + SuperNodes).
Kept apart from ``server_app`` so that the server's rounds (``serve``) never import the entry points.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point under ``flwr run``: compose the config from run-config and run the experiment."""
    from fedrec.config import compose
    from fedrec.experiment import execute

    overrides = str(context.run_config.get("overrides", "")).split()
    cfg = compose(overrides)
    run_dir = str(context.run_config.get("run-dir", "")) or None
    execute(cfg, run_dir, grid=grid)
