"""The mechanism protocol: building mechanisms from their Hydra groups, and two small mechanisms
(a sign-flip/scaling attack, a norm-bound defense) against numpy references, alone and with
user-level DP, in silo and cross-device modes.

Every reference is computed from an un-attacked run's own uploads: a node's (or a user's) honest
training does not depend on the attack, so the attacked aggregate must equal numpy's arithmetic on
the honest uploads.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import MessageType

from fedrec.errors import ConfigError
from fedrec.federated import protocol as P
from tests.test_strategies import task_identity  # noqa: F401  (autouse fixture: Message() needs it)

SILO = ["federation=silo", "federation.num_nodes=4", "federation.rounds=1"]
DEVICE = ["federation=device", "federation.num_nodes=2", "federation.rounds=1", "federation.user_fraction=0.5",
          "train.local_epochs=2", "federation.local_lr=0.05"]


# ---------------------------------------------------------------------------------------- building
@pytest.mark.parametrize("overrides,message", [
    (["attack=scaling", "attack._target_=collections.OrderedDict"], "not a registered mechanism"),
    (["attack=scaling", "attack._target_=fedrec.defenses.norm_bound.NormBound"], "is a defense mechanism"),
    (["attack=scaling", "federation=none"], "attack=scaling: needs federation=silo or device"),
    (["attack=scaling", "+attack.kappa=3"], "attack.kappa: unknown key"),
    (["defense=norm_bound", "defense.bound=0"], "defense.bound: must be positive"),
    (["attack=signflip", "attack.count=9", *SILO], "attack.count: must be in 1..4"),
    (["privacy=user_dp", "federation=device", "federation.sampling=poisson", "strategy=user_median"],
     "strategy=user_median needs every user's update"),
])
def test_bad_mechanism_configs_fail_with_one_line(tiny_cfg, overrides, message):
    from fedrec.config import validate

    with pytest.raises(ConfigError, match=message):
        validate(tiny_cfg(*overrides))


def test_mechanisms_are_built_in_hook_order(tiny_cfg):
    from fedrec.mechanisms import build_mechanisms

    cfg = tiny_cfg(*DEVICE, "privacy=user_dp", "federation.sampling=poisson", "attack=signflip", "defense=norm_bound")
    assert [m.kind for m in build_mechanisms(cfg)] == ["attack", "defense", "privacy"]
    (none,) = build_mechanisms(tiny_cfg())  # attack=none: inactive (no targets given), no hook does anything
    assert none.name == "none" and not none.config.active


def test_malicious_clients_are_keyed_by_the_seed_only():
    from attacks.threat import budget, malicious_clients

    a = malicious_clients(3, 1000, budget(1000, 0.05, None))
    assert len(a) == 50 and np.array_equal(a, malicious_clients(3, 1000, 50)) and np.all(np.diff(a) > 0)
    assert not np.array_equal(a, malicious_clients(4, 1000, 50))
    assert budget(10, 0.01, None) == 1 and budget(10, None, 3) == 3


# ---------------------------------------------------------------------------------------- helpers
class _Recording:
    """InProcessGrid that keeps every train reply (the nodes' uploads)."""

    def __init__(self, num_nodes, state_dir):
        from tests.inprocess_grid import InProcessGrid

        self.grid = InProcessGrid(num_nodes, state_dir=state_dir)
        self.replies = []

    def get_node_ids(self):
        return self.grid.get_node_ids()

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        out = self.grid.send_and_receive(messages, timeout)
        for m, r in zip(messages, out):
            if m.metadata.message_type == MessageType.TRAIN:
                self.replies.append(r)
        return out


def _serve(cfg, tmp_path, name):
    """One in-process run; returns (initial global arrays, final global arrays, train replies, summary extras)."""
    from fedrec.data import load_run_data
    from fedrec.federated.arrays import global_arrays
    from fedrec.mechanisms import build_mechanisms, data_transforms
    from fedrec.federated.server_app import serve
    from fedrec.models import build_model, data_shape
    from fedrec.recorder import Recorder
    from fedrec.runs import RunFolder
    import torch

    data = load_run_data(cfg.dataset, int(cfg.seed), data_transforms(build_mechanisms(cfg)))
    torch.manual_seed(int(cfg.seed))
    g0 = {k: v.numpy().astype(np.float64) for k, v in
          global_arrays(build_model(cfg.model, data_shape(data, seed=int(cfg.seed)))).to_torch_state_dict().items()}
    run = RunFolder(tmp_path / name)
    run.write_config(cfg)
    grid = _Recording(int(cfg.federation.num_nodes), tmp_path / f"{name}-nodes")
    recorder = Recorder(run, "recall@20")
    serve(grid, cfg, data, recorder)
    final = {k: v.numpy().astype(np.float64) for k, v in run.latest_checkpoint()["arrays"].items()}
    return g0, final, grid.replies, recorder


#: one in-process round of a silo / cross-device federation on the tiny data
SILO_ROUND = ["federation=silo", "federation.num_nodes=2", "federation.rounds=1"]
DEVICE_ROUND = ["federation=device", "federation.num_nodes=2", "federation.rounds=1", "federation.user_fraction=0.5",
                "federation.local_lr=0.05"]


def trained_round(cfg, tmp_path, name):
    """One in-process run that must train: (initial, final) global arrays, every global array returned."""
    g0, final, replies, _ = _serve(cfg, tmp_path, name)
    assert replies and set(final) == set(g0)
    assert any(not np.allclose(final[k], g0[k]) for k in g0)  # the round trained
    return g0, final


def _node_uploads(replies):
    """partition -> (arrays float64, num-examples) of silo replies."""
    out = {}
    for r in replies:
        m = r.content["metrics"]
        out[int(m[P.PARTITION_ID])] = ({k: a.numpy().astype(np.float64) for k, a in r.content["arrays"].items()},
                                       float(m[P.NUM_EXAMPLES]))
    return out


def _user_uploads(replies):
    """user id -> arrays float64 of per-user replies (federation.upload=per_user)."""
    out = {}
    for r in replies:
        users = r.content["user-weights"]["users"].numpy()
        stacked = {k: a.numpy().astype(np.float64) for k, a in r.content["arrays"].items()}
        for i, u in enumerate(users):
            out[int(u)] = {k: v[i] for k, v in stacked.items()}
    return out


def _norm(d):
    return float(np.sqrt(sum(float((v ** 2).sum()) for v in d.values())))


def _close(got, want, tol=2e-5):
    for k in want:
        scale = float(np.abs(want[k]).max()) + 1e-6
        assert float(np.abs(got[k] - want[k]).max()) / scale < tol, k


# ---------------------------------------------------------------------------------------- silo
def test_silo_signflip_and_norm_bound_equal_numpy_on_the_honest_uploads(tiny_cfg, tmp_path):
    from attacks.threat import malicious_clients

    g0, clean, replies, _ = _serve(tiny_cfg(*SILO), tmp_path, "clean")
    honest = _node_uploads(replies)
    bad = set(malicious_clients(0, 4, 1).tolist())
    bound = 0.5 * min(_norm({k: a[k] - g0[k] for k in g0}) for a, _ in honest.values())

    def reference(factor, bound=None):
        total, weight = {k: np.zeros_like(v) for k, v in g0.items()}, 0.0
        for pid, (arrays, n) in sorted(honest.items()):
            d = {k: (factor if pid in bad else 1.0) * (arrays[k] - g0[k]) for k in g0}
            if bound is not None:
                d = {k: v * min(1.0, bound / _norm(d)) for k, v in d.items()}
            for k in g0:
                total[k] += n * d[k]
            weight += n
        return {k: g0[k] + total[k] / weight for k in g0}

    _close(clean, reference(1.0))
    _, flipped, _, rec = _serve(tiny_cfg(*SILO, "attack=signflip", "attack.count=1"), tmp_path, "flip")
    _close(flipped, reference(-1.0))
    assert rec.extra["attack"]["malicious"] == 1
    _, defended, _, rec = _serve(tiny_cfg(*SILO, "attack=scaling", "attack.count=1", "attack.scale=30",
                                          "defense=norm_bound", f"defense.bound={bound}"), tmp_path, "bound")
    _close(defended, reference(30.0, bound))
    last = (tmp_path / "bound" / "metrics.jsonl").read_text().splitlines()[-1]
    assert '"count/bounded-updates": 4' in last and '"count/malicious-clients": 1' in last


# ---------------------------------------------------------------------------------------- device
def _device_reference(g0, uploads, bad, factor, bound=None, clip=None, denominator=None):
    total = {k: np.zeros_like(v) for k, v in g0.items()}
    for u, arrays in sorted(uploads.items()):
        d = {k: (factor if u in bad else 1.0) * (arrays[k] - g0[k]) for k in g0}
        for b in (bound, clip):
            if b is not None:
                d = {k: v * min(1.0, b / _norm(d)) for k, v in d.items()}
        for k in g0:
            total[k] += d[k]
    n = denominator if denominator is not None else len(uploads)
    return {k: g0[k] + total[k] / n for k in g0}


def test_device_scaling_attack_and_norm_bound_equal_numpy_on_the_users_uploads(tiny_cfg, tmp_path):
    from attacks.threat import malicious_clients

    g0, _, replies, _ = _serve(tiny_cfg(*DEVICE, "federation.upload=per_user"), tmp_path, "clean")
    uploads = _user_uploads(replies)
    bad = set(malicious_clients(0, 60, 6).tolist())
    assert bad & set(uploads), "the test needs a malicious user among the sampled ones"
    _, flipped, _, rec = _serve(tiny_cfg(*DEVICE, "attack=signflip", "attack.fraction=0.1", "attack.scale=3"),
                                tmp_path, "flip")
    _close(flipped, _device_reference(g0, uploads, bad, -3.0))
    bound = float(np.median([_norm({k: a[k] - g0[k] for k in g0}) for a in uploads.values()]))
    _, defended, _, rec = _serve(tiny_cfg(*DEVICE, "attack=signflip", "attack.fraction=0.1", "attack.scale=3",
                                          "defense=norm_bound", f"defense.bound={bound}"), tmp_path, "bound")
    _close(defended, _device_reference(g0, uploads, bad, -3.0, bound))
    assert rec.extra["defense"] == {"name": "norm_bound", "bound": bound}
    last = (tmp_path / "bound" / "metrics.jsonl").read_text().splitlines()[-1]
    assert f'"count/malicious-users": {float(len(bad & set(uploads)))}' in last


def test_attack_defense_and_user_dp_compose_in_one_run(tiny_cfg, tmp_path):
    """Attack -> bound -> DP clip, summed over the Poisson-sampled users, divided by q N (noise 0)."""
    from attacks.threat import malicious_clients

    poisson = [*DEVICE, "federation.sampling=poisson"]
    g0, _, replies, _ = _serve(tiny_cfg(*poisson, "federation.upload=per_user"), tmp_path, "clean")
    uploads = _user_uploads(replies)
    bad = set(malicious_clients(0, 60, 6).tolist())
    norms = sorted(_norm({k: a[k] - g0[k] for k in g0}) for a in uploads.values())
    bound, clip = norms[len(norms) // 4], norms[len(norms) // 2]  # both are norm clips: the tighter one shows
    cfg = tiny_cfg(*poisson, "attack=scaling", "attack.fraction=0.1", "attack.scale=5", "defense=norm_bound",
                   f"defense.bound={bound}", "privacy=user_dp", "privacy.noise_multiplier=0.0", f"privacy.clip={clip}")
    _, got, _, rec = _serve(cfg, tmp_path, "all")
    _close(got, _device_reference(g0, uploads, bad, 5.0, bound, clip, denominator=0.5 * 60))
    assert set(rec.extra) >= {"attack", "defense", "privacy"} and rec.extra["privacy"]["mechanism"] == "user_dp"
    last = (tmp_path / "all" / "metrics.jsonl").read_text().splitlines()[-1]
    assert f'"count/malicious-users": {float(len(bad & set(uploads)))}' in last and '"count/bounded-users"' in last


def test_user_dp_wraps_a_server_optimiser(tiny_cfg, tmp_path):
    """user_dp around FedAdam: the DP mean is FedAdam's one update, and FedAdam takes its own server step
    on it (numpy's Adam step of Reddi et al. from the users' clipped updates, noise 0, round 1)."""
    poisson = [*DEVICE, "federation.sampling=poisson"]
    g0, _, replies, _ = _serve(tiny_cfg(*poisson, "federation.upload=per_user"), tmp_path, "clean")
    uploads = _user_uploads(replies)
    clip = sorted(_norm({k: a[k] - g0[k] for k in g0}) for a in uploads.values())[len(uploads) // 2]
    _, got, _, rec = _serve(tiny_cfg(*poisson, "privacy=user_dp", "privacy.noise_multiplier=0.0",
                                     f"privacy.clip={clip}", "strategy=fedadam"), tmp_path, "adam")
    mean = _device_reference(g0, uploads, set(), 1.0, clip=clip, denominator=0.5 * 60)
    eta, b1, b2, tau = 0.01, 0.9, 0.99, 0.001  # conf/strategy/fedadam.yaml
    want = {}
    for k in g0:
        delta = mean[k] - g0[k]
        m, v = (1 - b1) * delta, (1 - b2) * delta ** 2
        want[k] = g0[k] + eta * np.sqrt(1 - b2 ** 2) / (1 - b1 ** 2) * m / (np.sqrt(v) + tau)
    _close(got, want, tol=1e-4)
    assert rec.extra["privacy"]["mechanism"] == "user_dp"


# ---------------------------------------------------------------------------------------- data hook
@pytest.mark.parametrize("mode", [SILO, DEVICE])
def test_shilling_users_reach_every_node_through_the_data_hook(tiny_cfg, tmp_path, mode):
    """attack=bandwagon: the server and every node load the same 6 fake users (node views built from
    the config the server sends), they train, and the run reports them; evaluation skips them."""
    from omegaconf import OmegaConf

    from fedrec.federated.node import node_view

    cfg = tiny_cfg(*mode, "attack=bandwagon", "attack.count=6", "federation.evaluation=clients")
    _, _, replies, rec = _serve(cfg, tmp_path, "shill")
    assert rec.extra["attack"]["injected_users"] == 6 and len(rec.extra["attack"]["targets"]) == 1
    yaml = OmegaConf.to_yaml(cfg, resolve=True)
    views = [node_view(yaml, {"partition-id": p}) for p in range(int(cfg.federation.num_nodes))]
    assert all(v.data.n_users == 66 and v.data.n_injected == 6 for v in views)
    hosted = np.concatenate([v.users for v in views])
    assert sorted(hosted.tolist()) == list(range(66))  # fakes are hosted like any user
    last = (tmp_path / "shill" / "metrics.jsonl").read_text().splitlines()[-1]
    assert '"valid"' in last  # nodes evaluated (genuine users only: tests/test_transforms.py checks the sums)


def test_shilling_run_reports_its_targets_metrics(tiny_cfg, tmp_path):
    """A centralised run with bandwagon profiles: summary.json's attack section carries the targets'
    er@K / hr@K / ndcg@K / mean rank of the last evaluated model, over genuine users only."""
    import json

    from fedrec.experiment import execute

    cfg = tiny_cfg("federation=none", "train.epochs=2", "attack=bandwagon", "attack.count=6", model="multvae")
    summary = execute(cfg, tmp_path / "run", progress=False)
    attack = json.loads((tmp_path / "run" / "summary.json").read_text())["attack"]
    assert attack == summary["attack"] and attack["round"] == 2 and attack["injected_users"] == 6
    assert 0 <= attack["er@10"] <= 1 and 1 <= attack["mean_rank"] <= 50
    assert attack["eligible_users"] <= 60  # genuine users only (60 of 66)


def test_shilling_target_metrics_come_from_the_nodes_when_they_evaluate(tiny_cfg, tmp_path):
    """BPR cross-device: only the nodes hold the user rows, so the nodes' target sums are pooled."""
    cfg = tiny_cfg(*DEVICE, "federation.rounds=2", "attack=bandwagon", "attack.count=6", model="bpr")
    _, _, _, rec = _serve(cfg, tmp_path, "bpr")
    attack = rec.extra["attack"]
    assert attack["round"] == 2 and set(attack["history"]) == {"1", "2"}
    assert 0 <= attack["er@10"] <= 1 and 0 <= attack["hr@10"] <= 1 and attack["mean_rank"] >= 1
