"""Keys of the Flower records that the ServerApp, the strategies and the ClientApp exchange.

One place for every key, so that the server and the nodes cannot drift apart. Config keys travel
server -> node in the message's ConfigRecord ``config``; metric keys node -> server in ``metrics``.
"""

from __future__ import annotations

# --- server -> node (ConfigRecord "config")
CONFIG = "fedrec-config"  # the resolved Hydra config as YAML
ROUND = "fedrec-round"  # the global round (1-based; continues across a resume)
RUN_ID = "fedrec-run-id"  # names the run, so that a node's state directory can hold several runs
RESUMED_AT = "fedrec-resumed-at"  # the round a resumed run continues after (0: not resumed)
STATE_DIR_HINT = "fedrec-state-dir"  # simulation only: where nodes on this machine keep their state
USER_THRESHOLD = "fedrec-user-threshold"  # cross-device: users whose key <= threshold take part
PER_USER = "fedrec-per-user"  # cross-device: 1 = upload every user's model, 0 = the weighted mean
PAGE = "fedrec-page"  # per-user uploads come in pages: which page of the node's users to train and send
PAGE_SIZE = "fedrec-page-size"  # users per page (set from federation.memory_budget_gb by the server)
CLIP = "fedrec-clip"  # user-level DP: nodes clip each user's update to this L2 norm
PROXIMAL_MU = "proximal-mu"  # FedProx's key (set by Flower's FedProx)
QUERY_PARTITION = "partition"  # query message: which partition does this node host?

# --- node -> server (MetricRecord "metrics")
NUM_EXAMPLES = "num-examples"
PARTITION_ID = "partition-id"  # the partition a node hosts (node-config key of the same name)
UNIT_WEIGHT = "unit-weight"  # 1.0 for every node: equal weights (node-level DP)
PER_USER_REPLY = "per-user"  # 1: the reply stacks one model per user (with USER_WEIGHTS)
USER_WEIGHTS = "user-weights"  # ArrayRecord of a per-user reply: "weights" (reported) and "users" (global ids)
PAGES = "pages"  # per-user reply: how many pages the node's users fill this round
CLIPPED_SUM = "clipped-sum"  # 1: the reply is the sum of clipped user updates (user-level DP)

# Row-sparse tables in a per-user reply (a model's ``row_sparse_parameter_names``, federation.sparse_rows=auto):
# table T travels as three arrays of the reply's ArrayRecord instead of the (U, n_rows, ...) stack "T".
# User u's entries are [offsets[u], offsets[u + 1]); each is one row the user's update changed, its id
# and its delta (trained minus the round's global row). Every other row of the user's update is zero.
ROWS_SUFFIX = "/rows"  # (nnz,) int64 row ids, strictly increasing within a user
OFFSETS_SUFFIX = "/offsets"  # (U + 1,) int64, offsets[0] = 0, non-decreasing, offsets[U] = nnz
VALUES_SUFFIX = "/values"  # (nnz, ...) the rows' deltas, the table's dtype


def row_keys(name: str) -> tuple[str, str, str]:
    """The (rows, offsets, values) keys of row-sparse table ``name`` (torch names never contain "/")."""
    return name + ROWS_SUFFIX, name + OFFSETS_SUFFIX, name + VALUES_SUFFIX


# per-round upload volume the server measures on per-user replies (metrics.jsonl "train")
UPLOADED_ROWS = "uploaded-rows"  # rows of the model's row-sparse tables received, summed over users
UPLOADED_ROWS_DENSE = "uploaded-rows-dense"  # the same tables' rows had every user sent full arrays
UPLOADED_BYTES = "uploaded-bytes"  # bytes of the per-user arrays received (dense stacks, rows, offsets, values)

# --- node-config keys (set per SuperNode, or by the simulation)
NODE_PARTITION_ID = "partition-id"
NODE_NUM_PARTITIONS = "num-partitions"
NODE_DATA_PATH = "data-path"
NODE_STATE_DIR = "state-dir"  # the node's own disk for state between rounds (exact resume)
