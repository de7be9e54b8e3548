"""DP-SGD (Opacus) on the model zoo, checked against independent references."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from torch import nn

from fedrec.errors import ConfigError
from fedrec.models import DataShape, build_model
from fedrec.models.base import Batch, Recommender
from fedrec.privacy.dpsgd import DPSGDConfig, DPSGDTrainer
from fedrec.train import TrainRows

N_USERS, N_ITEMS = 40, 20


def _rows(seed=0):
    rng = np.random.default_rng(seed)
    return TrainRows(sp.csr_matrix((rng.random((N_USERS, N_ITEMS)) < 0.3).astype(np.float32)), np.arange(N_USERS))


def _deterministic_diffrec():
    # steps=1, no noise, no dropout: the loss is a deterministic function of the parameters
    torch.manual_seed(0)
    return build_model({"name": "diffrec", "dims": [8], "steps": 1, "noise_scale": 0.0, "dropout": 0.0,
                        "reweight": False, "importance_sampling": False}, DataShape(N_USERS, N_ITEMS))


@pytest.mark.parametrize("mode", ["ghost", "hooks"])
def test_clipped_step_matches_per_user_reference(mode):
    # Prepare: no noise, a clipping bound small enough that every user is clipped
    rows = _rows()
    model = _deterministic_diffrec()
    ref = _deterministic_diffrec()
    C, lr, bs = 0.05, 1.0, 10
    trainer = DPSGDTrainer(model, torch.optim.SGD(model.parameters(), lr=lr), rows, bs,
                           DPSGDConfig(noise_multiplier=0.0, max_grad_norm=C, grad_sample_mode=mode), 1, seed=3)
    (idx,) = next(iter(trainer.loader))
    assert len(idx) > 0
    # Independent reference: per-user gradients one by one, clip, sum, divide by the expected batch size
    total = {n: torch.zeros_like(p) for n, p in ref.named_parameters()}
    norms = []
    for i in idx.numpy():
        ref.zero_grad()
        ref.loss(rows.batch(np.array([i]))).sum().backward()
        g = {n: p.grad.detach().clone() for n, p in ref.named_parameters()}
        norm = torch.sqrt(sum((v ** 2).sum() for v in g.values()))
        norms.append(float(norm))
        scale = min(1.0, C / (float(norm) + 1e-6))
        for n in total:
            total[n] += g[n] * scale
    expected = trainer.optimizer.expected_batch_size  # Opacus: int(n * q), may round one below q * n
    assert abs(expected - bs) <= 1
    want = {n: p.detach() - lr * total[n] / expected for n, p in ref.named_parameters()}
    # Execute: one private step on the same users
    b = rows.batch(idx.numpy())
    per_example = trainer.module(b.users, b.x)
    (trainer.criterion(per_example) if trainer.criterion is not None else per_example.mean()).backward()
    trainer.optimizer.step()
    # Assert
    assert min(norms) > C  # the bound was active
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), want[n], rtol=1e-4, atol=1e-6)


def test_epsilon_matches_independent_accountant():
    from opacus.accountants import RDPAccountant

    rows = _rows()
    model = _deterministic_diffrec()
    trainer = DPSGDTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), rows, 8,
                           DPSGDConfig(noise_multiplier=1.1, max_grad_norm=1.0, accountant="rdp"), 2, seed=0)
    out = [trainer.epoch()["epsilon"] for _ in range(2)]
    steps = 2 * len(trainer.loader)
    acc = RDPAccountant()
    acc.history = [(1.1, 8 / N_USERS, steps)]
    assert out[1] > out[0] > 0
    assert trainer.delta == 1.0 / len(rows)  # default delta: 1 / number of training users
    assert out[1] == pytest.approx(acc.get_epsilon(trainer.delta), rel=1e-9)


def test_target_epsilon_calibrates_noise():
    rows = _rows()
    model = _deterministic_diffrec()
    trainer = DPSGDTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), rows, 8,
                           DPSGDConfig(noise_multiplier=None, target_epsilon=2.0, max_grad_norm=1.0), 3, seed=0)
    eps = [trainer.epoch()["epsilon"] for _ in range(3)][-1]
    assert trainer.noise_multiplier > 0 and eps == pytest.approx(2.0, rel=0.05)


class _Raw(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(N_ITEMS))


class _Unsupported(Recommender):
    name = "raw"

    def __init__(self):
        super().__init__()
        self.raw = _Raw()

    def loss(self, batch: Batch) -> torch.Tensor:
        return ((batch.x * self.raw.w) ** 2).sum(1)


def test_unsupported_layer_is_named():
    model = _Unsupported()
    with pytest.raises(ConfigError, match=r"layer model\.raw \(_Raw\)"):
        DPSGDTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), _rows(), 8,
                     DPSGDConfig(noise_multiplier=1.0), 1, seed=0)


@pytest.mark.parametrize("kwargs,key", [
    ({"noise_multiplier": None}, "privacy.noise_multiplier"),
    ({"max_grad_norm": 0}, "privacy.max_grad_norm"),
    ({"accountant": "gdp2"}, "privacy.accountant"),
    ({"delta": 2.0}, "privacy.delta"),
])
def test_bad_privacy_config(kwargs, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        DPSGDConfig(**kwargs)


def test_dpsgd_run_reports_epsilon(tiny_cfg, tmp_path):
    from fedrec.experiment import execute

    summary = execute(tiny_cfg("federation=none", "privacy=dpsgd", "train.epochs=2"), tmp_path / "run", progress=False)
    assert summary["privacy"]["grad_sample_mode"] == "ghost" and summary["privacy"]["epsilon"] > 0
    import json

    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[1]["train"]["epsilon"] > lines[0]["train"]["epsilon"] > 0


def test_dpsgd_inside_silos_accounts_across_rounds(tiny_cfg, tmp_path):
    """privacy=dpsgd federation=silo: each silo runs DP-SGD on its users every round and keeps its accountant
    history; the run reports the largest silo epsilon, equal to an Opacus composition of every step."""
    import json
    import math

    from omegaconf import OmegaConf

    from fedrec.experiment import execute
    from fedrec.federated.node import node_view
    from fedrec.privacy.accounting import composed_epsilon
    from fedrec.train import TrainRows

    cfg = tiny_cfg("federation=silo", "federation.num_nodes=2", "federation.rounds=2", "privacy=dpsgd",
                   "privacy.noise_multiplier=1.3", "train.local_epochs=2", "privacy.accountant=rdp")
    summary = execute(cfg, tmp_path / "run", progress=False)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    eps = [x["train"]["dp-epsilon"] for x in lines]
    assert len(eps) == 2 and 0 < eps[0] < eps[1]
    yaml = OmegaConf.to_yaml(cfg, resolve=True)
    batch = int(cfg.model.optim.batch_size)
    expected = []
    for pid in range(2):
        view = node_view(yaml, {"partition-id": pid})
        n = len(TrainRows(view.data.train, view.users))
        steps = math.ceil(n / batch)
        expected.append(composed_epsilon([(1.3, 1 / steps, 2 * 2 * steps)], 1 / n, "rdp"))
    assert summary["privacy"]["mechanism"] == "dpsgd"
    assert summary["privacy"]["epsilon"] == pytest.approx(max(expected), rel=1e-6)
