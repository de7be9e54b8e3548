"""Run the ServerApp and ClientApp on Flower's simulation engine (Ray backend), in-process.

``flwr.simulation.run_simulation`` is deprecated in Flower 1.42 in favour of ``flwr run`` but is the
only way to hand the ServerApp live objects (the loaded dataset, the recorder) — Flower 1.42 has no
supported in-process alternative (``flwr run`` loads the apps by name in other processes) — so its
deprecation notice is dropped from the console (``fedrec.experiment.quiet_flower``; ``verbose=true``
shows it). The apps are the same ones ``flwr run .`` deploys. Each virtual node gets ``federation.client_cpus`` CPUs,
and, when ``device`` resolves to cuda, ``federation.client_gpus`` of a GPU; Ray is
started for this run only and shut down by Flower at the end (we never run ``ray stop``). Set
``RAY_ADDRESS`` to attach to an existing Ray cluster instead.
"""

from __future__ import annotations

import os

from flwr.serverapp import Grid, ServerApp
from flwr.app import Context

from fedrec.run_config import federation
from fedrec.federated.client_app import app as client_app
from fedrec.federated.server_app import serve
from fedrec.recorder import Recorder


def simulate(cfg, data, recorder: Recorder, resume: dict | None = None) -> None:
    from flwr.simulation import run_simulation

    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    failure: list[BaseException] = []
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            serve(grid, cfg, data, recorder, resume, simulated=True)
        except BaseException as e:  # re-raised below: run_simulation only logs server errors
            failure.append(e)

    fed = federation(cfg)
    init_args = {"include_dashboard": False, "logging_level": "ERROR", "log_to_driver": False}
    if not os.environ.get("RAY_ADDRESS"):
        init_args["num_cpus"] = int(fed.ray_cpus or os.cpu_count() or 1)
    from fedrec.devices import cfg_device

    # A node task sees a GPU only if it reserves a share of one (Ray hides the others from it).
    gpus = float(fed.client_gpus) if cfg_device(cfg).type == "cuda" else 0.0
    backend_config = {
        "client_resources": {"num_cpus": float(fed.client_cpus), "num_gpus": gpus},
        "init_args": init_args,
    }
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=fed.num_nodes,
                   backend_config=backend_config, verbose_logging=bool(cfg.get("verbose", False)))
    if failure:
        raise failure[0]
    if recorder.rounds_done < fed.rounds and "stopped" not in recorder.extra:
        raise RuntimeError(f"the federation stopped after round {recorder.rounds_done} of {fed.rounds}; "
                           "see the Flower log above")
