"""``python -m simulations.leaderboard dataset=... [models=[...]] [tune.trials=N]``: one tuned leaderboard.

For every model, the same budget of ``tune.trials`` Optuna trials (TPE, seeded) over the model's
search space of ``conf/leaderboard/spaces.yaml``; each trial is one ordinary centralised run
(``fedrec.experiment.execute`` -> ``fedrec.central``: epochs with early stopping on validation, or one
fit for a training-free model). The trial with the best validation ``train.select_metric``
(recall@20) is the model's entry; its test figures (those of its chosen epoch, computed in the same
scoring pass as validation, DiffRec's protocol) are the only test figures the leaderboard reads:
no choice, of epoch, trial or hyperparameter, ever looks at test. A model whose space is empty (Pop)
runs once. Trial 0 is the model's conf/model defaults when they lie in the space
(``tune.defaults_first``), so tuning never reports below the paper's setting on validation.

Writes to ``out`` (default ``<paths.output_root>/leaderboard/<dataset>_<time>``): ``leaderboard.md``
and ``leaderboard.csv`` (Recall@10/20, NDCG@10/20, ``capped_recall@K`` = hits / min(K, |test|) when
the evaluation reports it, trials, train seconds, evaluation seconds per 1,000 users, parameter
count), ``trials.csv`` (every trial's values and validation figure), ``leaderboard.png`` (bar
chart), and each trial's run folder under ``runs/``. One line per trial is printed while it runs.

Every other argument is a Hydra override of the run config (``dataset=ml-100k-all``, ``seed=1``,
``device=cuda``, ``train.epochs=300``), applied to every trial after the space's ``fixed`` values;
``federation`` is always ``none``. Bad model names, bad
spaces or bad overrides fail with one ``error:`` line before the first trial.

Columns: *train s* = the chosen trial's total training time (its epochs, or its one fit); *eval s /
1k users* = the median time of one evaluation of the chosen trial (scoring every item for every
user, masking, top-K and the metric sums of both splits) per 1,000 users; *params* = the entries of
the chosen trial's saved model state (trainable parameters, plus the fitted item-item matrix of a
training-free model).
"""

from __future__ import annotations

import csv
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fedrec.errors import ConfigError

CONF = Path(__file__).resolve().parent.parent / "conf" / "leaderboard"
LEADERBOARD_KEYS = ("models", "tune", "out")
COLUMN_METRICS = ("recall@10", "recall@20", "ndcg@10", "ndcg@20")
CAPPED = ("capped_recall@10", "capped_recall@20")
_MISSING = object()


# ----------------------------------------------------------------------------- configuration
@dataclass
class Param:
    """One dimension of a search space: a config path and its distribution."""

    key: str
    kind: str  # float | int | categorical
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: list | None = None

    def suggest(self, trial) -> Any:
        if self.kind == "float":
            return trial.suggest_float(self.key, self.low, self.high, log=self.log)
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), log=self.log)
        return trial.suggest_categorical(self.key, self.choices)

    def contains(self, value: Any) -> bool:
        if self.kind == "categorical":
            return value in self.choices
        try:
            return self.low <= float(value) <= self.high
        except (TypeError, ValueError):
            return False


@dataclass
class ModelSpec:
    name: str
    fixed: dict[str, Any] = field(default_factory=dict)  # overrides applied to every trial of the model
    space: list[Param] = field(default_factory=list)


def _param(model: str, key: str, spec: Any) -> Param:
    where = f"spaces.{model}.space.{key}"
    if not isinstance(spec, dict) or spec.get("type") not in ("float", "int", "categorical"):
        raise ConfigError(f"{where}: needs type float | int | categorical")
    unknown = set(spec) - {"type", "low", "high", "log", "choices"}
    if unknown:
        raise ConfigError(f"{where}: unknown field {sorted(unknown)[0]!r}")
    if spec["type"] == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}: a categorical needs a non-empty choices list")
        return Param(key, "categorical", choices=list(choices))
    low, high, log = spec.get("low"), spec.get("high"), bool(spec.get("log", False))
    if not isinstance(low, (int, float)) or not isinstance(high, (int, float)) or not low < high:
        raise ConfigError(f"{where}: needs numeric low < high, got low={low!r} high={high!r}")
    if log and low <= 0:
        raise ConfigError(f"{where}: a log scale needs low > 0, got {low}")
    if spec["type"] == "int" and (int(low) != low or int(high) != high):
        raise ConfigError(f"{where}: an int range needs integer bounds")
    return Param(key, spec["type"], float(low), float(high), log)


def load_spaces(path: Path = CONF / "spaces.yaml") -> dict[str, ModelSpec]:
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True) or {}
    specs = {}
    for model, entry in raw.items():
        entry = entry or {}
        unknown = set(entry) - {"fixed", "space"}
        if unknown:
            raise ConfigError(f"spaces.{model}: unknown field {sorted(unknown)[0]!r}; expected fixed, space")
        space = [_param(model, k, v) for k, v in (entry.get("space") or {}).items()]
        specs[model] = ModelSpec(model, dict(entry.get("fixed") or {}), space)
    return specs


def split_argv(argv: list[str]) -> tuple[DictConfig, list[str]]:
    """(the leaderboard's own options over conf/leaderboard/default.yaml, the run config's Hydra overrides)."""
    own = [a for a in argv if a.split("=", 1)[0].split(".", 1)[0] in LEADERBOARD_KEYS]
    base = OmegaConf.load(CONF / "default.yaml")
    for a in own:
        if "=" not in a:
            raise ConfigError(f"{a}: expected KEY=VALUE")
        key = a.split("=", 1)[0]
        if OmegaConf.select(base, key, default=_MISSING) is _MISSING:
            raise ConfigError(f"{key}: unknown leaderboard option; known: models, tune.trials, tune.seed, "
                              "tune.sampler, tune.defaults_first, out")
    opts = OmegaConf.merge(base, OmegaConf.from_dotlist(own))
    return opts, [a for a in argv if a not in own]


def _override_value(value: Any) -> str:
    """A Python value as a Hydra override value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_override_value(v) for v in value) + "]"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def trial_overrides(base: list[str], model: str, fixed: dict, values: dict, run_root: Path) -> list[str]:
    """One trial's run config: the model, its space's fixed values, then the command line's overrides
    (so ``train.epochs=300`` raises every SGD model's budget), then the trial's sampled values."""
    return [f"model={model}", "federation=none", "checkpoint.keep=1",
            *(f"{k}={_override_value(v)}" for k, v in fixed.items()), *base, f"paths.output_root={run_root}",
            *(f"{k}={_override_value(v)}" for k, v in values.items())]


def check_plan(opts: DictConfig, overrides: list[str], specs: dict[str, ModelSpec]) -> tuple[list[str], int]:
    """Models to run and the trial budget; rejects every bad name, space and override before any work."""
    from fedrec.config import compose, validate
    from fedrec.models import REGISTRY, model_config

    models = list(opts.models)
    if not models:
        raise ConfigError("models: empty; name at least one model")
    for m in models:
        if m not in REGISTRY:
            raise ConfigError(f"models: unknown model {m!r}; expected some of {sorted(REGISTRY)}")
        if m not in specs:
            raise ConfigError(f"models: {m!r} has no search space in conf/leaderboard/spaces.yaml")
    if len(set(models)) != len(models):
        raise ConfigError(f"models: a model is listed twice: {models}")
    trials = int(opts.tune.trials)
    if trials < 1:
        raise ConfigError(f"tune.trials: must be >= 1, got {trials}")
    if opts.tune.sampler not in ("tpe", "random"):
        raise ConfigError(f"tune.sampler: expected tpe or random, got {opts.tune.sampler!r}")
    if any(a.split("=", 1)[0].lstrip("+~") in ("federation", "model") for a in overrides):
        raise ConfigError("federation/model: the leaderboard sets them itself (federation=none, model= each of models)")
    for m in models:
        try:
            cfg = compose(trial_overrides(overrides, m, specs[m].fixed, {}, Path("/nonexistent")))
        except ConfigError:
            raise
        except Exception as e:  # Hydra's own errors (an unknown group or key) -> one line
            raise ConfigError(f"models.{m}: the run config does not compose: {str(e).splitlines()[0]}") from None
        for p in specs[m].space:
            if OmegaConf.select(cfg, p.key, default=_MISSING) is _MISSING:
                raise ConfigError(f"spaces.{m}.space.{p.key}: no such key in the composed config of model {m!r}")
        validate(cfg)
        model_config(cfg.model)  # the model's typed config: bad fixed values fail now
    return models, trials


# ----------------------------------------------------------------------------- tuning
def _execute(cfg: DictConfig) -> dict:
    from fedrec.experiment import execute

    return execute(cfg, None, progress=False)


def tune_model(name: str, spec: ModelSpec, overrides: list[str], opts: DictConfig, out: Path,
               log=print) -> tuple[list[dict], dict]:
    """Every trial of one model (dicts: number, values, valid figure, summary) and the chosen one."""
    import optuna

    from fedrec.config import compose

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trials = int(opts.tune.trials) if spec.space else 1
    seed = int(opts.tune.seed)
    sampler = optuna.samplers.TPESampler(seed=seed) if opts.tune.sampler == "tpe" else \
        optuna.samplers.RandomSampler(seed=seed)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    run_root = out / "runs" / name
    base_cfg = compose(trial_overrides(overrides, name, spec.fixed, {}, run_root))
    select = str(base_cfg.train.select_metric)
    if bool(opts.tune.defaults_first) and spec.space:
        defaults = {p.key: OmegaConf.select(base_cfg, p.key) for p in spec.space}
        if all(p.contains(defaults[p.key]) for p in spec.space):
            study.enqueue_trial(defaults)
    records: list[dict] = []

    def objective(trial) -> float:
        values = {p.key: p.suggest(trial) for p in spec.space}
        cfg = compose(trial_overrides(overrides, name, spec.fixed, values, run_root))
        t0 = time.perf_counter()
        summary = _execute(cfg)
        value = float(summary["valid"].get(select, math.nan))
        records.append({"number": trial.number, "values": values, "valid": value, "summary": summary,
                        "wall_s": time.perf_counter() - t0})
        best = max(r["valid"] for r in records if not math.isnan(r["valid"]))
        shown = " ".join(f"{k.split('.')[-1]}={_short(v)}" for k, v in values.items()) or "(no hyperparameters)"
        log(f"[{name} {trial.number + 1}/{trials}] {shown} -> valid {select} {value:.4f} "
            f"(best {best:.4f}, epoch {summary['best_round']}, {records[-1]['wall_s']:.1f} s)")
        return value if not math.isnan(value) else -math.inf

    study.optimize(objective, n_trials=trials)
    chosen = max(records, key=lambda r: (r["valid"] if not math.isnan(r["valid"]) else -math.inf, -r["number"]))
    return records, chosen


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def parameter_count(run_dir: str | Path) -> int:
    """Entries of the chosen epoch's saved model state (parameters and fitted buffers)."""
    import torch

    state = torch.load(Path(run_dir) / "checkpoints" / "best.pt", map_location="cpu", weights_only=False)["model"]
    return int(sum(t.numel() for t in state.values() if hasattr(t, "numel")))


def entry(name: str, records: list[dict], chosen: dict) -> dict:
    s = chosen["summary"]
    users = int(s["dataset"].get("users") or 0)
    eval_s = s["timing"]["eval_s"]
    row = {"model": name}
    metrics = [*COLUMN_METRICS, *(k for k in CAPPED if k in s["test"])]
    for k in metrics:
        row[f"test {k}"] = s["test"].get(k, math.nan)
    row["valid " + s["select_metric"]] = chosen["valid"]
    row.update({
        "trials": len(records),
        "train s": float(sum(t for t in s["timing"]["train_s"] if t is not None)),
        "eval s / 1k users": statistics.median(eval_s) / users * 1000 if eval_s and users else math.nan,
        "params": parameter_count(s["run_dir"]),
        "best epoch": s["best_round"],
        "chosen": ", ".join(f"{k.removeprefix('model.')}={_short(v)}" for k, v in chosen["values"].items()) or "-",
    })
    return row


# ----------------------------------------------------------------------------- outputs
def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def columns(rows: list[dict]) -> list[str]:
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    return cols


def write_markdown(rows: list[dict], path: Path, title: str) -> str:
    cols = columns(rows)
    lines = [f"### {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c, math.nan)) for c in cols) + " |" for r in rows]
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def write_csv(rows: list[dict], path: Path) -> None:
    cols = columns(rows)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)


def write_trials(all_records: dict[str, list[dict]], path: Path, select: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "trial", "values", f"valid {select}", "best epoch", "wall s"])
        for model, records in all_records.items():
            for r in records:
                w.writerow([model, r["number"], " ".join(f"{k}={_short(v)}" for k, v in r["values"].items()),
                            f"{r['valid']:.6f}", r["summary"]["best_round"], f"{r['wall_s']:.2f}"])


def write_chart(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    keys = [k for k in ("test recall@20", "test ndcg@20", "test capped_recall@20") if any(k in r for r in rows)]
    x = np.arange(len(rows))
    width = 0.8 / len(keys)
    fig, ax = plt.subplots(figsize=(max(7.0, 0.9 * len(rows) + 4), 4))
    for j, k in enumerate(keys):
        ax.bar(x + (j - (len(keys) - 1) / 2) * width, [r.get(k, math.nan) for r in rows], width, label=k)
    ax.set_xticks(x, [r["model"] for r in rows], rotation=30, ha="right")
    ax.set_ylabel("test (chosen on validation)")
    ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the bars, never over one
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- driver
def run_leaderboard(argv: list[str], log=print) -> dict:
    """Parse, check everything, tune every model, write the outputs; returns {rows, out, minutes}."""
    from fedrec.config import compose

    opts, overrides = split_argv(argv)
    specs = load_spaces()
    models, trials = check_plan(opts, overrides, specs)
    probe = compose(trial_overrides(overrides, models[0], specs[models[0]].fixed, {}, Path("/nonexistent")))
    # the dataset's config name (ml-100k-all) when given, else its name key (shared by a dataset's variants)
    named = [a.split("=", 1)[1] for a in overrides if a.split("=", 1)[0] == "dataset"]
    dataset = named[-1] if named else str(probe.dataset.name)
    out = Path(opts.out) if opts.out else Path(probe.paths.output_root) / "leaderboard" / \
        f"{dataset}_{datetime.now().strftime('%Y-%m-%d_%H-%M-%S')}"
    out.mkdir(parents=True, exist_ok=True)
    log(f"leaderboard: {len(models)} models x {trials} trials on {dataset} -> {out}")
    t0 = time.perf_counter()
    rows, all_records = [], {}
    for m in models:
        records, chosen = tune_model(m, specs[m], overrides, opts, out, log)
        all_records[m] = records
        rows.append(entry(m, records, chosen))
    minutes = (time.perf_counter() - t0) / 60
    title = f"{dataset}: {trials} trials per model, chosen on valid {probe.train.select_metric} (seed {probe.seed})"
    text = write_markdown(rows, out / "leaderboard.md", title)
    write_csv(rows, out / "leaderboard.csv")
    write_trials(all_records, out / "trials.csv", str(probe.train.select_metric))
    write_chart(rows, out / "leaderboard.png", title)
    log(text)
    log(f"total {minutes:.1f} min; written: {out}/leaderboard.md, leaderboard.csv, trials.csv, leaderboard.png")
    return {"rows": rows, "out": out, "minutes": minutes, "trials": all_records}


def main(argv: list[str] | None = None) -> int:
    from fedrec.logs import quiet_flower
    from simulations.cli import run_reporting_input_errors

    quiet_flower(False)
    return run_reporting_input_errors(lambda: run_leaderboard(list(sys.argv[1:] if argv is None else argv),
                                                              log=lambda s: print(s, flush=True)))


if __name__ == "__main__":
    sys.exit(main())
