"""What the item-image attacks (attacks/ipdgi.py, attacks/image_poison.py) share.

* The victim: a visually-aware recommender (``model=vbpr``) whose fixed feature extractor is
  public -- the papers attack recommenders built on public pretrained CNNs -- so the attacker
  back-propagates through it (``model.visual_features``).
* The targets: ``targets`` / ``target_selection`` / ``n_targets`` as every attack with targets
  (:func:`attacks.shilling.select_targets`); the target-item metrics come from
  :class:`attacks.target_tracking.TargetTracking` (genuine users who never interacted with a target).
* The attacker's objective on a candidate image x of a target item, with f = f(x):

      J(x) = - popular_weight * ||f - c_pop||^2 / F  +  preference_weight * mean_u [theta_u^T E f + beta'^T f] / s

  c_pop: the mean feature of the ``popular_items`` most popular items (popularity is public
  knowledge: training interactions of the genuine users); the second term is the target's visual
  score averaged over the genuine users (the "user preference" of IPDGI's guidance; it reads the
  victim's visual parameters theta, E, beta': white-box, as in both papers); s = the std of the
  catalogue's mean visual scores, so both terms are O(1).
* The bound: every image stays in the L_inf ball of radius ``epsilon`` around its original (and in
  [0, 1]); the report holds L2, L_inf and SSIM (:func:`fedrec.eval.images.perturbation_sizes`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from attacks.shilling import TARGET_SELECTIONS, _int_or_none, select_targets
from attacks.target_tracking import TargetTracking
from fedrec.errors import ConfigError
from fedrec.mechanisms import Mechanism


@dataclass
class ImageAttackConfig:
    targets: tuple | None = None  # target item ids as in the data files
    target_selection: str = "unpopular"  # unpopular | random, when targets is None
    n_targets: int = 1  # targets drawn when targets is None
    epsilon: float = 0.0627  # L_inf radius of the perturbation (16/255)
    popular_items: int = 50  # items whose mean feature is the guidance's target region
    popular_weight: float = 0.1  # weight of the pull toward the popular items' feature region
    preference_weight: float = 1.0  # weight of the genuine users' mean visual score of the target

    def __post_init__(self):
        if self.targets is not None:
            tokens = (self.targets,) if isinstance(self.targets, (str, int)) else tuple(self.targets)
            if not tokens or len(set(map(str, tokens))) != len(tokens):
                raise ConfigError(f"attack.targets: expected a non-empty list of distinct item ids, got {list(tokens)}")
            self.targets = tuple(str(t) for t in tokens)
        if self.target_selection not in TARGET_SELECTIONS:
            raise ConfigError(f"attack.target_selection: expected one of {', '.join(TARGET_SELECTIONS)}, "
                              f"got {self.target_selection!r}")
        self.n_targets = _int_or_none(self.n_targets, "n_targets", 1)
        if not 0 < float(self.epsilon) <= 1:
            raise ConfigError(f"attack.epsilon: must be in (0, 1] (pixels are in [0, 1]), got {self.epsilon}")
        self.popular_items = _int_or_none(self.popular_items, "popular_items", 1)
        if self.popular_weight < 0 or self.preference_weight < 0 or self.popular_weight + self.preference_weight == 0:
            raise ConfigError("attack.popular_weight/preference_weight: non-negative, not both 0")


def project(x: torch.Tensor, original: torch.Tensor, epsilon: float) -> torch.Tensor:
    """``x`` moved into the L_inf ball of radius ``epsilon`` around ``original``, then into [0, 1]."""
    return (original + (x - original).clamp(-epsilon, epsilon)).clamp(0.0, 1.0)


def pgd_steps(objective, image: torch.Tensor, original: torch.Tensor, steps: int, step_size: float,
              epsilon: float) -> torch.Tensor:
    """``steps`` signed-gradient ascent steps on ``objective`` from ``image``, each projected into the
    L_inf ball of ``epsilon`` around ``original`` (and [0, 1]) (Madry et al.'s PGD)."""
    x = image.detach()
    for _ in range(int(steps)):
        with torch.enable_grad():
            x.requires_grad_(True)
            (g,) = torch.autograd.grad(objective(x).sum(), x)
        x = project(x.detach() + step_size * g.sign(), original, epsilon)
    return x


class VisualObjective:
    """J(x) of the module docstring for one trained visual recommender."""

    def __init__(self, model, data, popular_items: int, popular_weight: float, preference_weight: float):
        self.model = model
        pop = np.asarray(data.train[data.genuine()].sum(axis=0)).ravel()
        self.popular = np.argsort(-pop, kind="stable")[:popular_items]
        genuine = torch.as_tensor(data.genuine(), dtype=torch.long, device=model.item_features.device)
        with torch.no_grad():
            feats = model.item_features
            self.centre = feats[torch.as_tensor(self.popular, device=feats.device)].mean(0)
            # the genuine users' mean theta: mean_u theta_u^T E f = (mean theta)^T E f
            self.theta = model.user_visual(genuine).mean(0)
            self.scale = float(self._mean_visual(feats).std().clamp(min=1e-8))
        self.popular_weight, self.preference_weight = float(popular_weight), float(preference_weight)

    def _mean_visual(self, f: torch.Tensor) -> torch.Tensor:
        m = self.model
        return (f @ m.visual_proj.T) @ self.theta + f @ m.visual_bias

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        f = self.model.visual_features(images)
        pull = ((f - self.centre) ** 2).mean(1)
        return -self.popular_weight * pull + self.preference_weight * self._mean_visual(f) / self.scale


class ImageAttack(TargetTracking, Mechanism):
    """Shared checks, targets and report of the image attacks."""

    kind = "attack"
    modes = ("none",)

    def check(self, cfg) -> None:
        from fedrec.models.vbpr import check_visual_run

        check_visual_run(cfg, f"attack={self.name}", "the uploaded images and the attack's state are")

    def target_ids(self, data, seed: int) -> np.ndarray:
        return select_targets(self.config, data, seed)

    def objective(self, ctx) -> VisualObjective:
        c = self.config
        return VisualObjective(ctx.model, ctx.data, c.popular_items, c.popular_weight, c.preference_weight)

    def perturbed_items(self) -> np.ndarray:
        """Ground truth for a detector's report (never read by a defense's decisions)."""
        return np.asarray(self.__dict__.get("_perturbed", []), dtype=np.int64)
