"""Privacy audits must detect planted leakage, and their statistics match independent references."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from fedrec.privacy.audit import attack_metrics, jaccard_distances, loss_mia, synthetic_mia

# the default generator of `simulations.synthesize` (the zoo DiffRec), tiny
TINY_DIFFREC_GENERATOR = ["generator.epochs=2", "generator.model.dims=[16]", "generator.model.steps=10",
                          "generator.model.inference_steps=3"]


def _reference_auc(pos, neg):
    """Mann-Whitney U: P(member score > non-member score) + 0.5 P(tie)."""
    pos, neg = np.asarray(pos)[:, None], np.asarray(neg)[None, :]
    return float((pos > neg).mean() + 0.5 * (pos == neg).mean())


def test_attack_metrics_match_references():
    rng = np.random.default_rng(0)
    pos, neg = rng.normal(0.5, 1, 300), rng.normal(0, 1, 400)
    pos[:20] = neg[:20]  # ties
    m = attack_metrics(pos, neg)
    assert m["auc"] == pytest.approx(_reference_auc(pos, neg), abs=1e-9)
    thresholds = np.unique(np.concatenate([pos, neg]))
    adv = max((pos >= t).mean() - (neg >= t).mean() for t in thresholds)
    assert m["advantage"] == pytest.approx(adv, abs=1e-9)
    tpr1 = max([(pos >= t).mean() for t in thresholds if (neg >= t).mean() <= 0.01] + [0.0])
    assert m["tpr_at_1pct_fpr"] == pytest.approx(tpr1, abs=1e-9)


def test_jaccard_distances_match_bruteforce():
    rng = np.random.default_rng(1)
    a = sp.csr_matrix((rng.random((30, 25)) < 0.3).astype(np.float32))
    b = sp.csr_matrix((rng.random((40, 25)) < 0.3).astype(np.float32))
    got = jaccard_distances(a, b, k=2, chunk=7)
    A, B = a.toarray() > 0, b.toarray() > 0
    for i in range(30):
        d = sorted(1 - (A[i] & B[j]).sum() / max((A[i] | B[j]).sum(), 1e-12) for j in range(40))
        np.testing.assert_allclose(got[i], d[:2], atol=1e-6)


def _population(seed=0, n=200, items=120, p=0.08):
    rng = np.random.default_rng(seed)
    return sp.csr_matrix((rng.random((n, items)) < p).astype(np.float32))


def test_planted_leak_copying_generator_is_flagged():
    real = _population()
    members, nonmembers = np.arange(100), np.arange(100, 200)
    leaked = synthetic_mia(real, members, nonmembers, real[members])  # a "generator" that copies training rows
    assert leaked["dcr"]["auc"] >= 0.9 and leaked["dcr"]["tpr_at_1pct_fpr"] >= 0.9
    fresh = synthetic_mia(real, members, nonmembers, _population(seed=9, n=100))  # independent users
    assert 0.35 <= fresh["dcr"]["auc"] <= 0.65


def test_planted_leak_overfit_model_is_flagged():
    from fedrec.models import DataShape, build_model
    from fedrec.models.base import Batch

    real = _population(n=120, items=60, p=0.15)
    members, nonmembers = np.arange(60), np.arange(60, 120)
    torch.manual_seed(0)
    model = build_model({"name": "multvae", "hidden_dims": [256], "latent_dim": 64, "dropout": 0.0,
                         "anneal_cap": 0.0}, DataShape(120, 60))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x = torch.from_numpy(real[members].toarray())
    for _ in range(600):  # memorise the members
        loss = model.loss(Batch(users=torch.as_tensor(members), x=x)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss_mia(model, real, members, nonmembers, repeats=2)["auc"] >= 0.9


def test_latent_ddpm_generates_the_real_sparsity_and_writes_atomic(tmp_path):
    from omegaconf import OmegaConf

    from fedrec.data import load_dataset
    from fedrec.privacy.latent_ddpm import LatentDDPM, LatentDDPMConfig
    from simulations.synthesize import write_atomic

    real = _population(n=80, items=50, p=0.1)
    gen = LatentDDPM(LatentDDPMConfig(vae_epochs=3, diffusion_epochs=3, latent_dim=8, vae_hidden=[32],
                                      denoiser_hidden=32, diffusion_steps=20, sampling_steps=5), 50, seed=0).fit(real)
    syn = gen.sample(80)
    assert syn.shape == (80, 50)
    counts = np.asarray(syn.sum(1)).ravel()
    assert counts.min() >= 1 and abs(counts.mean() - real.sum() / 80) < 0.35 * real.sum() / 80
    path = write_atomic(syn, np.array([f"i{j}" for j in range(50)]), tmp_path / "syn", "syn")
    back = load_dataset(OmegaConf.create({"name": "syn", "kind": "atomic", "path": str(tmp_path / "syn"),
                                          "rating_threshold": None, "min_user_interactions": 1,
                                          "split": {"method": "ratio", "ratios": [1.0, 0.0, 0.0]}}), 0)
    assert back.train.nnz + back.valid.nnz + back.test.nnz == syn.nnz and path.exists()


def test_synthesize_command_end_to_end(tmp_path, capsys):
    import json

    from simulations.synthesize import main

    out = tmp_path / "release"
    rc = main(["dataset.n_users=60", "dataset.n_items=40", "train.epochs=2", "train.eval_every=1",
               "model.hidden_dims=[16]", "model.latent_dim=8", *TINY_DIFFREC_GENERATOR, f"release.out={out}"])
    assert rc == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert {x["what"] for x in lines} >= {"generator", "audit", "utility", "utility_ratio"}
    report = json.loads((out / "synthesis_report.json").read_text())
    assert (out / "synthetic-synthetic" / "synthetic-synthetic.inter").exists()
    assert set(report["utility"]) == {"real", "synthetic", "real+synthetic"}
    assert report["privacy"]["epsilon"] == "inf"
    for bad in (["release.member_share=2"], ["release.train_on=[fake]"], ["generator.temperature=-1"],
                ["generator=diffrec", "generator.model.noise_scale=-1"]):
        assert main(bad + [f"release.out={tmp_path / 'bad'}"]) == 2, bad
        assert not (tmp_path / "bad").exists()


def test_synthetic_release_sweep_one_command_then_report(tmp_path):
    """`python -m simulations.synthesize -m ...` sweeps the generator's epsilon; the report tabulates it."""
    import csv
    import os
    import subprocess
    import sys

    tiny = ["dataset.n_users=60", "dataset.n_items=40", "train.epochs=2", "model.hidden_dims=[16]",
            "model.latent_dim=8", *TINY_DIFFREC_GENERATOR, "generator.model.optim.batch_size=30",
            "release.train_on=[synthetic]"]
    env = dict(os.environ, HYDRA_FULL_ERROR="1")
    sweep = tmp_path / "sweep"
    subprocess.run([sys.executable, "-m", "simulations.synthesize", "-m", *tiny,
                    "generator.dp.target_epsilon=2,inf", f"hydra.sweep.dir={sweep}"],
                   check=True, env=env, capture_output=True, text=True, timeout=600)
    subprocess.run([sys.executable, "-m", "simulations.report", str(sweep)], check=True, env=env,
                   capture_output=True, text=True, timeout=120)
    rows = list(csv.DictReader(open(sweep / "report.csv")))
    assert [r["mechanism"] for r in rows] == ["synthetic:diffrec"] * 2
    assert sorted(r["target_epsilon"] for r in rows) == ["2.0000", "inf"]
    finite = next(r for r in rows if r["target_epsilon"] == "2.0000")
    assert 0 < float(finite["epsilon"]) <= 2.0 and (sweep / "privacy_accuracy.png").exists()
    bad = subprocess.run([sys.executable, "-m", "simulations.synthesize", "release.member_share=3",
                          f"hydra.run.dir={tmp_path / 'bad'}"], env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: release.member_share")
    assert not (tmp_path / "bad").exists()
