"""``python -m simulations.bench NAME [overrides] [bench.KEY=VALUE ...]``: named benchmarks.

Each prints one JSON object per line with its figures (seconds, ratios, metrics) and the machine's
load average beside them, since this machine is shared and noisy: ratios are measured side by side
in one process, alternating the two sides.

Benchmarks
----------
diffrec-speed
    DiffRec training epoch and full evaluation (valid + test, all users, all T steps): fedrec
    against the official implementation's loop structure (``simulations/reference_diffrec.py``),
    on the same data, model and thread count. Default data: ``dataset=diffrec-ml-1m-clean``.
    ``bench.repeats`` (2), ``bench.train_threads`` (1), ``bench.eval_threads`` (0 = torch default),
    ``bench.reference_eval`` (true). ``device=cuda`` (or ``auto``) runs both sides on the GPU
    (timings synchronise it), e.g. ``python -m simulations.bench diffrec-speed device=cuda``.
dp-step
    DiffRec training step, plain AdamW vs DP-SGD with Opacus ghost clipping (``bench.steps``, 10).
per-user-memory
    One ML-1M DiffRec cross-device round, all users sampled, every user's model uploaded
    (``federation.upload=per_user``, ``federation.memory_budget_gb=2``, one node): peak PSS/RSS of
    the whole process tree (server, Ray, node), which the paged uploads keep near the budget.
inference-steps
    Test metrics and evaluation seconds of a trained run for fewer-step (DDIM) inference.
    ``bench.run=<run folder>`` (required; uses its config and best checkpoint),
    ``bench.steps=[40,20,10,5,2,1]``.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from fedrec.errors import ConfigError
from simulations.cli import run_reporting_input_errors, split_options


def emit(**fields) -> None:
    fields.setdefault("load_avg_1m", round(os.getloadavg()[0], 2))
    print(json.dumps(fields), flush=True)


def _timed_value(fn, device=None) -> tuple[float, object]:
    """(seconds, ``fn()``); on a GPU the clock stops when its queued kernels have finished."""
    cuda = device is not None and torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    value = fn()
    if cuda:
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0, value


def _timed(fn, device=None) -> float:
    return _timed_value(fn, device)[0]


def bench_diffrec_speed(overrides: list[str], opts: dict) -> None:
    from fedrec.config import compose
    from fedrec.data import load_dataset
    from fedrec.devices import cfg_device
    from fedrec.eval import evaluate_model
    from fedrec.models import build_model, data_shape
    from fedrec.train import TrainRows, make_optimizer, train_epoch
    from simulations.reference_diffrec import official_style_epoch, official_style_evaluate

    cfg = compose(["dataset=diffrec-ml-1m-clean", "model=diffrec", "federation=none", *overrides])
    if cfg.model.name != "diffrec":
        raise ConfigError("model.name: diffrec-speed benchmarks DiffRec only")
    device = cfg_device(cfg)  # device=cuda without a GPU: one error line
    data = load_dataset(cfg.dataset, int(cfg.seed))
    repeats = int(opts.get("repeats", 2))
    bs = int(cfg.model.optim.batch_size)
    emit(bench="diffrec-speed", what="setup", dataset=cfg.dataset.name, users=data.n_users, items=data.n_items,
         train_interactions=int(data.train.nnz), torch_threads_default=torch.get_num_threads(), device=str(device),
         gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None)

    def fresh():
        torch.manual_seed(int(cfg.seed))
        m = build_model(cfg.model, data_shape(data)).to(device)
        return m, make_optimizer(m, cfg.model.optim)

    # ---- training epoch, one thread each, alternating sides
    train_threads = int(opts.get("train_threads", 1))
    default_threads = torch.get_num_threads()
    torch.set_num_threads(train_threads)
    ours, ours_opt = fresh()
    ref, ref_opt = fresh()
    rows = TrainRows(data.train, np.arange(data.n_users), device=device)
    dense = torch.from_numpy(data.train.toarray().astype(np.float32))  # the official loader's CPU tensor
    lt_hist = torch.zeros(cfg.model.steps, 10, device=device)
    lt_count = torch.zeros(cfg.model.steps, dtype=torch.long, device=device)
    rng = np.random.default_rng(0)
    t_ours, t_ref = [], []
    for _ in range(repeats):
        t_ours.append(_timed(lambda: train_epoch(ours, ours_opt, rows, bs, rng), device))
        t_ref.append(_timed(lambda: official_style_epoch(ref, ref_opt, dense, bs, lt_hist, lt_count), device))
    emit(bench="diffrec-speed", what="train_epoch", device=str(device), threads=train_threads,
         fedrec_s=round(statistics.median(t_ours), 3),
         reference_s=round(statistics.median(t_ref), 3), ratio=round(statistics.median(t_ref) / statistics.median(t_ours), 2),
         fedrec_all_s=[round(x, 3) for x in t_ours], reference_all_s=[round(x, 3) for x in t_ref])

    # ---- full evaluation (valid + test, all users, all T steps) of the same trained model
    eval_threads = int(opts.get("eval_threads", 0)) or default_threads
    torch.set_num_threads(eval_threads)
    ks = [10, 20, 50, 100]
    t_ours = []
    for _ in range(repeats):
        seconds, res = _timed_value(lambda: evaluate_model(ours, data, ks, int(cfg.eval.batch_size)), device)
        t_ours.append(seconds)
    line = dict(bench="diffrec-speed", what="full_eval", device=str(device), threads=eval_threads,
                steps=int(cfg.model.steps),
                fedrec_s=round(statistics.median(t_ours), 3), fedrec_test_recall20=round(res["test"]["recall@20"], 5),
                fedrec_test_ndcg20=round(res["test"]["ndcg@20"], 5))
    if str(opts.get("reference_eval", "true")).lower() == "true":
        # the same model: the same metrics expected
        t_ref, ref_res = _timed_value(lambda: official_style_evaluate(ours, data, ks), device)
        line.update(reference_s=round(t_ref, 3), ratio=round(t_ref / statistics.median(t_ours), 2),
                    reference_test_recall20=round(ref_res["test"][20]["recall"], 5),
                    reference_test_ndcg20=round(ref_res["test"][20]["ndcg"], 5))
    emit(**line)


def bench_inference_steps(overrides: list[str], opts: dict) -> None:
    from fedrec.data import load_dataset
    from fedrec.eval import evaluate_model
    from fedrec.models import build_model, data_shape
    from fedrec.runs import RunFolder

    if "run" not in opts:
        raise ConfigError("bench.run: give the run folder of a trained DiffRec/L-DiffRec run")
    run = RunFolder(opts["run"])
    if not (run.path / "config.yaml").exists():
        raise ConfigError(f"bench.run: {run.path}/config.yaml not found")
    cfg = OmegaConf.load(run.path / "config.yaml")
    cfg.merge_with_dotlist(overrides)
    ckpt = run.best_checkpoint()
    if ckpt is None:
        raise ConfigError(f"bench.run: {run.path}/checkpoints/best.pt not found")
    data = load_dataset(cfg.dataset, int(cfg.seed))
    steps = json.loads(str(opts.get("steps", "[40, 20, 10, 5, 2, 1]")))
    for k in steps:
        cfg.model.inference_steps = int(k)
        torch.manual_seed(int(cfg.seed))
        model = build_model(cfg.model, data_shape(data, seed=int(cfg.seed)))
        state = ckpt["model"] if "model" in ckpt else ckpt["arrays"]
        model.load_state_dict(state, strict=False)
        t0 = time.perf_counter()
        res = evaluate_model(model, data, list(cfg.eval.ks), int(cfg.eval.batch_size))
        emit(bench="inference-steps", model=cfg.model.name, inference_steps=int(k), eval_s=round(time.perf_counter() - t0, 3),
             threads=torch.get_num_threads(), **{f"test_{m}": round(v, 5) for m, v in res["test"].items()},
             **{f"valid_{m}": round(v, 5) for m, v in res["valid"].items() if m.endswith("@20")})


def _peak_rss_gb() -> float:
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return round(max(own, kids) / 2**20, 3)  # ru_maxrss is in KiB on Linux


def _run_rounds(cfg, run_dir):
    from fedrec.experiment import execute

    summary = execute(cfg, run_dir, progress=False)
    lines = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    ckpt = torch.load(Path(run_dir) / "checkpoints" / f"round_{len(lines):05d}.pt", weights_only=False)
    return summary, lines, ckpt["arrays"]


def bench_cross_device(overrides: list[str], opts: dict) -> None:
    """One cross-device round both ways: one Flower node per user vs fedrec's vectorised nodes."""
    import tempfile

    from fedrec.config import compose
    from fedrec.data import load_dataset
    from fedrec.logs import quiet_flower

    quiet_flower(False)
    base = ["dataset=ml-100k", "model=diffrec", "federation=device", "federation.rounds=2",
            "federation.user_fraction=1.0", "train.local_epochs=1", *overrides]
    probe = compose(base)
    n_users = load_dataset(probe.dataset, int(probe.seed)).n_users
    ways = {"per_user_flower_tasks": [f"federation.num_nodes={n_users}", "partition=user"],
            "vectorised_nodes": [f"federation.num_nodes={int(opts.get('nodes', 2))}"]}
    if str(opts.get("skip_flat", "false")).lower() == "true":
        ways.pop("per_user_flower_tasks")
    results, speeds = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for way, extra in ways.items():
            cfg = compose([*base, *extra, f"paths.output_root={tmp}/{way}"])
            t0 = time.perf_counter()
            summary, lines, arrays = _run_rounds(cfg, f"{tmp}/{way}/run")
            line = lines[-1]  # round 2: steady state (round 1 also pays each Ray worker's start-up)
            users = int(line["train"]["trained-users"])
            results[way] = arrays
            speeds[way] = users / line["train_s"]
            emit(bench="cross-device", way=way, nodes=int(cfg.federation.num_nodes), users_trained=users,
                 round1_train_s=round(lines[0]["train_s"], 3), round2_train_s=round(line["train_s"], 3),
                 user_updates_per_s=round(users / line["train_s"], 2),
                 total_s_incl_startup=round(time.perf_counter() - t0, 1), peak_rss_gb=_peak_rss_gb(),
                 test_ndcg20=round(summary["test"]["ndcg@20"], 6))
    if len(results) == 2:
        a, b = results["per_user_flower_tasks"], results["vectorised_nodes"]
        diff = max(float((a[k] - b[k]).abs().max()) for k in a)
        rel = max(float((a[k] - b[k]).abs().max() / (a[k].abs().max() + 1e-12)) for k in a)
        emit(bench="cross-device", what="comparison", max_abs_diff=diff, max_rel_diff=rel, identical=rel < 1e-4,
             ratio=round(speeds["vectorised_nodes"] / speeds["per_user_flower_tasks"], 2))


def bench_cross_device_round(overrides: list[str], opts: dict) -> None:
    """One cross-device round on ML-1M against a centralised epoch over the same users."""
    from fedrec.config import compose
    from fedrec.data import load_dataset
    from fedrec.federated.cross_device import train_users
    from fedrec.federated.device_node import STREAM_SAMPLE, local_training, sampling_threshold, user_coins
    from fedrec.models import build_model, data_shape
    from fedrec.train import TrainRows, make_optimizer, train_epoch

    cfg = compose(["dataset=diffrec-ml-1m-clean", "model=diffrec", "federation=device",
                   "federation.user_fraction=0.1", *overrides])
    data = load_dataset(cfg.dataset, int(cfg.seed))
    from fedrec.run_config import federation

    fed = federation(cfg)
    tau = sampling_threshold(fed, data.n_users, int(cfg.seed), 1)
    users = np.flatnonzero(user_coins(int(cfg.seed), 1, np.arange(data.n_users), STREAM_SAMPLE) <= tau)
    torch.manual_seed(int(cfg.seed))
    model = build_model(cfg.model, data_shape(data))
    rows = torch.from_numpy(data.train[users].toarray().astype(np.float32))
    local = local_training(cfg)
    per_user = str(opts.get("per_user", "false")).lower() == "true"
    t_dev, t_cen = [], []
    central = TrainRows(data.train, users)
    opt = make_optimizer(model, cfg.model.optim)
    rng = np.random.default_rng(0)
    for _ in range(int(opts.get("repeats", 3))):
        t_dev.append(_timed(lambda: train_users(model, users, rows, torch.ones(len(users)), {}, local,
                                                int(cfg.seed), 1, per_user)))
        t_cen.append(_timed(lambda: train_epoch(model, opt, central, int(cfg.model.optim.batch_size), rng)))
    emit(bench="cross-device-round", dataset=cfg.dataset.name, users=len(users), local_optimizer=local.optimizer,
         local_epochs=local.local_epochs, per_user=per_user, threads=torch.get_num_threads(),
         round_s=round(statistics.median(t_dev), 3), central_epoch_same_users_s=round(statistics.median(t_cen), 3),
         ratio=round(statistics.median(t_dev) / statistics.median(t_cen), 2), peak_rss_gb=_peak_rss_gb())


def bench_per_user_memory(overrides: list[str], opts: dict) -> None:
    """One cross-device round with every user's model uploaded (federation.upload=per_user), on Flower's
    simulation engine: peak memory of the whole process tree (server, Ray, nodes) against the budget."""
    import tempfile

    from fedrec.config import compose
    from fedrec.logs import quiet_flower
    from simulations.memory import TreeMemory

    quiet_flower(False)
    cfg_args = ["dataset=diffrec-ml-1m-clean", "model=diffrec", "federation=device", "federation.num_nodes=1",
                "federation.rounds=1", "federation.user_fraction=1.0", "federation.upload=per_user",
                "federation.memory_budget_gb=2", "train.local_epochs=1", *overrides]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose([*cfg_args, f"paths.output_root={tmp}"])
        t0 = time.perf_counter()
        with TreeMemory() as mem:
            summary, lines, _ = _run_rounds(cfg, f"{tmp}/run")
        fed = cfg.federation
        emit(bench="per-user-memory", dataset=cfg.dataset.name, model=cfg.model.name, nodes=int(fed.num_nodes),
             users_trained=int(lines[-1]["train"]["trained-users"]), upload=str(fed.upload),
             memory_budget_gb=float(fed.memory_budget_gb), round_train_s=round(lines[-1]["train_s"], 1),
             total_s=round(time.perf_counter() - t0, 1), **mem.figures(),
             test_ndcg20=round(summary["test"]["ndcg@20"], 5))


def bench_dp_step(overrides: list[str], opts: dict) -> None:
    """DiffRec training step: plain AdamW vs DP-SGD (Opacus, ghost clipping), alternating, same batch size."""
    from fedrec.config import compose
    from fedrec.data import load_dataset
    from fedrec.models import build_model, data_shape
    from fedrec.privacy.dpsgd import DPSGDTrainer, dpsgd_config
    from fedrec.train import TrainRows, make_optimizer

    cfg = compose(["dataset=diffrec-ml-1m-clean", "model=diffrec", "federation=none", "privacy=dpsgd", *overrides])
    data = load_dataset(cfg.dataset, int(cfg.seed))
    rows = TrainRows(data.train, np.arange(data.n_users))
    bs = int(cfg.model.optim.batch_size)
    steps = int(opts.get("steps", 10))
    torch.manual_seed(0)
    plain = build_model(cfg.model, data_shape(data))
    plain_opt = make_optimizer(plain, cfg.model.optim)
    private = build_model(cfg.model, data_shape(data))
    dp = DPSGDTrainer(private, make_optimizer(private, cfg.model.optim), rows, bs, dpsgd_config(cfg.privacy),
                      int(cfg.train.epochs), int(cfg.seed))
    rng = np.random.default_rng(0)

    def plain_step():
        b = rows.batch(rng.choice(len(rows), bs, replace=False))
        loss = plain.loss(b).mean()
        plain_opt.zero_grad(set_to_none=True)
        loss.backward()
        plain_opt.step()

    dp_iter = iter(dp.loader)
    sizes = []

    def dp_step():
        nonlocal dp_iter
        try:
            (idx,) = next(dp_iter)
        except StopIteration:
            dp_iter = iter(dp.loader)
            (idx,) = next(dp_iter)
        sizes.append(len(idx))
        b = rows.batch(idx.numpy())
        loss = dp.criterion(dp.module(b.users, b.x)) if dp.criterion is not None else dp.module(b.users, b.x).mean()
        loss.backward()
        dp.optimizer.step()
        dp.optimizer.zero_grad(set_to_none=True)

    plain.train()
    dp.module.train()
    for fn in (plain_step, dp_step):  # warm-up
        fn()
    t_plain, t_dp = [], []
    for _ in range(steps):
        t_plain.append(_timed(plain_step))
        t_dp.append(_timed(dp_step))
    p, d = statistics.median(t_plain), statistics.median(t_dp)
    emit(bench="dp-step", dataset=cfg.dataset.name, batch_size=bs, mean_dp_batch=round(float(np.mean(sizes)), 1),
         grad_sample_mode=dp.mode, threads=torch.get_num_threads(), plain_step_s=round(p, 4), dp_step_s=round(d, 4),
         ratio=round(d / p, 2))


BENCHMARKS = {"dp-step": bench_dp_step, "diffrec-speed": bench_diffrec_speed, "inference-steps": bench_inference_steps,
              "cross-device": bench_cross_device, "cross-device-round": bench_cross_device_round,
              "per-user-memory": bench_per_user_memory}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in BENCHMARKS:
        print(f"usage: python -m simulations.bench NAME [overrides]; NAME in {sorted(BENCHMARKS)}", file=sys.stderr)
        return 2
    overrides, opts = split_options(argv[1:], "bench")
    return run_reporting_input_errors(lambda: BENCHMARKS[argv[0]](overrides, opts))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
