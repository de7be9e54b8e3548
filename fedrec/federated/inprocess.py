"""Flower's rounds without Ray: a Grid that delivers each message to the ClientApp's handlers in this process.

``federation.backend=inprocess``. The server side (``serve``, the strategies, the mechanisms' wrappers) and
the node side (``fedrec.federated.client_app``'s query/train/evaluate) are exactly the ones ``flwr run`` and
the Ray simulation run; only the transport is replaced, so a run costs no Ray start-up (20-70 s here)
and several runs can share a small machine. The nodes run one after another, not in parallel.

What a real transport guarantees is kept: every message and every reply is a copy (no array is shared
between the server and a node), each node has its own ``Context`` (node config with its partition,
its own state), node state goes to the run folder as in a simulation (``serve(..., simulated=True)``),
and a handler cannot change the server process's torch state: its global RNG state and thread count are
restored after each message, so a run gives the same numbers as the same config on Ray. Flower's
``TaskIdentity`` (which ``Message()`` reads) is the ServerApp's, as Flower's runtime sets it, and the
destination node's while that node handles a message.
"""

from __future__ import annotations

import copy

import torch
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from fedrec.federated import client_app

_HANDLERS = {MessageType.QUERY: client_app.query, MessageType.TRAIN: client_app.train,
             MessageType.EVALUATE: client_app.evaluate}


class InProcessGrid:
    """``num_nodes`` virtual nodes with ids ``node_ids`` (default: 9000, 9013, ...); partition i on node i.

    ``state_dir``: the nodes' own state directory (node-config ``state-dir``), as a SuperNode's disk;
    None: the server's hint (the run folder), as in a simulation.
    """

    RUN_ID = 1

    def __init__(self, num_nodes: int, node_ids=None, state_dir=None):
        self.ids = [int(i) for i in (node_ids or [9000 + 13 * i for i in range(num_nodes)])]
        self.contexts = {}
        for pid, nid in enumerate(self.ids):
            node_config = {"partition-id": pid, "num-partitions": num_nodes}
            if state_dir is not None:
                node_config["state-dir"] = str(state_dir)
            self.contexts[nid] = Context(run_id=self.RUN_ID, node_id=nid, node_config=node_config, state=RecordDict(),
                                         run_config={})
        self.sent: list[tuple[str, int, dict]] = []  # (message type, node id, config) of every message

    @classmethod
    def act_as_server(cls) -> None:
        """This process's task identity: the ServerApp's of run ``RUN_ID`` (as Flower's runtime sets it)."""
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, cls.RUN_ID, SUPERLINK_NODE_ID

    def get_node_ids(self):
        return list(self.ids)

    def send_and_receive(self, messages, timeout=None):
        out = []
        for m in messages:
            nid = m.metadata.dst_node_id
            conf = dict(m.content["config"]) if "config" in m.content.config_records else {}
            self.sent.append((m.metadata.message_type, nid, conf))
            out.append(copy.deepcopy(self._deliver(copy.deepcopy(m), nid)))
        return out

    def _deliver(self, msg: Message, node_id: int) -> Message:
        rng, threads = torch.get_rng_state(), torch.get_num_threads()
        server_node = TaskIdentity._node_id
        TaskIdentity.node_id = node_id
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        try:
            return _HANDLERS[msg.metadata.message_type](msg, self.contexts[node_id])
        finally:
            torch.set_rng_state(rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)
            torch.set_num_threads(threads)
            TaskIdentity.node_id = server_node


def run_inprocess(cfg, data, recorder, resume: dict | None = None) -> None:
    """The run's rounds on an :class:`InProcessGrid` of ``federation.num_nodes`` nodes."""
    from fedrec.federated.server_app import serve
    from fedrec.run_config import federation

    fed = federation(cfg)
    InProcessGrid.act_as_server()
    serve(InProcessGrid(fed.num_nodes), cfg, data, recorder, resume, simulated=True)
    if recorder.rounds_done < fed.rounds and "stopped" not in recorder.extra:
        raise RuntimeError(f"the federation stopped after round {recorder.rounds_done} of {fed.rounds}")
