"""Synthetic-user generators: SDRM, a latent DDPM, or any generative model of the zoo, optionally with DP.

A generator is fitted on the members' 0/1 rows and releases synthetic users in three steps:

1. item scores of ``n`` new users from the generator's prior (``SyntheticGenerator.scores``): SDRM
   (``sdrm.py``, the paper's method) reverses its latent score model and decodes; the latent DDPM
   (``latent_ddpm.py``) reverses a DDPM over MultVAE latents and decodes; a zoo model reverses its own
   diffusion chain from pure noise (``Recommender.generate``: DiffRec, L-DiffRec; MultVAE decodes prior
   samples);
2. binarisation (``binarize``): ``sample`` / ``topk`` draw each synthetic user's number of items k from
   the members' activity distribution, then take k items without replacement from
   softmax(scores / temperature) (Gumbel top-k) or the k best; ``quantile`` (SDRM's official
   binarisation) keeps every score at or above the (1 - density) quantile of all the release's scores,
   the density being the members' share of ones (under DP: the mean of the noisy activity histogram).

DP (``generator.dp``, the fields of ``conf/privacy/dpsgd.yaml``): every training stage runs Opacus
DP-SGD with one shared noise multiplier, the user being the privacy unit (one row, or one latent, per
user in each stage); the activity distribution is a histogram with Gaussian noise of that multiplier
(add/remove sensitivity 1, one Gaussian mechanism); epsilon is the composition of all of them by one
accountant over the concatenated histories (Opacus RDP or PRV). ``target_epsilon`` calibrates the
shared multiplier by bisection on that composition. Under DP nothing else reads the private rows:
the latent DDPM's standardisation is off, and L-DiffRec must not cluster items on them (``n_cate=1``).
The member count is treated as public (it sets sampling rates and the release size).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from fedrec.errors import ConfigError
from fedrec.models import DataShape, build_model
from fedrec.models.base import Recommender
from fedrec.train import TrainRows, make_optimizer

from fedrec.privacy.generator_base import (  # noqa: F401  (the interface, re-exported from here)
    BINARIZE, HISTOGRAM, ActivityDistribution, PrivacyPlan, SyntheticGenerator, quantile_binarize,
)


class ZooGenerator(SyntheticGenerator):
    """A generative model of the zoo, trained with its own loss on the members and sampled from its prior.

    The model's block must use a generative diffusion schedule (x_T close to N(0, I)); DiffRec's
    recommendation schedule (noise_scale 0.005) keeps ~99% of the signal and is refused.
    """

    def __init__(self, model_cfg: dict[str, Any], epochs: int, n_items: int, seed: int = 0, **common):
        super().__init__(n_items, seed, **common)
        if int(epochs) < 1:
            raise ConfigError(f"generator.epochs: must be >= 1, got {epochs}")
        self.model_cfg, self.epochs = dict(model_cfg), int(epochs)
        self.name = str(self.model_cfg.get("name"))
        self.optim = dict(self.model_cfg.get("optim") or {"lr": 1e-3, "weight_decay": 0.0, "batch_size": 128})
        if self.dp is not None and self.name == "ldiffrec" and int(self.model_cfg.get("n_cate", 2)) > 1:
            raise ConfigError("generator.model.n_cate: L-DiffRec's item clusters come from the private rows; "
                              "under generator.dp use n_cate=1")

    def stages(self) -> list[tuple[int, int]]:
        return [(int(self.optim["batch_size"]), self.epochs)]

    def _fit(self, rows: sp.csr_matrix) -> None:
        from fedrec.models import svd_item_embeddings

        shape = DataShape(rows.shape[0], self.n_items, item_emb_fn=lambda: svd_item_embeddings(rows, seed=self.seed))
        self.model = build_model(self.model_cfg, shape)
        if type(self.model).generate is Recommender.generate:
            self.model.generate(1, torch.Generator())  # raises the model's own "cannot generate" error
        if hasattr(self.model, "diffusion"):
            self.model.diffusion.check_reaches_noise("generator.model")  # before training, not after
        from omegaconf import OmegaConf

        opt = make_optimizer(self.model, OmegaConf.create(self.optim))
        self.train_stage(self.model, opt, TrainRows(rows, np.arange(rows.shape[0])), int(self.optim["batch_size"]),
                         self.epochs)

    def scores(self, n: int, g: torch.Generator) -> torch.Tensor:
        return self.model.generate(n, g)


def _latent_generators() -> dict[str, tuple[type, type]]:
    """Generators with their own config dataclass: name -> (generator class, config class)."""
    from fedrec.privacy.latent_ddpm import LatentDDPM, LatentDDPMConfig
    from fedrec.privacy.sdrm import SDRM, SDRMConfig

    return {"sdrm": (SDRM, SDRMConfig), "latent_ddpm": (LatentDDPM, LatentDDPMConfig)}


def build_generator(cfg, n_items: int, seed: int) -> SyntheticGenerator:
    """The generator of ``conf/generator/<name>.yaml`` (``cfg`` = the ``generator`` block)."""
    from omegaconf import OmegaConf

    from fedrec.typed_config import typed_block
    from fedrec.privacy.dpsgd import dpsgd_config

    raw = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    name = raw.pop("name", None)
    dp_raw = raw.pop("dp", None)
    off = not dp_raw or (dp_raw.get("target_epsilon") is None and dp_raw.get("noise_multiplier") is None)
    dp = None if off else dpsgd_config(dp_raw, where="generator.dp")
    common = {k: raw.pop(k) for k in ("temperature", "binarize", "activity_bins") if k in raw}
    own = _latent_generators()
    if name in own:
        cls, cfg_cls = own[name]
        return cls(typed_block(cfg_cls, raw, "generator"), n_items, seed, dp=dp, **common)
    if name == "zoo":
        unknown = sorted(set(raw) - {"model", "epochs"})
        if unknown or "model" not in raw:
            raise ConfigError(f"generator.{(unknown or ['model'])[0]}: a zoo generator takes 'model' and 'epochs'")
        return ZooGenerator(raw["model"], raw.get("epochs", 100), n_items, seed, dp=dp, **common)
    raise ConfigError(f"generator.name: unknown generator {name!r}; expected one of {', '.join([*own, 'zoo'])}")
