"""The machinery every item-side model-poisoning attack shares (FedRecAttack, PipAttack, A-ra, A-hum, the
untargeted hard-sample attack, random updates), factored out of :mod:`attacks.fedrecattack`.

Threat (the setting of Rong et al., ICDE 2022, which the later attacks of the FedRec literature reuse):
``fraction`` x (genuine users) fake clients with no data are *added* to the population
(:class:`FakeClients`: empty, ``injected`` rows, so no metric counts them; they are sampled into rounds like
every client). In each round that samples some of them, a malicious client's upload is replaced
(``user_transform`` on the node's fold) by crafted item rows:

1. an attack-specific *center* (:class:`CraftCenter` subclasses) computes an attack gradient w.r.t. the
   item side of the global model the round started from (:class:`MFItems` / :class:`DenoiserItems`);
   ``shared`` centers compute one per round and split it among the round's malicious clients (each sends
   what its predecessors left: FedRecAttack), the others one per malicious client (A-ra, A-hum, PipAttack,
   whose official clients each craft their own);
2. each malicious client sends at most ``kappa`` item rows (FedRecAttack's items_limit): the promoted
   targets and ``kappa - len(targets)`` items drawn once, at its first round, with probability
   proportional to the gradient's row norms (:meth:`CraftCenter.rows_of`), each row clipped to
   ``grad_clip`` (:func:`take_rows`);
3. as a delta (what fedrec clients upload) the rows are ``-federation.local_lr x upload_scale x`` the
   clipped gradient: ``upload_scale`` is 1 under ``strategy=row_clip_sum`` (the paper's clipped sum) and
   the round's sampled-user count under a mean (``strategy=fedavg``), so the server applies
   ``local_lr x`` each malicious client's clipped rows either way (:func:`upload_scale`).

The item side (what the attacker crafts), per victim model:

* BPR-MF (``model=bpr``): the item table; item j's row is its embedding; a "user" the attacker reasons
  about is a d-vector and the score is ``u . v_j``.
* DiffRec (``model=diffrec``): no item table and no user factor -- its input is the user's history. Item
  j's "row" is its output-layer row, its output bias and its input-layer column (one
  (n_items, h_out + 1 + h_in) matrix), the parameters that belong to one item (what kappa limits); hidden
  layers and the time embedding get a zero delta. A "user" is an input row (n_items,) and the
  differentiable surrogate of DiffRec's score is the denoiser's t = 0 prediction of x0 from it
  (:func:`denoise`; the ranking runs the reverse chain, which feeds that prediction back in).

Node state (``keeps_node_state``): the center's named arrays (each malicious client's rows, plus what the
attack keeps, e.g. FedRecAttack's approximated embeddings), saved by the node between rounds.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import scipy.sparse as sp
import torch

from attacks.shilling import TARGET_SELECTIONS, select_targets
from attacks.target_tracking import TargetTracking
from fedrec.errors import ConfigError
from fedrec.mechanisms import Mechanism, changes_only
from fedrec.rng import numpy_stream

STREAM_CRAFT = 0x46524154  # "FRAT": the row choice (FedRecAttack's stream, kept so its runs do not change)
_CHOICE = 4
ID_PREFIX = "fedrecattack-"  # the fake clients' user ids (every crafted attack's: one population rule)
MASKED = -float(1 << 10)  # a score that never enters a top-K (FedRecAttack's official mask)


@dataclass(frozen=True)
class CraftConfig:
    """The threat every crafted attack shares (budget, cap, targets, upload scaling)."""

    fraction: float = 0.05  # malicious clients added, per genuine user (official clients_limit; int() of the product)
    count: int | None = None  # exact number instead
    kappa: int = 60  # at most this many item rows per malicious upload (official items_limit)
    grad_clip: float = 1.0  # row norm of the crafted gradient (the server's clip, in gradient units)
    targets: tuple[str, ...] | None = None
    target_selection: str = "random"
    n_targets: int = 1
    upload_scale: float | None = None  # crafted delta = -local_lr x upload_scale x clipped gradient; None: auto

    def __post_init__(self):
        if self.count is not None and (isinstance(self.count, bool) or int(self.count) < 0):
            raise ConfigError(f"attack.count: expected an integer >= 0 or null, got {self.count!r}")
        if not (isinstance(self.fraction, (int, float)) and 0 <= float(self.fraction) and math.isfinite(self.fraction)):
            raise ConfigError(f"attack.fraction: expected a share >= 0, got {self.fraction!r}")
        if int(self.kappa) < 1:
            raise ConfigError(f"attack.kappa: must be >= 1, got {self.kappa}")
        if self.upload_scale is not None and not float(self.upload_scale) > 0:
            raise ConfigError(f"attack.upload_scale: must be positive or null, got {self.upload_scale}")
        if not float(self.grad_clip) > 0:
            raise ConfigError(f"attack.grad_clip: must be positive, got {self.grad_clip}")
        if int(self.n_targets) < 1:
            raise ConfigError(f"attack.n_targets: must be >= 1, got {self.n_targets}")
        if self.target_selection not in TARGET_SELECTIONS:
            raise ConfigError(f"attack.target_selection: expected one of {', '.join(TARGET_SELECTIONS)}, "
                              f"got {self.target_selection!r}")
        if self.targets is not None:
            targets = (self.targets,) if isinstance(self.targets, (str, int)) else self.targets
            object.__setattr__(self, "targets", tuple(str(t) for t in targets))

    def n_fake(self, n_genuine: int) -> int:
        return int(self.count) if self.count is not None else int(float(self.fraction) * n_genuine)

    def crafts(self) -> bool:
        return not (self.count == 0 or (self.count is None and float(self.fraction) == 0))


def check_positive(c, *keys: str, integer: bool = False) -> None:
    """ConfigError naming ``attack.<key>`` unless every key is > 0 (>= 1 for integers)."""
    for key in keys:
        value = getattr(c, key)
        if (int(value) < 1) if integer else not float(value) > 0:
            raise ConfigError(f"attack.{key}: must be {'>= 1' if integer else 'positive'}, got {value}")


class FakeClients:
    """Data transform: ``n`` injected users with empty training rows (the malicious clients)."""

    def __init__(self, config: CraftConfig):
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


# ---------------------------------------------------------------------------------------- item sides
class MFItems:
    """BPR-MF's item side: the item table ``item_emb.weight`` (n_items, d); a user is a d-vector."""

    kind = "mf"
    name = "item_emb.weight"

    def __init__(self, start: dict):
        self.matrix = start[self.name].detach().float().cpu()
        self.width = int(self.matrix.shape[1])

    def scores(self, users: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
        return users @ matrix.T

    def row_norms(self, deltas: dict, idx) -> torch.Tensor:
        """(len(idx), n_items) the L2 norm of each item row of the users ``idx``'s deltas."""
        return deltas[self.name][idx].float().norm(dim=-1).cpu()

    def write(self, out: dict, i: int, rows: torch.Tensor, part: torch.Tensor) -> None:
        """User i uploads ``part`` (the delta of the item rows ``rows``) and nothing else."""
        for n in out:
            out[n][i] = 0.0
        d = out[self.name]
        d[i, rows.to(d.device)] = part.to(d.dtype).to(d.device)


def denoiser_layout(start: dict) -> tuple[str, str, str]:
    """DiffRec's item-indexed tensors: (input layer weight, whose first n_items columns are the items;
    output layer weight, a row per item; output layer bias, one per item)."""
    n_out = 1 + max(int(k.split(".")[2]) for k in start if k.startswith("denoiser.out_layers."))
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


class DenoiserItems:
    """DiffRec's item side: item j's slice is (output row, output bias, input column), one
    (n_items, h_out + 1 + h_in) matrix; a user is an input row (n_items,)."""

    kind = "denoiser"

    def __init__(self, start: dict, emb_size: int, norm: bool):
        self.w_in, self.w_out, self.b_out = denoiser_layout(start)
        self.params = {k: v.detach().float().cpu() for k, v in start.items()}
        self.emb_size, self.norm = int(emb_size), bool(norm)
        self.n_items = int(self.params[self.w_out].shape[0])
        self.h_out = int(self.params[self.w_out].shape[1])
        self.matrix = self.slices(self.params[self.w_out], self.params[self.b_out], self.params[self.w_in])
        self.width = int(self.matrix.shape[1])

    def slices(self, w_out, b_out, w_in) -> torch.Tensor:
        return torch.cat([w_out, b_out[:, None], w_in[:, :self.n_items].T], dim=1)

    def split(self, matrix: torch.Tensor) -> dict[str, torch.Tensor]:
        """The parameters whose item-indexed parts are ``matrix`` (the time-embedding columns of the
        input layer unchanged)."""
        w_in = torch.cat([matrix[:, self.h_out + 1:].T, self.params[self.w_in][:, self.n_items:]], dim=1)
        return {self.w_out: matrix[:, :self.h_out], self.b_out: matrix[:, self.h_out], self.w_in: w_in}

    def scores(self, x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
        return denoise(self.params | self.split(matrix), x, self.emb_size, self.norm)

    def row_norms(self, deltas: dict, idx) -> torch.Tensor:
        sq = (deltas[self.w_out][idx].float().pow(2).sum(-1) + deltas[self.b_out][idx].float().pow(2)
              + deltas[self.w_in][idx][:, :, :self.n_items].float().pow(2).sum(1))
        return sq.sqrt().cpu()

    def write(self, out: dict, i: int, rows: torch.Tensor, part: torch.Tensor) -> None:
        for n in out:
            out[n][i] = 0.0
        dev = out[self.w_out].device
        r = rows.to(dev)
        out[self.w_out][i, r] = part[:, :self.h_out].to(out[self.w_out].dtype).to(dev)
        out[self.b_out][i, r] = part[:, self.h_out].to(out[self.b_out].dtype).to(dev)
        out[self.w_in][i][:, r] = part[:, self.h_out + 1:].T.to(out[self.w_in].dtype).to(dev)


def item_side(cfg, start: dict):
    if str(cfg.model.name) == "diffrec":
        return DenoiserItems(start, int(cfg.model.emb_size), bool(cfg.model.norm))
    return MFItems(start)


def item_gradient(side, loss_fn) -> torch.Tensor:
    """d loss_fn(matrix) / d matrix at the side's current item matrix (zero where the loss is constant)."""
    leaf = side.matrix.clone().requires_grad_(True)
    loss = loss_fn(leaf)
    if not loss.requires_grad:
        return torch.zeros_like(side.matrix)
    (g,) = torch.autograd.grad(loss, leaf)
    return g


def promotion_loss(scores: torch.Tensor, seen: torch.Tensor, targets: torch.Tensor, top_k: int) -> torch.Tensor:
    """FedRecAttack's loss: for each user and target, ``g(s(u, neg) - s(u, target))`` with neg the user's
    top_k-th item (seen items and the targets excluded), g(x) = x for x >= 0 and exp(x) - 1 below; users
    who have seen the target are left out."""
    with torch.no_grad():
        masked = scores.masked_fill(seen > 0, MASKED)
        masked[:, targets] = MASKED
        neg = torch.topk(masked, top_k, dim=1).indices[:, -1]
    rows = torch.arange(len(scores))
    total = scores.new_zeros(())
    for t in targets.tolist():
        keep = seen[:, t] <= 0
        d = scores[rows[keep], neg[keep]] - scores[keep, t]
        total = total + torch.where(d < 0, torch.exp(torch.clamp(d, max=0.0)) - 1, d).sum()
    return total


# ---------------------------------------------------------------------------------------- the center
class CraftCenter:
    """The attacker of one node: computes attack gradients and keeps each malicious client's rows, as named
    arrays (node state). Subclasses implement :meth:`gradient` (and may keep more state)."""

    shared = True  # one gradient per round, split among the round's malicious clients; False: one per client

    def __init__(self, config: CraftConfig, data, seed: int, side, state: dict):
        self.c, self.data, self.seed, self.side = config, data, int(seed), side
        self.bad = malicious_users(data)
        if "rows" in state:
            self.state = {k: np.asarray(v) for k, v in state.items()}
        else:
            self.state = {"rows": np.full((len(self.bad), int(config.kappa)), -1, np.int64)} | self.initial_state()

    def initial_state(self) -> dict:
        return {}

    def promoted(self, targets: np.ndarray) -> np.ndarray:
        """The rows every malicious upload includes (the targets; none for an untargeted attack)."""
        return targets

    def gradient(self, targets: np.ndarray, rnd: int, k: int | None = None) -> torch.Tensor:  # pragma: no cover
        """The attack gradient w.r.t. ``self.side.matrix`` (n_items, width); ``k``: the malicious client
        (index into ``self.bad``) for a center that is not ``shared``."""
        raise NotImplementedError

    def rows_of(self, k: int, grad: torch.Tensor, targets: np.ndarray, rnd: int) -> np.ndarray:
        """Malicious client k's rows: the promoted targets and kappa - len(targets) items drawn once, by
        gradient norm (a keyed stream per (round, client))."""
        rows = self.state["rows"][k]
        if rows[0] < 0:
            promoted = self.promoted(targets)
            kappa = min(int(self.c.kappa), self.data.n_items)
            p = grad.norm(dim=1).double().numpy() + 1e-7
            p[promoted] = 0.0
            rng = numpy_stream(self.seed, STREAM_CRAFT, _CHOICE, rnd, int(self.bad[k]))
            extra = rng.choice(self.data.n_items, size=max(0, kappa - len(promoted)), replace=False, p=p / p.sum())
            chosen = np.concatenate([promoted[:kappa], extra]).astype(np.int64)
            rows = np.full(int(self.c.kappa), -1, np.int64)
            rows[:len(chosen)] = chosen
            self.state["rows"][k] = rows
        return rows[rows >= 0]


def take_rows(cen: CraftCenter, g: torch.Tensor, k: int, targets, rnd: int, clip: float):
    """Malicious client ``k``'s rows of the attack gradient ``g`` (at most kappa, chosen by the center), each
    clipped to ``clip``. What it sends is taken off ``g``, so the next malicious client sends what is left.
    Returns (rows, their clipped gradient, rows actually sent)."""
    rows = torch.from_numpy(cen.rows_of(k, g, targets, rnd))
    part = g[rows]
    part = part * torch.clamp(clip / part.norm(dim=1, keepdim=True).clamp(min=1e-30), max=1.0)
    g[rows] -= part
    return rows, part, int((part.norm(dim=1) > 0).sum())


def upload_scale(c: CraftConfig, cfg, n_users: int) -> float:
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


class CraftedItemAttack(TargetTracking, Mechanism):
    """Base mechanism: fake clients whose uploads are a center's crafted item rows. Subclasses set ``name``,
    ``Config`` (a :class:`CraftConfig`) and ``center`` (a :class:`CraftCenter` class)."""

    kind = "attack"
    modes = ("device",)
    keeps_node_state = True
    center: type[CraftCenter] = CraftCenter

    def check(self, cfg) -> None:
        from fedrec.run_config import federation

        fed = federation(cfg)
        if self.config.crafts() and str(cfg.model.name) not in ("bpr", "diffrec"):
            raise ConfigError(f"attack={self.name}: crafts the item-indexed parameters of MF (model=bpr) or "
                              f"DiffRec's denoiser (model=diffrec), got model={cfg.model.name}")
        if fed.local_optimizer != "sgd" or int(cfg.train.local_epochs) != 1:
            raise ConfigError(f"attack={self.name}: uploads are gradients, so clients take one local SGD step "
                              "(federation.local_optimizer=sgd, train.local_epochs=1)")
        if str(cfg.strategy.name) != "row_clip_sum" and fed.weighting != "uniform":
            raise ConfigError(f"attack={self.name} under a weighted mean: the fake clients hold no data, so "
                              "federation.weighting=interactions gives their uploads weight 0; use weighting=uniform")

    def data_transforms(self) -> list:
        return [FakeClients(self.config)]

    def targets(self, data, seed: int) -> np.ndarray:
        """The target item ids (internal), the same on every process."""
        return select_targets(self.config, data, int(seed))

    def target_ids(self, data, seed: int) -> np.ndarray:
        return self.targets(data, seed)

    def upload_factor(self, ctx) -> float:
        """The crafted delta is ``-upload_factor x`` the clipped gradient rows."""
        return float(ctx.cfg.federation.local_lr) * upload_scale(self.config, ctx.cfg, ctx.data.n_users)

    #: True when :meth:`chunk_factor` reads the genuine users' deltas of the chunk
    reads_genuine_deltas: ClassVar[bool] = False

    def chunk_factor(self, cen: CraftCenter, side, deltas: dict, genuine: np.ndarray, factor: float) -> float:
        """The factor for one chunk of the node's fold (``genuine``: the chunk's other users); default the
        run's :meth:`upload_factor`."""
        return factor

    # ------------------------------------------------------------------ node: the malicious uploads
    def user_transform(self, ctx):
        bad = malicious_users(ctx.data)
        if len(bad) == 0:
            return None
        c = self.config
        lr = self.upload_factor(ctx)
        targets = self.targets(ctx.data, int(ctx.cfg.seed))
        side = item_side(ctx.cfg, ctx.start)
        round_state: dict = {}

        def center() -> CraftCenter:
            if "center" not in round_state:  # once per round, at the first malicious client
                round_state["center"] = self.center(c, ctx.data, int(ctx.cfg.seed), side, ctx.state.get("attack", {}))
            return round_state["center"]

        def craft(users, deltas):
            users = np.asarray(users)
            mine = np.flatnonzero(np.isin(users, bad))
            if len(mine) == 0:
                return deltas, {"malicious-users": 0, "malicious-rows": 0}  # every node reports the same keys
            cen = center()
            if cen.shared and "grad" not in round_state:
                with torch.enable_grad():  # the fold runs under no_grad
                    round_state["grad"] = cen.gradient(targets, ctx.round)
            factor = self.chunk_factor(cen, side, deltas, np.flatnonzero(~np.isin(users, bad)), lr)
            # The fold's deltas are fresh tensors (trained minus start): the malicious users' slices are
            # overwritten in place rather than copying every user's (a DiffRec chunk: ~300 MB).
            out = deltas
            rows_sent = 0
            for i in mine:
                k = int(np.searchsorted(bad, users[i]))
                if cen.shared:
                    g = round_state["grad"]
                else:
                    with torch.enable_grad():
                        g = cen.gradient(targets, ctx.round, k)
                rows, part, sent = take_rows(cen, g, k, targets, ctx.round, float(c.grad_clip))
                side.write(out, int(i), rows, -factor * part)
                rows_sent += sent
            ctx.state["attack"] = cen.state
            return out, {"malicious-users": len(mine), "malicious-rows": rows_sent}

        # Only the malicious users' deltas change, so the node may sum the genuine ones by its linear path,
        # unless this attack reads the genuine deltas of its chunk (random_update's norm matching).
        return craft if self.reads_genuine_deltas else changes_only(craft, bad)

    # ------------------------------------------------------------------ server: the report
    def report(self, ctx) -> dict:
        data, c = ctx.data, self.config
        targets = self.targets(data, int(ctx.cfg.seed))
        return {"name": self.name, "injected_users": int(len(malicious_users(data))),
                "malicious_fraction": len(malicious_users(data)) / max(1, len(data.genuine())),
                "kappa": int(c.kappa), "targets": [str(data.item_ids[t]) for t in targets]} | self.target_section(ctx)
