"""Fake-profile defenses on the training data: detectors that drop flagged users, and diffusion purification.

They are data transforms (:mod:`fedrec.data.transforms`) run by the defense mechanism's data hook, after
the attack's (which injects the profiles) and before any training, on every process of a run. The
defender sees only the interactions; ``Interactions.injected`` is read for the report alone.

Detectors (a suspicion score per user, higher = more suspicious; the ``flag_fraction`` highest are
flagged and, with ``drop``, their training rows are removed: they stay users of the platform, so the
evaluation still covers every genuine user, a flagged genuine user now with no training history):

* ``degree_detect`` -- degree / popularity statistics, the generic features of shilling detection
  (Chirita et al., WIDM 2005; Burke et al., KDD 2006: profile length, the mean popularity of the rated
  items and its spread): per user the log profile length, the mean log popularity of its items and
  the standard deviation of the log popularity; each z-scored over all users, the score is the sum of
  the squared z-scores (a diagonal Mahalanobis distance from the typical user). Popularity counts all
  training rows (the defender cannot tell fakes apart).
* ``pca_detect`` -- PCASelectUsers (Mehta & Nejdl, "Unsupervised strategies for shilling detection and
  robust collaborative filtering", UMUAI 2009, algorithm 2): the item x user matrix, each user's column
  z-scored; PCA with users as the variables; shilling profiles, highly correlated with each other,
  contribute least to the first ``components`` principal components, so the score is minus each
  user's summed squared loading on them (the paper flags the users with the smallest). Deviation: the
  paper z-scores explicit ratings; here the binary implicit rows (a user with a constant row, empty
  or full, has no direction and scores 0 loading).
* ``diffusion_detect`` -- a DiffRec (:mod:`fedrec.models.diffrec`, its default architecture and
  schedule) reconstructs every profile with a random half of it hidden (DiffRec's own training
  corruption, its input dropout, as an explicit mask; ``masks`` draws), and each own item is scored by
  its percentile in the reconstructions of the draws that hid it; the user's score is one minus the
  mean over its items, so profiles whose items the model cannot predict from each other score high
  (percentiles make users of different lengths comparable). Cross-fitted: the users fall into ``folds``
  keyed folds and each fold is scored by the DiffRec trained on the others, because a DiffRec scoring
  its own training users memorises them (measured on ML-100K with bandwagon fakes: hidden random filler
  items came back in the top 3% of the reconstruction, AUC 0.14, inverted). fedrec's own detector in
  the spirit of the defenses issue (a diffusion recommender scoring suspicious users); no paper to follow.

Purification (``profile_purify``), the profile analogue of Yuan et al.'s (TOIS 2023) image purification:
every half-hidden profile is noised to step ``t_star`` of the DiffRec's forward process and denoised back
to x0 (the core's ``purify`` with DiffRec's posterior-mean sampler, the denoiser seeing the visible half
at every step), cross-fitted as above; each user keeps the ``keep_share`` of its own items with the
highest purified percentiles (at least one) and loses the rest. Deviation: DiffRec's schedule keeps
over 99% of the signal at every step (noise_scale 0.005), so the forward noise alone leaves the
denoiser close to the identity on the history; hiding half the profile is what makes the reconstruction
of an item informative. Its report counts the removed interactions, of fake and genuine users, and those
of the attack's target items (``Interactions.attack_targets``).

Every figure lands under "defense" in summary.json (carried from the process that applied the transform
by ``Interactions.transform_reports``): ``detection`` (``fedrec.eval.detection``:
precision, recall, AUC against ``Interactions.injected``) and ``dropped_users`` /
``dropped_genuine``; or purification's counts.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from fedrec.data.interactions import Interactions
from fedrec.data.sequences import Sequences
from fedrec.errors import ConfigError
from fedrec.eval.detection import detection_report
from fedrec.mechanisms import Mechanism, register
from fedrec.rng import torch_stream

STREAM_PROFILE_DEFENSE = 0x50524F46  # "PROF": the defenses' own randomness
_FIT, _INIT, _PURIFY, _FOLDS = 1, 2, 3, 4


# --------------------------------------------------------------------------- scores (pure functions)
def _binary(train) -> sp.csr_matrix:
    m = sp.csr_matrix(train, dtype=np.float64)
    m.data[:] = 1.0
    return m


def degree_scores(train) -> np.ndarray:
    """Sum of squared z-scores of (log length, mean log popularity, std of log popularity) per user."""
    m = _binary(train)
    n = np.diff(m.indptr).astype(np.float64)
    logpop = np.log1p(np.asarray(m.sum(axis=0)).ravel())
    safe = np.maximum(n, 1.0)
    s1 = np.asarray(m @ logpop).ravel()
    s2 = np.asarray(m @ (logpop ** 2)).ravel()
    mean = s1 / safe
    std = np.sqrt(np.maximum(s2 / safe - mean ** 2, 0.0))
    feats = np.stack([np.log1p(n), mean, std], axis=1)
    spread = feats.std(axis=0)
    z = (feats - feats.mean(axis=0)) / np.where(spread > 0, spread, 1.0)
    return (z ** 2).sum(axis=1)


def pca_scores(train, components: int = 3) -> np.ndarray:
    """Minus each user's summed squared loading on the first ``components`` PCs of the column-z-scored
    item x user matrix (Mehta & Nejdl 2009): the smallest contributions are the most suspicious."""
    x = _binary(train).toarray().T  # items x users: users are the variables
    mean, std = x.mean(axis=0), x.std(axis=0)
    z = np.where(std > 0, (x - mean) / np.where(std > 0, std, 1.0), 0.0)
    k = int(min(components, min(z.shape)))
    # the users' covariance z^T z has the right singular vectors of z as its eigenvectors
    _, _, vt = np.linalg.svd(z, full_matrices=False)
    return -(vt[:k] ** 2).sum(axis=0)


def flag_top(scores: np.ndarray, fraction: float) -> np.ndarray:
    """Boolean mask of the ``round(fraction * n)`` highest scores (ties by user index)."""
    n = len(scores)
    m = int(np.floor(fraction * n + 0.5))
    flagged = np.zeros(n, dtype=bool)
    if m:
        flagged[np.lexsort((np.arange(n), -scores))[:m]] = True
    return flagged


# --------------------------------------------------------------------------- the trained DiffRec
@dataclass(frozen=True)
class DiffRecFit:
    """How the defender's DiffRec is trained (its architecture and schedule: DiffRec's defaults)."""

    epochs: int = 50
    lr: float = 1e-3
    batch_size: int = 400
    folds: int = 2  # cross-fitting: each fold of users scored by the model trained on the others

    def check(self, where: str = "defense") -> None:
        if self.folds < 2:
            raise ConfigError(f"{where}.folds: must be >= 2 (a model must not score its own training users), got {self.folds}")
        if self.epochs < 1:
            raise ConfigError(f"{where}.epochs: must be >= 1, got {self.epochs}")
        if not self.lr > 0:
            raise ConfigError(f"{where}.lr: must be positive, got {self.lr}")
        if self.batch_size < 1:
            raise ConfigError(f"{where}.batch_size: must be >= 1, got {self.batch_size}")


def fit_diffrec(train, fit: DiffRecFit, seed: int):
    """A DiffRec (default config) trained on the binary rows ``train`` from the defense's own streams."""
    from fedrec.models.base import Batch, DataShape
    from fedrec.models.diffrec import DiffRec, DiffRecConfig

    x = torch.as_tensor(_binary(train).toarray(), dtype=torch.float32)
    with torch.random.fork_rng(devices=[]):  # the model's weights, dropout and diffusion draws: global torch
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=torch_stream(seed, STREAM_PROFILE_DEFENSE, _INIT))))
        model = DiffRec(DiffRecConfig(), DataShape(n_users=x.shape[0], n_items=x.shape[1]))
        opt = torch.optim.AdamW(model.parameters(), lr=fit.lr)
        g = torch_stream(seed, STREAM_PROFILE_DEFENSE, _FIT)
        users = torch.arange(x.shape[0])
        model.train()
        for _ in range(fit.epochs):
            perm = torch.randperm(x.shape[0], generator=g)
            for s in range(0, x.shape[0], fit.batch_size):
                b = perm[s:s + fit.batch_size]
                loss = model.loss(Batch(users=users[b], x=x[b])).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
    model.eval()
    return model, x


def own_item_percentiles(recon: np.ndarray, train) -> sp.csr_matrix:
    """For every stored (user, item) of ``train``: the item's percentile in the user's row of ``recon``
    (1 = scored above every other item, 0 = below all), in ``train``'s CSR layout."""
    m = _binary(train)
    n_items = recon.shape[1]
    ranks = np.empty_like(recon, dtype=np.float64)  # rank 0 = lowest score
    order = np.argsort(recon, axis=1, kind="stable")
    np.put_along_axis(ranks, order, np.broadcast_to(np.arange(n_items, dtype=np.float64), recon.shape), axis=1)
    rows = np.repeat(np.arange(m.shape[0]), np.diff(m.indptr))
    out = m.copy()
    out.data = ranks[rows, m.indices] / max(n_items - 1, 1)
    return out


def hidden_item_percentiles(model, train, t_star: int, masks: int, seed: int) -> sp.csr_matrix:
    """Diffusion purification of every profile with half of it hidden, averaged over ``masks`` draws:
    each draw hides a random half of every profile (DiffRec's own training corruption, its input
    dropout, as an explicit mask), noises the profile to step ``t_star`` of the forward process and
    reverses it to x0 with DiffRec's posterior-mean sampler (the core's ``purify``), the denoiser seeing
    only the visible half at every step. The result, in ``train``'s CSR layout: each own item's mean
    percentile in the reconstructions of the draws that hid it (an item never hidden: 1, "kept")."""
    from fedrec.models.diffusion import DDPMSampler

    d = model.diffusion
    if not 0 <= t_star < d.steps:
        raise ConfigError(f"defense.t_star: must be in 0..{d.steps - 1} (DiffRec's steps), got {t_star}")
    m = _binary(train)
    x = torch.as_tensor(m.toarray(), dtype=torch.float32)
    p = float(model.cfg.dropout)
    g = torch_stream(seed, STREAM_PROFILE_DEFENSE, _PURIFY)
    rows = np.repeat(np.arange(m.shape[0]), np.diff(m.indptr))
    total, count = np.zeros(m.nnz), np.zeros(m.nnz)
    for _ in range(masks):
        visible = torch.rand(x.shape, generator=g) >= 0.5
        keep = visible.float() / (1.0 - p) if p < 1 else visible.float()  # inverted dropout, as in training
        with torch.no_grad():
            recon = d.purify(lambda z, t: model.denoiser(z, t, keep), x * visible, t_star, g,
                             sampler=DDPMSampler(noise=False)).numpy()
        pct = own_item_percentiles(recon, m).data
        hidden = ~visible.numpy()[rows, m.indices]
        total += np.where(hidden, pct, 0.0)
        count += hidden
    out = m.copy()
    out.data = np.where(count > 0, total / np.maximum(count, 1), 1.0)
    return out


def cross_fitted_percentiles(train, fit: DiffRecFit, t_star: int, masks: int, seed: int) -> sp.csr_matrix:
    """:func:`hidden_item_percentiles` of every user from a DiffRec trained on the *other* users
    (``fit.folds`` keyed folds of the users): a model scoring the users it was trained on memorises their
    profiles (measured on ML-100K: hidden items of random-filler fakes came back in the top 3%), so each
    fold is scored by the model of the rest."""
    m = _binary(train)
    fold = torch.randint(0, fit.folds, (m.shape[0],), generator=torch_stream(seed, STREAM_PROFILE_DEFENSE, _FOLDS)).numpy()
    out = m.copy()
    rows = np.repeat(np.arange(m.shape[0]), np.diff(m.indptr))
    for f in range(fit.folds):
        rest, here = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
        if len(here) == 0:
            continue
        model, _ = fit_diffrec(m[rest], fit, seed + 7919 * f)
        pct = hidden_item_percentiles(model, m[here], t_star, masks, seed + 7919 * f)
        where = np.isin(rows, here)
        out.data[where] = pct.data  # m[here] keeps the users' order and their entries' order
    return out


def diffusion_scores(train, fit: DiffRecFit, seed: int, t_star: int = 0, masks: int = 8) -> np.ndarray:
    """1 - the mean of the cross-fitted hidden-item percentiles over the user's own items."""
    pct = cross_fitted_percentiles(train, fit, t_star, masks, seed)
    n = np.diff(pct.indptr)
    mean = np.asarray(pct.sum(axis=1)).ravel() / np.maximum(n, 1)
    return np.where(n > 0, 1.0 - mean, 0.0)


def purify_scores(train, fit: DiffRecFit, t_star: int, masks: int, seed: int) -> sp.csr_matrix:
    """The cross-fitted hidden-item percentiles of every training entry (:func:`cross_fitted_percentiles`)."""
    return cross_fitted_percentiles(train, fit, t_star, masks, seed)


# --------------------------------------------------------------------------- changing the data
def keep_train_entries(data: Interactions, keep: sp.csr_matrix) -> Interactions:
    """``data`` with only the training entries where ``keep`` (same layout as ``data.train``) is nonzero;
    timestamps and training sequences follow (order kept). Users, valid and test rows are unchanged."""
    train = sp.csr_matrix(data.train)
    mask = np.asarray(keep.data, dtype=bool)
    if keep.shape != train.shape or keep.nnz != train.nnz:
        raise ValueError("keep_train_entries: the mask must have data.train's layout")
    rows = np.repeat(np.arange(train.shape[0]), np.diff(train.indptr))
    new = sp.csr_matrix((train.data[mask], (rows[mask], train.indices[mask])), shape=train.shape, dtype=np.float32)
    new.sort_indices()
    ts = None if data.train_timestamps is None else np.asarray(data.train_timestamps)[_csr_order(train, mask, new)]
    seq = data.train_seq
    if seq is not None:
        kept = sp.csr_matrix((np.ones(int(mask.sum())), (rows[mask], train.indices[mask])), shape=train.shape)
        users = np.repeat(np.arange(len(seq.lengths)), seq.lengths)
        alive = np.asarray(kept[users, seq.items]).ravel() > 0 if len(users) else np.zeros(0, bool)
        seq = Sequences.from_sorted(users[alive], seq.items[alive], train.shape[0])
    return dataclasses.replace(data, train=new, train_timestamps=ts, train_seq=seq)


def _csr_order(train: sp.csr_matrix, mask: np.ndarray, new: sp.csr_matrix) -> np.ndarray:
    """Indices into ``train``'s entries of the kept ones, in ``new``'s CSR order."""
    rows = np.repeat(np.arange(train.shape[0]), np.diff(train.indptr))
    kept = np.flatnonzero(mask)
    return kept[np.lexsort((train.indices[kept], rows[kept]))]


def drop_users_training(data: Interactions, users: np.ndarray) -> Interactions:
    keep = _binary(data.train)
    rows = np.repeat(np.arange(keep.shape[0]), np.diff(keep.indptr))
    keep.data = (~np.isin(rows, users)).astype(np.float64)
    return keep_train_entries(data, keep)


# --------------------------------------------------------------------------- configs and transforms
def _check_fraction(v, key: str = "flag_fraction") -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
        raise ConfigError(f"defense.{key}: expected a share of the users in [0, 1), got {v!r}")


def _check_steps(t_star, masks) -> None:
    if isinstance(t_star, bool) or not isinstance(t_star, int) or t_star < 0:
        raise ConfigError(f"defense.t_star: expected an integer >= 0, got {t_star!r}")
    if isinstance(masks, bool) or not isinstance(masks, int) or masks < 1:
        raise ConfigError(f"defense.masks: expected an integer >= 1, got {masks!r}")


@dataclass(frozen=True)
class DegreeDetectConfig:
    flag_fraction: float = 0.05  # share of all users flagged (the highest scores)
    drop: bool = True  # remove the flagged users' training rows (False: only report)

    def __post_init__(self):
        _check_fraction(self.flag_fraction)


@dataclass(frozen=True)
class PCADetectConfig(DegreeDetectConfig):
    components: int = 3  # principal components whose loadings count (the paper: 3)

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.components, bool) or not isinstance(self.components, int) or self.components < 1:
            raise ConfigError(f"defense.components: expected an integer >= 1, got {self.components!r}")


@dataclass(frozen=True)
class DiffusionDetectConfig(DegreeDetectConfig):
    epochs: int = 50  # DiffRec training epochs over all users
    lr: float = 1e-3  # AdamW learning rate (DiffRec's conf default)
    batch_size: int = 400
    t_star: int = 0  # forward step the (half-hidden) profiles are noised to before the reverse
    masks: int = 8  # random halves hidden per profile (each own item is scored where hidden)
    folds: int = 2  # cross-fitting folds of the users (each scored by the DiffRec of the others)

    def __post_init__(self):
        super().__post_init__()
        _check_steps(self.t_star, self.masks)
        DiffRecFit(self.epochs, self.lr, self.batch_size, self.folds).check()


@dataclass(frozen=True)
class ProfilePurifyConfig:
    t_star: int = 10  # forward step the profiles are noised to (DiffRec's schedule: 0..steps-1 = 0..39)
    keep_share: float = 0.9  # share of each profile's items kept (the best purified scores; at least one)
    masks: int = 8  # random halves hidden per profile (each own item is scored where hidden)
    folds: int = 2  # cross-fitting folds of the users (each scored by the DiffRec of the others)
    epochs: int = 50
    lr: float = 1e-3
    batch_size: int = 400

    def __post_init__(self):
        if isinstance(self.keep_share, bool) or not isinstance(self.keep_share, (int, float)) \
                or not 0 < self.keep_share <= 1:
            raise ConfigError(f"defense.keep_share: expected a share in (0, 1], got {self.keep_share!r}")
        _check_steps(self.t_star, self.masks)
        DiffRecFit(self.epochs, self.lr, self.batch_size, self.folds).check()


class ProfileDefense:
    """A data transform: score, flag/purify, change the training rows; ``last_report`` keeps the figures."""

    name = ""

    def __init__(self, config):
        self.config = config
        self.last_report: dict | None = None

    def key(self) -> str:
        params = json.dumps(dataclasses.asdict(self.config), sort_keys=True, separators=(",", ":"))
        return f"fedrec.defenses.profiles.{self.name}{params}"

    def __repr__(self) -> str:
        return self.key()

    def scores(self, train, seed: int) -> np.ndarray:  # pragma: no cover  (each detector its own)
        raise NotImplementedError

    def apply(self, data: Interactions, seed: int) -> Interactions:
        c = self.config
        scores = self.scores(data.train, int(seed))
        flagged = flag_top(scores, c.flag_fraction)
        truth = data.injected if data.injected is not None else np.zeros(data.n_users, bool)
        self.last_report = {"name": self.name, "detection": detection_report(scores, truth, flagged),
                            "dropped_users": int(flagged.sum()) if c.drop else 0,
                            "dropped_genuine": int((flagged & ~truth).sum()) if c.drop else 0}
        out = drop_users_training(data, np.flatnonzero(flagged)) if c.drop and flagged.any() else data
        return self.recorded(out)

    def recorded(self, out: Interactions) -> Interactions:
        """``out`` (a new object) carrying this transform's report (``Interactions.transform_reports``)."""
        return dataclasses.replace(out, transform_reports={**out.transform_reports, self.key(): self.last_report})


class DegreeDetector(ProfileDefense):
    name = "degree_detect"

    def scores(self, train, seed):
        return degree_scores(train)


class PCADetector(ProfileDefense):
    name = "pca_detect"

    def scores(self, train, seed):
        return pca_scores(train, self.config.components)


class DiffusionDetector(ProfileDefense):
    name = "diffusion_detect"

    def scores(self, train, seed):
        c = self.config
        return diffusion_scores(train, DiffRecFit(c.epochs, c.lr, c.batch_size, c.folds), seed, c.t_star, c.masks)


class ProfilePurifier(ProfileDefense):
    name = "profile_purify"

    def apply(self, data: Interactions, seed: int) -> Interactions:
        c = self.config
        pct = purify_scores(data.train, DiffRecFit(c.epochs, c.lr, c.batch_size, c.folds), c.t_star, c.masks, int(seed))
        keep = keep_top_share(pct, c.keep_share)
        rows = np.repeat(np.arange(pct.shape[0]), np.diff(pct.indptr))
        removed = ~keep.data.astype(bool)
        fake = data.injected[rows] if data.injected is not None else np.zeros(len(rows), bool)
        targets = data.attack_targets
        on_target = np.isin(pct.indices, targets) if targets is not None else np.zeros(len(rows), bool)
        self.last_report = {
            "name": self.name, "removed": int(removed.sum()), "interactions": int(len(removed)),
            "removed_fake": int((removed & fake).sum()), "removed_genuine": int((removed & ~fake).sum()),
            "target_interactions": int(on_target.sum()) if targets is not None else None,
            "removed_target": int((removed & on_target).sum()) if targets is not None else None,
            "removed_target_fake": int((removed & on_target & fake).sum()) if targets is not None else None,
        }
        return self.recorded(keep_train_entries(data, keep))


def keep_top_share(pct: sp.csr_matrix, share: float) -> sp.csr_matrix:
    """Mask (pct's layout) of each row's ``max(1, round(share * len))`` entries with the largest values."""
    n = np.diff(pct.indptr)
    rows = np.repeat(np.arange(pct.shape[0]), n)
    order = np.lexsort((-pct.data, rows))  # within each row, best first
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order)) - np.repeat(pct.indptr[:-1], n)
    quota = np.maximum(1, np.floor(share * n + 0.5)).astype(np.int64)
    out = pct.copy()
    out.data = (rank < quota[rows]).astype(np.float64)
    return out


# --------------------------------------------------------------------------- as mechanisms (defense=...)
class _ProfileDefenseMechanism(Mechanism):
    kind = "defense"
    transform: type[ProfileDefense] = ProfileDefense

    def data_transforms(self) -> list:
        return [self.transform(self.config)]

    def report(self, ctx) -> dict:
        """What the transform measured on this run's data (carried by the data itself: the process that
        reports need not be the one whose mechanism objects applied it)."""
        found = ctx.data.transform_reports.get(self.transform(self.config).key())
        if found is None:
            raise RuntimeError(f"defense={self.name}: the run's data carries no report of its transform")
        return dict(found)


@register
class DegreeDetect(_ProfileDefenseMechanism):
    name, Config, transform = "degree_detect", DegreeDetectConfig, DegreeDetector


@register
class PCADetect(_ProfileDefenseMechanism):
    name, Config, transform = "pca_detect", PCADetectConfig, PCADetector


@register
class DiffusionDetect(_ProfileDefenseMechanism):
    name, Config, transform = "diffusion_detect", DiffusionDetectConfig, DiffusionDetector


@register
class ProfilePurify(_ProfileDefenseMechanism):
    name, Config, transform = "profile_purify", ProfilePurifyConfig, ProfilePurifier
