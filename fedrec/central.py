"""Centralised training (``federation=none``): the reference every federated run is compared to.

Same model, same local-training code and same evaluation as the Flower clients; epochs replace
rounds. A training-free model (``model.trains_by_sgd`` False: EASE, GF-CF, ...) is fitted once on
the training matrix and evaluated once, recorded as epoch 1. Follows the official DiffRec loop: evaluate every ``train.eval_every`` epochs, keep the
epoch with the best validation ``train.select_metric``, stop after ``train.patience`` epochs
without improvement. The model, its batches and the evaluation run on the config's ``device``.

Deviation from the official DiffRec / L-DiffRec selection: the official loop compares the validation
Recall@20 *rounded to 4 decimals* (``evaluate_utils.computeTopNAccuracy`` rounds) and keeps the earlier
epoch on a tie at that precision; fedrec compares the unrounded metric, so on such a tie it can keep a
later epoch whose unrounded value is higher.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from fedrec.devices import cfg_device
from fedrec.errors import ConfigError
from fedrec.eval import evaluate_model
from fedrec.eval.fairness import FairnessAccumulator, fairness_spec
from fedrec.models import build_model, data_shape
from fedrec.precision import set_precision
from fedrec.recorder import Recorder
from fedrec.train import make_optimizer, model_rows, train_epoch


def run_central(cfg, data, recorder: Recorder, resume: dict | None = None) -> None:
    device = cfg_device(cfg)
    model = build_model(cfg.model, data_shape(data, seed=cfg.seed)).to(device)  # built on the CPU: same init
    set_precision(model, cfg, device)  # precision=bf16|auto: bf16 matrix products in train_epoch and evaluate_model
    if not model.trains_by_sgd:
        _fit_closed_form(cfg, data, model, recorder)
        return
    model.fit(data.train)  # the graph a model reads as a whole (LightGCN); a no-op for most
    optimizer = make_optimizer(model, cfg.model.optim)
    rows = model_rows(model, data, np.arange(data.n_users))
    rng = np.random.default_rng(cfg.seed)
    start = 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        rng.bit_generator.state = resume["numpy_rng"]
        torch.set_rng_state(resume["torch_rng"])
        if "cuda_rng" in resume:  # training draws come from the GPU's generator there
            torch.cuda.set_rng_state(resume["cuda_rng"], device)
        recorder.load_state(resume["recorder"])
        start = resume["round"]
    ks = list(cfg.eval.ks)
    fairness = fairness_spec(cfg, data)
    from fedrec.mechanisms import ServerContext, build_mechanisms

    mechanisms = build_mechanisms(cfg)
    ctx = ServerContext(cfg=cfg, data=data, model=model, strategy=None, mechanisms=mechanisms)  # no strategy: centralised
    for m in mechanisms:
        m.prepare_model(ctx)
    private = None  # a mechanism's trainer replacing the epoch (DP-SGD)
    for m in mechanisms:
        trainer = m.central_trainer(model, optimizer, rows, cfg, resume)
        if trainer is not None:
            if private is not None:
                raise ConfigError("two mechanisms replace the centralised trainer; at most one can")
            private = trainer
    for epoch in range(start + 1, cfg.train.epochs + 1):
        t0 = time.perf_counter()
        if private is not None:
            stats = private.epoch()
        else:
            stats = train_epoch(model, optimizer, rows, int(cfg.model.optim.batch_size), rng)
        train_s = time.perf_counter() - t0
        evaluation = eval_s = observer = None
        if epoch % cfg.train.eval_every == 0 or epoch == cfg.train.epochs:
            t0 = time.perf_counter()
            observer = None if fairness is None else FairnessAccumulator(fairness, ks, device)
            evaluation = evaluate_model(model, data, ks, int(cfg.eval.batch_size), observer=observer)
            eval_s = time.perf_counter() - t0
            ctx.evaluated_round = epoch
        for m in mechanisms:  # after the epoch's training and evaluation
            section = m.report(ctx)
            if section is not None:
                recorder.extra[m.kind] = section
        if observer is not None and _is_new_best(recorder, evaluation):
            recorder.extra["fairness"] = observer.result()  # the reported (best-validation) epoch's lists
        recorder.record(epoch, stats, train_s, evaluation, eval_s, lambda: {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "numpy_rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state()}
            | ({"cuda_rng": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {}))
        if cfg.train.patience and epoch - recorder.best_round >= cfg.train.patience:
            break


def _fit_closed_form(cfg, data, model, recorder: Recorder) -> None:
    """One fit on every training row, one evaluation: the whole run of a training-free model."""
    t0 = time.perf_counter()
    model.fit(data.train)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    fairness = fairness_spec(cfg, data)
    observer = None if fairness is None else FairnessAccumulator(fairness, list(cfg.eval.ks), cfg_device(cfg))
    evaluation = evaluate_model(model, data, list(cfg.eval.ks), int(cfg.eval.batch_size), observer=observer)
    eval_s = time.perf_counter() - t0
    if observer is not None:
        recorder.extra["fairness"] = observer.result()
    from fedrec.mechanisms import ServerContext, build_mechanisms

    ctx = ServerContext(cfg=cfg, data=data, model=model, strategy=None)
    ctx.evaluated_round = 1
    for m in build_mechanisms(cfg):  # e.g. a shilling attack's target metrics on the fitted model
        section = m.report(ctx)
        if section is not None:
            recorder.extra[m.kind] = section
    recorder.record(1, {"fit": 1}, train_s, evaluation, eval_s, lambda: {"model": model.state_dict()})


def _is_new_best(recorder: Recorder, evaluation: dict) -> bool:
    """Whether ``evaluation`` will be the recorder's new best (its rule: strictly higher validation metric)."""
    return evaluation.get("valid", {}).get(recorder.select_metric, float("nan")) > recorder.best_value
