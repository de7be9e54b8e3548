"""The FedRec row rules and the update detector against numpy loops over a dense (U, n_rows, d) stack."""

import numpy as np
import pytest

from fedrec.defenses.update_detect import detect_and_average, flag, robust_z, upload_scores
from strategies.row_robust import (hierarchical_clip, row_krum, row_median, row_norm_bound, row_trimmed_mean,
                                   top_rows)
from strategies.update_batch import RowUpdates, UpdateBatch, weighted_mean

N_ROWS, DIM = 7, 3


def make_batch(seed=0, users=9, density=0.5, weights=None):
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(N_ROWS, DIM)).astype(np.float32)
    touched = rng.random((users, N_ROWS)) < density
    touched[0, 0] = True  # at least one entry
    deltas = (rng.normal(size=(users, N_ROWS, DIM)) * touched[..., None]).astype(np.float32)
    ru = RowUpdates.from_dense(base[None] + deltas, base)
    w = np.ones(users) if weights is None else np.asarray(weights, float)
    return UpdateBatch({}, np.arange(users), np.zeros(users, int), w, rows={"item": ru}), base, deltas, touched


def reference(base, deltas, touched, weights, stat):
    """Row by row: global + stat(the touching users' deltas) x (their weight / all weight)."""
    out = base.astype(np.float64).copy()
    for r in range(N_ROWS):
        who = np.flatnonzero(touched[:, r])
        if len(who):
            out[r] += stat(deltas[who, r].astype(np.float64)) * weights[who].sum() / weights.sum()
    return out


def trimmed(x, beta):
    k = int(np.floor(beta * len(x)))
    s = np.sort(x, axis=0)
    return s[k:len(x) - k].mean(0)


def krum(x, f):
    c = len(x)
    if c < 2 * f + 3:
        return np.median(x, axis=0)
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    scores = [np.sort(np.delete(d[i], i))[:c - f - 2].sum() for i in range(c)]
    return x[int(np.argmin(scores))]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.25, 0.4])
def test_row_trimmed_mean_matches_numpy(seed, beta):
    batch, base, deltas, touched = make_batch(seed, users=12, weights=np.arange(1, 13))
    got = row_trimmed_mean(batch, beta)["item"]
    np.testing.assert_allclose(got, reference(base, deltas, touched, batch.weights, lambda x: trimmed(x, beta)),
                               rtol=1e-5, atol=1e-6)


def test_trimmed_mean_without_trim_is_fedavg():
    """The scale fix: beta = 0 with uniform weights is FedAvg's mean exactly."""
    batch, *_ = make_batch(3, users=15)
    np.testing.assert_allclose(row_trimmed_mean(batch, 0.0)["item"], weighted_mean(batch)["item"], atol=1e-6)


@pytest.mark.parametrize("seed", [0, 4])
def test_row_median_scaled_matches_numpy(seed):
    batch, base, deltas, touched = make_batch(seed, users=10)
    got = row_median(batch)["item"]
    np.testing.assert_allclose(got, reference(base, deltas, touched, batch.weights, lambda x: np.median(x, 0)),
                               rtol=1e-5, atol=1e-6)
    unscaled = row_median(batch, rescale=False)["item"]
    for r in range(N_ROWS):
        who = np.flatnonzero(touched[:, r])
        if len(who):
            np.testing.assert_allclose(unscaled[r], base[r] + np.median(deltas[who, r], 0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 5])
@pytest.mark.parametrize("f", [0, 1, 2])
def test_row_krum_matches_numpy(seed, f):
    batch, base, deltas, touched = make_batch(seed, users=16, density=0.7)
    got = row_krum(batch, f)["item"]
    np.testing.assert_allclose(got, reference(base, deltas, touched, batch.weights, lambda x: krum(x, f)),
                               rtol=1e-5, atol=1e-6)


def test_row_krum_ignores_a_far_outlier():
    batch, base, deltas, touched = make_batch(7, users=12, density=1.0)
    deltas = deltas.copy()
    deltas[0, 2] = 1000.0
    batch.rows["item"] = RowUpdates.from_dense(base[None] + deltas, base)
    got = row_krum(batch, 1)["item"]
    assert np.abs(got[2] - base[2]).max() < 10


def test_row_norm_bound_matches_numpy():
    batch, base, deltas, touched = make_batch(2, users=11)
    norms = np.linalg.norm(deltas.astype(np.float64), axis=-1)
    bound = 1.5 * np.median(norms[touched])
    clipped = deltas * np.minimum(1, bound / np.maximum(norms, 1e-300))[..., None]
    stats = {}
    got = row_norm_bound(batch, 1.5, stats=stats)["item"]
    np.testing.assert_allclose(got, base + clipped.mean(0), rtol=1e-5, atol=1e-6)
    assert stats["clipped-rows"] == int((norms[touched] > bound).sum())


def test_hierarchical_clip_matches_numpy():
    batch, base, deltas, touched = make_batch(6, users=10, density=0.8)
    d = deltas.astype(np.float64).copy()
    norms = np.linalg.norm(d, axis=-1)
    # 1. keep each user's 3 largest rows
    keep = np.zeros_like(touched)
    for u in range(len(d)):
        idx = np.flatnonzero(touched[u])
        keep[u, idx[np.argsort(-norms[u, idx], kind="stable")[:3]]] = True
    d *= keep[..., None]
    norms = np.linalg.norm(d, axis=-1)
    # 2. rows to 2 x their median norm
    rb = 2.0 * np.median(norms[keep])
    d *= np.minimum(1, rb / np.maximum(norms, 1e-300))[..., None]
    # 3. users to 1.5 x their median norm
    un = np.linalg.norm(d.reshape(len(d), -1), axis=1)
    ub = 1.5 * np.median(un[un > 0])
    d *= np.minimum(1, ub / np.maximum(un, 1e-300))[:, None, None]
    got = hierarchical_clip(batch, 2.0, 1.5, keep_rows=3)["item"]
    np.testing.assert_allclose(got, base + d.mean(0), rtol=1e-5, atol=1e-6)


def test_top_rows_keeps_increasing_rows_and_empty_users():
    batch, base, deltas, touched = make_batch(8, users=6)
    touched[3] = False
    deltas[3] = 0
    ru = RowUpdates.from_dense(base[None] + deltas, base)
    kept = top_rows(ru, 2)
    assert kept.counts.tolist() == np.minimum(touched.sum(1), 2).tolist()
    for u in range(len(kept)):
        r = kept.rows[kept.offsets[u]:kept.offsets[u + 1]]
        assert (np.diff(r) > 0).all()


def test_row_rules_refuse_dense_tables():
    batch, *_ = make_batch(0)
    batch.arrays = {"dense": np.zeros((len(batch), 2), np.float32)}
    for rule in (lambda b: row_trimmed_mean(b, 0.1), lambda b: row_krum(b, 1), lambda b: row_norm_bound(b, 2.0),
                 lambda b: hierarchical_clip(b, 2.0, 2.0), row_median):
        with pytest.raises(ValueError, match="dense global tables"):
            rule(batch)


# ------------------------------------------------------------------------------------------- detection
def test_robust_z_matches_numpy():
    x = np.array([1.0, 2.0, 2.5, 3.0, 10.0])
    med = 2.5
    mad = np.median(np.abs(x - med))
    np.testing.assert_allclose(robust_z(x), (x - med) / (1.4826 * mad))


def test_update_detect_flags_scaled_uploads_and_averages_the_rest():
    batch, base, deltas, touched = make_batch(9, users=20, density=0.6)
    deltas = deltas.copy()
    bad = np.array([3, 11])
    deltas[bad] *= 50.0
    batch.rows["item"] = RowUpdates.from_dense(base[None] + deltas, base)
    scores = upload_scores(batch, {})
    # the score by hand: the larger robust z of log norm and log largest row norm
    norm = np.linalg.norm(deltas.reshape(20, -1).astype(np.float64), axis=1)
    row_norms = np.linalg.norm(deltas.astype(np.float64), axis=-1)
    max_row = row_norms.max(1)
    med_row = np.array([np.median(row_norms[u][touched[u]]) if touched[u].any() else 0.0 for u in range(20)])
    want = np.maximum.reduce([robust_z(np.log(x + 1e-30)) for x in (norm, max_row, med_row)])
    np.testing.assert_allclose(scores, want, rtol=1e-6)
    out, scores, flagged = detect_and_average(batch, {}, 3.5, 0.2)
    assert set(np.flatnonzero(flagged)) == set(bad.tolist())
    keep = ~flagged
    np.testing.assert_allclose(out["item"], base + deltas[keep].astype(np.float64).mean(0), rtol=1e-5, atol=1e-6)


def test_update_detect_dense_tables_use_the_base():
    rng = np.random.default_rng(0)
    base = {"w": rng.normal(size=(4, 3)).astype(np.float32)}
    d = rng.normal(size=(12, 4, 3)).astype(np.float32) * 0.1
    d[5] *= 100
    batch = UpdateBatch({"w": base["w"][None] + d}, np.arange(12), np.zeros(12, int), np.ones(12))
    scores = upload_scores(batch, base)
    assert int(np.argmax(scores)) == 5
    np.testing.assert_allclose(scores, robust_z(np.log(np.linalg.norm(d.reshape(12, -1).astype(np.float64), axis=1) + 1e-30)),
                               rtol=1e-4)


def test_update_detect_reads_dense_item_arrays_row_by_row():
    """A DiffRec-like upload: a dense (n_items, h) output layer every genuine user changes everywhere; the
    attackers change few rows by much (FedRecAttack's kappa item slices). Their whole norm is typical, their
    rows are not; the features equal a numpy loop over the item rows."""
    from fedrec.defenses.update_detect import item_row_arrays

    rng = np.random.default_rng(1)
    n_items, users = 30, 16
    base = {"out.weight": rng.normal(size=(n_items, 5)).astype(np.float32),
            "out.bias": rng.normal(size=(n_items,)).astype(np.float32),
            "hidden.weight": rng.normal(size=(5, 7)).astype(np.float32)}
    d = {k: (rng.normal(size=(users, *v.shape)) * 0.1).astype(np.float32) for k, v in base.items()}
    bad = np.array([2, 9])
    for u in bad:
        for k in d:
            d[k][u] = 0.0
        rows = rng.choice(n_items, 3, replace=False)
        d["out.weight"][u, rows] = 0.1 * np.sqrt(n_items) / np.sqrt(3)  # the same whole norm, on 3 rows
    batch = UpdateBatch({k: base[k][None] + d[k] for k in base}, np.arange(users), np.zeros(users, int),
                        np.ones(users))
    rows = item_row_arrays(batch, base, n_items)
    assert rows == {"out.weight", "out.bias"}
    scores = upload_scores(batch, base, rows)
    norm = np.sqrt(sum((d[k].reshape(users, -1).astype(np.float64) ** 2).sum(1) for k in d))
    feats = []
    for k in sorted(rows):
        r = np.abs(d[k].astype(np.float64)) if d[k].ndim == 2 else np.linalg.norm(d[k].astype(np.float64), axis=-1)
        feats.append((r.max(1), np.array([np.median(x[x > 0]) if (x > 0).any() else 0.0 for x in r])))
    max_row = np.maximum(feats[0][0], feats[1][0])
    med_row = np.maximum(feats[0][1], feats[1][1])
    want = np.maximum.reduce([robust_z(np.log(x + 1e-30)) for x in (norm, max_row, med_row)])
    np.testing.assert_allclose(scores, want, rtol=1e-5)
    flagged = flag(scores, 3.5, 0.2)
    assert set(np.flatnonzero(flagged)) == set(bad.tolist())
    assert not flag(upload_scores(batch, base), 3.5, 0.2)[bad].all()  # by the whole norm alone: not both


def test_flag_caps_the_dropped_share():
    scores = np.array([10.0, 9.0, 8.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    assert flag(scores, 1.0, 0.2).tolist() == [True, True] + [False] * 8
    assert flag(scores, 1.0, 0.5).sum() == 3
