"""Explicit ratings: the data seam (dataset.ratings), RMSE, DGRM and EDGE-Rec.

Math against independent numpy references (RMSE, DGRM's loss terms and its split gradients, EDGE-Rec's
row-column separable attention, the inpainting DDIM step); a one-epoch central run of each model; silo
rounds of both, a cross-device round and DP-SGD for DGRM, and EDGE-Rec's one-line refusals there.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedrec.errors import ConfigError, DataError
from tests.test_mechanisms import DEVICE_ROUND, SILO_ROUND
from tests.test_strategies import task_identity  # noqa: F401  (autouse fixture: Message() needs it)


def _write_atomic(folder, rows, name="toy"):
    folder.mkdir(parents=True, exist_ok=True)
    text = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n" + "".join(
        f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows)
    (folder / f"{name}.inter").write_text(text)
    return folder


def _atomic_cfg(folder, **extra):
    return {"name": "toy", "kind": "atomic", "path": str(folder), "rating_threshold": None, "ratings": True,
            "min_user_interactions": 1, "split": {"method": "ratio", "ratios": [0.6, 0.2, 0.2]}, **extra}


# ------------------------------------------------------------------ the data seam
def test_ratings_sit_beside_the_binary_splits(tmp_path):
    from fedrec.data import load_dataset

    rng = np.random.default_rng(0)
    rows = [(u, i, int(rng.integers(1, 6)), 100 + k) for k, (u, i) in
            enumerate((u, i) for u in range(6) for i in rng.choice(12, 8, replace=False))]
    rows.append((rows[0][0], rows[0][1], 1 if rows[0][2] != 1 else 2, 999))  # a later repeat of the first pair
    data = load_dataset(_atomic_cfg(_write_atomic(tmp_path / "d", rows)), seed=3)
    truth = {}
    for u, i, r, _ in rows:
        truth.setdefault((str(u), str(i)), r)  # the earliest row of a repeated pair
    for split in ("train", "valid", "test"):
        b, r = getattr(data, split).tocoo(), data.ratings[split]
        assert (r.indptr == getattr(data, split).indptr).all() and (r.indices == getattr(data, split).indices).all()
        got = r.tocoo()
        for uu, ii, v in zip(got.row, got.col, got.data):
            assert v == truth[(data.user_ids[uu], data.item_ids[ii])]
        assert b.nnz == got.nnz
    sub = data.subset_users(np.array([2, 0]))
    assert (sub.ratings["train"].toarray() == data.ratings["train"][[2, 0]].toarray()).all()


@pytest.mark.parametrize("bad,match", [("abc", "rating 'abc' is not a finite number"),
                                       ("0", "rating 0 is not positive")])
def test_a_bad_rating_is_one_line_naming_file_and_line(tmp_path, bad, match):
    from fedrec.data import load_dataset

    folder = _write_atomic(tmp_path / "d", [(1, 1, 4, 1), (1, 2, 3, 2), (2, 1, 5, 3)])
    path = folder / "toy.inter"
    lines = path.read_text().split("\n")
    lines[2] = lines[2].replace("\t3\t", f"\t{bad}\t")
    path.write_text("\n".join(lines))
    with pytest.raises(DataError, match=rf"toy.inter: line 3: {match}") as err:
        load_dataset(_atomic_cfg(folder), seed=0)
    assert "\n" not in str(err.value)


def test_validate_refuses_a_dataset_without_ratings_before_reading(tiny_cfg, tmp_path):
    from fedrec.config import compose, validate

    missing = str(tmp_path / "nowhere")  # never read: the refusal comes first
    with pytest.raises(ConfigError, match=r"^dataset.ratings: model 'dgrm' learns from explicit ratings, but dataset "
                                          r"'ml-1m_clean' \(kind 'diffrec'\) has no rating values"):
        validate(compose(["model=dgrm", "federation=none", "dataset=diffrec-ml-1m-clean", f"dataset.path={missing}"]))
    with pytest.raises(ConfigError, match=r"^dataset.ratings: model 'edgerec' learns from explicit ratings; set "
                                          r"dataset.ratings=true \(got False\)"):
        validate(tiny_cfg("federation=none", "dataset.ratings=false", model="edgerec"))
    validate(tiny_cfg("federation=none", model="dgrm"))


# ------------------------------------------------------------------ RMSE
def test_rmse_matches_numpy_and_ranking_metrics_stay(tiny_cfg):
    from fedrec.data import load_dataset
    from fedrec.eval.metrics import evaluate_scores

    data = load_dataset(tiny_cfg(model="dgrm").dataset, seed=0)
    rng = np.random.default_rng(1)
    pred = rng.uniform(1, 5, (data.n_users, data.n_items)).astype(np.float32)

    def score(rows, x):
        return torch.from_numpy(pred[rows])

    with_rmse = evaluate_scores(score, data, [5], 16, inputs=data.ratings["train"], with_rmse=True)
    plain = evaluate_scores(score, data, [5], 16)
    for split in ("valid", "test"):
        r = data.ratings[split].tocoo()
        ref = np.sqrt(np.mean((pred[r.row, r.col].astype(np.float64) - r.data) ** 2))
        assert with_rmse[split]["rmse"] == pytest.approx(ref, rel=1e-6)
        assert {k: v for k, v in with_rmse[split].items() if k != "rmse"} == plain[split]
        assert "rmse" not in plain[split]


# ------------------------------------------------------------------ DGRM
def _dgrm(n_items=7):
    from fedrec.models.base import DataShape
    from fedrec.models.dgrm import DGRM, DGRMConfig

    torch.manual_seed(0)
    cfg = DGRMConfig(dims=[5], critic_dims=[6], steps=4, noise_scale=0.5, noise_min=0.01, noise_max=0.1,
                     beta_fixed=False, dropout=0.0, adv_weight=0.3, drift=0.01, zero_reconstruction=0.2)
    return DGRM(cfg, DataShape(n_users=3, n_items=n_items))


def _dgrm_batch(model, rng):
    from fedrec.models.base import Batch

    x = rng.integers(0, 6, (3, 7)).astype(np.float32)
    x[x < 2] = 0  # unrated
    r = {"t": torch.tensor([0, 2, 3]), "noise": torch.from_numpy(rng.standard_normal((3, 7)).astype(np.float32)),
         "z_real": torch.from_numpy(rng.standard_normal((3, 7)).astype(np.float32)),
         "z_fake": torch.from_numpy(rng.standard_normal((3, 7)).astype(np.float32)),
         "keep": torch.ones(3, 7)}
    return Batch(users=torch.arange(3), x=torch.from_numpy(x), rand=r)


def _np_critic(critic, a, b, temb):
    h = np.concatenate([a, b, temb], axis=1)
    for k, layer in enumerate(critic.layers):
        h = h @ layer.weight.detach().double().numpy().T + layer.bias.detach().double().numpy()
        if k < len(critic.layers) - 1:
            h = np.where(h > 0, h, 0.2 * h)
    return h[:, 0]


def test_dgrm_loss_terms_match_a_numpy_rederivation():
    from fedrec.models.denoiser import timestep_embedding

    model = _dgrm()
    batch = _dgrm_batch(model, np.random.default_rng(2))
    terms = model.loss_terms(batch)
    c, r = model.cfg, batch.rand
    betas = model.diffusion.betas.double().numpy()  # the schedule itself is tested in test_diffusion.py
    ac = np.cumprod(1 - betas)
    ac_prev = np.append(1.0, ac[:-1])
    t = r["t"].numpy()
    x = batch.x.numpy().astype(np.float64)
    x0, m = x / c.rating_max, (x > 0).astype(np.float64)
    x_t = np.sqrt(ac[t])[:, None] * x0 + np.sqrt(1 - ac[t])[:, None] * r["noise"].numpy()
    with torch.no_grad():
        x0_hat = model.generator(torch.from_numpy(x_t).float(), r["t"], r["keep"]).double().numpy()
    mse = (m * (x0_hat - x0) ** 2).sum(1) / np.maximum(m.sum(1), 1)
    c1 = (betas * np.sqrt(ac_prev) / (1 - ac))[t][:, None]
    c2 = ((1 - ac_prev) * np.sqrt(1 - betas) / (1 - ac))[t][:, None]
    sd = np.sqrt(betas * (1 - ac_prev) / (1 - ac))[t][:, None]
    real = c1 * x0 + c2 * x_t + sd * r["z_real"].numpy()
    fake = c1 * (m * x0_hat) + c2 * x_t + sd * r["z_fake"].numpy()
    temb = timestep_embedding(r["t"], c.emb_size).double().numpy()
    d_real, d_fake = _np_critic(model.critic, real, x_t, temb), _np_critic(model.critic, fake, x_t, temb)
    critic = d_fake - d_real + c.drift * (d_real ** 2 + d_fake ** 2)
    gen = c.rec_weight * mse - c.adv_weight * d_fake + c.zero_reconstruction * ((1 - m) * x0_hat ** 2).sum(1) / (1 - m).sum(1)
    np.testing.assert_allclose(terms["masked_mse"].detach().numpy(), mse, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(terms["critic_loss"].detach().numpy(), critic, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(terms["loss"].detach().numpy(), gen + critic, rtol=1e-4, atol=1e-5)


def test_dgrm_each_player_gets_the_gradient_of_its_own_loss():
    model = _dgrm()
    batch = _dgrm_batch(model, np.random.default_rng(4))
    gen = [p for n, p in model.named_parameters() if not n.startswith("critic.")]
    crit = list(model.critic.parameters())
    total = torch.autograd.grad(model.loss(batch).sum(), gen + crit)
    terms = model.loss_terms(batch)
    g_only = torch.autograd.grad(terms["generator_loss"].sum(), gen, retain_graph=True, allow_unused=True)
    terms = model.loss_terms(batch)
    d_only = torch.autograd.grad(terms["critic_loss"].sum(), crit)
    for a, b in zip(total[:len(gen)], g_only):
        torch.testing.assert_close(a, torch.zeros_like(a) if b is None else b)
    for a, b in zip(total[len(gen):], d_only):
        torch.testing.assert_close(a, b)
    # the critic's gradient does not contain the generator's -D(fake): it differs from the naive sum's
    naive = torch.autograd.grad((terms := model.loss_terms(batch))["critic_loss"].sum()
                                - model.cfg.adv_weight * model.critic(*_fake_prev(model, batch)).sum(), crit)
    assert any(not torch.allclose(a, b) for a, b in zip(naive, d_only))


def _fake_prev(model, batch):
    c, r, d = model.cfg, batch.rand, model.diffusion
    x0 = batch.x / c.rating_max
    x_t = d.q_sample(x0, r["t"], r["noise"])
    fake = model.posterior_sample((batch.x > 0).float() * model.generator(x_t, r["t"], r["keep"]), x_t, r["t"],
                                  r["z_fake"])
    return fake.detach(), x_t, r["t"]


# ------------------------------------------------------------------ EDGE-Rec
def test_rcsa_matches_a_per_row_loop():
    from fedrec.models.edgerec import Attention, rcsa

    torch.manual_seed(1)
    P, n, m, c, fr, fc = 2, 3, 4, 2, 5, 6
    row, col = Attention(fr, fc, c, 2, 3, 2, 0.0), Attention(fc, fr, c, 2, 3, 2, 0.0)
    reduce = torch.nn.Linear(2 * c, c, bias=False)
    x, rf, cf = torch.randn(P, n, m, c), torch.randn(P, n, fr), torch.randn(P, m, fc)
    out = rcsa(row, col, reduce, x, rf, cf).detach().numpy()

    def one_query(att, q, keys, values):  # q (f_q,), keys (L, f_k), values (L, c): plain numpy
        W = {k: getattr(att, k).weight.detach().numpy() for k in ("to_q", "to_k", "to_v", "to_out")}
        mk, mv = att.mem_kv[0].detach().numpy(), att.mem_kv[1].detach().numpy()
        qh = (W["to_q"] @ q).reshape(2, 3)
        kh = (keys @ W["to_k"].T).reshape(len(keys), 2, 3)
        vh = (values @ W["to_v"].T).reshape(len(keys), 2, 3)
        heads = []
        for h in range(2):
            s = np.concatenate([mk[h] @ qh[h], kh[:, h] @ qh[h]]) / np.sqrt(3)
            a = np.exp(s - s.max())
            a /= a.sum()
            heads.append(a @ np.concatenate([mv[h], vh[:, h]]))
        return W["to_out"] @ np.concatenate(heads) + att.to_out.bias.detach().numpy()

    xn, rfn, cfn = x.numpy(), rf.numpy(), cf.numpy()
    R = reduce.weight.detach().numpy()
    for p in range(P):
        for i in range(n):
            for j in range(m):
                r_ = one_query(row, rfn[p, i], cfn[p], xn[p, i])
                c_ = one_query(col, cfn[p, j], rfn[p], xn[p, :, j])
                np.testing.assert_allclose(out[p, i, j], R @ np.concatenate([r_, c_]), rtol=1e-4, atol=1e-5)


def test_inpainting_ddim_keeps_known_entries_and_steps_as_ddim():
    from fedrec.models.diffusion import DDIMSampler, GaussianDiffusion, InpaintingDDIM

    d = GaussianDiffusion(50, "cosine", noise_scale=1.0, mean_type="eps", reweight=False, importance_sampling=False)
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(2, 3, 4, generator=g)
    known, mask = torch.rand(2, 3, 4, generator=g) * 2 - 1, torch.rand(2, 3, 4, generator=g) < 0.4

    def eps(x, t):
        return 0.3 * x + 0.01 * t.float()[:, None, None]

    out = InpaintingDDIM(known, mask, steps=5, clip=(-1.0, 1.0)).sample(d, eps, x_T)
    assert torch.equal(out[mask], known[mask]) and out.abs().max() <= 1.0
    free = InpaintingDDIM(known, torch.zeros_like(mask), steps=5).sample(d, eps, x_T)
    torch.testing.assert_close(free, DDIMSampler(steps=5).sample(d, eps, x_T))
    # one step by hand: x0 clipped, known entries put in, then x_s = sqrt(a_s) x0 + sqrt(1 - a_s) eps(clipped)
    ac = d.alphas_cumprod.double().numpy()
    seq = DDIMSampler(steps=5).timesteps(49)
    i, s = int(seq[0]), int(seq[1])
    x = x_T.double().numpy()
    e = 0.3 * x + 0.01 * i
    x0 = np.clip((x - np.sqrt(1 - ac[i]) * e) / np.sqrt(ac[i]), -1, 1)
    e = (x - np.sqrt(ac[i]) * x0) / np.sqrt(1 - ac[i])
    x0 = np.where(mask.numpy(), known.double().numpy(), x0)
    ref = np.sqrt(ac[s]) * x0 + np.sqrt(1 - ac[s]) * e
    two = InpaintingDDIM(known, mask, steps=5, clip=(-1.0, 1.0))
    got = two._step(d, torch.from_numpy(x0).float(), torch.from_numpy(e).float(), i, s, None)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-4, atol=1e-5)


def test_edgerec_patches_stay_inside_the_batch_and_cover_every_pair():
    from fedrec.models.base import DataShape
    from fedrec.models.edgerec import EDGERec, EDGERecConfig

    cfg = EDGERecConfig(n_blocks=1, channels=2, heads=1, dim_head=2, patch_users=4, patch_items=5, steps=10,
                        sampling_steps=2, user_features=[], genre_dim=0, user_id_dim=3, item_id_dim=3)
    model = EDGERec(cfg, DataShape(n_users=20, n_items=12))
    rows, valid, items = model.training_patches(10, "cpu")
    assert rows.shape == (3 * cfg.item_blocks, 4) and int(valid.sum()) == 10 * cfg.item_blocks
    assert set(rows[valid].tolist()) == set(range(10))
    assert all(len(set(r.tolist())) == 5 for r in items)
    u, it = model.inference_patches(10, "cpu")
    pairs = {(int(a), int(b)) for p in range(len(u)) for a in u[p] for b in it[p]}
    assert pairs == {(a, b) for a in range(10) for b in range(12)}


# ------------------------------------------------------------------ runs
@pytest.mark.parametrize("name", ["dgrm", "edgerec"])
def test_one_epoch_central_reports_rmse(tiny_cfg, tmp_path, name):
    import json

    from fedrec.experiment import execute

    execute(tiny_cfg("federation=none", "train.epochs=1", model=name), tmp_path / "run", progress=False)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    for split in ("valid", "test"):
        assert np.isfinite(summary[split]["rmse"]) and summary[split]["rmse"] > 0
        assert np.isfinite(summary[split]["ndcg@20"])


def _round(tiny_cfg, tmp_path, name, mode):
    from tests.test_mechanisms import trained_round

    return trained_round(tiny_cfg(*mode, model=name), tmp_path, name)[1]


SILO, DEVICE = SILO_ROUND, DEVICE_ROUND


@pytest.mark.parametrize("name", ["dgrm", "edgerec"])
def test_silo_round_in_process(tiny_cfg, tmp_path, name):
    final = _round(tiny_cfg, tmp_path, name, SILO)
    if name == "edgerec":
        assert "user_id.weight" not in final and "item_id.weight" in final  # user embeddings stay on the nodes


def test_dgrm_cross_device_round_and_dpsgd(tiny_cfg, tmp_path):
    from fedrec.experiment import execute

    _round(tiny_cfg, tmp_path, "dgrm", DEVICE)
    execute(tiny_cfg("federation=none", "privacy=dpsgd", "train.epochs=1", model="dgrm"), tmp_path / "dp",
            progress=False)
    assert (tmp_path / "dp" / "summary.json").exists()


@pytest.mark.parametrize("over,match", [
    (["federation=none", "privacy=dpsgd"], r"privacy=dpsgd: model 'edgerec' denoises rating-matrix patches that span "
                                            r"several users, so one user's row enters other users' losses"),
    (DEVICE, r"federation=device: model 'edgerec' denoises rating-matrix patches that span several users"),
])
def test_edgerec_refuses_dpsgd_and_cross_device(tiny_cfg, tmp_path, over, match):
    from fedrec.experiment import execute

    with pytest.raises(ConfigError, match=match):
        execute(tiny_cfg(*over, model="edgerec"), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
