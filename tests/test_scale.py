"""bench scale's pieces: chunk-by-chunk rows equal the dense round, the synthetic data, the FLOP count."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedrec.config import compose
from fedrec.data.interactions import Interactions
from fedrec.federated import device_node
from fedrec.federated.device_node import ChunkedRows, cap_rows, device_round, row_sums
from fedrec.models import build_model, data_shape
from simulations.scale import ml1m_like


def _data(n_users=60, n_items=40):
    import scipy.sparse as sp

    train = ml1m_like(n_users, n_items, seed=3)
    empty = sp.csr_matrix((n_users, n_items), dtype=np.float32)
    return Interactions(name="t", train=train, valid=empty, test=empty, user_ids=np.arange(n_users),
                        item_ids=np.arange(n_items))


def test_ml1m_like_is_binary_with_the_requested_shape_and_skew():
    m = ml1m_like(3000, 500, seed=0, block=700)  # several blocks
    assert m.shape == (3000, 500) and set(np.unique(m.data)) == {1.0}
    counts = np.diff(m.indptr)
    assert counts.min() >= 1 and 30 < counts.mean() < 80  # log-normal mean 68, minus merged duplicates
    pop = np.asarray(m.sum(0)).ravel()
    assert pop[:10].mean() > 5 * pop[-100:].mean()  # the popular head


@pytest.mark.parametrize("over", [[], ["federation.max_user_interactions=5", "federation.weighting=interactions"],
                                  ["federation.local_optimizer=adam", "train.local_epochs=2"]])
def test_chunked_rows_give_the_dense_round(monkeypatch, over):
    data = _data()
    cfg = compose(["model=diffrec", "model.dims=[8]", "model.steps=5", "federation=device", "federation.num_nodes=1",
                   "federation.chunk_size=7", *over])
    replies = []
    for share in (1e9, 0.0):  # everything dense / always chunked
        monkeypatch.setattr(device_node, "DENSE_ROWS_SHARE", share)
        torch.manual_seed(0)
        model = build_model(cfg.model, data_shape(data))
        out = device_round(model, cfg, data, np.arange(data.n_users), {}, 1, 0.7, per_user=False)
        replies.append(out.reply)
    a, b = (r["arrays"].to_torch_state_dict() for r in replies)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)
    assert replies[0]["metrics"]["trained-users"] == replies[1]["metrics"]["trained-users"] > 0


def test_chunked_rows_slices_and_sums_match_the_dense_rows():
    data = _data()
    users = np.arange(5, 50, 3)
    dense = cap_rows(torch.from_numpy(data.train[users].toarray()), users, 6, 0, 2)
    lazy = ChunkedRows(data.train, users, "cpu", 6, 0, 2)
    assert lazy.shape == tuple(dense.shape) and len(lazy) == len(users)
    torch.testing.assert_close(torch.cat([lazy[0:4], lazy[4:9], lazy[9:]]), dense)
    torch.testing.assert_close(row_sums(lazy), dense.sum(1))
    with pytest.raises(TypeError):
        lazy[np.array([1, 2])]


def test_denoiser_flops_counted_from_the_layer_sizes():
    from simulations.bench import denoiser_flops

    fwd, both = denoiser_flops(100, [20, 60], 10)
    layers = [(110, 60), (60, 20), (20, 60), (60, 100), (10, 10)]
    assert fwd == sum(2 * a * b for a, b in layers)
    # backward: every weight gradient, plus input gradients of all but the first layer and the embedding
    assert both == 2 * fwd + sum(2 * a * b for a, b in layers[1:-1])
