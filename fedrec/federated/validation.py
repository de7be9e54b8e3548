"""Every federation and mechanism value that can be rejected, checked before the run folder exists.

``check_run`` runs in ``fedrec.experiment.execute`` after the data and the model are built and
before anything is written, so that a bad strategy argument, fraction, sampling mode, local
optimiser, chunk size, partition or mechanism/federation combination is one ``error:`` line with
exit status 2, never a traceback from a node in round 1. This includes a simulated node that would
not see the GPU it was asked to train on (``device=cuda`` without ``federation.client_gpus``).
"""

from __future__ import annotations

from fedrec.errors import ConfigError
from fedrec.run_config import federation


def uses_client_evaluation(cfg, model) -> bool:
    fed = federation(cfg)
    personal = fed.personalize_steps > 0
    if personal and fed.mode != "device":
        raise ConfigError("federation.personalize_steps: personalised evaluation needs federation=device")
    if fed.evaluation == "server" and (model.private_parameter_names() or personal):
        raise ConfigError("federation.evaluation: 'server' is impossible with private parameters or "
                          "personalised evaluation (only the nodes hold them)")
    return fed.evaluation == "clients" or (fed.evaluation == "auto" and (bool(model.private_parameter_names()) or personal))


def check_run(cfg, data, model, *, simulated: bool = True) -> None:
    """Reject a federated run's bad values; ``data`` and ``model`` are the loaded dataset and built model;
    ``simulated``: the nodes will run on Flower's simulation engine (Ray) on this machine.
    Values of one block alone are checked by its typed config (``fedrec.run_config``); here, what
    depends on the data, the model, the strategy or the mechanisms."""
    fed = federation(cfg)
    if model.input_kind == "sequence":
        _check_sequence(cfg, data, model)
    from fedrec.mechanisms import build_mechanisms

    for m in build_mechanisms(cfg):
        m.check_model(cfg, model, data)
    if fed.mode == "none":
        return
    if not model.trains_by_sgd:
        raise ConfigError(f"federation={fed.mode}: model {model.name!r} is training-free (one closed form of the "
                          "whole training matrix, no update to aggregate); use federation=none")
    if fed.mode == "device" and model.couples_users:
        raise ConfigError(f"federation=device: model {model.name!r} {model.coupling}, so a "
                          "user's loss reads other users' rows and users cannot train as independent clients")
    from strategies import build_strategy

    from fedrec.data.partition import partition_from_cfg
    client_eval = uses_client_evaluation(cfg, model)
    strategy = build_strategy(cfg.strategy, num_nodes=fed.num_nodes, fraction=fed.fraction,
                              seed=int(cfg.seed), client_evaluation=client_eval)
    if strategy.batch_rule is not None and fed.mode != "device":
        raise ConfigError(f"strategy={cfg.strategy.name}: aggregates every user's update, so it needs federation=device")
    if fed.num_nodes > data.n_users:
        raise ConfigError(f"federation.num_nodes: {fed.num_nodes} nodes for {data.n_users} users")
    partition_from_cfg(data, cfg.partition, fed.num_nodes, int(cfg.seed))
    if simulated and str(cfg.get("device", "cpu")).strip().lower() == "cuda" and fed.client_gpus == 0:
        # Ray hides the GPUs from a task that reserves none, so every node would fail in round 1.
        raise ConfigError("federation.client_gpus: device=cuda in a simulation needs a GPU share per node task "
                          "(e.g. federation.client_gpus=0.25), got 0; or use device=auto (nodes then train on CPU)")
    if fed.mode == "device":
        _check_device(cfg, data, model)


def _check_sequence(cfg, data, model) -> None:
    """A sequence model needs ordered data and is not wired to personalised evaluation yet."""
    data.input_sequences("train")  # ConfigError when the dataset has no order
    if federation(cfg).personalize_steps > 0:
        raise ConfigError(f"federation.personalize_steps: personalised evaluation of sequence models "
                          f"({model.name!r}) is not supported yet; use 0")


def _check_device(cfg, data, model) -> None:
    from fedrec.federated.device_node import local_training, sampling_threshold

    fed = federation(cfg)
    count = fed.users_per_round
    if count is not None and not 1 <= int(count) <= data.n_users:
        raise ConfigError(f"federation.users_per_round: must be null or in 1..{data.n_users}, got {count}")
    sampling_threshold(fed, data.n_users, int(cfg.seed), 1)  # the sampled share
    local_training(cfg, prox_mu=float(cfg.strategy.get("proximal_mu", 0.0) or 0.0))  # FedProx's mu
    from fedrec.models.base import Recommender

    if type(model).draw_randomness is Recommender.draw_randomness:
        raise ConfigError(f"federation=device: model {model.name!r} has no explicit randomness "
                          "(draw_randomness), so its users cannot train as vectorised clients")
