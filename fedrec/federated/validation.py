"""Every federation and mechanism value that can be rejected, checked before the run folder exists.

``check_run`` runs in ``fedrec.experiment.execute`` after the data and the model are built and
before anything is written, so that a bad strategy argument, fraction, sampling mode, local
optimiser, chunk size, partition or mechanism/federation combination is one ``error:`` line with
exit status 2, never a traceback from a node in round 1. This includes a simulated node that would
not see the GPU it was asked to train on (``device=cuda`` without ``federation.client_gpus``).
"""

from __future__ import annotations

import math

from fedrec.errors import ConfigError


def uses_client_evaluation(cfg, model) -> bool:
    mode = cfg.federation.get("evaluation", "auto")
    if mode not in ("auto", "server", "clients"):
        raise ConfigError(f"federation.evaluation: expected auto, server or clients, got {mode!r}")
    personal = int(cfg.federation.get("personalize_steps", 0) or 0) > 0
    if personal and cfg.federation.mode != "device":
        raise ConfigError("federation.personalize_steps: personalised evaluation needs federation=device")
    if mode == "server" and (model.private_parameter_names() or personal):
        raise ConfigError("federation.evaluation: 'server' is impossible with private parameters or "
                          "personalised evaluation (only the nodes hold them)")
    return mode == "clients" or (mode == "auto" and (bool(model.private_parameter_names()) or personal))


def _rate(fed, key: str) -> None:
    value = float(fed.get(key, 0.0) or 0.0)
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"federation.{key}: must be in [0, 1), got {value}")


def check_run(cfg, data, model, *, simulated: bool = True) -> None:
    """Reject a federated run's bad values; ``data`` and ``model`` are the loaded dataset and built model;
    ``simulated``: the nodes will run on Flower's simulation engine (Ray) on this machine."""
    fed = cfg.federation
    if model.input_kind == "sequence":
        _check_sequence(cfg, data, model)
    from fedrec.mechanisms import build_mechanisms

    for m in build_mechanisms(cfg):
        m.check_model(cfg, model, data)
    if fed.mode == "none":
        return
    from strategies import build_strategy

    from fedrec.data.partition import partition_from_cfg
    client_eval = uses_client_evaluation(cfg, model)
    strategy = build_strategy(cfg.strategy, num_nodes=int(fed.num_nodes), fraction=float(fed.get("fraction", 1.0)),
                              seed=int(cfg.seed), client_evaluation=client_eval)
    if strategy.batch_rule is not None and fed.mode != "device":
        raise ConfigError(f"strategy={cfg.strategy.name}: aggregates every user's update, so it needs federation=device")
    if int(fed.num_nodes) > data.n_users:
        raise ConfigError(f"federation.num_nodes: {fed.num_nodes} nodes for {data.n_users} users")
    partition_from_cfg(data, cfg.partition, int(fed.num_nodes), int(cfg.seed))
    for key, minimum in (("client_cpus", 0.0), ("round_timeout", 0.0)):
        value = float(fed.get(key, 1.0))
        if not (math.isfinite(value) and value > minimum):
            raise ConfigError(f"federation.{key}: must be a positive number, got {fed.get(key)}")
    gpus = float(fed.get("client_gpus", 0.0) or 0.0)
    if not (math.isfinite(gpus) and gpus >= 0):
        raise ConfigError(f"federation.client_gpus: must be a number >= 0, got {fed.get('client_gpus')}")
    if simulated and str(cfg.get("device", "cpu")).strip().lower() == "cuda" and gpus == 0:
        # Ray hides the GPUs from a task that reserves none, so every node would fail in round 1.
        raise ConfigError("federation.client_gpus: device=cuda in a simulation needs a GPU share per node task "
                          "(e.g. federation.client_gpus=0.25), got 0; or use device=auto (nodes then train on CPU)")
    if int(fed.get("client_threads", 1)) < 1:
        raise ConfigError(f"federation.client_threads: must be >= 1, got {fed.client_threads}")
    if fed.get("ray_cpus") is not None and int(fed.ray_cpus) < 1:
        raise ConfigError(f"federation.ray_cpus: must be null or >= 1, got {fed.ray_cpus}")
    if fed.mode == "device":
        _check_device(cfg, data, model)


def _check_sequence(cfg, data, model) -> None:
    """A sequence model needs ordered data and is not wired to personalised evaluation yet."""
    data.input_sequences("train")  # ConfigError when the dataset has no order
    if int(cfg.federation.get("personalize_steps", 0) or 0) > 0:
        raise ConfigError(f"federation.personalize_steps: personalised evaluation of sequence models "
                          f"({model.name!r}) is not supported yet; use 0")


def _check_device(cfg, data, model) -> None:
    from fedrec.federated.device_node import local_training, row_sparse_names, sampling_threshold

    fed = cfg.federation
    row_sparse_names(model, fed)  # federation.sparse_rows
    count = fed.get("users_per_round")
    if count is not None and not 1 <= int(count) <= data.n_users:
        raise ConfigError(f"federation.users_per_round: must be null or in 1..{data.n_users}, got {count}")
    sampling_threshold(fed, data.n_users, int(cfg.seed), 1)  # sampling mode and share
    local_training(cfg, prox_mu=float(cfg.strategy.get("proximal_mu", 0.0) or 0.0))  # optimiser, lr, chunks
    for key in ("dropout_rate", "straggler_rate"):
        _rate(fed, key)
    cap = fed.get("max_user_interactions")
    if cap is not None and int(cap) < 1:
        raise ConfigError(f"federation.max_user_interactions: must be null or >= 1, got {cap}")
    if fed.get("weighting", "uniform") not in ("uniform", "interactions"):
        raise ConfigError(f"federation.weighting: expected uniform or interactions, got {fed.weighting!r}")
    if int(fed.get("personalize_steps", 0) or 0) < 0:
        raise ConfigError(f"federation.personalize_steps: must be >= 0, got {fed.personalize_steps}")
    from fedrec.models.base import Recommender

    if type(model).draw_randomness is Recommender.draw_randomness:
        raise ConfigError(f"federation=device: model {model.name!r} has no explicit randomness "
                          "(draw_randomness), so its users cannot train as vectorised clients")
