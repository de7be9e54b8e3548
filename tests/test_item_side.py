"""Public item side data (issue 9.4): categories, graphs, images, and how they reach models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from omegaconf import OmegaConf

from conftest import need_shared
from fedrec.data import load_dataset
from fedrec.data.loaders import ML100K_GENRES, REPO_ROOT
from fedrec.data.side import (ImageFolder, ItemCategories, category_graph, co_interaction_graph,
                              synthetic_images)
from fedrec.errors import ConfigError, DataError
from fedrec.models import data_shape

CONF = REPO_ROOT / "conf" / "dataset"


def atomic_cfg(path, **kw):
    base = {"name": "toy", "kind": "atomic", "path": str(path), "rating_threshold": None,
            "min_user_interactions": 1, "split": {"method": "ratio", "ratios": [0.8, 0.1, 0.1]}}
    return OmegaConf.create({**base, **kw})


def synth_cfg(**kw):
    return OmegaConf.merge(OmegaConf.load(CONF / "synthetic.yaml"), kw)


# --------------------------------------------------------------------------- ML-100K genres (real data)


def ml100k_file_genres(folder: Path) -> dict[str, set[str]]:
    lines = (folder / "ml-100k.item").read_text(encoding="utf-8").splitlines()[1:]
    return {r.split("\t")[0]: set(r.split("\t")[3].split()) for r in lines if r.strip()}


def test_ml100k_genres_from_the_item_file():
    folder = need_shared("ml-100k")
    d = load_dataset(atomic_cfg(folder, name="ml-100k"), 0)
    cats = d.item_side.categories
    assert d.n_items == 1682 and cats.matrix.shape == (1682, 19)
    assert sorted(cats.names.tolist()) == sorted(ML100K_GENRES)
    row = {t: i for i, t in enumerate(d.item_ids)}
    assert cats.of(row["1"]) == ["Animation", "Children's", "Comedy"]  # Toy Story
    assert cats.of(row["2"]) == ["Action", "Adventure", "Thriller"]  # GoldenEye
    assert cats.of(row["4"]) == ["Action", "Comedy", "Drama"]  # Get Shorty
    # the configured field gives the same, and another token field works as categories too
    same = load_dataset(atomic_cfg(folder, name="ml-100k", item_category_field="class"), 0).item_side.categories
    assert (same.matrix != cats.matrix).nnz == 0
    years = load_dataset(atomic_cfg(folder, name="ml-100k", item_category_field="release_year"), 0).item_side.categories
    assert years.of(row["1"]) == ["1995"] and years.matrix.sum(axis=1).min() == 1


def test_ml100k_genres_aligned_after_threshold_and_split():
    folder = need_shared("ml-100k")
    d = load_dataset(atomic_cfg(folder, name="ml-100k", rating_threshold=4, min_user_interactions=5), 3)
    assert d.n_items < 1682  # items left without a positive are dropped: ids are re-indexed
    truth = ml100k_file_genres(folder)
    cats = d.item_side.categories
    assert all(set(cats.of(i)) == truth[t] for i, t in enumerate(d.item_ids))
    shape = data_shape(d)
    assert shape.item_side is d.item_side and shape.item_side.categories.matrix.shape[0] == shape.n_items


def test_unknown_category_field_names_file_and_field(tmp_path):
    folder = need_shared("ml-100k")
    with pytest.raises(DataError) as e:
        load_dataset(atomic_cfg(folder, name="ml-100k", item_category_field="colour"), 0)
    assert "ml-100k.item" in str(e.value) and "colour" in str(e.value) and "\n" not in str(e.value)


# --------------------------------------------------------------------------- categories on a toy atomic dataset


def write_toy(tmp_path: Path, item_rows: list[str] | None = None) -> Path:
    inter = ["user_id:token\titem_id:token\trating:float"]
    # user a: 10, 20, 30, 40; user b: 20, 30, 50; user c: 60 only (dropped by min_user_interactions=2)
    for u, items in (("a", "10 20 30 40"), ("b", "20 30 50"), ("c", "60")):
        inter += [f"{u}\t{i}\t5" for i in items.split()]
    (tmp_path / "toy.inter").write_text("\n".join(inter) + "\n")
    rows = item_rows if item_rows is not None else [
        "10\tx y", "20\ty", "30\tz", "40\t", "50\tx z", "60\tw", "99\tv"]
    (tmp_path / "toy.item").write_text("item_id:token\tgenre:token_seq\n" + "\n".join(rows) + "\n")
    return tmp_path


def test_categories_follow_internal_ids_after_filtering(tmp_path):
    d = load_dataset(atomic_cfg(write_toy(tmp_path), min_user_interactions=2), 0)
    assert d.item_ids.tolist() == ["10", "20", "30", "40", "50"]  # 60 went with user c; 99 never interacted
    cats = d.item_side.categories
    assert [cats.of(i) for i in range(d.n_items)] == [["x", "y"], ["y"], ["z"], [], ["x", "z"]]
    assert set(cats.names.tolist()) == {"v", "w", "x", "y", "z"}
    # a node's view keeps the whole public catalogue
    assert d.subset_users(np.array([1])).item_side is d.item_side


def test_category_field_without_item_file(tmp_path):
    write_toy(tmp_path)
    (tmp_path / "toy.item").unlink()
    with pytest.raises(DataError, match="toy.item.*item_category_field"):
        load_dataset(atomic_cfg(tmp_path, item_category_field="genre"), 0)


# --------------------------------------------------------------------------- graphs


def random_binary(rows, cols, p, seed):
    return (np.random.default_rng(seed).random((rows, cols)) < p).astype(np.float32)


def test_category_graph_matches_numpy():
    c = random_binary(40, 6, 0.3, 1)
    g = category_graph(ItemCategories(sp.csr_matrix(c), np.array([f"c{k}" for k in range(6)])))
    ref = c @ c.T
    np.fill_diagonal(ref, 0)
    assert g.shape == (40, 40) and np.array_equal(g.toarray(), ref) and (g != g.T).nnz == 0
    assert g.diagonal().sum() == 0 and (g.data > 0).all()


def test_co_interaction_graph_matches_numpy():
    x = random_binary(30, 25, 0.2, 2)
    x[0, :3] = 2.0  # counts are of users, not of repeated values
    g = co_interaction_graph(sp.csr_matrix(x))
    b = (x > 0).astype(np.float64)
    ref = b.T @ b
    np.fill_diagonal(ref, 0)
    assert np.array_equal(g.toarray(), ref) and (g.data > 0).all()


def test_item_graph_reaches_models_lazily_and_from_train_only():
    d = load_dataset(synth_cfg(item_graph="co_interaction", n_users=80, n_items=40), 0)
    assert d.item_side.graph is None and d.item_side.private_graph == "co_interaction"
    shape = data_shape(d)
    assert not getattr(d, "_co_graphs", {})  # nothing built until a model asks
    g = shape.item_graph()
    assert np.array_equal(g.toarray(), co_interaction_graph(d.train).toarray())
    d.valid = d.valid[:, ::-1]  # valid/test never enter it (the cached graph is unchanged anyway)
    assert np.array_equal(co_interaction_graph(d.train).toarray(), g.toarray())
    # without the key there is no graph; with item_graph=category the public one is built at load
    assert data_shape(load_dataset(synth_cfg(n_users=80, n_items=40), 0)).item_graph() is None
    pub = load_dataset(synth_cfg(item_graph="category", n_users=80, n_items=40), 0)
    assert np.array_equal(data_shape(pub).item_graph().toarray(), category_graph(pub.item_side.categories).toarray())


@pytest.mark.parametrize("override,key", [("dataset.item_graph=co_interaction", "dataset.item_graph"),
                                          ("+model.item_graph=co_interaction", "model.item_graph")])
def test_co_interaction_graph_refused_under_dp_before_any_file(tiny_cfg, tmp_path, monkeypatch, override, key):
    import fedrec.experiment as experiment

    def no_load(*a, **k):
        raise AssertionError("the dataset was read")

    monkeypatch.setattr(experiment, "load_run_data", no_load)
    cfg = tiny_cfg("federation=none", "privacy=dpsgd", override)
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError) as e:
        experiment.execute(cfg, run_dir, progress=False)
    assert key in str(e.value) and "privacy=dpsgd" in str(e.value) and "\n" not in str(e.value)
    assert not run_dir.exists()


def test_public_graph_and_no_dp_are_accepted(tiny_cfg):
    from fedrec.config import validate

    validate(tiny_cfg("federation=none", "privacy=dpsgd", "dataset.item_graph=category"))
    validate(tiny_cfg("federation=none", "dataset.item_graph=co_interaction"))


# --------------------------------------------------------------------------- image folder


def write_png(path: Path, rgb, size=(12, 9)):
    from PIL import Image

    Image.new("RGB", size, tuple(int(v) for v in rgb)).save(path)


def test_image_folder_loader(tmp_path):
    img = tmp_path / "img"
    img.mkdir()
    colours = {"10": (255, 0, 0), "20": (0, 255, 0), "30": (0, 0, 255), "40": (255, 255, 255), "50": (0, 0, 0)}
    for t, c in colours.items():
        write_png(img / f"{t}.png", c)
    from PIL import Image

    Image.new("RGB", (5, 5), (10, 20, 30)).save(img / "99.jpg")  # not in the catalogue: ignored
    d = load_dataset(atomic_cfg(write_toy(tmp_path), min_user_interactions=2, images="folder",
                                image_folder="img", image_size=8), 0)
    folder = d.item_side.images
    assert isinstance(folder, ImageFolder) and len(folder) == d.n_items
    x = folder.load_all()
    assert x.shape == (5, 3, 8, 8) and x.dtype.is_floating_point
    want = np.array([colours[t] for t in d.item_ids], dtype=np.float32)[:, :, None, None] / 255.0
    assert np.allclose(x.numpy(), np.broadcast_to(want, x.shape), atol=1 / 255)
    assert np.allclose(folder[[2]].numpy(), x[2:3].numpy())


def test_missing_image_names_item_and_folder(tmp_path):
    img = tmp_path / "img"
    img.mkdir()
    for t in ("10", "20", "40", "50"):
        write_png(img / f"{t}.png", (1, 2, 3))
    with pytest.raises(DataError) as e:
        ImageFolder(img, np.array(["10", "20", "30", "40", "50"]), size=4)
    msg = str(e.value)
    assert "item '30' " in msg and str(img) in msg and "\n" not in msg
    zeros = ImageFolder(img, np.array(["10", "20", "30"]), size=4, missing="zeros")
    assert zeros.n_missing == 1 and zeros[[2]].abs().sum() == 0 and zeros[[0]].sum() > 0
    (img / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="bad.png: not a readable image"):
        ImageFolder(img, np.array(["bad"]), size=4)[[0]]
    with pytest.raises(DataError, match="image folder not found"):
        ImageFolder(tmp_path / "nope", np.array(["10"]))


@pytest.mark.parametrize("kw,key", [
    ({"images": "folder"}, "dataset.image_folder"),
    ({"images": "pictures"}, "dataset.images"),
    ({"image_size": 0}, "dataset.image_size"),
    ({"missing_images": "skip"}, "dataset.missing_images"),
    ({"item_graph": "knn"}, "dataset.item_graph"),
    ({"image_noise": -1}, "dataset.image_noise"),
])
def test_bad_side_options_fail_before_any_file(tmp_path, kw, key):
    with pytest.raises(ConfigError) as e:
        load_dataset(atomic_cfg(tmp_path / "absent", **kw), 0)  # the folder does not exist: nothing was read
    assert key in str(e.value) and "\n" not in str(e.value)


# --------------------------------------------------------------------------- synthetic images


def test_synthetic_images_deterministic_and_carry_the_cluster():
    cfg = synth_cfg(images="synthetic", n_items=400, n_clusters=8)
    a, b = load_dataset(cfg, 5), load_dataset(cfg, 5)
    x = a.item_side.images
    assert x.shape == (a.n_items, 3, 32, 32) and float(x.min()) >= 0 and float(x.max()) <= 1
    assert np.array_equal(x.numpy(), b.item_side.images.numpy())
    assert not np.array_equal(synthetic_images(np.zeros(3, int), np.arange(3), 5).numpy(),
                              synthetic_images(np.zeros(3, int), np.arange(3), 6).numpy())
    # an item's image depends on its original id, not on which other items survived filtering
    cl = a.item_features["cluster"]
    keys = a.item_ids.astype(np.int64)
    assert np.array_equal(synthetic_images(cl[::2], keys[::2], 5).numpy(), x.numpy()[::2])
    # nearest centroid on flattened pixels: fit on half the items, predict the other half's cluster
    flat = x.reshape(len(x), -1).numpy()
    perm = np.random.default_rng(0).permutation(len(flat))
    fit, held = perm[: len(perm) // 2], perm[len(perm) // 2:]
    labels = np.unique(cl[fit])
    centroids = np.stack([flat[fit][cl[fit] == c].mean(0) for c in labels])
    pred = labels[((flat[held][:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)]
    accuracy = float((pred == cl[held]).mean())
    chance = float(np.bincount(cl[held]).max() / len(held))
    assert accuracy > 0.9 and accuracy > chance + 0.5, (accuracy, chance)
    # the noise is configurable: more noise, still deterministic, further from the cluster template
    noisy = load_dataset(synth_cfg(images="synthetic", image_noise=1.0), 5).item_side.images
    assert np.array_equal(noisy.numpy(), load_dataset(synth_cfg(images="synthetic", image_noise=1.0), 5).item_side.images.numpy())
    assert float(noisy.std()) > float(x.std())
    # categories: the generator's genres, one of them the cluster's home genre
    assert a.item_side.categories.matrix.shape == (a.n_items, 18)
    assert a.item_side.categories.matrix.sum(axis=1).min() >= 1
