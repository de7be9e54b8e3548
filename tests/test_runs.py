"""The run folder, resuming, and the CLI's promise that bad input leaves nothing behind."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from fedrec.config import compose
from fedrec.runs import RunFolder, find_resumable

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- RunFolder
def test_summary_is_atomic_and_clean(tmp_path):
    run = RunFolder(tmp_path / "r")
    run.write_config(OmegaConf.create({"a": 1}))
    assert not run.finished
    run.write_summary({"test": {"recall@10": 0.5, "ndcg@10": math.nan}, "x": [math.inf, 1.0]})
    assert run.finished
    data = json.loads((run.path / "summary.json").read_text())
    assert data == {"test": {"recall@10": 0.5, "ndcg@10": None}, "x": [None, 1.0]}
    # a failing write leaves the previous file intact and no temporary behind
    with pytest.raises(TypeError):
        run.write_summary({"bad": object()})
    assert json.loads((run.path / "summary.json").read_text()) == data
    assert sorted(p.name for p in run.path.iterdir()) == ["config.yaml", "summary.json"]


def test_config_written_resolved(tmp_path):
    run = RunFolder(tmp_path / "deep" / "r")
    run.write_config(OmegaConf.create({"a": 2, "b": "${a}"}))
    assert OmegaConf.load(run.path / "config.yaml") == OmegaConf.create({"a": 2, "b": 2})


def test_metrics_append_read_truncate(tmp_path):
    run = RunFolder(tmp_path)
    assert run.read_metrics() == []
    for r in range(1, 6):
        run.append_metrics({"round": r, "valid": {"recall@20": r / 10, "bad": math.nan}})
    lines = run.read_metrics()
    assert [line["round"] for line in lines] == [1, 2, 3, 4, 5]
    assert lines[0]["valid"] == {"recall@20": 0.1, "bad": None}
    run.truncate_metrics(3)
    assert [line["round"] for line in run.read_metrics()] == [1, 2, 3]
    run.append_metrics({"round": 4})
    assert [line["round"] for line in run.read_metrics()] == [1, 2, 3, 4]
    run.truncate_metrics(0)
    assert run.read_metrics() == []
    assert not list(tmp_path.glob("*.tmp"))


def test_checkpoints_keep_last_n_and_best(tmp_path):
    run = RunFolder(tmp_path, keep=2)
    assert run.latest_checkpoint() is None and run.best_checkpoint() is None
    for r in range(1, 7):
        run.save_checkpoint(r, {"round": r, "w": torch.full((2,), float(r))}, best=r in (2, 3))
    names = sorted(p.name for p in run.ckpt_dir.iterdir())
    assert names == ["best.pt", "round_00005.pt", "round_00006.pt"]
    assert run.latest_checkpoint()["round"] == 6
    best = run.best_checkpoint()
    assert best["round"] == 3 and torch.equal(best["w"], torch.full((2,), 3.0))
    run.save_checkpoint(7, {"round": 7}, best=True)
    assert run.best_checkpoint()["round"] == 7
    assert sorted(p.name for p in run.ckpt_dir.iterdir()) == ["best.pt", "round_00006.pt", "round_00007.pt"]


# ----------------------------------------------------------------------------- find_resumable
def _cfg(**over):
    return OmegaConf.create({"seed": 0, "resume": False, "train": {"epochs": 4}} | over)


def _run(root: Path, name: str, cfg, *, finished=False, checkpoint=True, mtime=None) -> Path:
    run = RunFolder(root / "runs" / name)
    run.write_config(cfg)
    if checkpoint:
        run.save_checkpoint(1, {"round": 1})
    if finished:
        run.write_summary({})
    if mtime is not None:
        os.utime(run.path, (mtime, mtime))
    return run.path


def test_find_resumable(tmp_path):
    cfg = _cfg()
    assert find_resumable(tmp_path / "missing", cfg) is None
    assert find_resumable(tmp_path, cfg) is None
    _run(tmp_path, "finished", cfg, finished=True, mtime=5_000)
    _run(tmp_path, "other-seed", _cfg(seed=1), mtime=4_000)
    _run(tmp_path, "other-epochs", _cfg(train={"epochs": 5}), mtime=4_500)
    _run(tmp_path, "no-checkpoint", cfg, checkpoint=False, mtime=6_000)
    assert find_resumable(tmp_path, cfg) is None
    older = _run(tmp_path, "older", cfg, mtime=1_000)
    assert find_resumable(tmp_path, cfg) == older
    newer = _run(tmp_path, "newer", _cfg(resume=True), mtime=2_000)  # `resume` itself is not compared
    assert find_resumable(tmp_path, cfg) == newer
    assert find_resumable(tmp_path, _cfg(resume=True)) == newer
    assert find_resumable(tmp_path, _cfg(seed=1)) == tmp_path / "runs" / "other-seed"


# ----------------------------------------------------------------------------- exact centralised resume
TINY = ["dataset.n_users=80", "dataset.n_items=60", "model=diffrec", "model.dims=[16,32]", "model.steps=5",
        "federation=none", "train.epochs=4"]


class Killed(Exception):
    pass


def _comparable_lines(lines):
    return [{k: v for k, v in line.items() if k not in ("train_s", "eval_s")} for line in lines]


def _assert_same(a, b, tol=1e-6):
    if isinstance(a, dict):
        assert set(a) == set(b)
        for k in a:
            _assert_same(a[k], b[k], tol)
    elif isinstance(a, float):
        assert b == pytest.approx(a, abs=tol)
    else:
        assert a == b


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    from fedrec.experiment import execute

    tmp = tmp_path_factory.mktemp("full")
    cfg = compose(TINY + [f"paths.output_root={tmp}"])
    summary = execute(cfg, tmp / "a", progress=False)
    return summary, RunFolder(tmp / "a").read_metrics()


@pytest.mark.parametrize("kill", [
    "after-checkpoint-2",
    "before-checkpoint-3",
    "during-checkpoint-1",
])
def test_central_resume_is_exact(tmp_path, monkeypatch, uninterrupted, kill):
    """A run killed mid-way and resumed with resume=true gives the uninterrupted run's numbers."""
    from fedrec.experiment import execute

    want_summary, want_lines = uninterrupted
    root = tmp_path / "out"
    save = RunFolder.save_checkpoint

    def killing_save(self, round_, state, best=False):
        if kill == "before-checkpoint-3" and round_ == 3:
            raise Killed  # metrics line 3 is written, its checkpoint is not
        if kill == "during-checkpoint-1" and round_ == 1:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)  # killed while torch.save wrote round_00001.pt.tmp
            (self.ckpt_dir / "round_00001.pt.tmp").write_bytes(b"partial")
            raise Killed
        save(self, round_, state, best)
        if kill == "after-checkpoint-2" and round_ == 2:
            raise Killed

    with monkeypatch.context() as m:
        m.setattr(RunFolder, "save_checkpoint", killing_save)
        with pytest.raises(Killed):
            execute(compose(TINY + [f"paths.output_root={root}"]), root / "runs" / "b", progress=False)
    b = RunFolder(root / "runs" / "b")
    assert not b.finished
    assert len(b.read_metrics()) == {"after-checkpoint-2": 2, "before-checkpoint-3": 3, "during-checkpoint-1": 1}[kill]

    import fedrec.central

    trained = []
    train_epoch = fedrec.central.train_epoch
    monkeypatch.setattr(fedrec.central, "train_epoch", lambda *a, **k: trained.append(1) or train_epoch(*a, **k))
    summary = execute(compose(TINY + [f"paths.output_root={root}", "resume=true"]), None, progress=False)
    assert len(trained) == (4 if kill == "during-checkpoint-1" else 2)  # only epochs after the checkpoint ran again
    if kill != "during-checkpoint-1":  # with no checkpoint, resuming in place or afresh are both fine
        assert Path(summary["run_dir"]) == b.path
        assert [p.name for p in (root / "runs").iterdir()] == ["b"]
    lines = RunFolder(summary["run_dir"]).read_metrics()
    assert [line["round"] for line in lines] == [1, 2, 3, 4]
    _assert_same(_comparable_lines(want_lines), _comparable_lines(lines))
    for key in ("valid", "test", "best_round", "rounds", "last"):
        _assert_same(want_summary[key], summary[key])
    assert len(summary["timing"]["train_s"]) == 4


# ----------------------------------------------------------------------------- CLI: bad input
# Each case is a fresh interpreter importing torch (~2 s CPU); keep the list short.
BAD = {
    "epochs": (["train.epochs=0"], "train.epochs"),
    "ks": (["eval.ks=[5000]", "train.select_metric=recall@5000"], "eval.ks"),
    "model-name": (["model.name=nope"], "model.name"),
    "negative-rate": (["model.optim.lr=-0.1"], "model.optim.lr"),
    "missing-data": (["dataset=atomic", "dataset.path=/nonexistent", "dataset.name=x"], "/nonexistent"),
    "hydra-group": (["model=nope"], None),
    "logger-group": (["logger=nope"], None),
    "logger-key": (["federation=none", "logger=tensorboard", "+logger.flush_sec=1"], "logger.flush_sec"),
}


@pytest.fixture(scope="module")
def cli_failures(tmp_path_factory):
    """Start every bad-input CLI run at once (they are independent) and collect the results."""
    tmp = tmp_path_factory.mktemp("cli")
    procs = {}
    for case, (args, _) in BAD.items():
        out = tmp / case
        cmd = [sys.executable, "-m", "simulations.run", *args,
               f"paths.output_root={out}"]
        procs[case] = (out, subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                             text=True, env=os.environ | {"HYDRA_FULL_ERROR": "0"}))
    results = {}
    for case, (out, p) in procs.items():
        stdout, stderr = p.communicate(timeout=300)  # all at once: slow on a loaded 2-core machine
        results[case] = (p.returncode, stdout, stderr, out)
    return results


@pytest.mark.parametrize("case", sorted(BAD))
def test_cli_bad_input_fails_cleanly(cli_failures, case):
    rc, stdout, stderr, out = cli_failures[case]
    _, key = BAD[case]
    assert rc != 0
    if key is None:  # Hydra's own composition error, naming the group
        group = BAD[case][0][0].split("=")[0]
        assert f"{group}/nope" in stderr + stdout, stderr
    else:
        assert rc == 2
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert len(lines) == 1, stderr
        assert lines[0].startswith("error: ") and key in lines[0], lines[0]
    # no run folder (and no file at all) under the output root
    if out.exists():
        assert [p for p in out.rglob("*") if p.is_file()] == []
        for sub in ("runs", "multirun"):
            assert not (out / sub).exists() or list((out / sub).iterdir()) == []


def test_cli_inprocess_backend_runs_a_federation(tmp_path):
    """From the command line (a fresh process: no test fixture sets Flower's task identity), the in-process
    backend runs a cross-device federation to its summary."""
    cmd = [sys.executable, "-m", "simulations.run", "federation=device", "federation.backend=inprocess",
           "federation.rounds=2", "model=bpr", "threads=1", f"paths.output_root={tmp_path}"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    (summary,) = tmp_path.glob("runs/*/summary.json")
    assert json.loads(summary.read_text())["rounds"] == 2
