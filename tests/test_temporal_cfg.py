"""T-DiffRec / LT-DiffRec (time-aware input weights, fedrec/data/input_weights.py) and CFG-DiffRec
(fedrec/models/cfgdiffrec.py): the weights against the official T-DiffRec loader re-derived in numpy,
the weighted-input seam (training rows, cross-device rows, evaluation history vs binary mask), the
CFG-DiffRec loss and guided inference against plain-torch re-derivations, and one centralised, silo,
cross-device and DP-SGD run of each model."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from fedrec.data.input_weights import TemporalLinspace, temporal_linspace_weights
from fedrec.data.interactions import Interactions
from fedrec.errors import ConfigError
from fedrec.models import build_model
from fedrec.models.base import Batch, DataShape, Recommender, input_matrix
from tests.test_strategies import task_identity  # noqa: F401  (autouse fixture: Message() needs it)

MODELS = ["tdiffrec", "ltdiffrec", "cfgdiffrec"]


# ------------------------------------------------------------------ the official weights, re-derived
def official_weights(train_list: np.ndarray, n_users: int, n_items: int, w_min: float, w_max: float) -> np.ndarray:
    """``T-DiffRec/data_utils.data_load``: users in first-appearance order, each user's items in file order,
    ``np.linspace(w_min, w_max, n)`` along them, into a float64 csr; returned dense."""
    train_dict: dict[int, list[int]] = {}
    for uid, iid in train_list:
        train_dict.setdefault(int(uid), []).append(int(iid))
    weights, pairs = [], []
    for uid in train_dict:
        weights.extend(np.linspace(w_min, w_max, len(train_dict[uid])))
        pairs.extend([uid, iid] for iid in train_dict[uid])
    pairs = np.array(pairs)
    return sp.csr_matrix((weights, (pairs[:, 0], pairs[:, 1])), dtype="float64", shape=(n_users, n_items)).toarray()


def _write_diffrec_split(folder, train_list: np.ndarray) -> None:
    folder.mkdir()
    np.save(folder / "train_list.npy", train_list)
    # every valid/test user and item must appear in training
    np.save(folder / "valid_list.npy", train_list[:2][:, [0, 1]])
    np.save(folder / "test_list.npy", train_list[2:4][:, [0, 1]])


def test_weights_equal_the_official_loader_on_diffrec_files(tmp_path):
    """Users interleaved and items out of id order in train_list.npy: the file order is the time order."""
    from fedrec.data.loaders import load_diffrec

    rng = np.random.default_rng(3)
    n_users, n_items = 7, 12
    pairs = np.array([(u, i) for u in range(n_users) for i in rng.choice(n_items, rng.integers(1, 9), replace=False)])
    pairs = pairs[rng.permutation(len(pairs))]  # users interleaved, items in random order
    _write_diffrec_split(tmp_path / "d", pairs)
    data = load_diffrec({"kind": "diffrec", "name": "t", "path": str(tmp_path / "d")}, 0)
    for w_min, w_max in [(0.1, 1.0), (0.5, 1.0), (0.3, 0.3)]:
        got = data.input_rows(TemporalLinspace(w_min, w_max)).toarray()
        want = official_weights(pairs, n_users, n_items, w_min, w_max).astype(np.float32)
        np.testing.assert_array_equal(got, want)
    assert data.input_rows(None) is data.train  # the binary rows are left alone
    # w_min = w_max = 1: T-DiffRec's rows are DiffRec's binary rows
    np.testing.assert_array_equal(data.input_rows(TemporalLinspace(1.0, 1.0)).toarray(), data.train.toarray())


def test_weight_order_semantics():
    """Oldest -> w_min, newest -> w_max, ties keep CSR (item id) order, one interaction -> w_min."""
    train = sp.csr_matrix(np.array([[1, 1, 1, 0], [0, 1, 0, 0], [1, 1, 1, 1]], dtype=np.float32))
    ts = np.array([30, 10, 20,  # user 0: items 1 (t=10), 2 (t=20), 0 (t=30)
                   5,  # user 1: a single interaction
                   7, 7, 1, 7])  # user 2: item 2 first, then the tie 0, 1, 3 in item order
    w = sp.csr_matrix((temporal_linspace_weights(train, ts, 0.2, 1.0), train.indices, train.indptr), shape=train.shape)
    np.testing.assert_array_equal(w.toarray()[0], np.r_[np.linspace(0.2, 1.0, 3)[[2, 0, 1]], 0.0])
    np.testing.assert_array_equal(w.toarray()[1], [0.0, 0.2, 0.0, 0.0])
    np.testing.assert_array_equal(w.toarray()[2], np.linspace(0.2, 1.0, 4)[[1, 2, 0, 3]])


def _interactions(timestamps) -> Interactions:
    train = sp.csr_matrix(np.array([[1, 0, 1], [0, 1, 1]], dtype=np.float32))
    empty = sp.csr_matrix((2, 3), dtype=np.float32)
    return Interactions(name="toy", train=train, valid=empty, test=empty, user_ids=np.array(["a", "b"]),
                        item_ids=np.array(["x", "y", "z"]), train_timestamps=timestamps)


def test_no_time_order_and_bad_weights_are_refused():
    with pytest.raises(ConfigError, match="model.w_min/w_max: time-aware weights need .* dataset 'toy' has none"):
        _interactions(None).input_rows(TemporalLinspace(0.1, 1.0))
    with pytest.raises(ConfigError, match="model.w_min/w_max: need 0 < w_min <= w_max"):
        TemporalLinspace(0.0, 1.0)
    with pytest.raises(ConfigError, match="model.w_min/w_max"):
        build_model({"name": "tdiffrec", "w_min": 0.9, "w_max": 0.5, "dims": [4]}, DataShape(2, 3))


class _Recording(Recommender):
    """Scores = a fixed item order; records the rows it was given."""

    def __init__(self, weighting):
        super().__init__()
        self.input_weighting = weighting
        self.seen_x: list[torch.Tensor] = []

    def scores(self, batch: Batch) -> torch.Tensor:
        self.seen_x.append(batch.x.clone())
        return torch.arange(batch.x.shape[1], dtype=torch.float32).repeat(batch.x.shape[0], 1)


def test_weighted_rows_reach_trainer_and_evaluation_but_the_mask_stays_binary():
    from fedrec.eval.metrics import evaluate_model
    from fedrec.train import model_rows

    data = _interactions(np.array([2, 1, 0, 3]))
    data.valid = sp.csr_matrix(np.array([[0, 1, 0], [1, 0, 0]], dtype=np.float32))
    weighting = TemporalLinspace(0.25, 1.0)
    weighted = np.array([[1.0, 0, 0.25], [0, 0.25, 1.0]], dtype=np.float32)  # user 0: item 2 older than item 0
    model = _Recording(weighting)
    np.testing.assert_array_equal(input_matrix(model, data).toarray(), weighted)
    np.testing.assert_array_equal(model_rows(model, data, np.arange(2)).batch(np.arange(2)).x.numpy(), weighted)
    res = evaluate_model(model, data, [1, 2])
    np.testing.assert_array_equal(model.seen_x[0].numpy(), weighted)
    # the same metrics as the binary model: the mask is the binary interactions whatever the input weights
    binary = _Recording(None)
    assert res["valid"] == evaluate_model(binary, data, [1, 2])["valid"]
    assert res["valid"]["recall@1"] == 1.0  # user 0: item 1 is its only unseen item, user 1: item 0


def test_cross_device_rows_count_interactions_not_weights():
    from fedrec.federated.device_node import cap_rows, row_sums

    rows = torch.tensor([[0.1, 0.55, 1.0, 0.0], [0.0, 0.1, 0.0, 0.0]])
    np.testing.assert_array_equal(row_sums(rows).numpy(), [3.0, 1.0])
    capped = cap_rows(rows, np.array([0, 1]), 2, seed=0, round_=1)
    assert int((capped[0] > 0).sum()) == 2 and bool(((capped[0] == rows[0]) | (capped[0] == 0)).all())  # weights kept
    assert torch.equal(capped[1], rows[1])


def test_temporal_models_reuse_diffrec_and_ldiffrec():
    from fedrec.models.diffrec import DiffRec
    from fedrec.models.ldiffrec import LDiffRec

    t = build_model({"name": "tdiffrec", "dims": [4], "steps": 3}, DataShape(3, 6))
    lt = build_model({"name": "ltdiffrec", "in_dims": [4], "mlp_dims": [4], "steps": 3, "n_cate": 1}, DataShape(3, 6))
    assert isinstance(t, DiffRec) and isinstance(lt, LDiffRec)
    assert t.input_weighting == lt.input_weighting == TemporalLinspace(0.1, 1.0)
    assert build_model({"name": "diffrec", "dims": [4], "steps": 3}, DataShape(3, 6)).input_weighting is None


# ------------------------------------------------------------------ CFG-DiffRec against plain torch
def _cfg_model(**over):
    torch.manual_seed(0)
    cfg = {"name": "cfgdiffrec", "dims": [8], "steps": 4, "importance_sampling": False, **over}
    return build_model(cfg, DataShape(5, 6))


def test_cfg_loss_matches_a_plain_torch_rederivation():
    model = _cfg_model()
    model.train()
    x0 = (torch.rand(5, 6, generator=torch.Generator().manual_seed(1)) < 0.5).float()
    g = torch.Generator().manual_seed(2)
    r = {"t": torch.tensor([0, 1, 3, 2, 3]), "noise": torch.randn(5, 6, generator=g),
         "keep": (torch.rand(5, 12, generator=g) > 0.5).float() * 2.0,
         "cond_keep": (torch.rand(5, 6, generator=g) > 0.5).float(),
         "uncond": torch.tensor([False, True, False, False, True])}
    got = model.loss(Batch(users=torch.arange(5), x=x0, rand=r))
    # reference: the DiffRec linear-var schedule with the first beta 1e-5, q(x_t|x_0), the condition
    # zeroed where unconditional, the MLP on [x_t, c] masked by keep, SNR(t-1) - SNR(t) weights (1 at t=0)
    var = 0.005 * np.linspace(0.005, 0.01, 4, dtype=np.float64)
    ab = 1.0 - var
    betas = np.concatenate([[var[0]], 1 - ab[1:] / ab[:-1]])
    betas[0] = 1e-5
    ab = np.cumprod(1 - betas)
    snr = ab / (1 - ab)
    w = np.concatenate([[1.0], snr[:-1] - snr[1:]])
    t = r["t"].numpy()
    x_t = (torch.tensor(np.sqrt(ab[t]), dtype=torch.float32)[:, None] * x0
           + torch.tensor(np.sqrt(1 - ab[t]), dtype=torch.float32)[:, None] * r["noise"])
    cond = torch.where(r["uncond"][:, None], torch.zeros(()), x0 * r["cond_keep"])
    mlp = model.denoiser.mlp
    emb = mlp.emb_layer(_sinusoid(r["t"], 10))
    h = torch.cat([torch.cat([x_t, cond], 1) * r["keep"], emb], 1)
    for layer in mlp.in_layers:
        h = torch.tanh(layer(h))
    assert len(mlp.out_layers) == 1  # dims=[8]: one output layer, no tanh after it
    out = mlp.out_layers[0](h)
    want = torch.tensor(w[t], dtype=torch.float32) * ((x0 - out) ** 2).mean(1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def _sinusoid(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-np.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    a = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(a), torch.sin(a)], 1)


@pytest.mark.parametrize("w", [0.0, 1.5])
def test_cfg_scores_are_the_guided_posterior_mean_chain(w):
    model = _cfg_model(guidance_weight=w)
    model.eval()
    x = (torch.rand(3, 6, generator=torch.Generator().manual_seed(4)) < 0.5).float()
    got = model.scores(Batch(users=torch.arange(3), x=x))
    d, f = model.diffusion, model.denoiser
    z = x.clone()
    with torch.no_grad():
        for i in reversed(range(d.steps)):
            t = torch.full((3,), i)
            x0 = (1 + w) * f(z, t, x) - w * f(z, t, torch.zeros_like(x))
            z = d.posterior_coef1[i] * x0 + d.posterior_coef2[i] * z
    torch.testing.assert_close(got, z, rtol=1e-5, atol=1e-6)


def test_cfg_guidance_changes_the_scores_and_bad_keys_are_refused():
    x = torch.ones(2, 6)
    a, b = (_cfg_model(guidance_weight=w).eval().scores(Batch(users=torch.arange(2), x=x)) for w in (0.0, 2.0))
    assert not torch.allclose(a, b)
    for key, value in [("cond_drop_prob", 1.5), ("cond_item_dropout", 1.0), ("guidance_weight", -1.0)]:
        with pytest.raises(ConfigError, match=f"model.{key}"):
            _cfg_model(**{key: value})


# ------------------------------------------------------------------ runs: centralised, silo, device, DP-SGD
@pytest.mark.parametrize("name", MODELS)
def test_one_central_epoch(tiny_cfg, tmp_path, name):
    from fedrec.experiment import execute

    summary = execute(tiny_cfg("federation=none", "train.epochs=1", model=name), tmp_path / "run", progress=False)
    assert np.isfinite(summary["valid"]["recall@20"]) and summary["test"]["ndcg@20"] > 0


def _silo_or_device(tiny_cfg, tmp_path, name, mode):
    from tests.test_mechanisms import _serve

    g0, final, replies, _ = _serve(tiny_cfg(*mode, model=name), tmp_path, name)
    assert replies and set(final) == set(g0)
    assert any(not np.allclose(final[k], g0[k]) for k in g0)  # the round trained


@pytest.mark.parametrize("name", MODELS)
def test_silo_round_in_process(tiny_cfg, tmp_path, name):
    _silo_or_device(tiny_cfg, tmp_path, name, ["federation=silo", "federation.num_nodes=2", "federation.rounds=1"])


@pytest.mark.parametrize("name", MODELS)
def test_cross_device_round_in_process(tiny_cfg, tmp_path, name):
    _silo_or_device(tiny_cfg, tmp_path, name, ["federation=device", "federation.num_nodes=2", "federation.rounds=1",
                                               "federation.user_fraction=0.5", "federation.local_lr=0.05"])


# LT-DiffRec's DP-SGD path is L-DiffRec's on weighted rows; slow (about 2x the other two under Opacus)
@pytest.mark.parametrize("name", ["tdiffrec", "cfgdiffrec", pytest.param("ltdiffrec", marks=pytest.mark.slow)])
def test_dpsgd_epoch(tiny_cfg, tmp_path, name):
    from fedrec.experiment import execute

    summary = execute(tiny_cfg("federation=none", "privacy=dpsgd", "train.epochs=1", model=name), tmp_path / "run",
                      progress=False)
    assert summary["privacy"]["epsilon"] > 0
