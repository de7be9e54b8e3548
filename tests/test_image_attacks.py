"""Item images, VBPR, the image attacks (IPDGI, gradual image poisoning) and image purification on tiny
synthetic catalogues: SSIM against a scipy reference, the visual signal of the synthetic looks, VBPR's
score formula, the guidance direction, the perturbation bound and the purification detector."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from fedrec.errors import ConfigError
from tests.test_strategies import task_identity  # noqa: F401  (autouse fixture: Message() needs it)


# ----------------------------------------------------------------------------------- SSIM
def _reference_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """Wang et al. 2004 with scipy: 11x11 Gaussian (sigma 1.5) 'valid' filtering per channel."""
    from scipy.signal import convolve2d

    r = np.arange(11) - 5.0
    g = np.exp(-r ** 2 / (2 * 1.5 ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    vals = []
    for a, b in zip(x, y):
        f = lambda z: convolve2d(z, w[::-1, ::-1], mode="valid")  # noqa: E731  (correlation)
        ma, mb = f(a), f(b)
        va, vb, cab = f(a * a) - ma ** 2, f(b * b) - mb ** 2, f(a * b) - ma * mb
        vals.append((((2 * ma * mb + c1) * (2 * cab + c2)) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2))).mean())
    return float(np.mean(vals))


def test_ssim_matches_a_scipy_reference():
    from fedrec.eval.images import perturbation_sizes, ssim

    rng = np.random.default_rng(0)
    x = rng.random((3, 3, 20, 24))
    y = np.clip(x + rng.normal(0, 0.1, x.shape), 0, 1)
    got = ssim(torch.tensor(x), torch.tensor(y)).numpy()
    for b in range(3):
        assert got[b] == pytest.approx(_reference_ssim(x[b], y[b]), abs=1e-10)
    assert ssim(torch.tensor(x), torch.tensor(x)).numpy() == pytest.approx(1.0)
    sizes = perturbation_sizes(torch.tensor(x), torch.tensor(y))
    d = (y - x).reshape(3, -1)
    assert sizes["l2"] == pytest.approx(np.linalg.norm(d, axis=1).mean())
    assert sizes["linf_max"] == pytest.approx(np.abs(d).max())


# ----------------------------------------------------------------------------------- images and VBPR
def _genre_catalogue(n_items=60, n_genres=4, seed=0, size=8, noise=0.25):
    from fedrec.data.side import ItemCategories, genre_images

    genre = np.arange(n_items) % n_genres
    cats = ItemCategories(sp.csr_matrix(np.eye(n_genres, dtype=np.float32)[genre]), np.array([f"g{i}" for i in range(n_genres)]))
    return genre, genre_images(cats, np.array([str(i) for i in range(n_items)]), seed, size=size, noise=noise)


def test_genre_images_are_seeded_and_their_features_predict_the_genre():
    from fedrec.models.vbpr import FixedCNN

    genre, img = _genre_catalogue()
    _, again = _genre_catalogue()
    assert torch.equal(img, again) and img.shape == (60, 3, 8, 8) and 0 <= float(img.min()) and float(img.max()) <= 1
    feats = FixedCNN([8, 8], seed=0, pool=2)(img).numpy()
    feats = (feats - feats.mean(0)) / (feats.std(0) + 1e-9)
    train, test = np.arange(60) < 40, np.arange(60) >= 40
    centroids = np.stack([feats[train & (genre == g)].mean(0) for g in range(4)])
    pred = np.argmin(((feats[test][:, None] - centroids[None]) ** 2).sum(-1), 1)
    assert (pred == genre[test]).mean() >= 0.9  # chance: 0.25


def _vbpr(n_users=20, n_items=60, size=8, noise=0.25):
    from fedrec.data.side import ItemSideData
    from fedrec.models.base import DataShape
    from fedrec.models.vbpr import VBPR, VBPRConfig

    _, img = _genre_catalogue(n_items=n_items, size=size, noise=noise)
    torch.manual_seed(0)
    shape = DataShape(n_users, n_items, item_side=ItemSideData(images=img))
    return VBPR(VBPRConfig(embedding_size=4, visual_size=3, extractor_channels=[8, 8], init_std=0.3), shape), img


def test_vbpr_score_is_the_papers_formula_and_features_follow_the_image():
    from fedrec.models.base import Batch

    model, img = _vbpr()
    with torch.no_grad():
        model.item_bias.weight.normal_()
        model.visual_bias.normal_()
    users = torch.tensor([0, 3, 7])
    f = model.item_features
    want = (model.user_emb(users) @ model.item_emb.weight.T + model.user_visual(users) @ (f @ model.visual_proj.T).T
            + model.item_bias.weight.T + (f @ model.visual_bias)[None])
    got = model.scores(Batch(users=users, x=torch.zeros(3, 60)))
    torch.testing.assert_close(got, want)
    before = f.clone()
    model.set_item_images([5], 1.0 - img[[5]])
    changed = (model.item_features != before).any(1)
    assert changed.nonzero().flatten().tolist() == [5]
    torch.testing.assert_close(model.item_features[5], model.visual_features(1.0 - img[[5]])[0])
    assert model.private_parameter_names() == {"user_emb.weight", "user_visual.weight"}
    assert not any("extractor" in n for n, _ in model.named_parameters())  # the CNN is fixed


def test_vbpr_needs_images():
    from fedrec.models.base import DataShape
    from fedrec.models.vbpr import VBPR, VBPRConfig

    with pytest.raises(ConfigError, match="model=vbpr"):
        VBPR(VBPRConfig(), DataShape(3, 4))


# ----------------------------------------------------------------------------------- attacks
def _objective(model):
    from attacks.image_common import VisualObjective

    class _Data:
        train = sp.csr_matrix(np.random.default_rng(0).random((20, model.n_items)) < 0.2, dtype=np.float32)

        @staticmethod
        def genuine():
            return np.arange(20)

    return VisualObjective(model, _Data, popular_items=5, popular_weight=0.1, preference_weight=1.0)


def test_guidance_gradient_raises_the_targets_visual_score():
    from attacks.image_poison import pgd_steps
    from fedrec.models.diffusion import ClassifierGuidance
    from fedrec.models.image_diffusion import ImageDiffusionConfig, train_image_diffusion

    model, img = _vbpr()
    obj = _objective(model)
    diffusion = train_image_diffusion(img, ImageDiffusionConfig(channels=8, steps=20, train_steps=30, batch_size=16))
    x0 = img[[1, 2]]
    t = torch.tensor([5, 5])
    x_t = diffusion.diffusion.q_sample(x0 * 2 - 1, t, generator=torch.Generator().manual_seed(0))
    guide = ClassifierGuidance(lambda x, tt: obj(diffusion.predict_clean(x, tt)), 1.0)
    g = guide.gradient(x_t, t)
    before = obj(diffusion.predict_clean(x_t, t))
    after = obj(diffusion.predict_clean(x_t + 1e-3 * g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1), t))
    assert (after > before).all()
    # the same objective drives image_poison's PGD: each bounded step raises it
    x = pgd_steps(obj, x0, x0, steps=3, step_size=0.01, epsilon=0.03)
    assert (obj(x) > obj(x0)).all()


def test_ipdgi_images_respect_the_bound_and_raise_the_score():
    from attacks.ipdgi import ipdgi_images
    from fedrec.eval.images import perturbation_sizes
    from fedrec.models.image_diffusion import ImageDiffusionConfig, train_image_diffusion

    model, img = _vbpr()
    obj = _objective(model)
    diffusion = train_image_diffusion(img, ImageDiffusionConfig(channels=8, steps=20, train_steps=30, batch_size=16))
    x0 = img[[1, 2, 3]]
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    guided = ipdgi_images(diffusion, x0, obj, 8, 4, 0.0, 3, 0.02, 0.05, gen())  # backward guidance on
    plain = ipdgi_images(diffusion, x0, obj, 8, 4, 0.0, 0, 0.02, 0.05, gen())  # SDEdit, projection only
    assert float((guided - x0).abs().max()) <= 0.05 + 1e-6 and float(guided.min()) >= 0 and float(guided.max()) <= 1
    with torch.no_grad():
        assert (obj(guided) > obj(plain)).all()
    assert 0 < perturbation_sizes(x0, guided)["ssim"] < 1


def test_purification_detector_separates_adversarial_images():
    """Images pushed far in feature space by bounded PGD move back when purified: higher encoding
    distance than clean catalogue images."""
    from attacks.image_poison import pgd_steps
    from fedrec.defenses.image_purify import encoding_distance, purify_images
    from fedrec.models.image_diffusion import ImageDiffusionConfig, train_image_diffusion
    from fedrec.eval.detection import roc_auc

    model, img = _vbpr(n_items=48, size=16)
    obj = _objective(model)
    diffusion = train_image_diffusion(img, ImageDiffusionConfig(channels=8, steps=20, train_steps=150, batch_size=16))
    adv_items = np.arange(0, 48, 6)
    adv = pgd_steps(obj, img[adv_items], img[adv_items], steps=20, step_size=0.02, epsilon=0.15)
    images = img.clone()
    images[adv_items] = adv
    purified = purify_images(diffusion, images, 8, 4, 1.0, torch.Generator().manual_seed(0), batch_size=20)
    scores = encoding_distance(model, images, purified)
    truth = np.isin(np.arange(48), adv_items)
    assert roc_auc(scores, truth) >= 0.9


# ----------------------------------------------------------------------------------- configs and a tiny run
def test_image_attacks_need_a_visual_recommender(tiny_cfg):  # noqa: D103
    from fedrec.mechanisms import build_mechanisms

    for group, name in (("attack", "ipdgi"), ("attack", "image_poison"), ("defense", "image_purify")):
        with pytest.raises(ConfigError, match=f"{group}={name}: needs a visually-aware recommender"):
            build_mechanisms(tiny_cfg("federation=none", f"{group}={name}", model="bpr"))
    with pytest.raises(ConfigError, match="attack.epsilon"):
        build_mechanisms(tiny_cfg("federation=none", "attack=ipdgi", "attack.epsilon=2", model="bpr"))


def test_images_path_shorthand_and_synthetic_genre_looks_on_an_atomic_catalogue(tmp_path):
    from fedrec.data.loaders import load_dataset
    from fedrec.data.side import check_side_options
    from fedrec.errors import DataError
    from tests.test_item_side import atomic_cfg, write_png, write_toy

    opts = check_side_options({"kind": "atomic", "images": str(tmp_path / "imgs")})
    assert opts["images"] == "folder" and opts["folder"] == str(tmp_path / "imgs")
    write_toy(tmp_path)
    d = load_dataset(atomic_cfg(tmp_path, images="synthetic", image_size=8), 0)  # keyed by the .item genres
    img = d.item_side.all_images()
    assert img.shape == (d.n_items, 3, 8, 8)
    again = load_dataset(atomic_cfg(tmp_path, images="synthetic", image_size=8), 0).item_side.all_images()
    assert torch.equal(img, again)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for t in d.item_ids[:-1]:
        write_png(folder / f"{t}.png", (10, 200, 30))
    with pytest.raises(DataError, match=f"no image for item '{d.item_ids[-1]}'"):  # one line naming the item
        load_dataset(atomic_cfg(tmp_path, images=str(folder), image_size=8), 0)
    write_png(folder / f"{d.item_ids[-1]}.png", (1, 2, 3))
    loaded = load_dataset(atomic_cfg(tmp_path, images=str(folder), image_size=8), 0).item_side.all_images()
    assert loaded.shape == (d.n_items, 3, 8, 8) and float(loaded[0, 1].mean()) == pytest.approx(200 / 255)


TINY_VBPR = ["dataset.images=synthetic", "dataset.image_size=8", "model.embedding_size=8", "model.visual_size=4",
             "model.extractor_channels=[8,8]", "eval.ks=[5,10]", "train.select_metric=recall@10"]
TINY_DIFF = ["diffusion_steps=20", "diffusion_train_steps=10", "diffusion_channels=8"]


def _vbpr_cfg(tmp_path, *overrides):
    from fedrec.config import compose
    from tests.conftest import TINY

    return compose(["model=vbpr", *TINY, *TINY_VBPR, f"paths.output_root={tmp_path}", *overrides])


def test_tiny_central_run_with_ipdgi_and_purification(tmp_path):
    from fedrec.experiment import execute

    cfg = _vbpr_cfg(tmp_path, "federation=none", "train.epochs=3", "attack=ipdgi", "attack.t_star=8",
                    "attack.sample_steps=4", "attack.n_targets=2", *[f"attack.{k}" for k in TINY_DIFF],
                    "defense=image_purify", "defense.t_star=8", "defense.sample_steps=4",
                    *[f"defense.{k}" for k in TINY_DIFF])
    summary = execute(cfg, tmp_path / "run", progress=False)
    a, d = summary["attack"], summary["defense"]
    assert a["attacked"] and a["attack_epoch"] == 3 and len(a["targets"]) == 2
    assert a["perturbation"]["linf_max"] <= 0.0627 + 1e-6 and "clean_mean_rank" in a and "mean_rank" in a
    assert d["uploaded_items"] == 2 and d["malicious"] == 2 and 0 <= d["auc"] <= 1
    assert d["purified"] == summary["dataset"]["items"] + 2  # the catalogue, then the two uploads


def test_tiny_central_run_with_image_poison(tmp_path):
    from fedrec.experiment import execute

    cfg = _vbpr_cfg(tmp_path, "federation=none", "train.epochs=3", "attack=image_poison", "attack.start_epoch=2")
    a = execute(cfg, tmp_path / "run", progress=False)["attack"]
    assert a["uploads"] == 2 and a["perturbation"]["linf_max"] <= 0.0627 + 1e-6
    assert set(a["history"]) == {"1", "2", "3"}


def test_vbpr_trains_cross_device(tmp_path):
    """VBPR in a federation like BPR: private theta_u, row-sparse item tables, dense E and beta'."""
    from tests.test_mechanisms import _serve

    cfg = _vbpr_cfg(tmp_path, "federation=device", "federation.num_nodes=1", "federation.rounds=2")
    g0, final, _, _ = _serve(cfg, tmp_path, "vbpr-device")
    assert "user_visual.weight" not in final and "visual_proj" in final
    assert not np.allclose(g0["visual_proj"], final["visual_proj"])


def test_trained_diffusion_model_is_cached_on_disk_by_catalogue_and_config(tmp_path):
    from fedrec.models import image_diffusion as I

    _, img = _genre_catalogue(n_items=12)
    cfg = I.ImageDiffusionConfig(channels=8, steps=10, train_steps=3, batch_size=4)
    first = I.train_image_diffusion(img, cfg, tmp_path)
    I._TRAINED.clear()
    again = I.train_image_diffusion(img, cfg, tmp_path)
    assert again is not first and len(list(tmp_path.iterdir())) == 1
    for (n, a), (_, b) in zip(first.net.state_dict().items(), again.net.state_dict().items()):
        assert torch.equal(a, b), n
    I.train_image_diffusion(1.0 - img, cfg, tmp_path)  # another catalogue: another file
    assert len(list(tmp_path.iterdir())) == 2
