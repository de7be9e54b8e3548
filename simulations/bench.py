"""``python -m simulations.bench NAME [overrides] [bench.KEY=VALUE ...]``: named benchmarks.

Each prints one JSON object per line with its figures (seconds, ratios, metrics) and the machine's
load average beside them, since this machine is shared and noisy: ratios are measured side by side
in one process, alternating the two sides.

Benchmarks
----------
diffrec-speed
    DiffRec training epoch and full evaluation (valid + test, all users, all T steps): fedrec
    (in the run's ``precision``) against, with ``bench.official=PATH`` (a local checkout of
    YiyanXu/DiffRec, never committed), the official code itself, driven command by command in a
    subprocess as its main.py runs them (``simulations/official_diffrec.py``; its own model, trained
    by its own epochs), else the official loop structure with fedrec's arithmetic
    (``simulations/reference_diffrec.py``), alternating the two sides. Also prints the measured fp32
    and bf16 matmul GFLOP/s at each thread count, each side's FLOP (counted from the layer sizes)
    and the fraction of either roofline it reaches, and ``uptime``. Default data:
    ``dataset=diffrec-ml-1m-clean``. ``bench.repeats`` (2), ``bench.train_threads`` (1),
    ``bench.eval_threads`` (0 = torch default), ``bench.reference_eval`` (true). ``device=cuda`` (or
    ``auto``) runs both sides on the GPU (timings synchronise it), e.g.
    ``python -m simulations.bench diffrec-speed device=cuda``; ``bench.official`` is CPU only.
dp-step
    DiffRec training step, plain AdamW vs DP-SGD with Opacus ghost clipping (``bench.steps``, 10).
per-user-memory
    One ML-1M DiffRec cross-device round, all users sampled, every user's model uploaded
    (``federation.upload=per_user``, ``federation.memory_budget_gb=2``, one node): peak PSS/RSS of
    the whole process tree (server, Ray, node), which the paged uploads keep near the budget.
scale
    One cross-device round (one node, the node's own ``device_round``) on synthetic data with ML-1M-like
    sparsity at ``bench.users`` ([1000, 10000, 100000, 1000000]) users and ``bench.items`` (3000) items,
    each in a fresh subprocess: seconds, memory before and peak during the round against
    ``federation.memory_budget_gb``; ``scale.md``, ``scale.jsonl``, ``scale.png`` (log-log) in
    ``bench.out`` (default ``outputs/bench/scale-<time>``). Overrides (``precision=bf16``,
    ``federation.user_fraction=...``) reach every size. See ``simulations/scale.py``.
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


def _timed_cpu(fn, device=None) -> tuple[float, float, object]:
    """(wall seconds, CPU seconds of this process and its finished children, ``fn()``)."""
    from simulations.official_diffrec import cpu_seconds

    c0 = cpu_seconds()
    seconds, value = _timed_value(fn, device)
    return seconds, cpu_seconds() - c0, value


def matmul_gflops(threads: int, dtype: torch.dtype, device=None, m: int = 1024, k: int = 2816, n: int = 640,
                  reps: int = 20) -> float:
    """Measured GFLOP/s of one (m, k) x (k, n) matrix product in ``dtype`` on ``threads`` threads (median of
    ``reps``): the roofline each side's fraction is reported against (the shape of DiffRec's big layers)."""
    device = torch.device(device or "cpu")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a = torch.randn(m, k, device=device).to(dtype)
        b = torch.randn(k, n, device=device).to(dtype)
        a @ b
        times = [_timed(lambda: a @ b, device) for _ in range(reps)]
    finally:
        torch.set_num_threads(before)
    return 2.0 * m * k * n / statistics.median(times) / 1e9


def denoiser_flops(n_items: int, dims: list[int], emb_size: int) -> tuple[float, float]:
    """(forward, forward + backward) multiply-add FLOP per user row of DiffRec's MLP, counted from the layer
    sizes: forward 2 * sum(in * out); backward the weight gradients (2 * in * out each) and the input
    gradients of every layer but the first (nothing upstream of the input needs one)."""
    sizes = [n_items + emb_size, *dims[::-1], *dims[1:], n_items]  # [n+emb, 600, 200, 600, n] for dims [200, 600]
    layers = [(a, b) for a, b in zip(sizes[:-1], sizes[1:])] + [(emb_size, emb_size)]
    fwd = sum(2.0 * a * b for a, b in layers)
    bwd = sum(2.0 * a * b for a, b in layers) + sum(2.0 * a * b for a, b in layers[1:-1])
    return fwd, fwd + bwd


class OfficialDiffRec:
    """The official DiffRec code in a subprocess (``simulations/official_diffrec.py``), one command at a time."""

    def __init__(self, path: str, data_dir: Path, threads: int):
        import subprocess

        root = Path(path).expanduser()
        if not (root / "DiffRec" / "main.py").is_file():
            raise ConfigError(f"bench.official: {root}/DiffRec/main.py not found; give a checkout of YiyanXu/DiffRec")
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
        self.proc = subprocess.Popen([sys.executable, "-m", "simulations.official_diffrec", str(root), str(data_dir),
                                      str(threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, env=env)

    def ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the official DiffRec process ended during {command!r} (rc {self.proc.poll()})")
        out = json.loads(line)
        if "error" in out:
            raise RuntimeError(out["error"])
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)


def _uptime() -> str:
    import subprocess

    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def bench_diffrec_speed(overrides: list[str], opts: dict) -> None:
    from fedrec.config import compose
    from fedrec.data import load_dataset
    from fedrec.data.loaders import resolve_data_path
    from fedrec.devices import cfg_device
    from fedrec.eval import evaluate_model
    from fedrec.models import build_model, data_shape
    from fedrec.precision import set_precision
    from fedrec.train import TrainRows, make_optimizer, train_epoch
    from simulations.reference_diffrec import official_style_epoch, official_style_evaluate

    cfg = compose(["dataset=diffrec-ml-1m-clean", "model=diffrec", "federation=none", *overrides])
    if cfg.model.name != "diffrec":
        raise ConfigError("model.name: diffrec-speed benchmarks DiffRec only")
    device = cfg_device(cfg)  # device=cuda without a GPU: one error line
    official = opts.get("official")
    if official is not None and device.type != "cpu":
        raise ConfigError("bench.official: the official code is driven on the CPU only (its main.py's --cuda is not wired)")
    data = load_dataset(cfg.dataset, int(cfg.seed))
    repeats = int(opts.get("repeats", 2))
    bs = int(cfg.model.optim.batch_size)
    default_threads = torch.get_num_threads()
    train_threads = int(opts.get("train_threads", 1))
    eval_threads = int(opts.get("eval_threads", 0)) or default_threads
    emit(bench="diffrec-speed", what="setup", dataset=cfg.dataset.name, users=data.n_users, items=data.n_items,
         train_interactions=int(data.train.nnz), torch_threads_default=default_threads, device=str(device),
         precision=str(cfg.get("precision", "fp32")), official=official, uptime=_uptime(),
         gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None)
    fwd, fwd_bwd = denoiser_flops(data.n_items, list(cfg.model.dims), int(cfg.model.emb_size))
    peaks = {}
    for threads in sorted({train_threads, eval_threads}):
        peaks[threads] = {"fp32": matmul_gflops(threads, torch.float32, device),
                          "bf16": matmul_gflops(threads, torch.bfloat16, device)}
        emit(bench="diffrec-speed", what="matmul_roofline", threads=threads, device=str(device),
             fp32_gflops=round(peaks[threads]["fp32"], 1), bf16_gflops=round(peaks[threads]["bf16"], 1))

    def fresh():
        torch.manual_seed(int(cfg.seed))
        m = build_model(cfg.model, data_shape(data)).to(device)
        set_precision(m, cfg, device)
        return m, make_optimizer(m, cfg.model.optim)

    def roofline(flop: float, seconds: float, threads: int) -> dict:
        return {f"{side}_roofline_fraction": round(flop / seconds / 1e9 / peaks[threads][side], 3)
                for side in ("fp32", "bf16")}

    ours, ours_opt = fresh()
    dtype = str(ours.compute_dtype).replace("torch.", "")
    ref = None
    if official is not None:
        ref = OfficialDiffRec(official, resolve_data_path(cfg.dataset), train_threads)
    try:
        # ---- training epoch, alternating sides
        torch.set_num_threads(train_threads)
        rows = TrainRows(data.train, np.arange(data.n_users), device=device)
        rng = np.random.default_rng(0)
        if ref is None:
            ref_model, ref_opt = fresh()
            ref_model.compute_dtype = ref_model.eval_dtype = torch.float32  # the loop-structure baseline stays fp32
            dense = torch.from_numpy(data.train.toarray().astype(np.float32))  # the official loader's CPU tensor
            lt_hist = torch.zeros(cfg.model.steps, 10, device=device)
            lt_count = torch.zeros(cfg.model.steps, dtype=torch.long, device=device)
            ref_epoch = lambda: official_style_epoch(ref_model, ref_opt, dense, bs, lt_hist, lt_count)  # noqa: E731
        else:
            ref_epoch = lambda: ref.ask(f"epoch {train_threads}")  # noqa: E731
        t_ours, t_ref, c_ours, c_ref = [], [], [], []
        for _ in range(repeats):
            seconds, cpu, _ = _timed_cpu(lambda: train_epoch(ours, ours_opt, rows, bs, rng), device)
            t_ours.append(seconds)
            c_ours.append(cpu)
            if ref is None:
                seconds, cpu, _ = _timed_cpu(ref_epoch, device)
                t_ref.append(seconds)
                c_ref.append(cpu)
            else:
                answer = ref_epoch()
                t_ref.append(answer["epoch_s"])
                c_ref.append(answer["epoch_cpu_s"])
        o, r = statistics.median(t_ours), statistics.median(t_ref)
        oc, rc = statistics.median(c_ours), statistics.median(c_ref)
        emit(bench="diffrec-speed", what="train_epoch", device=str(device), threads=train_threads, fedrec_dtype=dtype,
             baseline="official" if ref is not None else "reference_diffrec.py (official loop structure, fedrec's arithmetic)",
             fedrec_s=round(o, 3), reference_s=round(r, 3), fedrec_over_reference=round(o / r, 3), ratio=round(r / o, 2),
             fedrec_all_s=[round(x, 3) for x in t_ours], reference_all_s=[round(x, 3) for x in t_ref],
             fedrec_cpu_s=round(oc, 3), reference_cpu_s=round(rc, 3), cpu_fedrec_over_reference=round(oc / rc, 3),
             epoch_gflop=round(fwd_bwd * data.n_users / 1e9, 1), fedrec=roofline(fwd_bwd * data.n_users, o, train_threads),
             reference=roofline(fwd_bwd * data.n_users, r, train_threads), uptime=_uptime())

        # ---- full evaluation (valid + test, all users, all T steps), alternating sides
        torch.set_num_threads(eval_threads)
        ks = [10, 20, 50, 100]
        steps = int(cfg.model.steps)
        flop_ours = fwd * data.n_users * steps  # one reverse pass scores both splits
        flop_ref = 2 * flop_ours  # the official evaluate reverses every user once per split
        t_ours, t_ref, c_ours, c_ref = [], [], [], []
        ref_line: dict = {}
        for _ in range(repeats):
            seconds, cpu, res = _timed_cpu(lambda: evaluate_model(ours, data, ks, int(cfg.eval.batch_size)), device)
            t_ours.append(seconds)
            c_ours.append(cpu)
            if ref is not None:
                ref_line = ref.ask(f"eval {eval_threads}")
                t_ref.append(ref_line["eval_s"])
                c_ref.append(ref_line["eval_cpu_s"])
            elif str(opts.get("reference_eval", "true")).lower() == "true":
                # the same model: the same metrics expected
                seconds, cpu, ref_res = _timed_cpu(lambda: official_style_evaluate(ours, data, ks), device)
                t_ref.append(seconds)
                c_ref.append(cpu)
                ref_line = {"test_recall20": ref_res["test"][20]["recall"], "test_ndcg20": ref_res["test"][20]["ndcg"]}
        o, oc = statistics.median(t_ours), statistics.median(c_ours)
        line = dict(bench="diffrec-speed", what="full_eval", device=str(device), threads=eval_threads,
                    fedrec_dtype=str(ours.eval_dtype).replace("torch.", ""),
                    steps=steps, fedrec_s=round(o, 3), fedrec_all_s=[round(x, 3) for x in t_ours],
                    fedrec_cpu_s=round(oc, 3),
                    fedrec_test_recall20=round(res["test"]["recall@20"], 5),
                    fedrec_test_ndcg20=round(res["test"]["ndcg@20"], 5),
                    fedrec_gflop=round(flop_ours / 1e9, 1), fedrec=roofline(flop_ours, o, eval_threads))
        if t_ref:
            r, rc = statistics.median(t_ref), statistics.median(c_ref)
            line.update(reference_s=round(r, 3), reference_all_s=[round(x, 3) for x in t_ref],
                        reference_cpu_s=round(rc, 3), cpu_fedrec_over_reference=round(oc / rc, 3),
                        fedrec_over_reference=round(o / r, 3), ratio=round(r / o, 2),
                        reference_test_recall20=round(ref_line["test_recall20"], 5),
                        reference_test_ndcg20=round(ref_line["test_ndcg20"], 5),
                        reference_gflop=round((flop_ref if ref is not None else flop_ours) / 1e9, 1),
                        reference=roofline(flop_ref if ref is not None else flop_ours, r, eval_threads))
        emit(**line, uptime=_uptime())
    finally:
        if ref is not None:
            ref.close()


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
    """One cross-device round on ML-1M: fp32 against bf16 local steps (alternating, the same users, draws and
    start), and against a centralised epoch over the same users; the two precisions' updates compared."""
    from fedrec.config import compose
    from fedrec.data import load_dataset
    from fedrec.eval import evaluate_model
    from fedrec.federated.cross_device import train_users
    from fedrec.federated.device_node import STREAM_SAMPLE, local_training, sampling_threshold, user_coins
    from fedrec.models import build_model, data_shape
    from fedrec.precision import resolve_precision
    from fedrec.run_config import federation
    from fedrec.train import TrainRows, make_optimizer, train_epoch

    cfg = compose(["dataset=diffrec-ml-1m-clean", "model=diffrec", "federation=device",
                   "federation.user_fraction=0.1", *overrides])
    data = load_dataset(cfg.dataset, int(cfg.seed))
    fed = federation(cfg)
    tau = sampling_threshold(fed, data.n_users, int(cfg.seed), 1)
    users = np.flatnonzero(user_coins(int(cfg.seed), 1, np.arange(data.n_users), STREAM_SAMPLE) <= tau)
    torch.manual_seed(int(cfg.seed))
    model = build_model(cfg.model, data_shape(data))
    g0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows = torch.from_numpy(data.train[users].toarray().astype(np.float32))
    local = local_training(cfg)
    per_user = str(opts.get("per_user", "false")).lower() == "true"
    # bench.precision (default bf16; auto: what the run would resolve to) is timed against fp32
    fast = resolve_precision(opts.get("precision", "bf16"), "cpu", str(cfg.model.name))
    dtypes = {"fp32": torch.float32, str(fast).replace("torch.", ""): fast}
    times: dict[str, list[float]] = {k: [] for k in dtypes}
    updates: dict = {}
    t_cen = []
    central = TrainRows(data.train, users)
    central_model = build_model(cfg.model, data_shape(data))
    opt = make_optimizer(central_model, cfg.model.optim)
    rng = np.random.default_rng(0)
    for _ in range(int(opts.get("repeats", 3))):
        for name, dtype in dtypes.items():
            model.compute_dtype = dtype
            seconds, updates[name] = _timed_value(lambda: train_users(model, users, rows, torch.ones(len(users)), {},
                                                                      local, int(cfg.seed), 1, per_user))
            times[name].append(seconds)
        t_cen.append(_timed(lambda: train_epoch(central_model, opt, central, int(cfg.model.optim.batch_size), rng)))
    med = {k: statistics.median(v) for k, v in times.items()}
    line = dict(bench="cross-device-round", dataset=cfg.dataset.name, users=len(users), local_optimizer=local.optimizer,
                local_epochs=local.local_epochs, per_user=per_user, threads=torch.get_num_threads(),
                **{f"round_{k}_s": round(v, 3) for k, v in med.items()},
                **{f"round_{k}_all_s": [round(x, 3) for x in times[k]] for k in times},
                central_epoch_same_users_s=round(statistics.median(t_cen), 3))
    if len(dtypes) == 2:
        fast_name = list(dtypes)[1]
        line["speedup_over_fp32"] = round(med["fp32"] / med[fast_name], 2)
        means = {k: _mean_params(u, per_user) for k, u in updates.items()}
        delta32 = torch.cat([(means["fp32"][n] - g0[n]).flatten() for n in sorted(g0)])
        delta16 = torch.cat([(means[fast_name][n] - g0[n]).flatten() for n in sorted(g0)])
        line.update(update_cosine=round(float(torch.nn.functional.cosine_similarity(delta16, delta32, dim=0)), 5),
                    update_rel_diff=round(float((delta16 - delta32).norm() / delta32.norm()), 5),
                    loss_fp32=round(updates["fp32"].loss, 6), **{f"loss_{fast_name}": round(updates[fast_name].loss, 6)})
        if str(opts.get("evaluate", "true")).lower() == "true":
            # each round's global model, evaluated the same way (fp32): the metric effect of bf16 local steps
            for name in dtypes:
                with torch.no_grad():
                    for n, p in model.named_parameters():
                        p.copy_(means[name][n])
                model.compute_dtype = torch.float32
                res = evaluate_model(model, data, [20], int(cfg.eval.batch_size))
                line[f"test_recall20_after_{name}_round"] = round(res["test"]["recall@20"], 5)
                line[f"test_ndcg20_after_{name}_round"] = round(res["test"]["ndcg@20"], 5)
    emit(**line, peak_rss_gb=_peak_rss_gb(), uptime=_uptime())


def _mean_params(upd, per_user: bool) -> dict[str, torch.Tensor]:
    if not per_user:
        return upd.mean
    w = upd.weights / upd.weights.sum()
    return {n: (v * w.view(-1, *([1] * (v.dim() - 1)))).sum(0) for n, v in upd.per_user.items()}


def bench_scale(overrides: list[str], opts: dict) -> None:
    """One cross-device round at each of ``bench.users`` synthetic users (a subprocess each); see simulations/scale.py."""
    import subprocess

    from simulations.scale import write_report

    sizes = json.loads(str(opts.get("users", "[1000, 10000, 100000, 1000000]")))
    items = int(opts.get("items", 3000))
    out = Path(str(opts.get("out", f"outputs/bench/scale-{time.strftime('%Y%m%d-%H%M%S')}")))
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    lines = []
    for n in sizes:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "simulations.scale", str(int(n)), str(items), *overrides],
                              capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"scale run with {n} users failed (rc {proc.returncode}): {proc.stderr.strip()[-2000:]}")
        line = json.loads(proc.stdout.strip().splitlines()[-1])
        line["total_s"] = round(time.perf_counter() - t0, 1)
        line["uptime"] = _uptime()
        emit(bench="scale", **line)
        lines.append(line)
        write_report(lines, out)  # after every size: a partial table survives a later size's failure
    emit(bench="scale", what="report", out=str(out), files=["scale.md", "scale.jsonl", "scale.png"])


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
              "per-user-memory": bench_per_user_memory, "scale": bench_scale}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in BENCHMARKS:
        print(f"usage: python -m simulations.bench NAME [overrides]; NAME in {sorted(BENCHMARKS)}", file=sys.stderr)
        return 2
    overrides, opts = split_options(argv[1:], "bench")
    return run_reporting_input_errors(lambda: BENCHMARKS[argv[0]](overrides, opts))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
