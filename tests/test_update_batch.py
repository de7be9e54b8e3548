"""The update batch's rules on row-sparse tables against numpy on the dense (U, n_rows, ...) stacks (issue 9.2)."""

from __future__ import annotations

import numpy as np
import pytest

from strategies.update_batch import RowUpdates, UpdateBatch, coordinate_median, row_median, weighted_mean


def _sparse(rng, n_users, n_rows, tail, density=0.2, zero_share=0.0, base=None):
    """A random row-sparse table: (RowUpdates, the dense (U, n_rows, *tail) deltas it encodes, touched (U, n_rows))."""
    base = rng.standard_normal((n_rows, *tail)).astype(np.float32) if base is None else base
    touched = rng.random((n_users, n_rows)) < density
    touched[:, 1] = True  # one row every user touched
    touched[:, 2] = False  # one row nobody touched
    dense = np.zeros((n_users, n_rows, *tail), np.float32)
    users, rows = np.nonzero(touched)
    values = rng.standard_normal((len(rows), *tail)).astype(np.float32)
    values[rng.random(len(rows)) < zero_share] = 0.0  # a touched row whose delta came out 0 (and ties with zeros)
    dense[users, rows] = values
    offsets = np.concatenate([[0], np.cumsum(touched.sum(1))]).astype(np.int64)
    return RowUpdates(base, offsets, rows.astype(np.int64), values), dense, touched


def _batch(rng, n_users, weights=None, **kw):
    """A batch with one dense and one row-sparse table; returns it, the sparse table's dense updated
    stack (U, 13, 3) and which rows each user touched."""
    ru, dense, touched = _sparse(rng, n_users, 13, (3,), **kw)
    arrays = {"enc.weight": rng.standard_normal((n_users, 4, 2)).astype(np.float32)}
    w = np.ones(n_users) if weights is None else weights
    batch = UpdateBatch(arrays, np.arange(n_users), np.zeros(n_users, int), w, rows={"item_emb.weight": ru})
    return batch, ru.base[None] + dense, touched


@pytest.mark.parametrize("n_users", [1, 2, 7, 8])
def test_weighted_mean_of_touched_rows_equals_the_dense_mean(n_users):
    rng = np.random.default_rng(n_users)
    w = rng.uniform(0.5, 4.0, n_users)
    batch, full, _ = _batch(rng, n_users, weights=w)
    got = weighted_mean(batch)
    want = np.tensordot(w / w.sum(), full.astype(np.float64), axes=1)
    np.testing.assert_allclose(got["item_emb.weight"], want, rtol=1e-6, atol=1e-7)
    assert got["item_emb.weight"].dtype == np.float32
    np.testing.assert_allclose(got["enc.weight"], np.tensordot(w / w.sum(), batch.arrays["enc.weight"], axes=1),
                               rtol=1e-6)


def test_weighted_mean_over_kept_users_ignores_the_others_even_nan():
    rng = np.random.default_rng(5)
    w = rng.uniform(0.5, 4.0, 11)
    batch, full, _ = _batch(rng, 11, weights=w)
    keep = np.ones(11, bool)
    keep[[2, 7]] = False
    batch.arrays["enc.weight"][2] = np.nan  # a dropped user's diverged upload must not reach the mean
    got = weighted_mean(batch, block=3, keep=keep)
    wk = w[keep] / w[keep].sum()
    np.testing.assert_allclose(got["item_emb.weight"], np.tensordot(wk, full[keep].astype(np.float64), axes=1),
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got["enc.weight"], np.tensordot(wk, batch.arrays["enc.weight"][keep], axes=1), rtol=1e-6)


@pytest.mark.parametrize("n_users,zero_share", [(1, 0.0), (2, 0.0), (7, 0.3), (8, 0.3), (40, 0.0)])
def test_coordinate_median_counts_untouched_rows_as_unchanged(n_users, zero_share):
    """The median over every user, untouched rows as the global row: numpy's median of the dense stack."""
    rng = np.random.default_rng(10 + n_users)
    batch, full, _ = _batch(rng, n_users, zero_share=zero_share)
    got = coordinate_median(batch)
    np.testing.assert_allclose(got["item_emb.weight"], np.median(full, axis=0), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got["enc.weight"], np.median(batch.arrays["enc.weight"], axis=0))


@pytest.mark.parametrize("n_users,zero_share", [(1, 0.0), (3, 0.0), (8, 0.3), (40, 0.1)])
def test_row_median_takes_only_the_users_who_touched_the_row(n_users, zero_share):
    rng = np.random.default_rng(20 + n_users)
    batch, full, touched = _batch(rng, n_users, zero_share=zero_share, density=0.3)
    base = batch.rows["item_emb.weight"].base
    got = row_median(batch)["item_emb.weight"]
    for r in range(len(base)):
        who = touched[:, r]
        want = np.median(full[who, r], axis=0) if who.any() else base[r]
        np.testing.assert_allclose(got[r], want, rtol=1e-6, atol=1e-6, err_msg=f"row {r}")
    assert not touched[:, 0].all() or n_users == 1  # some row has fewer touchers than users ...
    if n_users > 2:  # ... so the two readings differ
        assert not np.allclose(got, coordinate_median(batch)["item_emb.weight"])


def test_concat_shifts_offsets_and_sparsifies_a_dense_part():
    rng = np.random.default_rng(3)
    a, full_a, _ = _batch(rng, 4)
    b, full_b, _ = _batch(rng, 5, base=a.rows["item_emb.weight"].base)  # one round: one global table
    # node b sent full arrays for the table (federation.sparse_rows=off there)
    b_dense = UpdateBatch(b.arrays | {"item_emb.weight": full_b}, b.users + 4, np.ones(5, int), b.weights)
    both = UpdateBatch.concat([a, b_dense])
    assert set(both.arrays) == {"enc.weight"} and len(both.rows["item_emb.weight"]) == 9
    full = np.concatenate([full_a, full_b])
    np.testing.assert_allclose(weighted_mean(both)["item_emb.weight"], full.astype(np.float64).mean(0),
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(coordinate_median(both)["item_emb.weight"], np.median(full, axis=0),
                               rtol=1e-6, atol=1e-6)
    sparse_both, made = UpdateBatch.concat([a, b]).rows["item_emb.weight"], both.rows["item_emb.weight"]
    np.testing.assert_array_equal(sparse_both.offsets, made.offsets)
    np.testing.assert_array_equal(sparse_both.rows, made.rows)
    # (base + delta) - base in float32: the delta up to one rounding
    np.testing.assert_allclose(sparse_both.values, made.values, rtol=1e-6, atol=1e-6)


def test_select_keeps_the_chosen_users_entries():
    rng = np.random.default_rng(4)
    ru, dense, _ = _sparse(rng, 6, 9, (2,))
    keep = np.array([True, False, True, True, False, True])
    kept = ru.select(keep)
    assert len(kept) == 4
    redone = np.zeros((4, 9, 2), np.float32)
    redone[kept.entry_users(), kept.rows] = kept.values
    np.testing.assert_array_equal(redone, dense[keep])


@pytest.mark.parametrize("n_users,bound", [(1, 0.5), (7, 1.0), (40, 2.0)])
def test_row_clip_sum_is_the_sum_of_row_clipped_deltas(n_users, bound):
    """FedRecAttack's server rule against numpy on the dense stack: each user's row clipped to ``bound``,
    summed over users (not averaged), added to the global table; untouched rows unchanged."""
    from strategies.update_batch import row_clip_sum

    rng = np.random.default_rng(30 + n_users)
    ru, dense, touched = _sparse(rng, n_users, 13, (3,))
    batch = UpdateBatch({}, np.arange(n_users), np.zeros(n_users, int), rng.uniform(1, 3, n_users),
                        rows={"item_emb.weight": ru})
    norms = np.linalg.norm(dense.astype(np.float64), axis=-1, keepdims=True)
    clipped = dense * np.minimum(1.0, bound / np.maximum(norms, 1e-30))
    want = ru.base + clipped.sum(0)
    got = row_clip_sum(batch, bound)["item_emb.weight"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got[2], ru.base[2])  # the row nobody touched
    assert (norms > bound).any()  # the case clips something


def test_row_clip_sum_refuses_dense_tables():
    from strategies.update_batch import row_clip_sum

    rng = np.random.default_rng(0)
    batch, _, _ = _batch(rng, 3)
    with pytest.raises(ValueError, match="dense"):
        row_clip_sum(batch, 1.0)
