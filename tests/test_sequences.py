"""Sequences (issue 9, point 5): time-ordered user sequences, padded batches, next-item evaluation,
and the SASRec-lite baseline through the trainer and every federation mode."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from fedrec.data.sequences import Sequences
from fedrec.data.splits import split_interactions
from fedrec.errors import ConfigError, DataError
from fedrec.models.base import Batch, Recommender
from tests.conftest import need_shared
from tests.test_strategies import task_identity  # noqa: F401  (autouse fixture: Message() needs it)

SEQ = ["dataset.split.method=loo"]  # next-item evaluation: one valid and one test item per user


# ----------------------------------------------------------------------------- building sequences


def test_split_keeps_time_order_ties_by_input_row_and_leave_one_out_targets():
    users = np.array([0, 0, 0, 0, 1, 1, 1, 2])
    items = np.array([3, 1, 2, 0, 4, 2, 1, 5])
    ts = np.array([5, 1, 1, 9, 2, 2, 1, 7])
    s = split_interactions(users, items, ts, 3, 6, "loo")
    # user 0: 1 (t1, row 1), 2 (t1, row 2), 3 (t5), 0 (t9); user 1: 1 (t1), 4 (t2, row 4), 2 (t2, row 5)
    assert [s.train_seq.user(u).tolist() for u in range(3)] == [[1, 2], [1], [5]]
    assert [s.valid_seq.user(u).tolist() for u in range(3)] == [[3], [4], []]
    assert [s.test[u].indices.tolist() for u in range(3)] == [[0], [2], []]
    assert [s.valid[u].indices.tolist() for u in range(3)] == [[3], [4], []]
    # the sequences hold exactly the matrices' items
    for u in range(3):
        assert sorted(s.train_seq.user(u).tolist()) == s.train[u].indices.tolist()


def test_split_without_timestamps_keeps_input_order():
    users = np.array([1, 0, 1, 0, 1, 0, 1])
    items = np.array([4, 2, 0, 3, 3, 1, 2])
    s = split_interactions(users, items, None, 2, 5, "ratio", [1.0, 0.0, 0.0])
    assert s.train_seq.user(0).tolist() == [2, 3, 1]
    assert s.train_seq.user(1).tolist() == [4, 0, 3, 2]


def test_synthetic_data_has_sequences_in_timestamp_order(tiny_cfg):
    from fedrec.data import load_dataset

    data = load_dataset(tiny_cfg(*SEQ).dataset, 0)
    ts, train = data.train_timestamps, data.train
    for u in range(data.n_users):
        row = slice(train.indptr[u], train.indptr[u + 1])
        by_time = train.indices[row][np.argsort(ts[row], kind="stable")]
        assert data.train_seq.user(u).tolist() == by_time.tolist()
    assert (data.valid_seq.lengths == 1).all() and data.test.nnz == data.n_users


def test_padded_subset_and_concatenation():
    seqs = Sequences.from_sorted(np.array([0, 0, 0, 1, 2, 2, 2, 2]), np.array([5, 6, 7, 8, 1, 2, 3, 4]), 4)
    got = seqs.padded(np.array([2, 0, 1, 3]), 3, pad=9).tolist()
    assert got == [[2, 3, 4], [5, 6, 7], [9, 9, 8], [9, 9, 9]]  # last 3 items, left-padded
    assert seqs.padded(np.array([2]), 3, pad=9, keep=2).tolist() == [[9, 3, 4]]
    sub = seqs.subset(np.array([2, 1]))
    assert [sub.user(0).tolist(), sub.user(1).tolist()] == [[1, 2, 3, 4], [8]]
    more = Sequences.from_sorted(np.array([1, 3, 3]), np.array([0, 6, 5]), 4)
    both = seqs.then(more)
    assert [both.user(u).tolist() for u in range(4)] == [[5, 6, 7], [8, 0], [1, 2, 3, 4], [6, 5]]


def _seq_cfg(tmp_path, text: str, **extra):
    from omegaconf import OmegaConf

    (tmp_path / "s.txt").write_text(text)
    return OmegaConf.create({"name": "s", "kind": "sequence", "path": str(tmp_path), "file": "s.txt",
                             "rating_threshold": None, "min_user_interactions": 1,
                             "split": {"method": "loo", "ratios": [0.8, 0.1, 0.1]}, **extra})


def test_sequence_file_leave_one_out_with_zero_based_ids(tmp_path):
    from fedrec.data import load_dataset

    data = load_dataset(_seq_cfg(tmp_path, "1 1 2 3 4\n2 4 3\n3 2\n"), 0)
    assert data.item_ids.tolist() == ["1", "2", "3", "4"]  # file id k -> internal k - 1
    assert data.train_seq.user(0).tolist() == [0, 1]
    assert data.valid[0].indices.tolist() == [2] and data.test[0].indices.tolist() == [3]
    assert data.train_seq.user(1).tolist() == [3] and data.valid[1].nnz == 0 and data.test[1].indices.tolist() == [2]
    assert data.train_seq.user(2).tolist() == [1] and data.test[2].nnz == 0
    assert data.input_sequences("test").user(0).tolist() == [0, 1, 2]


@pytest.mark.parametrize("text,message", [
    ("1 1 2\n2 x 3\n", r"s\.txt: line 2: item id 'x'"),
    ("1 1 2\n\n2 0 3\n", r"s\.txt: line 3: item id '0' is not an integer >= 1"),
    ("1 1 2\n2\n", r"s\.txt: line 2: expected a user id and at least one item"),
    ("1 1 2\n2 3\n1 4\n", r"s\.txt: line 3: user '1' already has a line \(line 1\)"),
])
def test_sequence_file_bad_lines(tmp_path, text, message):
    from fedrec.data import load_dataset

    with pytest.raises(DataError, match=message):
        load_dataset(_seq_cfg(tmp_path, text), 0)


def test_sequence_file_needs_loo(tmp_path):
    from fedrec.data import load_dataset

    cfg = _seq_cfg(tmp_path, "1 1 2 3\n")
    cfg.split.method = "ratio"
    with pytest.raises(ConfigError, match="dataset.split.method='ratio'"):
        load_dataset(cfg, 0)


def test_beauty_counts_from_the_data_readme():
    from omegaconf import OmegaConf

    from fedrec.data import load_dataset

    need_shared("seq/beauty.txt")
    from tests.conftest import REPO

    data = load_dataset(OmegaConf.load(REPO / "conf" / "dataset" / "seq-beauty.yaml"), 0)
    assert (data.n_users, data.n_items) == (22363, 12101)
    assert data.train.nnz + data.valid.nnz + data.test.nnz == 198502
    assert data.valid.nnz == data.test.nnz == 22363  # every user has >= 5 items: one valid, one test each
    with open(need_shared("seq/beauty.txt")) as fh:
        first = fh.readline().split()
    user = int(np.flatnonzero(data.user_ids == first[0])[0])
    ids = [int(t) - 1 for t in first[1:]]  # 1-based file ids, every id present: internal = id - 1
    assert data.train_seq.user(user).tolist() == ids[:-2]
    assert data.valid[user].indices.tolist() == [ids[-2]] and data.test[user].indices.tolist() == [ids[-1]]


# ----------------------------------------------------------------------------- next-item metrics


class LastItemScores(Recommender):
    """Scores = a fixed table row of the last item of ``Batch.seq``: valid and test inputs differ."""

    name = "last_item"
    input_kind = "sequence"

    def __init__(self, table: np.ndarray, max_len: int):
        super().__init__()
        self.table, self.max_len, self.n_items = torch.from_numpy(table), max_len, table.shape[1]

    def scores(self, batch: Batch) -> torch.Tensor:
        return self.table[batch.seq[:, -1]]


def test_next_item_metrics_match_numpy_with_seen_items_masked(tmp_path):
    from fedrec.data import load_dataset
    from fedrec.eval import evaluate_model

    rng = np.random.default_rng(3)
    lines = [" ".join(map(str, [u + 1, *(rng.permutation(12)[:rng.integers(3, 8)] + 1)])) for u in range(9)]
    data = load_dataset(_seq_cfg(tmp_path, "\n".join(lines) + "\n"), 0)
    n = data.n_items
    table = rng.random((n + 1, n))
    # every user's own history items score highest: unmasked they would fill the top ranks
    for u in range(data.n_users):
        hist = data.input_sequences("test").user(u)
        table[hist[-1], hist] += 10.0
        table[data.train_seq.user(u)[-1], data.train_seq.user(u)] += 10.0
    ks = [1, 3, 5]
    out = evaluate_model(LastItemScores(table, 4), data, ks, batch_size=4)
    for split in ("valid", "test"):
        hr, ndcg = {k: [] for k in ks}, {k: [] for k in ks}
        for u in range(data.n_users):
            seq = data.input_sequences(split).user(u)
            target = getattr(data, split)[u].indices
            assert len(target) == 1
            s = table[seq[-1]].copy()
            s[seq] = -np.inf
            rank = int((s > s[target[0]]).sum())
            for k in ks:
                hr[k].append(float(rank < k))
                ndcg[k].append(1.0 / math.log2(rank + 2) if rank < k else 0.0)
        for k in ks:
            assert out[split][f"hr@{k}"] == pytest.approx(np.mean(hr[k]))
            assert out[split][f"ndcg@{k}"] == pytest.approx(np.mean(ndcg[k]), rel=1e-6)
        assert out["_sums"][split]["users"] == data.n_users
    assert out["valid"]["hr@5"] > 0  # the reference is not trivially zero


# ----------------------------------------------------------------------------- the baseline model


def _model(n_items=30, **kw):
    from fedrec.models import DataShape, build_model

    return build_model({"name": "sasrec_lite", "hidden_dim": 8, "max_len": 6, "dropout": 0.3, **kw},
                       DataShape(n_users=5, n_items=n_items))


def test_sasrec_loss_is_per_user_mean_over_positions_and_ignores_padding():
    torch.manual_seed(0)
    m = _model(dropout=0.0).eval()
    pad = 30
    seq = torch.tensor([[pad, pad, pad, 4, 7, 9], [1, 2, 3, 4, 5, 6], [pad, pad, pad, pad, pad, 3]])
    loss = m.loss(Batch(users=torch.arange(3), x=torch.zeros(3, 30), seq=seq))
    loss = loss.detach()
    assert loss.shape == (3,) and float(loss[2]) == 0.0  # one item: nothing to predict
    # user 0 = mean CE of predicting 7 from [4] and 9 from [4, 7], the padding does not change it
    short = torch.tensor([[4, 7, 9]])
    h = m.hidden(short[:, :-1])
    ce = torch.nn.functional.cross_entropy(m._logits(h)[0], short[0, 1:]).detach()
    assert float(loss[0]) == pytest.approx(float(ce), rel=1e-5)
    # the vmappable path (explicit draws: every position, padding weighted 0) gives the same losses
    ones = {"keep": torch.ones(3, m._n_sites(), seq.shape[1], m.item_emb.embedding_dim)}
    dense = m.loss(Batch(users=torch.arange(3), x=torch.zeros(3, 30), seq=seq, rand=ones)).detach()
    torch.testing.assert_close(dense, loss)


def test_sasrec_vectorised_users_equal_independent_users():
    """draw_randomness makes a user's local steps the same alone or vmapped with others."""
    from fedrec.federated.cross_device import LocalTraining, train_users
    from fedrec.rng import UserRandom

    torch.manual_seed(1)
    model = _model()
    users = np.array([0, 3, 4])
    seq = torch.tensor([[30, 30, 1, 2, 3, 4], [5, 6, 7, 8, 9, 10], [30, 30, 30, 30, 11, 12]])
    rows = torch.zeros(3, 30)
    # SGD: Adam would amplify float noise in gradients that are exactly zero in theory (the key bias,
    # to which softmax is invariant) into +-lr steps
    local = LocalTraining(optimizer="sgd", lr=0.5, local_epochs=2)
    got = train_users(model, users, rows, torch.ones(3), {}, local, seed=7, round_=2, per_user=True, seq=seq)
    for i, u in enumerate(users):
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        for step in range(2):
            b = Batch(users=torch.tensor([0]), x=rows[i:i + 1], seq=seq[i:i + 1])
            b.rand = m.draw_randomness(b, UserRandom(7, 2, np.array([u]), step))
            opt.zero_grad()
            m.loss(b).sum().backward()
            opt.step()
        for n, p in m.named_parameters():
            torch.testing.assert_close(got.per_user[n][i], p.detach(), rtol=1e-4, atol=1e-6)
    assert not torch.equal(got.per_user["item_emb.weight"][0], got.per_user["item_emb.weight"][1])


def _tiny_seq_cfg(tiny_cfg, *overrides):
    return tiny_cfg(*SEQ, *overrides, model="sasrec_lite")


def test_sasrec_central_smoke(tiny_cfg, tmp_path):
    from fedrec.experiment import execute

    summary = execute(_tiny_seq_cfg(tiny_cfg, "federation=none", "train.epochs=2"), tmp_path / "run", progress=False)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and lines[1]["train"]["loss"] < lines[0]["train"]["loss"]
    for split in ("valid", "test"):
        assert 0.0 <= summary[split]["ndcg@10"] <= summary[split]["hr@10"] <= summary[split]["hr@20"] <= 1.0


def _serve(cfg, tmp_path):
    from fedrec.data import load_dataset
    from fedrec.federated.server_app import serve
    from fedrec.federated.validation import check_run
    from fedrec.models import build_model, data_shape
    from fedrec.recorder import Recorder
    from fedrec.runs import RunFolder
    from tests.inprocess_grid import InProcessGrid

    data = load_dataset(cfg.dataset, int(cfg.seed))
    check_run(cfg, data, build_model(cfg.model, data_shape(data)))
    run = RunFolder(tmp_path / "run")
    run.write_config(cfg)
    serve(InProcessGrid(int(cfg.federation.num_nodes), state_dir=tmp_path / "nodes"), cfg, data,
          Recorder(run, "recall@20"))
    return [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("mode,extra", [
    ("silo", []),
    ("device", ["train.local_epochs=2", "federation.local_optimizer=adam", "federation.local_lr=0.01"]),  # vmap path
    ("device", ["federation.max_user_interactions=4"]),  # one-step SGD sum path, capped sequences
])
def test_sasrec_federated_smoke(tiny_cfg, tmp_path, mode, extra):
    """The sequence baseline trains and is evaluated next-item through the real serve + ClientApp."""
    lines = _serve(_tiny_seq_cfg(tiny_cfg, f"federation={mode}", "federation.num_nodes=2", "federation.rounds=2",
                                 *extra), tmp_path)
    assert [x["round"] for x in lines] == [1, 2]
    for x in lines:
        assert math.isfinite(x["train"]["train-loss"]) and x["train"]["train-loss"] > 0
        for split in ("valid", "test"):
            assert 0.0 <= x[split]["ndcg@10"] <= x[split]["hr@10"] <= 1.0
    assert lines[0]["valid"] != lines[1]["valid"] or lines[0]["test"] != lines[1]["test"]  # the model moved


def test_sequence_model_rejects_dpsgd_and_unordered_data(tiny_cfg):
    from fedrec.data import load_dataset
    from fedrec.federated.validation import check_run
    from fedrec.models import build_model, data_shape

    cfg = _tiny_seq_cfg(tiny_cfg, "federation=none", "privacy=dpsgd", "privacy.noise_multiplier=1.0")
    data = load_dataset(cfg.dataset, 0)
    model = build_model(cfg.model, data_shape(data))
    with pytest.raises(ConfigError, match="privacy=dpsgd"):
        check_run(cfg, data, model)
    data.train_seq = None
    with pytest.raises(ConfigError, match="needs time-ordered interactions"):
        check_run(_tiny_seq_cfg(tiny_cfg, "federation=none"), data, model)
