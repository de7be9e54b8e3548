"""The baselines (Pop, ItemKNN, EASE, GF-CF, Turbo-CF, BSPM, LightGCN) and the leaderboard, on tiny data.

The closed forms are checked against independent numpy references written from the papers /
official code (EASE as per-item ridge regressions, GF-CF from numpy's SVD, BSPM by integrating the
official ODEs on user rows, ItemKNN by RecBole's per-item loop, Turbo-CF from its official formulas).
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from fedrec.errors import ConfigError
from fedrec.models import build_model
from fedrec.models.base import Batch, DataShape
from tests.conftest import TINY

TRAINING_FREE = ["pop", "itemknn", "ease", "gfcf", "turbocf", "bspm"]
N_USERS, N_ITEMS = 40, 25


def _train(seed: int = 0) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    x = (rng.random((N_USERS, N_ITEMS)) < 0.25).astype(np.float64)
    x[:, -1] = 0.0  # an item nobody trained on: degree 0 must not produce NaN
    x[0] = 0.0  # a user without history
    return sp.csr_matrix(x)


def _fitted(cfg: dict, train: sp.csr_matrix):
    model = build_model(cfg, DataShape(*train.shape))
    model.fit(train)
    return model


def _scores(model, train: sp.csr_matrix) -> np.ndarray:
    x = torch.from_numpy(train.toarray().astype(np.float32))
    with torch.no_grad():
        return model.scores(Batch(users=torch.arange(train.shape[0]), x=x)).numpy().astype(np.float64)


def _cfg(*overrides: str, model: str):
    from fedrec.config import compose

    tiny = [o for o in TINY if not o.startswith("model.")]  # training-free models have no optim block
    return compose([f"model={model}", *tiny, *overrides])


# ------------------------------------------------------------------ references
def test_ease_matches_per_item_ridge_regressions():
    """EASE's closed form = for each item j, ridge regression of column j on the other columns."""
    train, l2 = _train(), 7.0
    x = train.toarray()
    ref = np.zeros((N_ITEMS, N_ITEMS))
    for j in range(N_ITEMS):
        others = [i for i in range(N_ITEMS) if i != j]
        a = x[:, others]
        ref[others, j] = np.linalg.solve(a.T @ a + l2 * np.eye(len(others)), a.T @ x[:, j])
    model = _fitted({"name": "ease", "l2": l2}, train)
    np.testing.assert_allclose(model.item_item.numpy(), ref, atol=1e-5)
    np.testing.assert_allclose(_scores(model, train), x @ ref, atol=1e-4)


def _degree(d: np.ndarray, power: float) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d > 0, d ** power, 0.0)


def _official_norm(x: np.ndarray, user_power: float, item_power: float):
    du, di = x.sum(1), x.sum(0)
    return _degree(du, user_power)[:, None] * x * _degree(di, item_power)[None, :], di


def test_gfcf_matches_official_formula_with_numpy_svd():
    train, k, alpha = _train(), 6, 0.4
    x = train.toarray()
    r, di = _official_norm(x, -0.5, -0.5)
    _, _, vt = np.linalg.svd(r)
    vt = vt[:k]
    d_inv, d = _degree(di, -0.5), _degree(di, 0.5)
    ref = x @ r.T @ r + alpha * (x * d_inv) @ vt.T @ vt * d[None, :]
    got = _scores(_fitted({"name": "gfcf", "alpha": alpha, "factor_dim": k}, train), train)
    np.testing.assert_allclose(got, ref, atol=1e-4)
    assert np.isfinite(got).all()


@pytest.mark.parametrize("filter_", [1, 2, 3])
def test_turbocf_matches_official_filters(filter_):
    train, alpha, power = _train(), 0.6, 0.7
    x = train.toarray()
    r, _ = _official_norm(x, -alpha, alpha - 1)
    p = (r.T @ r) ** power
    filt = {1: p, 2: 2 * p - p @ p, 3: p + 0.01 * (-p @ p @ p + 10 * p @ p - 29 * p)}[filter_]
    got = _scores(_fitted({"name": "turbocf", "alpha": alpha, "power": power, "filter": filter_}, train), train)
    np.testing.assert_allclose(got, x @ filt, atol=1e-4)


def _ode(f, y, t_end, steps, solver):
    """Independent fixed-grid integrator on user rows; rk4 as the degree-4 Taylor step of a linear ODE."""
    h, out = t_end / steps, [y]
    for _ in range(steps):
        if solver == "euler":
            y = y + h * f(y)
        else:  # for dy/dt = y A: y (I + hA + (hA)^2/2 + (hA)^3/6 + (hA)^4/24)
            t1 = f(y)
            t2 = f(t1)
            t3 = f(t2)
            t4 = f(t3)
            y = y + h * t1 + h ** 2 / 2 * t2 + h ** 3 / 6 * t3 + h ** 4 / 24 * t4
        out.append(y)
    return out


@pytest.mark.parametrize("opts", [
    {},  # the official defaults: one Euler step each, early merge
    {"solver_shr": "rk4", "K_s": 2, "T_s": 2.5, "idl_beta": 0.2, "final_sharpening": True},
    {"final_sharpening": False, "t_point_combination": True, "K_b": 2, "solver_blr": "rk4"},
    {"sharpening_off": True},
])
def test_bspm_matches_the_official_ode_on_user_rows(opts):
    train, k = _train(), 6
    x = train.toarray()
    r, di = _official_norm(x, -0.5, -0.5)
    pt = r.T @ r
    _, _, vt = np.linalg.svd(r)
    vt = vt[:k]
    d_inv, d = _degree(di, -0.5), _degree(di, 0.5)
    c = {"idl_beta": 0.3, "T_idl": 1.0, "K_idl": 1, "T_b": 1.0, "K_b": 1, "T_s": 1.0, "K_s": 1,
         "solver_idl": "euler", "solver_blr": "euler", "solver_shr": "euler", "final_sharpening": True,
         "sharpening_off": False, "t_point_combination": False} | opts
    # the official getUsersRating, on the rows themselves
    idl = _ode(lambda y: (y * d_inv) @ vt.T @ vt * d[None, :] - y, x, c["T_idl"], c["K_idl"], c["solver_idl"])
    blur = _ode(lambda y: y @ pt - y, x, c["T_b"], c["K_b"], c["solver_blr"])
    if not c["sharpening_off"]:
        y0 = c["idl_beta"] * idl[-1] + blur[-1] if c["final_sharpening"] else blur[-1]
        sharp = _ode(lambda y: -(y @ pt), y0, c["T_s"], c["K_s"], c["solver_shr"])
    if c["t_point_combination"]:
        u2 = np.mean(blur[1:] + (sharp[1:] if not c["sharpening_off"] else []), axis=0)
    else:
        u2 = blur[-1] if c["sharpening_off"] else sharp[-1]
    ref = u2 if (c["final_sharpening"] and not c["sharpening_off"]) else u2 + c["idl_beta"] * idl[-1]
    got = _scores(_fitted({"name": "bspm", "factor_dim": k, **opts}, train), train)
    np.testing.assert_allclose(got, ref, atol=1e-4)


def test_itemknn_matches_recbole_loop():
    train, k, shrink = _train(), 4, 2.0
    x = train.toarray()
    norms = np.sqrt((x ** 2).sum(0))
    ref = np.zeros((N_ITEMS, N_ITEMS))
    for j in range(N_ITEMS):  # RecBole's ComputeSimilarity(method="item"), one target item at a time
        w = x.T @ x[:, j]
        w[j] = 0.0
        w = w / (norms[j] * norms + shrink + 1e-6)
        top = np.argsort(-w, kind="stable")[:k]
        ref[top, j] = w[top]
    got = _fitted({"name": "itemknn", "k": k, "shrink": shrink}, train).item_item.numpy()
    # ties at the k-th neighbour may be broken differently: compare each column's kept weight mass
    np.testing.assert_allclose(np.sort(got, 0)[-k:], np.sort(ref, 0)[-k:], atol=1e-6)
    assert ((got != 0).sum(0) <= k).all()


def test_pop_ranks_by_training_count():
    train = _train()
    s = _scores(_fitted({"name": "pop"}, train), train)
    np.testing.assert_array_equal(s[3], train.sum(0).A1)
    assert (s == s[0]).all()


def test_lightgcn_propagation_matches_dense_reference_and_gradient():
    train = _train()
    torch.manual_seed(0)
    model = _fitted({"name": "lightgcn", "embedding_size": 4, "n_layers": 2}, train)
    a = np.zeros((N_USERS + N_ITEMS,) * 2)
    a[:N_USERS, N_USERS:] = train.toarray()
    a[N_USERS:, :N_USERS] = train.toarray().T
    d = (a.sum(1) + 1e-7) ** -0.5
    a_hat = torch.tensor(d[:, None] * a * d[None, :], dtype=torch.float32)
    e0 = torch.cat([model.user_emb.weight, model.item_emb.weight]).detach().clone().requires_grad_(True)
    ref = torch.stack([e0, a_hat @ e0, a_hat @ a_hat @ e0], 1).mean(1)
    users, items = model.propagate()
    np.testing.assert_allclose(torch.cat([users, items]).detach().numpy(), ref.detach().numpy(), atol=1e-5)
    w = torch.randn_like(ref)
    (torch.cat([users, items]) * w).sum().backward()
    (ref * w).sum().backward()
    np.testing.assert_allclose(model.user_emb.weight.grad.numpy(), e0.grad[:N_USERS].numpy(), atol=1e-5)


# ------------------------------------------------------------------ runs through the real entry points
@pytest.mark.parametrize("name", TRAINING_FREE)
def test_training_free_central_run_is_one_fit(name, tmp_path):
    from fedrec.experiment import execute

    summary = execute(_cfg("federation=none", f"paths.output_root={tmp_path}", model=name), tmp_path / "run",
                      progress=False)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [1] and summary["best_round"] == 1
    assert 0 < summary["test"]["recall@20"] <= 1 and np.isfinite(summary["valid"]["ndcg@20"])


def test_lightgcn_one_epoch_central_run(tiny_cfg, tmp_path):
    from fedrec.experiment import execute

    summary = execute(tiny_cfg("federation=none", "train.epochs=1", model="lightgcn"), tmp_path / "run",
                      progress=False)
    assert summary["rounds"] == 1 and 0 <= summary["test"]["recall@20"] <= 1


def test_lightgcn_silo_federation_keeps_user_embeddings_private(tiny_cfg, tmp_path, monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    from fedrec.experiment import execute
    from tests.inprocess_grid import InProcessGrid

    for attr, value in (("_run_id", 1), ("_node_id", 1), ("_task_id", 1)):  # as a SuperLink would set them
        monkeypatch.setattr(TaskIdentity, attr, value)

    cfg = tiny_cfg("federation=silo", "federation.num_nodes=3", "federation.rounds=2", model="lightgcn")
    summary = execute(cfg, tmp_path / "run", grid=InProcessGrid(3, state_dir=tmp_path / "nodes"), progress=False)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "best.pt", weights_only=False)
    assert "user_emb.weight" not in ckpt["arrays"] and "item_emb.weight" in ckpt["arrays"]
    assert summary["rounds"] == 2 and 0 <= summary["test"]["recall@20"] <= 1


def test_silo_node_graph_holds_only_its_users():
    from fedrec.federated.client_app import _own_rows
    from fedrec.federated.node import NodeView

    train = _train()

    class _Data:
        n_users = N_USERS

    _Data.train = train
    rows = _own_rows(NodeView(cfg=None, data=_Data(), users=np.array([2, 5, 7]), partition_id=0))
    assert set(np.nonzero(np.diff(rows.indptr))[0]) <= {2, 5, 7}
    np.testing.assert_array_equal(rows[[2, 5, 7]].toarray(), train[[2, 5, 7]].toarray())


# one check for every training-free model (ItemItemRecommender.trains_by_sgd); two of them suffice
@pytest.mark.parametrize("name", ["pop", "bspm"])
@pytest.mark.parametrize("mode", ["federation=silo", "federation=device", "privacy=dpsgd"])
def test_training_free_refuses_federation_and_dpsgd(name, mode, tmp_path):
    from fedrec.experiment import execute

    over = [mode] if mode.startswith("federation") else ["federation=none", mode]
    with pytest.raises(ConfigError, match="training-free"):
        execute(_cfg(*over, f"paths.output_root={tmp_path}", model=name), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("over,match", [
    (["federation=none", "privacy=dpsgd"], "privacy=dpsgd: model 'lightgcn' propagates"),
    (["federation=device"], "federation=device: model 'lightgcn' propagates"),
])
def test_lightgcn_refuses_dpsgd_and_cross_device(tiny_cfg, tmp_path, over, match):
    from fedrec.experiment import execute

    with pytest.raises(ConfigError, match=match):
        execute(tiny_cfg(*over, model="lightgcn"), tmp_path / "run", progress=False)


# ------------------------------------------------------------------ the leaderboard
def test_leaderboard_end_to_end_two_models_two_trials(tmp_path, capsys):
    from simulations.leaderboard import run_leaderboard

    out = tmp_path / "lb"
    tiny = [o for o in TINY if not o.startswith("model.")]
    res = run_leaderboard(["models=[ease,pop]", "tune.trials=2", f"out={out}", *tiny], log=print)
    printed = capsys.readouterr().out
    assert printed.count("[ease ") == 2 and printed.count("[pop ") == 1  # one line per trial; pop has no space
    rows = list(csv.DictReader(open(out / "leaderboard.csv")))
    assert [r["model"] for r in rows] == ["ease", "pop"]
    assert rows[0]["trials"] == "2" and rows[1]["trials"] == "1"
    ease_trials = res["trials"]["ease"]
    n_items = ease_trials[0]["summary"]["dataset"]["items"]
    assert int(rows[0]["params"]) == n_items ** 2 and int(rows[1]["params"]) == n_items  # B; the counts
    chosen = max(ease_trials, key=lambda r: r["valid"])
    assert float(rows[0]["valid recall@20"]) == pytest.approx(chosen["valid"])
    assert float(rows[0]["test recall@20"]) == pytest.approx(chosen["summary"]["test"]["recall@20"])
    assert ease_trials[0]["values"] == {"model.l2": 500.0}  # trial 0: the conf/model default
    md = (out / "leaderboard.md").read_text()
    assert "| ease |" in md and "test ndcg@20" in md
    assert (out / "leaderboard.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list(csv.reader(open(out / "trials.csv")))) == 1 + 3


@pytest.mark.parametrize("argv,match", [
    (["models=[ease,nope]"], r"models: unknown model 'nope'"),
    (["models=[ease]", "tune.trials=0"], r"tune.trials"),
    (["models=[ease]", "tune.bogus=1"], r"tune.bogus: unknown leaderboard option"),
    (["models=[ease]", "model=bpr"], r"federation/model"),
])
def test_leaderboard_bad_input_fails_before_work(tmp_path, argv, match):
    from simulations.leaderboard import run_leaderboard

    with pytest.raises(ConfigError, match=match):
        run_leaderboard([*argv, f"out={tmp_path / 'lb'}"])
    assert not (tmp_path / "lb").exists()


def test_leaderboard_bad_space_is_one_line(tmp_path):
    from simulations.leaderboard import _param, check_plan, ModelSpec, split_argv, Param

    with pytest.raises(ConfigError, match=r"spaces.ease.space.model.l2: needs numeric low < high"):
        _param("ease", "model.l2", {"type": "float", "low": 5, "high": 1})
    with pytest.raises(ConfigError, match=r"log scale"):
        _param("ease", "model.l2", {"type": "float", "low": 0, "high": 1, "log": True})
    opts, over = split_argv(["models=[ease]"])
    bad = {"ease": ModelSpec("ease", {}, [Param("model.lambda", "float", 1.0, 2.0)])}
    with pytest.raises(ConfigError, match=r"spaces.ease.space.model.lambda: no such key"):
        check_plan(opts, over, bad)


def test_every_training_free_model_says_so():
    from fedrec.models import REGISTRY

    for name in TRAINING_FREE:
        module, cls, _ = REGISTRY[name]
        assert getattr(__import__(module, fromlist=[cls]), cls).trains_by_sgd is False


def test_every_registered_baseline_has_a_valid_space():
    from simulations.leaderboard import load_spaces

    specs = load_spaces()
    assert set(TRAINING_FREE + ["lightgcn", "bpr", "multvae", "diffrec"]) <= set(specs)


def test_synthesize_utility_check_fits_a_training_free_model():
    from fedrec.data import load_run_data
    from simulations.synthesize import fit_and_evaluate

    cfg = _cfg("federation=none", model="ease")
    data = load_run_data(cfg.dataset, 0)
    users = np.arange(data.n_users)
    res = fit_and_evaluate(cfg, data.train, data, users, 0)
    from fedrec.eval import evaluate_model

    ref = _fitted({"name": "ease", "l2": float(cfg.model.l2)}, data.train)
    assert res["epoch"] == 1
    assert res["test"]["recall@20"] == pytest.approx(evaluate_model(ref, data, [10, 20])["test"]["recall@20"])
