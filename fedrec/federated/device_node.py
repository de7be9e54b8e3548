"""A node in cross-device mode: sample its users, simulate their behaviour, train them vectorised.

Sampling, dropouts, stragglers and the cap on very active users use keyed randomness
(``fedrec.rng``) over (seed, round, user), so which users take part does not depend on how users
are spread over nodes: a run with one user per Flower node and a run with two nodes of 470 users
select, drop and train exactly the same users. The server sends one number per round, the sampling
threshold: a user takes part when its key is <= the threshold (Poisson sampling with q = threshold,
or an exact count when the server set the threshold at the m-th smallest key of all users).
The users' rows, weights and draws are built on the model's device; replies carry CPU arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from fedrec.errors import ConfigError
from fedrec.run_config import FederationConfig, federation
from fedrec.federated import protocol as P
from fedrec.federated.cross_device import LocalTraining, train_users
from fedrec.models.base import Recommender, input_matrix
from fedrec.devices import model_device
from fedrec.rng import key_uniform, uniform_tensor, user_keys

STREAM_SAMPLE, STREAM_DROPOUT, STREAM_STRAGGLER, STREAM_CAP, STREAM_PERMUTATION = 101, 102, 103, 104, 105
PRIVATE_KEY = "fedrec-private"


def user_coins(seed: int, round_: int, users: np.ndarray, stream: int) -> np.ndarray:
    return key_uniform(user_keys(seed, round_, users, stream))


def rounds_per_pass(n_users: int, per_round: int) -> int:
    """``sampling=permutation``: rounds in one pass over all users (the last round takes the rest)."""
    return -(-int(n_users) // int(per_round))


def permutation_round(seed: int, round_: int, n_users: int, per_round: int) -> np.ndarray:
    """``sampling=permutation``: the (n_users,) mask of the users of ``round_`` (1-based). Pass
    p = (round - 1) // rounds_per_pass orders all users by keys drawn for (seed, p) -- a uniformly random
    permutation, the same on every process -- and its k-th round takes positions [k m, (k + 1) m): every
    user exactly once per pass, in batches of m without replacement (FedRecAttack's official loop:
    ``np.random.shuffle`` of all clients each epoch, batches of 256)."""
    m = int(per_round)
    per_pass = rounds_per_pass(n_users, m)
    p, k = divmod(int(round_) - 1, per_pass)
    order = np.argsort(user_coins(seed, p, np.arange(n_users), STREAM_PERMUTATION), kind="stable")
    mask = np.zeros(n_users, dtype=bool)
    mask[order[k * m:(k + 1) * m]] = True
    return mask


def per_round_count(fed: FederationConfig, n_users: int) -> int:
    count = fed.users_per_round
    return int(count) if count else max(1, int(round(float(fed.user_fraction) * n_users)))


def sampling_threshold(fed: FederationConfig, n_users: int, seed: int, round_: int) -> float:
    """The per-round threshold the server sends: q for Poisson, the m-th smallest key for a count
    (``permutation``: the round's share, informational -- the nodes find the round's users themselves,
    :func:`permutation_round`)."""
    method = fed.sampling
    count = fed.users_per_round
    q = float(count) / n_users if count else float(fed.user_fraction)
    if not 0 < q <= 1:
        raise ConfigError(f"federation.user_fraction/users_per_round: the sampled share must be in (0, 1], got {q}")
    if method in ("poisson", "permutation"):
        return q
    if method != "fixed":
        raise ConfigError(f"federation.sampling: expected fixed, poisson or permutation, got {method!r}")
    m = max(1, int(round(q * n_users)))
    keys = user_coins(seed, round_, np.arange(n_users), STREAM_SAMPLE)
    return float(np.partition(keys, m - 1)[m - 1])


@dataclass
class DeviceRound:
    reply: RecordDict
    private: dict[str, torch.Tensor]


def cap_rows(rows: torch.Tensor, users: np.ndarray, cap: int | None, seed: int, round_: int) -> torch.Tensor:
    """Keep at most ``cap`` of each user's training items (a random, keyed subset)."""
    if not cap or cap <= 0:
        return rows
    counts = (rows > 0).sum(1)  # interactions (rows may be a model's weighted input, all weights > 0)
    if not bool((counts > cap).any()):
        return rows
    u = uniform_tensor(user_keys(seed, round_, users, STREAM_CAP), rows.shape[1], rows.device)
    u = torch.where(rows > 0, u, torch.full_like(u, 2.0))  # non-items sort last
    keep = torch.zeros_like(rows)
    keep.scatter_(1, torch.topk(-u, int(cap), dim=1).indices, 1.0)
    return rows * keep


#: the sampled users' rows are densified all at once only while they take at most this share of
#: ``federation.memory_budget_gb``; beyond it, chunk by chunk (:class:`ChunkedRows`)
DENSE_ROWS_SHARE = 0.25


class ChunkedRows:
    """The sampled users' training rows (capped as :func:`cap_rows` does), densified only for the slice asked
    for: what ``train_users`` reads chunk by chunk (``rows[start:start + chunk]``), so a round over many
    users never holds the (U, n_items) dense matrix. The values equal the dense path's (the cap is keyed
    per user, so capping a chunk caps each of its users as the whole would)."""

    def __init__(self, train: sp.csr_matrix, users: np.ndarray, device, cap: int | None, seed: int, round_: int):
        self.train, self.users, self.device = train, np.asarray(users), torch.device(device)
        self.cap, self.seed, self.round = cap, seed, round_
        self.shape = (len(self.users), train.shape[1])

    def __len__(self) -> int:
        return len(self.users)

    def __getitem__(self, sl: slice) -> torch.Tensor:
        if not isinstance(sl, slice):
            raise TypeError("ChunkedRows: slice by a contiguous range of users")
        users = self.users[sl]
        x = torch.from_numpy(self.train[users].toarray().astype(np.float32)).to(self.device)
        return cap_rows(x, users, self.cap, self.seed, self.round)

    def sums(self) -> torch.Tensor:
        counts = np.diff(self.train.indptr)[self.users].astype(np.float32)
        if self.cap and self.cap > 0:
            counts = np.minimum(counts, float(self.cap))
        return torch.from_numpy(counts).to(self.device)


def row_sums(rows) -> torch.Tensor:
    """Interactions per user of dense rows or :class:`ChunkedRows` (stored entries: rows may be weighted)."""
    return rows.sums() if isinstance(rows, ChunkedRows) else (rows > 0).sum(1).to(rows.dtype)


def clipped_sum(per_user: dict[str, torch.Tensor], start: dict[str, torch.Tensor], clip: float):
    """Sum over users of (update clipped to L2 norm ``clip``); users with NaN/Inf updates are dropped.

    Returns (sums, users kept, users whose update was within the bound, users dropped).
    """
    names = list(per_user)
    n = per_user[names[0]].shape[0]
    deltas = {k: (per_user[k] - start[k].unsqueeze(0)).double() for k in names}
    sq = sum(d.reshape(n, -1).pow(2).sum(1) for d in deltas.values())
    finite = torch.isfinite(sq)
    norms = torch.sqrt(torch.where(finite, sq, torch.zeros_like(sq)))
    scale = torch.where(finite, torch.clamp(clip / norms.clamp(min=1e-12), max=1.0), torch.zeros_like(sq))
    sums = {k: torch.tensordot(scale, torch.nan_to_num(d), dims=1).float() for k, d in deltas.items()}
    return sums, int(finite.sum()), int((finite & (norms <= clip)).sum()), int((~finite).sum())


def local_training(cfg, *, local_epochs: int | None = None, prox_mu: float = 0.0) -> LocalTraining:
    """The users' local training from the config (``federation.local_*``, ``train.local_epochs``)."""
    fed = federation(cfg)
    return LocalTraining(optimizer=fed.local_optimizer, lr=float(fed.local_lr),
                         local_epochs=int(cfg.train.local_epochs if local_epochs is None else local_epochs),
                         chunk_size=fed.chunk_size, memory_budget_gb=float(fed.memory_budget_gb), prox_mu=float(prox_mu))


def users_per_page(memory_budget_gb: float, n_params: int, nodes_per_round: int) -> int:
    """Users per page of per-user uploads: an eighth of the budget for one page of every contacted node.

    A page exists several times on its way (the node's tensors and its serialised reply, the server's
    received message and numpy view), and the server holds the first page while it fetches the
    next, so about eight page-sized buffers can be alive at once."""
    return max(1, int(memory_budget_gb * 2**30 / 8 // (max(nodes_per_round, 1) * max(n_params, 1) * 4)))


class ClippedSumFold:
    """User-level DP on the node, chunk by chunk: the running sum of the users' clipped updates.
    Only the sum leaves the node (``reply``)."""

    def __init__(self, start: dict[str, torch.Tensor], clip: float):
        self.start, self.clip = start, float(clip)
        self.sums: dict[str, torch.Tensor] | None = None
        self.kept = self.unclipped = self.dropped = 0

    def add(self, params: dict[str, torch.Tensor], w: torch.Tensor, users: np.ndarray | None = None) -> None:
        sums, kept, unclipped, dropped = clipped_sum(params, self.start, self.clip)
        self.sums = sums if self.sums is None else {k: self.sums[k] + v for k, v in sums.items()}
        self.kept, self.unclipped, self.dropped = self.kept + kept, self.unclipped + unclipped, self.dropped + dropped

    def result(self):
        return self.sums, self.kept, self.unclipped, self.dropped

    def reply(self, metrics: dict) -> RecordDict:
        content = RecordDict()
        if self.sums is not None:
            content["arrays"] = ArrayRecord({n: Array(v.cpu().numpy()) for n, v in self.sums.items()})
        content["metrics"] = MetricRecord(metrics | {"clipped-sum": 1, "per-user": 0, "num-examples": float(self.kept),
                                                     "unclipped-users": self.unclipped, "rejected-users": self.dropped})
        return content


class TransformFold:
    """Users' updates through mechanisms' per-user transforms (``Mechanism.user_transform``: an attack
    crafting malicious users' updates, a bound on every update), then into the next fold.

    A transform sees deltas (trained minus start parameters, (U, ...) per name) and the users' ids;
    it returns the new deltas and counts for the round's metrics (``count/...``)."""

    def __init__(self, start: dict[str, torch.Tensor], transforms: list, inner):
        self.start, self.transforms, self.inner = start, transforms, inner
        self.counts: dict[str, float] = {}

    def add(self, params: dict[str, torch.Tensor], w: torch.Tensor, users: np.ndarray | None = None) -> None:
        changed = self._marked(users)
        if changed is not None:  # only the marked users' deltas are formed, transformed and written back
            idx = np.flatnonzero(changed)
            sub = torch.as_tensor(idx, dtype=torch.long)
            deltas = {n: p[sub] - self.start[n].unsqueeze(0) for n, p in params.items()}
            deltas = self._apply(np.asarray(users)[idx], deltas)
            if len(idx):  # in place: the trainer's fresh per-user tensors, dropped after add
                for n, d in deltas.items():
                    params[n].index_copy_(0, sub.to(d.device), self.start[n].unsqueeze(0) + d)
            self.inner.add(params, w, users)
            return
        deltas = self._apply(users, {n: p - self.start[n].unsqueeze(0) for n, p in params.items()})
        self.inner.add({n: self.start[n].unsqueeze(0) + d for n, d in deltas.items()}, w, users)

    def _apply(self, users, deltas: dict) -> dict:
        for transform in self.transforms:
            deltas, counts = transform(users, deltas)
            for key, value in counts.items():
                self.counts[key] = self.counts.get(key, 0.0) + float(value)
        return deltas

    def _marked(self, users) -> np.ndarray | None:
        """The users the transforms may change (every transform marked by ``changes_only``), else None."""
        marks = [getattr(t, "changes", None) for t in self.transforms]
        if users is None or any(m is None for m in marks):
            return None
        out = np.zeros(len(users), bool)
        for mark in marks:
            out |= np.asarray(mark(np.asarray(users)), bool)
        return out

    def changed(self, users: np.ndarray) -> np.ndarray | None:
        """Which of ``users`` the transforms may change: the union of each transform's ``changes(users)``
        (an attack touches only its malicious clients). None when some transform may change any user
        (a bound on every update) or the inner fold is not a plain mean: then every user passes here."""
        return self._marked(users) if hasattr(self.inner, "add_mean") else None

    def add_mean(self, mean: dict[str, torch.Tensor], weight: float) -> None:
        """Users no transform changes, already averaged: into the inner mean. Each transform still sees an
        empty chunk, so its count keys exist on every node."""
        self._apply(np.empty(0, np.int64), {})
        self.inner.add_mean(mean, weight)

    def result(self):
        return self.inner.result()

    def metrics(self) -> dict[str, float]:
        return dict(self.counts)



def row_sparse_names(model: Recommender, fed: FederationConfig) -> set[str]:
    """The global tables a per-user upload sends as touched rows (``federation.sparse_rows``): ``auto``,
    the model's row-sparse tables (``Recommender.row_sparse_parameter_names``); ``off``, none (every
    table as a full (U, ...) stack, e.g. to compare)."""
    if fed.sparse_rows == "off":
        return set()
    private = model.private_parameter_names()
    return {n for n in model.row_sparse_parameter_names() if n not in private}


def _fold_for(mechanisms, ctx, start: dict[str, torch.Tensor], per_user: bool, row_sparse: set[str]):
    """The fold the run's mechanisms ask for: a privacy fold replacing the mean (user-level DP's clipped
    sum), wrapped by their per-user transforms; None: no mechanism touches users' updates."""
    from fedrec.federated.cross_device import MeanFold, StackFold

    folds = [f for m in mechanisms if (f := m.user_fold(ctx, start)) is not None]
    if len(folds) > 1:
        raise ConfigError("two mechanisms replace how users' updates are summed; at most one can")
    transforms = [t for m in mechanisms if (t := m.user_transform(ctx)) is not None]
    fold = folds[0] if folds else None
    if transforms:  # transforms see dense deltas; only the upload after them is row-sparse
        fold = TransformFold(start, transforms,
                             fold or (StackFold(start, row_sparse) if per_user else MeanFold(start)))
    return fold


def _per_user_arrays(stacked: dict) -> dict[str, Array]:
    """The reply's arrays: (U, ...) stacks, and a row-sparse table's touched rows under ``protocol.row_keys``."""
    from fedrec.federated.cross_device import TouchedRows

    out = {}
    for n, v in stacked.items():
        if isinstance(v, TouchedRows):
            rows, offsets, values = P.row_keys(n)
            out |= {rows: Array(v.rows.cpu().numpy()), offsets: Array(v.offsets.cpu().numpy()),
                    values: Array(v.values.detach().cpu().numpy())}
        else:
            out[n] = Array(v.detach().cpu().numpy())
    return out


def device_round(model: Recommender, cfg, data, node_users: np.ndarray, private_state: dict[str, torch.Tensor],
                 round_: int, threshold: float, per_user: bool, prox_mu: float = 0.0, page: int = 0,
                 page_size: int | None = None, mechanisms=(), ctx=None) -> DeviceRound:
    """One round of the node's sampled users.

    Per-user uploads come in pages: with ``page_size`` set, this call trains and returns only the
    node's trained users at positions ``[page * page_size, (page + 1) * page_size)`` (the server asks
    for the pages one after another, so that no process holds more than a page of user models);
    the reply says how many pages there are. ``mechanisms`` (with their node context ``ctx``) may
    transform users' updates or replace their sum (user-level DP's clipped sum, folded chunk by chunk).
    A per-user reply sends the model's row-sparse tables (``row_sparse_names``) as each user's touched
    rows and their deltas (``protocol.row_keys``), every other parameter as a (U, ...) stack.
    """
    fed, seed = federation(cfg), int(cfg.seed)
    counts = np.diff(data.train.indptr)[node_users]
    if fed.sampling == "permutation":
        sampled = permutation_round(seed, round_, data.n_users, per_round_count(fed, data.n_users))[node_users]
    else:
        sampled = user_coins(seed, round_, node_users, STREAM_SAMPLE) <= threshold
    # Injected users (an attack's fake clients, e.g. FedRecAttack's with no data) take part even with an
    # empty row: their training is a zero update, which the attack's user_transform replaces.
    injected = data.injected[node_users] if data.injected is not None else np.zeros(len(node_users), bool)
    empty = sampled & (counts == 0) & ~injected
    active = sampled & ((counts > 0) | injected)
    dropped = active & (user_coins(seed, round_, node_users, STREAM_DROPOUT) < fed.dropout_rate)
    straggled = active & ~dropped & (user_coins(seed, round_, node_users, STREAM_STRAGGLER)
                                     < fed.straggler_rate)
    train_mask = active & ~dropped & ~straggled
    private_names = model.private_parameter_names()
    start = {n: p.detach() for n, p in model.named_parameters() if n not in private_names}
    row_sparse = row_sparse_names(model, fed) if per_user else set()
    fold = _fold_for(mechanisms, ctx, start, per_user, row_sparse)
    if fold is None and row_sparse:  # per-user upload with item tables: keep only each user's touched rows
        from fedrec.federated.cross_device import StackFold

        fold = StackFold(start, row_sparse)
    summed_on_node = hasattr(getattr(fold, "inner", fold), "reply")  # only a sum leaves: no per-user pages
    pos = np.flatnonzero(train_mask)
    pages = 1
    if per_user and not summed_on_node and page_size:
        pages = max(1, -(-len(pos) // int(page_size)))
        if not 0 <= page < pages:
            raise ConfigError(f"page {page} requested, the node has {pages} pages of {page_size} users")
        pos = pos[page * int(page_size):(page + 1) * int(page_size)]
    users = node_users[pos]
    device = model_device(model)
    cap = fed.max_user_interactions
    inputs = input_matrix(model, data)  # binary rows, a rating model's ratings or a model's weighted rows
    if len(users) * data.n_items * 4 > DENSE_ROWS_SHARE * fed.memory_budget_gb * 2**30:
        rows = ChunkedRows(inputs, users, device, cap, seed, round_)  # densified per chunk by train_users
    else:
        rows = torch.from_numpy(inputs[users].toarray().astype(np.float32)).to(device)
        rows = cap_rows(rows, users, cap, seed, round_)
    seq = None
    if model.input_kind == "sequence":  # the cap keeps a sequence's most recent items (not a random subset)
        seq = data.input_sequences("train").padded(users, int(model.max_len), pad=data.n_items, keep=cap).to(device)
    weights = torch.ones(len(users), device=device) if fed.weighting == "uniform" else row_sums(rows)  # interactions
    local = local_training(cfg, prox_mu=prox_mu)
    private_rows = {n: t[pos] for n, t in private_state.items()}
    upd = train_users(model, users, rows, weights, private_rows, local, seed, round_, per_user, fold=fold, seq=seq)
    new_private = {n: t.clone() for n, t in private_state.items()}
    for n, rows_n in upd.private.items():
        new_private[n][pos] = rows_n
    first = page == 0  # the round's user counts are reported once, with the first page
    metrics = {"num-examples": float(upd.weights.sum()), "sampled-users": int(sampled.sum()) if first else 0,
               "trained-users": len(users), "dropped-users": int(dropped.sum()) if first else 0,
               "straggler-users": int(straggled.sum()) if first else 0, "empty-users": int(empty.sum()) if first else 0,
               "train-loss": upd.loss if len(users) else 0.0, "per-user": int(per_user), "pages": pages, "page": page}
    if isinstance(fold, TransformFold):
        metrics |= {f"count/{k}": v for k, v in fold.metrics().items()}
    if summed_on_node:  # e.g. user-level DP: only the sum of clipped updates leaves the node
        inner = getattr(fold, "inner", fold)
        return DeviceRound(reply=inner.reply(metrics), private=new_private)
    content = RecordDict({"metrics": MetricRecord(metrics)})
    per_user_arrays = upd.per_user if upd.per_user is not None else (upd.folded if per_user else None)
    mean = upd.mean if upd.mean is not None else (upd.folded if not per_user and fold is not None else None)
    if not len(users):
        pass
    elif per_user:
        content["arrays"] = ArrayRecord(_per_user_arrays(per_user_arrays))
        content["user-weights"] = ArrayRecord({"weights": Array(upd.weights.cpu().numpy().astype(np.float64)),
                                               "users": Array(np.asarray(users, dtype=np.int64))})
    elif mean is not None:
        content["arrays"] = ArrayRecord({n: Array(v.detach().cpu().numpy()) for n, v in mean.items()})
    return DeviceRound(reply=content, private=new_private)
