"""Diffusion over a CF backbone's embeddings (issue 13): DDRM (fedrec/models/ddrm.py).

The loss and the inference are checked against numpy transcriptions of the official code
(github.com/Polaris-JZ/DDRM ``DDRM_MF/model.py``, ``diffusion.py``, ``utils.BPRLoss.call_bpr``) given
the same draws; then the runs: one central epoch per backbone, silo and cross-device rounds in
process, DP-SGD, and the refusals of the LightGCN backbone."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from fedrec.errors import ConfigError
from fedrec.models import build_model
from fedrec.models.base import Batch, DataShape
from tests.test_strategies import task_identity  # noqa: F401  (autouse fixture: Message() needs it)

N_USERS, N_ITEMS, D = 12, 20, 6
TINY = {"name": "ddrm", "embedding_size": D, "dims": [16, 24], "steps": 4, "noise_scale": 0.5,
        "noise_min": 0.01, "noise_max": 0.2, "sampling": "user", "n_samples_per_user": 3}


def _rows(seed: int = 0) -> np.ndarray:
    x = (np.random.default_rng(seed).random((N_USERS, N_ITEMS)) < 0.3).astype(np.float32)
    x[0] = 0.0  # a user without history
    return x


def _model(seed: int = 0, **over):
    torch.manual_seed(seed)
    model = build_model({**TINY, **over}, DataShape(N_USERS, N_ITEMS))
    model.fit(sp.csr_matrix(_rows(seed)))
    return model


# ------------------------------------------------------------------ numpy transcription of the official code
def official_alphas_cumprod(steps, scale, lo, hi) -> np.ndarray:
    """``get_betas`` (linear-var) + ``betas[0] = 0.00001`` (beta_fixed) + ``calculate_for_diffusion``."""
    variance = np.linspace(scale * lo, scale * hi, steps)
    ab = 1 - variance
    betas = [1 - ab[0]] + [min(1 - ab[i] / ab[i - 1], 0.999) for i in range(1, steps)]
    betas = np.array(betas)
    betas[0] = 0.00001
    return np.cumprod(1 - betas), betas


def official_dnn(p: dict, prefix: str, noise_emb, con_emb, t, act, keep=None):
    """``DNN.forward``: cat[dropout(noise_emb), emb_layer(timestep_embedding(t, 10)), con_emb], act layers."""
    half = 5
    freqs = np.exp(-math.log(10000) * np.arange(half) / half)
    args = t[:, None].astype(np.float64) * freqs[None]
    temb = np.concatenate([np.cos(args), np.sin(args)], -1)

    def lin(name, h):
        return h @ p[f"{prefix}.{name}.weight"].T + p[f"{prefix}.{name}.bias"]

    emb = lin("emb_layer", temb)
    h = np.concatenate([noise_emb if keep is None else noise_emb * keep, emb, con_emb], -1)
    f = {"sigmoid": lambda v: 1 / (1 + np.exp(-v)), "tanh": np.tanh, "relu": lambda v: np.maximum(v, 0)}[act]
    n_in = len([k for k in p if k.startswith(f"{prefix}.in_layers") and k.endswith("weight")])
    n_out = len([k for k in p if k.startswith(f"{prefix}.out_layers") and k.endswith("weight")])
    for i in range(n_in):
        h = f(lin(f"in_layers.{i}", h))
    for i in range(n_out):
        h = lin(f"out_layers.{i}", h)
        if i != n_out - 1:
            h = f(h)
    return h


def _params(model) -> dict:
    return {k: v.detach().double().numpy() for k, v in model.named_parameters()}


def _draws(b: int, s: int, steps: int, seed: int = 0) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    x = _rows()
    users = np.arange(1, b + 1)  # users with a history
    pos = np.stack([rng.choice(np.flatnonzero(x[u]), s) for u in users])
    neg = np.stack([rng.choice(np.flatnonzero(x[u] == 0), s) for u in users])
    keep = lambda: torch.tensor((rng.random((b, s, D)) >= 0.5) * 2.0, dtype=torch.float32)  # noqa: E731
    return {"pos": torch.tensor(pos), "neg": torch.tensor(neg), "valid": torch.ones(b, s),
            "t": torch.tensor(rng.integers(0, steps, (b, s))),
            "noise_u": torch.tensor(rng.standard_normal((b, s, D)), dtype=torch.float32),
            "noise_i": torch.tensor(rng.standard_normal((b, s, D)), dtype=torch.float32),
            "keep_u": keep(), "keep_i": keep()}, users


def official_loss(p, draws, users, alpha, beta, act, ac, user_key="backbone.user_emb.weight",
                  items=None, users_all=None, reg=0.0):
    """``call_bpr`` with ``LightGCN.computer`` for the flat triples, then fedrec's per-user mean; ``reg``:
    the LightGCN variant's ``decay * 1/2 (||u0||^2 + ||i+0||^2 + ||i-0||^2)`` on the ego embeddings,
    per example (the official batch mean, see the module docstring)."""
    U = p[user_key] if users_all is None else users_all
    I = p["backbone.item_emb.weight"] if items is None else items
    b, s = draws["pos"].shape
    uu = np.repeat(users, s)
    pos, neg = draws["pos"].numpy().ravel(), draws["neg"].numpy().ravel()
    t = draws["t"].numpy().ravel()
    flat = {k: draws[k].double().numpy().reshape(b * s, D) for k in ("noise_u", "noise_i", "keep_u", "keep_i")}
    e_u, e_p, e_n = U[uu], I[pos], I[neg]
    sa, s1 = np.sqrt(ac[t])[:, None], np.sqrt(1 - ac[t])[:, None]
    x_u, x_i = sa * e_u + s1 * flat["noise_u"], sa * e_p + s1 * flat["noise_i"]
    u_hat = official_dnn(p, "user_dnn", x_u, e_p, t, act, flat["keep_u"])
    i_hat = official_dnn(p, "item_dnn", x_i, e_u, t, act, flat["keep_i"])
    recon = (((e_u - u_hat) ** 2).mean(1) + ((e_p - i_hat) ** 2).mean(1)) / 2
    pos_pred, neg_pred = (u_hat * i_hat).sum(1), (u_hat * e_n).sum(1)
    bpr = np.log1p(np.exp(-(pos_pred - neg_pred)))
    u0, i0 = p["backbone.user_emb.weight"], p["backbone.item_emb.weight"]
    bpr = bpr + reg * 0.5 * ((u0[uu] ** 2).sum(1) + (i0[pos] ** 2).sum(1) + (i0[neg] ** 2).sum(1))
    weight = (1 / (1 + np.exp(-pos_pred))) ** beta
    return (((1 - alpha) * bpr + alpha * recon) * weight).reshape(b, s).mean(1)


# ------------------------------------------------------------------ math
@pytest.mark.parametrize("act,beta", [("sigmoid", 1.0), ("relu", 0.0)])
def test_loss_equals_the_official_given_the_draws(act, beta):
    model = _model(1, act=act, beta=beta)
    with torch.no_grad():  # non-trivial biases
        for name, prm in model.named_parameters():
            if name.endswith("bias"):
                prm.normal_(0.0, 0.3)
    draws, users = _draws(5, 3, 4)
    x = torch.tensor(_rows())[users]
    got = model.loss(Batch(users=torch.tensor(users), x=x, rand=draws)).detach().double().numpy()
    ac, _ = official_alphas_cumprod(4, 0.5, 0.01, 0.2)
    want = official_loss(_params(model), draws, users, 0.4, beta, act, ac)
    assert np.allclose(got, want, rtol=1e-4, atol=1e-5), np.abs(got - want).max()
    # the schedule itself: linear-var with the first beta fixed to 1e-5, as official
    assert np.allclose(model.diffusion.alphas_cumprod.double().numpy(), ac, rtol=1e-6)


def test_lightgcn_backbone_loss_denoises_the_propagated_embeddings():
    from fedrec.models.lightgcn import normalized_adjacency

    model = _model(2, backbone="lightgcn", n_layers=2, reg_weight=0.1)
    draws, users = _draws(4, 2, 4, seed=3)
    x = torch.tensor(_rows(2))[users]
    got = model.loss(Batch(users=torch.tensor(users), x=x, rand=draws)).detach().double().numpy()
    p = _params(model)
    adj = normalized_adjacency(sp.csr_matrix(_rows(2))).toarray()
    ego = np.concatenate([p["backbone.user_emb.weight"], p["backbone.item_emb.weight"]])
    layers = [ego, adj @ ego, adj @ adj @ ego]
    final = np.mean(layers, 0)
    ac, _ = official_alphas_cumprod(4, 0.5, 0.01, 0.2)
    want = official_loss(p, draws, users, 0.4, 1.0, "sigmoid", ac, users_all=final[:N_USERS],
                         items=final[N_USERS:], reg=0.1)
    assert np.allclose(got, want, rtol=1e-4, atol=1e-5), np.abs(got - want).max()


@pytest.mark.parametrize("sampling_steps", [None, 2])
def test_scores_equal_the_official_inference(sampling_steps):
    model = _model(3, sampling_steps=sampling_steps).eval()
    x = _rows(3)
    g = torch.Generator().manual_seed(7)
    got = (model.ideal_item(Batch(users=torch.arange(N_USERS), x=torch.tensor(x)), g)
           @ model.backbone.item_emb.weight.T).detach().double().numpy()
    p = _params(model)
    U, I = p["backbone.user_emb.weight"], p["backbone.item_emb.weight"]
    ac, betas = official_alphas_cumprod(4, 0.5, 0.01, 0.2)
    ac_prev = np.append(1.0, ac[:-1])
    coef1 = betas * np.sqrt(ac_prev) / (1 - ac)
    coef2 = (1 - ac_prev) * np.sqrt(1 - betas) / (1 - ac)
    avg = (x @ I) / np.maximum(x.sum(1, keepdims=True), 1)  # official: torch.mean over allPos
    noise = torch.randn((N_USERS, D), generator=torch.Generator().manual_seed(7)).double().numpy()
    z = np.sqrt(ac[3]) * avg + np.sqrt(1 - ac[3]) * noise  # apply_T_noise: step steps - 1
    for i in reversed(range(4 if sampling_steps is None else sampling_steps)):
        t = np.full(N_USERS, i)
        x0 = official_dnn(p, "item_dnn", z, U, t, "sigmoid")
        z = coef1[i] * x0 + coef2[i] * z
    want = z @ I.T  # rounding_inner
    assert np.allclose(got, want, rtol=1e-4, atol=1e-5), np.abs(got - want).max()


def test_denoiser_condition_and_activation_keep_the_plain_denoiser():
    from fedrec.models.denoiser import DenoiserMLP

    torch.manual_seed(0)
    plain = DenoiserMLP([5, 7], [7, 5], emb_size=4, dropout=0.0)
    torch.manual_seed(0)
    same = DenoiserMLP([5, 7], [7, 5], emb_size=4, dropout=0.0, act="tanh")
    x, t = torch.randn(3, 5), torch.tensor([0, 1, 2])
    assert torch.equal(plain(x, t), same(x, t))
    cond = DenoiserMLP([5, 7], [7, 5], emb_size=4, cond_dim=2, act="relu")
    assert cond.in_layers[0].in_features == 5 + 4 + 2
    with pytest.raises(ValueError, match="without a condition"):
        cond(x, t)


def test_explicit_draws_make_the_loss_deterministic_and_sparse():
    from fedrec.rng import UserRandom

    model = _model(4)
    x = torch.tensor(_rows(4))[:6]
    batch = Batch(users=torch.arange(6), x=x)
    batch.rand = model.draw_randomness(batch, UserRandom(0, 1, np.arange(6), 0))
    assert batch.rand["noise_u"].shape == (6, 3, D) and set(batch.rand["t"].unique().tolist()) <= {0, 1, 2, 3}
    assert torch.equal(model.loss(batch), model.loss(batch))
    loss = model.loss(batch)[3]
    loss.backward()
    touched = set(batch.rand["pos"][3].tolist()) | set(batch.rand["neg"][3].tolist())
    rows = model.backbone.item_emb.weight.grad.abs().sum(1) > 0
    assert set(np.flatnonzero(rows.numpy()).tolist()) <= touched  # row-sparse item table
    assert model.row_sparse_parameter_names() == {"backbone.item_emb.weight"}
    assert model.private_parameter_names() == {"backbone.user_emb.weight"}


def test_bad_values_are_refused():
    with pytest.raises(ConfigError, match="model.backbone"):
        _model(backbone="sgl")
    with pytest.raises(ConfigError, match="model.sampling_steps"):
        _model(sampling_steps=5)
    with pytest.raises(ConfigError, match="model.noise_scale"):
        _model(noise_scale=0.0)
    with pytest.raises(ConfigError, match="model.act"):
        _model(act="gelu")


# ------------------------------------------------------------------ runs
def test_one_epoch_on_tiny_synthetic_data(tiny_cfg, tmp_path):
    from fedrec.experiment import execute

    # the LightGCN backbone's run is the silo test's (one node propagates over its own users' graph)
    cfg = tiny_cfg("federation=none", "train.epochs=1", model="ddrm")
    summary = execute(cfg, tmp_path / "run", progress=False)
    assert np.isfinite(summary["test"]["recall@20"]) and summary["test"]["ndcg@20"] > 0


def _federated(tiny_cfg, tmp_path, *over):
    from tests.test_mechanisms import _serve

    g0, final, replies, _ = _serve(tiny_cfg(*over, model="ddrm"), tmp_path, "ddrm")
    assert replies and set(final) == set(g0)
    assert "backbone.user_emb.weight" not in final  # private: never leaves the node
    assert any(not np.allclose(final[k], g0[k]) for k in g0)  # the round trained


@pytest.mark.parametrize("backbone", ["mf", "lightgcn"])
def test_silo_round_in_process(tiny_cfg, tmp_path, backbone):
    _federated(tiny_cfg, tmp_path, "federation=silo", "federation.num_nodes=3", "federation.rounds=1",
               f"model.backbone={backbone}")


def test_cross_device_round_in_process(tiny_cfg, tmp_path):
    _federated(tiny_cfg, tmp_path, "federation=device", "federation.num_nodes=2", "federation.rounds=1",
               "federation.user_fraction=0.5", "federation.local_lr=0.05")


def test_dpsgd_epoch(tiny_cfg, tmp_path):
    from fedrec.experiment import execute

    summary = execute(tiny_cfg("federation=none", "privacy=dpsgd", "train.epochs=1", model="ddrm"),
                      tmp_path / "run", progress=False)
    assert np.isfinite(summary["test"]["recall@20"])


@pytest.mark.parametrize("over,match", [
    (["federation=none", "privacy=dpsgd"], "privacy=dpsgd: model 'ddrm' propagates"),
    (["federation=device"], "federation=device: model 'ddrm' propagates"),
])
def test_lightgcn_backbone_refuses_dpsgd_and_cross_device(tiny_cfg, tmp_path, over, match):
    from fedrec.experiment import execute

    with pytest.raises(ConfigError, match=match):
        execute(tiny_cfg(*over, "model.backbone=lightgcn", model="ddrm"), tmp_path / "run", progress=False)


def test_pretraining_phase_is_the_backbone_loss_then_freezing_stops_its_gradient():
    model = _model(5, pretrain_epochs=1, freeze_backbone=True)
    draws, users = _draws(4, 3, 4, seed=5)
    batch = Batch(users=torch.tensor(users), x=torch.tensor(_rows(5))[users], rand=draws)
    assert model.pretraining()
    assert torch.equal(model.loss(batch), model.backbone.loss(batch))  # BPR-MF's own loss on the same triples
    model.on_epoch_end()
    assert not model.pretraining()
    model.loss(batch).sum().backward()
    assert model.backbone.item_emb.weight.grad is None and model.backbone.user_emb.weight.grad is None
    assert model.item_dnn.in_layers[0].weight.grad is not None


# ------------------------------------------------------------------ the core's directional noise (DiffGT's)
def test_directional_noise_is_sign_times_the_data_scaled_gaussian():
    from fedrec.models.diffusion import GaussianDiffusion, directional_noise

    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((200, 5)) * np.array([0.1, 1.0, 3.0, 0.5, 2.0]) + np.array([0, 1, -2, 0, 0.5])
    z = rng.standard_normal((200, 5))
    got = directional_noise(torch.tensor(x0, dtype=torch.float32), z=torch.tensor(z, dtype=torch.float32)).double().numpy()
    want = np.sign(x0) * np.abs(x0.mean(0) + x0.std(0, ddof=1) * z)  # DDM: sgn(x0) |N(mu, sigma^2)|
    assert np.allclose(got, want, rtol=1e-4, atol=1e-5)
    assert (np.sign(got) == np.sign(x0)).all()  # every coordinate keeps the data's direction
    # drawn from a generator it is reproducible, and a forward step moves x0 away from 0 along its signs
    x = torch.tensor(x0, dtype=torch.float32)
    a = directional_noise(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, directional_noise(x, torch.Generator().manual_seed(1)))
    d = GaussianDiffusion(10, "linear", 1.0, 1e-4, 0.02)
    x_t = d.q_sample(x, torch.full((200,), 9), a)
    assert (x_t.abs() >= d.sqrt_ac[9] * x.abs() - 1e-6).all()
