"""Heuristic shilling attacks: fake user profiles injected into the training data.

The classic model-agnostic data-poisoning attacks of the shilling literature, as data transforms
(:mod:`fedrec.data.transforms`): each adds fake users, marked ``injected`` so that no metric ever
counts them, to promote ``targets`` (push attacks). Every fake profile is

    target items  +  selected items (attack-specific, the same kind in every profile)  +  filler items

* ``random``    (Lam & Riedl, WWW 2004): filler drawn uniformly from the catalogue.
* ``average``   (Lam & Riedl, WWW 2004): in the explicit-rating original, random filler items rated
  at each item's mean rating. With implicit (binary) feedback every stored value is 1, so the
  rating part vanishes; what is left of "rate like the average user" is *which* items the profile
  holds, and here filler items are drawn in proportion to their popularity (training interactions of
  the genuine users), so a fake profile looks like an average user's. This is the deviation: the
  original's item choice is uniform.
* ``bandwagon`` (Burke et al. 2005; Mobasher et al., ACM TOIT 2007): the ``selected_size`` most
  popular items (the same "blockbusters" in every profile; the original rates them at the maximum)
  plus uniformly random filler.
* ``segment``   (Mobasher et al. 2005; ACM TOIT 2007): items of the target's segment -- items that
  appeal to the same audience as the target -- in every profile. The original gives segment items
  the maximum rating and filler items the minimum, to make the segment stand out; with implicit
  feedback a minimum rating is no interaction, so by default the profile has no filler
  (``filler_size`` 0) and is targets + ``selected_size`` segment items. The segment is
  ``segment_by``: ``genre`` -- the most popular items sharing a category with a target (the
  public item side data, ``data.item_side.categories``); ``co_interaction`` -- the items most often
  co-interacted with the targets by genuine users; ``auto`` -- genre when the dataset has item
  categories, else co-interaction. It is capped at ``segment_pool`` items (default
  ``selected_size``: Mobasher's fixed segment); with a larger pool every profile draws its
  ``selected_size`` segment items from the pool uniformly. A segment smaller than ``selected_size``
  is taken whole and the shortfall becomes random filler, so profiles keep their size.

Common parameters (:class:`ShillingConfig`): the number of fake users, ``count`` or ``fraction``
(share of the genuine users; default 1%, a common attack size); ``filler_size`` (filler items per
profile; default: whatever makes a profile as long as the mean genuine training profile, the usual
choice so that size does not give fakes away); ``targets`` (item ids as in the data files, i.e.
``Interactions.item_ids`` tokens), or ``target_selection`` with ``n_targets``: ``unpopular`` (default)
draws uniformly among the less popular half of the catalogue (the long-tail items a push attack is
about), ``random`` among all items. Popularity is counted over the genuine users' training rows.

Fake users get training interactions only (no valid/test items), ``injected=True``, ids
``shill-<digest>-<n>`` and the loaders' "missing" user features. On a dataset with sequences each
fake profile is also a training sequence, in a random order (deviation: the attacks are defined for
unordered profiles; a random order adds no ordering signal of its own).

Randomness: three streams keyed by (seed, :data:`STREAM_SHILLING`, purpose): target selection,
profile draws, sequence order. The targets are thus the same for every attack kind and size under
one seed, which makes attack comparisons fair, and a run's server and nodes, which each apply the
transform, get identical fake users.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from fedrec.data import Interactions  # the package before its submodules (see fedrec/federated/node.py)
from fedrec.data.sequences import Sequences
from fedrec.errors import ConfigError
from attacks.target_tracking import TargetTracking
from fedrec.mechanisms import Mechanism, register
from fedrec.rng import numpy_stream

STREAM_SHILLING = 0x5348494C  # "SHIL": this module's randomness, apart from every other stream
_TARGETS, _PROFILES, _ORDER = 1, 2, 3  # purposes inside the stream
TARGET_SELECTIONS = ("unpopular", "random")
SEGMENT_BY = ("auto", "genre", "co_interaction")
DEFAULT_FRACTION = 0.01


def _int_or_none(value, key: str, minimum: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"attack.{key}: expected an integer >= {minimum} or null, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class ShillingConfig:
    """The parameters every heuristic attack shares (see the module docstring)."""

    fraction: float | None = None
    count: int | None = None
    filler_size: int | None = None
    targets: tuple[str, ...] | None = None
    target_selection: str = "unpopular"
    n_targets: int = 1

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen: normalise once, here)
        if self.fraction is not None and self.count is not None:
            raise ConfigError("attack.fraction / attack.count: give one of them, not both")
        if self.fraction is None and self.count is None:
            set_("fraction", DEFAULT_FRACTION)
        if self.fraction is not None:
            if isinstance(self.fraction, bool) or not isinstance(self.fraction, (int, float)) \
                    or not (math.isfinite(self.fraction) and self.fraction > 0):
                raise ConfigError(f"attack.fraction: expected a positive share of the genuine users, got {self.fraction!r}")
            set_("fraction", float(self.fraction))
        set_("count", _int_or_none(self.count, "count", 1))
        set_("filler_size", _int_or_none(self.filler_size, "filler_size", 0))
        if self.targets is not None:
            if isinstance(self.targets, (str, int)):
                set_("targets", (self.targets,))
            tokens = tuple(str(t) for t in self.targets)
            if not tokens or len(set(tokens)) != len(tokens):
                raise ConfigError(f"attack.targets: expected a non-empty list of distinct item ids, got {list(tokens)}")
            set_("targets", tokens)
        if self.target_selection not in TARGET_SELECTIONS:
            raise ConfigError(f"attack.target_selection: expected one of {', '.join(TARGET_SELECTIONS)}, "
                              f"got {self.target_selection!r}")
        set_("n_targets", _int_or_none(self.n_targets, "n_targets", 1))


@dataclass(frozen=True)
class RandomAttackConfig(ShillingConfig):
    pass


@dataclass(frozen=True)
class AverageAttackConfig(ShillingConfig):
    pass


@dataclass(frozen=True)
class BandwagonAttackConfig(ShillingConfig):
    # The most popular items in every profile; default a tenth of the non-target profile (at least
    # one), in the range of the attack-size tables of Mobasher et al. 2007 and SDLib's defaults.
    selected_size: int | None = None

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "selected_size", _int_or_none(self.selected_size, "selected_size", 0))


@dataclass(frozen=True)
class SegmentAttackConfig(ShillingConfig):
    selected_size: int | None = None  # segment items per profile; default: the whole non-target profile
    segment_by: str = "auto"
    segment_pool: int | None = None  # segment items to draw from; default selected_size (a fixed segment)

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "selected_size", _int_or_none(self.selected_size, "selected_size", 0))
        object.__setattr__(self, "segment_pool", _int_or_none(self.segment_pool, "segment_pool", 1))
        if self.segment_by not in SEGMENT_BY:
            raise ConfigError(f"attack.segment_by: expected one of {', '.join(SEGMENT_BY)}, got {self.segment_by!r}")


# --------------------------------------------------------------------------- the transform


class ShillingAttack:
    """A :class:`fedrec.data.transforms.DataTransform` injecting heuristic shilling profiles."""

    kind = "shilling"
    config_class: type[ShillingConfig] = ShillingConfig

    def __init__(self, config: ShillingConfig | None = None, **params):
        if config is None:
            config = self.config_class(**params)
        elif params:
            raise TypeError("give a config or keyword parameters, not both")
        if type(config) is not self.config_class:
            raise TypeError(f"{type(self).__name__} takes a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config

    def key(self) -> str:
        params = json.dumps(dataclasses.asdict(self.config), sort_keys=True, separators=(",", ":"))
        return f"attacks.shilling.{self.kind}{params}"

    def __repr__(self) -> str:
        return self.key()

    # ---- what each attack decides (overridden below)
    def default_sizes(self, non_target: int) -> tuple[int, int]:
        """(selected, filler) items per profile when not configured; ``non_target`` = mean profile - targets."""
        return 0, non_target

    def selected_items(self, data: Interactions, pop: np.ndarray, targets: np.ndarray, n_selected: int,
                       n_fake: int, rng: np.random.Generator) -> np.ndarray:
        """(n_fake, <= n_selected) selected items of every profile (-1 = none); none by default."""
        return np.empty((n_fake, 0), dtype=np.int64)

    def filler_weights(self, pop: np.ndarray) -> np.ndarray:
        """Sampling weight of every item as filler (uniform unless overridden)."""
        return np.ones(len(pop))

    def filler_items(self, data: Interactions, pop: np.ndarray, targets: np.ndarray, allowed: np.ndarray,
                     k: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """(n_fake, <= max k) filler items of every profile among ``allowed`` (n_fake, n_items), -1 = none:
        by default ``k`` draws without replacement weighted by :meth:`filler_weights`."""
        return _draw_without_replacement(rng, self.filler_weights(pop), allowed, k)

    # ---- the shared machinery
    def apply(self, data: Interactions, seed: int) -> Interactions:
        c = self.config
        genuine = data.genuine()
        if len(genuine) == 0:
            raise ConfigError(f"attack: dataset {data.name!r} has no genuine users to imitate")
        rows = data.train[genuine]
        pop = np.asarray(rows.sum(axis=0)).ravel().astype(np.float64)  # genuine users' training popularity
        targets = self.target_items(data, seed)
        sizes = np.diff(rows.indptr)
        mean_size = int(round(float(sizes[sizes > 0].mean()))) if (sizes > 0).any() else 1
        default_selected, default_filler = self.default_sizes(max(0, mean_size - len(targets)))
        n_selected = default_selected if getattr(c, "selected_size", None) is None else c.selected_size
        n_filler = default_filler if c.filler_size is None else c.filler_size
        free = data.n_items - len(targets)
        if n_selected + n_filler > free:
            raise ConfigError(f"attack.filler_size/selected_size: {n_selected} selected + {n_filler} filler items "
                              f"per profile, but only {free} items are not targets")
        n_fake = c.count if c.count is not None else max(1, int(math.floor(c.fraction * len(genuine) + 0.5)))

        rng = numpy_stream(seed, STREAM_SHILLING, _PROFILES)
        selected = self.selected_items(data, pop, targets, n_selected, n_fake, rng)
        fixed = np.zeros((n_fake, data.n_items), dtype=bool)  # targets and selected items of each profile
        fixed[:, targets] = True
        r, col = np.nonzero(selected >= 0)
        fixed[r, selected[r, col]] = True
        # A segment smaller than selected_size leaves a shortfall: it becomes filler (sizes stay equal).
        short = n_selected - (selected >= 0).sum(axis=1)
        filler = self.filler_items(data, pop, targets, ~fixed, n_filler + short, rng)
        profile = fixed
        r, col = np.nonzero(filler >= 0)
        profile[r, filler[r, col]] = True
        train = sp.csr_matrix(profile.astype(np.float32))

        digest = hashlib.sha256(self.key().encode()).hexdigest()[:8]
        ids = np.array([f"shill-{digest}-{i}" for i in range(n_fake)])
        seq = None
        if data.train_seq is not None:
            # Unordered profiles made sequences: each profile's items in a random order.
            order_rng = numpy_stream(seed, STREAM_SHILLING, _ORDER)
            user = np.repeat(np.arange(n_fake), np.diff(train.indptr))
            perm = np.lexsort((order_rng.random(train.nnz), user))
            seq = Sequences(train.indptr.astype(np.int64), train.indices[perm].astype(np.int64))
        out = data.append_users(train, ids, injected=True, train_seq=seq)
        return dataclasses.replace(out, attack_targets=targets)  # what the target metrics follow from now on

    def target_items(self, data: Interactions, seed: int) -> np.ndarray:
        """The internal item ids this attack promotes on ``data`` (the data before the attack) under
        ``seed``, sorted: what target-item metrics (e.g. the targets' hit ratio) are computed on."""
        return select_targets(self.config, data, seed)


def select_targets(c, data: Interactions, seed: int) -> np.ndarray:
    """Target items from a config with ``targets`` / ``target_selection`` / ``n_targets`` (a
    :class:`ShillingConfig` or any attack reusing its style, e.g. FedRecAttack's): the given ids, or a keyed
    draw (the same for every attack under one seed) among the less popular half or all items. On data an
    injecting attack already transformed, the targets it recorded (``Interactions.attack_targets``): a later
    transform (a profile defense dropping users) changes the popularity the draw depends on."""
    if c.targets is None and data.attack_targets is not None:
        return np.asarray(data.attack_targets, dtype=np.int64)
    pop = np.asarray(data.train[data.genuine()].sum(axis=0)).ravel().astype(np.float64)
    if c.targets is not None:
        index = {str(t): i for i, t in enumerate(data.item_ids)}
        missing = [t for t in c.targets if t not in index]
        if missing:
            raise ConfigError(f"attack.targets: item id {missing[0]!r} is not in dataset {data.name!r} "
                              "(ids as in the data files)")
        return np.array(sorted(index[t] for t in c.targets), dtype=np.int64)
    rng = numpy_stream(seed, STREAM_SHILLING, _TARGETS)
    if c.target_selection == "unpopular":
        # the less popular half, ties by item index (a stable order: the same in every process)
        pool = np.argsort(pop, kind="stable")[:int(math.ceil(data.n_items / 2))]
    else:
        pool = np.arange(data.n_items)
    if c.n_targets > len(pool):
        raise ConfigError(f"attack.n_targets: {c.n_targets} targets, but target_selection={c.target_selection} "
                          f"offers {len(pool)} items")
    return np.sort(rng.choice(pool, size=c.n_targets, replace=False)).astype(np.int64)


def _popular_order(pop: np.ndarray) -> np.ndarray:
    """Items from most to least popular, ties by item index."""
    return np.argsort(-pop, kind="stable")


def _draw_without_replacement(rng: np.random.Generator, weights: np.ndarray, allowed: np.ndarray,
                              k: np.ndarray | int) -> np.ndarray:
    """(n_rows, max k) items per row drawn without replacement among ``allowed`` (n_rows, n_items),
    with probability proportional to ``weights`` (Efraimidis & Spirakis 2006: the k largest
    ``log(u) / w``); -1 pads rows that draw fewer. Vectorised over rows, in chunks."""
    n_rows, n_items = allowed.shape
    k = np.broadcast_to(np.asarray(k, dtype=np.int64), (n_rows,))
    kmax = int(k.max()) if n_rows else 0
    out = np.full((n_rows, kmax), -1, dtype=np.int64)
    if kmax == 0:
        return out
    # zero-weight items come last (after every positive one), uniformly among themselves
    w = np.asarray(weights, dtype=np.float64)
    w = np.where(w > 0, w, w[w > 0].min() * 1e-9 if (w > 0).any() else 1.0)
    chunk = max(1, (1 << 22) // max(n_items, 1))
    for s in range(0, n_rows, chunk):
        e = min(n_rows, s + chunk)
        keys = np.log(1.0 - rng.random((e - s, n_items))) / w  # 1 - u in (0, 1]: a finite log
        keys[~allowed[s:e]] = -np.inf
        top = np.argsort(-keys, axis=1, kind="stable")[:, :kmax]
        ok = (np.arange(kmax)[None, :] < k[s:e, None]) & np.isfinite(np.take_along_axis(keys, top, 1))
        out[s:e] = np.where(ok, top, -1)
    return out


class RandomAttack(ShillingAttack):
    """Lam & Riedl 2004: targets + uniformly random filler."""

    kind = "random"
    config_class = RandomAttackConfig


class AverageAttack(ShillingAttack):
    """Lam & Riedl 2004, implicit feedback: targets + popularity-weighted filler (see module docstring)."""

    kind = "average"
    config_class = AverageAttackConfig

    def filler_weights(self, pop: np.ndarray) -> np.ndarray:
        return pop


class BandwagonAttack(ShillingAttack):
    """Burke et al. 2005 / Mobasher et al. 2007: targets + the most popular items + random filler."""

    kind = "bandwagon"
    config_class = BandwagonAttackConfig

    def default_sizes(self, non_target: int) -> tuple[int, int]:
        selected = min(non_target, max(1, int(round(non_target / 10)))) if non_target else 0
        return selected, non_target - selected

    def selected_items(self, data, pop, targets, n_selected, n_fake, rng):
        order = _popular_order(pop)
        chosen = order[~np.isin(order, targets)][:n_selected]
        return np.broadcast_to(chosen, (n_fake, len(chosen))).copy()


class SegmentAttack(ShillingAttack):
    """Mobasher et al. 2005/2007, implicit feedback: targets + the target's segment (see module docstring)."""

    kind = "segment"
    config_class = SegmentAttackConfig

    def default_sizes(self, non_target: int) -> tuple[int, int]:
        return non_target, 0

    def segment(self, data: Interactions, pop: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """The segment's items, most relevant first (targets excluded)."""
        by = self.config.segment_by
        cats = data.item_side.categories
        if by == "auto":
            by = "genre" if cats is not None else "co_interaction"
        if by == "genre":
            if cats is None:
                raise ConfigError(f"attack.segment_by=genre: dataset {data.name!r} has no item categories")
            m = sp.csr_matrix(cats.matrix)
            wanted = np.asarray(m[targets].sum(axis=0)).ravel() > 0
            shares = np.asarray(m[:, np.flatnonzero(wanted)].sum(axis=1)).ravel() > 0
            order = _popular_order(pop)
            seg = order[shares[order]]
        else:
            rows = data.train[data.genuine()]
            fans = np.asarray(rows[:, targets].sum(axis=1)).ravel() > 0  # genuine users of a target
            co = np.asarray(rows[fans].sum(axis=0)).ravel()
            seg = np.lexsort((np.arange(len(co)), -pop, -co))  # most co-interactions, then popularity
            seg = seg[co[seg] > 0]
        return seg[~np.isin(seg, targets)]

    def selected_items(self, data, pop, targets, n_selected, n_fake, rng):
        pool_size = self.config.segment_pool or n_selected
        pool = self.segment(data, pop, targets)[:max(pool_size, 0)]
        if n_selected == 0 or len(pool) == 0:
            return np.full((n_fake, 0), -1, dtype=np.int64)
        if len(pool) <= n_selected:  # a small segment: all of it in every profile
            return np.broadcast_to(pool, (n_fake, len(pool))).copy()
        allowed = np.zeros((n_fake, data.n_items), dtype=bool)
        allowed[:, pool] = True
        return _draw_without_replacement(rng, np.ones(data.n_items), allowed, n_selected)


ATTACKS: dict[str, type[ShillingAttack]] = {a.kind: a for a in (RandomAttack, AverageAttack, BandwagonAttack,
                                                                 SegmentAttack)}


def build_shilling(cfg, kind: str | None = None, where: str = "attack") -> ShillingAttack:
    """The attack of a config block: ``kind`` (or the block's ``kind``, else its ``name``) names the attack
    (random, average, bandwagon, segment); the other keys are its config dataclass's fields."""
    from omegaconf import OmegaConf

    from fedrec.typed_config import typed_block

    raw = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    kind = kind or raw.pop("kind", None) or raw.get("name")
    raw.pop("kind", None)
    if kind not in ATTACKS:
        raise ConfigError(f"{where}.kind: expected one of {', '.join(ATTACKS)}, got {kind!r}")
    cls = ATTACKS[kind]
    try:
        return cls(typed_block(cls.config_class, raw, where))
    except ConfigError as e:  # the dataclasses name their keys attack.*: name the block they came from
        raise ConfigError(str(e).replace("attack.", f"{where}.", 1)) from None


# --------------------------------------------------------------------------- as mechanisms (attack=...)
class _ShillingMechanism(TargetTracking, Mechanism):
    """``attack=random|average|bandwagon|segment``: the profiles enter through the data hook, so
    every process (server and nodes) loads the same fake users; they then train like any user, as
    users or as clients, in every federation mode. The report carries the targets' metrics per
    evaluated round (``attacks.target_tracking``)."""

    kind = "attack"
    transform: type[ShillingAttack] = ShillingAttack

    def data_transforms(self) -> list:
        return [self.transform(self.config)]

    def target_ids(self, data, seed: int) -> np.ndarray:
        return self.transform(self.config).target_items(data, seed)

    def report(self, ctx) -> dict:
        data = ctx.data
        targets = self.target_ids(data, int(ctx.cfg.seed))
        return {"name": self.name, "injected_users": int(data.n_injected),
                "targets": [str(data.item_ids[t]) for t in targets]} | self.target_section(ctx)


@register
class RandomShilling(_ShillingMechanism):
    name, Config, transform = "random", RandomAttackConfig, RandomAttack


@register
class AverageShilling(_ShillingMechanism):
    name, Config, transform = "average", AverageAttackConfig, AverageAttack


@register
class BandwagonShilling(_ShillingMechanism):
    name, Config, transform = "bandwagon", BandwagonAttackConfig, BandwagonAttack


@register
class SegmentShilling(_ShillingMechanism):
    name, Config, transform = "segment", SegmentAttackConfig, SegmentAttack
