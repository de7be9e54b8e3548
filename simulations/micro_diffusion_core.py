"""The diffusion core of this tree against the one at ``--base``, side by side.

``python -m simulations.micro_diffusion_core [--users N] [--repeats R] [--base REV]``; the default base
is c1bf102, the core before the shared one of issue 9.

Random 0/1 data of ML-1M (clean) shape (5949 users x 2810 items, density 0.034), DiffRec's ML-1M
configuration (dims [200, 600], T = 40, linear-var 0.005 / 0.005 / 0.01, beta_fixed, batch 400), one
torch thread. Both cores drive copies of the same denoiser. Timed, alternating the two sides each
repeat (medians, and the ratio of the minima, the least disturbed on a shared machine): the reverse
pass of a full evaluation (all users, all T steps, posterior mean), one training epoch of the loss
(importance-sampled t, forward and backward; the optimiser step is not the core's) and the reverse
pass with a trivial denoiser (0.5 x), i.e. the core's own per-step work.
The old core is read from git (``git show REV:fedrec/models/diffusion.py``). Prints one JSON line per
figure with the load average.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

from fedrec.models.denoiser import DenoiserMLP
from fedrec.models.diffusion import GaussianDiffusion

USERS, ITEMS, DENSITY, BATCH, STEPS, DIMS = 5949, 2810, 0.034, 400, 40, [200, 600]
SCHEDULE = dict(noise_schedule="linear-var", noise_scale=0.005, noise_min=0.005, noise_max=0.01, beta_fixed=True)


def old_core(rev: str) -> types.ModuleType:
    root = Path(__file__).resolve().parents[1]
    src = subprocess.run(["git", "show", f"{rev}:fedrec/models/diffusion.py"], cwd=root, check=True,
                         capture_output=True, text=True).stdout
    spec = importlib.util.spec_from_loader(f"diffusion_{rev}", loader=None)
    module = importlib.util.module_from_spec(spec)
    exec(compile(src, f"{rev}:fedrec/models/diffusion.py", "exec"), module.__dict__)
    return module


def emit(**fields) -> None:
    fields["load_avg_1m"] = round(os.getloadavg()[0], 2)
    print(json.dumps(fields), flush=True)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def reverse_pass(diffusion, denoiser, x: torch.Tensor) -> None:
    with torch.no_grad():
        for s in range(0, len(x), BATCH):
            diffusion.reverse(denoiser, x[s:s + BATCH])


def train_epoch(diffusion, denoiser, x: torch.Tensor, seed: int) -> None:
    torch.manual_seed(seed)
    for s in range(0, len(x), BATCH):
        denoiser.zero_grad(set_to_none=True)
        diffusion.training_loss(denoiser, x[s:s + BATCH])["loss"].mean().backward()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=USERS)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--base", default="c1bf102")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    old = old_core(args.base)
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(args.users, ITEMS, generator=g) < DENSITY).float()
    torch.manual_seed(0)
    out_dims = DIMS + [ITEMS]
    net = DenoiserMLP(out_dims[::-1], out_dims, 10, False, 0.5)
    sides = {"new": (GaussianDiffusion(STEPS, **SCHEDULE), copy.deepcopy(net)),
             "old": (old.GaussianDiffusion(STEPS, **SCHEDULE), copy.deepcopy(net))}
    for d, _ in sides.values():  # start from the importance-sampled regime DiffRec trains in
        d.train()
        d.loss_history.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(1))
        d.loss_written.fill_(10)
    emit(bench="diffusion-core", what="setup", users=args.users, items=ITEMS, batch=BATCH, steps=STEPS, dims=DIMS,
         base=args.base, threads=torch.get_num_threads())
    cheap = lambda x_t, t: 0.5 * x_t  # noqa: E731  (the core's own arithmetic, without the MLP)
    for what, run in (("reverse_full_eval", lambda d, n, r: (n.eval(), reverse_pass(d, n, x))),
                      ("train_loss_epoch", lambda d, n, r: (n.train(), train_epoch(d, n, x, r))),
                      ("reverse_core_only", lambda d, n, r: reverse_pass(d, cheap, x))):
        times = {"new": [], "old": []}
        for r in range(args.repeats):
            for name in (("new", "old") if r % 2 == 0 else ("old", "new")):
                d, n = sides[name]
                times[name].append(timed(lambda: run(d, n, r)))
        new, old_s = statistics.median(times["new"]), statistics.median(times["old"])
        emit(bench="diffusion-core", what=what, new_s=round(new, 3), old_s=round(old_s, 3),
             new_over_old=round(new / old_s, 3), min_new_over_old=round(min(times["new"]) / min(times["old"]), 3),
             new_all_s=[round(t, 3) for t in times["new"]], old_all_s=[round(t, 3) for t in times["old"]])
    same = torch.equal(sides["new"][0].loss_history, sides["old"][0].loss_history)
    emit(bench="diffusion-core", what="check", same_importance_history=same)


if __name__ == "__main__":
    sys.exit(main())
