"""FedRecAttack's setting (Rong et al., ICDE 2022) on tiny synthetic data: the client loss (BPR-MF
``sampling=all_pairs``), passes over all clients in batches (``federation.sampling=permutation``), the
injected malicious clients and the attack's crafted uploads (attacks/fedrecattack.py)."""

from __future__ import annotations

import numpy as np
import torch

from fedrec.models.base import Batch, DataShape
from fedrec.models.bpr import BPRConfig, BPRMF
from tests.test_strategies import task_identity  # noqa: F401  (autouse fixture: Message() needs it)


def test_all_pairs_loss_is_the_official_client_loss():
    """Sum over every positive once with its negative, plus 0.5 reg (||u||^2 + sum of the pairs' rows^2)."""
    torch.manual_seed(0)
    model = BPRMF(BPRConfig(embedding_size=4, sampling="all_pairs", reg_weight=0.1, init_std=0.3), DataShape(3, 9))
    x = torch.zeros(3, 9)
    x[0, [1, 4, 5]] = 1
    x[1, [0]] = 1  # user 2: an empty row (an injected client): loss 0
    from fedrec.rng import UserRandom

    rand = model.draw_randomness(Batch(users=torch.arange(3), x=x), UserRandom(0, 1, np.arange(3), 0, "cpu"))
    assert rand["pos"].shape == (3, 3)
    got = model.loss(Batch(users=torch.arange(3), x=x, rand=rand))
    u, it = model.user_emb.weight.detach(), model.item_emb.weight.detach()
    for b in range(3):
        pos = torch.nonzero(x[b]).flatten()
        neg = rand["neg"][b, :len(pos)]
        assert not (x[b, neg] > 0).any()
        d = (u[b] * (it[pos] - it[neg])).sum(-1)
        want = -torch.nn.functional.logsigmoid(d).sum()
        if len(pos):
            want = want + 0.05 * (u[b].pow(2).sum() + it[pos].pow(2).sum() + it[neg].pow(2).sum())
        torch.testing.assert_close(got[b], want, rtol=1e-5, atol=1e-6)
    assert float(got[2].detach()) == 0.0
    assert torch.allclose(model.item_emb.weight.std(), torch.tensor(0.3), rtol=0.5)


def test_permutation_sampling_visits_every_user_once_per_pass():
    from fedrec.federated.device_node import permutation_round, rounds_per_pass

    n, m = 23, 5
    assert rounds_per_pass(n, m) == 5
    for p in range(3):
        masks = [permutation_round(7, p * 5 + k + 1, n, m) for k in range(5)]
        assert [int(mk.sum()) for mk in masks] == [5, 5, 5, 5, 3]
        np.testing.assert_array_equal(np.sum(masks, axis=0), np.ones(n))  # each user exactly once per pass
    first = [np.flatnonzero(permutation_round(7, k + 1, n, m)) for k in range(5)]
    second = [np.flatnonzero(permutation_round(7, 5 + k + 1, n, m)) for k in range(5)]
    assert any(not np.array_equal(a, b) for a, b in zip(first, second))  # a fresh shuffle per pass
    np.testing.assert_array_equal(permutation_round(7, 3, n, m), permutation_round(7, 3, n, m))


# ---------------------------------------------------------------------------------------- runs
N_GENUINE, KAPPA = 60, 5
SETTING = ["federation=device", "federation.num_nodes=1", "federation.sampling=permutation",
           "federation.users_per_round=16", "federation.local_optimizer=sgd", "federation.local_lr=0.05",
           "federation.upload=per_user", "federation.evaluation=clients", "strategy=row_clip_sum",
           "strategy.row_clip=0.05", "model.sampling=all_pairs", "model.reg_weight=0.1", "model.init_std=0.1",
           "train.local_epochs=1", "eval.ks=[5,10]", "train.select_metric=recall@10", "attack=fedrecattack",
           f"attack.kappa={KAPPA}", "attack.public_fraction=0.2", "attack.fraction=0.1"]


def _run(tiny_cfg, tmp_path, name, *overrides):
    """An in-process run; returns (config, train replies, the mechanisms' summary sections)."""
    from tests.test_mechanisms import _serve

    cfg = tiny_cfg(*SETTING, *overrides, model="bpr")
    _, _, replies, recorder = _serve(cfg, tmp_path, name)
    return cfg, replies, dict(recorder.extra)


def _row_counts(replies):
    """user id -> item rows it uploaded (row-sparse per-user replies)."""
    from fedrec.federated import protocol as P

    rows_key, offsets_key, _ = P.row_keys("item_emb.weight")
    out = {}
    for r in replies:
        users = r.content["user-weights"]["users"].numpy()
        offsets = r.content["arrays"][offsets_key].numpy()
        rows = r.content["arrays"][rows_key].numpy()
        for i, u in enumerate(users):
            assert int(u) not in out  # every client once per pass (permutation sampling)
            out[int(u)] = rows[offsets[i]:offsets[i + 1]]
    return out


def test_malicious_clients_are_injected_and_upload_at_most_kappa_rows(tiny_cfg, tmp_path):
    from attacks.fedrecattack import FedRecAttack, malicious_users
    from fedrec.data import load_run_data
    from fedrec.eval.metrics import evaluated_users
    from fedrec.mechanisms import build_mechanisms, data_transforms

    n_rounds = 10  # two passes over 66 clients in rounds of 16 (one node: one reply per round)
    cfg, replies, summary = _run(tiny_cfg, tmp_path, "fra", f"federation.rounds={n_rounds}", "train.eval_every=5")
    mech = build_mechanisms(cfg)
    data = load_run_data(cfg.dataset, int(cfg.seed), data_transforms(mech))
    bad = malicious_users(data)
    assert len(bad) == 6 and data.injected[bad].all() and data.n_injected == 6
    assert data.train[bad].nnz == 0  # fake clients: no data
    assert not np.isin(bad, evaluated_users(data)).any()  # no metric counts them
    assert len(replies) == n_rounds
    passes = [_row_counts(replies[:5]), _row_counts(replies[5:])]
    target = next(m for m in mech if isinstance(m, FedRecAttack)).targets(data, int(cfg.seed))
    for rows in passes:
        assert sorted(rows) == list(range(N_GENUINE + 6))  # every client exactly once per pass
        # A malicious client sends what its predecessors in the round left of the attack gradient, so a row
        # they used up entirely (e.g. the target's, if never clipped) is zero and not sent.
        assert all(len(rows[u]) <= KAPPA for u in bad) and max(len(rows[u]) for u in bad) == KAPPA
        assert np.isin(target, np.concatenate([rows[u] for u in bad])).all()
        assert max(len(rows[u]) for u in range(N_GENUINE)) > KAPPA  # genuine uploads are not capped
    for u in bad:  # a fake client's rows are chosen once (the attack's node state carries them over rounds)
        assert len(np.union1d(passes[0][u], passes[1][u])) <= KAPPA
    attack = summary["attack"]
    assert attack["injected_users"] == 6 and attack["round"] == n_rounds
    assert [h["pass"] for h in attack["history"].values()] == [1.0, 2.0]


def test_a_short_run_raises_the_targets_exposure_above_the_clean_run(tiny_cfg, tmp_path):
    rounds = ["federation.rounds=15", "train.eval_every=5"]  # three passes
    _, _, attacked = _run(tiny_cfg, tmp_path, "attacked", *rounds)
    _, _, clean = _run(tiny_cfg, tmp_path, "clean", *rounds, "attack.fraction=0")
    assert clean["attack"]["injected_users"] == 0 and clean["attack"]["targets"] == attacked["attack"]["targets"]
    er_attacked = attacked["attack"]["er@10"]
    er_clean = clean["attack"]["er@10"]
    print("er@10 attacked", er_attacked, "clean", er_clean)
    assert er_attacked > er_clean + 0.2


# ------------------------------------------------------------------- cross-device FedAvg (a mean)
def test_upload_scale_undoes_the_mean_of_the_sampled_users(tiny_cfg):
    from attacks.fedrecattack import FedRecAttackConfig, upload_scale

    c = FedRecAttackConfig()
    base = ["federation=device", "attack=fedrecattack", "train.local_epochs=1", "federation.local_optimizer=sgd"]
    clip_sum = tiny_cfg(*base, "strategy=row_clip_sum", model="bpr")
    assert upload_scale(c, clip_sum, 990) == 1.0  # a clipped sum adds each upload as it is
    fixed = tiny_cfg(*base, "strategy=fedavg", "federation.user_fraction=0.1", model="bpr")
    assert upload_scale(c, fixed, 990) == 99.0  # the mean over round(0.1 x 990) sampled users
    count = tiny_cfg(*base, "strategy=fedavg", "federation.users_per_round=32", model="bpr")
    assert upload_scale(c, count, 990) == 32.0
    poisson = tiny_cfg(*base, "strategy=fedavg", "federation.sampling=poisson", "federation.user_fraction=0.05",
                       model="bpr")
    assert abs(upload_scale(c, poisson, 990) - 49.5) < 1e-9  # the expected number sampled
    assert upload_scale(FedRecAttackConfig(upload_scale=3.0), fixed, 990) == 3.0


def test_fedavg_rejects_interaction_weights(tiny_cfg):
    import pytest

    from fedrec.errors import ConfigError
    from fedrec.mechanisms import build_mechanisms

    cfg = tiny_cfg(*FEDAVG, "federation.weighting=interactions", model="bpr")
    with pytest.raises(ConfigError, match="weighting"):  # the fake clients' uploads would weigh 0
        build_mechanisms(cfg)


FEDAVG = ["federation=device", "federation.num_nodes=1", "federation.user_fraction=0.25",
          "federation.local_optimizer=sgd", "federation.local_lr=0.1", "federation.evaluation=clients",
          "strategy=fedavg", "model.sampling=all_pairs", "model.init_std=0.1", "train.local_epochs=1",
          "eval.ks=[5,10]", "train.select_metric=recall@10", "attack=fedrecattack", f"attack.kappa={KAPPA}",
          "attack.public_fraction=0.2", "attack.fraction=0.1", "attack.target_selection=unpopular"]


def test_a_short_fedavg_run_raises_the_targets_exposure_above_the_clean_run(tiny_cfg, tmp_path):
    from tests.test_mechanisms import _serve

    def run(name, *extra):
        cfg = tiny_cfg(*FEDAVG, "federation.rounds=8", "train.eval_every=4", *extra, model="bpr")
        _, _, replies, recorder = _serve(cfg, tmp_path, name)
        return replies, dict(recorder.extra)["attack"]

    replies, attacked = run("attacked")
    _, clean = run("clean", "attack.fraction=0")
    _, unscaled = run("unscaled", "attack.upload_scale=1")  # the paper's clipped-sum delta, divided by the mean
    assert clean["targets"] == attacked["targets"] == unscaled["targets"]
    assert sum(r.content["metrics"]["count/malicious-users"] for r in replies
               if "count/malicious-users" in r.content["metrics"]) > 0
    er = {k: v["er@5"] for k, v in (("attacked", attacked), ("clean", clean),
                                                        ("unscaled", unscaled))}
    print("er@5", er)
    assert er["attacked"] > er["clean"] + 0.2 and er["attacked"] > er["unscaled"] + 0.1


# ------------------------------------------------------------------- DiffRec as the victim
def test_diffrec_uploads_touch_at_most_kappa_items_and_only_item_indexed_tensors(tiny_cfg, tmp_path):
    from attacks.fedrecattack import FedRecAttack, denoiser_layout, malicious_users
    from fedrec.data import load_run_data
    from fedrec.mechanisms import NodeContext, build_mechanisms, data_transforms
    from fedrec.models import build_model, data_shape

    cfg = tiny_cfg(*[o for o in FEDAVG if not o.startswith("model.")], model="diffrec")
    mech = next(m for m in build_mechanisms(cfg) if isinstance(m, FedRecAttack))
    data = load_run_data(cfg.dataset, int(cfg.seed), data_transforms([mech]))
    model = build_model(cfg.model, data_shape(data))
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    ctx = NodeContext(cfg=cfg, data=data, users=np.arange(data.n_users), partition_id=0, round=1, config={},
                      start=start)
    craft = mech.user_transform(ctx)
    bad = malicious_users(data)
    users = np.array([0, 1, *bad[:3]])
    deltas = {n: torch.randn(len(users), *p.shape) * 1e-3 for n, p in start.items()}
    out, counts = craft(users, {n: d.clone() for n, d in deltas.items()})
    assert counts["malicious-users"] == 3
    w_in, w_out, b_out = denoiser_layout(start)
    n = data.n_items
    target = mech.targets(data, int(cfg.seed))
    for i in range(2):  # genuine users' deltas untouched
        assert all(torch.equal(out[k][i], deltas[k][i]) for k in start)
    for i in range(2, 5):
        items = set(torch.nonzero(out[w_out][i].abs().sum(1) + out[b_out][i].abs()).ravel().tolist())
        items |= set(torch.nonzero(out[w_in][i][:, :n].abs().sum(0)).ravel().tolist())
        assert 0 < len(items) <= KAPPA
        assert not out[w_in][i][:, n:].any()  # the time-embedding columns of the input layer: untouched
        assert all(not out[k][i].any() for k in start if k not in (w_in, w_out, b_out))  # hidden layers: zero
    assert set(target.tolist()) <= set(torch.nonzero(out[b_out][2]).ravel().tolist())
    assert out[b_out][2, target[0]] > 0  # the first malicious client raises the target's output bias


def test_a_short_fedavg_run_on_diffrec_raises_the_targets_exposure_above_the_clean_run(tiny_cfg, tmp_path):
    from tests.test_mechanisms import _serve

    base = [o for o in FEDAVG if not o.startswith("model.")]

    def run(name, *extra):
        cfg = tiny_cfg(*base, "federation.rounds=6", "train.eval_every=3", *extra, model="diffrec")
        _, _, _, recorder = _serve(cfg, tmp_path, name)
        return dict(recorder.extra)["attack"]

    attacked, clean = run("attacked"), run("clean", "attack.fraction=0")
    assert clean["targets"] == attacked["targets"]
    er = {"attacked": attacked["er@5"], "clean": clean["er@5"]}
    print("er@5", er)
    assert er["attacked"] > er["clean"] + 0.2
