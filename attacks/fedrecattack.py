"""FedRecAttack (Rong et al., "FedRecAttack: Model Poisoning Attack to Federated Recommendation", ICDE 2022).

The setting (the official code, github.com/rdz98/FedRecAttack, re-implemented here, not copied): MF
with BPR, every user a client holding its private user row; each client uploads the gradient of its
item rows, the server clips every row to norm 1 and takes an SGD step on the sum over a batch of
clients (``strategy=row_clip_sum``, ``federation.sampling=permutation``, BPR ``sampling=all_pairs``;
``conf/experiment/fedrecattack_ml100k.yaml``).

The threat: ``fraction`` x (genuine users) malicious clients (official: ``int(0.05 * users)``) are
*added* to the population -- fake users with no data (a data transform appends empty, ``injected``
rows, so no metric counts them; they are sampled into rounds like every client). The attacker knows
``public_fraction`` of every genuine user's training interactions (official: a 1% file, ``ceil`` per
user, so every user has at least one; here a keyed draw of ``ceil(share * n)`` per user), and the
target item(s) (official: one uniformly random item: ``target_selection=random``; the config style of
:class:`attacks.shilling.ShillingConfig`).

The attack, in each round that samples at least one malicious client (one coordinating "center"):

1. approximate the genuine users' embeddings: one pass in batches of ``attack_batch_size`` over the
   users, Adam (``attack_lr``, state kept over the run) on the BPR sum loss of their public
   interactions against the round's global item table (negatives uniform outside the public set);
2. for every user, the 10th item of its top-10 under the approximated embeddings (public items and the
   target excluded) is the item to beat; the loss ``g(s(u, neg) - s(u, target))`` with ``g(x) = x`` for
   x >= 0 and ``exp(x) - 1`` below, summed over users, is differentiated w.r.t. the item table;
3. each malicious client, in order, uploads at most ``kappa`` rows of that gradient: the target and
   ``kappa - 1`` items drawn once (at its first round) with probability proportional to the gradient's
   row norms, each row clipped to ``grad_clip``; what it uploaded is subtracted from the shared gradient,
   so the next malicious client of the round sends what is left. As a delta (what fedrec clients
   upload) the crafted rows are ``-federation.local_lr x gradient``, which the server's row clip at
   ``local_lr x 1`` and sum treat exactly like a genuine client's one SGD step. Under a mean of the
   sampled users' models (``strategy=fedavg``, uniform weights; ``conf/experiment/fedrecattack_fedavg_ml100k.yaml``)
   the attacker multiplies that delta by the round's number of sampled users (:func:`upload_scale`), so
   the server still applies ``local_lr x`` each malicious client's clipped rows; the kappa cap is unchanged.

DiffRec as the victim (``model=diffrec``; :class:`DiffRecCenter`): DiffRec has no item table and no user
factor -- its input is the user's history -- so an approximated genuine user is its public row (nothing to
fit), and the attacker's differentiable surrogate of DiffRec's score is the denoiser's t = 0 prediction of
x0 from that row (the ranking runs the reverse chain, which feeds that prediction back in). FedRecAttack's
loss is differentiated w.r.t. the item-indexed tensors only: item j's "row" is its output-layer row, its
output bias and its input-layer column (one (n_items, h_out + 1 + h_in) matrix, so the choice of kappa
items, the per-item clip and the subtraction are step 3's); hidden layers and the time embedding get a zero
delta. Why these: they are the parameters that belong to one item (what kappa limits), and the output bias
lifts the target for every user alike, with no private factor of random sign as in MF. Measured
(docs/RESULTS.md): ER@10 1.00 at round 15 of ML-100K FedAvg, after which the benign users' SGD on the
pushed denoiser diverges; with ``upload_scale=10`` (instead of the 99 sampled users) 0.85 at round 30 and
the victim's accuracy intact.

Hook: ``user_transform`` replaces the malicious users' (all-zero: they have no data) deltas inside the
node's fold; the row-sparse upload then sends only the rows the attack set. The center's state (the
approximated embeddings, Adam moments, each malicious client's rows) is node state
(``keeps_node_state``). Deviations: the official center also adds N(0, 1e-7) noise to the uploads (not
done: it only makes every chosen row nonzero); its item choice draws from numpy's global generator, here
from streams keyed by (seed, round); the official evaluation also masks each user's test item out of
the ranking, fedrec's ER@K (:mod:`fedrec.eval.targets`) ranks every item outside the training row over
users who never touched the target. With several Flower nodes each node runs its own center for the
malicious clients it hosts (the overlay uses one node, as the official single-process simulation).

``fraction=0`` injects no one and crafts nothing but still tracks the target's ER@K: the clean run with
the same target (``attack=fedrecattack attack.fraction=0``).

Metric: the target's ER@K / NDCG@K over genuine users are computed on the nodes (the user rows are
private) in every evaluation (``target/er@K`` in metrics.jsonl) and this section of summary.json keeps
their history per evaluated round.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from attacks.shilling import TARGET_SELECTIONS, select_targets
from attacks.target_tracking import TargetTracking
from fedrec.errors import ConfigError
from fedrec.mechanisms import Mechanism, register
from fedrec.rng import numpy_stream

STREAM_FRA = 0x46524154  # "FRAT": this module's randomness
_PUBLIC, _SHUFFLE, _NEG, _CHOICE = 1, 2, 3, 4
ID_PREFIX = "fedrecattack-"


@dataclass(frozen=True)
class FedRecAttackConfig:
    fraction: float = 0.05  # malicious clients added, per genuine user (official clients_limit; int() of the product)
    count: int | None = None  # exact number instead
    kappa: int = 60  # at most this many item rows per malicious upload (official items_limit)
    public_fraction: float = 0.01  # share of each genuine user's training items the attacker knows (ceil per user)
    attack_lr: float = 0.01  # Adam rate of the approximated user embeddings
    attack_batch_size: int = 256  # users per Adam step
    grad_clip: float = 1.0  # row norm of the crafted gradient (the server's clip, in gradient units)
    targets: tuple[str, ...] | None = None
    target_selection: str = "random"  # official: one uniformly random item
    n_targets: int = 1
    top_k: int = 10  # the item to beat is the top_k-th of each user's approximated ranking
    upload_scale: float | None = None  # crafted delta = -local_lr x upload_scale x clipped gradient; None: auto

    def __post_init__(self):
        if self.count is not None and (isinstance(self.count, bool) or int(self.count) < 0):
            raise ConfigError(f"attack.count: expected an integer >= 0 or null, got {self.count!r}")
        if not (isinstance(self.fraction, (int, float)) and 0 <= float(self.fraction) and math.isfinite(self.fraction)):
            raise ConfigError(f"attack.fraction: expected a share >= 0, got {self.fraction!r}")
        if int(self.kappa) < 1:
            raise ConfigError(f"attack.kappa: must be >= 1, got {self.kappa}")
        if not 0 < float(self.public_fraction) <= 1:
            raise ConfigError(f"attack.public_fraction: must be in (0, 1], got {self.public_fraction}")
        if self.upload_scale is not None and not float(self.upload_scale) > 0:
            raise ConfigError(f"attack.upload_scale: must be positive or null, got {self.upload_scale}")
        for key in ("attack_lr", "grad_clip"):
            if not float(getattr(self, key)) > 0:
                raise ConfigError(f"attack.{key}: must be positive, got {getattr(self, key)}")
        for key in ("attack_batch_size", "n_targets", "top_k"):
            if int(getattr(self, key)) < 1:
                raise ConfigError(f"attack.{key}: must be >= 1, got {getattr(self, key)}")
        if self.target_selection not in TARGET_SELECTIONS:
            raise ConfigError(f"attack.target_selection: expected one of {', '.join(TARGET_SELECTIONS)}, "
                              f"got {self.target_selection!r}")
        if self.targets is not None:
            targets = (self.targets,) if isinstance(self.targets, (str, int)) else self.targets
            object.__setattr__(self, "targets", tuple(str(t) for t in targets))

    def n_fake(self, n_genuine: int) -> int:
        return int(self.count) if self.count is not None else int(float(self.fraction) * n_genuine)


class FakeClients:
    """Data transform: ``n`` injected users with empty training rows (the malicious clients)."""

    def __init__(self, config: FedRecAttackConfig):
        self.config = config

    def key(self) -> str:
        c = self.config
        return f"attacks.fedrecattack.fake{json.dumps({'fraction': c.fraction, 'count': c.count})}"

    def apply(self, data, seed: int):
        n = self.config.n_fake(len(data.genuine()))
        if n == 0:
            return data
        digest = hashlib.sha256(self.key().encode()).hexdigest()[:8]
        ids = np.array([f"{ID_PREFIX}{digest}-{i}" for i in range(n)])
        seq = None
        if data.train_seq is not None:
            from fedrec.data.sequences import Sequences

            seq = Sequences(np.zeros(n + 1, dtype=np.int64), np.zeros(0, dtype=np.int64))
        return data.append_users(sp.csr_matrix((n, data.n_items), dtype=np.float32), ids, injected=True,
                                 train_seq=seq)


def malicious_users(data) -> np.ndarray:
    """The fake clients' user ids (sorted)."""
    return np.flatnonzero(np.char.startswith(np.asarray(data.user_ids, dtype=str), ID_PREFIX))


def public_interactions(data, share: float, seed: int) -> sp.csr_matrix:
    """(n_users, n_items) the attacker's prior knowledge: ceil(share * n_u) of each genuine user's n_u
    training items, drawn uniformly without replacement (a keyed stream); injected users' rows empty."""
    rng = numpy_stream(seed, STREAM_FRA, _PUBLIC)
    train = data.train.tocsr()
    genuine = np.zeros(data.n_users, bool)
    genuine[data.genuine()] = True
    rows, cols = [], []
    for u in range(data.n_users):
        items = train.indices[train.indptr[u]:train.indptr[u + 1]]
        if not genuine[u] or len(items) == 0:
            continue
        k = int(math.ceil(share * len(items)))
        cols.append(np.sort(rng.choice(items, size=k, replace=False)))
        rows.append(np.full(k, u))
    r = np.concatenate(rows) if rows else np.zeros(0, int)
    c = np.concatenate(cols) if cols else np.zeros(0, int)
    return sp.csr_matrix((np.ones(len(r), np.float32), (r, c)), shape=(data.n_users, data.n_items))


def _attack_loss(users_emb: torch.Tensor, items: torch.Tensor, public: torch.Tensor, targets: torch.Tensor,
                 top_k: int) -> torch.Tensor:
    """FedRecAttack's promotion loss of the item table ``items`` (requires grad) for approximated users."""
    with torch.no_grad():
        scores = users_emb @ items.T
        scores = scores.masked_fill(public > 0, -float(1 << 10))
        scores[:, targets] = -float(1 << 10)
        neg = torch.topk(scores, top_k, dim=1).indices[:, -1]  # the top_k-th item: the one to beat
    total = items.new_zeros(())
    for t in targets.tolist():
        keep = public[:, t] <= 0  # users whose public items hold the target need no push
        u = users_emb[keep]
        x = (u * items[neg[keep]]).sum(-1) - (u * items[t]).sum(-1)
        total = total + torch.where(x < 0, torch.exp(torch.clamp(x, max=0.0)) - 1, x).sum()
    return total


class Center:
    """The coordinating attacker of one node: approximated embeddings, Adam moments and each malicious
    client's rows, as named arrays (node state)."""

    def __init__(self, config: FedRecAttackConfig, data, seed: int, dim: int, state: dict):
        self.c, self.data, self.seed = config, data, int(seed)
        self.public = public_interactions(data, float(config.public_fraction), self.seed)
        self.known = np.flatnonzero(np.diff(self.public.indptr) > 0)  # users with public interactions
        self.bad = malicious_users(data)
        if "users_emb" in state:
            self.state = {k: np.asarray(v) for k, v in state.items()}
        else:
            g = torch.Generator().manual_seed(self.seed)
            emb = (torch.randn(len(self.known), dim, generator=g) * 0.01).numpy()
            self.state = {"users_emb": emb, "adam_m": np.zeros_like(emb), "adam_v": np.zeros_like(emb),
                          "adam_t": np.zeros(1, np.int64),
                          "rows": np.full((len(self.bad), int(config.kappa)), -1, np.int64)}

    def _approximate(self, items: torch.Tensor, rnd: int) -> torch.Tensor:
        """One Adam pass over the known users on the BPR sum loss of their public interactions."""
        emb = torch.from_numpy(self.state["users_emb"]).clone()
        m, v = torch.from_numpy(self.state["adam_m"]).clone(), torch.from_numpy(self.state["adam_v"]).clone()
        t = int(self.state["adam_t"][0])
        rng = numpy_stream(self.seed, STREAM_FRA, _SHUFFLE, rnd)
        order = rng.permutation(len(self.known))
        pub = self.public[self.known]
        n_items = self.data.n_items
        b1, b2, eps, lr = 0.9, 0.999, 1e-8, float(self.c.attack_lr)
        for s in range(0, len(order), int(self.c.attack_batch_size)):
            idx = order[s:s + int(self.c.attack_batch_size)]
            sub = pub[idx]
            who = np.repeat(idx, np.diff(sub.indptr))
            pos = sub.indices.astype(np.int64)
            neg = rng.integers(0, n_items, len(pos))
            for _ in range(32):  # negatives outside the user's public items
                clash = np.asarray(pub[who, neg]).ravel() > 0
                if not clash.any():
                    break
                neg[clash] = rng.integers(0, n_items, int(clash.sum()))
            e = emb.clone().requires_grad_(True)
            u = e[torch.from_numpy(who)]
            d = (u * (items[torch.from_numpy(pos)] - items[torch.from_numpy(neg)])).sum(-1)
            loss = -torch.nn.functional.logsigmoid(d).sum()
            (g,) = torch.autograd.grad(loss, e)
            t += 1  # torch.optim.Adam over the whole table (users outside the batch: zero gradient)
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            emb = emb - lr * (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps)
        self.state.update(users_emb=emb.numpy(), adam_m=m.numpy(), adam_v=v.numpy(), adam_t=np.array([t]))
        return emb

    def gradient(self, items: torch.Tensor, targets: np.ndarray, rnd: int) -> torch.Tensor:
        """The round's attack gradient w.r.t. the item table (n_items, d)."""
        items = items.detach().float().cpu()
        emb = self._approximate(items, rnd)
        public = torch.from_numpy(self.public[self.known].toarray())
        leaf = items.clone().requires_grad_(True)
        loss = _attack_loss(emb, leaf, public, torch.from_numpy(targets), int(self.c.top_k))
        if not loss.requires_grad:
            return torch.zeros_like(items)
        (g,) = torch.autograd.grad(loss, leaf)
        return g

    def rows_of(self, k: int, grad: torch.Tensor, targets: np.ndarray, rnd: int) -> np.ndarray:
        """Malicious client k's rows: the targets and kappa - len(targets) items drawn once, by gradient norm."""
        rows = self.state["rows"][k]
        if rows[0] < 0:
            kappa = min(int(self.c.kappa), self.data.n_items)
            p = grad.norm(dim=1).double().numpy() + 1e-7
            p[targets] = 0.0
            rng = numpy_stream(self.seed, STREAM_FRA, _CHOICE, rnd, int(self.bad[k]))
            extra = rng.choice(self.data.n_items, size=max(0, kappa - len(targets)), replace=False, p=p / p.sum())
            chosen = np.concatenate([targets[:kappa], extra]).astype(np.int64)
            rows = np.full(int(self.c.kappa), -1, np.int64)
            rows[:len(chosen)] = chosen
            self.state["rows"][k] = rows
        return rows[rows >= 0]


def denoiser_layout(start: dict) -> tuple[str, str, str]:
    """DiffRec's item-indexed tensors: (input layer weight, whose first n_items columns are the items;
    output layer weight, a row per item; output layer bias, one per item)."""
    def count(kind):
        return 1 + max(int(k.split(".")[2]) for k in start if k.startswith(f"denoiser.{kind}."))
    n_out = count("out_layers")
    return ("denoiser.in_layers.0.weight", f"denoiser.out_layers.{n_out - 1}.weight",
            f"denoiser.out_layers.{n_out - 1}.bias")


def denoise(params: dict, x: torch.Tensor, emb_size: int, norm: bool) -> torch.Tensor:
    """DenoiserMLP's forward at t = 0 from a parameter dict, without dropout (fedrec/models/denoiser.py):
    the attacker's differentiable surrogate of DiffRec's score, x0 predicted from the user's history."""
    from fedrec.models.denoiser import timestep_embedding

    F = torch.nn.functional
    t = torch.zeros(x.shape[0], dtype=torch.long)
    emb = F.linear(timestep_embedding(t, emb_size), params["denoiser.emb_layer.weight"],
                   params["denoiser.emb_layer.bias"])
    h = torch.cat([F.normalize(x) if norm else x, emb], dim=-1)
    n_in = 1 + max(int(k.split(".")[2]) for k in params if k.startswith("denoiser.in_layers."))
    n_out = 1 + max(int(k.split(".")[2]) for k in params if k.startswith("denoiser.out_layers."))
    for i in range(n_in):
        h = torch.tanh(F.linear(h, params[f"denoiser.in_layers.{i}.weight"], params[f"denoiser.in_layers.{i}.bias"]))
    for i in range(n_out):
        h = F.linear(h, params[f"denoiser.out_layers.{i}.weight"], params[f"denoiser.out_layers.{i}.bias"])
        if i != n_out - 1:
            h = torch.tanh(h)
    return h


class DiffRecCenter(Center):
    """The attacker against DiffRec: no user embeddings to approximate (DiffRec is user-free: its input is
    the user's history), so an approximated genuine user is its public row. The crafted gradient is
    FedRecAttack's loss on the denoiser's t = 0 prediction from those rows, w.r.t. the item-indexed
    tensors only, as one (n_items, h_out + 1 + h_in) matrix: item j's output row, its output bias and
    its input column -- so choosing, clipping and capping at kappa "rows" is Center's, per item."""

    def __init__(self, config: FedRecAttackConfig, data, seed: int, state: dict):
        self.c, self.data, self.seed = config, data, int(seed)
        self.public = public_interactions(data, float(config.public_fraction), self.seed)
        self.known = np.flatnonzero(np.diff(self.public.indptr) > 0)
        self.bad = malicious_users(data)
        if "rows" in state:
            self.state = {k: np.asarray(v) for k, v in state.items()}
        else:
            self.state = {"rows": np.full((len(self.bad), int(config.kappa)), -1, np.int64)}

    def item_gradient(self, start: dict, targets: np.ndarray, emb_size: int, norm: bool) -> torch.Tensor:
        w_in, w_out, b_out = denoiser_layout(start)
        n = self.data.n_items
        params = {k: v.detach().float().cpu() for k, v in start.items()}
        leaves = {k: params[k].clone().requires_grad_(True) for k in (w_in, w_out, b_out)}
        x = torch.from_numpy(self.public[self.known].toarray())
        scores = denoise(params | leaves, x, emb_size, norm)
        with torch.no_grad():
            masked = scores.masked_fill(x > 0, -float(1 << 10))
            masked[:, torch.from_numpy(targets)] = -float(1 << 10)
            neg = torch.topk(masked, int(self.c.top_k), dim=1).indices[:, -1]
        rows = torch.arange(len(x))
        total = scores.new_zeros(())
        for t in targets.tolist():
            keep = x[:, t] <= 0
            d = scores[rows[keep], neg[keep]] - scores[keep, t]
            total = total + torch.where(d < 0, torch.exp(torch.clamp(d, max=0.0)) - 1, d).sum()
        g = torch.autograd.grad(total, [leaves[w_out], leaves[b_out], leaves[w_in]], allow_unused=True)
        g = [torch.zeros_like(leaves[k]) if gi is None else gi for gi, k in zip(g, (w_out, b_out, w_in))]
        return torch.cat([g[0], g[1][:, None], g[2][:, :n].T], dim=1)


def split_item_rows(start: dict, rows: torch.Tensor, part: torch.Tensor) -> dict[str, tuple]:
    """The inverse of :meth:`DiffRecCenter.item_gradient`'s layout for the items ``rows``: name -> (index, values)."""
    w_in, w_out, b_out = denoiser_layout(start)
    h_out = start[w_out].shape[1]
    return {w_out: part[:, :h_out], b_out: part[:, h_out], w_in: part[:, h_out + 1:].T}


def upload_scale(c: FedRecAttackConfig, cfg, n_users: int) -> float:
    """How much the attacker multiplies its crafted delta (``-local_lr x clipped gradient``) so that what the
    server applies per malicious client is ``local_lr x`` its clipped gradient rows, as in the paper's setting.

    ``strategy=row_clip_sum`` adds every upload's rows as they are (after its row clip at ``local_lr x 1``):
    scale 1. Any other strategy (``fedavg``: the uniform mean of the sampled users' models) divides each upload
    by the number m of users the round samples, so the attacker, who knows the protocol, multiplies by m:
    ``federation.users_per_round`` or ``round(user_fraction x n_users)`` (fixed / permutation sampling), the
    expected ``user_fraction x n_users`` under Poisson sampling (n_users counts the fake clients: they are
    sampled like everyone). ``attack.upload_scale`` overrides."""
    if c.upload_scale is not None:
        return float(c.upload_scale)
    if str(cfg.strategy.name) == "row_clip_sum":
        return 1.0
    from fedrec.federated.device_node import per_round_count
    from fedrec.run_config import federation

    fed = federation(cfg)
    if fed.sampling == "poisson" and not fed.users_per_round:
        return float(fed.user_fraction) * n_users
    return float(per_round_count(fed, n_users))


def _take_rows(cen, g: torch.Tensor, k: int, targets, rnd: int, clip: float):
    """Malicious client ``k``'s rows of the attack gradient ``g`` (at most kappa, chosen by the center), each
    clipped to ``clip``. What it sends is taken off ``g``, so the next malicious client sends what is left.
    Returns (rows, their clipped gradient, rows actually sent)."""
    rows = torch.from_numpy(cen.rows_of(k, g, targets, rnd))
    part = g[rows]
    part = part * torch.clamp(clip / part.norm(dim=1, keepdim=True).clamp(min=1e-30), max=1.0)
    g[rows] -= part
    return rows, part, int((part.norm(dim=1) > 0).sum())


@register
class FedRecAttack(TargetTracking, Mechanism):
    kind, name = "attack", "fedrecattack"
    Config = FedRecAttackConfig
    modes = ("device",)
    keeps_node_state = True

    def check(self, cfg) -> None:
        from fedrec.run_config import federation

        fed = federation(cfg)
        crafts = not (self.config.count == 0 or (self.config.count is None and float(self.config.fraction) == 0))
        if crafts and str(cfg.model.name) not in ("bpr", "diffrec"):
            raise ConfigError("attack=fedrecattack: crafts the item-indexed parameters of MF (model=bpr) or DiffRec's "
                              f"denoiser (model=diffrec), got model={cfg.model.name}")
        if fed.local_optimizer != "sgd" or int(cfg.train.local_epochs) != 1:
            raise ConfigError("attack=fedrecattack: uploads are gradients, so clients take one local SGD step "
                              "(federation.local_optimizer=sgd, train.local_epochs=1)")
        if str(cfg.strategy.name) != "row_clip_sum" and fed.weighting != "uniform":
            raise ConfigError("attack=fedrecattack under a weighted mean: the fake clients hold no data, so "
                              "federation.weighting=interactions gives their uploads weight 0; use weighting=uniform")

    def data_transforms(self) -> list:
        return [FakeClients(self.config)]

    def targets(self, data, seed: int) -> np.ndarray:
        """The target item ids (internal), the same on every process."""
        return select_targets(self.config, data, int(seed))

    # ------------------------------------------------------------------ node: the malicious uploads
    def user_transform(self, ctx):
        bad = malicious_users(ctx.data)
        if len(bad) == 0:
            return None
        cfg, c = ctx.cfg, self.config
        lr = float(cfg.federation.local_lr) * upload_scale(c, cfg, ctx.data.n_users)
        targets = self.targets(ctx.data, int(cfg.seed))
        if str(cfg.model.name) == "diffrec":
            return self._diffrec_transform(ctx, bad, lr, targets)
        name = "item_emb.weight"
        round_state: dict = {}

        def center() -> tuple[Center, torch.Tensor]:
            if "center" not in round_state:  # once per round, at the first malicious client
                dim = int(ctx.start[name].shape[1])
                cen = Center(c, ctx.data, int(cfg.seed), dim, ctx.state.get("attack", {}))
                round_state["center"] = cen
                with torch.enable_grad():  # the fold runs under no_grad
                    round_state["grad"] = cen.gradient(ctx.start[name], targets, ctx.round)
            return round_state["center"], round_state["grad"]

        def craft(users, deltas):
            users = np.asarray(users)
            mine = np.flatnonzero(np.isin(users, bad))
            if len(mine) == 0:
                return deltas, {"malicious-users": 0, "malicious-rows": 0}  # every node reports the same keys
            cen, g = center()
            d = deltas[name].clone()
            rows_sent = 0
            for i in mine:
                rows, part, sent = _take_rows(cen, g, int(np.searchsorted(bad, users[i])), targets, ctx.round,
                                              float(c.grad_clip))
                d[i] = 0.0
                d[i, rows] = (-lr * part).to(d.dtype).to(d.device)
                rows_sent += sent
            ctx.state["attack"] = cen.state
            return deltas | {name: d}, {"malicious-users": len(mine), "malicious-rows": rows_sent}

        return craft

    def _diffrec_transform(self, ctx, bad, lr, targets):
        """DiffRec's malicious uploads: per malicious client at most kappa items' slices (output row, output
        bias, input column) of :class:`DiffRecCenter`'s gradient, each slice clipped to ``grad_clip``; every
        other parameter's delta (the hidden layers, the time embedding) is zero."""
        cfg, c = ctx.cfg, self.config
        names = denoiser_layout(ctx.start)
        round_state: dict = {}

        def center():
            if "center" not in round_state:
                cen = DiffRecCenter(c, ctx.data, int(cfg.seed), ctx.state.get("attack", {}))
                with torch.enable_grad():
                    round_state["grad"] = cen.item_gradient(ctx.start, targets, int(cfg.model.emb_size),
                                                            bool(cfg.model.norm))
                round_state["center"] = cen
            return round_state["center"], round_state["grad"]

        def craft(users, deltas):
            users = np.asarray(users)
            mine = np.flatnonzero(np.isin(users, bad))
            if len(mine) == 0:
                return deltas, {"malicious-users": 0, "malicious-rows": 0}  # every node reports the same keys
            cen, g = center()
            out = {n: d.clone() for n, d in deltas.items()}
            rows_sent = 0
            for i in mine:
                rows, part, sent = _take_rows(cen, g, int(np.searchsorted(bad, users[i])), targets, ctx.round,
                                              float(c.grad_clip))
                for n in out:
                    out[n][i] = 0.0
                w_in, w_out, b_out = names
                pieces = split_item_rows(ctx.start, rows, -lr * part)
                dev = out[w_out].device
                r = rows.to(dev)
                out[w_out][i, r] = pieces[w_out].to(out[w_out].dtype).to(dev)
                out[b_out][i, r] = pieces[b_out].to(out[b_out].dtype).to(dev)
                out[w_in][i][:, r] = pieces[w_in].to(out[w_in].dtype).to(dev)
                rows_sent += sent
            ctx.state["attack"] = cen.state
            return out, {"malicious-users": len(mine), "malicious-rows": rows_sent}

        return craft

    # ------------------------------------------------------------------ server: the report
    def target_ids(self, data, seed: int) -> np.ndarray:
        return self.targets(data, seed)

    def report(self, ctx) -> dict:
        data, c = ctx.data, self.config
        targets = self.targets(data, int(ctx.cfg.seed))
        section = {"name": self.name, "injected_users": int(len(malicious_users(data))),
                   "malicious_fraction": len(malicious_users(data)) / max(1, len(data.genuine())),
                   "kappa": int(c.kappa), "public_fraction": float(c.public_fraction),
                   "targets": [str(data.item_ids[t]) for t in targets]} | self.target_section(ctx)
        if "history" in section and str(ctx.cfg.federation.sampling) == "permutation":
            from fedrec.federated.device_node import per_round_count, rounds_per_pass
            from fedrec.run_config import federation

            per_pass = rounds_per_pass(data.n_users, per_round_count(federation(ctx.cfg), data.n_users))
            for rnd, entry in section["history"].items():  # which pass over all clients the round ends
                entry["pass"] = int(rnd) / per_pass
            section["pass"] = section["round"] / per_pass
        return section
