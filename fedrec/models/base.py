"""The one interface every recommender of the zoo implements.

Modelled on RecBole's ``calculate_loss / full_sort_predict`` but typed and without dataset state
inside the model: a model is built from its config dataclass plus the dataset's shape, and

* :meth:`Recommender.loss` returns the **per-example** training loss for a batch, so that trainers
  average it, DP-SGD clips it per example and cross-device training can vmap it. An example is a
  user (a row of ``Batch.x``) unless the batch carries ``Batch.items``: then example b is the
  interaction (``users[b]``, ``items[b]``) and ``x[b]`` is that user's row;
* :attr:`Recommender.train_unit` says which examples the shared trainer (``fedrec.train``) feeds:
  ``"user"`` (every model by default) or ``"interaction"`` (BPR as in RecBole: an epoch visits each
  training interaction once). DP-SGD and cross-device training always feed users, since the user
  is their privacy unit and their client;
* :meth:`Recommender.scores` scores every item for a batch of users (higher = better);
* :meth:`Recommender.private_parameter_names` names the parameters that belong to a user or client
  (user embeddings, personal heads). They never leave the client in a federation; every other
  parameter is global and aggregated;
* :meth:`Recommender.row_sparse_parameter_names` names the global tables indexed by item (row i
  belongs to item i), of which a user's local training changes only the rows it touched: in
  cross-device per-user uploads a user sends only those rows (BPR-MF's item embeddings);
* :meth:`Recommender.optimizer_groups` lets a model ask for per-module learning rates
  (L-DiffRec trains its autoencoder and its denoiser at different rates);
* :meth:`Recommender.fit` shows a model the training interactions it may read as a whole (its
  graph or its closed form): the centralised trainer passes every training row, a silo node only
  its own users' rows. Every model but the graph and closed-form ones ignores it. A model whose
  :attr:`Recommender.trains_by_sgd` is False (EASE, GF-CF, ...) is *fitted* by ``fit`` alone: the
  centralised trainer calls it once, then evaluates, and runs no epoch (such a model has no optim
  block). :attr:`Recommender.couples_users` marks a model whose loss for one user reads other
  users' rows (graph propagation, LightGCN): per-user clipping does not bound a user's influence
  there, so DP-SGD and per-user clients refuse it.
* :attr:`Recommender.input_weighting` lets a model read weighted rows instead of the binary ones as
  ``Batch.x`` (T-DiffRec's time-aware weights, :mod:`fedrec.data.input_weights`): every trainer and the
  evaluation build ``x`` from :func:`input_matrix`; the seen-item mask and the targets stay binary.

Trainers, Flower clients, attacks, defenses, DP and evaluation touch models only through this
interface. Sequence models (``input_kind = "sequence"``, e.g. SASRec-lite) use the same class and
read ``Batch.seq``: trainers, cross-device training and evaluation fill it with the user's most
recent items (``model.max_len`` of them, left-padded with ``n_items``; :mod:`fedrec.data.sequences`)
next to ``Batch.x``, and one example is still one user.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from fedrec.data.side import ItemSideData
from fedrec.errors import ConfigError


@dataclass
class DataShape:
    """What a model may know about the dataset: its shape and item side information.

    ``item_side`` is the public item side data (:class:`fedrec.data.side.ItemSideData`: categories,
    embeddings, images, a public item graph). ``item_emb_fn`` computes item embeddings on first use
    (``item_embeddings()``) when the dataset has none, and ``item_graph_fn`` the item graph
    (``item_graph()``) when the dataset asks for one built from the training interactions
    (``dataset.item_graph=co_interaction``: private, refused under DP), so models that never use
    them never pay for them.
    """

    n_users: int
    n_items: int
    item_emb: np.ndarray | None = None
    item_emb_fn: Callable[[], np.ndarray | None] | None = field(default=None, repr=False)
    item_side: ItemSideData = field(default_factory=ItemSideData, repr=False)
    item_graph_fn: Callable[..., sp.csr_matrix] | None = field(default=None, repr=False)
    # Private like item_graph_fn and asked for by the same dataset.item_graph=co_interaction: the
    # directed item-to-item transition counts of the users' time-ordered training items (G-Diff).
    item_transitions_fn: Callable[..., sp.csr_matrix] | None = field(default=None, repr=False)
    # Per-user integer side codes (e.g. ML-100K's age, gender, occupation: ``Interactions.user_features``
    # without the ``*_vocab`` tables; -1 = missing), for models conditioned on user features (EDGE-Rec).
    user_features: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    # (grouping, top) -> (group id per user, -1 for none; group names): the users' groups
    # (fedrec.eval.fairness.user_groups: activity or a categorical user feature), for group-conditioned models
    user_groups_fn: Callable[[str, float], tuple[np.ndarray, list[str]]] | None = field(default=None, repr=False)

    def item_embeddings(self) -> np.ndarray | None:
        if self.item_emb is None and self.item_emb_fn is not None:
            self.item_emb = self.item_emb_fn()
        return self.item_emb

    def item_graph(self) -> sp.csr_matrix | None:
        """The item-item graph: the public one of ``item_side``, else the lazily built one, else None."""
        if self.item_side.graph is not None:
            return self.item_side.graph
        if self.item_graph_fn is not None:
            return self.item_graph_fn()
        return None

    def co_interaction_graph(self, **weighting) -> sp.csr_matrix | None:
        """The private co-interaction graph with a weighting (the keywords of
        :func:`fedrec.data.side.co_interaction_graph`: ``user_power``, ``item_power``, ``diagonal``),
        or None unless the dataset asks for it (``dataset.item_graph=co_interaction``)."""
        return None if self.item_graph_fn is None else self.item_graph_fn(**weighting)

    def transition_graph(self, users=None) -> sp.csr_matrix | None:
        """The private transition graph (:func:`fedrec.data.side.transition_graph`) of ``users``'
        training sequences (None: every user's), or None unless the dataset asks for its private
        graphs (``dataset.item_graph=co_interaction``)."""
        return None if self.item_transitions_fn is None else self.item_transitions_fn(users)


@dataclass
class Batch:
    """A batch of users. ``x`` is the dense binary history row each user trains/infers from."""

    users: torch.Tensor  # (B,) int64 internal user ids
    x: torch.Tensor  # (B, n_items) float32 0/1 (a rating model's: the ratings, 0 = unrated; Recommender.input_values)
    # (B, L) int64 for sequence models: the last L items, oldest first, left-padded with n_items; else None
    seq: torch.Tensor | None = None
    # (B,) int64: example b is the interaction (users[b], items[b]) rather than the user users[b];
    # set only by trainers feeding a model whose train_unit is "interaction". None: user examples.
    items: torch.Tensor | None = None
    # Explicit random draws (noise, timesteps, dropout masks, sampled items) for this batch, made by
    # ``Recommender.draw_randomness``. None: the model draws from torch's global generator.
    rand: dict[str, torch.Tensor] | None = None


class Recommender(nn.Module):
    """Base class of the model zoo; see the module docstring for the contract."""

    #: name used in ``conf/model/<name>.yaml``
    name: ClassVar[str] = "base"
    #: "user_vector" models read ``Batch.x``; "sequence" models read ``Batch.seq``
    input_kind: ClassVar[str] = "user_vector"
    #: False: training-free (closed form or filter), fitted by :meth:`fit` alone, no optimiser
    trains_by_sgd: ClassVar[bool] = True
    #: True: one user's loss reads other users' training rows (a propagation graph)
    couples_users: ClassVar[bool] = False
    #: how a coupling model couples users, for the refusals (DP-SGD, cross-device) that name the reason
    coupling: ClassVar[str] = "propagates over the interaction graph"
    #: "binary": ``Batch.x`` holds 0/1 rows; "rating": it holds the user's explicit ratings (0 = unobserved,
    #: ``Interactions.input_matrix``), in training and evaluation alike, and ``scores`` returns predicted
    #: ratings (ranked as scores; RMSE on the held-out ratings is reported beside the ranking metrics)
    input_values: ClassVar[str] = "binary"
    #: None: ``Batch.x`` is the binary training row; else a :mod:`fedrec.data.input_weights` spec (frozen,
    #: hashable) whose float rows (same sparsity) replace it in training and as the history at inference
    #: (T-DiffRec's time-aware weights). Read it through :func:`input_matrix`.
    input_weighting: Any = None

    def fit(self, train: sp.csr_matrix) -> None:
        """Read the (n_users, n_items) training interactions this trainer may show the model: all of
        them centrally, the node's own users' rows (the rest empty) in a silo. Default: nothing to read."""

    @property
    def train_unit(self) -> str:
        """What one example of the shared trainer is: "user" or "interaction" (see the module docstring)."""
        return "user"

    def loss(self, batch: Batch) -> torch.Tensor:
        """Per-example training loss, shape (B,): per user, or per interaction when ``batch.items`` is set.
        Trainers take its mean."""
        raise NotImplementedError

    def scores(self, batch: Batch) -> torch.Tensor:
        """Scores for every item, shape (B, n_items); evaluation masks seen items itself."""
        raise NotImplementedError

    def private_parameter_names(self) -> set[str]:
        """Names (as in ``named_parameters``) of parameters private to a user/client."""
        return set()

    def row_sparse_parameter_names(self) -> set[str]:
        """Names of global parameters that are (n_items, ...) tables indexed by item, whose rows a user's
        update leaves unchanged unless its loss touched the item (an embedding lookup, not a dense layer).

        Cross-device per-user uploads send only such a table's changed rows (``federation.sparse_rows``);
        declaring a table whose update is dense is still exact (every row is sent), only not smaller."""
        return set()

    def optimizer_groups(self, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """Parameter groups for the optimizer; override for per-module rates."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr": lr,
                 "weight_decay": weight_decay}]

    def draw_randomness(self, batch: Batch, rnd) -> dict[str, torch.Tensor]:
        """Every random draw ``loss(batch)`` needs, from ``rnd`` (a :class:`fedrec.rng.UserRandom`).

        With them in ``batch.rand`` the loss is a deterministic function of the parameters, so a
        user's local step gives the same result alone or vectorised (``torch.func.vmap``) among
        hundreds of users. Deterministic models return ``{}``; a model with hidden randomness that
        does not override this cannot train cross-device.
        """
        raise NotImplementedError(f"model {self.name!r} does not provide explicit randomness")

    def generate(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Item logits (n, n_items) of ``n`` new users drawn from the model's prior (synthetic release):
        a release samples each user's items proportionally to exp(logit / temperature).

        Diffusion models reverse their chain from pure noise; a model without a prior over users
        cannot generate.
        """
        raise ConfigError(f"generator.model: {self.name!r} has no prior over users to sample from; "
                          "use a generative model (diffrec, ldiffrec, multvae)")

    def on_epoch_start(self) -> None:
        """Called by ``fedrec.train.train_epoch`` before each local epoch's first batch (DiffKG trains
        its knowledge-graph denoiser and rebuilds its graph here, as the official epoch begins)."""

    def on_epoch_end(self) -> None:
        """Called by trainers after each local epoch (L-DiffRec anneals its loss weight per epoch)."""

    def set_schedule_position(self, epochs: int, updates: int) -> None:
        """Place annealing schedules at ``epochs`` epochs and ``updates`` optimiser updates done.

        Trainers advance the counters themselves (``on_epoch_end``, each training ``loss``); cross-device
        training, whose users each take a few steps from the global model, sets them from the round.
        Models without a schedule ignore it.
        """

    def global_state(self) -> dict[str, torch.Tensor]:
        """Parameters that are aggregated in a federation, by name (private ones excluded)."""
        private = self.private_parameter_names()
        return {n: p.detach() for n, p in self.named_parameters() if n not in private}


def input_matrix(model, data) -> sp.csr_matrix:
    """The (n_users, n_items) rows ``model`` reads as ``Batch.x``, the one place every trainer and evaluation
    takes them from: ``data.train``; a rating model's training ratings (``input_values="rating"``,
    :meth:`Interactions.input_matrix`); or the weighted form of the interactions when the model declares
    an ``input_weighting`` (built once per run, :meth:`Interactions.input_rows`). All have the sparsity of
    ``data.train``, so the seen-item masks stay the binary interactions."""
    weighting = getattr(model, "input_weighting", None)
    values = getattr(model, "input_values", "binary")
    if values != "binary":
        if weighting is not None:
            raise ConfigError(f"model {model.name!r}: reads {values} rows and declares an input weighting; "
                              "a model reads one kind of input row")
        return data.input_matrix(values, "train")
    return data.train if weighting is None else data.input_rows(weighting)  # any object with .train for binary rows
