"""Server strategies: Flower's own (``flwr.serverapp.strategy``) with one thin fedrec layer.

``FedrecMixin`` changes three things and defers everything else to Flower:

1. **Full rounds from round 1.** Flower's FedAvg sizes a round from the nodes registered *so far*;
   in simulation round 1 can start before all nodes registered and train on ``min_train_nodes``
   only. We require ``min_available_nodes = num_nodes`` and sample exactly
   ``ceil(fraction * num_nodes)`` nodes, so every round has the configured number of clients.
2. **Reproducible sampling.** Which silos train in round r depends only on (seed, round) and the
   partitions the nodes host, never on Flower's random node ids: before the first round the server
   asks every node for its ``partition-id`` (a query message), then samples partitions from a stream
   keyed by (seed, round). Replies are aggregated in partition order, so float sums do not depend
   on the order in which replies arrive; a resumed run samples and sums as the original did.
3. **Bad uploads never reach aggregation.** Replies whose arrays have other names or shapes than
   the global model, or contain NaN/Inf, or carry no examples, are dropped and counted
   (``rejected-updates``); in per-user replies, user by user, row-sparse tables' rows included
   (``_decode_rows``); a client that *raised* fails the run with its error message.

Client-side evaluation replies carry metric *sums* and user counts; they are combined exactly.
"""

from __future__ import annotations

import math
import time
from functools import partial
from typing import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (Bulyan, FedAdam, FedAvg, FedAvgM, FedMedian, FedProx, FedTrimmedAvg, FedYogi,
                                     Krum, MultiKrum)

from fedrec.errors import ConfigError
from fedrec.federated import protocol as P
from fedrec.federated.arrays import check_update
from fedrec.rng import PURPOSE_NODE_SAMPLING, numpy_stream
from strategies.update_batch import (RowUpdates, UpdateBatch, coordinate_median, derive_weights, row_clip_sum,
                                     row_median, weighted_mean)


class _Reply:
    """A stand-in reply carrying node-level content rebuilt from per-user uploads."""

    def __init__(self, content: RecordDict):
        self.content = content

    def has_error(self) -> bool:
        return False


class ClientFailure(RuntimeError):
    """A ClientApp raised; the run stops with its message instead of silently losing a client."""


def exact_metric_mean(contents: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Combine per-node metric sums ``<split>/<metric>/sum`` and ``<split>/users`` into means."""
    totals: dict[str, float] = {}
    for rd in contents:
        for key, value in rd["metrics"].items():
            totals[key] = totals.get(key, 0.0) + float(value)
    out = {}
    for key, value in totals.items():
        if key.endswith("/sum"):
            split = key.split("/")[0]
            users = totals.get(f"{split}/users", 0.0)
            out[key[:-4]] = value / users if users else math.nan
    return MetricRecord(out)


#: per-round counts the nodes report and the server sums over nodes (mechanisms add theirs with a
#: ``count/`` prefix, e.g. ``count/malicious-users``)
COUNTED = ("sampled-users", "trained-users", "dropped-users", "straggler-users", "empty-users")


class FedrecMixin:
    #: set by the server in cross-device mode: round -> user-sampling threshold (device_node.py)
    user_threshold = None
    #: a rule over the whole round's :class:`UpdateBatch` (every user of every node), e.g. a median;
    #: None: the weighted mean, folded node by node (and page by page)
    batch_rule = None
    #: how the server weights users: federation.weighting, capped at federation.max_user_interactions
    weighting = "uniform"
    weight_cap: int | None = None
    #: partition -> the largest weight its node-level reply may carry (set by the server from the
    #: partition it knows); a larger reported ``num-examples`` is capped to it and counted
    weight_bounds: dict[int, float] | None = None
    per_user_uploads = False  # federation.upload=per_user forces per-user replies
    #: the model's row-sparse tables (set by the server): counted in the upload metrics, sparse or not
    row_sparse_names: frozenset = frozenset()
    #: per-user replies come in pages of this many users (None: one reply per node); see device_node.py
    page_size: int | None = None
    #: functions ``(content, global_arrays) -> (content, metrics)`` applied, in order, to every valid
    #: node-level update before aggregation (a defense's per-update rule; set by mechanisms)
    reply_transforms: tuple = ()
    #: rounds with evaluation on the nodes (client evaluation); None: every round
    evaluates_in = None
    query_timeout = 600.0  # seconds to wait for every node's partition-id
    page_timeout = 3600.0  # seconds to wait for a page of per-user uploads

    def setup(self, *, num_nodes: int, fraction: float, seed: int, round_offset: int = 0) -> None:
        self.num_nodes = num_nodes
        self.seed = seed
        self.round_offset = round_offset
        self.sample_size = max(1, math.ceil(fraction * num_nodes))
        self.fraction_train = self.sample_size / num_nodes
        self.min_train_nodes = self.sample_size
        self.min_available_nodes = num_nodes
        if self.fraction_evaluate > 0:
            self.min_evaluate_nodes = num_nodes
            self.fraction_evaluate = 1.0
        self.last_train: dict = {}
        self.last_train_s: float | None = None
        self.last_eval: MetricRecord | None = None
        self.last_eval_s: float | None = None
        self._partition_of: dict[int, int] | None = None  # Flower node id -> partition id
        self._uploaded: dict[str, float] = {}  # this round's upload volume (reset by aggregate_train)
        self._bases: dict[str, np.ndarray] = {}
        self.round_extras: dict = {}  # extra keys of every round's config (run id, node-state hint), from the server

    def _round_config(self, server_round: int, config: ConfigRecord) -> ConfigRecord:
        cfg = ConfigRecord(dict(config))  # never write into the caller's record
        rnd = self.round_offset + server_round
        cfg[P.ROUND] = rnd
        for key, value in self.round_extras.items():
            cfg[key] = value
        if self.user_threshold is not None:
            cfg[P.USER_THRESHOLD] = float(self.user_threshold(rnd))
            cfg[P.PER_USER] = int(self.needs_per_user_updates or self.per_user_uploads)
            if cfg[P.PER_USER] and self.pages_fold():
                cfg[P.PAGE], cfg[P.PAGE_SIZE] = 0, int(self.page_size)
        return cfg

    # ----------------------------------------------------------------- which silos train
    def partitions(self, grid: Grid) -> dict[int, int]:
        """Node id -> partition id, asked once of every node (all ``num_nodes`` must be connected)."""
        if self._partition_of is None:
            from flwr.serverapp.strategy.strategy_utils import sample_nodes

            _, node_ids = sample_nodes(grid, self.num_nodes, self.num_nodes)  # waits until all connected
            query = [Message(RecordDict({"config": ConfigRecord({P.QUERY_PARTITION: 1})}),
                             message_type=MessageType.QUERY, dst_node_id=int(nid)) for nid in node_ids]
            replies = list(grid.send_and_receive(query, timeout=self.query_timeout))
            self._raise_on_errors(replies)
            found = {int(m.metadata.src_node_id): int(m.content["metrics"][P.PARTITION_ID]) for m in replies}
            pids = sorted(found.values())
            if pids != list(range(self.num_nodes)):
                raise ConfigError(f"federation.num_nodes: the connected nodes host partitions {pids}, expected "
                                  f"0..{self.num_nodes - 1} once each (check each SuperNode's partition-id)")
            self._partition_of = found
        return self._partition_of

    def sampled_partitions(self, rnd: int) -> np.ndarray:
        """The partitions training in global round ``rnd``: a function of (seed, round) only."""
        if self.sample_size >= self.num_nodes:
            return np.arange(self.num_nodes)
        rng = numpy_stream(self.seed, rnd, PURPOSE_NODE_SAMPLING)
        return np.sort(rng.choice(self.num_nodes, self.sample_size, replace=False))

    def _messages(self, record: RecordDict, partitions, grid: Grid, message_type: str) -> list[Message]:
        node_of = {pid: nid for nid, pid in self.partitions(grid).items()}
        return [Message(content=record, message_type=message_type, dst_node_id=int(node_of[int(p)])) for p in partitions]

    @staticmethod
    def _in_partition_order(replies: list[Message]) -> list[Message]:
        """Replies sorted by the partition they came from: sums then do not depend on arrival order."""
        def key(m: Message):
            metrics = m.content.metric_records.get("metrics") if not m.has_error() else None
            return int(metrics.get(P.PARTITION_ID, -1)) if metrics is not None else -1
        return sorted(replies, key=key)

    @property
    def needs_per_user_updates(self) -> bool:
        """A batch rule must see every user's update."""
        return self.batch_rule is not None

    def pages_fold(self) -> bool:
        """Per-user replies can come in pages only when the rule is the weighted mean, which folds page
        by page; a rule that must see every user at once (a median) gets every user in one reply."""
        return self.page_size is not None and self.batch_rule is None

    def _later_pages(self, first: dict[int, tuple[RecordDict, int]]) -> tuple[int, list[str]]:
        """Ask the nodes for their pages 1.. in lockstep and fold each into the node's running mean.

        ``first`` maps partition -> (collapsed content of page 0, number of pages); updated in place.
        Only one page per node is in flight at a time, so memory stays at a page whatever the users.
        Returns the users rejected on those pages and why.
        """
        rejected, reasons = 0, []
        node_of = {pid: nid for nid, pid in self.partitions(self._grid).items()}
        pages = {pid: n for pid, (_, n) in first.items()}
        for k in range(1, max(pages.values(), default=1)):
            conf = ConfigRecord(dict(self._train_record[self.configrecord_key]) | {P.PAGE: k})
            record = RecordDict({self.arrayrecord_key: self._train_record[self.arrayrecord_key],
                                 self.configrecord_key: conf})
            msgs = [Message(content=record, message_type=MessageType.TRAIN, dst_node_id=int(node_of[pid]))
                    for pid in sorted(pages) if pages[pid] > k]
            replies = self._in_partition_order(list(self._grid.send_and_receive(msgs, timeout=self.page_timeout)))
            self._raise_on_errors(replies)
            for msg in replies:
                pid = int(msg.content["metrics"][P.PARTITION_ID])
                content, bad_users, why = self._collapse_per_user(msg)
                rejected, reasons = rejected + bad_users, reasons + why
                if content is not None:
                    first[pid] = (_merge_means(first[pid][0], content, self.arrayrecord_key, self.weighted_by_key),
                                  pages[pid])
        return rejected, reasons

    def _user_part(self, msg: Message) -> tuple[UpdateBatch | None, int, list[str]]:
        """A node's stacked per-user reply -> (its users' valid updates as a batch, users rejected, reasons).

        A table arrives as a (U, ...) stack or, row-sparse, as each user's touched rows (``protocol.row_keys``);
        wrong names, shapes or offsets reject the reply, a user with NaN/Inf, a row id out of range or
        repeated is rejected alone."""
        arrays = msg.content.array_records.get(self.arrayrecord_key)
        wrec = msg.content.array_records.get(P.USER_WEIGHTS)
        if arrays is None or wrec is None:
            return None, 0, ["per-user reply without arrays or user-weights"]
        reported = wrec["weights"].numpy().astype(np.float64)
        n = len(reported)
        users = wrec["users"].numpy().astype(np.int64) if "users" in wrec else np.full(n, -1)
        stacked = {k: a.numpy() for k, a in arrays.items()}
        self._count(P.UPLOADED_BYTES, sum(a.nbytes for a in stacked.values()))
        sparse = sorted(k for k in self._reference if k not in stacked and P.row_keys(k)[0] in stacked)
        if set(stacked) != (set(self._reference) - set(sparse)) | {key for k in sparse for key in P.row_keys(k)}:
            return None, n, ["array names differ from the global model's"]
        if len(users) != n:
            return None, n, [f"user ids for {len(users)} users, weights for {n}"]
        good = np.isfinite(reported) & (reported > 0)
        reasons = []
        for k, a in stacked.items():
            if k not in self._reference:
                continue  # a row-sparse table's parts, checked below
            if a.shape != (n, *self._reference[k]):
                return None, n, [f"array {k!r} has shape {a.shape}, expected {(n, *self._reference[k])}"]
            if a.dtype.kind == "f":
                finite = np.isfinite(a.reshape(n, -1)).all(1)
                if not finite.all():
                    reasons.append(f"array {k!r} contains NaN or Inf")
                good &= finite
        rows: dict[str, RowUpdates] = {}
        for k in sparse:
            ru, bad, why = _decode_rows(stacked, k, n, self._reference[k], self._base(k))
            if ru is None:
                return None, n, why
            reasons += why
            good &= ~bad
            rows[k] = ru
        for k in sorted(set(self.row_sparse_names) & set(self._reference) | set(sparse)):  # rows sent vs full arrays'
            self._count(P.UPLOADED_ROWS, len(rows[k].rows) if k in rows else n * self._reference[k][0])
            self._count(P.UPLOADED_ROWS_DENSE, n * self._reference[k][0])
        if not good.any():
            return None, n, reasons or ["no user with a positive weight"]
        if good.all():  # no copy when all are good
            kept = {k: v for k, v in stacked.items() if k in self._reference}
        else:
            kept = {k: v[good] for k, v in stacked.items() if k in self._reference}
            rows = {k: ru.select(good) for k, ru in rows.items()}
        pid = int(msg.content["metrics"].get(P.PARTITION_ID, -1))
        weights = derive_weights(reported[good], self.weighting, self.weight_cap)
        return (UpdateBatch(kept, users[good], np.full(int(good.sum()), pid), weights, rows=rows),
                int((~good).sum()), reasons)

    def _base(self, name: str) -> np.ndarray:
        """The round's global table ``name`` as numpy (what row-sparse deltas apply to), converted once."""
        if name not in self._bases:
            self._bases[name] = self._global_arrays[name].numpy()
        return self._bases[name]

    def _count(self, key: str, value: float) -> None:
        self._uploaded[key] = self._uploaded.get(key, 0.0) + float(value)

    def _collapse_per_user(self, msg: Message) -> tuple[RecordDict | None, int, list[str]]:
        """A node's stacked per-user reply -> (node-level content, users rejected, reasons)."""
        part, rejected, reasons = self._user_part(msg)
        if part is None:
            return None, rejected, reasons
        combined = weighted_mean(part)
        return self._content(combined, msg.content["metrics"], float(part.weights.sum())), rejected, reasons

    def _content(self, arrays: dict[str, np.ndarray], metrics, weight: float) -> RecordDict:
        return RecordDict({self.arrayrecord_key: ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                           "metrics": MetricRecord(dict(metrics) | {self.weighted_by_key: weight, P.PER_USER_REPLY: 0})})

    def _batch_round(self, replies: list[Message]) -> tuple[list, int, list[str]]:
        """A batch rule's round: every node's users in one :class:`UpdateBatch`, the rule's result as the
        one reply the strategy's own aggregation (FedAvg's mean of one, FedAdam's server step) sees."""
        parts, rejected, reasons = [], 0, []
        for msg in replies:
            metrics = msg.content.metric_records.get("metrics")
            if metrics is None or float(metrics.get(self.weighted_by_key, 0)) == 0:
                continue
            if not int(metrics.get(P.PER_USER_REPLY, 0)):
                rejected += 1
                reasons.append("a node sent a mean where the aggregation rule needs every user's update")
                continue
            part, bad, why = self._user_part(msg)
            rejected, reasons = rejected + bad, reasons + why
            if part is not None:
                parts.append(part)
        if not parts:
            return [], rejected, reasons
        batch = UpdateBatch.concat(parts)
        result = self.batch_rule(batch)  # a class's staticmethod or an instance's configured rule
        metrics = dict(replies[0].content["metrics"]) | _summed_counts(replies) | {
            "trained-users": float(len(batch)), P.PARTITION_ID: -1}  # the whole round's users, no one partition's
        return [_Reply(self._content(result, metrics, float(batch.weights.sum())))], rejected, reasons

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        """Flower's FedAvg.configure_train, with the silos chosen by partition (see the module docstring).

        Subclasses' own additions to the config (FedProx's ``proximal-mu``) are kept: Flower's
        configure_train of the subclass is run for its record; the nodes it drew are discarded.
        """
        self._reference = {k: tuple(a.numpy().shape) for k, a in arrays.items()}
        self._global_arrays = arrays  # what per-update rules measure updates against
        self._bases: dict[str, np.ndarray] = {}  # numpy copies of global tables that row-sparse deltas apply to
        self._t_train = time.perf_counter()
        rnd = self.round_offset + server_round
        cfg = self._round_config(server_round, config)
        self.partitions(grid)  # first: waits for every node and learns their partitions
        flower_msgs = list(super().configure_train(server_round, arrays, cfg, grid))
        if not flower_msgs:
            return []
        record = flower_msgs[0].content
        self._grid, self._train_record = grid, record  # later pages of per-user uploads reuse them
        return self._messages(record, self.sampled_partitions(rnd), grid, MessageType.TRAIN)

    def _raise_on_errors(self, replies: list[Message]) -> None:
        for msg in replies:
            if msg.has_error():
                raise ClientFailure(f"a ClientApp failed: {msg.error.reason}")

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        self._uploaded: dict[str, float] = {}  # upload volume of the round's per-user replies (_user_part)
        replies = self._in_partition_order(list(replies))
        self._raise_on_errors(replies)
        if self.batch_rule is not None:
            replies, rejected, reasons = self._batch_round(replies)
        else:
            replies, rejected, reasons = self._with_all_pages(replies)
        good, empty, transformed = [], 0, {}
        for msg in replies:
            metrics = msg.content.metric_records.get("metrics")
            if metrics is not None and float(metrics.get(self.weighted_by_key, -1)) == 0:
                empty += 1  # a node none of whose users trained this round: nothing to aggregate
                continue
            if metrics is not None and int(metrics.get("per-user", 0)):
                content, bad_users, why_users = self._collapse_per_user(msg)
                rejected += bad_users
                reasons += why_users
                if content is None:
                    continue
                msg = _Reply(content)
            arrays = msg.content.array_records.get(self.arrayrecord_key)
            metrics = msg.content.metric_records.get("metrics")
            if arrays is None or metrics is None:
                why = "no ArrayRecord/MetricRecord in the reply"
            else:
                why = check_update(self._reference, arrays)
                n = float(metrics.get(self.weighted_by_key, 0))
                if why is None and not (math.isfinite(n) and n > 0):
                    why = f"{self.weighted_by_key} is {n}"
            if why is None:
                msg, capped = self._bounded_weight(msg, n)
                if capped:
                    transformed["capped-weights"] = transformed.get("capped-weights", 0.0) + 1
                for transform in self.reply_transforms:
                    content, counts = transform(msg.content, self._global_arrays)
                    msg = _Reply(content)
                    for key, value in counts.items():
                        transformed[key] = transformed.get(key, 0.0) + float(value)
                good.append(msg)
            else:
                rejected += 1
                reasons.append(why)
        # The global round (not the resumed session's local one): FedAdam's bias correction uses it.
        arrays, metrics = super().aggregate_train(self.round_offset + server_round, good) if good else (None, None)
        self.last_train = dict(metrics or {}) | {"clients": len(good), "rejected-updates": rejected,
                                                 "empty-replies": empty} | transformed | self._uploaded
        def reported(key: str) -> list[float]:
            return [float(m.content["metrics"][key]) for m in replies
                    if m.content.metric_records.get("metrics") is not None and key in m.content["metrics"]]

        for key in COUNTED:
            if reported(key):
                self.last_train[key] = sum(reported(key))
        mechanism_counts = sorted({k for m in replies if m.content.metric_records.get("metrics") is not None
                                   for k in m.content["metrics"] if k.startswith("count/")})
        for key in mechanism_counts:
            self.last_train[key] = sum(reported(key))
        for key in ("dp-epsilon", "dp-noise-multiplier"):  # per-silo DP-SGD: the weakest silo's guarantee
            if reported(key):
                self.last_train[key] = max(reported(key))
        if reasons:
            self.last_train["rejected-reasons"] = sorted(set(reasons))[:5]
        self.last_train_s = time.perf_counter() - self._t_train
        return arrays, metrics

    def _bounded_weight(self, msg, n: float):
        """A node's reported weight, capped at what the server knows its partition can weigh
        (``weight_bounds``: its users, or their capped interactions); never a client's own word."""
        if self.weight_bounds is None or self.weighted_by_key != P.NUM_EXAMPLES:
            return msg, False
        pid = int(msg.content["metrics"].get(P.PARTITION_ID, -1))
        bound = self.weight_bounds.get(pid)
        if bound is None or n <= bound:
            return msg, False
        content = RecordDict({self.arrayrecord_key: msg.content[self.arrayrecord_key],
                              "metrics": MetricRecord(dict(msg.content["metrics"]) | {self.weighted_by_key: float(bound)})})
        return _Reply(content), True

    def _with_all_pages(self, replies: list[Message]) -> tuple[list, int, list[str]]:
        """Replies with pages: each node's pages folded into one node-level reply (mean over its users).
        Returns the replies, the users rejected on the pages and why."""
        first: dict[int, tuple[RecordDict, int]] = {}
        out, rejected, reasons = [], 0, []
        for msg in replies:
            metrics = msg.content["metrics"]
            if int(metrics.get(P.PAGES, 1)) <= 1:
                out.append(msg)
                continue
            content, bad_users, why = self._collapse_per_user(msg)
            rejected, reasons = rejected + bad_users, reasons + why
            if content is None:  # page 0 unusable: start the node's mean from its next good page
                content = RecordDict({"metrics": MetricRecord(dict(metrics) | {self.weighted_by_key: 0.0})})
            first[int(metrics[P.PARTITION_ID])] = (content, int(metrics[P.PAGES]))
        if not first:
            return replies, 0, []
        more, why = self._later_pages(first)
        # a node's folded content is a node-level mean reply (per-user flag cleared by _content)
        out += [_Reply(content) for content, _ in first.values() if self.arrayrecord_key in content.array_records]
        return self._in_partition_order(out), rejected + more, reasons + why

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        self._t_eval = time.perf_counter()
        self.last_eval = None
        rnd = self.round_offset + server_round
        if self.fraction_evaluate == 0 or (self.evaluates_in is not None and not self.evaluates_in(rnd)):
            return []  # no node evaluation this round (train.eval_every)
        cfg = self._round_config(server_round, config)
        cfg["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: cfg})
        return self._messages(record, range(self.num_nodes), grid, MessageType.EVALUATE)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        replies = self._in_partition_order(list(replies))
        self._raise_on_errors(replies)
        if not replies:
            self.last_eval = None
            return None
        self.last_eval = super().aggregate_evaluate(server_round, replies)
        self.last_eval_s = time.perf_counter() - self._t_eval
        return self.last_eval

    # State a resumed run needs (server optimiser moments / momentum).
    STATE_ATTRS = ("current_arrays", "m_t", "v_t", "momentum_vector")

    def state(self) -> dict:
        return {a: getattr(self, a) for a in self.STATE_ATTRS if hasattr(self, a)}

    def load_state(self, st: dict) -> None:
        for k, v in st.items():
            setattr(self, k, v)


def _summed_counts(replies, keys=COUNTED) -> dict[str, float]:
    """The per-round counts (``keys`` and every mechanism's ``count/...``) summed over replies."""
    metrics = [m.content["metrics"] for m in replies if m.content.metric_records.get("metrics") is not None]
    names = set(keys) | {k for mr in metrics for k in mr if k.startswith("count/")}
    return {k: float(sum(float(mr[k]) for mr in metrics if k in mr)) for k in sorted(names)
            if any(k in mr for mr in metrics)}


def _decode_rows(stacked: dict[str, np.ndarray], name: str, n: int, shape: tuple,
                 base: np.ndarray) -> tuple[RowUpdates | None, np.ndarray | None, list[str]]:
    """A row-sparse table of a per-user reply -> (its RowUpdates, (n,) bool users to reject, reasons).

    Offsets that are not a partition of the entries (not from 0 to nnz, or decreasing) attribute no
    row to any user for sure: the reply is rejected (RowUpdates None). A user whose row ids leave
    [0, n_rows) or are not strictly increasing (a row twice would count twice), or whose values have
    NaN/Inf, is rejected alone."""
    rkey, okey, vkey = P.row_keys(name)
    rows, offsets, values = stacked[rkey], stacked[okey], stacked[vkey]
    if rows.ndim != 1 or rows.dtype.kind not in "iu" or offsets.shape != (n + 1,) or offsets.dtype.kind not in "iu":
        return None, None, [f"table {name!r}: row ids and offsets must be integer arrays of shapes (nnz,) and "
                            f"({n + 1},), got {rows.dtype}{rows.shape} and {offsets.dtype}{offsets.shape}"]
    if values.shape != (len(rows), *shape[1:]) or values.dtype.kind != "f":
        return None, None, [f"table {name!r}: values of shape {values.shape} ({values.dtype}), expected "
                            f"{(len(rows), *shape[1:])} floats"]
    offsets = offsets.astype(np.int64)
    counts = np.diff(offsets)
    if offsets[0] != 0 or offsets[-1] != len(rows) or (counts < 0).any():
        return None, None, [f"table {name!r}: offsets do not rise monotonically from 0 to the {len(rows)} rows sent"]
    rows = rows.astype(np.int64)  # a uint64 id beyond int64 turns negative: out of range below
    user = np.repeat(np.arange(n), counts)
    repeated = np.zeros(len(rows), bool)
    repeated[1:] = (user[1:] == user[:-1]) & (rows[1:] <= rows[:-1])
    finite = np.isfinite(values.reshape(len(rows), int(np.prod(shape[1:])))).all(1)
    bad, reasons = np.zeros(n, bool), []
    for entries, why in (((rows < 0) | (rows >= shape[0]), f"row ids out of range [0, {shape[0]})"),
                         (repeated, "row ids not strictly increasing within a user"),
                         (~finite, "values contain NaN or Inf")):
        if entries.any():
            bad[user[entries]] = True
            reasons.append(f"table {name!r}: {why}")
    return RowUpdates(base, offsets, rows, values), bad, reasons


def _merge_means(a: RecordDict, b: RecordDict, arrays_key: str, weight_key: str) -> RecordDict:
    """Two weighted means (arrays + weight in metrics) -> the weighted mean of their union."""
    wa, wb = float(a["metrics"][weight_key]), float(b["metrics"][weight_key])
    if wa == 0:
        return b
    total = wa + wb
    arrays = {k: ((wa * v.numpy().astype(np.float64) + wb * b[arrays_key][k].numpy()) / total).astype(v.numpy().dtype)
              for k, v in a[arrays_key].items()}
    metrics = dict(a["metrics"]) | _summed_counts([_Reply(a), _Reply(b)], ("trained-users",))
    metrics[weight_key] = total
    if "train-loss" in b["metrics"]:
        metrics["train-loss"] = (wa * float(a["metrics"].get("train-loss", 0)) + wb * float(b["metrics"]["train-loss"])) / total
    return RecordDict({arrays_key: ArrayRecord({k: Array(v) for k, v in arrays.items()}), "metrics": MetricRecord(metrics)})


class FedrecFedAvg(FedrecMixin, FedAvg):
    """FedAvg (McMahan et al., 2017)."""


class FedrecFedProx(FedrecMixin, FedProx):
    """FedProx (Li et al., 2020): clients add mu/2 ||w - w_global||^2."""


class FedrecFedAdam(FedrecMixin, FedAdam):
    """FedAdam (Reddi et al., 2021): server-side Adam on the pseudo-gradient."""


class FedrecFedYogi(FedrecMixin, FedYogi):
    """FedYogi (Reddi et al., 2021)."""


class FedrecFedAvgM(FedrecMixin, FedAvgM):
    """FedAvgM (Hsu et al., 2019): server momentum."""


class FedrecUserMedian(FedrecMixin, FedAvg):
    """Coordinate-wise median over every sampled user's update of the round, from all nodes
    (cross-device; Yin et al., ICML 2018). Flower's FedMedian takes the median over node uploads."""

    batch_rule = staticmethod(coordinate_median)


class FedrecUserRowMedian(FedrecMixin, FedAvg):
    """The FedRec-aware median (cross-device, row-sparse item tables): each item row the median over only the
    sampled users who touched it (:func:`strategies.update_batch.row_median`), dense tables the
    coordinate-wise median over all users; the aggregation Spattack-style defenses build on."""

    batch_rule = staticmethod(row_median)


class FedrecRowClipSum(FedrecMixin, FedAvg):
    """FedRecAttack's server (Rong et al., ICDE 2022; cross-device, row-sparse item tables): the new
    item table is the global one plus the sum over the round's users of their row deltas, each row
    clipped to L2 norm ``row_clip`` (:func:`strategies.update_batch.row_clip_sum`). With one local SGD
    step at rate lr the delta is -lr times the client's gradient, so ``row_clip = lr * g`` is the
    official per-row gradient clip g (1.0) and the sum is the official step ``-lr * sum of clipped
    gradients``: a gradient step on the batch of clients, not a mean."""

    def __init__(self, *args, row_clip: float = 0.01, **kwargs):
        if not float(row_clip) > 0:
            raise ConfigError(f"strategy.row_clip: must be positive, got {row_clip}")
        super().__init__(*args, **kwargs)
        self.row_clip = float(row_clip)
        self.batch_rule = partial(row_clip_sum, bound=self.row_clip)


# Flower's Byzantine-robust rules over the round's node-level uploads (one model per silo, or per node of
# users in cross-device mode): fedrec's layer (sampling, upload checks, partition order) around Flower's
# arithmetic. Rules over every *user* of the round are batch rules (``user_median``, ``row_clip_sum``).
class FedrecKrum(FedrecMixin, Krum):
    """Krum (Blanchard et al., NeurIPS 2017): the upload with the smallest sum of squared distances to its
    n - f - 2 nearest others (``num_malicious_nodes`` = f)."""


class FedrecMultiKrum(FedrecMixin, MultiKrum):
    """Multi-Krum (Blanchard et al., 2017): the mean of the ``num_nodes_to_select`` best Krum uploads."""


class FedrecBulyan(FedrecMixin, Bulyan):
    """Bulyan (El Mhamdi et al., ICML 2018): Multi-Krum selection, then a coordinate-wise trimmed mean."""


class FedrecFedMedian(FedrecMixin, FedMedian):
    """Coordinate-wise median of the node uploads (Yin et al., ICML 2018)."""


class FedrecFedTrimmedAvg(FedrecMixin, FedTrimmedAvg):
    """Coordinate-wise trimmed mean of the node uploads, ``beta`` cut from each end (Yin et al., 2018)."""


STRATEGIES = {"fedavg": FedrecFedAvg, "fedprox": FedrecFedProx, "fedadam": FedrecFedAdam,
              "fedyogi": FedrecFedYogi, "fedavgm": FedrecFedAvgM, "krum": FedrecKrum, "multikrum": FedrecMultiKrum,
              "bulyan": FedrecBulyan, "fedmedian": FedrecFedMedian, "fedtrimmedavg": FedrecFedTrimmedAvg,
              "user_median": FedrecUserMedian, "user_row_median": FedrecUserRowMedian, "row_clip_sum": FedrecRowClipSum}


def build_strategy(cfg_strategy, *, num_nodes: int, fraction: float, seed: int, client_evaluation: bool,
                   round_offset: int = 0, cls=None) -> FedrecMixin:
    """A configured strategy from ``conf/strategy/<name>.yaml`` (keys = the Flower constructor's)."""
    from omegaconf import OmegaConf

    params = OmegaConf.to_container(cfg_strategy, resolve=True) if OmegaConf.is_config(cfg_strategy) else dict(cfg_strategy)
    name = params.pop("name", None)
    if name not in STRATEGIES:
        raise ConfigError(f"strategy.name: unknown strategy {name!r}; expected one of {sorted(STRATEGIES)}")
    if not 0 < fraction <= 1:
        raise ConfigError(f"federation.fraction: must be in (0, 1], got {fraction}")
    if "fraction_evaluate" in params:
        raise ConfigError("strategy.fraction_evaluate: set by fedrec (federation.evaluation decides who evaluates)")
    try:
        strategy = (cls or STRATEGIES[name])(evaluate_metrics_aggr_fn=exact_metric_mean, **params)
    except TypeError as e:
        raise ConfigError(f"strategy: {e}") from None
    if not client_evaluation:
        # Set after construction: FedAvg(fraction_evaluate=0.0) logs a WARNING "Federated evaluation will
        # be skipped" on every run, though server-side evaluation is the intended default, not a problem.
        strategy.fraction_evaluate, strategy.min_evaluate_nodes = 0.0, 0
    strategy.setup(num_nodes=num_nodes, fraction=fraction, seed=seed, round_offset=round_offset)
    return strategy
