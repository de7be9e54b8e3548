"""Fairness / diversity metrics (fedrec/eval/fairness.py) and the models DifFaiRec and D3Rec.

Metrics against plain per-user loops; D3Rec's loss and inference against a re-derivation that follows
the official code's structure (github.com/c0natus/D3Rec ``Real-world/models.py``, ``model_utils.py``,
``utils_train.py``) with the same weights and draws; DifFaiRec's attention and loss against plain
re-derivations; runs: central with eval.fairness, silo / device / DP-SGD or their one-line refusals.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from fedrec.data.interactions import Interactions
from fedrec.data.side import ItemSideData, categories_from_multihot
from fedrec.errors import ConfigError
from fedrec.eval.fairness import FairnessAccumulator, FairnessSpec, fairness_spec, user_groups
from fedrec.eval.metrics import evaluate_scores
from fedrec.models import build_model, data_shape
from fedrec.models.base import Batch
from tests.test_strategies import task_identity  # noqa: F401  (autouse fixture: Message() needs it)


def _data(seed=0, n_users=23, n_items=17, n_cat=5, genres=True) -> Interactions:
    rng = np.random.default_rng(seed)
    dense = rng.random((n_users, n_items))
    train = sp.csr_matrix((dense < 0.3).astype(np.float32))
    valid = sp.csr_matrix(((dense >= 0.3) & (dense < 0.38)).astype(np.float32))
    test = sp.csr_matrix(((dense >= 0.38) & (dense < 0.5)).astype(np.float32))
    cats = (rng.random((n_items, n_cat)) < 0.35).astype(np.float32)
    cats[np.arange(n_items), rng.integers(0, n_cat, n_items)] = 1.0
    cats[0] = 0.0  # an item without a category
    d = Interactions("toy", train, valid, test, np.arange(n_users).astype(str), np.arange(n_items).astype(str))
    if genres:
        d.item_features["genre"] = cats
        d.item_features["genre_names"] = np.array([f"g{c}" for c in range(n_cat)])
        d.item_side = ItemSideData(categories=categories_from_multihot(cats, d.item_features["genre_names"]))
    d.user_features["gender"] = rng.integers(-1, 2, n_users)  # -1: unknown
    d.user_features["gender_vocab"] = np.array(["F", "M"])
    return d


# ------------------------------------------------------------------ metrics vs loops
def _reference(data, scores, groups, n_groups, cats, vectors, k, split="test"):
    """Per-user loops: mean NDCG per group, coverage, entropy, ILD over users with held-out items."""
    train, valid, target = data.train.toarray(), data.valid.toarray(), getattr(data, split).toarray()
    seen = train + (valid if split == "test" else 0)
    nd_sum, nd_n = np.zeros(n_groups), np.zeros(n_groups)
    cov, ent, ild, users = 0.0, 0.0, 0.0, 0
    for u in range(data.n_users):
        held = set(np.flatnonzero(target[u]))
        if not held:
            continue
        users += 1
        order = [i for i in np.argsort(-scores[u], kind="stable") if seen[u, i] == 0][:k]
        dcg = sum(1 / math.log2(r + 2) for r, i in enumerate(order) if i in held)
        idcg = sum(1 / math.log2(r + 2) for r in range(min(len(held), k)))
        if groups[u] >= 0:
            nd_sum[groups[u]] += dcg / idcg
            nd_n[groups[u]] += 1
        counts = np.zeros(cats.shape[1])
        for i in order:  # D3Rec's compute_metric: 1/|categories| per category of each item
            c = np.flatnonzero(cats[i])
            counts[c] += 1 / len(c) if len(c) else 0
        cov += np.count_nonzero(counts) / cats.shape[1]
        p = counts / counts.sum()
        ent += -sum(q * math.log2(q) for q in p if q > 0) / math.log2(cats.shape[1])
        dist = []
        for a in order:
            for b in order:
                if a != b:
                    na, nb = np.linalg.norm(vectors[a]), np.linalg.norm(vectors[b])
                    cos = 0.0 if na == 0 or nb == 0 else vectors[a] @ vectors[b] / (na * nb)
                    dist.append(1 - cos)
        ild += np.mean(dist)
    means = nd_sum / np.maximum(nd_n, 1)
    return {"group": means, "gap": means[nd_n > 0].max() - means[nd_n > 0].min(), "coverage": cov / users,
            "entropy": ent / users, "ild": ild / users}


@pytest.mark.parametrize("grouping", ["activity", "gender"])
def test_metrics_equal_per_user_loops(grouping):
    data = _data()
    groups, names = user_groups(data, grouping, 0.2)
    cats = data.item_features["genre"]
    vectors = np.random.default_rng(1).standard_normal((data.n_items, 4)).astype(np.float32)
    vectors[3] = 0.0  # a zero vector: distance 1 to everything
    spec = FairnessSpec(groups, names, cats, vectors, grouping)
    scores = np.random.default_rng(2).random((data.n_users, data.n_items)).astype(np.float32)
    acc = FairnessAccumulator(spec, [3, 5])
    evaluate_scores(lambda rows, x: torch.from_numpy(scores[rows]), data, [3, 5], batch_size=6, observer=acc)
    res = acc.result()
    for k in (3, 5):
        ref = _reference(data, scores, groups, len(names), cats, vectors, k)
        got = res["test"]
        np.testing.assert_allclose([got[f"group_ndcg@{k}"][n] for n in names], ref["group"], rtol=1e-5)
        assert got[f"ndcg_gap@{k}"] == pytest.approx(ref["gap"], rel=1e-5)
        for m in ("coverage", "entropy", "ild"):
            assert got[f"{m}@{k}"] == pytest.approx(ref[m], rel=1e-5), m
    assert set(res) == {"groups", "valid", "test"}


def test_activity_groups_are_the_top_share_by_training_interactions():
    data = _data(3, n_users=40)
    groups, names = user_groups(data, "activity", 0.2)
    counts = np.asarray(data.train.sum(1)).ravel()
    assert names == ["inactive", "active"] and groups.sum() == 8
    assert counts[groups == 1].min() >= counts[groups == 0].max()


def test_missing_groups_or_categories_are_one_line_config_errors(tiny_cfg):
    cfg = tiny_cfg("federation=none", "eval.fairness=true", "eval.fairness_groups=occupation")
    with pytest.raises(ConfigError, match="eval.fairness_groups='occupation': dataset 'toy' has no such"):
        fairness_spec(cfg, _data())
    with pytest.raises(ConfigError, match="eval.fairness: dataset 'toy' has no item categories"):
        fairness_spec(tiny_cfg("federation=none", "eval.fairness=true"), _data(genres=False))
    assert fairness_spec(tiny_cfg("federation=none"), _data(genres=False)) is None  # off by default: no check
    from fedrec.config import validate

    with pytest.raises(ConfigError, match="eval.fairness: only with federation=none"):
        validate(tiny_cfg("federation=silo", "eval.fairness=true"))


# ------------------------------------------------------------------ D3Rec vs the official structure
D3 = {"name": "d3rec", "dims": [24, 8], "dim_step": 6, "steps": 4, "dropout": 0.3}


def _d3rec(data, **over):
    torch.manual_seed(0)
    model = build_model({**D3, **over}, data_shape(data))
    with torch.no_grad():
        for p in model.parameters():  # non-trivial biases
            p.add_(0.05 * torch.randn_like(p))
    return model


def official_schedule(steps, start, end, scale=1.0):
    var = np.linspace(scale * start, scale * end, steps)
    ab = 1 - var
    betas = np.append(1 - ab[0], [min(1 - ab[i] / ab[i - 1], 0.999) for i in range(1, steps)])
    betas[0] = 1e-5  # beta_fixed (the first beta 0.005 > 1e-5)
    ac = np.cumprod(1 - betas)
    ac_prev = np.append(1.0, ac[:-1])
    return {"betas": betas, "ac": ac, "coef_xt": np.sqrt(1 - betas) * (1 - ac_prev) / (1 - ac),
            "coef_x0": np.sqrt(ac_prev) * betas / (1 - ac)}


def official_mymlp(m, x_t, t, probs, probs_mask, drop_mask=None, training=False):
    """The official D3Rec.forward -> MyMLP.forward with the layers of our module (same weights)."""
    half = m.step.half
    w_k = 1.0 / (10000 ** (torch.arange(0, half).float() / (half - 1)))
    emb_t = t.float().unsqueeze(-1).repeat(1, half) * w_k
    time_emb = m.step.linear(torch.cat([torch.sin(emb_t), torch.cos(emb_t)], -1))
    x = torch.cat([x_t, time_emb], -1)
    if drop_mask is not None:
        x = x * drop_mask
    emb_pref = torch.einsum("bn,np->bp", probs, m.cate_embedding).clone()
    emb_pref[probs_mask == 1, :] = 0

    def encoder(x, e):
        z, h = x, x
        for i in range(len(m.enc_ind)):
            z, h = torch.tanh(m.enc_ind[i](z)), torch.tanh(m.enc_cate[i](h))
            pe = m.proj[i](e) if h.size(-1) != m.cond_dim else e
            lat = torch.cat([z, h, pe], -1)
            z, h = lat[:, :m.half_dims[i]], lat[:, m.half_dims[i]:]
        return torch.cat([z, h], -1)

    def decoder(lat, e):
        proj = list(m.proj)[::-1]
        for i in range(len(m.dec) - 1):
            lat = torch.cat([torch.tanh(m.dec[i](lat)), proj[i](e)], -1)
        return m.dec[-1](lat)

    latent = encoder(x, emb_pref)
    recon = decoder(latent, emb_pref)
    if not training:
        return recon
    lh = m.latent_half
    ortho = torch.abs(torch.einsum("ix,ix->i", torch.nn.functional.normalize(latent[:, :lh], dim=-1),
                                   torch.nn.functional.normalize(latent[:, lh:], dim=-1))).sum()
    emb_div = latent[:, lh:]
    x_prob = decoder(torch.cat([torch.zeros_like(emb_div), emb_div], -1), emb_pref)
    n_cate, d = m.cate_embedding.shape
    latent_cate = torch.cat([torch.zeros(n_cate, 2 * lh - d), m.cate_embedding], -1)  # dims[-1] * 3 // 4 zeros
    x_cate = decoder(latent_cate, m.cate_embedding)
    return recon, x_prob, x_cate, ortho


def official_prefs(x, data):
    cats = data.item_features["genre"]
    matrix_f = (cats / np.maximum(cats.sum(1, keepdims=True), 1)).T  # make_cate_multihot_matrix_F
    counts = x.numpy() @ matrix_f.T
    return torch.tensor(counts / counts.sum(1, keepdims=True), dtype=torch.float32), torch.tensor(matrix_f, dtype=torch.float32)


def test_d3rec_loss_is_the_official_loss_given_the_draws():
    data = _data(4)
    users = np.flatnonzero(np.asarray(data.train.sum(1)).ravel() > 0)[:8]
    x0 = torch.tensor(data.train[users].toarray())
    cfg = {"lamda": 0.7, "w_min": 0.5, "w_max": 1.5}
    model = _d3rec(data, **cfg, ortho_scale=float(len(users))).train()
    b, n = x0.shape
    g = torch.Generator().manual_seed(5)
    t = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    noise = torch.randn(b, n, generator=g)
    keep = (torch.rand(b, n + 6, generator=g) > 0.3).float() / 0.7
    drop = torch.tensor([0.1, 0.9, 0.5, 0.2, 0.8, 0.05, 0.6, 0.4])  # < drop_div 0.3 -> condition dropped
    ours = model.loss(Batch(users=torch.as_tensor(users), x=x0, rand={"t": t, "noise": noise, "keep": keep, "drop": drop}))

    s = official_schedule(4, 0.005, 0.05)
    ac = torch.tensor(s["ac"], dtype=torch.float32)
    x_t = ac[t].sqrt()[:, None] * x0 + (1 - ac[t]).sqrt()[:, None] * noise
    prob, matrix_f = official_prefs(x0, data)
    mask = (drop < 0.3).float()
    recon, x_prob, x_cate, ortho = official_mymlp(model.denoiser, x_t, t, prob, mask, keep, training=True)

    def reweight(p):
        r = torch.einsum("ix,xj->ij", p, matrix_f)
        lo, hi = r.min(-1)[0].unsqueeze(-1), r.max(-1)[0].unsqueeze(-1)
        return cfg["w_min"] + (cfg["w_max"] - cfg["w_min"]) * (r - lo) / (hi - lo)

    bal = torch.where(x0 == 1, reweight(1 - prob), reweight(prob))
    snr = torch.tensor(s["ac"] / (1 - s["ac"]), dtype=torch.float64)
    weight = torch.where(t == 0, 1.0, 0.5 * (snr[(t - 1).clamp(min=0)] - snr[t])).float()
    recon_loss = (weight * ((recon - x0) ** 2 * bal).mean(-1)).mean()
    cate = ((torch.einsum("ix,jx->ij", x_prob, matrix_f).softmax(-1) - prob) ** 2).mean(-1)
    cate_loss = torch.where(mask == 1, 0, cate).mean()
    official = recon_loss + cate_loss + cfg["lamda"] * (ortho + ((x_cate - matrix_f) ** 2).mean())
    assert float(ours.mean()) == pytest.approx(float(official), rel=1e-5)


@pytest.mark.parametrize("guide_w,tau", [(-0.5, 1.0), (0.8, 2.0)])
def test_d3rec_scores_are_the_official_guided_double_reverse(guide_w, tau):
    data = _data(5)
    users = np.flatnonzero(np.asarray(data.train.sum(1)).ravel() > 0)[:6]
    x0 = torch.tensor(data.train[users].toarray())
    model = _d3rec(data, guide_w=guide_w, div_temperature=tau).eval()
    with torch.no_grad():
        ours = model.scores(Batch(users=torch.as_tensor(users), x=x0))
        s = official_schedule(4, 0.005, 0.05)
        prob, _ = official_prefs(x0, data)
        if tau != 1:  # adjust_div
            logits = torch.log(prob + 1e-7) / tau
            prob = torch.exp(logits) / torch.exp(logits).sum(-1)[:, None]
        b = x0.shape[0]
        div_mask = torch.cat([torch.zeros(b), torch.ones(b)])
        div = torch.cat([prob] * 2)
        x_t = x0
        for i in list(range(4))[::-1] * 2:  # official reverse_t
            xx = torch.cat([x_t] * 2)
            out = official_mymlp(model.denoiser, xx, torch.full((2 * b,), i), div, div_mask)
            x0_hat = (1 + guide_w) * out[:b] - guide_w * out[b:]
            x_t = float(s["coef_xt"][i]) * x_t + float(s["coef_x0"][i]) * x0_hat
    np.testing.assert_allclose(ours.numpy(), x_t.numpy(), rtol=1e-4, atol=1e-5)


def test_d3rec_temperature_raises_the_entropy_of_the_condition():
    data = _data(6)
    x0 = torch.tensor(data.train[:10].toarray())
    ent = []
    for tau in (0.5, 1.0, 3.0):
        p = _d3rec(data, div_temperature=tau).target_proportions(x0)
        ent.append(float(-(p * torch.log(p.clamp(min=1e-12))).sum(-1).mean()))
    assert ent[0] < ent[1] < ent[2]


def test_d3rec_needs_item_categories_and_multiples_of_four():
    with pytest.raises(ConfigError, match="no item categories"):
        build_model(D3, data_shape(_data(genres=False)))
    with pytest.raises(ConfigError, match="model.dims"):
        build_model({**D3, "dims": [24, 10]}, data_shape(_data()))


# ------------------------------------------------------------------ DifFaiRec
DF = {"name": "diffairec", "dims": [8, 16], "steps": 5, "group_tokens": 3, "heads": 2}


def test_group_cross_attention_is_plain_multihead_attention():
    from fedrec.models.diffairec import GroupCrossAttention

    torch.manual_seed(1)
    att = GroupCrossAttention(8, 2)
    h, tok = torch.randn(4, 8), torch.randn(4, 3, 8)
    ours = att(h, tok).detach().numpy()
    W = {n: (getattr(att, n).weight.detach().numpy(), getattr(att, n).bias.detach().numpy()) for n in "qkvo"}
    lin = lambda n, a: a @ W[n][0].T + W[n][1]  # noqa: E731
    ref = np.empty_like(ours)
    for b in range(4):
        heads = []
        for k in range(2):
            sl = slice(4 * k, 4 * k + 4)
            q, key, v = lin("q", h[b].numpy())[sl], lin("k", tok[b].numpy())[:, sl], lin("v", tok[b].numpy())[:, sl]
            a = np.exp(key @ q / 2.0)
            heads.append((a / a.sum()) @ v)
        ref[b] = h[b].numpy() + lin("o", np.concatenate(heads))
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)


def test_counterfactual_groups_are_another_group_uniformly():
    from fedrec.models.diffairec import counterfactual_groups

    g = torch.arange(3).repeat_interleave(1000)
    u = torch.rand(3000, generator=torch.Generator().manual_seed(0))
    cf = counterfactual_groups(g, 3, u)
    assert bool((cf != g).all()) and set(cf.tolist()) == {0, 1, 2}
    for k in range(3):
        counts = np.bincount(cf[g == k].numpy(), minlength=3)
        assert counts[k] == 0 and abs(counts[(k + 1) % 3] - counts[(k + 2) % 3]) < 150
    assert bool((counterfactual_groups(torch.tensor([0, 1]), 2, torch.tensor([0.3, 0.99])) == torch.tensor([1, 0])).all())


def test_diffairec_loss_mixes_factual_and_counterfactual_reconstructions():
    data = _data(7)
    model = build_model({**DF, "counterfactual_weight": 0.3, "groups": "gender"}, data_shape(data)).train()
    users = np.arange(8)
    x0 = torch.tensor(data.train[users].toarray())
    g = torch.Generator().manual_seed(2)
    t = torch.tensor([0, 1, 4, 2, 3, 0, 4, 1])
    noise, keep = torch.randn(8, data.n_items, generator=g), torch.ones(8, data.n_items)
    u = torch.stack([torch.rand(8, generator=g), torch.ones(8)], 1)  # no condition dropout
    ours = model.loss(Batch(users=torch.as_tensor(users), x=x0, rand={"t": t, "noise": noise, "keep": keep, "u": u}))
    s = official_schedule(5, 0.005, 0.01, scale=0.005)
    ac = torch.tensor(s["ac"], dtype=torch.float32)
    x_t = ac[t].sqrt()[:, None] * x0 + (1 - ac[t]).sqrt()[:, None] * noise
    snr = s["ac"] / (1 - s["ac"])
    w = torch.tensor([1.0 if i == 0 else snr[i - 1] - snr[i] for i in t.tolist()], dtype=torch.float32)
    gender = data.user_features["gender"][users]
    fact_g = torch.tensor(np.where(gender >= 0, gender, 2))  # unknown gender: the null group 2
    cf_g = torch.tensor(np.where(gender >= 0, 1 - gender, 2))  # two groups: the other one
    with torch.no_grad():
        mse = lambda c: ((model.denoiser(x_t, t, c, keep) - x0) ** 2).mean(-1)  # noqa: E731
        ref = w * (0.7 * mse(fact_g) + 0.3 * mse(cf_g))
    np.testing.assert_allclose(ours.detach().numpy(), ref.numpy(), rtol=1e-5)


# ------------------------------------------------------------------ runs
@pytest.mark.parametrize("name", ["diffairec", "d3rec"])
def test_one_epoch_central_with_fairness_metrics(tiny_cfg, tmp_path, name):
    from fedrec.experiment import execute

    summary = execute(tiny_cfg("federation=none", "train.epochs=1", "eval.fairness=true", model=name),
                      tmp_path / "run", progress=False)
    fair = summary["fairness"]["test"]
    assert np.isfinite(summary["test"]["ndcg@20"]) and summary["test"]["ndcg@20"] > 0
    assert 0 < fair["coverage@20"] <= 1 and 0 < fair["ild@20"] <= 2 and np.isfinite(fair["ndcg_gap@20"])


@pytest.mark.parametrize("mode", [["federation=silo", "federation.num_nodes=2", "federation.rounds=1"],
                                  ["federation=device", "federation.num_nodes=2", "federation.rounds=1",
                                   "federation.user_fraction=0.5", "federation.local_lr=0.05"]])
def test_d3rec_federated_round_in_process(tiny_cfg, tmp_path, mode):
    from tests.test_mechanisms import _serve

    g0, final, replies, _ = _serve(tiny_cfg(*mode, model="d3rec"), tmp_path, "d3rec")
    assert replies and set(final) == set(g0)
    assert any(not np.allclose(final[k], g0[k]) for k in g0)


def test_diffairec_dpsgd_smoke_and_d3rec_refuses(tiny_cfg, tmp_path):
    from fedrec.experiment import execute

    summary = execute(tiny_cfg("federation=none", "privacy=dpsgd", "train.epochs=1", model="diffairec"),
                      tmp_path / "dp", progress=False)
    assert np.isfinite(summary["test"]["ndcg@20"]) and summary["privacy"]["epsilon"] > 0
    with pytest.raises(ConfigError, match="privacy=dpsgd: model 'd3rec' decodes the category table"):
        execute(tiny_cfg("federation=none", "privacy=dpsgd", model="d3rec"), tmp_path / "r", progress=False)


@pytest.mark.parametrize("mode", ["federation=silo", "federation=device"])
def test_diffairec_refuses_federation_in_one_line(tiny_cfg, mode):
    from fedrec.config import validate

    with pytest.raises(ConfigError, match=f"{mode}: model 'diffairec' conditions on user groups"):
        validate(tiny_cfg(mode, model="diffairec"))
