"""A Flower Grid that delivers messages to the ClientApp's functions in this process.

The server side (``serve``, the strategies) and the node side (``client_app``) are the real ones;
only the transport is replaced, so a test can drive whole rounds without Ray's start-up cost.
"""

from __future__ import annotations

from flwr.app import Context, Message, MessageType, RecordDict

from fedrec.federated import client_app


class InProcessGrid:
    def __init__(self, num_nodes: int, node_ids=None, state_dir=None):
        self.ids = [int(i) for i in (node_ids or [9000 + 13 * i for i in range(num_nodes)])]
        self.contexts = {}
        for pid, nid in enumerate(self.ids):
            node_config = {"partition-id": pid, "num-partitions": num_nodes}
            if state_dir is not None:
                node_config["state-dir"] = str(state_dir)
            self.contexts[nid] = Context(run_id=1, node_id=nid, node_config=node_config, state=RecordDict(),
                                         run_config={})
        self.sent: list[tuple[str, int, dict]] = []  # (message type, node id, config) of every message

    def get_node_ids(self):
        return list(self.ids)

    def send_and_receive(self, messages, timeout=None):
        handlers = {MessageType.QUERY: client_app.query, MessageType.TRAIN: client_app.train,
                    MessageType.EVALUATE: client_app.evaluate}
        out = []
        for m in messages:
            nid = m.metadata.dst_node_id
            conf = dict(m.content["config"]) if "config" in m.content.config_records else {}
            self.sent.append((m.metadata.message_type, nid, conf))
            out.append(handlers[m.metadata.message_type](m, self.contexts[nid]))
        return out
