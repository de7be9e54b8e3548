"""precision=fp32|bf16|auto (fedrec/precision.py): resolution, what stays fp32, and bf16 close to fp32."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from omegaconf import OmegaConf

from fedrec import precision as P
from fedrec.errors import ConfigError
from fedrec.eval import evaluate_model
from fedrec.federated.cross_device import LocalTraining, train_users
from fedrec.models import DataShape, build_model
from fedrec.models.base import Batch
from fedrec.train import TrainRows, make_optimizer, train_epoch

DIFFREC = {"name": "diffrec", "dims": [32, 64], "steps": 10}


def _rows(n_users=48, n_items=120, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n_users, n_items, generator=g) < 0.08).float()


def _diffrec(dtype, **over):
    torch.manual_seed(0)
    model = build_model({**DIFFREC, **over}, DataShape(48, 120))
    model.compute_dtype = dtype
    return model


# ---------------------------------------------------------------------------- resolution
def test_resolve_explicit_and_bad_values():
    assert P.resolve_precision("fp32", "cpu", "diffrec") == torch.float32
    assert P.resolve_precision("bf16", "cpu", "bpr") == torch.bfloat16  # explicit bf16: any model
    with pytest.raises(ConfigError, match="^precision: expected one of fp32, bf16, auto, got 'half'"):
        P.resolve_precision("half", "cpu", "diffrec")


def test_auto_needs_fast_hardware_and_an_allow_listed_model(monkeypatch):
    monkeypatch.setattr(P, "fast_bf16", lambda device: True)
    assert P.resolve_precision("auto", "cpu", "diffrec", "eval") == torch.bfloat16
    assert P.resolve_precision("auto", "cpu", "diffrec", "train") == torch.float32  # measured: not kept
    assert P.resolve_precision("auto", "cpu", "multvae", "eval") == torch.float32  # not measured: fp32
    monkeypatch.setattr(P, "fast_bf16", lambda device: False)
    assert P.resolve_precision("auto", "cpu", "diffrec", "eval") == torch.float32


def test_set_precision_sets_training_and_evaluation_dtypes(monkeypatch):
    from fedrec.config import compose

    monkeypatch.setattr(P, "fast_bf16", lambda device: True)
    model = _diffrec(torch.float32)
    P.set_precision(model, compose(["model=diffrec", "precision=auto"]))
    assert model.compute_dtype == torch.float32 and model.eval_dtype == torch.bfloat16
    with P.autocast(model, use="eval"):
        assert torch.is_autocast_enabled("cpu")
    with P.autocast(model):
        assert not torch.is_autocast_enabled("cpu")
    P.set_precision(model, compose(["model=diffrec", "precision=bf16"]))
    assert model.compute_dtype == model.eval_dtype == torch.bfloat16


def test_fast_bf16_reads_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(P, "_cpu_flags", lambda: {"avx512f", "amx_bf16", "amx_tile"})
    assert P.fast_bf16("cpu")
    monkeypatch.setattr(P, "_cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    assert not P.fast_bf16("cpu")  # bf16 instructions without AMX: no large speed-up


def test_config_key_is_validated_before_any_work():
    from fedrec.config import compose, validate

    with pytest.raises(ConfigError, match="^precision:"):
        validate(compose(["precision=fp16"]))
    validate(compose(["precision=auto"]))


def test_fp32_context_is_a_no_op():
    model = _diffrec(torch.float32)
    with P.autocast(model):
        assert not torch.is_autocast_enabled("cpu")
    model.compute_dtype = torch.bfloat16
    with P.autocast(model):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


# ---------------------------------------------------------------------------- what stays fp32
def test_diffusion_arithmetic_stays_fp32_only_the_mlp_multiplies_in_bf16():
    model = _diffrec(torch.bfloat16)
    seen = {}
    orig = model.denoiser.forward

    def spy(x, t, keep=None):
        seen.setdefault("x_t", x.dtype)
        out = orig(x, t, keep)
        seen.setdefault("out", out.dtype)
        return out

    model.denoiser.forward = spy
    x = _rows()[:16]
    with P.autocast(model):
        loss = model.loss(Batch(users=torch.arange(16), x=x))
        model.eval()
        scores = model.scores(Batch(users=torch.arange(16), x=x))
    assert seen == {"x_t": torch.float32, "out": torch.float32}  # q_sample and the posterior see fp32
    assert loss.dtype == torch.float32 and scores.dtype == torch.float32
    # the denoiser's hidden layers did run in bf16
    with P.autocast(model):
        h = model.denoiser.in_layers[1](torch.zeros(2, model.denoiser.in_layers[1].in_features))
    assert h.dtype == torch.bfloat16


def test_bf16_training_keeps_fp32_master_weights_and_grads():
    model = _diffrec(torch.bfloat16)
    opt = make_optimizer(model, OmegaConf.create({"lr": 1e-3, "weight_decay": 0.0}))
    rows = TrainRows(sp.csr_matrix(_rows().numpy()), np.arange(48))
    before = [p.detach().clone() for p in model.parameters()]
    stats = train_epoch(model, opt, rows, 16, np.random.default_rng(0))
    assert np.isfinite(stats["loss"])
    for p, b in zip(model.parameters(), before):
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32
        assert not torch.equal(p, b)


# ---------------------------------------------------------------------------- bf16 close to fp32
def test_bf16_loss_and_gradients_close_to_fp32():
    x = _rows()[:32]
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = _diffrec(dtype, dropout=0.0)
        model.train()
        torch.manual_seed(3)  # the same t and noise on both sides
        with P.autocast(model):
            loss = model.loss(Batch(users=torch.arange(32), x=x)).mean()
        loss.backward()
        out[dtype] = (float(loss.detach()), torch.cat([p.grad.flatten() for p in model.parameters()]))
    (l32, g32), (l16, g16) = out[torch.float32], out[torch.bfloat16]
    assert abs(l16 - l32) <= 0.02 * abs(l32)
    cos = torch.nn.functional.cosine_similarity(g16, g32, dim=0)
    assert cos > 0.99, float(cos)


def test_bf16_scores_and_metrics_close_to_fp32():
    from types import SimpleNamespace

    x = _rows()
    train = sp.csr_matrix(x.numpy())
    g = np.random.default_rng(1)
    held = sp.csr_matrix((g.random(x.shape) < 0.05) & (x.numpy() == 0), dtype=np.float32)
    data = SimpleNamespace(n_users=48, n_items=120, train=train, valid=held, test=held, injected=None)
    res = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = _diffrec(dtype)
        model.eval()
        with P.autocast(model):
            res[dtype] = (model.scores(Batch(users=torch.arange(48), x=x)),
                          evaluate_model(model, data, [10], batch_size=16))
    s32, s16 = res[torch.float32][0], res[torch.bfloat16][0]
    assert s16.dtype == torch.float32
    assert (s16 - s32).abs().max() < 0.02 * s32.abs().max()
    assert abs(res[torch.float32][1]["test"]["recall@10"] - res[torch.bfloat16][1]["test"]["recall@10"]) < 0.05


@pytest.mark.parametrize("optimizer,per_user", [("sgd", False), ("adam", True)])
def test_cross_device_bf16_local_steps_close_to_fp32(optimizer, per_user):
    x = _rows()[:12]
    users = np.arange(12)
    local = LocalTraining(optimizer=optimizer, lr=0.05, local_epochs=2 if optimizer == "adam" else 1)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = _diffrec(dtype)
        g0 = {n: p.detach().clone() for n, p in model.named_parameters()}
        upd = train_users(model, users, x, torch.ones(12), {}, local, seed=0, round_=1, per_user=per_user)
        params = upd.per_user if per_user else upd.mean
        out[dtype] = torch.cat([(params[n] - (g0[n] if not per_user else g0[n].unsqueeze(0))).flatten()
                                for n in sorted(params)])
        assert all(v.dtype == torch.float32 for v in params.values())
    d32, d16 = out[torch.float32], out[torch.bfloat16]
    cos = torch.nn.functional.cosine_similarity(d16, d32, dim=0)
    assert cos > 0.98, float(cos)


@pytest.mark.gpu
def test_cuda_autocast_uses_the_models_device():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    model = _diffrec(torch.bfloat16).cuda()
    x = _rows().cuda()
    model.eval()
    with P.autocast(model):
        assert torch.is_autocast_enabled("cuda")
        scores = model.scores(Batch(users=torch.arange(48, device="cuda"), x=x))
    ref = _diffrec(torch.float32).cuda().eval().scores(Batch(users=torch.arange(48, device="cuda"), x=x))
    assert scores.dtype == torch.float32 and (scores - ref).abs().max() < 0.02 * ref.abs().max()
    assert P.fast_bf16("cuda") == (torch.cuda.get_device_capability()[0] >= 8)
