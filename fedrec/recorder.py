"""Per-round bookkeeping shared by centralised and federated runs.

After every epoch (centralised) or round (federated) the recorder appends one line to
``metrics.jsonl``, saves a checkpoint, tracks the best round by the validation metric the config
selects (DiffRec selects by Recall@20) and keeps the test metrics *of that round* — the protocol of
the DiffRec paper, so the reported test figure was chosen without looking at test data.
An optional ``sink`` (fedrec/loggers.py, e.g. TensorBoard) gets each line right after it is written.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

from fedrec.runs import RunFolder


class Recorder:
    def __init__(self, run: RunFolder, select_metric: str, progress=None, sink=None):
        self.run = run
        self.sink = sink
        self.select_metric = select_metric
        self.progress = progress
        self.best_round = 0
        self.best_value = -math.inf
        self.best = {"valid": {}, "test": {}}
        self.last = {"valid": {}, "test": {}}
        self.train_s: list[float] = []
        self.eval_s: list[float] = []
        self.rounds_done = 0
        self.started = time.time()
        self.elapsed_before = 0.0  # wall time of earlier sessions of a resumed run
        self.extra: dict[str, Any] = {}

    def state(self) -> dict:
        return {k: getattr(self, k) for k in ("best_round", "best_value", "best", "last", "train_s", "eval_s",
                                              "rounds_done", "extra")} | {
            "elapsed": self.elapsed_before + time.time() - self.started}

    def load_state(self, st: dict) -> None:
        for k in ("best_round", "best_value", "best", "last", "train_s", "eval_s", "rounds_done", "extra"):
            setattr(self, k, st[k])
        self.elapsed_before = st["elapsed"]

    def record(self, round_: int, train: dict | None, train_s: float | None, evaluation: dict | None,
               eval_s: float | None, checkpoint: Callable[[], dict], extra: dict | None = None) -> bool:
        """Log one round; returns True if it is the new best."""
        if train_s is not None:
            self.train_s.append(train_s)
        line: dict[str, Any] = {"round": round_, "train": train or {}, "train_s": train_s}
        improved = False
        if evaluation is not None:
            self.eval_s.append(eval_s)
            line.update(valid=evaluation.get("valid", {}), test=evaluation.get("test", {}), eval_s=eval_s)
            self.last = {"valid": evaluation.get("valid", {}), "test": evaluation.get("test", {})}
            value = evaluation.get("valid", {}).get(self.select_metric, math.nan)
            if value > self.best_value:
                self.best_value, self.best_round = value, round_
                self.best = dict(self.last)
                improved = True
        if extra:
            line.update(extra)
        self.rounds_done = round_
        self.run.append_metrics(line)
        if self.sink is not None:
            self.sink.write(line)
        self.run.save_checkpoint(round_, checkpoint() | {"round": round_, "recorder": self.state()}, best=improved)
        if self.progress is not None:
            self.progress.update(1)
            if self.best_value > -math.inf:
                self.progress.set_postfix({f"best valid {self.select_metric}": f"{self.best_value:.4f}"})
        return improved

    def summary(self) -> dict:
        return {
            "valid": self.best["valid"],
            "test": self.best["test"],
            "best_round": self.best_round,
            "select_metric": self.select_metric,
            "last": self.last,
            "rounds": self.rounds_done,
            "wall_s": self.elapsed_before + time.time() - self.started,
            "timing": {"train_s": self.train_s, "eval_s": self.eval_s},
            **self.extra,
        }
