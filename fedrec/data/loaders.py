"""Load a dataset described by ``conf/dataset/<name>.yaml`` into an :class:`Interactions`.

Four kinds of source, one output shape (binary float32 CSR train/valid/test, internal ids
``0..n-1``, original tokens kept in ``user_ids``/``item_ids``):

* ``atomic``    -- RecBole atomic files ``<name>.inter`` (+ optional ``.item``/``.user``), or the
  pre-split ``<name>.{train,valid,test}.inter`` benchmark files, which are used exactly as given
  (no filter, no split). As in RecBole their ids are built over all three files: items seen only
  in valid/test stay in the catalogue, users without training rows stay and are evaluated;
  :meth:`Interactions.summary` counts both.
* ``movielens`` -- the raw GroupLens files (``u.data`` for ML-100K, ``ratings.dat`` for ML-1M).
* ``diffrec``   -- the DiffRec paper's ``{train,valid,test}_list.npy`` splits (+ ``item_emb.npy``),
  used exactly as given so results are comparable with the paper.
* ``synthetic`` -- :mod:`fedrec.data.synthetic`, for tests and smoke runs.
* ``sequence``  -- sequential-recommendation text files, one user a line (``user item_1 ... item_n``,
  items in time order, 1-based integer ids), split leave-one-out (last item test, second-to-last
  valid, as in SASRec / BERT4Rec); see :func:`load_sequence`.

Unsplit sources go through one pipeline: keep ratings ``>= rating_threshold`` as positives,
collapse duplicates, drop users with fewer than ``min_user_interactions`` positives (RecBole's
user filter), drop items left without positives (DiffRec's convention), then split with
:func:`fedrec.data.splits.split_interactions`.

Parsing is plain ``str.split`` plus numpy conversions (no pandas): ML-100K loads in well under a
second. Every problem with the input is a one-line :class:`DataError` naming the file and the
1-based line (or array row), or a :class:`ConfigError` naming the config key. An option that is
absent (or null) takes its default; one that cannot be read (an interpolation that does not
resolve, a mandatory ``???``, a ``split`` that is not a mapping) is a ConfigError, never a default.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from fedrec.data.interactions import Interactions
from fedrec.data.options import get_option as _get
from fedrec.data.side import check_side_options, item_side_from_config
from fedrec.data.splits import SPLIT_METHODS, check_ratios, dedupe, dedupe_index, split_interactions, to_csr, values_like
from fedrec.data.synthetic import generate_synthetic
from fedrec.errors import ConfigError, DataError

KINDS = ("synthetic", "atomic", "movielens", "diffrec", "sequence")
# Kinds whose files carry rating values (``dataset.ratings=true``); DiffRec's .npy splits and sequence files have none.
RATING_KINDS = ("synthetic", "atomic", "movielens")
REPO_ROOT = Path(__file__).resolve().parents[2]

# ML-100K's u.genre order, used when u.genre itself is absent.
ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western",
)


class DataPathError(DataError, ConfigError):
    """No data folder could be resolved: both a data problem and a missing ``dataset.path``."""


# --------------------------------------------------------------------------- config access


def _common_options(cfg) -> dict:
    kind = _get(cfg, "kind")
    if kind not in KINDS:
        raise ConfigError(f"dataset.kind={kind!r}: unknown dataset kind (expected one of {', '.join(KINDS)})") from None
    name = _get(cfg, "name")
    if not name or not isinstance(name, str):
        raise ConfigError(f"dataset.name={name!r}: a dataset name is required") from None
    thr = _get(cfg, "rating_threshold")
    if thr is not None:
        try:
            thr = float(thr)
        except (TypeError, ValueError):
            raise ConfigError(f"dataset.rating_threshold={thr!r}: expected a number or null") from None
        if thr < 0 or not math.isfinite(thr):
            raise ConfigError(f"dataset.rating_threshold={thr}: must be a non-negative number or null") from None
    min_u = _get(cfg, "min_user_interactions", 1)
    if isinstance(min_u, bool) or not isinstance(min_u, (int, np.integer)) or min_u < 0:
        raise ConfigError(f"dataset.min_user_interactions={min_u!r}: expected a non-negative integer") from None
    split = _get(cfg, "split")
    method = _get(split, "method", "ratio", where="dataset.split")
    if method not in SPLIT_METHODS:
        raise ConfigError(
            f"dataset.split.method={method!r}: unknown split method (expected one of {', '.join(SPLIT_METHODS)})"
        ) from None
    ratios = check_ratios(_get(split, "ratios", [0.8, 0.1, 0.1], where="dataset.split"))
    keep_ratings = _get(cfg, "ratings", False)
    if not isinstance(keep_ratings, bool):
        raise ConfigError(f"dataset.ratings={keep_ratings!r}: expected true or false") from None
    if keep_ratings and kind not in RATING_KINDS:
        raise ConfigError(f"dataset.ratings=true: dataset kind {kind!r} has no rating values (kinds with ratings: "
                          f"{', '.join(RATING_KINDS)})") from None
    return {"kind": kind, "name": name, "threshold": thr, "min_user": int(min_u), "method": method, "ratios": ratios,
            "ratings": keep_ratings}


def resolve_data_path(cfg) -> Path:
    """The dataset folder: ``dataset.path``, else ``$FEDREC_DATA/<subdir>``, else ``../shared/data/<subdir>``."""
    path = _get(cfg, "path")
    if path:
        return Path(os.path.expanduser(str(path)))
    subdir = str(_get(cfg, "subdir") or _get(cfg, "name") or "")
    env = os.environ.get("FEDREC_DATA")
    if env:
        return Path(os.path.expanduser(env)) / subdir
    shared = REPO_ROOT.parent / "shared" / "data" / subdir
    if subdir and shared.is_dir():
        return shared
    raise DataPathError(
        f"dataset {_get(cfg, 'name')!r}: no data folder; set dataset.path or the FEDREC_DATA environment "
        f"variable (looked for {shared})"
    ) from None


def _require(path: Path) -> Path:
    if not path.exists():
        raise DataError(f"{path}: not found (set dataset.path or FEDREC_DATA to the folder holding it)") from None
    return path


# --------------------------------------------------------------------------- text parsing


def _read_rows(path: Path, sep: str, encoding: str = "utf-8") -> tuple[list[list[str]], np.ndarray]:
    """Non-blank lines split on ``sep`` and their 1-based line numbers."""
    _require(path)
    try:
        text = path.read_text(encoding=encoding)
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line}: not valid {encoding} text") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None
    lines = text.split("\n")
    keep = [i for i, line in enumerate(lines) if line.strip()]
    rows = [lines[i].rstrip("\r").split(sep) for i in keep]
    return rows, np.asarray(keep, dtype=np.int64) + 1


def _check_width(path: Path, rows, linenos, width: int, what: str) -> None:
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    bad = np.flatnonzero(lengths != width)
    if len(bad):
        i = bad[0]
        raise DataError(
            f"{path}: line {linenos[i]}: expected {width} {what}, got {lengths[i]}"
        ) from None


def _numeric(path: Path, col: list[str], linenos, field: str) -> np.ndarray:
    try:
        values = np.array(col, dtype=np.float64)
    except ValueError:
        values = None
    if values is not None:
        bad = np.flatnonzero(~np.isfinite(values))
    if values is None or len(bad):
        for i, s in enumerate(col):  # error path only: find the first offending row
            try:
                if math.isfinite(float(s)):
                    continue
            except ValueError:
                pass
            raise DataError(f"{path}: line {linenos[i]}: {field} {s!r} is not a finite number") from None
    return values


def _vocab(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique tokens (numerically when all are digits) and each token's index."""
    uniq, inv = np.unique(tokens, return_inverse=True)
    if len(uniq) and np.char.isdigit(uniq).all():
        order = np.argsort(uniq.astype(np.int64), kind="stable")
        rank = np.empty(len(order), dtype=np.int64)
        rank[order] = np.arange(len(order))
        uniq, inv = uniq[order], rank[inv]
    return uniq, inv.astype(np.int64).reshape(-1)


def _lookup(vocab: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Index of each token in ``vocab`` (any order), -1 where absent."""
    if len(vocab) == 0:
        return np.full(len(tokens), -1, dtype=np.int64)
    sorter = np.argsort(vocab)
    pos = np.clip(np.searchsorted(vocab, tokens, sorter=sorter), 0, len(vocab) - 1)
    idx = sorter[pos]
    return np.where(vocab[idx] == tokens, idx, -1).astype(np.int64)


class _Table:
    """One parsed file: columns by field name plus line numbers for error messages."""

    def __init__(self, path: Path, columns: dict[str, list[str]], types: dict[str, str], linenos: np.ndarray):
        self.path, self.columns, self.types, self.linenos = path, columns, types, linenos

    def __len__(self) -> int:
        return len(self.linenos)


def _read_atomic(path: Path, required: tuple[str, ...] = ()) -> _Table:
    """A RecBole atomic file: tab-separated with a ``name:type`` header line."""
    rows, linenos = _read_rows(path, "\t")
    if not rows:
        raise DataError(f"{path}: line 1: empty file, expected a header line of name:type fields") from None
    header, rows, linenos = rows[0], rows[1:], linenos[1:]
    names, types = [], {}
    for h in header:
        name, _, typ = h.strip().partition(":")
        names.append(name)
        types[name] = typ or "token"
    for field in required:
        if field not in names:
            raise DataError(
                f"{path}: line 1: header has no {field} field (expected e.g. '{field}:token', got {header})"
            ) from None
    _check_width(path, rows, linenos, len(header), "tab-separated columns as in the header")
    cols = list(zip(*rows)) if rows else [()] * len(names)
    return _Table(path, {n: list(c) for n, c in zip(names, cols)}, types, linenos)


# --------------------------------------------------------------------------- shared pipeline


def check_rating_values(path, ratings: np.ndarray | None, linenos: np.ndarray) -> np.ndarray:
    """The rating column kept as explicit feedback (``dataset.ratings=true``): present and > 0 on every row.

    Zero or negative ratings are refused because 0 marks an unobserved entry of a user's rating row.
    (Non-numeric and non-finite values were already refused by the column parser, naming the line.)
    """
    if ratings is None:
        raise DataError(f"{path}: has no rating column, but dataset.ratings=true asks for rating values") from None
    bad = np.flatnonzero(ratings <= 0)
    if len(bad):
        raise DataError(f"{path}: line {linenos[bad[0]]}: rating {ratings[bad[0]]:g} is not positive "
                        "(dataset.ratings=true: 0 marks an unobserved entry)") from None
    return ratings


def _threshold_mask(ratings, threshold, source) -> np.ndarray | None:
    if threshold is None:
        return None
    if ratings is None:
        raise DataError(f"{source}: has no rating column, but dataset.rating_threshold={threshold:g} is set") from None
    return ratings >= threshold


def _from_raw(opts: dict, seed: int, user_tok, item_tok, ratings, timestamps, source) -> tuple[Interactions, np.ndarray, np.ndarray]:
    """Threshold, dedupe, filter and split one interaction list.

    Returns the dataset and, for side features, the kept rows' indices into the user and item
    vocabularies of the raw tokens.
    """
    user_vocab, u = _vocab(np.asarray(user_tok))
    item_vocab, i = _vocab(np.asarray(item_tok))
    # explicit feedback (dataset.ratings=true): the rating of each kept pair travels with it
    values = np.asarray(ratings, dtype=np.float32) if opts.get("ratings") else None

    def pick(sel):
        nonlocal u, i, timestamps, values
        u, i = u[sel], i[sel]
        timestamps = None if timestamps is None else timestamps[sel]
        values = None if values is None else values[sel]

    mask = _threshold_mask(ratings, opts["threshold"], source)
    if mask is not None:
        pick(mask)
    pick(dedupe_index(u, i, timestamps, len(item_vocab)))  # a repeated pair keeps its earliest row's rating
    if opts["min_user"] > 1:
        pick((np.bincount(u, minlength=len(user_vocab)) >= opts["min_user"])[u])
    if len(u) == 0:
        raise DataError(
            f"{source}: no users left after rating_threshold={opts['threshold']} and "
            f"min_user_interactions={opts['min_user']}"
        ) from None
    kept_u, u = np.unique(u, return_inverse=True)
    kept_i, i = np.unique(i, return_inverse=True)
    split = split_interactions(u, i, timestamps, len(kept_u), len(kept_i), opts["method"], opts["ratios"], seed)
    if split.train.shape[0] == 0:
        raise DataError(f"{source}: no users left after the {opts['method']} split") from None
    user_index = kept_u[split.kept_users]
    data = Interactions(
        name=opts["name"], train=split.train, valid=split.valid, test=split.test,
        user_ids=user_vocab[user_index].astype(str), item_ids=item_vocab[kept_i].astype(str),
        train_timestamps=split.train_timestamps, train_seq=split.train_seq, valid_seq=split.valid_seq,
    )
    if values is not None:
        data.ratings = {name: values_like(getattr(split, name), u, i, values, split.kept_users)
                        for name in ("train", "valid", "test")}
    return data, user_index, kept_i


def _genre_multihot(item_ids: np.ndarray, feat_items: np.ndarray, genre_lists: list[list[str]]):
    """(n_items, n_genres) float32 multi-hot aligned with ``item_ids``; items without a row stay 0."""
    lens = np.fromiter((len(g) for g in genre_lists), dtype=np.int64, count=len(genre_lists))
    flat = np.array([g for gs in genre_lists for g in gs], dtype=str)
    names, codes = (np.unique(flat, return_inverse=True) if len(flat) else (np.array([], dtype=str), np.array([], dtype=np.int64)))
    row_of_feat = _lookup(np.asarray(item_ids, dtype=str), np.asarray(feat_items, dtype=str))
    rows = np.repeat(row_of_feat, lens)
    ok = rows >= 0
    genre = np.zeros((len(item_ids), len(names)), dtype=np.float32)
    genre[rows[ok], codes.reshape(-1)[ok]] = 1.0
    return genre, names


def _ordered_genre_multihot(item_ids, feat_items, flags: np.ndarray, names):
    """Like :func:`_genre_multihot` for files that already store 0/1 genre flags."""
    row_of_feat = _lookup(np.asarray(item_ids, dtype=str), np.asarray(feat_items, dtype=str))
    genre = np.zeros((len(item_ids), flags.shape[1]), dtype=np.float32)
    ok = row_of_feat >= 0
    genre[row_of_feat[ok]] = flags[ok]
    return genre, np.asarray(names, dtype=str)


def _user_codes(user_ids, feat_users, columns: dict[str, list[str]]) -> dict[str, np.ndarray]:
    """Integer codes (``-1`` for users missing from the file) plus ``<col>_vocab`` per column."""
    pos = _lookup(np.asarray(feat_users, dtype=str), np.asarray(user_ids, dtype=str))
    out = {}
    for col, tokens in columns.items():
        vocab, codes = _vocab(np.asarray(tokens, dtype=str))
        out[col] = np.where(pos >= 0, codes[np.maximum(pos, 0)], -1).astype(np.int64)
        out[col + "_vocab"] = vocab
    return out


# --------------------------------------------------------------------------- atomic


def _atomic_interactions(table: _Table):
    path, cols = table.path, table.columns
    users = np.array(cols["user_id"], dtype=str)
    items = np.array(cols["item_id"], dtype=str)
    ratings = _numeric(path, cols["rating"], table.linenos, "rating") if "rating" in cols else None
    ts = _numeric(path, cols["timestamp"], table.linenos, "timestamp") if "timestamp" in cols else None
    return users, items, ratings, ts


def _atomic_side_info(data: Interactions, folder: Path, name: str, category_field: str | None = None) -> None:
    item_path = folder / f"{name}.item"
    if category_field is not None and not item_path.exists():
        raise DataError(f"{item_path}: not found, but dataset.item_category_field={category_field!r} is set") from None
    if item_path.exists():
        t = _read_atomic(item_path, required=("item_id",) + ((category_field,) if category_field else ()))
        genre_col = category_field or next((c for c in ("class", "genre", "genres") if c in t.columns), None)
        if genre_col is not None:
            genre, names = _genre_multihot(data.item_ids, np.array(t.columns["item_id"], dtype=str),
                                           [s.split() for s in t.columns[genre_col]])
            data.item_features["genre"] = genre
            data.item_features["genre_names"] = names
    user_path = folder / f"{name}.user"
    if user_path.exists():
        t = _read_atomic(user_path, required=("user_id",))
        tok_cols = {c: v for c, v in t.columns.items() if c != "user_id" and t.types[c] == "token"}
        data.user_features.update(_user_codes(data.user_ids, np.array(t.columns["user_id"], dtype=str), tok_cols))
        pos = _lookup(np.array(t.columns["user_id"], dtype=str), data.user_ids)
        for c, v in t.columns.items():
            if c != "user_id" and t.types[c] == "float":
                vals = _numeric(user_path, v, t.linenos, c).astype(np.float32)
                data.user_features[c] = np.where(pos >= 0, vals[np.maximum(pos, 0)], np.nan).astype(np.float32)


def _joint_codes(tokens: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """One vocabulary over several token arrays (RecBole remaps all benchmark files together)."""
    vocab, codes = _vocab(np.concatenate(tokens))
    return vocab, np.split(codes, np.cumsum([len(t) for t in tokens])[:-1])


def _load_atomic_presplit(opts: dict, paths: list[Path]) -> Interactions:
    """RecBole's pre-split benchmark files, used as given.

    As in RecBole, user and item ids are built over all three files: an item that occurs only
    in valid/test is in the catalogue (rankable, never trained on), and a user with valid/test
    rows but no (positive) training row is kept; :meth:`Interactions.summary` counts both.
    Only users left with no positive row in any file (all rows below ``rating_threshold``) are
    dropped: they have nothing to train on or be evaluated on.
    """
    tables = [_read_atomic(p, required=("user_id", "item_id")) for p in paths]
    parsed = [_atomic_interactions(t) for t in tables]
    user_vocab, user_codes = _joint_codes([p[0] for p in parsed])
    item_vocab, item_codes = _joint_codes([p[1] for p in parsed])
    n_items = len(item_vocab)
    coded = []
    for t, (_, _, ratings, ts), u, i in zip(tables, parsed, user_codes, item_codes):
        mask = _threshold_mask(ratings, opts["threshold"], t.path)
        if mask is not None:
            u, i = u[mask], i[mask]
            ts = None if ts is None else ts[mask]
        coded.append((u, i, ts))
    if len(coded[0][0]) == 0:
        thr = opts["threshold"]
        kept_by = "" if thr is None else f" with rating >= {thr:g} (dataset.rating_threshold)"
        raise DataError(f"{paths[0]}: no training interactions{kept_by}") from None
    has_row = np.bincount(np.concatenate([u for u, _, _ in coded]), minlength=len(user_vocab)) > 0
    kept = np.flatnonzero(has_row)
    remap = np.full(len(user_vocab), -1, dtype=np.int64)
    remap[kept] = np.arange(len(kept))
    mats, train_ts = [], None
    for k, (u, i, ts) in enumerate(coded):
        u, i, ts = dedupe(remap[u], i, ts, n_items)
        mat, ts = to_csr(u, i, len(kept), n_items, ts)
        mats.append(mat)
        if k == 0:
            train_ts = ts
    return Interactions(
        name=opts["name"], train=mats[0], valid=mats[1], test=mats[2],
        user_ids=user_vocab[kept].astype(str), item_ids=item_vocab.astype(str), train_timestamps=train_ts,
    )


def load_atomic(cfg, seed: int) -> Interactions:
    opts = _common_options(cfg)
    folder = _require(resolve_data_path(cfg))
    name = opts["name"]
    presplit = [folder / f"{name}.{s}.inter" for s in ("train", "valid", "test")]
    if all(p.exists() for p in presplit):
        if opts["ratings"]:
            raise DataError(f"{presplit[0]}: pre-split atomic files are used as given and keep no rating values; "
                            "dataset.ratings=true needs the unsplit <name>.inter") from None
        data = _load_atomic_presplit(opts, presplit)
    else:
        path = folder / f"{name}.inter"
        table = _read_atomic(path, required=("user_id", "item_id"))
        users, items, ratings, ts = _atomic_interactions(table)
        if opts["ratings"]:
            check_rating_values(path, ratings, table.linenos)
        data, _, _ = _from_raw(opts, seed, users, items, ratings, ts, path)
    _atomic_side_info(data, folder, name, _get(cfg, "item_category_field"))
    return data


# --------------------------------------------------------------------------- raw MovieLens


def _movielens_side_info(data: Interactions, folder: Path) -> None:
    if (folder / "u.item").exists():
        rows, linenos = _read_rows(folder / "u.item", "|", encoding="latin-1")
        width = len(rows[0]) if rows else 0
        _check_width(folder / "u.item", rows, linenos, width, "'|'-separated columns")
        n_flags = width - 5
        names = ML100K_GENRES if n_flags == len(ML100K_GENRES) else [f"genre{g}" for g in range(n_flags)]
        if (folder / "u.genre").exists():
            g_rows, _ = _read_rows(folder / "u.genre", "|", encoding="latin-1")
            if len(g_rows) == n_flags:
                names = [r[0] for r in g_rows]
        if n_flags > 0:
            flags = np.array([r[5:] for r in rows], dtype=np.float32)
            genre, names = _ordered_genre_multihot(data.item_ids, [r[0] for r in rows], flags, names)
            data.item_features["genre"], data.item_features["genre_names"] = genre, names
    elif (folder / "movies.dat").exists():
        rows, linenos = _read_rows(folder / "movies.dat", "::", encoding="latin-1")
        _check_width(folder / "movies.dat", rows, linenos, 3, "'::'-separated columns (MovieID::Title::Genres)")
        genre, names = _genre_multihot(data.item_ids, [r[0] for r in rows], [r[2].split("|") for r in rows])
        data.item_features["genre"], data.item_features["genre_names"] = genre, names
    for fname, sep, cols in (("u.user", "|", ("age", "gender", "occupation", "zip_code")),
                             ("users.dat", "::", ("gender", "age", "occupation", "zip_code"))):
        path = folder / fname
        if path.exists():
            rows, linenos = _read_rows(path, sep, encoding="latin-1")
            _check_width(path, rows, linenos, 1 + len(cols), f"'{sep}'-separated columns (user, {', '.join(cols)})")
            columns = {c: [r[k + 1] for r in rows] for k, c in enumerate(cols)}
            data.user_features.update(_user_codes(data.user_ids, [r[0] for r in rows], columns))
            break


def load_movielens(cfg, seed: int) -> Interactions:
    opts = _common_options(cfg)
    folder = _require(resolve_data_path(cfg))
    fname = _get(cfg, "file")
    if fname:
        path = _require(folder / str(fname))
    else:
        path = next((folder / f for f in ("u.data", "ratings.dat") if (folder / f).exists()), None)
        if path is None:
            raise DataError(f"{folder / 'u.data'}: not found (nor ratings.dat; set dataset.file)") from None
    with open(path, encoding="latin-1") as fh:
        first = fh.readline()
    sep = "::" if "::" in first else "\t"
    rows, linenos = _read_rows(path, sep, encoding="latin-1")
    if not rows:
        raise DataError(f"{path}: line 1: empty file, expected user{sep}item{sep}rating{sep}timestamp rows") from None
    shown = "tab" if sep == "\t" else "'::'"
    _check_width(path, rows, linenos, 4, f"{shown}-separated columns (user, item, rating, timestamp)")
    users, items, ratings, ts = zip(*rows)
    ratings = _numeric(path, list(ratings), linenos, "rating")
    if opts["ratings"]:
        check_rating_values(path, ratings, linenos)
    ts = _numeric(path, list(ts), linenos, "timestamp")
    data, _, _ = _from_raw(opts, seed, np.array(users, dtype=str), np.array(items, dtype=str), ratings, ts, path)
    _movielens_side_info(data, folder)
    return data


# --------------------------------------------------------------------------- DiffRec .npy


def _load_npy(path: Path) -> np.ndarray:
    _require(path)
    try:
        return np.load(path, allow_pickle=False)
    except Exception as exc:  # corrupt header, pickled object arrays, ...
        raise DataError(f"{path}: not a readable .npy array ({type(exc).__name__}: {exc})".replace("\n", " ")) from None


def load_diffrec(cfg, seed: int) -> Interactions:
    """DiffRec's splits, used exactly as given (threshold, filter and split settings do not apply).

    The official T-DiffRec / LT-DiffRec read each user's training list in file order as its time order
    (interaction weights ``np.linspace(w_min, w_max, n)`` along it), so ``train_timestamps`` is each
    training pair's row position in ``train_list.npy`` (its first row if repeated): a time rank, not a time.
    """
    opts = _common_options(cfg)
    folder = _require(resolve_data_path(cfg))
    names = ("train_list.npy", "valid_list.npy", "test_list.npy")
    arrays = []
    for fname in names:
        path = folder / fname
        a = _load_npy(path)
        if a.ndim != 2 or a.shape[1] != 2 or not np.issubdtype(a.dtype, np.integer):
            raise DataError(
                f"{path}: expected an integer array of shape (n, 2) with (user, item) rows, got {a.dtype} {a.shape}"
            ) from None
        neg = np.flatnonzero((a < 0).any(axis=1))
        if len(neg):
            raise DataError(f"{path}: row {neg[0]} (0-based): negative id {a[neg[0]].tolist()}") from None
        arrays.append(a.astype(np.int64))
    train = arrays[0]
    if len(train) == 0:
        raise DataError(f"{folder / names[0]}: no training interactions (zero users)") from None
    n_users = int(max(a[:, 0].max() for a in arrays if len(a)) + 1)
    n_items = int(max(a[:, 1].max() for a in arrays if len(a)) + 1)
    has_user = np.bincount(train[:, 0], minlength=n_users) > 0
    has_item = np.bincount(train[:, 1], minlength=n_items) > 0
    for fname, a in zip(names[1:], arrays[1:]):
        bad = np.flatnonzero(~has_item[a[:, 1]])
        if len(bad):
            raise DataError(
                f"{folder / fname}: row {bad[0]} (0-based): item {a[bad[0], 1]} never appears in {names[0]}"
            ) from None
        bad = np.flatnonzero(~has_user[a[:, 0]])
        if len(bad):
            raise DataError(
                f"{folder / fname}: row {bad[0]} (0-based): user {a[bad[0], 0]} has no interactions in "
                f"{names[0]} (empty user)"
            ) from None
    emb = None
    emb_path = folder / "item_emb.npy"
    if emb_path.exists():
        emb = _load_npy(emb_path)
        if emb.ndim != 2 or not np.issubdtype(emb.dtype, np.floating):
            raise DataError(f"{emb_path}: expected a float array of shape (n_items, dim), got {emb.dtype} {emb.shape}") from None
        if emb.shape[0] < n_items:
            raise DataError(f"{emb_path}: has {emb.shape[0]} rows but the splits use item ids up to {n_items - 1}") from None
        n_items = emb.shape[0]
        emb = emb.astype(np.float32)
    mats, orders = [], []
    for a in arrays:  # the row position in the file as the time order (first row of a repeated pair)
        u, i, pos = dedupe(a[:, 0], a[:, 1], np.arange(len(a), dtype=np.int64), n_items)
        mat, pos = to_csr(u, i, n_users, n_items, pos)
        mats.append(mat)
        orders.append(pos)
    return Interactions(
        name=opts["name"], train=mats[0], valid=mats[1], test=mats[2],
        user_ids=np.arange(n_users).astype(str), item_ids=np.arange(n_items).astype(str), item_emb=emb,
        train_timestamps=orders[0],
    )


# --------------------------------------------------------------------------- synthetic


def synthetic_ratings(raw, seed: int) -> np.ndarray:
    """Seeded 1..5 ratings for the synthetic interactions (``dataset.ratings=true``): 4 where the user's and
    the item's clusters agree, 2 otherwise, plus a uniform -1/0/+1 jitter, so ratings carry signal."""
    rng = np.random.default_rng([int(seed), 0x5241])  # a stream of its own: the interactions do not change
    agree = raw.user_cluster[raw.users] == raw.item_cluster[raw.items]
    return np.clip(np.where(agree, 4, 2) + rng.integers(-1, 2, len(raw.users)), 1, 5).astype(np.float64)


def load_synthetic(cfg, seed: int) -> Interactions:
    """Generate with :func:`generate_synthetic` and split like real data (no ratings: no threshold)."""
    opts = _common_options(cfg)
    opts["threshold"] = None
    raw = generate_synthetic(cfg, seed)
    ratings = synthetic_ratings(raw, seed) if opts["ratings"] else None
    data, user_index, item_index = _from_raw(
        opts, seed, raw.users.astype(str), raw.items.astype(str), ratings, raw.timestamps, "synthetic dataset"
    )
    # Tokens are the generator's integer ids, so they index its feature arrays directly.
    uid = data.user_ids.astype(np.int64)
    iid = data.item_ids.astype(np.int64)
    data.user_features["cluster"] = raw.user_cluster[uid]
    data.item_features["cluster"] = raw.item_cluster[iid]
    data.item_features["genre"] = raw.item_genre[iid]
    data.item_features["genre_names"] = raw.genre_names
    return data


# --------------------------------------------------------------------------- sequence text files


def _sequence_lines(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user tokens, item ids, position in the line) of every interaction of a sequence file."""
    rows, linenos = _read_rows(path, " ")
    if not rows:
        raise DataError(f"{path}: line 1: empty file, expected 'user item_1 ... item_n' lines") from None
    rows = [[t for t in r if t] for r in rows]  # tolerate repeated spaces
    lens = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    bad = np.flatnonzero(lens < 2)
    if len(bad):
        raise DataError(f"{path}: line {linenos[bad[0]]}: expected a user id and at least one item") from None
    users = np.array([r[0] for r in rows], dtype=str)
    uniq, first, counts = np.unique(users, return_index=True, return_counts=True)
    if (counts > 1).any():
        dup = np.flatnonzero(counts > 1)[0]
        again = np.flatnonzero(users == uniq[dup])[1]
        raise DataError(f"{path}: line {linenos[again]}: user {str(uniq[dup])!r} already has a line "
                        f"(line {linenos[first[dup]]})") from None
    flat = [t for r in rows for t in r[1:]]
    line_of = np.repeat(linenos, lens - 1)
    items = _numeric(path, flat, line_of, "item id")
    bad = np.flatnonzero((items < 1) | (items != np.floor(items)))
    if len(bad):
        raise DataError(f"{path}: line {line_of[bad[0]]}: item id {flat[bad[0]]!r} is not an integer >= 1 "
                        "(ids are 1-based)") from None
    pos = np.arange(len(flat)) - np.repeat(np.cumsum(lens - 1) - (lens - 1), lens - 1)
    return np.repeat(users, lens - 1), items.astype(np.int64), pos.astype(np.float64)


def load_sequence(cfg, seed: int) -> Interactions:
    """A sequence file (``dataset.file`` in the data folder), split leave-one-out.

    The position in the line is the interaction's time, so the ``loo`` split puts each user's last
    item in test and the second-to-last in valid (users with 2 items: no valid item; 1 item: train
    only, as RecBole). Item ids are the file's 1-based ids in numeric order made 0-based (id k ->
    k - 1 when every id 1..n occurs). A repeated item inside a line collapses to its first
    occurrence, as everywhere (binary feedback); the shipped files have none.
    """
    opts = _common_options(cfg)
    if opts["method"] != "loo":
        raise ConfigError(f"dataset.split.method={opts['method']!r}: sequence files are split leave-one-out; "
                          "use loo") from None
    if opts["threshold"] is not None:
        raise ConfigError("dataset.rating_threshold: sequence files have no ratings; use null") from None
    fname = _get(cfg, "file")
    if not fname:
        raise ConfigError("dataset.file: the sequence file name is required (e.g. beauty.txt)") from None
    path = _require(_require(resolve_data_path(cfg)) / str(fname))
    users, items, pos = _sequence_lines(path)
    data, _, _ = _from_raw(opts, seed, users, items.astype(str), None, pos, path)
    data.train_timestamps = None  # positions, not times
    return data


_LOADERS = {"synthetic": load_synthetic, "atomic": load_atomic, "movielens": load_movielens, "diffrec": load_diffrec,
            "sequence": load_sequence}


def load_dataset(cfg, seed: int) -> Interactions:
    """Load ``cfg`` (a ``conf/dataset/*.yaml`` node) as binary train/valid/test matrices.

    ``seed`` drives the random split (``ratio``), the synthetic generator and synthetic images; the
    other sources are deterministic. ``data.item_side`` holds the public item side data
    (:mod:`fedrec.data.side`).
    """
    opts = _common_options(cfg)
    side_opts = check_side_options(cfg)
    data = _LOADERS[opts["kind"]](cfg, seed)
    if data.n_users == 0:
        raise DataError(f"dataset {opts['name']!r}: zero users after loading") from None
    data.item_side = item_side_from_config(side_opts, data, seed, lambda: resolve_data_path(cfg))
    return data
