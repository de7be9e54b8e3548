"""device=cpu|cuda|auto: resolving the key, failing early, and the torch SplitMix64 matching NumPy's.

Tests marked ``gpu`` run only where torch sees a CUDA GPU (``tests/conftest.py`` skips them
elsewhere): a centralised DiffRec epoch on cuda, and cuda against cpu for the keyed draws,
cross-device training and evaluation.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from fedrec import rng as R
from fedrec.errors import ConfigError
from fedrec.models import DataShape, build_model

MODELS = {  # the cross-device models of tests/test_cross_device.py, with dropout so every draw is used
    "diffrec": {"dims": [8, 16], "steps": 5, "dropout": 0.3},
    "ldiffrec": {"in_dims": [6], "mlp_dims": [6], "steps": 5, "dropout": 0.2, "encoder_dropout": 0.3},
    "bpr": {"embedding_size": 4},
    "multvae": {"hidden_dims": [8], "latent_dim": 4, "dropout": 0.4},
}


def _keys(n: int = 4000) -> np.ndarray:
    """Hash outputs (half with the top bit set) plus the edge values 0, 1, 2^63 - 1, 2^63, 2^64 - 1."""
    edges = np.array([0, 1, 2**63 - 1, 2**63, 2**64 - 1], dtype=np.uint64)
    keys = np.concatenate([edges, R.user_keys(3, 7, np.arange(n), 11)])
    assert (keys >= np.uint64(2**63)).sum() > n // 3  # plenty of keys with the top bit set
    return keys


# --------------------------------------------------------------------------- the torch hash on the CPU
def test_torch_splitmix64_is_bit_identical_to_numpy():
    keys = _keys()
    got = R.splitmix64_torch(R.keys_torch(keys, "cpu")).numpy().view(np.uint64)
    np.testing.assert_array_equal(got, R.splitmix64(keys))
    # and on the hash's own fixed points of the arithmetic: sums that wrap past 2^64
    near = np.uint64(2**64 - 1) - np.arange(50, dtype=np.uint64)
    np.testing.assert_array_equal(R.splitmix64_torch(R.keys_torch(near, "cpu")).numpy().view(np.uint64),
                                  R.splitmix64(near))


@pytest.mark.parametrize("n", [1, 2, 7, 64])
def test_torch_draws_are_bit_identical_to_numpy(n):
    keys = _keys(1500)
    tk = R.keys_torch(keys, "cpu")
    np.testing.assert_array_equal(R.uniform_torch(tk, n).numpy(), R.uniform(keys, n))
    assert torch.equal(R.normal_torch(tk, n), R.normal(keys, n))
    for high in (1, 5, 1000):
        assert torch.equal(R.randint_torch(tk, n, high), R.randint(keys, n, high))
    for p in (0.0, 0.1, 0.5, 0.93):
        assert torch.equal(R.bernoulli_keep_torch(tk, n, p), R.bernoulli_keep(keys, n, p))
    assert torch.equal(R.uniform_tensor(keys, n, "cpu"), torch.from_numpy(R.uniform(keys, n).astype(np.float32)))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_models_draw_the_same_through_the_torch_hash(name, monkeypatch):
    """Every cross-device draw of every model, hashed by torch (as on a GPU) on the CPU, equals NumPy's."""
    from fedrec.models.base import Batch

    rng = np.random.default_rng(0)
    x = torch.from_numpy((rng.random((9, 30)) < 0.2).astype(np.float32))
    torch.manual_seed(0)
    model = build_model({"name": name, **MODELS[name]}, DataShape(9, 30, item_emb=rng.standard_normal((30, 3))))
    users = np.array([0, 2, 3, 5, 8, 11, 40, 41, 2**40])
    batch = Batch(users=torch.as_tensor(users), x=x)
    want = model.draw_randomness(batch, R.UserRandom(5, 2, users, 1))
    monkeypatch.setattr(R, "uses_torch_hash", lambda device: True)
    forced = R.UserRandom(5, 2, users, 1)
    assert forced._torch
    got = model.draw_randomness(batch, forced)
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


def test_user_random_stays_on_numpy_on_the_cpu():
    draw = R.UserRandom(0, 1, np.arange(4), 0)
    assert draw.device == torch.device("cpu") and not draw._torch
    assert torch.equal(draw.normal(1, 6), R.normal(draw.keys(1), 6))


def test_torch_stream_makes_a_generator_on_the_device():
    g = R.torch_stream(1, 2, 3)
    assert g.device == torch.device("cpu")
    assert torch.equal(torch.randn(4, generator=g), torch.randn(4, generator=R.torch_stream(1, 2, 3)))
    assert R.torch_stream(1, 2, 3, device="cpu").device == torch.device("cpu")


# --------------------------------------------------------------------------- resolving the key
def test_resolve_device(monkeypatch):
    from fedrec.devices import cfg_device, model_device, resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"^device: cuda requested"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match=r"^device: expected one of cpu, cuda, auto, got 'gpu'"):
        resolve_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert cfg_device({}) == torch.device("cpu")  # a config from before the key existed
    assert model_device(torch.nn.Linear(2, 2)) == torch.device("cpu")


def test_cuda_without_a_gpu_fails_before_the_run_folder(tiny_cfg, tmp_path, monkeypatch):
    from fedrec.experiment import execute

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^device: cuda"):
        execute(tiny_cfg("device=cuda", "federation=none", "train.epochs=1"), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_simulated_cuda_nodes_need_a_gpu_share(tiny_cfg, monkeypatch):
    from fedrec.data import load_dataset
    from fedrec.federated.validation import check_run
    from fedrec.models import data_shape

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine
    cfg = tiny_cfg("device=cuda", "federation.num_nodes=2")
    data = load_dataset(cfg.dataset, int(cfg.seed))
    model = build_model(cfg.model, data_shape(data, seed=0))
    with pytest.raises(ConfigError, match=r"^federation.client_gpus: device=cuda in a simulation"):
        check_run(cfg, data, model)
    check_run(cfg, data, model, simulated=False)  # flwr run: the SuperNodes own their GPUs
    check_run(tiny_cfg("device=cuda", "federation.num_nodes=2", "federation.client_gpus=0.5"), data, model)
    with pytest.raises(ConfigError, match=r"^federation.client_gpus: must be >= 0"):
        check_run(tiny_cfg("federation.num_nodes=2", "federation.client_gpus=-1"), data, model)


@pytest.mark.parametrize("device,gpus,want", [("cpu", 0.5, 0.0), ("cuda", 0.5, 0.5), ("auto", 0.25, 0.25)])
def test_simulation_gives_node_tasks_a_gpu_share_on_cuda(tiny_cfg, monkeypatch, device, gpus, want):
    """The Ray backend config reserves federation.client_gpus per node task only when device resolves to cuda."""
    import flwr.simulation

    from fedrec.federated.simulation import simulate

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    seen = {}

    def fake_run_simulation(**kwargs):  # no Ray: record what it would be started with
        seen.update(kwargs["backend_config"])

    monkeypatch.setattr(flwr.simulation, "run_simulation", fake_run_simulation)
    monkeypatch.setenv("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")  # simulate() sets it; restored after
    cfg = tiny_cfg(f"device={device}", f"federation.client_gpus={gpus}", "federation.client_cpus=2")

    class NoRounds:
        rounds_done, extra = 0, {}

    with pytest.raises(RuntimeError, match="stopped after round 0"):
        simulate(cfg, None, NoRounds())
    assert seen["client_resources"] == {"num_cpus": 2.0, "num_gpus": want}


# --------------------------------------------------------------------------- on a GPU
def _interactions(n_users=40, n_items=30, seed=1):
    from fedrec.data.interactions import Interactions

    rng = np.random.default_rng(seed)
    m = lambda p: sp.csr_matrix((rng.random((n_users, n_items)) < p).astype(np.float32))  # noqa: E731
    return Interactions("t", m(0.25), m(0.06), m(0.06), np.arange(n_users).astype(str),
                        np.arange(n_items).astype(str))


@pytest.mark.gpu
def test_gpu_draws_equal_cpu_draws():
    keys = _keys()
    tk = R.keys_torch(keys, "cuda")
    np.testing.assert_array_equal(R.splitmix64_torch(tk).cpu().numpy().view(np.uint64), R.splitmix64(keys))
    np.testing.assert_array_equal(R.uniform_torch(tk, 33).cpu().numpy(), R.uniform(keys, 33))
    assert torch.equal(R.randint_torch(tk, 33, 1000).cpu(), R.randint(keys, 33, 1000))
    assert torch.equal(R.bernoulli_keep_torch(tk, 33, 0.3).cpu(), R.bernoulli_keep(keys, 33, 0.3))
    # Box-Muller's log/cos/sin are the GPU's own float64 functions: equal to float32 rounding
    torch.testing.assert_close(R.normal_torch(tk, 33).cpu(), R.normal(keys, 33), rtol=1e-6, atol=1e-6)
    draw = R.UserRandom(0, 1, np.arange(5), 0, device="cuda")
    assert draw.normal(0, 4).device.type == "cuda" and draw.keep_mask(1, 4, 0.5).device.type == "cuda"


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("optimizer,epochs,per_user", [("sgd", 1, False), ("adam", 2, True)])
def test_gpu_train_users_equals_cpu(name, optimizer, epochs, per_user):
    from fedrec.federated.cross_device import LocalTraining, train_users

    rng = np.random.default_rng(0)
    x = torch.from_numpy((rng.random((20, 30)) < 0.2).astype(np.float32))
    shape = DataShape(20, 30, item_emb=rng.standard_normal((30, 3)))
    users = np.array([1, 3, 4, 7, 10, 15])
    local = LocalTraining(optimizer=optimizer, lr=0.05, local_epochs=epochs, chunk_size=4)
    out = {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        model = build_model({"name": name, **MODELS[name]}, shape).to(device)
        params = dict(model.named_parameters())
        private = {n: params[n].detach()[users].clone() for n in model.private_parameter_names()}
        rows = x[users].to(device)
        out[device] = train_users(model, users, rows, rows.sum(1) + 1, private, local, seed=7, round_=3,
                                  per_user=per_user)
    a, b = out["cpu"], out["cuda"]
    for got, want in ((b.per_user if per_user else b.mean, a.per_user if per_user else a.mean), (b.private, a.private)):
        for n in want:
            assert got[n].device.type == "cuda"
            torch.testing.assert_close(got[n].cpu(), want[n], rtol=1e-4, atol=1e-5)
    assert b.loss == pytest.approx(a.loss, rel=1e-4)


@pytest.mark.gpu
def test_gpu_evaluation_equals_cpu():
    """The same scores give the same metrics whether masked, ranked and summed on cuda or cpu."""
    from fedrec.eval.metrics import evaluate_scores

    data = _interactions()
    scores = torch.from_numpy(np.random.default_rng(2).random((data.n_users, data.n_items)).astype(np.float32))
    res = {}
    for device in ("cpu", "cuda"):
        def score(rows, x):
            assert x.device.type == device
            return scores[torch.from_numpy(rows)].to(x.device)

        res[device] = evaluate_scores(score, data, [5, 10], batch_size=16, device=device)
    for split in ("valid", "test"):
        assert res["cuda"]["_sums"][split]["users"] == res["cpu"]["_sums"][split]["users"] > 0
        for k, v in res["cpu"][split].items():
            assert res["cuda"][split][k] == pytest.approx(v, abs=1e-6), (split, k)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["diffrec", "bpr", "multvae"])
def test_gpu_model_evaluation_matches_cpu(name):
    """A model on cuda scores as on cpu (float tolerance) and evaluate_model runs there."""
    from fedrec.eval import evaluate_model
    from fedrec.models.base import Batch

    data = _interactions()
    x = torch.from_numpy(data.train.toarray())
    out = {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        model = build_model({"name": name, **MODELS[name]}, DataShape(data.n_users, data.n_items)).to(device).eval()
        users = torch.arange(data.n_users, device=device)
        with torch.no_grad():
            out[device] = (model.scores(Batch(users=users, x=x.to(device))).cpu(),
                           evaluate_model(model, data, [5, 10], batch_size=16))
    torch.testing.assert_close(out["cuda"][0], out["cpu"][0], rtol=1e-4, atol=1e-5)
    for split in ("valid", "test"):
        assert out["cuda"][1]["_sums"][split]["users"] == out["cpu"][1]["_sums"][split]["users"]
        assert all(0.0 <= v <= 1.0 for v in out["cuda"][1][split].values())


@pytest.mark.gpu
@pytest.mark.parametrize("mode,model", [("silo", "diffrec"), ("device", "diffrec"), ("device", "bpr")])
def test_gpu_nodes_train_and_evaluate(tiny_cfg, tmp_path, mode, model, monkeypatch):
    """The ClientApp on cuda (in-process grid): silo training, cross-device training, node evaluation
    (BPR's private rows); cross-device rounds equal the CPU's to float tolerance (the same keyed draws)."""
    from flwr.supercore.task_identity import TaskIdentity

    from fedrec.experiment import execute
    from tests.inprocess_grid import InProcessGrid

    for attr, value in (("_run_id", 1), ("_node_id", 1), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)
    arrays = {}
    for device in ("cpu", "cuda"):
        cfg = tiny_cfg(f"device={device}", f"federation={mode}", "federation.num_nodes=2", "federation.rounds=2",
                       model=model)
        summary = execute(cfg, tmp_path / device, grid=InProcessGrid(2), progress=False)
        assert 0 <= summary["test"]["ndcg@20"] <= 1
        ckpt = torch.load(sorted((tmp_path / device / "checkpoints").glob("round_*.pt"))[-1], weights_only=False)
        arrays[device] = ckpt["arrays"]
    if mode == "device":
        for k, v in arrays["cpu"].items():
            torch.testing.assert_close(arrays["cuda"][k], v, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_gpu_central_diffrec_epoch(tiny_cfg, tmp_path):
    from fedrec.experiment import execute

    summary = execute(tiny_cfg("device=cuda", "federation=none", "train.epochs=1"), tmp_path / "run", progress=False)
    assert summary["best_round"] == 1 and 0 <= summary["test"]["ndcg@20"] <= 1
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "best.pt", weights_only=False)
    assert all(v.device.type == "cpu" for v in ckpt["model"].values())  # checkpoints hold CPU tensors


def test_bench_diffrec_speed_refuses_cuda_without_a_gpu(monkeypatch, capsys):
    from simulations.bench import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["diffrec-speed", "device=cuda"]) == 2  # before any data is read
    assert capsys.readouterr().err.startswith("error: device: cuda requested")
