"""Cross-device local training: every sampled user is an independent client, vectorised.

A Flower node hosting a shard of users trains each sampled user from the global model on the user's
own data, exactly as if the user were its own Flower client (flat per-user FedAvg), but all users
of a chunk at once:

1. per-user copies of the global parameters are stacked along a new leading axis;
2. each local step computes every user's gradient with ``torch.func.vmap(grad(loss))`` and applies
   the user's own optimiser (SGD or Adam, fresh each round, as a new client would) to its copy;
3. randomness is explicit and keyed by (seed, round, user, step) (``fedrec.rng``), so a user's draws
   do not depend on which node hosts it or how many users share its chunk;
4. private parameters (tables indexed by user, e.g. BPR's user embeddings) enter each user's
   function as a one-row table: the user's own row, kept by the node between rounds;
5. a sequence model's users also carry their padded training sequence (``seq``, (U, L)), vmapped
   with their rows, so one user is still one example.

Fast path: with plain SGD and one local step, a user's update is ``-lr * grad_u`` at the global
parameters, which is linear, so the weighted sum over users is one backward pass of the weighted
loss sum — the same numbers (to float tolerance) at the cost of a centralised mini-batch step.
It is used only when the node uploads the sum (no per-user updates requested).

Device: everything runs where ``rows`` are (the model's device); the users' draws are hashed there.
``rows`` is a (U, n_items) tensor or anything sliced the same way (a node's ``ChunkedRows`` densifies
each chunk on demand). Precision: under ``precision=bf16`` the users' forward passes run in
``torch.autocast`` (``fedrec/precision.py``); per-user parameters, gradients, optimiser moments and the
folds stay fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.func import functional_call, grad, vmap

from fedrec.devices import model_device
from fedrec.errors import ConfigError
from fedrec.models.base import Batch, Recommender, input_matrix
from fedrec.precision import autocast
from fedrec.rng import UserRandom

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


@dataclass
class LocalTraining:
    optimizer: str = "sgd"  # sgd | adam: each user's local optimiser, fresh every round
    lr: float = 0.1
    local_epochs: int = 1  # steps per user (a user-vector user is one example)
    chunk_size: int | None = None  # users vectorised together; None: from memory_budget_gb
    memory_budget_gb: float = 2.0  # for the per-user path: stacked parameters, grads, optimiser state
    prox_mu: float = 0.0  # FedProx: each user adds mu/2 ||w - w_global||^2 to its local loss

    def chunk_for(self, n_params: int) -> int:
        """Users per chunk so that per-user copies (params, grads, Adam moments, slack) fit the budget."""
        if self.chunk_size:
            return int(self.chunk_size)
        copies = 4 + (2 if self.optimizer == "adam" else 0)
        return max(1, int(self.memory_budget_gb * 2**30 // (copies * 4 * max(n_params, 1))))

    def __post_init__(self):
        if self.optimizer not in ("sgd", "adam"):
            raise ConfigError(f"federation.local_optimizer: expected sgd or adam, got {self.optimizer!r}")
        if self.lr <= 0:
            raise ConfigError(f"federation.local_lr: must be positive, got {self.lr}")
        if self.local_epochs < 1:
            raise ConfigError(f"train.local_epochs: must be >= 1, got {self.local_epochs}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ConfigError(f"federation.chunk_size: must be >= 1, got {self.chunk_size}")
        if self.memory_budget_gb <= 0:
            raise ConfigError(f"federation.memory_budget_gb: must be positive, got {self.memory_budget_gb}")
        if self.prox_mu < 0:
            raise ConfigError(f"strategy.proximal_mu: must be >= 0, got {self.prox_mu}")


@dataclass
class UserUpdates:
    """What a node computed for its sampled users."""

    users: np.ndarray  # global user ids, in the order of the stacked tensors
    weights: torch.Tensor  # (U,) aggregation weights
    mean: dict[str, torch.Tensor] | None  # weighted mean of the users' updated global parameters
    per_user: dict[str, torch.Tensor] | None  # (U, ...) updated global parameters per user
    private: dict[str, torch.Tensor]  # (U, ...) updated private rows
    loss: float  # weighted mean first-step loss
    folded: object = None  # the result of a custom fold (e.g. user-level DP's clipped sum)


# What happens to each chunk's trained users: memory stays at one chunk unless the fold keeps them all.
class MeanFold:
    """Weighted mean of the users' updated global parameters."""

    def __init__(self, g0: dict[str, torch.Tensor]):
        self.sum = {n: torch.zeros_like(v) for n, v in g0.items()}
        self.weight = 0.0

    def add(self, params: dict[str, torch.Tensor], w: torch.Tensor, users: np.ndarray | None = None) -> None:
        for n, p in params.items():
            self.sum[n] += (p * w.view(-1, *([1] * (p.dim() - 1)))).sum(0)
        self.weight += float(w.sum())

    def add_mean(self, mean: dict[str, torch.Tensor], weight: float) -> None:
        """Add users already averaged elsewhere (their weighted mean and total weight)."""
        for n, v in mean.items():
            self.sum[n] += v * weight
        self.weight += weight

    def result(self) -> dict[str, torch.Tensor]:
        return {n: v / self.weight for n, v in self.sum.items()}


@dataclass
class TouchedRows:
    """A row-sparse table's per-user updates (the upload of ``protocol.row_keys``): user u changed rows
    ``rows[offsets[u]:offsets[u + 1]]`` (increasing) by ``values[offsets[u]:offsets[u + 1]]`` (deltas)."""

    offsets: torch.Tensor  # (U + 1,) int64
    rows: torch.Tensor  # (nnz,) int64
    values: torch.Tensor  # (nnz, ...) trained minus global rows


class StackFold:
    """Every user's updated global parameters, stacked (U, ...): memory grows with the users.

    Tables named in ``row_sparse`` keep, per user, only the rows whose delta is nonzero (the items the
    user's loss touched), as :class:`TouchedRows`: encoded chunk by chunk, so the node never holds
    (U, n_items, d) for them, only the chunk it is training."""

    def __init__(self, g0: dict[str, torch.Tensor], row_sparse: set[str] | frozenset = frozenset()):
        self.g0, self.row_sparse = g0, set(row_sparse)
        self.parts: dict[str, list] = {n: [] for n in g0}

    def add(self, params: dict[str, torch.Tensor], w: torch.Tensor, users: np.ndarray | None = None) -> None:
        for n, p in params.items():
            if n in self.row_sparse:
                delta = p - self.g0[n].unsqueeze(0)
                # "touched" = any nonzero coordinate: exact whatever made the delta (an optimiser's step,
                # an attack's transform); NaN counts as touched, so the server still sees and rejects it
                touched = (delta.reshape(*delta.shape[:2], -1) != 0).any(-1)
                u, r = touched.nonzero(as_tuple=True)  # row-major: grouped by user, rows increasing
                self.parts[n].append((touched.sum(1), r, delta[u, r]))
            else:
                self.parts[n].append(p)

    def result(self) -> dict[str, torch.Tensor | TouchedRows]:
        out: dict[str, torch.Tensor | TouchedRows] = {}
        for n, v in self.parts.items():
            if n in self.row_sparse:
                counts = torch.cat([c for c, _, _ in v])
                offsets = torch.cat([torch.zeros(1, dtype=torch.long, device=counts.device), torch.cumsum(counts, 0)])
                out[n] = TouchedRows(offsets, torch.cat([r for _, r, _ in v]), torch.cat([d for _, _, d in v]))
            else:
                out[n] = torch.cat(v)
        return out


class _LossOf(torch.nn.Module):
    """``forward`` = the wrapped model's per-example loss, so ``functional_call`` can drive it."""

    def __init__(self, model: Recommender):
        super().__init__()
        self.m = model

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.m.loss(batch)


def _inputs(x: torch.Tensor, seq: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """A user's inputs as one pytree, so vmap slices rows and sequences together."""
    return {"x": x} if seq is None else {"x": x, "seq": seq}


def _single_user_loss(wrapper, buffers):
    def loss(gparams, pparams, inp, rand):
        params = {f"m.{k}": v for k, v in gparams.items()}
        params.update({f"m.{k}": v.unsqueeze(0) for k, v in pparams.items()})  # one-row tables
        seq = inp["seq"].unsqueeze(0) if "seq" in inp else None
        batch = Batch(users=torch.zeros(1, dtype=torch.long, device=inp["x"].device), x=inp["x"].unsqueeze(0), seq=seq,
                      rand={k: v.unsqueeze(0) for k, v in rand.items()})
        return functional_call(wrapper, {**params, **buffers}, (batch,))[0]
    return loss


def schedule_position(model: Recommender, round_: int, step: int, local_epochs: int) -> None:
    """Annealing counters of a cross-device step: every user is one example, so one local step is one
    epoch and one update; after round r-1 the global model has seen (r-1) * local_epochs of them."""
    done = (int(round_) - 1) * int(local_epochs) + int(step)
    model.set_schedule_position(epochs=done, updates=done)


def train_users(model: Recommender, users: np.ndarray, rows: torch.Tensor, weights: torch.Tensor,
                private_rows: dict[str, torch.Tensor], local: LocalTraining, seed: int, round_: int,
                per_user: bool, schedule_round: int | None = None, fold=None,
                seq: torch.Tensor | None = None) -> UserUpdates:
    """Train every user in ``users`` (rows (U, n_items); ``seq`` (U, L) for sequence models) from the
    model's current global parameters.

    ``round_`` keys the users' random draws; ``schedule_round`` (default ``round_``) places the
    model's annealing schedule (MultVAE's KL weight, L-DiffRec's lambda and KL weight).
    What leaves: the weighted mean (``per_user=False``), every user's model (``per_user=True``), or
    what ``fold`` (an object with ``add(params, weights, users)`` / ``result()``) makes of each chunk.
    """
    schedule_round = round_ if schedule_round is None else schedule_round
    model.train()
    private_names = sorted(model.private_parameter_names())
    gnames = [n for n, _ in model.named_parameters() if n not in private_names]
    g0 = {n: p.detach() for n, p in model.named_parameters() if n in gnames}
    wrapper = _LossOf(model)
    buffers = {f"m.{k}": v for k, v in model.named_buffers()}
    wsum = float(weights.sum())
    if len(users) == 0:
        return UserUpdates(users, weights, None, None, {}, float("nan"))

    if local.optimizer == "sgd" and local.local_epochs == 1 and not per_user:
        # FedProx's proximal gradient mu (w - w_global) is zero at the first step: nothing to add.
        if fold is None:
            schedule_position(model, schedule_round, 0, local.local_epochs)
            return _sgd_one_step_sum(model, users, rows, weights, private_rows, local, seed, round_, g0,
                                     private_names, seq)
        changed = fold.changed(users) if hasattr(fold, "changed") and isinstance(rows, torch.Tensor) else None
        if changed is not None and not changed.all():
            return _linear_beside_transformed(model, users, rows, weights, private_rows, local, seed, round_,
                                              schedule_round, fold, seq, changed, g0, private_names)

    chunk = local.chunk_for(sum(v.numel() for v in g0.values()))
    f = _single_user_loss(wrapper, buffers)
    # One plain SGD step (FedProx's term is zero there): every user's gradient at the shared global point,
    # so the global parameters are not batched (no per-user copies); otherwise each user's own copy is.
    one_sgd_step = local.optimizer == "sgd" and local.local_epochs == 1
    g_dim = None if one_sgd_step else 0
    vgrad = vmap(grad(f, argnums=(0, 1), has_aux=False), in_dims=(g_dim, 0, 0, 0), randomness="error")
    vloss = vmap(f, in_dims=(g_dim, 0, 0, 0), randomness="error")
    custom = fold is not None
    fold = fold if custom else (StackFold(g0) if per_user else MeanFold(g0))
    new_private: dict[str, list[torch.Tensor]] = {n: [] for n in private_names}
    loss_acc = 0.0
    for start in range(0, len(users), chunk):
        sl = slice(start, start + chunk)
        u, x, w = users[sl], rows[sl], weights[sl]
        s = None if seq is None else seq[sl]
        inp = _inputs(x, s)
        c = len(u)
        pp = {n: private_rows[n][sl].clone() for n in private_names}
        if one_sgd_step:  # every user starts from g0: per-example gradients at the shared point, no copies
            schedule_position(model, schedule_round, 0, 1)  # before the draws: they carry annealed weights
            rand = model.draw_randomness(Batch(users=torch.as_tensor(u, device=x.device), x=x, seq=s),
                                         UserRandom(seed, round_, u, 0, x.device))
            with autocast(model):
                with torch.no_grad():
                    loss_acc += float((vloss(g0, pp, inp, rand).float() * w).sum())
                gg, pg = vgrad(g0, pp, inp, rand)
            with torch.no_grad():
                gp = {n: g0[n].unsqueeze(0) - local.lr * gg[n] for n in g0}
                for n in pp:
                    pp[n] -= local.lr * pg[n]
                del gg, pg
                fold.add(gp, w, u)
                for n in private_names:
                    new_private[n].append(pp[n])
            del gp
            continue
        gp = {n: v.unsqueeze(0).expand(c, *v.shape).clone() for n, v in g0.items()}
        state = _AdamState(gp, pp) if local.optimizer == "adam" else None
        for step in range(local.local_epochs):
            schedule_position(model, schedule_round, step, local.local_epochs)
            rand = model.draw_randomness(Batch(users=torch.as_tensor(u, device=x.device), x=x, seq=s),
                                         UserRandom(seed, round_, u, step, x.device))
            with autocast(model):  # precision=bf16: bf16 products, fp32 per-user params, grads and steps
                if step == 0:
                    with torch.no_grad():
                        loss_acc += float((vloss(gp, pp, inp, rand).float() * w).sum())
                gg, pg = vgrad(gp, pp, inp, rand)
            with torch.no_grad():
                if local.prox_mu > 0:  # FedProx per user: grad of mu/2 ||w - w_global||^2
                    for n in gg:
                        gg[n] = gg[n] + local.prox_mu * (gp[n] - g0[n].unsqueeze(0))
                if state is None:
                    for n in gp:
                        gp[n] -= local.lr * gg[n]
                    for n in pp:
                        pp[n] -= local.lr * pg[n]
                else:
                    state.step(gp, pp, gg, pg, local.lr)
        with torch.no_grad():
            fold.add(gp, w, u)
            for n in private_names:
                new_private[n].append(pp[n])
        del gp, state
    out = fold.result()
    return UserUpdates(
        users=users, weights=weights, mean=None if custom or per_user else out,
        per_user=out if per_user and not custom else None,
        private={n: torch.cat(v) for n, v in new_private.items()}, loss=loss_acc / wsum,
        folded=out if custom else None)


class _AdamState:
    """Adam moments per user (torch.optim.Adam's update, weight decay 0), vectorised."""

    def __init__(self, gp, pp):
        self.t = 0
        self.m = {n: torch.zeros_like(v) for n, v in {**gp, **pp}.items()}
        self.v = {n: torch.zeros_like(v) for n, v in {**gp, **pp}.items()}

    def step(self, gp, pp, gg, pg, lr):
        self.t += 1
        b1, b2 = ADAM_BETAS
        bc1, bc2 = 1 - b1 ** self.t, 1 - b2 ** self.t
        for params, grads in ((gp, gg), (pp, pg)):
            for n in params:
                g = grads[n]
                self.m[n].mul_(b1).add_(g, alpha=1 - b1)
                self.v[n].mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = (self.v[n].sqrt() / bc2 ** 0.5).add_(ADAM_EPS)
                params[n].addcdiv_(self.m[n], denom, value=-lr / bc1)


def _sgd_one_step_sum(model, users, rows, weights, private_rows, local, seed, round_, g0, private_names, seq=None):
    """Linear case: sum_u w_u (theta - lr g_u) = theta - lr * grad(sum_u w_u L_u), one backward."""
    wsum = float(weights.sum())
    grads = {n: torch.zeros_like(v) for n, v in g0.items()}
    new_private = {n: [] for n in private_names}
    wrapper = _LossOf(model)
    buffers = {f"m.{k}": v for k, v in model.named_buffers()}
    gleaf = {n: v.clone().requires_grad_(True) for n, v in g0.items()}
    loss_acc = 0.0
    chunk = int(local.chunk_size or 1024)  # one mini-batch of users: memory as a centralised step
    for start in range(0, len(users), chunk):
        sl = slice(start, start + chunk)
        u, x, w = users[sl], rows[sl], weights[sl]
        s = None if seq is None else seq[sl]
        # The chunk's private rows form a small table addressed by positions 0..c-1.
        pleaf = {n: private_rows[n][sl].clone().requires_grad_(True) for n in private_names}
        batch = Batch(users=torch.arange(len(u), device=x.device), x=x, seq=s)
        batch.rand = model.draw_randomness(Batch(users=torch.as_tensor(u, device=x.device), x=x, seq=s),
                                           UserRandom(seed, round_, u, 0, x.device))
        state = {f"m.{k}": v for k, v in {**gleaf, **pleaf}.items()} | buffers
        with autocast(model):  # precision=bf16: bf16 products; the loss, gradients and the step stay fp32
            per_example = functional_call(wrapper, state, (batch,)).float()
        leaves = [*gleaf.values(), *pleaf.values()]
        gs = torch.autograd.grad((per_example * w).sum(), leaves, allow_unused=True)
        loss_acc += float((per_example.detach() * w).sum())
        for n, g in zip(gleaf, gs[:len(gleaf)]):
            if g is not None:
                grads[n] += g
        for n, g in zip(pleaf, gs[len(gleaf):]):
            g = torch.zeros_like(pleaf[n]) if g is None else g
            # the user's own step is unweighted: divide its aggregation weight out
            new_private[n].append(pleaf[n].detach() - local.lr * g / w.view(-1, *([1] * (g.dim() - 1))))
    mean = {n: g0[n] - local.lr * grads[n] / wsum for n in g0}
    return UserUpdates(users=users, weights=weights, mean=mean, per_user=None,
                       private={n: torch.cat(v) for n, v in new_private.items()}, loss=loss_acc / wsum)


def _linear_beside_transformed(model, users, rows, weights, private_rows, local, seed, round_, schedule_round,
                               fold, seq, changed: np.ndarray, g0, private_names) -> UserUpdates:
    """One SGD step under per-user transforms that change only some users (an attack's malicious clients).

    The users no transform changes are summed by the linear one-backward path (``_sgd_one_step_sum``:
    sum_u w_u (theta - lr g_u)), added to the fold's mean as they are; only the ``changed`` users are
    trained one by one (vmap) and pass through the transforms. The same arithmetic as sending everyone
    through the fold (each user's random draws are keyed by its id, not its position), up to float
    summation order, at the cost of a clean round plus the changed users'
    (``tests/test_poisoning.py::test_transformed_users_beside_the_linear_sum_equal_the_full_fold``)."""
    keep, mine = np.flatnonzero(~changed), np.flatnonzero(changed)

    def part(idx):
        return (users[idx], rows[idx], weights[idx], {n: t[idx] for n, t in private_rows.items()},
                None if seq is None else seq[idx])

    u, x, w, priv, s = part(keep)
    schedule_position(model, schedule_round, 0, local.local_epochs)
    linear = _sgd_one_step_sum(model, u, x, w, priv, local, seed, round_, g0, private_names, s)
    fold.add_mean(linear.mean, float(w.sum()))
    losses = float(linear.loss) * float(w.sum())
    private = {n: torch.empty_like(t) for n, t in private_rows.items()}
    for n, v in linear.private.items():
        private[n][keep] = v
    if len(mine) == 0:
        return UserUpdates(users=users, weights=weights, mean=None, per_user=None, private=private,
                           loss=losses / float(weights.sum()), folded=fold.result())
    u, x, w, priv, s = part(mine)
    rest = train_users(model, u, x, w, priv, local, seed, round_, False, schedule_round, fold, s)
    losses += float(rest.loss) * float(w.sum())
    for n, v in rest.private.items():
        private[n][mine] = v
    return UserUpdates(users=users, weights=weights, mean=None, per_user=None, private=private,
                       loss=losses / float(weights.sum()), folded=rest.folded)


def personalised_scorer(model: Recommender, data, users: np.ndarray, local: LocalTraining, seed: int,
                        round_: int, schedule_round: int | None = None):
    """Scores from per-user models: each user first takes ``local.local_epochs`` steps on its own data.

    Returns ``score_fn(user_ids, rows)`` for ``evaluate_scores``; the personalised parameters never
    leave the node and are discarded after scoring.
    """
    private_names = sorted(model.private_parameter_names())
    params = dict(model.named_parameters())
    counts = np.diff(data.train.indptr)[users]
    trainable = users[counts > 0]
    device = model_device(model)
    rows = torch.from_numpy(input_matrix(model, data)[trainable].toarray().astype(np.float32)).to(device)
    private_rows = {n: params[n].detach()[trainable].clone() for n in private_names}
    upd = train_users(model, trainable, rows, torch.ones(len(trainable), device=device), private_rows, local, seed,
                      round_, per_user=True, schedule_round=schedule_round)
    where = {int(u): i for i, u in enumerate(trainable)}
    wrapper = _Scores(model)
    buffers = {f"m.{k}": v for k, v in model.named_buffers()}

    def one(gparams, pparams, x):
        state = {f"m.{k}": v for k, v in gparams.items()}
        state.update({f"m.{k}": v.unsqueeze(0) for k, v in pparams.items()})
        return functional_call(wrapper, {**state, **buffers}, (x.unsqueeze(0),))[0]

    vscore = vmap(one, in_dims=(0, 0, 0), randomness="error")
    chunk = local.chunk_for(sum(v[0].numel() for v in upd.per_user.values()))

    @torch.no_grad()
    def score(user_ids: np.ndarray, x: torch.Tensor) -> torch.Tensor:
        model.eval()
        out = torch.empty(len(user_ids), x.shape[1], device=x.device)
        has = np.array([int(u) in where for u in user_ids])
        if (~has).any():  # users without training data keep the global model
            from fedrec.models.base import Batch

            out[torch.from_numpy(~has).to(x.device)] = model.scores(
                Batch(users=torch.as_tensor(user_ids[~has], device=x.device), x=x[~has]))
        idx = np.flatnonzero(has)
        for start in range(0, len(idx), chunk):
            sel = idx[start:start + chunk]
            pos = [where[int(u)] for u in user_ids[sel]]
            g = {n: v[pos] for n, v in upd.per_user.items()}
            p = {n: v[pos] for n, v in upd.private.items()}
            out[torch.from_numpy(sel).to(x.device)] = vscore(g, p, x[sel])
        return out

    return score


class _Scores(torch.nn.Module):
    def __init__(self, model: Recommender):
        super().__init__()
        self.m = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.m.scores(Batch(users=torch.zeros(x.shape[0], dtype=torch.long, device=x.device), x=x))
