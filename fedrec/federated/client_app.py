"""The ClientApp: cross-silo training and evaluation of the node's users (Message API).

train: receive global arrays + config -> load the node's own state (``node_state.py``) ->
``train.local_epochs`` epochs over the node's users (wrapped by the run's mechanisms' node hooks,
``fedrec.mechanisms``: DP-SGD replaces it, an attack crafts the reply) -> save the node's state ->
reply with the global arrays, ``num-examples`` (users trained) and the node's ``partition-id``.
evaluate: full-ranking metric *sums* over the node's users, so the server can form the exact
global mean (needed for models with private parameters, which the server never sees).
query: the partition this node hosts, so that the server samples silos by partition, not by Flower's
random node ids.

Randomness: every draw of a node's round comes from a stream keyed by (seed, partition, round,
purpose) (``fedrec.rng``): torch's generator during local training, the mini-batch order, Opacus's
Poisson sampling and noise. Cross-device users draw from streams keyed by (seed, round, user).

Device: the node resolves the config's ``device`` itself and trains and evaluates there; what it
sends and stores is moved to the CPU (``arrays.py``).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import scipy.sparse as sp
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedrec.devices import cfg_device, model_device
from fedrec.errors import ConfigError
from fedrec.eval import evaluate_model, evaluated_users
from fedrec.federated import protocol as P
from fedrec.federated.arrays import global_arrays, load_arrays, local_state
from fedrec.federated.node import node_view
from fedrec.federated.node_state import NodeStateStore
from fedrec.mechanisms import NodeContext, node_mechanisms
from fedrec.models import build_model, data_shape
from fedrec.models.base import input_matrix
from fedrec.precision import set_precision
from fedrec.run_config import federation
from fedrec.rng import PURPOSE_EVAL, PURPOSE_SHUFFLE, PURPOSE_TRAIN, numpy_stream, stream_seed
from fedrec.train import make_optimizer, model_rows, train_epoch

CONFIG_KEY = P.CONFIG  # kept for callers that import it from here

app = ClientApp()


class _MemoryStore:
    """Node state in ``context.state`` (no state directory): survives rounds, not a restart."""

    LOCAL, MECHANISM = "fedrec-local", "fedrec-mechanism-"

    def __init__(self, context: Context):
        self.state = context.state

    def load_before(self, round_: int) -> dict | None:
        if self.LOCAL not in self.state:
            return None
        mechanisms = {key[len(self.MECHANISM):]: {k: a.numpy() for k, a in self.state[key].items()}
                      for key in self.state.array_records if key.startswith(self.MECHANISM)}
        return {"local": self.state[self.LOCAL].to_torch_state_dict(), "mechanisms": mechanisms}

    def save(self, round_: int, state: dict) -> None:
        self.state[self.LOCAL] = ArrayRecord(OrderedDict(state["local"]))
        for kind, arrays in state.get("mechanisms", {}).items():  # a mechanism's node state: named arrays
            self.state[self.MECHANISM + kind] = ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


def _store(conf, context: Context, partition_id: int):
    root = str(context.node_config.get(P.NODE_STATE_DIR, "") or conf.get(P.STATE_DIR_HINT, "") or "")
    if not root:
        return _MemoryStore(context)
    return NodeStateStore(root, str(conf.get(P.RUN_ID, "run")), partition_id)


def _prepare(msg: Message, context: Context, *, evaluating: bool):
    conf = msg.content["config"]
    view = node_view(str(conf[P.CONFIG]), dict(context.node_config))
    cfg = view.cfg
    torch.set_num_threads(federation(cfg).client_threads)
    rnd = int(conf[P.ROUND])
    seed = int(cfg.seed)
    # Every node builds the same initial model (e.g. L-DiffRec's item clusters) from the global seed;
    # its state then comes from the message and from the node's own store.
    torch.manual_seed(seed)
    model = build_model(cfg.model, data_shape(view.data, seed=seed))
    model.fit(_own_rows(view))  # a graph model (LightGCN) reads this node's users' rows only
    store = _store(conf, context, view.partition_id)
    # Training in round r starts from the state after the node's last round before r; evaluation
    # in round r, and a later page of round r's per-user uploads, see the state round r left.
    later_page = int(conf.get(P.PAGE, 0)) > 0
    saved = store.load_before(rnd + 1 if evaluating or later_page else rnd)
    if saved is not None:
        load_arrays(model, saved["local"], "node state")
    load_arrays(model, msg.content["arrays"], "global arrays from the server")
    model.to(cfg_device(cfg))  # after loading: the records hold CPU arrays
    set_precision(model, cfg)  # local training, cross-device steps and node evaluation in the run's precision
    # From here on torch's global generator is this node's stream for this round and purpose.
    torch.manual_seed(stream_seed(seed, view.partition_id, rnd, PURPOSE_EVAL if evaluating else PURPOSE_TRAIN))
    return view, cfg, model, rnd, store, saved or {}


def _own_rows(view) -> sp.csr_matrix:
    """The training matrix with every row but the node's own users' emptied."""
    keep = np.zeros(view.data.n_users, dtype=np.float32)
    keep[view.users] = 1.0
    return sp.csr_matrix(sp.diags(keep) @ view.data.train)


def _save(store, rnd: int, model, mechanism_state: dict | None = None) -> None:
    store.save(rnd, {"local": local_state(model).to_torch_state_dict(), "mechanisms": dict(mechanism_state or {})})


def _context(view, cfg, model, rnd: int, conf, saved: dict) -> NodeContext:
    private = set(model.private_parameter_names())
    start = {n: p.detach().clone() for n, p in model.named_parameters() if n not in private}
    return NodeContext(cfg=cfg, data=view.data, users=view.users, partition_id=view.partition_id, round=rnd,
                       config=conf, start=start, state={k: dict(v) for k, v in saved.get("mechanisms", {}).items()})


@app.query()
def query(msg: Message, context: Context) -> Message:
    """The partition this node hosts (node-config ``partition-id``)."""
    pid = int(context.node_config.get(P.NODE_PARTITION_ID, -1))
    return Message(RecordDict({"metrics": MetricRecord({P.PARTITION_ID: pid})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    view, cfg, model, rnd, store, saved = _prepare(msg, context, evaluating=False)
    conf = msg.content["config"]
    mechanisms = node_mechanisms(cfg)
    ctx = _context(view, cfg, model, rnd, conf, saved)
    if isinstance(store, _MemoryStore) and int(conf.get(P.RESUMED_AT, 0)) > 0 and not saved:
        for m in mechanisms:
            if m.keeps_node_state:
                raise ConfigError(f"resume: this node keeps the state of {m.kind}={m.name} in memory only, so a "
                                  "resumed run would restart it; give the SuperNode a node-config state-dir")
    if cfg.federation.mode == "device":
        return _train_device(msg, view, cfg, model, rnd, store, mechanisms, ctx)
    seed = int(cfg.seed)
    rows = model_rows(model, view.data, view.users)
    optimizer = make_optimizer(model, cfg.model.optim)
    mu = float(conf.get(P.PROXIMAL_MU, 0.0))

    def local_training(model, optimizer, rows):
        prox = (mu, {k: v.detach().clone().to(model_device(model))
                     for k, v in global_arrays(model).to_torch_state_dict().items()}) if mu > 0 else None
        order = numpy_stream(seed, view.partition_id, rnd, PURPOSE_SHUFFLE)
        losses = [train_epoch(model, optimizer, rows, int(cfg.model.optim.batch_size), order, prox)["loss"]
                  for _ in range(int(cfg.train.local_epochs))] if len(rows) else [float("nan")]
        return losses, {}

    for m in mechanisms:  # a mechanism may wrap or replace local training (DP-SGD)
        local_training = m.local_training(ctx, local_training)
    losses, extra = local_training(model, optimizer, rows)
    _save(store, rnd, model, ctx.state)
    metrics = MetricRecord({P.NUM_EXAMPLES: len(rows), P.UNIT_WEIGHT: 1.0, P.PARTITION_ID: view.partition_id,
                            "train-loss": float(losses[-1]) if len(rows) else 0.0, **extra})
    content = RecordDict({"arrays": global_arrays(model), "metrics": metrics})
    for m in mechanisms:  # e.g. a poisoning attack crafts what a malicious silo sends
        content = m.node_reply(ctx, content)
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    view, cfg, model, rnd, _, _ = _prepare(msg, context, evaluating=True)
    steps = federation(cfg).personalize_steps
    users = evaluated_users(view.data, view.users)  # injected users never count in a metric
    if steps > 0:  # personalised evaluation: a few local steps per user before scoring
        from fedrec.eval.metrics import evaluate_scores
        from fedrec.federated.cross_device import personalised_scorer
        from fedrec.federated.device_node import local_training

        local = local_training(cfg, local_epochs=steps)
        score = personalised_scorer(model, view.data, users, local, int(cfg.seed), 10**6 + rnd)
        res = evaluate_scores(score, view.data, list(cfg.eval.ks), int(cfg.eval.batch_size), users=users,
                              device=model_device(model), inputs=input_matrix(model, view.data))
    else:
        res = evaluate_model(model, view.data, list(cfg.eval.ks), int(cfg.eval.batch_size), users=users)
    values: dict[str, float | int] = {P.NUM_EXAMPLES: max(1, len(users)), P.PARTITION_ID: view.partition_id}
    for split, agg in res["_sums"].items():
        values[f"{split}/users"] = agg["users"]
        values.update({f"{split}/{k}/sum": v for k, v in agg["sums"].items()})
    for m in node_mechanisms(cfg):  # e.g. an attack's target-item metrics over the node's users
        values.update(m.node_eval(cfg, model, view.data, users))
    return Message(RecordDict({"metrics": MetricRecord(values)}), reply_to=msg)


def _train_device(msg: Message, view, cfg, model, rnd: int, store, mechanisms, ctx) -> Message:
    """Cross-device: every sampled user of this node is its own client (see device_node.py)."""
    from fedrec.federated.device_node import device_round

    conf = msg.content["config"]
    params = dict(model.named_parameters())
    # Private tables are indexed by user; the node owns (and keeps) its users' rows only.
    private = {n: params[n].detach()[view.users].clone() for n in model.private_parameter_names()}
    page_size = int(conf[P.PAGE_SIZE]) if P.PAGE_SIZE in conf else None
    result = device_round(model, cfg, view.data, view.users, private, rnd, float(conf[P.USER_THRESHOLD]),
                          bool(int(conf.get(P.PER_USER, 0))), prox_mu=float(conf.get(P.PROXIMAL_MU, 0.0)),
                          page=int(conf.get(P.PAGE, 0)), page_size=page_size, mechanisms=mechanisms, ctx=ctx)
    with torch.no_grad():
        for n, rows in result.private.items():
            params[n][view.users] = rows
    _save(store, rnd, model, ctx.state)
    result.reply["metrics"][P.PARTITION_ID] = view.partition_id
    return Message(result.reply, reply_to=msg)
