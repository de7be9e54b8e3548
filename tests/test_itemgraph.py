"""The item-graph diffusion recommenders: G-Diff (fedrec/models/gdiff.py) and DiffKG
(fedrec/models/diffkg.py) against plain numpy / Python re-derivations of their official code
(github.com/crx1729/G-Diff, github.com/HKUDS/DiffKG), the knowledge-graph side data, and their runs:
one centralised epoch, silo (and for G-Diff cross-device) rounds in process, and the refusals."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from fedrec.data.side import ItemCategories, KnowledgeGraph, kg_from_categories, load_kg_file, transition_graph
from fedrec.errors import ConfigError, DataError
from fedrec.models import build_model
from fedrec.models.base import Batch, DataShape
from tests.test_mechanisms import DEVICE_ROUND, SILO_ROUND
from tests.test_strategies import task_identity  # noqa: F401  (autouse fixture: Message() needs it)

N_USERS, N_ITEMS = 12, 9


def _train(seed: int = 0) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    x = (rng.random((N_USERS, N_ITEMS)) < 0.35).astype(np.float32)
    x[np.arange(N_USERS), rng.integers(0, N_ITEMS, N_USERS)] = 1.0  # nobody empty
    return sp.csr_matrix(x)


def _sequences(train: sp.csr_matrix, seed: int = 1):
    """Each user's training items in a random 'time' order: (items, indptr)."""
    rng = np.random.default_rng(seed)
    items = np.concatenate([rng.permutation(train[u].indices) for u in range(train.shape[0])])
    return items.astype(np.int64), train.indptr.astype(np.int64)


# ================================================================== G-Diff
def official_graph(items, indptr, n):
    """Official ``get_graph``: transitions item_sep[:-1] -> item_sep[1:], then g.t() @ diag(1/deg)."""
    g = np.zeros((n, n))
    for u in range(len(indptr) - 1):
        seq = items[indptr[u]:indptr[u + 1]]
        for a, b in zip(seq[:-1], seq[1:]):
            g[a, b] += 1
    with np.errstate(divide="ignore"):
        d = 1.0 / g.sum(1)
    d[np.isinf(d)] = 0
    return g, g.T @ np.diag(d)


def test_transition_graph_is_the_official_get_graph():
    train = _train()
    items, indptr = _sequences(train)
    indptr = np.concatenate([indptr, [indptr[-1]]])  # plus a user without items
    g_ref, _ = official_graph(items, indptr, N_ITEMS)
    np.testing.assert_array_equal(transition_graph(items, indptr, N_ITEMS).toarray(), g_ref)


def _gdiff(train, **over):
    items, indptr = _sequences(train)

    def graph(users=None):
        if users is None:
            return transition_graph(items, indptr, N_ITEMS)
        from fedrec.data.sequences import Sequences

        seq = Sequences(indptr, items).subset(users)
        return transition_graph(seq.items, seq.indptr, N_ITEMS)

    shape = DataShape(N_USERS, N_ITEMS, item_transitions_fn=graph)
    torch.manual_seed(0)
    return build_model({"name": "gdiff", "hidden_dims": [7], **over}, shape), items, indptr


def official_gdn(model, x, t, m):
    """Official ``GDN.forward`` (eval mode: no dropout) in numpy, M = g.t() @ diag(1/deg)."""
    den = model.denoiser
    w = {k: v.detach().double().numpy() for k, v in den.state_dict().items()}
    half = den.emb_size // 2
    freqs = np.exp(-np.log(10000) * np.arange(half) / half)
    args = t[:, None] * freqs[None]
    temb = np.concatenate([np.cos(args), np.sin(args)], 1)
    emb = temb @ w["emb_layer.weight"].T + w["emb_layer.bias"]

    def normalize(v):
        return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)

    g = x.copy()
    for _ in range(model.cfg.graph_layers):
        g = normalize((m @ g.T).T + g)
    xx = normalize(g + x)
    h = np.concatenate([xx, emb], 1)
    for i in range(len(den.mlp)):
        h = np.tanh(h @ w[f"mlp.{i}.weight"].T + w[f"mlp.{i}.bias"])
    return h + xx


@pytest.mark.parametrize("layers", [1, 2])
def test_gdn_equals_the_official_forward(layers):
    train = _train()
    model, items, indptr = _gdiff(train, graph_layers=layers)
    model.eval()
    _, m = official_graph(items, indptr, N_ITEMS)
    x = train.toarray().astype(np.float64)
    t = np.array([0, 1] * (N_USERS // 2))
    out = model._denoise()(torch.tensor(x, dtype=torch.float32), torch.tensor(t))
    np.testing.assert_allclose(out.detach().numpy(), official_gdn(model, x, t, m), rtol=1e-4, atol=1e-5)


def test_gdiff_scores_are_the_posterior_mean_chain_and_draws_make_the_loss_deterministic():
    train = _train()
    model, _, _ = _gdiff(train)
    model.eval()
    x = torch.tensor(train.toarray())
    d = model.diffusion
    z = x
    with torch.no_grad():
        for i in reversed(range(d.steps)):  # official p_sample with sampling_noise=False
            t = torch.full((len(x),), i)
            z = d.posterior_coef1[t][:, None] * model._denoise()(z, t) + d.posterior_coef2[t][:, None] * z
    np.testing.assert_allclose(model.scores(Batch(torch.arange(N_USERS), x)).numpy(), z.numpy(), atol=1e-5)

    from fedrec.rng import UserRandom

    model.train()
    b = Batch(torch.arange(N_USERS), x)
    b.rand = model.draw_randomness(b, UserRandom(seed=0, round_=1, users=np.arange(N_USERS), step=0))
    np.testing.assert_array_equal(model.loss(b).detach().numpy(), model.loss(b).detach().numpy())
    assert set(b.rand) == {"t", "noise", "keep0", "keep1", "keep2"}


def test_gdiff_fit_keeps_only_the_shown_users_transitions():
    train = _train()
    model, items, indptr = _gdiff(train)
    full = model.walk_t.clone()
    model.fit(train)
    np.testing.assert_array_equal(model.walk_t.numpy(), full.numpy())  # centrally: the same graph
    own = sp.lil_matrix(train.shape, dtype=np.float32)
    own[:3] = train[:3]
    model.fit(sp.csr_matrix(own))  # a silo node holding users 0-2
    _, m = official_graph(items[:indptr[3]], indptr[:4], N_ITEMS)
    np.testing.assert_allclose(model.walk_t.numpy(), m, atol=1e-7)


def test_gdiff_needs_the_private_graph():
    with pytest.raises(ConfigError, match="dataset.item_graph"):
        build_model({"name": "gdiff"}, DataShape(N_USERS, N_ITEMS))


# ================================================================== knowledge graphs
def test_kg_file_loader_maps_item_tokens_and_names_bad_lines(tmp_path):
    f = tmp_path / "kg.txt"
    f.write_text("# a comment\n10 directed_by alice\n11 directed_by alice\n\n10 starring bob\nalice born_in paris\n"
                 "10 starring bob\n")
    kg = load_kg_file(f, item_ids=np.array(["10", "11", "12"]))
    assert kg.n_items == 3 and list(kg.entities) == ["alice", "bob", "paris"]
    assert list(kg.relations) == ["directed_by", "starring", "born_in"]
    assert sorted(map(tuple, kg.triples.tolist())) == [(0, 0, 3), (0, 1, 4), (1, 0, 3), (3, 2, 5)]
    bad = tmp_path / "bad.txt"
    bad.write_text("10 directed_by alice\n11 alice\n")
    with pytest.raises(DataError, match=r"bad.txt: line 2: expected 'head relation tail'"):
        load_kg_file(bad, item_ids=np.array(["10", "11"]))
    with pytest.raises(DataError, match="not found"):
        load_kg_file(tmp_path / "none.txt", item_ids=np.array(["10"]))


def test_categories_as_a_kg_and_the_dataset_key(tmp_path):
    cats = ItemCategories(sp.csr_matrix(np.array([[1, 0], [1, 1], [0, 1]], dtype=np.float32)), np.array(["a", "b"]))
    kg = kg_from_categories(cats)
    assert kg.n_entities == 5 and kg.triples.tolist() == [[0, 0, 3], [1, 0, 3], [1, 0, 4], [2, 0, 4]]
    from fedrec.data.side import check_side_options

    with pytest.raises(ConfigError, match="dataset.kg_file"):
        check_side_options({"kg_file": 3})


def official_kg_edges(kg: KnowledgeGraph):
    """Official ``readTriplets`` + ``buildGraphs``: unique, inverses r + max(r) + 1, first (h, t) kept."""
    can = np.unique(kg.triples, axis=0)
    inv = can.copy()
    inv[:, 0], inv[:, 2], inv[:, 1] = can[:, 2], can[:, 0], can[:, 1] + can[:, 1].max() + 1
    seen, edges, kg_dict = defaultdict(set), [], defaultdict(list)
    for h, r, t in np.concatenate([can, inv]):
        if t in seen[h]:
            continue
        seen[h].add(t)
        edges.append((h, t, r))
        kg_dict[h].append((r, t))
    return edges, kg_dict


def _kg() -> KnowledgeGraph:
    rng = np.random.default_rng(3)
    cats = ItemCategories(sp.csr_matrix((rng.random((N_ITEMS, 3)) < 0.5).astype(np.float32)), np.array(list("abc")))
    base = kg_from_categories(cats)
    extra = np.array([[0, 1, 1], [2, 1, 5], [N_ITEMS, 1, N_ITEMS + 1]])  # item-item and entity-entity relations
    return KnowledgeGraph(np.unique(np.concatenate([base.triples, extra]), axis=0), N_ITEMS,
                          np.array(["has_category", "related"]), base.entities, "test")


def _diffkg(train, **over):
    from fedrec.data.side import ItemSideData

    torch.manual_seed(0)
    shape = DataShape(N_USERS, N_ITEMS, item_side=ItemSideData(kg=_kg()))
    model = build_model({"name": "diffkg", "embedding_size": 6, "denoiser_dims": [8], "kg_batch_size": 5, **over},
                        shape)
    model.fit(train)
    return model


def test_kg_edges_are_the_official_ones():
    from fedrec.models.diffkg import KGEdges

    kg = _kg()
    edges, _ = official_kg_edges(kg)
    ours = KGEdges.from_kg(kg)
    assert list(zip(ours.head, ours.tail, ours.relation)) == [tuple(e) for e in edges]
    hit, rel = ours.relation_of(np.array([0, 0]), np.array([1, 7]))
    assert hit.tolist() == [True, (0, 7) in {(h, t) for h, t, _ in edges}] and rel[0] == 1
    idx = ours.sample_per_head(2, torch.Generator().manual_seed(0))
    counts = np.bincount(ours.head[idx], minlength=ours.n_entities)
    full = np.bincount(ours.head, minlength=ours.n_entities)
    np.testing.assert_array_equal(counts, np.minimum(full, 2))


def test_rgat_and_info_nce_equal_loops_over_edges():
    from fedrec.models.diffkg import info_nce

    model = _diffkg(_train())
    ent, rel = model.entity_emb.detach().double(), model.relation_emb.detach().double()
    w = model.rgat.W.detach().double()
    head, tail, rtype = model.sampled_kg
    ref = ent.clone()
    for h in range(ent.shape[0]):  # official agg: softmax over h's edges, weighted sum of tails, + self
        es = [k for k in range(len(head)) if head[k] == h]
        if not es:
            continue
        s = torch.stack([torch.nn.functional.leaky_relu((torch.cat([ent[h], ent[tail[k]]]) @ w * rel[rtype[k]]).sum(), 0.2)
                         for k in es])
        a = torch.softmax(s, 0)
        ref[h] = ent[h] + sum(a[j] * ent[tail[k]] for j, k in enumerate(es))
    got = model.rgat.aggregate(model.entity_emb.detach(), model.relation_emb.detach(), model.sampled_kg)
    np.testing.assert_allclose(got.detach().double().numpy(), ref.numpy(), rtol=1e-5, atol=1e-6)
    a, b = torch.randn(7, 4, dtype=torch.float64), torch.randn(7, 4, dtype=torch.float64)
    nodes = torch.tensor([0, 3, 3, 6])
    an, bn = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
    official = -torch.log(torch.exp((an[nodes] * bn[nodes]).sum(-1) / 0.5) / torch.exp(an[nodes] @ bn.T / 0.5).sum(-1))
    np.testing.assert_allclose(info_nce(a, b, nodes, 0.5).numpy(), official.numpy(), rtol=1e-10)


def test_rebuilt_kg_is_the_official_rebuild_and_ukgc_the_official_term():
    train = _train()
    model = _diffkg(train, keep_rate=1.0, rebuild_k=2)
    kg = model.rebuild_kg()
    model.denoiser.eval()
    n = model.edges.n_entities
    rows = torch.tensor(model.kg_rows.toarray())
    den = model.diffusion.reverse(model.denoiser, rows, 0)
    top = torch.topk(den, 2, dim=1).indices.numpy()
    h_list = [h for h in range(n) for _ in range(2)]
    t_list = top.ravel().tolist()
    pairs = set(zip(h_list, t_list))
    for i in range(len(h_list)):  # official: reverse edges added, then only KG edges (with their relation)
        if (t_list[i], h_list[i]) not in pairs:
            h_list.append(t_list[i])
            t_list.append(h_list[i])
    _, kg_dict = official_kg_edges(_kg())
    rel = {h: {t: r for r, t in kg_dict[h]} for h in kg_dict}
    ref = {(h, t, rel[h][t]) for h, t in zip(h_list, t_list) if h in rel and t in rel[h]}
    assert set(zip(*(k.tolist() for k in kg))) == ref

    model.denoiser.train()
    idx = torch.tensor([0, 4, n - 1])
    torch.manual_seed(5)
    _, ukgc = model.diffusion_losses(rows[idx], idx)
    torch.manual_seed(5)
    pred = model.diffusion.training_loss(model.denoiser, rows[idx])["pred_x0"].detach().double().numpy()
    r = train.toarray().astype(np.float64)
    u, e = model.user_emb.weight.detach().double().numpy(), model.entity_emb.detach().double().numpy()
    ref_ukgc = ((((r @ pred[:, :N_ITEMS].T).T) @ u - e[idx.numpy()]) ** 2).mean(-1)
    np.testing.assert_allclose(ukgc.detach().numpy(), ref_ukgc, rtol=1e-4, atol=1e-6)


def test_epoch_start_trains_the_denoiser_and_scoring_follows_its_parameters():
    model = _diffkg(_train())
    before = [p.detach().clone() for p in model.denoiser.parameters()]
    model.on_epoch_start()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.denoiser.parameters()))
    kg = model.denoised_kg
    model.scores(Batch(torch.arange(3), torch.zeros(3, N_ITEMS)))
    assert model.denoised_kg is kg  # the same denoiser: the same denoised KG
    with torch.no_grad():
        next(model.denoiser.parameters()).add_(0.1)  # as a federation's aggregated parameters would
    model.scores(Batch(torch.arange(3), torch.zeros(3, N_ITEMS)))
    assert model.denoised_kg is not kg


def test_diffkg_needs_a_kg():
    with pytest.raises(ConfigError, match="dataset.kg_file"):
        build_model({"name": "diffkg"}, DataShape(N_USERS, N_ITEMS))


# ================================================================== runs
@pytest.mark.parametrize("name", ["gdiff", "diffkg"])
def test_one_epoch_on_tiny_synthetic_data(tiny_cfg, tmp_path, name):
    from fedrec.experiment import execute

    summary = execute(tiny_cfg("federation=none", "train.epochs=1", model=name), tmp_path / "run", progress=False)
    assert summary["rounds"] == 1 and 0 <= summary["test"]["recall@20"] <= 1


def _serve(tiny_cfg, tmp_path, name, mode):
    from tests.test_mechanisms import trained_round

    return trained_round(tiny_cfg(*mode, model=name), tmp_path, name)[0]


SILO, DEVICE = SILO_ROUND, DEVICE_ROUND


def test_gdiff_silo_and_device_rounds_in_process(tiny_cfg, tmp_path):
    for i, mode in enumerate((SILO, DEVICE)):
        g0 = _serve(tiny_cfg, tmp_path / str(i), "gdiff", mode)
        assert "walk_t" not in g0  # the graph is each process's buffer, never aggregated


def test_diffkg_silo_round_keeps_user_embeddings_private(tiny_cfg, tmp_path):
    g0 = _serve(tiny_cfg, tmp_path, "diffkg", SILO)
    assert "user_emb.weight" not in g0 and "entity_emb" in g0 and any(k.startswith("denoiser.") for k in g0)


@pytest.mark.parametrize("name,over,match", [
    ("gdiff", ["federation=none", "privacy=dpsgd"], "dataset.item_graph=co_interaction: under privacy=dpsgd"),
    ("diffkg", ["federation=none", "privacy=dpsgd"], "privacy=dpsgd: model 'diffkg' propagates"),
    ("diffkg", ["federation=device"], "federation=device: model 'diffkg' propagates"),
])
def test_refusals_before_any_work(tiny_cfg, tmp_path, name, over, match):
    from fedrec.experiment import execute

    with pytest.raises(ConfigError, match=match):
        execute(tiny_cfg(*over, model=name), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
