"""The mechanism protocol: privacy mechanisms, attacks and defenses plug into a run at fixed hooks.

A mechanism is one object built from its Hydra group (``privacy``, ``attack``, ``defense``): the
group's YAML names the class with ``_target_`` and gives its parameters, which are checked against
the class's typed ``Config`` dataclass. Classes register themselves with :func:`register`; a
``_target_`` that is not a registered mechanism of that group is refused. One mechanism per group,
so an attack, a defense and a privacy mechanism compose in one run.

A mechanism declares what it needs (``modes``: federation modes; ``strategies``: strategy names,
None = any; ``check``: anything else) and implements only the hooks it uses. Hooks and where they
run (docs/ARCHITECTURE.md draws them):

=========================  ==========================  ===============================================
hook                       runs on                     does
=========================  ==========================  ===============================================
``check``                  server, before any file     reject a config the mechanism cannot serve
``adjust_config``          server, before the model    change ``cfg`` (nodes get the changed config)
``data_transforms``        every process, in loading   transform the interactions (e.g. inject users)
``central_trainer``        federation=none             replace the epoch of the centralised trainer
``prepare_model``          federation=none, server     after the model is built, before the first epoch
                                                       (image purification of the catalogue)
``filter_item_images``     wherever images enter       transform item images before a model computes
                                                       features from them (``install_item_images``)
``local_training``         silo node                   wrap a silo's local training (DP-SGD)
``node_reply``             silo node                   transform the reply a node sends (poisoning)
``user_transform``         device node, per chunk      transform users' updates (poisoning, bounds)
``user_fold``              device node, per chunk      replace how users' updates are summed (DP)
``node_eval``              every evaluating node       extra metric sums (``<split>/<m>/sum``, ``<split>/users``)
``strategy_overrides``     server                      strategy constructor arguments
``setup_server``           server                      install a rule on the strategy (per-reply
                                                       transform, a batch rule replacing aggregation)
``wrap_strategy``          server                      wrap the strategy, Flower's wrapper style
``report``                 server, every round         the mechanism's section of summary.json
``state``/``load_state``   server checkpoint           what a resumed run needs
=========================  ==========================  ===============================================

Order: on a node, hooks run attack -> defense -> privacy (a malicious client crafts its update, a
bound applies to whatever was sent, privacy clips and sums last); on the server the wrappers nest
the same way (privacy outermost), so privacy's noise is added to what the defense let through.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import numpy as np

from fedrec.errors import ConfigError

KINDS = ("attack", "defense", "privacy")  # Hydra groups, summary.json sections, and hook order

_REGISTRY: dict[str, type] = {}


def register(cls):
    """Class decorator: make ``cls`` buildable from its group's ``_target_``."""
    if cls.kind not in KINDS:
        raise TypeError(f"{cls.__name__}.kind must be one of {KINDS}")
    _REGISTRY[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return cls


class RunStopped(Exception):
    """Raised by a mechanism before a round it must not start (a spent privacy budget): the run
    ends cleanly and every recorded round is kept."""


@dataclass
class NodeContext:
    """What a node-side hook sees: the node's config and data, the round, the global parameters the
    round started from and the round's config record from the server."""

    cfg: Any
    data: Any
    users: Any  # the node's user ids (np.ndarray)
    partition_id: int
    round: int
    config: Any  # the round's ConfigRecord
    start: dict = field(default_factory=dict)  # global parameter name -> tensor at the round's start
    state: dict = field(default_factory=dict)  # kind -> the mechanism's node state (saved by the node)


@dataclass
class ServerContext:
    cfg: Any
    data: Any
    model: Any
    strategy: Any  # the fedrec strategy (FedrecMixin) under any wrappers; None in a centralised run
    evaluated_round: int | None = None  # the last round/epoch whose model ``model`` holds, evaluated on the server
    client_evaluated_round: int | None = None  # the last round the nodes evaluated (``strategy.last_eval``)
    mechanisms: list = field(default_factory=list)  # the run's mechanisms in hook order (install_item_images)


class Mechanism:
    kind: ClassVar[str] = ""
    name: ClassVar[str] = ""
    Config: ClassVar[type | None] = None  # typed parameters (a dataclass)
    modes: ClassVar[tuple[str, ...]] = ("none", "silo", "device")
    strategies: ClassVar[tuple[str, ...] | None] = None  # strategy names it works with; None: any
    keeps_node_state: ClassVar[bool] = False  # the node must persist ``NodeContext.state[kind]``

    def __init__(self, config, cfg):
        self.config = config  # an instance of ``Config``
        self.cfg = cfg  # the whole run config

    # ------------------------------------------------------------------ before any work
    def check(self, cfg) -> None:
        """Anything beyond ``modes``/``strategies`` the mechanism needs; raise ConfigError."""

    def check_model(self, cfg, model, data) -> None:
        """Checks that need the built model or the loaded data."""

    def adjust_config(self, cfg, data) -> list[str]:
        """Change ``cfg`` before the model is built; returns notes for the user."""
        return []

    def data_transforms(self) -> list:
        """``fedrec.data.transforms.DataTransform`` objects applied, in order, on every process."""
        return []

    # ------------------------------------------------------------------ centralised
    def central_trainer(self, model, optimizer, rows, cfg, resume: dict | None):
        """An object with ``epoch() -> stats`` replacing the centralised epoch, or None."""
        return None

    def prepare_model(self, ctx: "ServerContext") -> None:
        """Change the built model's public inputs before training (federation=none)."""

    def filter_item_images(self, ctx: "ServerContext", items, images, source: str):
        """Transform item ``images`` (B, C, H, W) of internal ids ``items`` before the model computes
        their features; ``source`` is "catalogue" (the dataset's images) or "upload" (a replaced image)."""
        return images

    # ------------------------------------------------------------------ node
    def local_training(self, ctx: NodeContext, train: Callable) -> Callable:
        """Wrap a silo's local training ``train(model, optimizer, rows) -> (losses, extra metrics)``."""
        return train

    def node_reply(self, ctx: NodeContext, content):
        """Transform the RecordDict a silo node replies with."""
        return content

    def user_transform(self, ctx: NodeContext):
        """``fn(users, deltas) -> (deltas, metrics)`` on a chunk of users' updates (deltas: name ->
        (U, ...) tensors of trained minus start parameters), or None. A transform that changes only some
        users' updates (an attack's malicious clients) says so with :func:`changes_only`: one-step SGD
        nodes then sum every other user by the linear one-backward path and train only those one by one."""
        return None

    def user_fold(self, ctx: NodeContext, start: dict):
        """A fold replacing the weighted mean of users' updates (``add(params, w)``, ``result()``,
        ``reply(metrics, n_users)``), or None."""
        return None

    def node_eval(self, cfg, model, data, users) -> dict[str, float]:
        """Extra metric sums of a node's evaluation of its (genuine) ``users`` with the model the node
        holds (private rows included): ``<split>/<metric>/sum`` and ``<split>/users``, pooled exactly by
        the server like the ranking metrics (e.g. an attack's target-item exposure)."""
        return {}

    # ------------------------------------------------------------------ server
    def strategy_overrides(self) -> dict:
        return {}

    def setup_server(self, ctx: ServerContext) -> None:
        """Install rules on ``ctx.strategy`` (``reply_transforms``, ``batch_rule``)."""

    def wrap_strategy(self, runner, ctx: ServerContext):
        return runner

    def report(self, ctx: ServerContext) -> dict | None:
        """This mechanism's section of summary.json (called after every round)."""
        return None

    def state(self) -> dict:
        return {}

    def load_state(self, state: dict) -> None:
        pass


def _block_params(block) -> dict:
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(block, resolve=True) if OmegaConf.is_config(block) else dict(block)
    return {k: v for k, v in raw.items() if k != "_target_"}


def mechanism_class(kind: str, block) -> type | None:
    """The registered class a group's block names, or None for a block without ``_target_`` (``none``)."""
    target = block.get("_target_") if block is not None else None
    if not target:
        name = block.get("name", "none") if block is not None else "none"
        if str(name) != "none":
            raise ConfigError(f"{kind}.name={name}: the block has no _target_ naming its mechanism class")
        return None
    from hydra.utils import get_class

    try:
        cls = get_class(str(target))
    except Exception as e:  # noqa: BLE001  Hydra wraps import errors in several types
        raise ConfigError(f"{kind}._target_: cannot import {target!r} ({e.__class__.__name__})") from None
    if _REGISTRY.get(f"{cls.__module__}.{cls.__qualname__}") is not cls:
        raise ConfigError(f"{kind}._target_: {target!r} is not a registered mechanism")
    if cls.kind != kind:
        raise ConfigError(f"{kind}._target_: {target!r} is a {cls.kind} mechanism, not a {kind} one")
    return cls


def build_mechanisms(cfg, *, check: bool = True) -> list[Mechanism]:
    """The run's mechanisms in hook order (attack, defense, privacy); with ``check`` their needs are
    verified against the config (one ``ConfigError`` line naming the group)."""
    from fedrec.typed_config import typed_block

    out = []
    mode = str(cfg.federation.mode)
    strategy = str(cfg.strategy.name) if cfg.get("strategy") is not None else None
    for kind in KINDS:
        block = cfg.get(kind)
        cls = mechanism_class(kind, block)
        if cls is None:
            continue
        config = typed_block(cls.Config, _block_params(block), kind) if cls.Config is not None else None
        m = cls(config, cfg)
        if check:
            if mode not in cls.modes:
                raise ConfigError(f"{kind}={cls.name}: needs federation={' or '.join(cls.modes)}, got {mode}")
            if mode != "none" and cls.strategies is not None and strategy not in cls.strategies:
                raise ConfigError(f"{kind}={cls.name}: works with strategy={' or '.join(cls.strategies)}, "
                                  f"got {strategy}")
            m.check(cfg)
        out.append(m)
    return out


def install_item_images(ctx: ServerContext, items, images, source: str = "upload") -> None:
    """Give ``ctx.model`` (a visual recommender, ``set_item_images``) new images for ``items``: every
    mechanism's ``filter_item_images`` runs first, in hook order (a defense purifies what an attack
    uploaded), then the model recomputes those items' features."""
    for m in ctx.mechanisms:
        images = m.filter_item_images(ctx, items, images, source)
    ctx.model.set_item_images(items, images)


def node_mechanisms(cfg) -> list[Mechanism]:
    """The mechanisms as a node builds them from the config the server sent (already checked there)."""
    return build_mechanisms(cfg, check=False)


def data_transforms(mechanisms: list[Mechanism]) -> list:
    return [t for m in mechanisms for t in m.data_transforms()]


def changes_only(transform, users):
    """Mark a ``user_transform`` as changing only the updates of ``users`` (global ids; it must return
    every other user's delta unchanged), so the node may sum the others without it
    (``fedrec.federated.device_node.TransformFold.changed``)."""
    ids = np.asarray(users)
    transform.changes = lambda chunk: np.isin(np.asarray(chunk), ids)
    return transform
