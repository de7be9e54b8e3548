"""Peak memory of this process and every process it started (Ray's raylet, workers, ...), from /proc.

``TreeMemory`` samples in a background thread: the sum over the process tree of the proportional
set size (PSS: shared pages, e.g. Ray's object store or torch's libraries, counted once in total)
and of the resident set size (RSS: shared pages counted in every process), and the largest single
process. Linux only; elsewhere it reports nothing rather than a wrong figure.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        ppid = int(text[text.rindex(")") + 2:].split()[1])
        kids.setdefault(ppid, []).append(int(stat.parent.name))
    return kids


def tree_pids(root: int) -> list[int]:
    kids, out, todo = _children_map(), [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += kids.get(pid, [])
    return out


def _rollup_kb(pid: int) -> tuple[int, int]:
    """(Rss, Pss) of one process in KiB."""
    rss = pss = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss = int(line.split()[1])
            elif line.startswith("Pss:"):
                pss = int(line.split()[1])
    except OSError:
        pass
    return rss, pss


class TreeMemory:
    def __init__(self, interval_s: float = 0.25):
        self.interval = interval_s
        self.peak_pss_gb = self.peak_rss_gb = self.peak_single_rss_gb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.available = Path("/proc/self/smaps_rollup").exists()

    def sample(self) -> None:
        sizes = [_rollup_kb(p) for p in tree_pids(os.getpid())]
        gb = 2**20
        self.peak_rss_gb = max(self.peak_rss_gb, sum(r for r, _ in sizes) / gb)
        self.peak_pss_gb = max(self.peak_pss_gb, sum(p for _, p in sizes) / gb)
        self.peak_single_rss_gb = max(self.peak_single_rss_gb, max((r for r, _ in sizes), default=0) / gb)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.interval)

    def __enter__(self) -> "TreeMemory":
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.available:
            self._stop.set()
            self._thread.join()
            self.sample()

    def figures(self) -> dict:
        if not self.available:
            return {"memory": "unavailable (no /proc/self/smaps_rollup)"}
        return {"peak_tree_pss_gb": round(self.peak_pss_gb, 3), "peak_tree_rss_gb": round(self.peak_rss_gb, 3),
                "peak_single_process_rss_gb": round(self.peak_single_rss_gb, 3)}
