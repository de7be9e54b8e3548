"""Diffusion purification and detection of item images (Yuan et al., ACM TOIS 2023, "Manipulating
Visually-aware Federated Recommender Systems and Its Countermeasures", the countermeasure):
``defense=image_purify``.

Every item image is purified before the visual recommender computes its features: a diffusion model
of the catalogue's images (:mod:`fedrec.models.image_diffusion`, the shared core underneath) noises
it to step ``t_star`` and denoises it back with a guided reverse process (deterministic DDIM on
``sample_steps`` steps, guided by ``guidance_scale`` x the gradient of -||x0_hat - x||^2 / 2, which
keeps the purified image's content close to the input's while the adversarial high-frequency
pattern, absent from the catalogue's distribution, is washed out: the GDMP-style guidance, Wang et al.
2022, that Yuan et al. build on). The model computes features from the purified images only.

Detection: an image's score is the distance between the encodings (the victim's standardised
visual features) of the original and of the purified image, ||f(x) - f(purify(x))||_2. A purified
adversarial image falls back toward its item's natural look, so its encoding moves far; a clean
image hardly moves. An uploaded image is flagged when its score exceeds the ``flag_quantile``
quantile of the catalogue's own scores (the defender's calibration set).

Where: ``federation=none`` with a visual recommender (``model=vbpr``). ``prepare_model`` purifies
the whole catalogue before the first epoch (so the model trains on purified features) and scores it;
every later upload (``fedrec.mechanisms.install_item_images``, e.g. IPDGI's replacement image) is
purified and scored before the model sees it.

Report (summary.json "defense"): ``purified`` images, the ``threshold``, ``flagged_uploads``,
and, against the attack's ground truth (which items' images it perturbed; read for the report only,
never for a decision), :func:`fedrec.eval.detection.detection_report` over every item's current
image (perturbed vs clean): ``auc``, ``precision`` / ``recall`` / ``flagged`` at the threshold,
``malicious``, ``examples``, and the score medians of both groups.

Deviation: Yuan et al. purify images uploaded in a federation with a large pretrained diffusion
model; here the model is the tiny catalogue UNet, the run is centralised (the attack at hand is the
centralised IPDGI), and the attacker and the defender use the same catalogue diffusion model (same
seed: one training per run; it is the setting least favourable to the defender, as the attacker's
guided images were generated on that very model's manifold).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedrec.errors import ConfigError
from fedrec.mechanisms import Mechanism, install_item_images, register

PURIFY_STREAM = 0x9F1


@dataclass
class ImagePurifyConfig:
    t_star: int = 50  # purification noise step (of diffusion_steps)
    sample_steps: int = 10  # DDIM steps from t_star down to 0
    guidance_scale: float = 1.0  # scale of the guidance toward the input image
    flag_quantile: float = 0.99  # uploads scoring above this quantile of the catalogue's scores are flagged
    batch_size: int = 256  # images purified per batch
    diffusion_steps: int = 100  # T of the catalogue image diffusion model (cosine schedule)
    diffusion_train_steps: int = 1500  # its Adam steps
    diffusion_channels: int = 16  # its UNet width

    def __post_init__(self):
        if not 0 <= int(self.t_star) < int(self.diffusion_steps):
            raise ConfigError(f"defense.t_star: must be in 0..diffusion_steps-1, got {self.t_star}")
        if not 1 <= int(self.sample_steps) <= int(self.t_star) + 1:
            raise ConfigError(f"defense.sample_steps: must be in 1..t_star+1, got {self.sample_steps}")
        if self.guidance_scale < 0:
            raise ConfigError(f"defense.guidance_scale: must be >= 0, got {self.guidance_scale}")
        if not 0 < float(self.flag_quantile) < 1:
            raise ConfigError(f"defense.flag_quantile: must be in (0, 1), got {self.flag_quantile}")
        if int(self.batch_size) < 1:
            raise ConfigError(f"defense.batch_size: must be >= 1, got {self.batch_size}")


def purify_images(diffusion, images: torch.Tensor, t_star: int, sample_steps: int, guidance_scale: float,
                  generator: torch.Generator, batch_size: int = 256) -> torch.Tensor:
    """Guided SDEdit purification of (B, C, H, W) images in [0, 1], in batches."""
    out = []
    for s in range(0, len(images), batch_size):
        x = images[s:s + batch_size]
        objective = lambda x0, x=x: -0.5 * ((x0 - x) ** 2).flatten(1).sum(1)  # noqa: E731
        out.append(diffusion.edit(x, t_star, generator, sample_steps, objective=objective, scale=guidance_scale))
    return torch.cat(out) if out else images.clone()


@torch.no_grad()
def encoding_distance(model, original: torch.Tensor, purified: torch.Tensor) -> np.ndarray:
    """||f(x) - f(purify(x))||_2 per image, f the victim's standardised visual features."""
    return (model.visual_features(original) - model.visual_features(purified)).norm(dim=1).cpu().numpy()


@register
class ImagePurify(Mechanism):
    kind = "defense"
    name = "image_purify"
    Config = ImagePurifyConfig
    modes = ("none",)

    def check(self, cfg) -> None:
        from fedrec.models.vbpr import check_visual_run

        check_visual_run(cfg, "defense=image_purify", "the detection scores are")

    # ------------------------------------------------------------------ purification
    def _diffusion(self, ctx):
        from fedrec.models.image_diffusion import catalogue_model

        return catalogue_model(ctx.data, self.config, ctx.cfg)

    def prepare_model(self, ctx) -> None:
        images = ctx.data.item_side.all_images()
        install_item_images(ctx, np.arange(len(images)), images, "catalogue")

    def filter_item_images(self, ctx, items, images, source: str):
        c = self.config
        st = self.__dict__.setdefault("_state", {"scores": {}, "catalogue": None, "uploads": {}, "n": 0, "purified": 0})
        gen = torch.Generator().manual_seed(int(ctx.cfg.seed) * 1_000_003 + PURIFY_STREAM + st["n"])
        st["n"] += 1
        st["purified"] += len(images)
        purified = purify_images(self._diffusion(ctx), images.float(), int(c.t_star), int(c.sample_steps),
                                 float(c.guidance_scale), gen, int(c.batch_size))
        scores = encoding_distance(ctx.model, images.float().to(ctx.model.item_features.device),
                                   purified.to(ctx.model.item_features.device))
        items = np.atleast_1d(np.asarray(items))
        if source == "catalogue":
            st["catalogue"] = scores.copy()
        for i, s in zip(items.tolist(), scores.tolist()):
            st["scores"][int(i)] = float(s)  # the score of the item's current image
            if source == "upload":
                st["uploads"][int(i)] = float(s)
        return purified

    # ------------------------------------------------------------------ report
    def report(self, ctx) -> dict | None:
        from fedrec.eval.detection import detection_report

        st = self.__dict__.get("_state")
        if st is None or st["catalogue"] is None:
            return {"name": self.name, "purified": 0}
        threshold = float(np.quantile(st["catalogue"], float(self.config.flag_quantile)))
        flagged = sorted(i for i, s in st["uploads"].items() if s > threshold)
        out = {"name": self.name, "purified": int(st["purified"]), "threshold": threshold,
               "uploaded_items": len(st["uploads"]), "flagged_uploads": len(flagged),
               "flagged_items": [str(ctx.data.item_ids[i]) for i in flagged]}
        attack = next((m for m in ctx.mechanisms if m.kind == "attack"), None)
        perturbed = attack.perturbed_items() if attack is not None and hasattr(attack, "perturbed_items") else []
        if len(perturbed):  # every item's current image: perturbed (ground truth) vs clean
            items = np.array(sorted(st["scores"]))
            scores = np.array([st["scores"][i] for i in items])
            truth = np.isin(items, perturbed)
            out |= detection_report(scores, truth, scores > threshold)
            out |= {"score_perturbed_median": float(np.median(scores[truth])),
                    "score_clean_median": float(np.median(scores[~truth])),
                    "score_clean_q99": float(np.quantile(scores[~truth], 0.99))}
        return out
