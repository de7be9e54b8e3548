"""The ServerApp: drives a strategy from ``strategies/`` over the Grid and records every round.

``serve`` is the whole server side and is shared by the two ways of running:

* ``python -m simulations.run`` builds a ServerApp around ``serve`` and runs it with the Ray
  simulation engine (``flwr.simulation.run_simulation``);
* ``flwr run .`` uses the ServerApp of ``fedrec/federated/flwr_app.py``, which composes the same Hydra config from the
  run-config key ``overrides`` and writes the same run folder (run-config ``run-dir``).

Evaluation is server-side (the global model on every user) unless the model has private
parameters, which only the nodes hold; then nodes evaluate their users and the strategy combines
metric sums exactly (``federation.evaluation: auto|server|clients``). Server-side evaluation runs
on the config's ``device``.
"""

from __future__ import annotations

import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid
from omegaconf import OmegaConf

from fedrec.eval import evaluate_model
from fedrec.federated.arrays import global_arrays, load_arrays
from fedrec.federated import protocol as P
from fedrec.federated.validation import uses_client_evaluation
from fedrec.models import build_model, data_shape
from fedrec.recorder import Recorder
from fedrec.run_config import federation


def _split_metrics(record: MetricRecord | None) -> dict:
    out: dict[str, dict] = {"valid": {}, "test": {}}
    for key, value in (record or {}).items():
        split, _, metric = key.partition("/")
        if split in out and metric:
            out[split][metric] = float(value)
    return out


def run_id(run_path) -> str:
    """A name for the run that every node's state directory files its state under."""
    import hashlib
    from pathlib import Path

    path = Path(run_path).resolve()
    return f"{path.name}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"


def partition_weight_bounds(cfg, data, fed) -> dict[int, float]:
    """The most each partition's node-level reply may weigh: the users it hosts (silo: users trained;
    device, uniform weighting: users sampled), or under ``weighting=interactions`` their training
    interactions capped at ``max_user_interactions``. The server knows the partitions (the same keyed
    split every node computes), so a node cannot claim more examples than it holds."""
    import numpy as np

    from fedrec.data.partition import partition_from_cfg

    parts = partition_from_cfg(data, cfg.partition, fed.num_nodes, int(cfg.seed))
    if fed.mode == "device" and fed.weighting == "interactions":
        counts = np.diff(data.train.indptr).astype(np.float64)
        if fed.max_user_interactions:
            counts = np.minimum(counts, fed.max_user_interactions)
        return {pid: float(counts[users].sum()) for pid, users in enumerate(parts)}
    return {pid: float(len(users)) for pid, users in enumerate(parts)}


def serve(grid: Grid, cfg, data, recorder: Recorder, resume: dict | None = None, *, simulated: bool = False) -> None:
    """Run the federation's rounds on ``grid``; ``simulated``: the nodes run on this machine (Ray), so
    they keep their state in the run folder unless their node config names a ``state-dir``.

    Mechanisms (``fedrec.mechanisms``: privacy, attack, defense) shape the strategy through their
    server hooks: constructor overrides, rules installed on the strategy, wrappers around it."""
    from strategies import build_strategy

    from fedrec.logs import quiet_flower
    from fedrec.mechanisms import RunStopped, ServerContext, build_mechanisms

    quiet_flower(bool(cfg.get("verbose", False)))
    torch.manual_seed(int(cfg.seed))
    from fedrec.devices import cfg_device

    # Built on the CPU (the nodes' initial model), then moved for server-side evaluation; arrays leave as CPU copies.
    model = build_model(cfg.model, data_shape(data, seed=int(cfg.seed))).to(cfg_device(cfg))
    from fedrec.precision import set_precision

    set_precision(model, cfg)  # server-side evaluation in the run's precision
    if model.couples_users:  # a graph-conditioned model (CF-Diff) scores every user from the whole training matrix
        model.fit(data.train)
    fed = federation(cfg)
    client_eval = uses_client_evaluation(cfg, model)
    mechanisms = build_mechanisms(cfg)
    start = 0
    initial = global_arrays(model)
    strategy_cfg = OmegaConf.to_container(cfg.strategy, resolve=True)
    for m in mechanisms:
        strategy_cfg |= m.strategy_overrides()
    strategy = build_strategy(strategy_cfg, num_nodes=fed.num_nodes, fraction=fed.fraction,
                              seed=int(cfg.seed), client_evaluation=client_eval)
    if fed.mode == "device":
        from fedrec.federated.device_node import sampling_threshold, users_per_page

        n_users, seed = data.n_users, int(cfg.seed)
        strategy.user_threshold = lambda rnd: sampling_threshold(fed, n_users, seed, rnd)
        strategy.per_user_uploads = fed.upload == "per_user"
        strategy.row_sparse_names = frozenset(model.row_sparse_parameter_names()) - model.private_parameter_names()
        strategy.weighting = fed.weighting
        strategy.weight_cap = fed.max_user_interactions
        n_params = sum(int(a.numpy().size) for a in initial.values())
        strategy.page_size = users_per_page(fed.memory_budget_gb, n_params, strategy.sample_size)
    strategy.weight_bounds = partition_weight_bounds(cfg, data, fed)
    ctx = ServerContext(cfg=cfg, data=data, model=model, strategy=strategy)
    runner = strategy  # what runs the rounds: the strategy, or wrappers around it (privacy outermost)
    for m in mechanisms:
        m.setup_server(ctx)
        runner = m.wrap_strategy(runner, ctx)

    def report() -> None:
        for m in mechanisms:
            section = m.report(ctx)
            if section is not None:
                recorder.extra[m.kind] = section

    report()
    if resume is not None:
        initial = ArrayRecord(resume["arrays"])
        strategy.load_state(resume["strategy"])
        for m in mechanisms:
            m.load_state(resume.get("mechanisms", {}).get(m.kind, {}))
        recorder.load_state(resume["recorder"])
        start = int(resume["round"])
        strategy.round_offset = start
    rounds = fed.rounds
    ks = list(cfg.eval.ks)
    every = int(cfg.train.eval_every)
    strategy.round_extras = {P.RUN_ID: run_id(recorder.run.path), P.RESUMED_AT: start}
    if simulated:
        strategy.round_extras[P.STATE_DIR_HINT] = str((recorder.run.path / "node-state").resolve())

    def evaluates(rnd: int) -> bool:  # train.eval_every, and always the last round
        return rnd % every == 0 or rnd == rounds

    if client_eval:  # the nodes evaluate on the same rounds the server would
        strategy.evaluates_in = evaluates

    def evaluate_fn(local_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if local_round == 0:
            return None
        rnd = start + local_round
        evaluation = eval_s = None
        if client_eval:
            if strategy.last_eval is not None:
                evaluation, eval_s = _split_metrics(strategy.last_eval), strategy.last_eval_s
                ctx.client_evaluated_round = rnd
        elif evaluates(rnd):
            load_arrays(model, arrays, "aggregated arrays")
            t0 = time.perf_counter()
            evaluation = evaluate_model(model, data, ks, int(cfg.eval.batch_size))
            eval_s = time.perf_counter() - t0
            ctx.evaluated_round = rnd
        report()
        recorder.record(rnd, strategy.last_train, strategy.last_train_s, evaluation, eval_s,
                        lambda: {"arrays": arrays.to_torch_state_dict(), "strategy": strategy.state(),
                                 "mechanisms": {m.kind: m.state() for m in mechanisms}})
        if evaluation is None:
            return None
        return MetricRecord({f"valid/{k}": v for k, v in evaluation["valid"].items()})

    if rounds - start <= 0:
        return
    cfg_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    try:
        runner.start(grid, initial, num_rounds=rounds - start, timeout=fed.round_timeout,
                     train_config=ConfigRecord({P.CONFIG: cfg_yaml}),
                     evaluate_config=ConfigRecord({P.CONFIG: cfg_yaml}), evaluate_fn=evaluate_fn)
    except RunStopped as e:  # a mechanism ends a run cleanly (a spent privacy budget); recorded rounds are kept
        recorder.extra["stopped"] = str(e)
