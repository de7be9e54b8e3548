"""Public item side data: categories, pretrained embeddings, images and an item-item graph.

Item side data describes the *catalogue*, not the users: a movie's genres, its poster, a
knowledge graph between items, embeddings pretrained elsewhere. It is public, so every model may
read it, a federation may ship it to every node, and DP accounting does not cover it. It reaches
models through :class:`fedrec.models.base.DataShape` (``shape.item_side``), aligned with the
internal item ids ``0..n_items-1`` of the :class:`~fedrec.data.interactions.Interactions` it came
with (rows follow ``Interactions.item_ids`` after filtering and splitting).

* ``categories``: :class:`ItemCategories`, a CSR item x category 0/1 matrix plus the category
  names: a RecBole ``.item`` ``token_seq`` field (``dataset.item_category_field``, by default the
  first of ``class``/``genre``/``genres``: ML-100K's genres), the raw MovieLens genres, or the
  synthetic generator's genres (each item's cluster's home genre plus 0-2 random ones);
* ``embeddings``: (n_items, d) float32, e.g. DiffRec's LightGCN ``item_emb.npy``;
* ``images``: an (n_items, C, H, W) float32 tensor in [0, 1] (:func:`synthetic_images`), or an
  :class:`ImageFolder` that reads ``<folder>/<item_token>.png|jpg`` on demand;
* ``graph``: a *public* item-item adjacency (:func:`category_graph`), or None;
* ``kg``: a *public* knowledge graph (:class:`KnowledgeGraph`): the triples of a file
  ``dataset.kg_file`` (:func:`load_kg_file`: ``head relation tail`` per line), or None.
  :func:`kg_from_categories` turns item categories into one (item --has_category--> category).

:func:`co_interaction_graph` is the exception: it counts how often two items occur in the same
user's **training** row, so it is derived from the users' private interactions, never stored in
``ItemSideData``, and only built when a model asks for it (``DataShape.item_graph()`` with
``dataset.item_graph=co_interaction``). Under any DP mechanism it is refused
(:mod:`fedrec.privacy.public_only`): the accountant does not cover it. :func:`transition_graph`
(consecutive training items in each user's time order, G-Diff's graph) is private in the same way
and asked for by the same key (``DataShape.transition_graph()``).

Config keys (``conf/dataset/*.yaml``, all optional): ``item_category_field``, ``item_graph``, ``kg_file``,
``images``, ``image_folder``, ``image_size``, ``image_noise`` (synthetic images), ``missing_images``; :func:`check_side_options` checks
them before any file is read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import scipy.sparse as sp

from fedrec.data.options import get_option
from fedrec.errors import ConfigError, DataError

if TYPE_CHECKING:  # torch is imported on first use: loading a dataset without images does not need it
    import torch

ITEM_GRAPHS = ("category", "co_interaction")
IMAGE_SOURCES = ("synthetic", "folder")
MISSING_POLICIES = ("error", "zeros")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


@dataclass
class ItemCategories:
    """Item x category multi-hot: ``matrix`` (n_items, n_categories) float32 CSR, ``names`` per column."""

    matrix: sp.csr_matrix
    names: np.ndarray

    def of(self, item: int) -> list[str]:
        """The category names of internal item ``item``."""
        row = self.matrix.indices[self.matrix.indptr[item]:self.matrix.indptr[item + 1]]
        return self.names[np.sort(row)].tolist()


@dataclass
class KnowledgeGraph:
    """Triples (head, relation, tail) over entities 0..n_entities-1, where entity i < n_items is
    internal item i and the rest are other entities (genres, actors, ...): KGAT's / DiffKG's layout.

    ``triples`` (n, 3) int64, de-duplicated; ``relations`` names relation ids; ``entities`` names the
    entities past the items (entity n_items + j is ``entities[j]``)."""

    triples: np.ndarray
    n_items: int
    relations: np.ndarray
    entities: np.ndarray
    source: str = ""

    @property
    def n_entities(self) -> int:
        return self.n_items + len(self.entities)

    @property
    def n_relations(self) -> int:
        return len(self.relations)


@dataclass
class ItemSideData:
    """Public per-item data aligned with internal item ids; every field may be None (see the module docstring)."""

    categories: ItemCategories | None = None
    embeddings: np.ndarray | None = None
    images: "torch.Tensor | ImageFolder | None" = None
    graph: sp.csr_matrix | None = None
    kg: KnowledgeGraph | None = None
    # "co_interaction": the run asked for the item graph built from the training interactions
    # (dataset.item_graph). It is private, so it is not stored here: DataShape.item_graph() builds it.
    private_graph: str | None = None

    def all_images(self) -> "torch.Tensor":
        """Every item's image, (n_items, C, H, W) float32 in [0, 1] (an ImageFolder is read whole)."""
        if self.images is None:
            raise ConfigError("dataset.images: the dataset has no item images (set dataset.images=synthetic or a folder)")
        images = self.images if not isinstance(self.images, ImageFolder) else self.images.load_all()
        return images.float()


# --------------------------------------------------------------------------- categories


def categories_from_multihot(multihot, names) -> ItemCategories:
    """Categories from a dense (n_items, n_categories) 0/1 array (the loaders' ``item_features["genre"]``)."""
    m = sp.csr_matrix((np.asarray(multihot) > 0).astype(np.float32))
    return ItemCategories(m, np.asarray(names, dtype=str))


# --------------------------------------------------------------------------- knowledge graphs


def kg_from_categories(categories: ItemCategories) -> KnowledgeGraph:
    """Item side categories as a knowledge graph: one relation ``has_category``, one triple
    (item, has_category, category entity) per item category (ML-100K: item -> genre)."""
    c = categories.matrix.tocoo()
    n_items = categories.matrix.shape[0]
    triples = np.stack([c.row.astype(np.int64), np.zeros(c.nnz, dtype=np.int64), n_items + c.col.astype(np.int64)], 1)
    return KnowledgeGraph(np.unique(triples, axis=0), n_items, np.array(["has_category"]),
                          np.asarray(categories.names, dtype=str), "item categories")


def load_kg_file(path: str | Path, item_ids) -> KnowledgeGraph:
    """A knowledge graph from a text file of ``head relation tail`` lines (whitespace-separated
    tokens; blank lines and lines starting with ``#`` are skipped).

    A head or tail equal to an item token of the dataset (``Interactions.item_ids``) is that item;
    every other token is an entity of its own. Relations are tokens too (ids in order of first
    appearance). A line without exactly three tokens is a one-line DataError naming file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: knowledge-graph file not found (dataset.kg_file)") from None
    item_index = {str(t): i for i, t in enumerate(np.asarray(item_ids, dtype=str))}
    n_items = len(item_index)
    entities: dict[str, int] = {}
    relations: dict[str, int] = {}
    rows: list[tuple[int, int, int]] = []

    def entity(tok: str) -> int:
        if tok in item_index:
            return item_index[tok]
        return n_items + entities.setdefault(tok, len(entities))

    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            parts = line.split()
            if not parts or parts[0].startswith("#"):
                continue
            if len(parts) != 3:
                raise DataError(f"{path}: line {lineno}: expected 'head relation tail' (3 tokens), "
                                f"got {len(parts)}: {line.strip()[:80]!r}") from None
            h, r, t = parts
            rows.append((entity(h), relations.setdefault(r, len(relations)), entity(t)))
    if not rows:
        raise DataError(f"{path}: no 'head relation tail' triples (dataset.kg_file)") from None
    triples = np.unique(np.asarray(rows, dtype=np.int64), axis=0)
    if not (triples[:, [0, 2]] < n_items).any():
        raise DataError(f"{path}: no head or tail is an item token of the dataset (e.g. {rows[0]!r}); "
                        "heads/tails must name items by their ids in the interaction files") from None
    return KnowledgeGraph(triples, n_items, np.array(list(relations), dtype=str),
                          np.array(list(entities), dtype=str), str(path))


# --------------------------------------------------------------------------- graphs


def _without_diagonal(a: sp.spmatrix) -> sp.csr_matrix:
    a = sp.csr_matrix(a, dtype=np.float32)
    a.setdiag(0)
    a.eliminate_zeros()
    a.sort_indices()
    return a


def category_graph(categories: ItemCategories) -> sp.csr_matrix:
    """Public item-item graph: weight = number of categories two distinct items share (0 = no edge)."""
    c = categories.matrix
    return _without_diagonal(c @ c.T)


def co_interaction_graph(train: sp.csr_matrix, user_power: float = 0.0, item_power: float = 0.0,
                         diagonal: bool = False) -> sp.csr_matrix:
    """Item-item co-occurrence from the **training** matrix only. PRIVATE: derived from the users'
    interactions (refused under DP).

    With the defaults, weight = number of users whose training row holds both items, no self-loops.
    A weighting gives D_I^p R^T D_U^q R D_I^p for the binarised training matrix R (users x items),
    D_U / D_I its user / item degrees, q = ``user_power``, p = ``item_power`` (a degree 0 gets weight
    0), keeping the diagonal with ``diagonal``: GiffCF's graph is q = p = -1/2 with the diagonal
    (official ``adj_right = D_U^-1/4 R D_I^-1/2``, A = adj_right^T adj_right), GF-CF's q = -1, p = -1/2.
    Computed in float64, returned float32.
    """
    x = sp.csr_matrix(train, dtype=np.float64)
    x.data[:] = 1.0
    if user_power == 0.0 and item_power == 0.0:
        g = x.T @ x
        return sp.csr_matrix(g, dtype=np.float32) if diagonal else _without_diagonal(g)

    def powered(deg: np.ndarray, p: float) -> np.ndarray:
        out = np.zeros_like(deg)
        np.power(deg, p, out=out, where=deg > 0)
        return out

    du = powered(np.asarray(x.sum(axis=1)).ravel(), user_power)
    di = powered(np.asarray(x.sum(axis=0)).ravel(), item_power)
    g = sp.diags(di) @ (x.T @ sp.diags(du) @ x) @ sp.diags(di)
    g = sp.csr_matrix(g, dtype=np.float32)
    if not diagonal:
        return _without_diagonal(g)
    g.sort_indices()
    return g


def transition_graph(items: np.ndarray, indptr: np.ndarray, n_items: int) -> sp.csr_matrix:
    """Item-to-item transition counts from each user's **training** items in time order (``items`` of
    user u are ``items[indptr[u]:indptr[u+1]]``, oldest first: :class:`fedrec.data.sequences.Sequences`).

    G[a, b] = how many times b directly follows a in a user's sequence (directed; G-Diff's official
    ``get_graph``). PRIVATE like :func:`co_interaction_graph`: derived from the users' interactions.
    """
    items = np.asarray(items, dtype=np.int64)
    follows = np.ones(len(items), dtype=bool)  # position p has a successor inside its user's sequence
    ends = np.asarray(indptr[1:], dtype=np.int64) - 1
    follows[ends[ends >= np.asarray(indptr[:-1])]] = False
    src = np.flatnonzero(follows[:-1]) if len(items) else np.zeros(0, dtype=np.int64)
    g = sp.coo_matrix((np.ones(len(src), dtype=np.float64), (items[src], items[src + 1])), shape=(n_items, n_items))
    return sp.csr_matrix(g.tocsr(), dtype=np.float32)


# --------------------------------------------------------------------------- images


def _look_templates(n: int, seed: int, size: int, salt: int) -> np.ndarray:
    """(n, 3, size, size) templates: each a base colour plus a stripe pattern of its own frequency
    and orientation (the "look" of a taste cluster or a genre), drawn from (seed, salt)."""
    rng = np.random.default_rng([int(seed), salt])
    colour = rng.uniform(0.15, 0.85, size=(n, 3))
    freq = rng.uniform(1.0, 4.0, size=n)
    angle = rng.uniform(0.0, np.pi, size=n)
    yy, xx = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
    proj = np.cos(angle)[:, None, None] * xx + np.sin(angle)[:, None, None] * yy
    stripes = np.sin(2 * np.pi * freq[:, None, None] * proj)  # (n, H, W) in [-1, 1]
    return colour[:, :, None, None] + 0.25 * stripes[:, None], rng


def synthetic_images(cluster: np.ndarray, keys: np.ndarray, seed: int, size: int = 32,
                     noise: float = 0.25) -> torch.Tensor:
    """(n_items, 3, size, size) float32 in [0, 1]: each cluster a base colour and a stripe pattern
    (its own frequency and orientation), each item that plus Gaussian noise.

    Deterministic for ``seed``; an item's noise is indexed by its original id ``keys`` so that
    filtering other items does not change its image. The look carries the item's cluster, so
    visual features (VBPR) hold signal about taste.
    """
    cluster = np.asarray(cluster, dtype=np.int64)
    keys = np.asarray(keys, dtype=np.int64)
    n_c = int(cluster.max()) + 1 if len(cluster) else 0
    templates, rng = _look_templates(n_c, seed, size, 0x1A6E)
    n_keys = int(keys.max()) + 1 if len(keys) else 0
    eps = rng.standard_normal((n_keys, 3, size, size)).astype(np.float32)
    img = templates[cluster] + noise * eps[keys]
    import torch

    return torch.from_numpy(np.clip(img, 0.0, 1.0).astype(np.float32))


def _stable_keys(item_ids) -> np.ndarray:
    """An integer per item token: the token itself when it is a non-negative integer, else its CRC32."""
    import zlib

    tokens = np.asarray(item_ids, dtype=str)
    return np.array([int(t) if t.isdigit() else zlib.crc32(t.encode()) for t in tokens], dtype=np.int64)


def genre_images(categories: ItemCategories, item_ids, seed: int, size: int = 32,
                 noise: float = 0.25) -> torch.Tensor:
    """(n_items, 3, size, size) float32 in [0, 1] for a catalogue with categories (ML-100K's genres):
    every category a look template (:func:`_look_templates`: a colour and a stripe pattern), every
    item the mean of its categories' templates plus Gaussian noise; an item without a category gets
    the mean of all templates. So items of the same genres look alike and the look carries the taste
    signal genres carry. Seeded; an item's noise depends only on (seed, its token), so filtering
    other items leaves its image unchanged."""
    m = categories.matrix.toarray().astype(np.float64)
    m[m.sum(1) == 0] = 1.0
    templates, _ = _look_templates(m.shape[1], seed, size, 0x6E7E)
    mix = np.einsum("ig,gchw->ichw", m / m.sum(1, keepdims=True), templates)
    eps = np.stack([np.random.default_rng([int(seed), 0x6E7F, int(k)]).standard_normal((3, size, size))
                    for k in _stable_keys(item_ids)]) if len(m) else np.zeros((0, 3, size, size))
    import torch

    return torch.from_numpy(np.clip(mix + noise * eps, 0.0, 1.0).astype(np.float32))


class ImageFolder:
    """Item images read on demand from ``<folder>/<item_token>.png|jpg|jpeg``, resized to ``size``.

    Which file belongs to which item is settled when the folder is opened: a missing image is a
    one-line DataError naming the item and the folder (``missing="error"``), or a black image
    (``missing="zeros"``). ``folder[items]`` returns an (len(items), 3, size, size) float32 tensor
    in [0, 1]; ``load_all()`` the whole catalogue.
    """

    def __init__(self, folder: str | Path, item_ids, size: int = 32, missing: str = "error"):
        if missing not in MISSING_POLICIES:
            raise ConfigError(f"dataset.missing_images={missing!r}: expected one of {', '.join(MISSING_POLICIES)}")
        self.folder, self.size, self.missing = Path(folder), int(size), missing
        if not self.folder.is_dir():
            raise DataError(f"{self.folder}: image folder not found (dataset.image_folder)") from None
        by_token: dict[str, str] = {}
        for name in sorted(os.listdir(self.folder)):  # sorted: .jpeg < .jpg < .png picks the same file everywhere
            stem, ext = os.path.splitext(name)
            if ext.lower() in IMAGE_EXTENSIONS:
                by_token.setdefault(stem, name)
        tokens = np.asarray(item_ids, dtype=str)
        self.files = [by_token.get(t) for t in tokens]
        absent = [str(t) for t, f in zip(tokens, self.files) if f is None]
        if absent and missing == "error":
            raise DataError(f"{self.folder}: no image for item {absent[0]!r} ({absent[0]}.png or .jpg; "
                            f"{len(absent)} item(s) without one; dataset.missing_images=zeros uses black images)") from None
        self.n_missing = len(absent)

    def __len__(self) -> int:
        return len(self.files)

    def _read(self, name: str | None) -> np.ndarray:
        if name is None:
            return np.zeros((3, self.size, self.size), dtype=np.float32)
        from PIL import Image

        path = self.folder / name
        try:
            with Image.open(path) as im:
                im = im.convert("RGB").resize((self.size, self.size), Image.BILINEAR)
                arr = np.asarray(im, dtype=np.float32) / 255.0
        except Exception as exc:
            raise DataError(f"{path}: not a readable image ({type(exc).__name__}: {exc})".replace("\n", " ")) from None
        return arr.transpose(2, 0, 1)

    def __getitem__(self, items) -> torch.Tensor:
        import torch

        idx = np.atleast_1d(np.asarray(items, dtype=np.int64))
        return torch.from_numpy(np.stack([self._read(self.files[i]) for i in idx]))

    def load_all(self) -> torch.Tensor:
        return self[np.arange(len(self))]


# --------------------------------------------------------------------------- from the dataset config


def check_side_options(cfg) -> dict:
    """The dataset's side-data keys, checked before any file is read."""
    kind = get_option(cfg, "kind")
    field = get_option(cfg, "item_category_field")
    if field is not None and (not isinstance(field, str) or not field):
        raise ConfigError(f"dataset.item_category_field={field!r}: expected a field name of the .item file") from None
    if field is not None and kind != "atomic":
        raise ConfigError(f"dataset.item_category_field={field!r}: only for kind=atomic (RecBole .item files)") from None
    graph = get_option(cfg, "item_graph")
    if graph is not None and graph not in ITEM_GRAPHS:
        raise ConfigError(f"dataset.item_graph={graph!r}: expected null or one of {', '.join(ITEM_GRAPHS)}") from None
    kg_file = get_option(cfg, "kg_file")
    if kg_file is not None and (not isinstance(kg_file, str) or not kg_file):
        raise ConfigError(f"dataset.kg_file={kg_file!r}: expected null or the path of a 'head relation tail' file") from None
    images = get_option(cfg, "images")
    folder = get_option(cfg, "image_folder")
    if isinstance(images, str) and images not in IMAGE_SOURCES and ("/" in images or images.startswith(("~", "."))):
        images, folder = "folder", images  # dataset.images=/path: shorthand for images=folder, image_folder=/path
    if images is not None and images not in IMAGE_SOURCES:
        raise ConfigError(f"dataset.images={images!r}: expected null, a folder path or one of "
                          f"{', '.join(IMAGE_SOURCES)}") from None
    if images == "folder" and not folder:
        raise ConfigError("dataset.image_folder: required with dataset.images=folder "
                          "(a folder of <item_token>.png|jpg, absolute or relative to the data folder)") from None
    size = get_option(cfg, "image_size", 32)
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ConfigError(f"dataset.image_size={size!r}: expected a positive integer") from None
    noise = get_option(cfg, "image_noise", 0.25)
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not 0 <= noise < float("inf"):
        raise ConfigError(f"dataset.image_noise={noise!r}: expected a non-negative number") from None
    missing = get_option(cfg, "missing_images", "error")
    if missing not in MISSING_POLICIES:
        raise ConfigError(f"dataset.missing_images={missing!r}: expected one of {', '.join(MISSING_POLICIES)}") from None
    return {"field": field, "graph": graph, "kg_file": kg_file, "images": images, "folder": folder, "size": int(size), "noise": float(noise),
            "missing": missing}


def item_side_from_config(opts: dict, data, seed: int, data_folder: Callable[[], Path]) -> ItemSideData:
    """The public side data of a loaded ``Interactions`` (``opts`` from :func:`check_side_options`)."""
    side = ItemSideData(embeddings=data.item_emb)
    genre = data.item_features.get("genre")
    if genre is not None and np.ndim(genre) == 2 and genre.shape[0] == data.n_items:
        side.categories = categories_from_multihot(genre, data.item_features.get(
            "genre_names", np.array([f"category{c}" for c in range(genre.shape[1])])))
    if opts["graph"] == "category":
        if side.categories is None:
            raise ConfigError(f"dataset.item_graph=category: dataset {data.name!r} has no item categories") from None
        side.graph = category_graph(side.categories)
    elif opts["graph"] == "co_interaction":
        side.private_graph = "co_interaction"
    if opts.get("kg_file"):
        kg_path = Path(os.path.expanduser(str(opts["kg_file"])))
        side.kg = load_kg_file(kg_path if kg_path.is_absolute() else data_folder() / kg_path, data.item_ids)
    if opts["images"] == "synthetic" and "cluster" in data.item_features:  # the synthetic generator's taste clusters
        side.images = synthetic_images(data.item_features["cluster"], data.item_ids.astype(np.int64), seed,
                                       opts["size"], opts["noise"])
    elif opts["images"] == "synthetic":  # a real catalogue: a look per category (genre)
        if side.categories is None:
            raise ConfigError(f"dataset.images=synthetic: dataset {data.name!r} has neither taste clusters nor item "
                              "categories to key the synthetic look by; use dataset.images=<folder>") from None
        side.images = genre_images(side.categories, data.item_ids, seed, opts["size"], opts["noise"])
    elif opts["images"] == "folder":
        folder = Path(os.path.expanduser(str(opts["folder"])))
        if not folder.is_absolute():
            folder = data_folder() / folder
        side.images = ImageFolder(folder, data.item_ids, opts["size"], opts["missing"])
    return side
