"""The run folder: what a researcher keeps from a run, written so that a kill loses nothing.

```
<run>/config.yaml      resolved config
<run>/metrics.jsonl    one JSON line per round/epoch (appended, flushed)
<run>/summary.json     written once at the end (atomically)
<run>/curves.png       learning curves, drawn from metrics.jsonl after summary.json (fedrec/plots.py)
<run>/tensorboard/     TensorBoard event files, with logger=tensorboard (fedrec/loggers.py)
<run>/checkpoints/     round_<n>.pt (the last ``keep``) and best.pt
```
Files are written to a temporary name and renamed, so a reader never sees half a file.
Checkpoints hold CPU tensors whatever ``device`` the run trained on, so any machine can read them.
``find_resumable`` finds the newest unfinished run with the same config for ``resume=true``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

# Keys that do not change a run's results: a run may be resumed with them changed (e.g. TensorBoard turned on).
IGNORED_FOR_RESUME = ("resume", "logger")


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _on_cpu(obj: Any) -> Any:
    """``obj`` with every tensor in its dicts, lists and tuples on the CPU; what holds no tensor off
    the CPU is returned as it is (a CPU run's checkpoint is saved unchanged)."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        moved = {k: _on_cpu(v) for k, v in obj.items()}
        if all(moved[k] is v for k, v in obj.items()):
            return obj
        out = copy.copy(obj)  # keeps the dict's type and attributes (a state_dict's _metadata)
        out.update(moved)
        return out
    if type(obj) in (list, tuple):
        moved = [_on_cpu(v) for v in obj]
        return obj if all(a is b for a, b in zip(moved, obj)) else type(obj)(moved)
    return obj


def _clean(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


class RunFolder:
    def __init__(self, path: str | Path, keep: int = 3):
        self.path = Path(path)
        self.keep = keep
        self.ckpt_dir = self.path / "checkpoints"

    # ----------------------------------------------------------- files
    def write_config(self, cfg: DictConfig) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.path / "config.yaml", lambda p: p.write_text(OmegaConf.to_yaml(cfg, resolve=True)))

    def append_metrics(self, record: dict) -> None:
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(_clean(record)) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read_metrics(self) -> list[dict]:
        p = self.path / "metrics.jsonl"
        if not p.exists():
            return []
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]

    def truncate_metrics(self, last_round: int) -> None:
        """Drop lines after ``last_round`` (written after the checkpoint a resume starts from)."""
        keep = [r for r in self.read_metrics() if r["round"] <= last_round]
        _atomic_write(self.path / "metrics.jsonl",
                      lambda p: p.write_text("".join(json.dumps(r) + "\n" for r in keep)))

    def write_summary(self, summary: dict) -> None:
        _atomic_write(self.path / "summary.json", lambda p: p.write_text(json.dumps(_clean(summary), indent=2)))

    @property
    def finished(self) -> bool:
        return (self.path / "summary.json").exists()

    # ----------------------------------------------------------- checkpoints
    def save_checkpoint(self, round_: int, state: dict, best: bool = False) -> None:
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        target = self.ckpt_dir / f"round_{round_:05d}.pt"
        state = _on_cpu(state)
        _atomic_write(target, lambda p: torch.save(state, p))
        if best:
            shutil.copyfile(target, self.ckpt_dir / "best.tmp")
            os.replace(self.ckpt_dir / "best.tmp", self.ckpt_dir / "best.pt")
        rounds = sorted(self.ckpt_dir.glob("round_*.pt"))
        for old in rounds[: max(0, len(rounds) - self.keep)]:
            old.unlink()

    def latest_checkpoint(self) -> dict | None:
        rounds = sorted(self.ckpt_dir.glob("round_*.pt"))
        return torch.load(rounds[-1], weights_only=False) if rounds else None

    def best_checkpoint(self) -> dict | None:
        p = self.ckpt_dir / "best.pt"
        return torch.load(p, weights_only=False) if p.exists() else None


def comparable(cfg: DictConfig) -> dict:
    c = OmegaConf.to_container(cfg, resolve=True)
    for key in IGNORED_FOR_RESUME:
        c.pop(key, None)
    return c


def find_resumable(root: str | Path, cfg: DictConfig) -> Path | None:
    """Newest run folder under ``root`` with the same config and no summary.json."""
    root = Path(root)
    if not root.exists():
        return None
    want = comparable(cfg)
    candidates = sorted((p.parent for p in root.rglob("config.yaml")), key=lambda p: p.stat().st_mtime, reverse=True)
    for run in candidates:
        if (run / "summary.json").exists() or not (run / "checkpoints").exists():
            continue
        if comparable(OmegaConf.load(run / "config.yaml")) == want:
            return run
    return None
