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

The fake clients, the kappa rows, the clip, the upload scaling and both victims' item sides are
:mod:`attacks.crafted`'s (shared with PipAttack, A-ra, A-hum, the untargeted and random-update attacks);
this module adds the public interactions, the approximation of the genuine users and the loss.

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

import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from attacks.crafted import (CraftCenter, CraftConfig, CraftedItemAttack, FakeClients, check_positive,  # noqa: F401
                             denoise, denoiser_layout, item_gradient, malicious_users, promotion_loss, upload_scale)
from fedrec.errors import ConfigError
from fedrec.mechanisms import register
from fedrec.rng import numpy_stream

STREAM_FRA = 0x46524154  # "FRAT": this module's randomness
_PUBLIC, _SHUFFLE, _NEG = 1, 2, 3


@dataclass(frozen=True)
class FedRecAttackConfig(CraftConfig):
    public_fraction: float = 0.01  # share of each genuine user's training items the attacker knows (ceil per user)
    attack_lr: float = 0.01  # Adam rate of the approximated user embeddings
    attack_batch_size: int = 256  # users per Adam step
    top_k: int = 10  # the item to beat is the top_k-th of each user's approximated ranking

    def __post_init__(self):
        super().__post_init__()
        if not 0 < float(self.public_fraction) <= 1:
            raise ConfigError(f"attack.public_fraction: must be in (0, 1], got {self.public_fraction}")
        check_positive(self, "attack_lr")
        check_positive(self, "attack_batch_size", "top_k", integer=True)


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


class Center(CraftCenter):
    """FedRecAttack's coordinating attacker of one node (one gradient per round, split among the round's
    malicious clients): approximated embeddings (MF) with their Adam moments, and each client's rows."""

    def __init__(self, config: FedRecAttackConfig, data, seed: int, side, state: dict):
        self.public = public_interactions(data, float(config.public_fraction), int(seed))
        self.known = np.flatnonzero(np.diff(self.public.indptr) > 0)  # users with public interactions
        super().__init__(config, data, seed, side, state)

    def initial_state(self) -> dict:
        if self.side.kind != "mf":  # DiffRec: an approximated user is its public row, nothing to fit
            return {}
        g = torch.Generator().manual_seed(self.seed)
        emb = (torch.randn(len(self.known), self.side.width, generator=g) * 0.01).numpy()
        return {"users_emb": emb, "adam_m": np.zeros_like(emb), "adam_v": np.zeros_like(emb),
                "adam_t": np.zeros(1, np.int64)}

    def users(self, rnd: int) -> torch.Tensor:
        """The approximated genuine users: embeddings fitted to the public interactions (MF), or the public
        rows themselves (DiffRec's input)."""
        if self.side.kind == "mf":
            return self._approximate(self.side.matrix, rnd)
        return torch.from_numpy(self.public[self.known].toarray())

    def gradient(self, targets: np.ndarray, rnd: int, k: int | None = None) -> torch.Tensor:
        """The round's attack gradient w.r.t. the item side (n_items, width)."""
        users = self.users(rnd)
        seen = torch.from_numpy(self.public[self.known].toarray())
        t = torch.from_numpy(targets)
        return item_gradient(self.side, lambda m: promotion_loss(self.side.scores(users, m), seen, t,
                                                                 int(self.c.top_k)))

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


@register
class FedRecAttack(CraftedItemAttack):
    name = "fedrecattack"
    Config = FedRecAttackConfig
    center = Center

    def report(self, ctx) -> dict:
        data = ctx.data
        section = super().report(ctx)
        section = {k: v for k, v in section.items() if k != "targets"} | {
            "public_fraction": float(self.config.public_fraction), "targets": section["targets"]}
        if "history" in section and str(ctx.cfg.federation.sampling) == "permutation":
            from fedrec.federated.device_node import per_round_count, rounds_per_pass
            from fedrec.run_config import federation

            per_pass = rounds_per_pass(data.n_users, per_round_count(federation(ctx.cfg), data.n_users))
            for rnd, entry in section["history"].items():  # which pass over all clients the round ends
                entry["pass"] = int(rnd) / per_pass
            section["pass"] = section["round"] / per_pass
        return section
