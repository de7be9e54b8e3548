"""The item-side model-poisoning attacks on attacks/crafted.py's machinery (PipAttack, A-ra, A-hum, the
untargeted hard-sample attack, random updates) and attack=none's target metrics: the crafted gradients
against numpy on tiny data, the kappa cap on both victims, and a tiny in-process FedAvg run per attack."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.test_fedrecattack import FEDAVG, KAPPA
from tests.test_strategies import task_identity  # noqa: F401  (autouse fixture: Message() needs it)

ATTACKS = ("pipattack", "ara", "ahum", "untargeted", "random_update")


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


class _Side:
    """An MF item side over a given table (what attacks.crafted.MFItems builds from the round's start)."""

    def __init__(self, v):
        from attacks.crafted import MFItems

        self.inner = MFItems({"item_emb.weight": torch.tensor(v, dtype=torch.float32)})

    def __getattr__(self, k):
        return getattr(self.inner, k)


# ---------------------------------------------------------------------------------------- gradient math
def test_ara_gradient_is_the_mean_bce_gradient_of_random_users():
    from attacks.ara_ahum import RandomUsersCenter, RandomUsersConfig
    from attacks.crafted import item_gradient

    rng = np.random.default_rng(0)
    v, users, targets = rng.normal(size=(7, 3)), rng.normal(size=(4, 3)), np.array([2, 5])
    side = _Side(v)
    u = torch.tensor(users, dtype=torch.float32)
    t = torch.from_numpy(targets)
    from attacks.ara_ahum import bce_to_one

    got = item_gradient(side, lambda m: bce_to_one(side.scores(u, m)[:, t]).mean()).numpy()
    want = np.zeros_like(v)
    for j in targets:  # d/dv_j (1/(S T)) sum_s softplus(-u_s . v_j) = -(1/(S T)) sum_s sigmoid(-u_s . v_j) u_s
        want[j] = -(_sigmoid(-(users @ v[j]))[:, None] * users).sum(0) / (len(users) * len(targets))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert RandomUsersCenter.shared is False and RandomUsersConfig().n_samples == 10


def test_ahum_mines_users_down_the_targets_score():
    from attacks.ara_ahum import mine_hard_users

    rng = np.random.default_rng(1)
    v, users, targets = rng.normal(size=(6, 4)), rng.normal(size=(3, 4)) * 0.1, np.array([1, 4])
    side = _Side(v)
    got = mine_hard_users(side, torch.tensor(users, dtype=torch.float32), torch.from_numpy(targets), 5, 0.3).numpy()
    want = users.copy()
    for _ in range(5):  # u <- u - lr * (1/T) sum_t sigmoid(u . v_t) v_t   (the gradient of mean_t softplus(u . v_t))
        grad = sum(_sigmoid(want @ v[t])[:, None] * v[t] for t in targets) / len(targets)
        want = want - 0.3 * grad
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert (want @ v[targets].T).sum() < (users @ v[targets].T).sum()  # the mined users like the targets less


def test_pipattack_gradient_is_the_mean_step_of_its_local_training(monkeypatch):
    from attacks.pipattack import PipCenter, PipAttackConfig

    rng = np.random.default_rng(2)
    v0, targets, popular = rng.normal(size=(8, 3)), np.array([6]), np.array([0, 1, 2])
    c = PipAttackConfig(alpha=0.7, beta=0.4, local_steps=3, attack_lr=0.2)
    cen = PipCenter.__new__(PipCenter)  # the loop only: popularity given, not counted from data
    cen.c, cen.side, cen.data = c, _Side(v0), None
    cen.state = {"users": rng.normal(size=(2, 3)).astype(np.float32)}
    u0 = cen.state["users"].astype(np.float64)
    monkeypatch.setattr("attacks.pipattack.popular_items", lambda data, share, t: popular)
    got = cen.gradient(targets, 1).numpy()
    v, u = v0.copy(), u0.copy()
    centroid = v0[popular].mean(0)
    for _ in range(3):
        gv = c.beta * (v - v0)
        gu = np.zeros_like(u)
        for t in targets:
            s = u @ v[t]
            gv[t] += -(_sigmoid(-s)[:, None] * u).sum(0) + c.alpha * (v[t] - centroid)
            gu += -_sigmoid(-s)[:, None] * v[t]
        v, u = v - c.attack_lr * gv, u - c.attack_lr * gu
    np.testing.assert_allclose(got, (v0 - v) / (3 * c.attack_lr), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(cen.state["users"], u, rtol=1e-4, atol=1e-5)  # the malicious users' own rows trained
    assert np.abs(got[np.setdiff1d(np.arange(8), targets)]).max() == 0  # MF: only the target row moves
    assert np.linalg.norm(v[6] - centroid) < np.linalg.norm(v0[6] - centroid)  # pulled toward the popular items


def test_untargeted_loss_gradient_against_numpy():
    from attacks.crafted import item_gradient
    from attacks.untargeted import reversed_hard_loss

    rng = np.random.default_rng(3)
    v, users = rng.normal(size=(9, 3)), rng.normal(size=(4, 3))
    seen = np.zeros((4, 9), np.float32)
    seen[0, [0, 1]] = seen[2, 5] = 1
    side = _Side(v)
    u = torch.tensor(users, dtype=torch.float32)
    got = item_gradient(side, lambda m: reversed_hard_loss(side.scores(u, m), torch.from_numpy(seen), 2)).numpy()
    want = np.zeros_like(v)
    s = users @ v.T
    for b in range(4):
        free = np.flatnonzero(seen[b] == 0)
        order = free[np.argsort(-s[b, free], kind="stable")]
        top, bottom = order[:2], order[::-1][:2]
        for pos, neg in zip(bottom, top):  # d softplus(-(s_pos - s_neg)) = -sigmoid(-(s_pos - s_neg)) (du_pos - du_neg)
            w = -_sigmoid(-(s[b, pos] - s[b, neg]))
            want[pos] += w * users[b]
            want[neg] -= w * users[b]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------- uploads: kappa
def _craft_once(tiny_cfg, attack, model, *extra):
    from attacks.crafted import CraftedItemAttack, malicious_users
    from fedrec.data import load_run_data
    from fedrec.mechanisms import NodeContext, build_mechanisms, data_transforms
    from fedrec.models import build_model, data_shape

    base = [o for o in FEDAVG if not o.startswith("attack") and (model == "bpr" or not o.startswith("model."))]
    cfg = tiny_cfg(*base, f"attack={attack}", f"attack.kappa={KAPPA}", "attack.fraction=0.1", *extra, model=model)
    mech = next(m for m in build_mechanisms(cfg) if isinstance(m, CraftedItemAttack))
    data = load_run_data(cfg.dataset, int(cfg.seed), data_transforms([mech]))
    torch.manual_seed(0)
    model_ = build_model(cfg.model, data_shape(data))
    start = {n: p.detach().clone() for n, p in model_.named_parameters() if n != "user_emb.weight"}
    ctx = NodeContext(cfg=cfg, data=data, users=np.arange(data.n_users), partition_id=0, round=1, config={},
                      start=start)
    bad = malicious_users(data)
    users = np.array([0, 1, *bad[:3]])
    g = torch.Generator().manual_seed(1)
    deltas = {n: torch.randn(len(users), *p.shape, generator=g) * 1e-3 for n, p in start.items()}
    out, counts = mech.user_transform(ctx)(users, {n: d.clone() for n, d in deltas.items()})
    return cfg, mech, data, start, deltas, out, counts


def _touched_items(out, start, i, model, n_items):
    from attacks.crafted import denoiser_layout

    if model == "bpr":
        return set(torch.nonzero(out["item_emb.weight"][i].abs().sum(1)).ravel().tolist())
    w_in, w_out, b_out = denoiser_layout(start)
    items = set(torch.nonzero(out[w_out][i].abs().sum(1) + out[b_out][i].abs()).ravel().tolist())
    return items | set(torch.nonzero(out[w_in][i][:, :n_items].abs().sum(0)).ravel().tolist())


@pytest.mark.parametrize("model", ["bpr", "diffrec"])
@pytest.mark.parametrize("attack", ATTACKS)
def test_every_malicious_upload_touches_at_most_kappa_items(tiny_cfg, attack, model):
    from attacks.crafted import denoiser_layout

    cfg, mech, data, start, deltas, out, counts = _craft_once(tiny_cfg, attack, model)
    assert counts["malicious-users"] == 3
    for i in range(2):  # genuine users' deltas untouched
        assert all(torch.equal(out[k][i], deltas[k][i]) for k in start)
    item_names = {"item_emb.weight"} if model == "bpr" else set(denoiser_layout(start))
    for i in range(2, 5):
        items = _touched_items(out, start, i, model, data.n_items)
        assert len(items) <= KAPPA
        assert all(not out[k][i].any() for k in start if k not in item_names)  # hidden layers: zero delta
        if model == "diffrec":
            assert not out[denoiser_layout(start)[0]][i][:, data.n_items:].any()  # time-embedding columns
    assert any(_touched_items(out, start, i, model, data.n_items) for i in range(2, 5))  # something was sent
    targets = mech.targets(data, int(cfg.seed))
    if attack in ("pipattack", "ara", "ahum"):  # targeted: the target row is in the first upload
        assert set(targets.tolist()) <= _touched_items(out, start, 2, model, data.n_items)


def test_random_update_rows_have_the_benign_row_norm(tiny_cfg):
    _, _, data, start, deltas, out, _ = _craft_once(tiny_cfg, "random_update", "bpr", "attack.scale=2.0")
    d = deltas["item_emb.weight"][:2].norm(dim=-1)
    benign = float(d[d > 0].mean())
    for i in range(2, 5):
        norms = out["item_emb.weight"][i].norm(dim=-1)
        sent = norms[norms > 0]
        assert len(sent) == KAPPA
        torch.testing.assert_close(sent, torch.full_like(sent, 2.0 * benign), rtol=1e-4, atol=1e-7)


def test_random_update_refuses_upload_scale(tiny_cfg):
    from fedrec.errors import ConfigError
    from fedrec.mechanisms import build_mechanisms

    base = [o for o in FEDAVG if not o.startswith("attack")]
    with pytest.raises(ConfigError, match="attack.upload_scale"):
        build_mechanisms(tiny_cfg(*base, "attack=random_update", "+attack.upload_scale=3", model="bpr"))


# ---------------------------------------------------------------------------------------- tiny runs
def _run(tiny_cfg, tmp_path, name, *extra, model="bpr"):
    from tests.test_mechanisms import _serve

    base = [o for o in FEDAVG if not o.startswith("attack") and (model == "bpr" or not o.startswith("model."))]
    cfg = tiny_cfg(*base, "federation.rounds=4", "train.eval_every=2", *extra, model=model)
    _, _, replies, recorder = _serve(cfg, tmp_path, name)
    return replies, dict(recorder.extra)


@pytest.mark.parametrize("attack", ATTACKS)
def test_a_tiny_fedavg_run_per_attack(tiny_cfg, tmp_path, attack):
    replies, summary = _run(tiny_cfg, tmp_path, attack, f"attack={attack}", f"attack.kappa={KAPPA}",
                            "attack.fraction=0.1", "attack.target_selection=unpopular")
    _, clean = _run(tiny_cfg, tmp_path, f"{attack}-clean", "attack.target_selection=unpopular")
    section = summary["attack"]
    assert section["name"] == attack and section["injected_users"] == 6
    assert section["targets"] == clean["attack"]["targets"]  # attack=none tracks the same keyed target
    assert sum(r.content["metrics"].get("count/malicious-users", 0) for r in replies) > 0
    for key in ("er@5", "hr@5", "ndcg@5", "mean_rank"):
        assert np.isfinite(section[key]) and np.isfinite(clean["attack"][key])
    assert set(section["history"]) == {"2", "4"}


def test_attack_none_reports_target_metrics_only_when_asked(tiny_cfg, tmp_path):
    _, silent = _run(tiny_cfg, tmp_path, "silent", model="diffrec")
    assert "attack" not in silent
    _, by_id = _run(tiny_cfg, tmp_path, "by-id", "attack.targets=[3]", model="diffrec")
    assert by_id["attack"]["targets"] == ["3"] and 0 <= by_id["attack"]["er@10"] <= 1
    assert by_id["attack"]["mean_rank"] >= 1  # pooled from the nodes over eligible genuine users
    # the clean run's target metrics are the ones of fedrec.eval.targets on its final model
    _, fra0 = _run(tiny_cfg, tmp_path, "fra0", "attack=fedrecattack", "attack.fraction=0", "attack.targets=[3]",
                   model="diffrec")
    assert fra0["attack"]["er@10"] == by_id["attack"]["er@10"]  # no fake client: the same run, the same numbers


@pytest.mark.parametrize("attack,model", [("ara", "bpr"), ("ara", "diffrec"), ("scaling", "bpr")])
def test_transformed_users_beside_the_linear_sum_equal_the_full_fold(tiny_cfg, tmp_path, monkeypatch, attack, model):
    """A one-step SGD node sums the users no attack touches by its linear path and trains only the
    malicious ones one by one; the round's model equals sending every user through the attack's fold."""
    from fedrec.federated import cross_device
    from fedrec.federated.device_node import TransformFold
    from tests.test_mechanisms import _serve

    base = [o for o in FEDAVG if not o.startswith("attack") and (model == "bpr" or not o.startswith("model."))]
    cfg = tiny_cfg(*base, "federation.rounds=1", "train.eval_every=1", f"attack={attack}", "attack.fraction=0.1",
                   *([f"attack.kappa={KAPPA}"] if attack == "ara" else []),
                   *(["federation.local_lr=0.01"] if model == "diffrec" else []), model=model)
    calls = []
    split = cross_device._linear_beside_transformed
    monkeypatch.setattr(cross_device, "_linear_beside_transformed", lambda *a, **k: calls.append(1) or split(*a, **k))
    _, fast, replies_fast, _ = _serve(cfg, tmp_path, "split")
    assert calls, "the split path was not taken"
    monkeypatch.setattr(TransformFold, "changed", lambda self, users: None)
    _, full, replies_full, _ = _serve(cfg, tmp_path, "full")
    for k in full:
        np.testing.assert_allclose(fast[k], full[k], rtol=1e-4, atol=1e-6, err_msg=k)
    counts = [{k: v for k, v in r.content["metrics"].items() if k.startswith("count/")} for r in replies_full]
    assert counts == [{k: v for k, v in r.content["metrics"].items() if k.startswith("count/")} for r in replies_fast]
