"""What a user sees: the learning-curve plot, TensorBoard curves, and a console free of library noise."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fedrec.experiment import execute

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _lines(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_png(path: Path) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_MAGIC, path
    height, width, _ = matplotlib.image.imread(path).shape  # decodes: not just a header
    assert height > 100 and width > 100


# ----------------------------------------------------------------------------- curves.png
def test_central_run_writes_curves_png(tiny_cfg, tmp_path):
    summary = execute(tiny_cfg("federation=none", "train.epochs=2"), tmp_path / "run", progress=False)
    assert summary["rounds"] == 2
    assert_png(tmp_path / "run" / "curves.png")
    assert not list((tmp_path / "run").glob("*.tmp"))


def test_curves_without_evaluations_still_plot_the_loss(tmp_path):
    from fedrec.plots import write_curves

    lines = [{"round": r, "train": {"train-loss": 1.0 / r}, "train_s": 0.1} for r in (1, 2, 3)]
    assert_png(write_curves(lines, tmp_path / "curves.png", "recall@20"))


def test_scalars_name_the_curves_of_both_run_kinds():
    from fedrec.plots import scalars

    central = {"round": 2, "train": {"loss": 3.0, "examples": 9}, "train_s": 0.5,
               "valid": {"recall@20": 0.25, "ndcg@20": None}, "test": {"recall@20": 0.5}, "eval_s": 0.1}
    assert scalars(central) == {"train/loss": 3.0, "valid/recall@20": 0.25, "test/recall@20": 0.5,
                                "seconds/train": 0.5, "seconds/eval": 0.1}  # None (a NaN in the file) skipped
    federated = {"round": 1, "train": {"train-loss": 2.0, "clients": 3}, "train_s": None}
    assert scalars(federated) == {"train/loss": 2.0}


def test_a_failing_plot_keeps_the_summary(tiny_cfg, tmp_path, monkeypatch, caplog):
    import fedrec.plots

    def broken(*a, **k):
        raise RuntimeError("no backend")

    monkeypatch.setattr(fedrec.plots, "write_curves", broken)
    with caplog.at_level(logging.WARNING, logger="fedrec"):
        summary = execute(tiny_cfg("federation=none", "train.epochs=1"), tmp_path / "run", progress=False)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["rounds"] == summary["rounds"] == 1
    assert not (tmp_path / "run" / "curves.png").exists()
    assert "curves.png not written: RuntimeError: no backend" in caplog.text


# ----------------------------------------------------------------------------- logger=tensorboard
def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_logger_writes_the_curves(tiny_cfg, tmp_path):
    cfg = tiny_cfg("federation=none", "train.epochs=3", "train.eval_every=2", "logger=tensorboard")
    execute(cfg, tmp_path / "run", progress=False)
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    got = _scalars(tmp_path / "run" / "tensorboard")
    lines = _lines(tmp_path / "run")
    assert got["train/loss"] == [(x["round"], pytest.approx(x["train"]["loss"])) for x in lines]
    for split in ("valid", "test"):
        assert got[f"{split}/ndcg@20"] == [(x["round"], pytest.approx(x[split]["ndcg@20"])) for x in lines[1:]]
    assert [s for s, _ in got["seconds/train"]] == [1, 2, 3] and [s for s, _ in got["seconds/eval"]] == [2, 3]


def test_tensorboard_resume_records_each_round_once(tiny_cfg, tmp_path, monkeypatch):
    """A killed run re-records the rounds after its last checkpoint; TensorBoard keeps the new ones only."""
    import fedrec.runs

    real = fedrec.runs.RunFolder.save_checkpoint

    def die_at_3(self, round_, state, best=False):
        if round_ == 3:
            raise KeyboardInterrupt
        return real(self, round_, state, best)

    cfg = ["federation=none", "train.epochs=4", "logger=tensorboard", "checkpoint.keep=5"]
    monkeypatch.setattr(fedrec.runs.RunFolder, "save_checkpoint", die_at_3)
    with pytest.raises(KeyboardInterrupt):  # round 3 is in metrics.jsonl and TensorBoard, not in a checkpoint
        execute(tiny_cfg(*cfg), tmp_path / "run", progress=False)
    monkeypatch.setattr(fedrec.runs.RunFolder, "save_checkpoint", real)
    summary = execute(tiny_cfg(*cfg, "resume=true"), None, progress=False)
    assert Path(summary["run_dir"]) == tmp_path / "run"
    got = _scalars(tmp_path / "run" / "tensorboard")
    lines = _lines(tmp_path / "run")
    assert got["train/loss"] == [(x["round"], pytest.approx(x["train"]["loss"])) for x in lines]
    assert [s for s, _ in got["train/loss"]] == [1, 2, 3, 4]
    assert_png(tmp_path / "run" / "curves.png")


@pytest.mark.parametrize("overrides, key", [
    (["logger=tensorboard", "+logger.flush_sec=1"], "logger.flush_sec"),
    (["logger.name=wandb"], "logger.name"),
])
def test_bad_logger_config_names_the_key_before_any_file(tiny_cfg, tmp_path, overrides, key):
    from fedrec.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(key)):
        execute(tiny_cfg("federation=none", *overrides), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- the console
def test_quiet_flower_drops_only_the_run_simulation_notice(caplog):
    from flwr.common.logger import log, warn_deprecated_feature

    from fedrec.logs import quiet_flower

    flwr = logging.getLogger("flwr")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    flwr.addHandler(handler)
    try:
        quiet_flower(False)
        warn_deprecated_feature("The `run_simulation` function is deprecated and will be removed")
        warn_deprecated_feature("Something else")
        log(logging.ERROR, "a node failed")
        log(logging.INFO, "configure_train: Sampled 3 nodes")
        assert [r.getMessage().split(":")[0] for r in records] == ["DEPRECATED FEATURE", "a node failed"]
        assert "Something else" in records[0].getMessage()
        records.clear()
        quiet_flower(True)  # verbose: Flower's whole log
        warn_deprecated_feature("The `run_simulation` function is deprecated and will be removed")
        assert len(records) == 1
    finally:
        flwr.removeHandler(handler)
        quiet_flower(False)


def test_server_evaluation_builds_the_strategy_without_flower_warning():
    from strategies import build_strategy

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    flwr = logging.getLogger("flwr")
    flwr.addHandler(handler)
    try:
        s = build_strategy({"name": "fedavg"}, num_nodes=3, fraction=1.0, seed=0, client_evaluation=False)
    finally:
        flwr.removeHandler(handler)
    assert s.fraction_evaluate == 0.0 and s.min_evaluate_nodes == 0
    assert [r.getMessage() for r in records if r.levelno >= logging.WARNING] == []


NOISE = {
    "alembic": r"alembic",
    "run_simulation-deprecation": r"DEPRECATED FEATURE",
    "fraction_evaluate": r"fraction_evaluate",
    "ray-future-warning": r"FutureWarning",
}


@pytest.fixture(scope="module")
def cli_silo_run(tmp_path_factory):
    """``python -m simulations.run`` as a user types it (a tiny silo federation on Ray), output captured."""
    from tests.conftest import TINY, TINY_MODEL

    out = tmp_path_factory.mktemp("cli-silo")
    cmd = [sys.executable, "-m", "simulations.run", *TINY, *TINY_MODEL["diffrec"], "federation.num_nodes=2",
           "federation.rounds=2", "federation.ray_cpus=2", f"paths.output_root={out}"]
    env = os.environ | {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout, p.stderr


@pytest.mark.slow
@pytest.mark.parametrize("noise", sorted(NOISE))
def test_cli_prints_no_library_noise(cli_silo_run, noise):
    stdout, stderr = cli_silo_run
    hits = [line for line in (stdout + stderr).splitlines() if re.search(NOISE[noise], line)]
    assert hits == [], "\n".join(hits)


@pytest.mark.slow
def test_cli_prints_bar_table_and_run_folder_only(cli_silo_run):
    stdout, stderr = cli_silo_run
    bar = [line for line in re.split(r"[\r\n]", stderr) if line.strip()]
    assert bar and all(line.startswith("rounds:") for line in bar), stderr
    lines = stdout.splitlines()
    assert lines[0].split()[0] == "split" and set(lines[1]) == {"-"}
    assert [line.split()[0] for line in lines[2:4]] == ["valid", "test"]
    assert lines[4].startswith("wall time ") and lines[5].startswith("run folder: ") and len(lines) == 6
    run = Path(lines[5].removeprefix("run folder: "))
    assert_png(run / "curves.png")  # a silo run gets its curves too
