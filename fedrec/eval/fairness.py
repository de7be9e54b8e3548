"""Fairness and diversity of the top-K lists: user-group NDCG gap, category coverage, category entropy, ILD.

Computed in the same scoring pass as the accuracy metrics (:func:`fedrec.eval.metrics.evaluate_scores`
hands every batch's masked scores and targets to a :class:`FairnessAccumulator`), over the users that
have held-out items in the split, vectorised over users. Definitions, per user u with top-K list L_u
(seen items masked exactly as for the accuracy metrics):

* ``ndcg@K`` per user group and ``ndcg_gap@K`` = max over groups - min over groups of the group's mean
  NDCG@K (two groups: |NDCG(g1) - NDCG(g0)|, DifFaiRec's and the user-fairness literature's group
  gap, e.g. Li et al., "User-oriented Fairness in Recommendation", WWW 2021). Groups
  (``eval.fairness_groups``): ``activity`` = the ``eval.fairness_top`` share (default 20%) of users
  with the most training interactions ("active") against the rest (every dataset has it; ties broken
  by the internal user id), or a categorical user feature of the dataset's user side data
  (``gender``, ``age``, ``occupation`` for ML-100K's ``ml-100k.user`` / ``u.user``): one group per
  value; users without a value (code -1) are left out of the groups, and so are injected (fake) users
  in the activity ranking.
* ``coverage@K`` = |categories present in L_u| / |categories|, averaged over users (D3Rec's
  "Coverage", github.com/c0natus/D3Rec ``Real-world/utils.py compute_metric``).
* ``entropy@K`` = H(p_u) / log2 |categories|, p_u the category distribution of L_u where an item with
  c categories adds 1/c to each (D3Rec's "Entropy"; the official adds 1e-7 to p before the log, a
  difference below 1e-5 that fedrec does not copy: it uses 0 log 0 = 0).
* ``ild@K`` = mean over ordered pairs i != j of L_u of 1 - cos(v_i, v_j) (intra-list diversity,
  Ziegler et al. 2005), v = the item's genre multi-hot row (``eval.fairness_ild=categories``) or
  its item embedding (``embeddings``: ``DataShape.item_embeddings()``); a zero vector has cosine 0
  with everything (distance 1).

Categories are the item side data's (``fedrec/data/side.py``: ML-100K's genres, the synthetic
generator's genres); items without a category count for no category. Group memberships and per-group
sums are kept as sums so that the result is exact whatever the batching.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedrec.errors import ConfigError

GROUPINGS_NOTE = "activity or a categorical user feature of the dataset (ML-100K: gender, age, occupation)"
ILD_VECTORS = ("categories", "embeddings")


@dataclass
class FairnessSpec:
    """What the accumulator needs: per-user group ids (-1: in no group), group names, the item x category
    0/1 matrix (n_items, n_categories) and the item vectors of ILD (n_items, d)."""

    groups: np.ndarray
    group_names: list[str]
    categories: np.ndarray
    item_vectors: np.ndarray
    grouping: str


def user_groups(data, grouping: str, top: float = 0.2) -> tuple[np.ndarray, list[str]]:
    """(group id per user, -1 for none; group names) for ``grouping`` (see the module docstring)."""
    n = data.n_users
    if grouping == "activity":
        if not 0.0 < top < 1.0:
            raise ConfigError(f"eval.fairness_top: must be in (0, 1), got {top}")
        counts = np.asarray((data.train > 0).sum(axis=1)).ravel()
        injected = getattr(data, "injected", None)
        genuine = np.ones(n, dtype=bool) if injected is None else ~np.asarray(injected, dtype=bool)
        users = np.flatnonzero(genuine)  # injected (fake) users are in no group and never ranked
        order = users[np.lexsort((users, -counts[users]))]  # most active first, ties by user id
        groups = np.full(n, -1, dtype=np.int64)
        groups[users] = 0
        groups[order[:max(1, int(round(top * len(users))))]] = 1
        return groups, ["inactive", "active"]
    codes = data.user_features.get(grouping)
    vocab = data.user_features.get(grouping + "_vocab")
    if codes is None or vocab is None or grouping.endswith("_vocab"):
        have = sorted(k for k in data.user_features if not k.endswith("_vocab") and k + "_vocab" in data.user_features)
        raise ConfigError(f"eval.fairness_groups={grouping!r}: dataset {data.name!r} has no such categorical user "
                          f"feature (it has: {', '.join(have) or 'none'}; 'activity' works on every dataset)")
    return np.asarray(codes, dtype=np.int64), [str(v) for v in vocab]


def fairness_spec(cfg, data, shape=None) -> FairnessSpec | None:
    """The run's fairness spec from ``cfg.eval`` (None when ``eval.fairness`` is off); a one-line
    ConfigError when the data lacks the groups, the item categories or the ILD vectors."""
    ev = cfg.eval
    if not bool(ev.get("fairness", False)):
        return None
    grouping = str(ev.get("fairness_groups", "activity"))
    groups, names = user_groups(data, grouping, float(ev.get("fairness_top", 0.2)))
    genre = data.item_features.get("genre")
    if genre is None or np.ndim(genre) != 2 or genre.shape[0] != data.n_items:
        raise ConfigError(f"eval.fairness: dataset {data.name!r} has no item categories (item side data: genres) "
                          "for coverage / entropy / ILD")
    cats = (np.asarray(genre) > 0).astype(np.float32)
    ild = str(ev.get("fairness_ild", "categories"))
    if ild not in ILD_VECTORS:
        raise ConfigError(f"eval.fairness_ild={ild!r}: expected one of {', '.join(ILD_VECTORS)}")
    vectors = cats
    if ild == "embeddings":
        emb = data.item_emb if shape is None else shape.item_embeddings()
        if emb is None:
            raise ConfigError(f"eval.fairness_ild=embeddings: dataset {data.name!r} has no item embeddings")
        vectors = np.asarray(emb, dtype=np.float32)
    return FairnessSpec(groups, names, cats, vectors, grouping)


def diversity_per_user(top: torch.Tensor, categories: torch.Tensor, unit_vectors: torch.Tensor) -> dict[str, torch.Tensor]:
    """(B,) coverage, entropy and ILD of the lists ``top`` (B, K) item ids, vectorised.

    ``categories`` (n_items, C) 0/1; ``unit_vectors`` (n_items, d) L2-normalised (zero rows stay zero)."""
    k = top.shape[1]
    cats = categories[top]  # (B, K, C)
    n_cat = categories.shape[1]
    coverage = (cats.sum(1) > 0).sum(1).float() / n_cat
    per_item = cats / cats.sum(-1, keepdim=True).clamp(min=1.0)  # 1/c to each of an item's c categories
    dist = per_item.sum(1)
    total = dist.sum(1, keepdim=True)
    p = torch.where(total > 0, dist / total.clamp(min=1e-12), torch.zeros_like(dist))
    plogp = torch.where(p > 0, p * torch.log2(p.clamp(min=1e-30)), torch.zeros_like(p))
    entropy = -plogp.sum(1) / (np.log2(n_cat) if n_cat > 1 else 1.0)
    v = unit_vectors[top]  # (B, K, d)
    gram = torch.bmm(v, v.transpose(1, 2))
    off = gram.sum((1, 2)) - torch.diagonal(gram, dim1=1, dim2=2).sum(1)
    ild = 1.0 - off / (k * (k - 1)) if k > 1 else torch.zeros(top.shape[0], device=top.device)
    return {"coverage": coverage, "entropy": entropy, "ild": ild}


def ndcg_per_user(top_hits: torch.Tensor, n_target: torch.Tensor, k: int) -> torch.Tensor:
    """(B,) NDCG@k from the 0/1 hits of the ranked list (B, >= k) and the number of held-out items."""
    disc = 1.0 / torch.log2(torch.arange(k, dtype=torch.float32, device=top_hits.device) + 2.0)
    dcg = (top_hits[:, :k] * disc).sum(1)
    ideal = torch.cumsum(disc, 0)[(n_target.clamp(max=k) - 1).long()]
    return dcg / ideal


class FairnessAccumulator:
    """Observer of :func:`fedrec.eval.metrics.evaluate_scores`: per split, sums of per-user NDCG by group
    and of the diversity metrics, from the masked scores of each batch."""

    def __init__(self, spec: FairnessSpec, ks: list[int], device=None):
        self.spec, self.ks = spec, sorted(int(k) for k in ks)
        self.n_groups = len(spec.group_names)
        self.device = device
        self.groups = torch.as_tensor(spec.groups, dtype=torch.long, device=device)
        self.categories = torch.as_tensor(spec.categories, dtype=torch.float32, device=device)
        v = torch.as_tensor(spec.item_vectors, dtype=torch.float32, device=device)
        self.unit = v / v.norm(dim=1, keepdim=True).clamp(min=1e-12)
        self.sums: dict[str, dict] = {}

    def _split(self, split: str) -> dict:
        if split not in self.sums:
            self.sums[split] = {"users": 0, "group_users": np.zeros(self.n_groups),
                                **{f"{m}@{k}": 0.0 for m in ("coverage", "entropy", "ild") for k in self.ks},
                                **{f"group_ndcg@{k}": np.zeros(self.n_groups) for k in self.ks}}
        return self.sums[split]

    @torch.no_grad()
    def __call__(self, split: str, rows: np.ndarray, scores: torch.Tensor, target: torch.Tensor) -> None:
        n_target = target.sum(1)
        has = n_target > 0
        if not bool(has.any()):
            return
        rows_t = torch.as_tensor(np.asarray(rows), dtype=torch.long, device=scores.device)[has]
        scores, target, n_target = scores[has], target[has], n_target[has]
        top = torch.topk(scores, self.ks[-1], dim=1).indices
        hits = torch.gather(target, 1, top)
        g = self.groups.to(scores.device)[rows_t]
        in_group = g >= 0
        acc = self._split(split)
        acc["users"] += int(has.sum())
        acc["group_users"] += torch.bincount(g[in_group], minlength=self.n_groups).cpu().numpy()
        for k in self.ks:
            nd = ndcg_per_user(hits, n_target, k)
            acc[f"group_ndcg@{k}"] += torch.zeros(self.n_groups, device=scores.device).index_add_(
                0, g[in_group], nd[in_group]).cpu().numpy()
            div = diversity_per_user(top[:, :k], self.categories.to(scores.device), self.unit.to(scores.device))
            for m, v in div.items():
                acc[f"{m}@{k}"] += float(v.sum())

    def result(self) -> dict:
        """``{split: {coverage@K, entropy@K, ild@K, ndcg_gap@K, group_ndcg@K: {name: value}, group_users}}``."""
        out = {"groups": self.spec.grouping}
        for split, acc in self.sums.items():
            users = max(acc["users"], 1)
            res: dict = {f"{m}@{k}": acc[f"{m}@{k}"] / users for m in ("coverage", "entropy", "ild") for k in self.ks}
            counts = acc["group_users"]
            present = counts > 0
            for k in self.ks:
                means = np.where(present, acc[f"group_ndcg@{k}"] / np.maximum(counts, 1), np.nan)
                res[f"group_ndcg@{k}"] = {n: float(m) for n, m, p in zip(self.spec.group_names, means, present) if p}
                res[f"ndcg_gap@{k}"] = float(np.nanmax(means) - np.nanmin(means)) if present.sum() >= 2 else float("nan")
            res["group_users"] = {n: int(c) for n, c in zip(self.spec.group_names, counts) if c > 0}
            out[split] = res
        return out
