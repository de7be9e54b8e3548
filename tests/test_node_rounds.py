"""A node's round, driven by hand-made Flower messages: keyed randomness, annealing, node state (issue 8)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from omegaconf import OmegaConf

from fedrec.federated import client_app
from fedrec.federated import protocol as P
from fedrec.federated.arrays import global_arrays
from fedrec.models import build_model, data_shape
from tests.test_strategies import task_identity  # noqa: F401  (autouse fixture: Message() needs it)


def _message(cfg, arrays, rnd: int, **extra) -> Message:
    conf = ConfigRecord({P.CONFIG: OmegaConf.to_yaml(cfg, resolve=True), P.ROUND: rnd, **extra})
    return Message(RecordDict({"arrays": arrays, "config": conf}), dst_node_id=1, message_type=MessageType.TRAIN)


def _context(pid: int, num_nodes: int, state_dir=None) -> Context:
    node_config = {"partition-id": pid, "num-partitions": num_nodes}
    if state_dir is not None:
        node_config["state-dir"] = str(state_dir)
    return Context(run_id=1, node_id=pid + 1, node_config=node_config, state=RecordDict(), run_config={})


def _initial(cfg):
    from fedrec.federated.node import node_view

    view = node_view(OmegaConf.to_yaml(cfg, resolve=True), {"partition-id": 0})
    torch.manual_seed(int(cfg.seed))
    return global_arrays(build_model(cfg.model, data_shape(view.data, seed=int(cfg.seed))))


@pytest.fixture
def noise_log(monkeypatch):
    """The first diffusion noise values every ``q_sample`` call of a training step draws."""
    from fedrec.models.diffusion import GaussianDiffusion

    seen: list[torch.Tensor] = []
    original = GaussianDiffusion.q_sample

    def spy(self, x0, t, noise=None):
        seen.append(noise.reshape(-1)[:16].clone())
        return original(self, x0, t, noise)

    monkeypatch.setattr(GaussianDiffusion, "q_sample", spy)
    return seen


def test_silos_and_rounds_draw_different_noise_and_same_seed_repeats(tiny_cfg, noise_log):
    # Prepare: two silos; the same global model sent in rounds 1 and 2
    cfg = tiny_cfg("federation=silo", "federation.num_nodes=2")
    arrays = _initial(cfg)
    first = {}
    # Execute: node 0 and node 1 in rounds 1 and 2, each a fresh process-like context
    for pid in (0, 1):
        for rnd in (1, 2):
            noise_log.clear()
            client_app.train(_message(cfg, arrays, rnd), _context(pid, 2))
            first[pid, rnd] = noise_log[0]
    # Assert: every (node, round) has its own diffusion noise
    keys = list(first)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            assert not torch.equal(first[a], first[b]), f"{a} and {b} drew the same noise"
    # ... and the same (seed, node, round) repeats exactly, model and all
    noise_log.clear()
    again = client_app.train(_message(cfg, arrays, 2), _context(1, 2))
    assert torch.equal(noise_log[0], first[1, 2])
    ref = client_app.train(_message(cfg, arrays, 2), _context(1, 2))
    for k in ref.content["arrays"].keys():
        np.testing.assert_array_equal(again.content["arrays"][k].numpy(), ref.content["arrays"][k].numpy())


def test_silo_dpsgd_noise_differs_across_rounds_and_nodes(tiny_cfg, monkeypatch):
    import opacus.optimizers.optimizer as opt
    import opacus.optimizers.optimizer_fast_gradient_clipping as ghost

    drawn: list[torch.Tensor] = []
    original = opt._generate_noise

    def spy(std, reference, generator=None, secure_mode=False):
        assert generator is not None, "DP-SGD noise must come from an explicit generator"
        out = original(std=std, reference=reference, generator=generator, secure_mode=secure_mode)
        drawn.append(out.reshape(-1)[:16].clone())
        return out

    monkeypatch.setattr(opt, "_generate_noise", spy)
    monkeypatch.setattr(ghost, "_generate_noise", spy)
    cfg = tiny_cfg("federation=silo", "federation.num_nodes=2", "privacy=dpsgd", "privacy.noise_multiplier=1.0",
                   model="multvae")
    arrays = _initial(cfg)
    first = {}
    for pid, rnd in ((0, 1), (0, 2), (1, 1)):
        drawn.clear()
        client_app.train(_message(cfg, arrays, rnd), _context(pid, 2))
        first[pid, rnd] = drawn[0]
    assert not torch.equal(first[0, 1], first[0, 2])
    assert not torch.equal(first[0, 1], first[1, 1])


# ----------------------------------------------------------------------------- annealing in device mode (8.2)
def _device_message(cfg, arrays, rnd):
    return _message(cfg, arrays, rnd, **{P.USER_THRESHOLD: 1.0, P.PER_USER: 0})


@pytest.mark.parametrize("model,overrides,expect", [
    # MultVAE: beta = min(cap, updates / total); round 3 with 2 local steps: updates 4 then 5
    ("multvae", ["model.total_anneal_steps=10", "model.anneal_cap=1.0"], {"beta": [0.4, 0.5]}),
    # L-DiffRec: lambda = max((1 - epochs / anneal_steps) * lamda, cap), beta = min(cap, updates / steps)
    ("ldiffrec", ["model.anneal_steps=10", "model.lamda=0.5", "model.anneal_cap=0.0", "model.vae_anneal_steps=10",
                  "model.vae_anneal_cap=1.0", "model.n_cate=1"], {"lamda": [0.3, 0.25], "beta": [0.4, 0.5]}),
])
def test_device_annealing_follows_the_round(tiny_cfg, monkeypatch, model, overrides, expect):
    cfg = tiny_cfg("federation=device", "federation.num_nodes=2", "train.local_epochs=2", *overrides, model=model)
    cls = type(build_model(cfg.model, data_shape(__import__("fedrec.federated.node", fromlist=["x"]).node_view(
        OmegaConf.to_yaml(cfg, resolve=True), {"partition-id": 0}).data)))
    seen: dict[str, list[float]] = {k: [] for k in expect}
    original = cls.draw_randomness

    def spy(self, batch, rnd):
        out = original(self, batch, rnd)
        for k in expect:
            seen[k].append(float(out[k][0]))
        return out

    monkeypatch.setattr(cls, "draw_randomness", spy)
    client_app.train(_device_message(cfg, _initial(cfg), 3), _context(0, 2))
    for k, want in expect.items():
        # one draw per chunk and step; every chunk of a step sees the same weight
        got = sorted(set(round(v, 6) for v in seen[k]), reverse=(k == "lamda"))
        assert got == pytest.approx(want), (k, seen[k])


# ----------------------------------------------------------------------------- node state on the node's disk (8.5)
def _train_arrays(reply: Message) -> dict[str, np.ndarray]:
    return {k: v.numpy().copy() for k, v in reply.content["arrays"].items()}


@pytest.mark.parametrize("mode", ["silo", "device"])
def test_node_state_survives_a_restart(tiny_cfg, tmp_path, mode):
    # BPR: the users' embeddings are private and live only on the node between rounds
    cfg = tiny_cfg(f"federation={mode}", "federation.num_nodes=2", model="bpr")
    make = _device_message if mode == "device" else _message
    arrays = _initial(cfg)
    # uninterrupted: one context for rounds 1 and 2
    ctx = _context(0, 2, tmp_path / "a")
    client_app.train(make(cfg, arrays, 1), ctx)
    want = _train_arrays(client_app.train(make(cfg, arrays, 2), ctx))
    # restarted: round 1, then a fresh process (empty context.state) on the same state directory
    client_app.train(make(cfg, arrays, 1), _context(0, 2, tmp_path / "b"))
    got = _train_arrays(client_app.train(make(cfg, arrays, 2), _context(0, 2, tmp_path / "b")))
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    # without the state the private rows would have restarted: round 2 from scratch differs
    fresh = _train_arrays(client_app.train(make(cfg, arrays, 2), _context(0, 2, tmp_path / "c")))
    assert any(not np.array_equal(fresh[k], want[k]) for k in want)


def test_node_state_store_reads_the_last_round_before_and_drops_stale_files(tmp_path):
    from fedrec.federated.node_state import NodeStateStore

    # a node that trains in rounds 1, 2, 4 (fraction < 1) and 5; the server is killed during round 5,
    # after this node saved it, and resumes from its checkpoint of round 4
    store = NodeStateStore(tmp_path, "run", 3, keep=2)
    for r in (1, 2, 4, 5):
        store.save(r, {"r": r})
    assert store.load_before(1) is None
    assert store.load_before(6)["r"] == 5
    assert store.load_before(5)["r"] == 4  # what the resumed round 5 starts from
    store.save(5, {"r": "5 again"})
    assert store.load_before(6)["r"] == "5 again"
    store.save(3, {"r": 3})  # a resume from round 2 (older checkpoint): later files are stale
    assert store.load_before(10)["r"] == 3
    assert sorted(p.name for p in store.dir.iterdir()) == ["round_000003.pt"]


def test_dpsgd_node_without_state_dir_refuses_a_resumed_run(tiny_cfg):
    from fedrec.errors import ConfigError

    cfg = tiny_cfg("federation=silo", "federation.num_nodes=2", "privacy=dpsgd", model="multvae")
    with pytest.raises(ConfigError, match="state-dir"):
        client_app.train(_message(cfg, _initial(cfg), 3, **{P.RESUMED_AT: 2}), _context(0, 2))


# ----------------------------------------------------------------------------- per-user uploads in pages (8.8)
def _serve_in_process(cfg, tmp_path, name):
    from fedrec.data import load_dataset
    from fedrec.federated.server_app import serve
    from fedrec.recorder import Recorder
    from fedrec.runs import RunFolder
    from tests.inprocess_grid import InProcessGrid

    data = load_dataset(cfg.dataset, int(cfg.seed))
    run = RunFolder(tmp_path / name)
    run.write_config(cfg)
    grid = InProcessGrid(int(cfg.federation.num_nodes), state_dir=tmp_path / f"{name}-nodes")
    serve(grid, cfg, data, Recorder(run, "recall@20"))
    return grid, run.latest_checkpoint()["arrays"]


@pytest.mark.parametrize("model,rounds", [("diffrec", 1), ("bpr", 2)])  # BPR: private rows carried across pages
def test_per_user_uploads_in_pages_equal_one_reply_and_the_mean(tiny_cfg, tmp_path, model, rounds):
    base = ["federation=device", "federation.num_nodes=2", f"federation.rounds={rounds}",
            "federation.user_fraction=0.5", "train.local_epochs=2", "federation.local_lr=0.01"]
    # a budget so small that a page holds one or two users: many pages per node and round
    paged_grid, paged = _serve_in_process(tiny_cfg(*base, "federation.upload=per_user",
                                                   "federation.memory_budget_gb=0.00005", model=model),
                                          tmp_path, "paged")
    one_grid, one = _serve_in_process(tiny_cfg(*base, "federation.upload=per_user", model=model), tmp_path, "one")
    _, mean = _serve_in_process(tiny_cfg(*base, "federation.upload=sum", model=model), tmp_path, "mean")
    pages = [c.get(P.PAGE) for kind, _, c in paged_grid.sent if kind == MessageType.TRAIN]
    assert max(pages) >= 3
    assert [c.get(P.PAGE, 0) for kind, _, c in one_grid.sent if kind == MessageType.TRAIN] == [0] * (2 * rounds)
    for k in mean:  # equal up to float32 rounding of the per-user parameters that are averaged
        scale = float(one[k].abs().max()) + 1e-12
        assert float((paged[k] - one[k]).abs().max()) / scale < 1e-5, k
        assert float((paged[k] - mean[k]).abs().max()) / scale < 1e-5, k


def test_dpsgd_accountant_history_survives_a_restart(tiny_cfg, tmp_path):
    cfg = tiny_cfg("federation=silo", "federation.num_nodes=2", "privacy=dpsgd", "privacy.noise_multiplier=1.0",
                   "federation.rounds=3", model="multvae")
    arrays = _initial(cfg)
    ctx = _context(1, 2, tmp_path / "a")
    first = client_app.train(_message(cfg, arrays, 1), ctx)
    want = client_app.train(_message(cfg, arrays, 2), ctx)
    client_app.train(_message(cfg, arrays, 1), _context(1, 2, tmp_path / "b"))
    got = client_app.train(_message(cfg, arrays, 2, **{P.RESUMED_AT: 1}), _context(1, 2, tmp_path / "b"))
    eps = lambda m: float(m.content["metrics"]["dp-epsilon"])  # noqa: E731
    assert eps(got) == pytest.approx(eps(want), rel=1e-12) and eps(want) > eps(first)  # two rounds composed
    assert _train_arrays(got).keys() == _train_arrays(want).keys()
    for k, v in _train_arrays(want).items():
        np.testing.assert_array_equal(_train_arrays(got)[k], v)


# ----------------------------------------------------------------------------- one update batch per round (issue 9.2)
def test_user_median_over_all_nodes_equals_numpy_median(tiny_cfg, tmp_path, monkeypatch):
    """The coordinate-wise median over every sampled user of a round, from three nodes, equals numpy's
    median over the same users' models as the nodes sent them."""
    from tests.inprocess_grid import InProcessGrid

    sent: list[dict[str, np.ndarray]] = []
    user_ids: list[np.ndarray] = []
    original = InProcessGrid.send_and_receive

    def spy(self, messages, timeout=None):
        replies = original(self, messages, timeout)
        for r in replies:
            if "user-weights" in r.content.array_records:
                sent.append({k: v.numpy().copy() for k, v in r.content["arrays"].items()})
                user_ids.append(r.content["user-weights"]["users"].numpy().copy())
        return replies

    monkeypatch.setattr(InProcessGrid, "send_and_receive", spy)
    cfg = tiny_cfg("federation=device", "federation.num_nodes=3", "federation.rounds=1", "strategy=user_median",
                   "federation.user_fraction=0.6", "federation.evaluation=server")
    _, got = _serve_in_process(cfg, tmp_path, "median")
    assert len(sent) == 3  # one per-user reply from each node
    users = np.concatenate(user_ids)
    assert len(np.unique(users)) == len(users) > 3 * 5
    for k, v in got.items():
        want = np.median(np.concatenate([s[k] for s in sent]), axis=0)
        np.testing.assert_allclose(v.numpy(), want, rtol=1e-6, atol=1e-7)
    # ... which is not what the per-node medians' mean would be
    per_node = np.mean([np.median(s["denoiser.out_layers.0.weight"], axis=0) for s in sent], axis=0)
    assert not np.allclose(got["denoiser.out_layers.0.weight"].numpy(), per_node)


def test_batch_rules_need_cross_device(tiny_cfg, tmp_path):
    from fedrec.errors import ConfigError
    from fedrec.experiment import execute

    with pytest.raises(ConfigError, match="federation=device"):
        execute(tiny_cfg("federation=silo", "strategy=user_median"), tmp_path / "run", progress=False)
