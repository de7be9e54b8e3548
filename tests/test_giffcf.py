"""GiffCF (fedrec/models/giffcf.py) against numpy transcriptions of the official TensorFlow code
(github.com/VinciZhu/GiffCF models/giff_cf.py, models/denoiser.py), plus its runs: one centralised
epoch, a silo and a cross-device round in process, and the refusal under DP."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from fedrec.data.side import co_interaction_graph
from fedrec.errors import ConfigError
from fedrec.models import build_model
from fedrec.models.base import Batch, DataShape
from tests.test_strategies import task_identity  # noqa: F401  (autouse fixture: Message() needs it)

N_USERS, N_ITEMS = 40, 30
TINY = {"name": "giffcf", "embed_dim": 8}


def _train(seed: int = 0) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    x = (rng.random((N_USERS, N_ITEMS)) < 0.2).astype(np.float32)
    x[0] = 0.0  # a user without history
    x[:, 5] = 0.0  # an item nobody holds
    return sp.csr_matrix(x)


def _shape(train: sp.csr_matrix) -> DataShape:
    return DataShape(N_USERS, N_ITEMS, item_graph_fn=lambda **w: co_interaction_graph(train, **w))


def _build(train, seed: int = 0, **over):
    torch.manual_seed(seed)
    return build_model({**TINY, **over}, _shape(train))


# ------------------------------------------------------------------ numpy references (official code)
def official_adj_right(r: np.ndarray) -> np.ndarray:
    """``adj_right = user_deg ** (-1/4) * interaction * item_deg ** (-1/2)`` (a zero degree: weight 0)."""
    with np.errstate(divide="ignore"):
        du = np.where(r.sum(1) > 0, r.sum(1) ** -0.25, 0.0)[:, None]
        di = np.where(r.sum(0) > 0, r.sum(0) ** -0.5, 0.0)[None, :]
    return du * r * di


def silu(x):
    return x / (1.0 + np.exp(-x))


def official_denoiser(p: dict, z_t, c, ac, t, n_items):
    """numpy ``Denoiser.call`` with fedrec's weights ``p`` (torch layout: weight (out, in))."""
    def dense(name, x):
        return x @ p[f"{name}.weight"].T + p[f"{name}.bias"]

    def time_embed(name, t):
        timescales = np.power(10000.0, -np.arange(0, 20, 2) / 20)
        ang = t[:, None] * timescales[None, :]
        e = np.concatenate([np.sin(ang), np.cos(ang)], axis=-1)
        return dense(f"{name}.out", silu(dense(f"{name}.hidden", e)))

    def mixer(name, xs):
        return dense(f"{name}.out", silu(dense(f"{name}.hidden", np.stack(xs, -1))))[..., 0]

    e = p["denoiser.item_embed"]
    d = e.shape[1]
    norm = np.maximum(np.abs(c).sum(-1, keepdims=True), 1.0)
    z_embed = (z_t / n_items) @ e
    c_embed = (c / norm) @ e
    t1 = np.repeat(time_embed("denoiser.t_embed1", t), d, axis=1)
    x_embed = mixer("denoiser.embed_mixer", [z_embed, c_embed, t1])
    x_mid = x_embed @ e.T
    t2 = np.repeat(time_embed("denoiser.t_embed2", t), n_items, axis=1)
    return mixer("denoiser.score_mixer", [x_mid, c, ac, t2])


def official_scores(p: dict, r_train: np.ndarray, x: np.ndarray, T=3, alpha=1.5, noise_decay=0.5) -> np.ndarray:
    """numpy ``GiffCF.call(training=False)``: prop through adj_right (two products) / top eigenvalue."""
    adj = official_adj_right(r_train)
    lam = np.linalg.svd(adj, compute_uv=False)[0] ** 2  # official svds(adj_right, k=1) ** 2

    def smooth(v):
        return ((adj @ v.T).T @ adj) / lam

    def filt(v, av, t):
        return v + alpha * t / T * (av - v)

    ax = smooth(x)
    z = filt(x, ax, T)
    for t in range(T, 0, -1):
        s = t - 1
        x_pred = official_denoiser(p, z, x, ax, np.full(len(x), float(t)), x.shape[1])
        ax_pred = smooth(x_pred)
        z_s = filt(x_pred, ax_pred, s)
        z = z_s + noise_decay ** (t - s) * (z - filt(x_pred, ax_pred, t)) if noise_decay > 0 else z_s
    return z


def _params(model) -> dict:
    return {k: v.detach().double().numpy() for k, v in model.named_parameters()}


# ------------------------------------------------------------------ graph and filters
def test_weighted_co_interaction_graph_is_the_official_item_graph():
    train = _train()
    r = train.toarray().astype(np.float64)
    adj = official_adj_right(r)
    g = co_interaction_graph(train, user_power=-0.5, item_power=-0.5, diagonal=True)
    assert np.allclose(g.toarray(), adj.T @ adj, atol=1e-6)
    # the defaults are still the plain co-occurrence counts without self-loops
    plain = r.T @ r
    np.fill_diagonal(plain, 0)
    assert np.array_equal(co_interaction_graph(train).toarray(), plain)


def test_top_eigenvalue_is_the_official_squared_singular_value():
    train = _train(1)
    model = _build(train)
    sigma = np.linalg.svd(official_adj_right(train.toarray().astype(np.float64)), compute_uv=False)[0]
    assert float(model.top_eigenvalue) == pytest.approx(sigma ** 2, rel=1e-5)
    x = torch.rand(4, N_ITEMS)
    adj = official_adj_right(train.toarray().astype(np.float64))
    want = ((adj @ x.double().numpy().T).T @ adj) / sigma ** 2
    assert np.allclose(model.smooth(x).double().numpy(), want, atol=1e-5)


def test_ideal_low_pass_filter_mixes_in_the_top_eigenvectors():
    train = _train(2)
    model = _build(train, ideal_weight=0.5, ideal_cutoff=4)
    adj = official_adj_right(train.toarray().astype(np.float64))
    _, s, vt = np.linalg.svd(adj)
    v = vt[:4]  # official compute_eigen: svds' right singular vectors, largest first
    x = np.random.default_rng(0).random((3, N_ITEMS))
    want = (((adj @ x.T).T @ adj) / s[0] ** 2 + 0.5 * (x @ v.T) @ v) / 1.5
    assert np.allclose(model.smooth(torch.tensor(x, dtype=torch.float32)).double().numpy(), want, atol=1e-5)


def test_sparse_graph_path_equals_dense():
    train = _train(3)
    dense = _build(train)
    import fedrec.models.giffcf as giffcf

    old, giffcf.DENSE_SHARE = giffcf.DENSE_SHARE, 2.0  # force the sparse product
    try:
        sparse = _build(train)
    finally:
        giffcf.DENSE_SHARE = old
    assert sparse.graph.is_sparse and not dense.graph.is_sparse
    x = torch.rand(5, N_ITEMS)
    assert torch.allclose(sparse.smooth(x), dense.smooth(x), atol=1e-6)


# ------------------------------------------------------------------ denoiser, sampler, loss
def test_scores_equal_the_official_inference():
    train = _train(4)
    model = _build(train, seed=3).eval()
    with torch.no_grad():  # non-trivial weights: the mixers' zero biases made random
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.3)
    x = train.toarray()[:12]
    got = model.scores(Batch(users=torch.arange(12), x=torch.tensor(x))).double().numpy()
    want = official_scores(_params(model), train.toarray().astype(np.float64), x.astype(np.float64))
    assert np.allclose(got, want, atol=1e-4), np.abs(got - want).max()


def test_training_loss_is_the_official_sum_of_squares_given_the_draws():
    train = _train(5)
    model = _build(train, seed=1)
    x = torch.tensor(train.toarray()[:8])
    rng = np.random.default_rng(0)
    t = torch.tensor(rng.integers(1, 4, 8))
    keep = torch.tensor((rng.random((8, N_ITEMS)) >= 0.5) * 2.0, dtype=torch.float32)
    got = model.loss(Batch(users=torch.arange(8), x=x, rand={"t": t, "keep": keep})).detach().double().numpy()
    r = train.toarray().astype(np.float64)
    adj = official_adj_right(r)
    lam = np.linalg.svd(adj, compute_uv=False)[0] ** 2
    xs, c = x.double().numpy(), (x * keep).double().numpy()

    def smooth(v):
        return ((adj @ v.T).T @ adj) / lam

    z_t = xs + 1.5 * t.numpy()[:, None] / 3 * (smooth(xs) - xs)
    pred = official_denoiser(_params(model), z_t, c, smooth(c), t.double().numpy(), N_ITEMS)
    assert np.allclose(got, ((xs - pred) ** 2).sum(1), rtol=1e-4, atol=1e-4)


def test_training_timesteps_are_one_to_T_and_noise_follows_its_schedule():
    from fedrec.models.diffusion import GraphSignalDiffusion

    d = GraphSignalDiffusion(steps=3, alpha=1.5, noise_scale=0.2, noise_decay=0.5)
    t = d.sample_timesteps(5000, generator=torch.Generator().manual_seed(0))
    assert set(t.tolist()) == {1, 2, 3}
    x = torch.zeros(3, 4)
    assert torch.allclose(d.sigma(torch.tensor([1, 2, 3]), x)[:, 0], torch.tensor([0.05, 0.1, 0.2]))
    z = d.q_sample(x, x + 1.0, torch.tensor([0, 2, 3]), noise=torch.ones(3, 4))  # filter + sigma * noise
    assert torch.allclose(z[:, 0], torch.tensor([0.0 + 0.025, 1.0 + 0.1, 1.5 + 0.2]))


def test_explicit_draws_make_the_loss_deterministic():
    from fedrec.rng import UserRandom

    train = _train(6)
    model = _build(train)
    x = torch.tensor(train.toarray()[:6])
    batch = Batch(users=torch.arange(6), x=x)
    batch.rand = model.draw_randomness(batch, UserRandom(0, 1, np.arange(6), 0))
    assert set(batch.rand["t"].tolist()) <= {1, 2, 3}
    assert torch.equal(model.loss(batch), model.loss(batch))


def test_needs_the_co_interaction_graph():
    with pytest.raises(ConfigError, match="dataset.item_graph"):
        build_model(TINY, DataShape(N_USERS, N_ITEMS))
    with pytest.raises(ConfigError, match="model.steps"):
        build_model({**TINY, "steps": 0}, _shape(_train()))
    with pytest.raises(ConfigError, match="model.ideal_cutoff"):
        build_model({**TINY, "ideal_weight": 1.0, "ideal_cutoff": N_ITEMS + 1}, _shape(_train()))


# ------------------------------------------------------------------ runs
def test_one_epoch_on_tiny_synthetic_data(tiny_cfg, tmp_path):
    from fedrec.experiment import execute

    cfg = tiny_cfg("federation=none", "train.epochs=1", "train.select_metric=capped_recall@20",
                   model="giffcf")
    summary = execute(cfg, tmp_path / "run", progress=False)
    assert np.isfinite(summary["test"]["capped_recall@20"]) and summary["test"]["ndcg@20"] > 0


def _silo_or_device(tiny_cfg, tmp_path, mode: list[str]):
    from tests.test_mechanisms import _serve

    cfg = tiny_cfg(*mode, model="giffcf")
    g0, final, replies, recorder = _serve(cfg, tmp_path, "giffcf")
    assert replies and set(final) == set(g0)
    assert "graph" not in final  # the graph is a buffer of each node, never aggregated
    assert any(not np.allclose(final[k], g0[k]) for k in g0)  # the round trained
    return recorder


def test_silo_round_in_process(tiny_cfg, tmp_path):
    _silo_or_device(tiny_cfg, tmp_path, ["federation=silo", "federation.num_nodes=3", "federation.rounds=1"])


def test_cross_device_round_in_process(tiny_cfg, tmp_path):
    _silo_or_device(tiny_cfg, tmp_path, ["federation=device", "federation.num_nodes=2", "federation.rounds=1",
                                         "federation.user_fraction=0.5", "federation.local_lr=0.05"])


def test_validate_asks_for_the_graph_before_any_file_is_read(tiny_cfg):
    from fedrec.config import validate

    with pytest.raises(ConfigError, match="dataset.item_graph: model 'giffcf' smooths over the co_interaction"):
        validate(tiny_cfg("federation=none", "dataset.item_graph=null", model="giffcf"))
    validate(tiny_cfg("federation=none", model="giffcf"))


@pytest.mark.parametrize("privacy", ["dpsgd", "user_dp", "node_dp"])
def test_refused_under_dp_with_the_reason(tiny_cfg, privacy):
    from fedrec.config import validate

    fed = {"dpsgd": "federation=none", "user_dp": "federation=device", "node_dp": "federation=silo"}[privacy]
    with pytest.raises(ConfigError, match="dataset.item_graph=co_interaction: under privacy="):
        validate(tiny_cfg(fed, f"privacy={privacy}", model="giffcf"))
