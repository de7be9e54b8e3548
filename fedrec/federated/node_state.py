"""A node's state between rounds, kept by the node itself on its own disk.

What a node must remember from one round to the next never goes to the server: private parameters
(BPR's user embeddings), persistent buffers (DiffRec's importance-sampling history, annealing
counters) and a silo's DP-SGD accountant history. The node writes it after every round it trains,
as ``<state-dir>/<run-id>/partition_<pid>/round_<r>.pt`` (atomically), and before round ``r`` loads
the newest file of a round ``< r``. A resumed run (server restarted from its checkpoint of round R)
therefore finds exactly the state the node had after round R, even if the killed session had
already written later rounds, which the resumed run then overwrites.

Where the state directory comes from: the node-config key ``state-dir`` (a real SuperNode's own
disk), else, in simulation, a directory inside the run folder that the server names in the message
(every simulated node runs on the server's machine). Without either, state lives in the node's memory
(``context.state``) and restarts with the process.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

_ROUND_FILE = re.compile(r"round_(\d+)\.pt$")


class NodeStateStore:
    def __init__(self, root: str | Path, run_id: str, partition_id: int, keep: int = 3):
        self.dir = Path(root) / run_id / f"partition_{int(partition_id)}"
        self.keep = keep

    def _rounds(self) -> list[int]:
        if not self.dir.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.dir.iterdir() if (m := _ROUND_FILE.match(p.name)))

    def load_before(self, round_: int) -> dict | None:
        """The state saved after the newest round < ``round_``, or None (the node never trained before)."""
        earlier = [r for r in self._rounds() if r < round_]
        if not earlier:
            return None
        return torch.load(self.dir / f"round_{earlier[-1]:06d}.pt", weights_only=False)

    def save(self, round_: int, state: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        target = self.dir / f"round_{round_:06d}.pt"
        tmp = target.with_name(target.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, target)
        # Files of later rounds were written by a killed session and are stale now; of the rest,
        # the newest ``keep`` stay.
        rounds = self._rounds()
        stale = [r for r in rounds if r > round_]
        current = [r for r in rounds if r <= round_]
        for r in stale + current[:-self.keep]:
            (self.dir / f"round_{r:06d}.pt").unlink(missing_ok=True)
