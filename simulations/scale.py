"""``python -m simulations.bench scale``: one cross-device round at 1k .. 1M users, time and memory.

Each size runs in a fresh subprocess (``python -m simulations.scale N ...``), so its peak memory is its
own: synthetic data with ML-1M-like sparsity (:func:`ml1m_like`), one DiffRec model, and one node's
round through the node's own code (:func:`fedrec.federated.device_node.device_round`, the path a
Flower node runs in ``federation=device``) with the config's sampling, local steps, precision and
``federation.memory_budget_gb``. Reported per size: users sampled, round seconds, the process's
resident memory before the round (data + model + libraries) and its peak during the round (sampled by
:class:`simulations.memory.TreeMemory`), whose difference is the round's own memory, checked against
the budget. The parent writes ``scale.md`` (a Markdown table), ``scale.jsonl`` and ``scale.png`` (log-log
seconds and memory against users) to ``bench.out``.

Synthetic data (not a real data set): user i's interaction count is log-normal with ML-1M clean's
log-mean 3.78 and log-std 0.93 (mean 68 interactions, measured on its training split), clipped to
[8, n_items / 3]; items are drawn without regard to order from a Zipf-like popularity p_j ∝ (j + 10)^-1
(ML-1M clean's most popular item has ~120x the median's count; this profile has ~100x), duplicates
within a user merged.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import scipy.sparse as sp

LOG_MEAN, LOG_STD = 3.777, 0.931  # ML-1M clean training split: log of per-user interaction counts


def ml1m_like(n_users: int, n_items: int, seed: int = 0, block: int = 100_000) -> sp.csr_matrix:
    """(n_users, n_items) binary CSR with ML-1M-like per-user counts and skewed item popularity."""
    rng = np.random.default_rng(seed)
    pop = 1.0 / (np.arange(n_items) + 10.0)
    cdf = np.cumsum(pop / pop.sum())
    parts = []
    for start in range(0, n_users, block):  # blocks: the (nnz,) draws of 1M users never exist at once
        m = min(block, n_users - start)
        counts = np.clip(np.round(rng.lognormal(LOG_MEAN, LOG_STD, m)), 8, n_items // 3).astype(np.int64)
        items = np.searchsorted(cdf, rng.random(int(counts.sum())), side="right").clip(max=n_items - 1)
        rows = np.repeat(np.arange(m, dtype=np.int32), counts)
        part = sp.csr_matrix((np.ones(len(items), np.float32), (rows, items.astype(np.int32))), shape=(m, n_items))
        part.sum_duplicates()
        part.data[:] = 1.0
        parts.append(part)
    return sp.vstack(parts, format="csr")


def run_one(n_users: int, n_items: int, overrides: list[str]) -> dict:
    """One node's cross-device round over ``n_users`` synthetic users (this process)."""
    import torch

    from fedrec.config import compose
    from fedrec.data.interactions import Interactions
    from fedrec.federated.device_node import device_round, sampling_threshold
    from fedrec.models import build_model, data_shape
    from fedrec.precision import set_precision
    from fedrec.run_config import federation
    from simulations.memory import TreeMemory, _rollup_kb

    cfg = compose(["model=diffrec", "federation=device", "federation.num_nodes=1", *overrides])
    t0 = time.perf_counter()
    train = ml1m_like(n_users, n_items, int(cfg.seed))
    empty = sp.csr_matrix((n_users, n_items), dtype=np.float32)
    data = Interactions(name=f"synthetic-{n_users}", train=train, valid=empty, test=empty,
                        user_ids=np.arange(n_users), item_ids=np.arange(n_items))
    data_s = time.perf_counter() - t0
    torch.manual_seed(int(cfg.seed))
    model = build_model(cfg.model, data_shape(data))
    set_precision(model, cfg)
    fed = federation(cfg)
    tau = sampling_threshold(fed, n_users, int(cfg.seed), 1)
    # warm-up: the first bf16/fp32 products of a process pay one-off kernel set-up; not part of a round's cost
    warm = min(n_users, 200)
    device_round(model, cfg, data, np.arange(warm), {}, 1, 1.0, per_user=False)
    before_gb = _rollup_kb(os.getpid())[0] / 2**20
    t0 = time.perf_counter()
    with TreeMemory(interval_s=0.05) as mem:
        out = device_round(model, cfg, data, np.arange(n_users), {}, 1, tau, per_user=False)
    round_s = time.perf_counter() - t0
    metrics = out.reply["metrics"]
    peak_gb = mem.peak_rss_gb
    return {"users": n_users, "items": n_items, "interactions": int(train.nnz),
            "users_trained": int(metrics["trained-users"]), "round_s": round(round_s, 3),
            "s_per_1k_trained_users": round(1000 * round_s / max(int(metrics["trained-users"]), 1), 4),
            "rss_before_round_gb": round(before_gb, 3), "peak_rss_during_round_gb": round(peak_gb, 3),
            "round_memory_gb": round(peak_gb - before_gb, 3), "memory_budget_gb": float(fed.memory_budget_gb),
            "within_budget": bool(peak_gb - before_gb <= fed.memory_budget_gb), "data_s": round(data_s, 1),
            "precision": str(model.compute_dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
            "user_fraction": float(fed.user_fraction)}


def write_report(lines: list[dict], out) -> None:
    """``scale.md``, ``scale.jsonl`` and ``scale.png`` in ``out``."""
    from pathlib import Path

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    head = ("| users | interactions | users trained | round s | s per 1k trained | memory before round GB "
            "| peak during round GB | round memory GB | budget GB | within budget |")
    rows = [head, "|" + " --- |" * 10]
    for x in lines:
        rows.append(f"| {x['users']:,} | {x['interactions']:,} | {x['users_trained']:,} | {x['round_s']} "
                    f"| {x['s_per_1k_trained_users']} | {x['rss_before_round_gb']} | {x['peak_rss_during_round_gb']} "
                    f"| {x['round_memory_gb']} | {x['memory_budget_gb']} | {x['within_budget']} |")
    (out / "scale.md").write_text("\n".join(rows) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    users = [x["users"] for x in lines]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
    a.loglog(users, [x["round_s"] for x in lines], "o-", label="round")
    lin = [lines[-1]["round_s"] * u / users[-1] for u in users]  # through the largest: fixed costs fade there
    a.loglog(users, lin, "k:", label="linear in users")
    a.set(xlabel="users", ylabel="seconds", title="one cross-device round")
    a.legend()
    b.loglog(users, [max(x["round_memory_gb"], 1e-3) for x in lines], "o-", label="round memory")
    b.loglog(users, [x["peak_rss_during_round_gb"] for x in lines], "s-", label="process peak RSS")
    b.axhline(lines[0]["memory_budget_gb"], color="r", ls="--", label="memory_budget_gb")
    b.set(xlabel="users", ylabel="GB", title="memory")
    b.legend()
    fig.tight_layout()
    fig.savefig(out / "scale.png", dpi=120)


if __name__ == "__main__":
    if sys.argv[1] == "report":  # python -m simulations.scale report FOLDER: redraw from FOLDER/scale.jsonl
        from pathlib import Path

        write_report([json.loads(x) for x in (Path(sys.argv[2]) / "scale.jsonl").read_text().splitlines()], sys.argv[2])
        sys.exit(0)
    print(json.dumps(run_one(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:])), flush=True)
