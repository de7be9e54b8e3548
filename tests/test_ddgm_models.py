"""CODIGEM, RecFusion and CF-Diff (fedrec/models/codigem.py, recfusion.py, cfdiff.py) and the core's
binomial diffusion and step-by-step Gaussian chain (fedrec/models/diffusion.py) against numpy
re-derivations of the papers / official code (github.com/joojowalker/CODIGEM, gabriben/recfusion,
jackfrost168/CF_Diff) given the same random draws; plus their runs: one centralised epoch, silo and
cross-device rounds in process, DP-SGD, and the one-line refusals of CF-Diff."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from torch import nn

from fedrec.errors import ConfigError
from fedrec.models import build_model
from fedrec.models.base import Batch, DataShape
from fedrec.models.diffusion import BinomialDiffusion, GaussianDiffusion
from tests.test_strategies import task_identity  # noqa: F401  (autouse fixture: Message() needs it)

N_USERS, N_ITEMS = 12, 10
LOG2PI = np.log(2 * np.pi)


def _rows(seed: int = 0, n: int = N_USERS, d: int = N_ITEMS) -> np.ndarray:
    x = (np.random.default_rng(seed).random((n, d)) < 0.3).astype(np.float32)
    x[0] = 0.0
    return x


# ------------------------------------------------------------------ the core: schedules and chains
def test_quadratic_and_constant_schedules_are_the_official_ones():
    from fedrec.models.diffusion import make_betas

    # RecFusion get_beta_schedule('quadratic'): linspace(b_start ** 0.5, b_end ** 0.5, T) ** 2
    want = np.linspace(1e-4 ** 0.5, 0.1 ** 0.5, 5) ** 2
    assert np.allclose(make_betas("quadratic", 5, 1.0, 1e-4, 0.1), want, rtol=1e-12)
    assert np.allclose(make_betas("constant", 3, 1.0, 1e-4, 1e-4), [1e-4] * 3)
    assert np.allclose(BinomialDiffusion(5, "linear", 0.01, 0.2).flip.numpy(), np.linspace(0.01, 0.2, 5), atol=1e-7)
    with pytest.raises(ConfigError, match="flip probabilities"):
        BinomialDiffusion(3, "linear", 0.1, 0.7)


def test_gaussian_chain_is_the_sequential_official_noising():
    d = GaussianDiffusion(4, "quadratic", 1.0, 1e-4, 0.1, reweight=False, importance_sampling=False)
    x = torch.tensor(_rows(1))
    noise = torch.randn(4, *x.shape, generator=torch.Generator().manual_seed(0))
    chain = d.q_chain(x, noise)
    betas = np.linspace(1e-2, 0.1 ** 0.5, 4) ** 2
    z = x.double().numpy()
    for t in range(4):  # official make_noise: sqrt(1 - B) x + sqrt(B) randn
        z = np.sqrt(1 - betas[t]) * z + np.sqrt(betas[t]) * noise[t].double().numpy()
        assert np.allclose(chain[t].double().numpy(), z, atol=1e-6)


def _transition(b: float) -> np.ndarray:
    """2x2 bit-flip matrix Q[a, c] = q(x_t = c | x_{t-1} = a)."""
    return np.array([[1 - b, b], [b, 1 - b]])


def test_binomial_marginal_is_the_product_of_transition_matrices_and_the_chain_follows_it():
    d = BinomialDiffusion(4, "linear", 0.05, 0.3)
    flips = np.linspace(0.05, 0.3, 4)
    qbar = np.eye(2)
    x0 = torch.tensor([[0.0, 1.0]])
    for t in range(4):
        qbar = qbar @ _transition(flips[t])
        got = d.marginal(x0, torch.tensor([t])).double().numpy()[0]
        assert np.allclose(got, [qbar[0, 1], qbar[1, 1]], atol=1e-6)
    # the step-by-step chain (official make_noise) has these marginals: Monte Carlo over 40k paths
    gen = torch.Generator().manual_seed(0)
    x = torch.tensor([0.0, 1.0]).repeat(20000, 1)
    last = d.q_chain(x, generator=gen)[-1]
    assert abs(float(last[:, 0].mean()) - qbar[0, 1]) < 0.012 and abs(float(last[:, 1].mean()) - qbar[1, 1]) < 0.012
    # one step given the uniforms: flip exactly where u < beta_t
    u = torch.tensor([[0.01, 0.9], [0.9, 0.01]])
    step = d.q_step(torch.tensor([[0.0, 1.0], [0.0, 1.0]]), 0, u)
    assert torch.equal(step, torch.tensor([[1.0, 1.0], [0.0, 0.0]]))


def test_binomial_posterior_is_bayes_over_the_transition_matrices():
    d = BinomialDiffusion(3, "quadratic", 0.02, 0.25)
    flips = np.linspace(0.02 ** 0.5, 0.25 ** 0.5, 3) ** 2
    qbars = [np.eye(2)]
    for b in flips:
        qbars.append(qbars[-1] @ _transition(b))
    for t in (1, 2):
        for x0 in (0.0, 1.0, 0.3):  # a soft x0: D3PM's sum over x0 of q(x_{t-1}, x_t | x0) p(x0)
            for xt in (0.0, 1.0):
                p0 = np.array([1 - x0, x0])
                joint = np.array([(p0 @ qbars[t])[a] * _transition(flips[t])[a, int(xt)] for a in (0, 1)])
                want = joint[1] / joint.sum()
                got = float(d.posterior(torch.tensor([[xt]]), torch.tensor([[x0]]), torch.tensor([t]))[0, 0])
                assert got == pytest.approx(want, abs=1e-6)


def test_binomial_training_loss_is_the_elbo_term_given_the_draws():
    d = BinomialDiffusion(3, "linear", 0.05, 0.2)
    x0 = torch.tensor(_rows(2)[:6])
    t = torch.tensor([0, 1, 2, 2, 1, 0])
    u = torch.rand(x0.shape, generator=torch.Generator().manual_seed(3))
    w = torch.randn(N_ITEMS, N_ITEMS, generator=torch.Generator().manual_seed(4))
    denoise = lambda z, _t: torch.sigmoid(z @ w)  # noqa: E731
    got = d.training_loss(denoise, x0, t=t, u=u)["loss"].double().numpy()
    flips = np.linspace(0.05, 0.2, 3)
    g = np.cumprod(1 - 2 * flips)
    xs, us, tn = x0.double().numpy(), u.double().numpy(), t.numpy()
    for b in range(6):
        tb = tn[b]
        xt = (us[b] < g[tb] * xs[b] + (1 - g[tb]) / 2).astype(float)
        pred = np.clip(1 / (1 + np.exp(-(xt @ w.double().numpy()))), 1e-7, 1 - 1e-7)
        if tb == 0:
            want = np.mean(-(xs[b] * np.log(pred) + (1 - xs[b]) * np.log(1 - pred)))
        else:
            def post(x0v):
                prior = g[tb - 1] * x0v + (1 - g[tb - 1]) / 2
                l1 = np.where(xt == 1, 1 - flips[tb], flips[tb])
                l0 = np.where(xt == 1, flips[tb], 1 - flips[tb])
                return np.clip(prior * l1 / (prior * l1 + (1 - prior) * l0), 1e-7, 1 - 1e-7)
            q, p = post(xs[b]), post(pred)
            want = np.mean(q * np.log(q / p) + (1 - q) * np.log((1 - q) / (1 - p)))
        assert got[b] == pytest.approx(want, rel=1e-4, abs=1e-6)


# ------------------------------------------------------------------ numpy transcriptions of the official nets
def _np_mlp(net, x: np.ndarray) -> np.ndarray:
    """numpy forward of an nn.Sequential of Linear / PReLU / Tanh / Sigmoid."""
    h = x
    for layer in net:
        kind = type(layer).__name__
        if kind == "Linear":
            h = h @ layer.weight.detach().double().numpy().T + layer.bias.detach().double().numpy()
        elif kind == "PReLU":
            a = float(layer.weight.detach())
            h = np.maximum(h, 0) + a * np.minimum(h, 0)
        elif kind == "Tanh":
            h = np.tanh(h)
        elif kind == "Sigmoid":
            h = 1 / (1 + np.exp(-h))
    return h


def _log_normal(x, mu, log_var):
    return -0.5 * LOG2PI - 0.5 * log_var - 0.5 * np.exp(-log_var) * (x - mu) ** 2


def _log_std(x):
    return -0.5 * LOG2PI - 0.5 * x ** 2


def _perturb(model, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def test_codigem_loss_is_the_official_elbo_given_the_noise():
    torch.manual_seed(0)
    model = build_model({"name": "codigem", "hidden": 8, "depth": 2, "steps": 3, "beta": 0.05}, DataShape(N_USERS, N_ITEMS))
    _perturb(model)
    x = torch.tensor(_rows(3))
    noise = torch.randn(N_USERS, 3, N_ITEMS, generator=torch.Generator().manual_seed(1))
    got = model.loss(Batch(users=torch.arange(N_USERS), x=x, rand={"noise": noise})).detach().double().numpy()
    beta, xs, e = 0.05, x.double().numpy(), noise.double().numpy()
    zs = [np.sqrt(1 - beta) * xs + np.sqrt(beta) * e[:, 0]]  # official forward(): zs[0], then T - 1 more
    for i in range(1, 3):
        zs.append(np.sqrt(1 - beta) * zs[-1] + np.sqrt(beta) * e[:, i])
    mus, lvs = [], []
    for i in (1, 0):  # official: for i in range(len(p_dnns) - 1, -1, -1): p_dnns[i](zs[i + 1])
        h = _np_mlp(model.p_dnns[i], zs[i + 1])
        mus.append(h[:, :N_ITEMS])
        lvs.append(h[:, N_ITEMS:])
    mu_x = _np_mlp(model.decoder, zs[0])
    re = _log_std(xs - mu_x).sum(-1)
    kl = (_log_normal(zs[-1], np.sqrt(1 - beta) * zs[-1], np.log(beta)) - _log_std(zs[-1])).sum(-1)
    for i in range(2):
        kl = kl + (_log_normal(zs[i], np.sqrt(1 - beta) * zs[i], np.log(beta)) - _log_normal(zs[i], mus[i], lvs[i])).sum(-1)
    assert np.allclose(got, -(re - kl), rtol=1e-5, atol=1e-3)
    # recommendation: the first step's decoder; without inference noise on sqrt(1 - beta) x
    model.cfg.inference_noise = False
    scores = model.scores(Batch(users=torch.arange(N_USERS), x=x)).detach().double().numpy()
    assert np.allclose(scores, _np_mlp(model.decoder, np.sqrt(1 - beta) * xs), atol=1e-5)
    # official init: the reverse nets' first layers N(0, 1e-4)
    fresh = build_model({"name": "codigem", "hidden": 8, "depth": 2}, DataShape(N_USERS, 50))
    assert float(fresh.p_dnns[0][0].weight.std()) < 1e-3 and float(fresh.decoder[0].weight.std()) > 1e-2


@pytest.mark.parametrize("diffusion", ["binomial", "gaussian"])
def test_recfusion_loss_is_the_official_compute_loss_given_the_draws(diffusion):
    torch.manual_seed(0)
    cfg = {"name": "recfusion", "diffusion": diffusion, "hidden": 8, "depth": 3, "steps": 3}
    model = build_model(cfg, DataShape(N_USERS, N_ITEMS))
    _perturb(model)
    # the official MLP repeats ONE hidden Linear + PReLU `depth` times
    assert sum(p.numel() for p in model.parameters()) == (N_ITEMS * 8 + 8) + 1 + (8 * 8 + 8) + 1 + (8 * N_ITEMS + N_ITEMS)
    x = torch.tensor(_rows(4))
    g = torch.Generator().manual_seed(2)
    draws = torch.rand(N_USERS, 3, N_ITEMS, generator=g) if diffusion == "binomial" else torch.randn(N_USERS, 3, N_ITEMS, generator=g)
    got = model.loss(Batch(users=torch.arange(N_USERS), x=x, rand={"chain": draws})).detach().double().numpy()
    betas = np.linspace(1e-4 ** 0.5, 0.1 ** 0.5, 3) ** 2
    xs, dr = x.double().numpy(), draws.double().numpy()
    zs, z = [], xs
    for t in range(3):
        if diffusion == "binomial":  # official make_noise (not Jascha): p ~ B(beta); (1 - p) x + p (1 - x)
            p = (dr[:, t] < betas[t]).astype(float)
            z = (1 - p) * z + p * (1 - z)
        else:
            z = np.sqrt(1 - betas[t]) * z + np.sqrt(betas[t]) * dr[:, t]
        zs.append(z)
    z_hat = [_np_mlp(model.mlp, zz) for zz in zs]
    if diffusion == "binomial":  # official: RE = -nn.BCELoss()(X, Z_hat[0]), arguments in that order
        re = np.array([-float(torch.nn.BCELoss()(x[b], torch.tensor(z_hat[0][b], dtype=torch.float32)))
                       for b in range(N_USERS)])
    else:
        re = _log_std(xs - z_hat[0]).sum(-1)
    kl = (_log_normal(z_hat[-1], np.sqrt(1 - betas[0]) * z_hat[-1], np.log(betas[0])) - _log_std(z_hat[-1])).sum(-1)
    for i in range(3):
        kl = kl + (_log_normal(zs[i], np.sqrt(1 - betas[i]) * zs[i], np.log(betas[i]))
                   - _log_normal(zs[i], z_hat[i], betas[i])).sum(-1)
    assert np.allclose(got, -(re - kl), rtol=1e-4, atol=1e-3)
    # recommendation: one pass of the MLP on the history
    assert np.allclose(model.scores(Batch(users=torch.arange(N_USERS), x=x)).detach().double().numpy(),
                       _np_mlp(model.mlp, xs), atol=1e-5)


def test_recfusion_elbo_objective_and_bad_values():
    model = build_model({"name": "recfusion", "objective": "elbo", "hidden": 8}, DataShape(N_USERS, N_ITEMS))
    loss = model.loss(Batch(users=torch.arange(N_USERS), x=torch.tensor(_rows(5))))
    assert loss.shape == (N_USERS,) and bool((loss >= -1e-6).all())  # KLs and NLLs are non-negative
    with pytest.raises(ConfigError, match="model.diffusion"):
        build_model({"name": "recfusion", "diffusion": "poisson"}, DataShape(N_USERS, N_ITEMS))
    with pytest.raises(ConfigError, match="model.objective"):
        build_model({"name": "recfusion", "diffusion": "gaussian", "objective": "elbo"}, DataShape(N_USERS, N_ITEMS))
    with pytest.raises(ConfigError, match="model.steps"):
        build_model({"name": "codigem", "steps": 1}, DataShape(N_USERS, N_ITEMS))


# ------------------------------------------------------------------ CF-Diff
def test_multi_hop_condition_is_the_official_two_hop_and_the_three_hop_reachability():
    from fedrec.models.cfdiff import multi_hop_condition

    r = _rows(6, 9, 7)
    c = multi_hop_condition(sp.csr_matrix(r))
    n = int((r.sum(1) > 0).sum())
    # official get_2hop_item_based: the item popularity / N on the user's own items, 0 elsewhere
    want2 = np.where(r > 0, r.sum(0)[None, :] / n, 0.0)
    want3 = np.zeros_like(r)
    for u in range(9):  # users v != u sharing an item with u; the share of them holding each item
        for v in range(9):
            if v != u and (r[u] * r[v]).sum() > 0:
                want3[u] += r[v]
    assert np.allclose(c[:, :7], want2, atol=1e-6) and np.allclose(c[:, 7:], want3 / n, atol=1e-6)


def _np_attention(att, q, kv):
    """nn.MultiheadAttention(batch_first) written out: in-projection, softmax(q k^T / sqrt(d_h)) v, out-projection."""
    w, b = att.in_proj_weight.detach().double().numpy(), att.in_proj_bias.detach().double().numpy()
    d, heads = q.shape[-1], att.num_heads
    Q, K, V = (m @ w[i * d:(i + 1) * d].T + b[i * d:(i + 1) * d] for i, m in enumerate((q, kv, kv)))
    split = lambda m: m.reshape(m.shape[0], m.shape[1], heads, d // heads).transpose(0, 2, 1, 3)  # noqa: E731
    s = split(Q) @ split(K).transpose(0, 1, 3, 2) / np.sqrt(d // heads)
    s = np.exp(s - s.max(-1, keepdims=True))
    o = (s / s.sum(-1, keepdims=True)) @ split(V)
    o = o.transpose(0, 2, 1, 3).reshape(q.shape)
    return o @ att.out_proj.weight.detach().double().numpy().T + att.out_proj.bias.detach().double().numpy()


def test_cam_ae_is_the_official_multihop_forward():
    torch.manual_seed(1)
    model = build_model({"name": "cfdiff", "latent": 6, "d_model": 4, "num_heads": 2, "steps": 5},
                        DataShape(N_USERS, N_ITEMS)).eval()
    net = model.denoiser
    x, cond = np.random.default_rng(0).random((3, N_ITEMS)), np.random.default_rng(1).random((3, 2 * N_ITEMS))
    t = torch.tensor([0, 2, 4])
    got = net(torch.tensor(x, dtype=torch.float32), t, torch.tensor(cond, dtype=torch.float32)).detach().double().numpy()

    def lin(layer, h):
        return h @ layer.weight.detach().double().numpy().T + layer.bias.detach().double().numpy()

    from fedrec.models.denoiser import timestep_embedding

    emb = lin(net.emb_layer, timestep_embedding(t, 10).double().numpy())
    tokens = lambda v, lift: lin(lift, np.concatenate([lin(net.encoder, v), emb], -1)[..., None])  # noqa: E731
    h = tokens(x, net.first_hop_embedding)
    h2, q2, q3 = h.copy(), tokens(cond[:, :N_ITEMS], net.second_hop_embedding), tokens(cond[:, N_ITEMS:], net.third_hop_embedding)
    for query, weight in ((q2, 0.15), (q3, 0.5)):  # official: two loops over the same layers, h and h2
        state = h if weight == 0.15 else h2
        for i in range(2):
            a = _np_attention(net.attentions[i], query, state)
            a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)  # F.normalize: dim=1
            state = lin(net.forward_layers[i], state + weight * a)
            if i == 0:
                state = np.tanh(state)
        if weight == 0.15:
            h_a = state
        else:
            h_b = state
    out = lin(net.decoder, np.tanh(lin(net.first_hop_decoding, 0.9 * h_a + 0.1 * h_b)[..., 0]))
    assert np.allclose(got, out, atol=1e-5), np.abs(got - out).max()


def test_cfdiff_needs_its_condition_and_scores_in_chunks():
    model = build_model({"name": "cfdiff", "latent": 6, "d_model": 4, "num_heads": 2, "steps": 5, "score_chunk": 5},
                        DataShape(N_USERS, N_ITEMS)).eval()
    batch = Batch(users=torch.arange(N_USERS), x=torch.tensor(_rows(7)))
    with pytest.raises(RuntimeError, match="call fit"):
        model.scores(batch)
    model.fit(sp.csr_matrix(_rows(7)))
    whole = model.scores(batch)
    model.cfg.score_chunk = 128
    assert torch.allclose(model.scores(batch), whole, atol=1e-6)
    with pytest.raises(ConfigError, match="model.num_heads"):
        build_model({"name": "cfdiff", "d_model": 16, "num_heads": 3}, DataShape(N_USERS, N_ITEMS))


# ------------------------------------------------------------------ runs
@pytest.mark.parametrize("model", ["codigem", "recfusion", "cfdiff"])
def test_one_epoch_on_tiny_synthetic_data(tiny_cfg, tmp_path, model):
    from fedrec.experiment import execute

    summary = execute(tiny_cfg("federation=none", "train.epochs=1", model=model), tmp_path / "run", progress=False)
    assert np.isfinite(summary["test"]["recall@20"]) and summary["test"]["ndcg@20"] > 0


def _round(tiny_cfg, tmp_path, model: str, mode: list[str]):
    from tests.test_mechanisms import _serve

    g0, final, replies, _ = _serve(tiny_cfg(*mode, model=model), tmp_path, model)
    assert replies and set(final) == set(g0)
    assert any(not np.allclose(final[k], g0[k]) for k in g0)  # the round trained


SILO = ["federation=silo", "federation.num_nodes=2", "federation.rounds=1"]
DEVICE = ["federation=device", "federation.num_nodes=2", "federation.rounds=1", "federation.user_fraction=0.5",
          "federation.local_lr=0.05"]


@pytest.mark.parametrize("model,mode", [("codigem", SILO), ("codigem", DEVICE), ("recfusion", SILO),
                                        ("recfusion", DEVICE), ("cfdiff", SILO)])
def test_federated_round_in_process(tiny_cfg, tmp_path, model, mode):
    _round(tiny_cfg, tmp_path, model, mode)


@pytest.mark.parametrize("model", ["codigem", "recfusion"])
def test_dpsgd_epoch(tiny_cfg, tmp_path, model):
    from fedrec.experiment import execute

    summary = execute(tiny_cfg("federation=none", "privacy=dpsgd", "train.epochs=1", model=model), tmp_path / "run",
                      progress=False)
    assert np.isfinite(summary["test"]["recall@20"]) and summary["privacy"]["epsilon"] > 0


def test_cfdiff_refuses_cross_device_and_dpsgd_with_the_reason(tiny_cfg, tmp_path):
    from fedrec.experiment import execute

    with pytest.raises(ConfigError, match="federation=device: model 'cfdiff' propagates over the interaction graph"):
        execute(tiny_cfg(*DEVICE, model="cfdiff"), tmp_path / "a", progress=False)
    with pytest.raises(ConfigError, match="privacy=dpsgd: model 'cfdiff' propagates over the interaction graph"):
        execute(tiny_cfg("federation=none", "privacy=dpsgd", model="cfdiff"), tmp_path / "b", progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_prelu_grad_sampler_is_the_per_example_autograd_gradient():
    from fedrec.privacy.grad_samplers import prelu_grad_sample

    for layer, x in ((nn.PReLU(), torch.randn(5, 7)), (nn.PReLU(3), torch.randn(5, 3, 4))):
        with torch.no_grad():
            layer.weight.uniform_(0.1, 0.4)
        back = torch.randn(x.shape)
        want = torch.stack([torch.autograd.grad((layer(x[b:b + 1]) * back[b:b + 1]).sum(), layer.weight)[0]
                            for b in range(5)])
        assert torch.allclose(prelu_grad_sample(layer, [x], back)[layer.weight], want, atol=1e-5)


def test_cfdiff_runs_under_node_level_dp_in_silos(tiny_cfg, tmp_path):
    """Node-level DP bounds a whole silo's update, and a silo's conditions read only its own users."""
    from fedrec.experiment import execute

    summary = execute(tiny_cfg(*SILO, "privacy=node_dp", model="cfdiff"), tmp_path / "run", progress=False)
    assert summary["privacy"]["epsilon"] > 0 and np.isfinite(summary["test"]["recall@20"])
