"""Cross-device training: vectorised per-user clients equal independent per-user clients."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from fedrec.federated.cross_device import LocalTraining, schedule_position, train_users
from fedrec.federated.device_node import STREAM_SAMPLE, sampling_threshold, user_coins
from fedrec.models import DataShape, build_model
from fedrec.models.base import Batch
from fedrec.rng import UserRandom

MODELS = {
    "diffrec": {"dims": [8, 16], "steps": 5},
    "ldiffrec": {"in_dims": [6], "mlp_dims": [6], "steps": 5},
    "bpr": {"embedding_size": 4},
    "multvae": {"hidden_dims": [8], "latent_dim": 4},
}


def per_user_reference(model, users, rows, weights, local, seed, round_, prox_mu: float = 0.0):
    """Each user alone: a deep copy of the model, torch.optim, its own one-row private table."""
    private = sorted(model.private_parameter_names())
    outs, privs = [], {n: [] for n in private}
    for i, u in enumerate(users):
        m = copy.deepcopy(model)
        m.train()
        params = dict(m.named_parameters())
        for n in private:
            params[n].data = params[n].data[u:u + 1].clone()
        opt = (torch.optim.SGD if local.optimizer == "sgd" else torch.optim.Adam)(m.parameters(), lr=local.lr)
        start = {n: p.detach().clone() for n, p in m.named_parameters() if n not in private}
        for step in range(local.local_epochs):
            schedule_position(m, round_, step, local.local_epochs)  # a client in round r, step s
            b = Batch(users=torch.tensor([0]), x=rows[i:i + 1])
            b.rand = m.draw_randomness(Batch(users=torch.tensor([u]), x=rows[i:i + 1]),
                                       UserRandom(seed, round_, np.array([u]), step))
            opt.zero_grad()
            prox = sum(((p - start[n]) ** 2).sum() for n, p in m.named_parameters() if n in start)
            (m.loss(b).mean() + 0.5 * prox_mu * prox).backward()
            opt.step()
        outs.append({n: p.detach().clone() for n, p in m.named_parameters() if n not in private})
        for n in private:
            privs[n].append(dict(m.named_parameters())[n].detach()[0])
    w = weights / weights.sum()
    mean = {n: sum(w[i] * outs[i][n] for i in range(len(users))) for n in outs[0]}
    return mean, {n: torch.stack(v) for n, v in privs.items()}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("optimizer,epochs,per_user", [("sgd", 1, False), ("sgd", 1, True), ("sgd", 3, False),
                                                       ("adam", 2, True)])
def test_vectorised_users_equal_independent_clients(name, optimizer, epochs, per_user):
    # Prepare
    rng = np.random.default_rng(0)
    n_users, n_items = 20, 30
    x = torch.from_numpy((rng.random((n_users, n_items)) < 0.2).astype(np.float32))
    torch.manual_seed(0)
    model = build_model({"name": name, **MODELS[name]},
                        DataShape(n_users, n_items, item_emb=rng.standard_normal((n_items, 3))))
    private = sorted(model.private_parameter_names())
    users = np.array([1, 3, 4, 7, 10, 15])
    rows, weights = x[users], x[users].sum(1) + 1
    private_rows = {n: dict(model.named_parameters())[n].detach()[users].clone() for n in private}
    local = LocalTraining(optimizer=optimizer, lr=0.05, local_epochs=epochs, chunk_size=4)
    # Execute
    res = train_users(model, users, rows, weights, private_rows, local, seed=7, round_=3, per_user=per_user)
    want_mean, want_private = per_user_reference(model, users, rows, weights, local, 7, 3)
    # Assert
    if per_user:
        w = weights / weights.sum()
        mean = {n: (v * w.view(-1, *([1] * (v.dim() - 1)))).sum(0) for n, v in res.per_user.items()}
    else:
        mean = res.mean
    for n in want_mean:
        scale = float(want_mean[n].abs().max()) + 1e-12
        assert float((mean[n] - want_mean[n]).abs().max()) / scale < 1e-4, n
    for n in private:
        torch.testing.assert_close(res.private[n], want_private[n], rtol=1e-4, atol=1e-6)
    assert len(want_mean) > 0


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_fedprox_term_per_user_equals_independent_clients(optimizer):
    # FedProx under federation=device: every user adds mu/2 ||w - w_global||^2 to its own loss
    rng = np.random.default_rng(1)
    x = torch.from_numpy((rng.random((12, 30)) < 0.2).astype(np.float32))
    torch.manual_seed(0)
    model = build_model({"name": "diffrec", **MODELS["diffrec"]}, DataShape(12, 30))
    users = np.array([0, 2, 5, 9])
    rows, weights = x[users], torch.ones(4)
    local = LocalTraining(optimizer=optimizer, lr=0.1, local_epochs=4, prox_mu=1.0)
    res = train_users(model, users, rows, weights, {}, local, seed=3, round_=2, per_user=False)
    want, _ = per_user_reference(model, users, rows, weights, local, 3, 2, prox_mu=1.0)
    plain, _ = per_user_reference(model, users, rows, weights, local, 3, 2, prox_mu=0.0)
    for n in want:
        torch.testing.assert_close(res.mean[n], want[n], rtol=1e-4, atol=1e-6)
    assert any(float((want[n] - plain[n]).abs().max()) > 1e-4 for n in want)  # the term matters here


def test_sampling_threshold_fixed_count_and_poisson():
    from fedrec.run_config import FederationConfig

    n = 1000

    fed = FederationConfig(mode="device", sampling="fixed", user_fraction=0.1)
    for rnd in (1, 2, 3):
        tau = sampling_threshold(fed, n, seed=0, round_=rnd)
        chosen = user_coins(0, rnd, np.arange(n), STREAM_SAMPLE) <= tau
        assert chosen.sum() == 100
        # the same users are chosen however users are spread over nodes
        halves = [user_coins(0, rnd, part, STREAM_SAMPLE) <= tau for part in (np.arange(500), np.arange(500, n))]
        assert np.array_equal(np.concatenate(halves), chosen)
    fed = FederationConfig(mode="device", sampling="poisson", user_fraction=0.2)
    tau = sampling_threshold(fed, n, seed=0, round_=1)
    counts = [(user_coins(0, r, np.arange(n), STREAM_SAMPLE) <= tau).sum() for r in range(1, 30)]
    assert tau == 0.2 and 150 < np.mean(counts) < 250 and len(set(counts)) > 1


def _lines(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("model", ["diffrec", "bpr"])
def test_device_mode_equals_one_flower_client_per_user(tiny_cfg, tmp_path, model):
    """2 vectorised nodes == every user its own Flower node (flat per-user FedAvg), through Flower."""
    common = ["federation=device", "federation.rounds=2", "federation.user_fraction=0.5",
              "federation.local_optimizer=adam", "federation.local_lr=0.01", "train.local_epochs=2",
              "federation.dropout_rate=0.2", "dataset.n_users=14", "dataset.n_items=30", "federation.chunk_size=4"]
    vec = tiny_cfg(*common, "federation.num_nodes=2", model=model)
    flat = tiny_cfg(*common, "federation.num_nodes=14", "partition=user", model=model)
    from fedrec.experiment import execute

    s_vec = execute(vec, tmp_path / "vec", progress=False)
    s_flat = execute(flat, tmp_path / "flat", progress=False)
    lv, lf = _lines(tmp_path / "vec"), _lines(tmp_path / "flat")
    for a, b in zip(lv, lf):
        for key in ("sampled-users", "trained-users", "dropped-users"):
            assert a["train"][key] == b["train"][key]
    assert lv[0]["train"]["sampled-users"] == 7 and lv[0]["train"]["dropped-users"] >= 0
    ca = torch.load(tmp_path / "vec" / "checkpoints" / "round_00002.pt", weights_only=False)["arrays"]
    cb = torch.load(tmp_path / "flat" / "checkpoints" / "round_00002.pt", weights_only=False)["arrays"]
    for n in ca:
        torch.testing.assert_close(ca[n], cb[n], rtol=1e-4, atol=1e-5)
    # metrics depend on private rows too (BPR: evaluated on the nodes with each user's own embedding)
    for split in ("valid", "test"):
        for k, v in s_vec[split].items():
            assert v == pytest.approx(s_flat[split][k], abs=1e-4), (split, k)


@pytest.mark.parametrize("name", ["diffrec", "bpr"])
def test_personalised_scores(name):
    """With a vanishing local rate the personalised scores are the global ones; with a real one they move."""
    from fedrec.data.interactions import Interactions
    from fedrec.eval import evaluate_model
    from fedrec.eval.metrics import evaluate_scores
    from fedrec.federated.cross_device import personalised_scorer
    import scipy.sparse as sp

    rng = np.random.default_rng(1)
    n_users, n_items = 16, 25
    m = lambda p: sp.csr_matrix((rng.random((n_users, n_items)) < p).astype(np.float32))  # noqa: E731
    train, valid, test = m(0.25), m(0.05), m(0.05)
    data = Interactions("t", train, valid, test, np.arange(n_users).astype(str), np.arange(n_items).astype(str))
    torch.manual_seed(0)
    model = build_model({"name": name, **MODELS[name]}, DataShape(n_users, n_items))
    users = np.arange(n_users)
    tiny = personalised_scorer(model, data, users, LocalTraining(lr=1e-12, local_epochs=2), 0, 5)
    base = evaluate_model(model, data, [5, 10], users=users)
    got = evaluate_scores(tiny, data, [5, 10], users=users)
    for split in ("valid", "test"):
        for k, v in base[split].items():
            assert got[split][k] == pytest.approx(v, abs=1e-6)
    moved = personalised_scorer(model, data, users, LocalTraining(lr=0.5, local_epochs=2), 0, 5)
    x = torch.from_numpy(train.toarray())
    from fedrec.models.base import Batch

    model.eval()
    assert not torch.allclose(moved(users, x), model.scores(Batch(users=torch.as_tensor(users), x=x)))


@pytest.mark.parametrize("model,strategy", [("multvae", "fedavgm"), ("ldiffrec", "fedadam")])
def test_device_mode_with_other_models_and_strategies(tiny_cfg, tmp_path, model, strategy):
    """Every model trains cross-device under Flower's server-side optimisers, with stragglers and a cap."""
    from fedrec.experiment import execute

    cfg = tiny_cfg("federation=device", "federation.rounds=2", "federation.user_fraction=0.5",
                   "federation.straggler_rate=0.3", "federation.max_user_interactions=5",
                   "federation.weighting=interactions", f"strategy={strategy}", model=model)
    summary = execute(cfg, tmp_path / "run", progress=False)
    lines = _lines(tmp_path / "run")
    assert all(x["train"]["sampled-users"] == 30 for x in lines)
    assert all(x["train"]["straggler-users"] > 0 and x["train"]["rejected-updates"] == 0 for x in lines)
    assert summary["strategy"] == strategy and summary["test"]["ndcg@20"] >= 0
