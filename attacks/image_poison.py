"""Gradual image poisoning of a visually-aware recommender (Yuan et al., ACM TOIS 2023, "Manipulating
Visually-aware Federated Recommender Systems and Its Countermeasures", the item-side image attack):
``attack=image_poison``.

The attacker (the target item's provider) perturbs the target's image a little at a time while the
recommender keeps training: in every epoch from ``start_epoch`` on it takes ``steps_per_epoch``
signed-gradient (PGD) steps of size ``step_size`` on the current image, ascending the objective J
of :mod:`attacks.image_common` (the genuine users' mean visual score of the target, plus the pull
toward the popular items' feature region), projects the image into the L_inf ball of ``epsilon``
around the original, and re-uploads it (:func:`fedrec.mechanisms.install_item_images`); the
recommender then trains on the new image until the next epoch. Gradual, bounded steps keep each
upload close to the previous one (the paper's stealth argument); the ball bounds the total change.

Report: the target metrics per evaluated epoch (``attacks.target_tracking``: the history shows the
rank moving as the image is poisoned), the clean metrics before the first upload (``clean_*``), and
the current image's L2 / L_inf / SSIM to the original.

Deviation, with reason: Yuan et al.'s setting is a federated visual recommender in which malicious
clients also poison model updates; this implementation is centralised (``federation=none``): the
item image lives in the catalogue every process loads, and this branch has no way to change it on
the nodes of a running federation (and no in-process federation backend to run it without Ray).
The image perturbation itself -- bounded PGD on the target's visual score over the training rounds --
is the paper's item-side attack.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attacks.image_common import ImageAttack, ImageAttackConfig, pgd_steps
from fedrec.errors import ConfigError
from fedrec.mechanisms import install_item_images, register


@dataclass
class ImagePoisonConfig(ImageAttackConfig):
    start_epoch: int = 1  # first epoch after which the image is perturbed
    steps_per_epoch: int = 5  # PGD steps per epoch
    step_size: float = 0.004  # L_inf size of one signed-gradient step (about 1/255)

    def __post_init__(self):
        super().__post_init__()
        if int(self.start_epoch) < 1 or int(self.steps_per_epoch) < 1:
            raise ConfigError("attack.start_epoch/steps_per_epoch: must be >= 1")
        if not self.step_size > 0:
            raise ConfigError(f"attack.step_size: must be positive, got {self.step_size}")


@register
class ImagePoisonAttack(ImageAttack):
    name = "image_poison"
    Config = ImagePoisonConfig

    def report(self, ctx) -> dict:
        from fedrec.eval.images import perturbation_sizes
        from fedrec.eval.targets import target_metrics

        c, cfg, data = self.config, ctx.cfg, ctx.data
        targets = self.target_ids(data, int(cfg.seed))
        st = self.__dict__.setdefault("_state", {})
        rnd = ctx.evaluated_round
        if rnd is not None and rnd >= int(c.start_epoch) and st.get("last") != rnd:
            original = data.item_side.all_images()[torch.as_tensor(targets)]
            if "image" not in st:
                st["clean"] = target_metrics(ctx.model, data, targets, list(cfg.eval.ks), int(cfg.eval.batch_size))
                st["image"] = original.clone()
            # this epoch's metrics are recorded for the image the model trained and was evaluated with
            section = self.target_section(ctx)
            st["image"] = pgd_steps(self.objective(ctx), st["image"], original, c.steps_per_epoch, c.step_size,
                                    c.epsilon)
            st["perturbation"] = perturbation_sizes(original, st["image"])
            st["last"], st["uploads"] = rnd, st.get("uploads", 0) + 1
            self._perturbed = [int(t) for t in targets]
            install_item_images(ctx, targets, st["image"], "upload")
        else:
            section = self.target_section(ctx)
        out = {"name": self.name, "targets": [str(data.item_ids[t]) for t in targets],
               "uploads": int(st.get("uploads", 0))} | section
        if "clean" in st:
            out["perturbation"] = st["perturbation"]
            out |= {f"clean_{k}": v for k, v in st["clean"].items() if "@" in k or k == "mean_rank"}
            if out.get("mean_rank"):
                out["rank_improvement"] = st["clean"]["mean_rank"] / out["mean_rank"]
        return out
