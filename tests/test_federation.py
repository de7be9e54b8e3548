"""Flower end to end on tiny synthetic data: ServerApp + ClientApp on the Ray simulation engine (federation.backend=ray) and on the in-process transport."""

from __future__ import annotations

import json

import pytest


from fedrec.experiment import execute
from tests.test_run_output import assert_png


def _lines(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_silo_fedavg_diffrec_server_evaluation(tiny_cfg, tmp_path):
    # Prepare: 3 silos, 2 rounds, fraction 1 -> every round must train exactly 3 clients,
    # including round 1 (Flower's FedAvg alone may under-sample round 1 in simulation).
    cfg = tiny_cfg("federation=silo", "federation.num_nodes=3", "federation.rounds=2", "federation.backend=ray")
    # Execute
    summary = execute(cfg, tmp_path / "run", progress=False)
    # Assert
    lines = _lines(tmp_path / "run")
    assert [x["round"] for x in lines] == [1, 2]
    assert all(x["train"]["clients"] == 3 and x["train"]["rejected-updates"] == 0 for x in lines)
    assert summary["test"]["ndcg@20"] > 0 and summary["federation"] == "silo"
    assert len(summary["timing"]["train_s"]) == 2 and len(summary["timing"]["eval_s"]) == 2
    assert (tmp_path / "run" / "checkpoints" / "best.pt").exists()
    assert (tmp_path / "run" / "config.yaml").exists()
    assert_png(tmp_path / "run" / "curves.png")  # the learning curves of a silo run


def test_silo_bpr_private_embeddings_client_evaluation(tiny_cfg, tmp_path):
    # BPR's user embeddings are private: the server never receives them, so evaluation runs on the
    # nodes and the strategy pools their metric sums. Fraction 0.5 of 4 nodes = 2 per round.
    cfg = tiny_cfg("federation=silo", "federation.num_nodes=4", "federation.rounds=2",
                   "federation.fraction=0.5", "strategy=fedprox", model="bpr")
    summary = execute(cfg, tmp_path / "run", progress=False)
    lines = _lines(tmp_path / "run")
    assert all(x["train"]["clients"] == 2 for x in lines)
    import torch

    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "best.pt", weights_only=False)
    assert "user_emb.weight" not in ckpt["arrays"] and "item_emb.weight" in ckpt["arrays"]
    assert 0 <= summary["test"]["recall@20"] <= 1 and summary["valid"]["ndcg@10"] >= 0


def _kill_after(run, round_: int, rounds: int) -> None:
    """What a kill -9 during round ``round_ + 1`` leaves: no summary, no later checkpoint or metrics line."""
    (run / "summary.json").unlink()
    for r in range(round_ + 1, rounds + 1):
        (run / "checkpoints" / f"round_{r:05d}.pt").unlink(missing_ok=True)
    lines = [x for x in (run / "metrics.jsonl").read_text().splitlines() if json.loads(x)["round"] <= round_]
    (run / "metrics.jsonl").write_text("".join(x + "\n" for x in lines))


def _strip_timings(lines):
    return [{k: v for k, v in x.items() if not k.endswith("_s")} for x in lines]


@pytest.mark.parametrize("mode,model,extra", [
    # BPR: private user embeddings live on the nodes; fraction 0.5: which silos train is keyed by the round
    ("silo", "bpr", ["federation.num_nodes=4", "federation.fraction=0.5", "strategy=fedavgm", "federation.backend=ray"]),
    # MultVAE cross-device with two local Adam steps: annealing and per-user randomness keyed by the round
    ("device", "multvae", ["federation.num_nodes=2", "federation.local_optimizer=adam", "train.local_epochs=2",
                           "federation.user_fraction=0.5", "model.total_anneal_steps=4"]),
])
def test_federated_resume_is_exact(tiny_cfg, tmp_path, mode, model, extra):
    """A run killed after round 2 of 4 and resumed ends exactly where the uninterrupted run ended."""
    args = [f"federation={mode}", "federation.rounds=4", *extra]
    full = execute(tiny_cfg(*args, model=model), tmp_path / "run", progress=False)
    run = tmp_path / "run"
    uninterrupted = _strip_timings(_lines(run))
    _kill_after(run, 2, 4)
    resumed = execute(tiny_cfg(*args, "resume=true", model=model), None, progress=False)
    assert resumed["run_dir"] == str(run)
    assert _strip_timings(_lines(run)) == uninterrupted  # every round, train and eval, identical
    assert resumed["test"] == full["test"] and resumed["best_round"] == full["best_round"]


def test_client_evaluation_follows_eval_every(tiny_cfg, tmp_path):
    cfg = tiny_cfg("federation=silo", "federation.num_nodes=2", "federation.rounds=3", "train.eval_every=2",
                   model="bpr")
    execute(cfg, tmp_path / "run", progress=False)
    assert [("valid" in x) for x in _lines(tmp_path / "run")] == [False, True, True]  # round 2 and the last


def test_silo_resume_continues_after_last_checkpoint(tiny_cfg, tmp_path):
    """A federated run killed after round 1 resumes from its checkpoint (global model, strategy state)."""
    cfg = tiny_cfg("federation=silo", "federation.num_nodes=2", "federation.rounds=2", "strategy=fedavgm")
    execute(cfg, tmp_path / "run", progress=False)
    run = tmp_path / "run"
    # simulate a kill during round 2: its checkpoint, metrics line and the summary never got written
    (run / "summary.json").unlink()
    (run / "checkpoints" / "round_00002.pt").unlink()
    resumed = tiny_cfg("federation=silo", "federation.num_nodes=2", "federation.rounds=2", "strategy=fedavgm",
                       "resume=true")
    summary = execute(resumed, None, progress=False)
    assert summary["run_dir"] == str(run)
    assert [x["round"] for x in _lines(run)] == [1, 2]
    assert summary["rounds"] == 2 and len(summary["timing"]["train_s"]) == 2


@pytest.mark.parametrize("mode,model,extra", [
    ("silo", "bpr", ["federation.num_nodes=3", "federation.fraction=0.67"]),
    ("device", "diffrec", ["federation.num_nodes=2", "federation.user_fraction=0.5"]),
])
def test_inprocess_backend_matches_ray(tiny_cfg, tmp_path, mode, model, extra):
    """federation.backend=inprocess runs the same apps without Ray: every round's metrics equal the Ray run's."""
    args = [f"federation={mode}", "federation.rounds=2", *extra]
    on_ray = execute(tiny_cfg(*args, "federation.backend=ray", model=model), tmp_path / "ray", progress=False)
    inproc = execute(tiny_cfg(*args, "federation.backend=inprocess", model=model), tmp_path / "inproc", progress=False)
    assert _strip_timings(_lines(tmp_path / "inproc")) == _strip_timings(_lines(tmp_path / "ray"))
    assert inproc["test"] == on_ray["test"] and inproc["best_round"] == on_ray["best_round"]
    assert (tmp_path / "inproc" / "node-state").is_dir() == (tmp_path / "ray" / "node-state").is_dir()
