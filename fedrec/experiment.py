"""One experiment from one config: load, check, train (centrally or federated), write the run folder.

Order matters for honest failure: everything that can reject the input (config values, data files,
model construction, metric cut-offs) runs *before* the first file of the run folder is written.
"""

from __future__ import annotations

import logging
import math
from datetime import datetime
from pathlib import Path

import torch
from omegaconf import DictConfig

from fedrec.config import validate
from fedrec.errors import ConfigError
from fedrec.train import make_optimizer
from fedrec.data import load_run_data
from fedrec.eval import check_ks
from fedrec.loggers import check_logger, open_sink
from fedrec.models import build_model, data_shape
from fedrec.models.base import input_matrix
from fedrec.recorder import Recorder
from fedrec.runs import RunFolder, find_resumable
from fedrec.logs import quiet_flower  # noqa: F401  (re-exported: fedrec.experiment.quiet_flower)

log = logging.getLogger("fedrec")


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="round" if desc != "epochs" else "epoch", dynamic_ncols=True)


def execute(cfg: DictConfig, run_dir: str | Path | None, *, grid=None, progress: bool = True,
            transforms=None) -> dict:
    """Run the experiment ``cfg`` into ``run_dir`` and return its summary.

    ``transforms`` are the run's data transforms (``fedrec.data.transforms``); None: the data hooks of
    the config's mechanisms, which every node builds from the same config (``node_view``). Explicit
    transforms reach only this process: for centralised runs and tests.
    """
    validate(cfg)
    if int(cfg.get("threads", 0)) > 0:
        torch.set_num_threads(int(cfg.threads))
    from fedrec.mechanisms import build_mechanisms, data_transforms

    mechanisms = build_mechanisms(cfg)
    if transforms is None:
        transforms = data_transforms(mechanisms)
    elif transforms and cfg.federation.mode != "none":
        raise ConfigError("execute(transforms=...): explicit transforms do not reach the nodes; configure them "
                          "as a mechanism's data hook")
    data = load_run_data(cfg.dataset, int(cfg.seed), transforms)
    check_ks(cfg.eval.ks, data.n_items)
    from fedrec.eval.fairness import fairness_spec

    fairness_spec(cfg, data)  # eval.fairness on data without user groups / item categories: one line, now
    for m in mechanisms:  # before the model is built: a mechanism may change cfg.model
        for note in m.adjust_config(cfg, data):
            log.warning("note: %s", note)
    torch.manual_seed(int(cfg.seed))
    model = build_model(cfg.model, data_shape(data, seed=int(cfg.seed)))  # rejects bad model configs now
    input_matrix(model, data)  # a model's weighted input rows (T-DiffRec): built once now, or refused (no time order)
    if model.trains_by_sgd:  # training-free models (EASE, GF-CF, ...) have no optimiser block
        make_optimizer(model, cfg.model.optim)  # ... and bad rates
        if int(cfg.model.optim.batch_size) < 1:
            raise ConfigError(f"model.optim.batch_size: must be >= 1, got {cfg.model.optim.batch_size}")
    from fedrec.federated.validation import check_run

    check_run(cfg, data, model, simulated=grid is None and cfg.federation.get("backend", "ray") == "ray")  # strategy, sampling, local training, partition: before any file
    check_logger(cfg)

    resume = None
    root = Path(cfg.paths.output_root)
    if cfg.resume:
        found = find_resumable(root, cfg)
        if found is not None:
            run_dir = found
    if run_dir is None:
        run_dir = root / "runs" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S_%f")
    run = RunFolder(run_dir, keep=int(cfg.checkpoint.keep))
    if cfg.resume:
        resume = run.latest_checkpoint()
        # Lines written after the last complete checkpoint are dropped (all lines if there is none).
        run.truncate_metrics(int(resume["round"]) if resume is not None else 0)
    run.write_config(cfg)

    mode = cfg.federation.mode
    total = (int(cfg.train.epochs) if model.trains_by_sgd else 1) if mode == "none" else int(cfg.federation.rounds)
    bar = _progress(total, "epochs" if mode == "none" else "rounds") if progress else None
    if bar is not None and resume is not None:
        bar.update(int(resume["round"]))
    sink = open_sink(cfg, run.path, int(resume["round"]) if resume is not None else 0)
    recorder = Recorder(run, str(cfg.train.select_metric), bar, sink)
    try:
        if mode == "none":
            from fedrec.central import run_central

            run_central(cfg, data, recorder, resume)
        elif grid is not None:  # already inside a ServerApp (flwr run)
            from fedrec.federated.server_app import serve

            serve(grid, cfg, data, recorder, resume)
        elif cfg.federation.get("backend", "ray") == "inprocess":
            from fedrec.federated.inprocess import run_inprocess

            run_inprocess(cfg, data, recorder, resume)
        else:
            from fedrec.federated.simulation import simulate

            simulate(cfg, data, recorder, resume)
    finally:
        if bar is not None:
            bar.close()
        if sink is not None:
            sink.close()
    summary = recorder.summary() | {
        "dataset": data.summary(),
        "model": cfg.model.name,
        "federation": mode,
        "strategy": cfg.strategy.name if mode != "none" else None,
        "seed": int(cfg.seed),
        "run_dir": str(run.path),
    }
    run.write_summary(summary)  # first: a plot that fails must not cost the run its summary
    _write_curves(run, summary, "epoch" if mode == "none" else "round")
    return summary


def _write_curves(run: RunFolder, summary: dict, unit: str) -> None:
    """``curves.png`` from the whole metrics.jsonl (a resumed run's earlier sessions included)."""
    from fedrec.plots import write_curves

    try:
        write_curves(run.read_metrics(), run.path / "curves.png", summary["select_metric"], unit=unit,
                     best_round=summary["best_round"])
    except Exception as e:  # noqa: BLE001  the results are written; a missing picture is only a note
        log.warning("note: curves.png not written: %s: %s", type(e).__name__, e)


def result_table(summary: dict) -> str:
    """A plain-text table: rows valid/test, one column per metric@K."""
    keys = list(summary.get("test", {}).keys())
    if not keys:
        return "(no evaluation recorded)"
    width = max(10, *(len(k) for k in keys))
    head = "split  " + " ".join(k.rjust(width) for k in keys)
    lines = [head, "-" * len(head)]
    for split in ("valid", "test"):
        vals = summary.get(split, {})
        lines.append(split.ljust(7) + " ".join(
            (f"{vals[k]:.4f}" if k in vals and vals[k] is not None and not math.isnan(vals[k]) else "-").rjust(width)
            for k in keys))
    return "\n".join(lines)


