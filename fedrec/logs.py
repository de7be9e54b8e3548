"""What a run prints: Flower's and Ray's console output tamed to what a user needs (see ``quiet_flower``)."""

from __future__ import annotations

import logging
import os
import warnings


def _drop_run_simulation_notice(record: logging.LogRecord) -> bool:
    """False for Flower's "DEPRECATED FEATURE: The `run_simulation` function is deprecated ..." record.

    fedrec/federated/simulation.py calls run_simulation on purpose: it is the one way to hand the
    ServerApp live objects (dataset, recorder); ``flwr run .`` (supported too) never logs this.
    """
    return not (str(record.msg).startswith("DEPRECATED FEATURE") and bool(record.args)
                and str(record.args[0]).startswith("The `run_simulation` function is deprecated"))


def quiet_flower(verbose: bool) -> None:
    """Keep Flower's per-round INFO log and known-harmless library notices out of the way unless
    ``verbose=true``; warnings and errors of Flower and Ray still show.

    Flower resets its logger when the simulation starts, so the ServerApp calls this again.
    """
    logger = logging.getLogger("flwr")
    logger.propagate = False  # Hydra's root handler would print every line twice
    if _drop_run_simulation_notice in logger.filters:
        logger.removeFilter(_drop_run_simulation_notice)
    if verbose:
        return
    logger.setLevel(logging.WARNING)
    logger.addFilter(_drop_run_simulation_notice)
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    # Flower's in-memory state database runs its alembic schema migrations at every start; alembic logs
    # each step at INFO through the root logger, which Hydra prints. Its warnings and errors still show.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # ray.init() announces a change of its default (zero-GPU actors will see the GPUs); fedrec asks
    # for num_gpus=0 and trains on CPU, so neither behaviour changes a run.
    warnings.filterwarnings("ignore", message="Tip: In future versions of Ray, Ray will no longer override "
                            "accelerator visible devices", category=FutureWarning)
