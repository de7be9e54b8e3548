"""The ClientApp: cross-silo training and evaluation of the node's users (Message API).

train: receive global arrays + config -> load node-local state -> ``train.local_epochs`` epochs
over the node's users -> reply with the global arrays and ``num-examples`` (users trained).
evaluate: full-ranking metric *sums* over the node's users, so the server can form the exact
global mean (needed for models with private parameters, which the server never sees).
"""

from __future__ import annotations

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedrec.eval import evaluate_model
from fedrec.federated.arrays import global_arrays, load_arrays, local_state
from fedrec.federated.node import node_view, seed_everything
from fedrec.models import build_model, data_shape
from fedrec.train import TrainRows, make_optimizer, train_epoch

CONFIG_KEY = "fedrec-config"
LOCAL_STATE_KEY = "fedrec-local"
DPSGD_KEY = "fedrec-dpsgd"  # the node's DP-SGD accountant history (sigma, q, steps) across rounds

app = ClientApp()


def _prepare(msg: Message, context: Context):
    conf = msg.content["config"]
    view = node_view(str(conf[CONFIG_KEY]), dict(context.node_config))
    cfg = view.cfg
    torch.set_num_threads(max(1, int(cfg.federation.get("client_threads", 1))))
    rnd = int(conf["fedrec-round"])
    rng = seed_everything(int(cfg.seed), view.partition_id, rnd)
    # The model is rebuilt each round with the global seed, so every node agrees on the
    # architecture (e.g. L-DiffRec's item clusters); its state comes from the message and the node.
    torch.manual_seed(int(cfg.seed))
    model = build_model(cfg.model, data_shape(view.data, seed=int(cfg.seed)))
    if LOCAL_STATE_KEY in context.state:
        load_arrays(model, context.state[LOCAL_STATE_KEY], "node state")
    load_arrays(model, msg.content["arrays"], "global arrays from the server")
    return view, cfg, model, rng


@app.train()
def train(msg: Message, context: Context) -> Message:
    view, cfg, model, rng = _prepare(msg, context)
    if cfg.federation.mode == "device":
        return _train_device(msg, context, view, cfg, model)
    rows = TrainRows(view.data.train, view.users)
    optimizer = make_optimizer(model, cfg.model.optim)
    extra: dict[str, float] = {}
    if cfg.privacy.name == "dpsgd" and len(rows):
        losses, extra = _train_dpsgd(model, optimizer, rows, cfg, context, seed=int(rng.integers(2**31)))
    else:
        mu = float(msg.content["config"].get("proximal-mu", 0.0))
        prox = (mu, {k: v.detach().clone() for k, v in global_arrays(model).to_torch_state_dict().items()}) if mu > 0 else None
        losses = [train_epoch(model, optimizer, rows, int(cfg.model.optim.batch_size), rng, prox)["loss"]
                  for _ in range(int(cfg.train.local_epochs))] if len(rows) else [float("nan")]
    context.state[LOCAL_STATE_KEY] = local_state(model)
    # unit-weight: the equal weight node-level DP averages by (strategies/node_dp.py)
    metrics = MetricRecord({"num-examples": len(rows), "unit-weight": 1.0,
                            "train-loss": float(losses[-1]) if len(rows) else 0.0, **extra})
    return Message(RecordDict({"arrays": global_arrays(model), "metrics": metrics}), reply_to=msg)


def _train_dpsgd(model, optimizer, rows, cfg, context: Context, seed: int) -> tuple[list[float], dict[str, float]]:
    """Local DP-SGD for this round; the node keeps its accountant history between rounds."""
    import math

    import numpy as np
    from flwr.app import Array, ArrayRecord

    from fedrec.privacy.dpsgd import dpsgd_config, local_dpsgd_round

    history = [tuple(h) for h in context.state[DPSGD_KEY]["history"].numpy().tolist()] \
        if DPSGD_KEY in context.state else []
    out = local_dpsgd_round(model, optimizer, rows, int(cfg.model.optim.batch_size), dpsgd_config(cfg.privacy),
                            int(cfg.federation.rounds), int(cfg.train.local_epochs), history,
                            seed=seed)
    context.state[DPSGD_KEY] = ArrayRecord({"history": Array(np.asarray(out["history"], dtype=np.float64))})
    extra = {"dp-noise-multiplier": out["noise_multiplier"], "dp-delta": out["delta"]}
    if math.isfinite(out["epsilon"]):
        extra["dp-epsilon"] = out["epsilon"]
    return out["losses"], extra


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    view, cfg, model, _ = _prepare(msg, context)
    steps = int(cfg.federation.get("personalize_steps", 0) or 0)
    if steps > 0:  # personalised evaluation: a few local steps per user before scoring
        from fedrec.eval.metrics import evaluate_scores
        from fedrec.federated.cross_device import LocalTraining, personalised_scorer

        fed = cfg.federation
        local = LocalTraining(optimizer=str(fed.local_optimizer), lr=float(fed.local_lr), local_epochs=steps,
                              memory_budget_gb=float(fed.get("memory_budget_gb", 2.0)))
        score = personalised_scorer(model, view.data, view.users, local, int(cfg.seed),
                                    10**6 + int(msg.content["config"]["fedrec-round"]))
        res = evaluate_scores(score, view.data, list(cfg.eval.ks), int(cfg.eval.batch_size), users=view.users)
    else:
        res = evaluate_model(model, view.data, list(cfg.eval.ks), int(cfg.eval.batch_size), users=view.users)
    values: dict[str, float | int] = {"num-examples": max(1, len(view.users))}
    for split, agg in res["_sums"].items():
        values[f"{split}/users"] = agg["users"]
        values.update({f"{split}/{k}/sum": v for k, v in agg["sums"].items()})
    return Message(RecordDict({"metrics": MetricRecord(values)}), reply_to=msg)


def _train_device(msg: Message, context: Context, view, cfg, model) -> Message:
    """Cross-device: every sampled user of this node is its own client (see device_node.py)."""
    from fedrec.federated.device_node import device_round

    conf = msg.content["config"]
    params = dict(model.named_parameters())
    # Private tables are indexed by user; the node owns (and keeps) its users' rows only.
    private = {n: params[n].detach()[view.users].clone() for n in model.private_parameter_names()}
    clip = float(conf["fedrec-clip"]) if "fedrec-clip" in conf else None
    result = device_round(model, cfg, view.data, view.users, private, int(conf["fedrec-round"]),
                          float(conf["fedrec-user-threshold"]), bool(int(conf.get("fedrec-per-user", 0))), clip)
    with torch.no_grad():
        for n, rows in result.private.items():
            params[n][view.users] = rows
    context.state[LOCAL_STATE_KEY] = local_state(model)
    return Message(result.reply, reply_to=msg)
