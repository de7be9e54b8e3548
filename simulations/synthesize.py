"""``python -m simulations.synthesize [Hydra overrides]``: release synthetic users and measure them.

    python -m simulations.synthesize dataset=ml-100k                       # zoo DiffRec generator, MultVAE utility
    python -m simulations.synthesize dataset=ml-100k generator=sdrm        # SDRM (the paper's M-SDRM)
    python -m simulations.synthesize dataset=ml-100k generator=sdrm generator.sampling=full   # F-SDRM
    python -m simulations.synthesize dataset=ml-100k generator=latent_ddpm # DDPM over MultVAE latents
    python -m simulations.synthesize dataset=ml-100k generator.dp.target_epsilon=8  # DP-trained generator
    python -m simulations.synthesize -m dataset=ml-100k generator.dp.target_epsilon=1,2,4,8,.inf
    python -m simulations.report outputs/multirun/<time>                  # the sweep's table and plot

The primary config is ``conf/synthesize.yaml`` (``conf/config.yaml`` with MultVAE as the utility model,
no federation, the zoo DiffRec generator, 100 utility epochs); the release goes to the Hydra run folder
(``outputs/synthetic/<time>``, or ``release.out``).

1. Split the real users with training data into members (the generator's training users) and
   held-out non-members (``release.member_share``, default 0.5).
2. Train the generator (``generator=``, ``conf/generator/``: the zoo DiffRec by default; ``sdrm``,
   ``latent_ddpm`` or another zoo model) on the members and sample ``release.scale`` (default 3)
   synthetic users per member.
3. Write them as RecBole atomic files (``<out>/<dataset>-synthetic/<dataset>-synthetic.inter``; user
   ids ``syn_<n>``, the real item tokens) so any RecBole-compatible tool can read them.
4. Utility: train the configured recommender (``model=``, a fold-in model such as MultVAE or DiffRec)
   on the real members, on the synthetic users only, and on both, and evaluate each on the real
   non-members' test items (their training items as input; model chosen on their validation items).
5. Audit: distance-based membership inference of members vs non-members against the release.

Prints one JSON object per line and writes ``synthesis_report.json`` beside the files.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from datetime import datetime
from pathlib import Path

import hydra
import numpy as np
import scipy.sparse as sp
import torch

from fedrec.errors import ConfigError
from simulations.cli import run_reporting_input_errors


def write_atomic(rows: sp.csr_matrix, item_ids: np.ndarray, folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    coo = rows.tocoo()
    path = folder / f"{name}.inter"
    tmp = path.with_suffix(".inter.tmp")
    with open(tmp, "w") as f:
        f.write("user_id:token\titem_id:token\trating:float\ttimestamp:float\n")
        for u, i in zip(coo.row, coo.col):
            f.write(f"syn_{u}\t{item_ids[i]}\t1\t0\n")
    tmp.replace(path)
    return path


def fit_and_evaluate(cfg, train_rows: sp.csr_matrix, data, eval_users: np.ndarray, seed: int) -> dict:
    """Train ``cfg.model`` on ``train_rows``; best epoch by the eval users' validation NDCG@20."""
    from fedrec.eval import evaluate_model
    from fedrec.models import DataShape, build_model
    from fedrec.train import TrainRows, make_optimizer, train_epoch

    torch.manual_seed(seed)
    model = build_model(cfg.model, DataShape(train_rows.shape[0], data.n_items))
    if model.private_parameter_names():
        raise ConfigError(f"model: {cfg.model.name!r} has per-user parameters and cannot score held-out users; "
                          "use a fold-in model (multvae, diffrec, ldiffrec)")
    if not model.trains_by_sgd:  # EASE, GF-CF, ...: one closed-form fit on these rows, one evaluation
        model.fit(train_rows)
        res = evaluate_model(model, data, list(cfg.eval.ks), int(cfg.eval.batch_size), users=eval_users)
        return {"valid": res["valid"], "test": res["test"], "epoch": 1}
    opt = make_optimizer(model, cfg.model.optim)
    rows = TrainRows(train_rows, np.arange(train_rows.shape[0]))
    rng = np.random.default_rng(seed)
    best = {"valid": {"ndcg@20": -1.0}}
    for epoch in range(1, int(cfg.train.epochs) + 1):
        train_epoch(model, opt, rows, int(cfg.model.optim.batch_size), rng)
        if epoch % int(cfg.train.eval_every) == 0 or epoch == int(cfg.train.epochs):
            res = evaluate_model(model, data, list(cfg.eval.ks), int(cfg.eval.batch_size), users=eval_users)
            if res["valid"]["ndcg@20"] > best["valid"]["ndcg@20"]:
                best = {"valid": res["valid"], "test": res["test"], "epoch": epoch}
    return best


def main(argv: list[str]) -> int:
    """Plain entry (tests): compose ``conf/synthesize.yaml`` with ``argv`` and release."""
    return run_reporting_input_errors(lambda: synthesize(compose_synthesize(argv)))


def compose_synthesize(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from fedrec.config import CONF_DIR

    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="synthesize", overrides=list(overrides))


@hydra.main(config_path="../conf", config_name="synthesize", version_base="1.3")
def hydra_main(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig

    out = Path(HydraConfig.get().runtime.output_dir)
    rc = run_reporting_input_errors(lambda: synthesize(cfg, default_out=out))
    if out.exists() and {p.name for p in out.iterdir()} <= {"synthesize.log"}:
        shutil.rmtree(out, ignore_errors=True)  # bad input, or the release went to release.out: no stray folder
    if rc:
        sys.exit(rc)


TRAINING_SETS = ("real", "synthetic", "real+synthetic")


def synthesize(cfg, default_out: Path | None = None) -> None:
    from omegaconf import OmegaConf

    from fedrec.data import load_dataset
    from fedrec.privacy.audit import synthetic_mia
    from fedrec.privacy.generators import build_generator

    rel = cfg.release
    scale, share = float(rel.scale), float(rel.member_share)
    if scale <= 0:
        raise ConfigError(f"release.scale: synthetic users per member must be positive, got {scale}")
    if not 0 < share < 1:
        raise ConfigError(f"release.member_share: must be in (0, 1), got {share}")
    wanted = [str(w) for w in rel.train_on]
    bad = sorted(set(wanted) - set(TRAINING_SETS))
    if bad:
        raise ConfigError(f"release.train_on: unknown training set {bad[0]!r}; expected some of {list(TRAINING_SETS)}")
    seed = int(cfg.seed)
    data = load_dataset(cfg.dataset, seed)
    gen = build_generator(cfg.generator, data.n_items, seed)  # config errors before any training
    active = np.flatnonzero(np.diff(data.train.indptr) > 0)
    perm = np.random.default_rng([seed, 11]).permutation(active)
    cut = int(round(share * len(perm)))
    members, nonmembers = np.sort(perm[:cut]), np.sort(perm[cut:])
    out = Path(rel.out or default_out or Path(cfg.paths.output_root) / "synthetic" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S"))
    emit = lambda **kw: print(json.dumps(kw), flush=True)  # noqa: E731

    t0 = t_start = time.perf_counter()
    gen.fit(data.train[members])
    synthetic = gen.sample(max(1, int(round(scale * len(members)))))
    eps = gen.epsilon()
    privacy = {"epsilon": eps if math.isfinite(eps) else "inf", "delta": gen.plan.delta if gen.plan else None,
               "noise_multiplier": gen.plan.noise_multiplier if gen.plan else None}
    emit(what="generator", generator=cfg.generator.name, model=getattr(gen, "name", None), **privacy,
         members=len(members), nonmembers=len(nonmembers),
         synthetic_users=synthetic.shape[0], synthetic_interactions=int(synthetic.nnz),
         real_member_interactions=int(data.train[members].nnz), fit_and_sample_s=round(time.perf_counter() - t0, 1))
    name = f"{data.name}-synthetic"
    path = write_atomic(synthetic, data.item_ids, out / name, name)
    audit = synthetic_mia(data.train, members, nonmembers, synthetic)
    emit(what="audit", **{f"{k}_{m}": v for k, d in audit.items() if isinstance(d, dict) for m, v in d.items()},
         dcr_median_members=audit["dcr_median_members"], dcr_median_nonmembers=audit["dcr_median_nonmembers"])
    results = {}
    sets = {"real": data.train[members], "synthetic": synthetic,
            "real+synthetic": sp.vstack([data.train[members], synthetic]).tocsr()}
    sets = {k: v for k, v in sets.items() if k in wanted}
    for label, rows in sets.items():
        t0 = time.perf_counter()
        res = fit_and_evaluate(cfg, rows, data, nonmembers, seed)
        results[label] = res
        emit(what="utility", train_on=label, model=cfg.model.name, test_ndcg20=round(res["test"]["ndcg@20"], 5),
             test_recall20=round(res["test"]["recall@20"], 5), best_epoch=res["epoch"],
             seconds=round(time.perf_counter() - t0, 1))
    if "real" in results and "synthetic" in results:
        emit(what="utility_ratio", synthetic_over_real_ndcg20=round(
            results["synthetic"]["test"]["ndcg@20"] / results["real"]["test"]["ndcg@20"], 4))
    report = {"dataset": data.name, "seed": seed, "utility_model": cfg.model.name, "files": str(path),
              "members": len(members), "nonmembers": len(nonmembers), "wall_s": round(time.perf_counter() - t_start, 1),
              "utility_epochs": int(cfg.train.epochs),
              "generator": OmegaConf.to_container(cfg.generator, resolve=True), "privacy": privacy,
              "release": OmegaConf.to_container(rel, resolve=True), "audit": audit, "utility": results}
    (out / "synthesis_report.json").write_text(json.dumps(report, indent=2, default=float))
    print(f"synthetic users: {path}; report: {out / 'synthesis_report.json'}")


if __name__ == "__main__":
    hydra_main()
