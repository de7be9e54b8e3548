"""Synthetic-user generators: SDRM or any generative model of the zoo, optionally trained with DP.

A generator is fitted on the members' 0/1 rows and releases synthetic users in three steps:

1. item scores of ``n`` new users from the generator's prior (``SyntheticGenerator.scores``): SDRM
   (``sdrm.py``) reverses a latent DDPM and decodes; a zoo model reverses its own diffusion chain from
   pure noise (``Recommender.generate``: DiffRec, L-DiffRec; MultVAE decodes prior samples);
2. each synthetic user's number of items k, drawn from the members' activity distribution;
3. binarisation: k items drawn without replacement from softmax(scores / temperature) (Gumbel top-k,
   ``binarize=sample``) or the k best (``topk``).

DP (``generator.dp``, the fields of ``conf/privacy/dpsgd.yaml``): every training stage runs Opacus
DP-SGD with one shared noise multiplier, the user being the privacy unit (one row, or one latent, per
user in each stage); the activity distribution is a histogram with Gaussian noise of that multiplier
(add/remove sensitivity 1, one Gaussian mechanism); epsilon is the composition of all of them by one
accountant over the concatenated histories (Opacus RDP or PRV). ``target_epsilon`` calibrates the
shared multiplier by bisection on that composition. Under DP nothing else reads the private rows:
SDRM's latent standardisation is off, and L-DiffRec must not cluster items on them (``n_cate=1``).
The member count is treated as public (it sets sampling rates and the release size).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from fedrec.errors import ConfigError
from fedrec.models import DataShape, build_model
from fedrec.models.base import Recommender
from fedrec.privacy.accounting import calibrate_noise, composed_epsilon
from fedrec.privacy.dpsgd import DPSGDConfig, DPSGDTrainer
from fedrec.train import TrainRows, make_optimizer, train_epoch

HISTOGRAM = (1.0, 1)  # (sample rate, steps) of the activity histogram: one Gaussian mechanism on everyone


class PrivacyPlan:
    """The DP mechanisms a generator will run, and the one noise multiplier they share."""

    def __init__(self, dp: DPSGDConfig, n_users: int, stages: list[tuple[int, int]]):
        self.dp = dp
        self.delta = dp.delta if dp.delta is not None else 1.0 / n_users
        # Opacus's Poisson rate is 1 / len(loader) and every epoch has len(loader) steps.
        self.mechanisms = []
        for batch_size, epochs in stages:
            steps = math.ceil(n_users / batch_size)
            self.mechanisms.append((1.0 / steps, epochs * steps))
        self.mechanisms.append(HISTOGRAM)
        if dp.target_epsilon is None:
            self.noise_multiplier = float(dp.noise_multiplier)
        elif math.isinf(dp.target_epsilon):
            self.noise_multiplier = 0.0  # clipping only
        else:
            self.noise_multiplier = calibrate_noise(self.epsilon_at, float(dp.target_epsilon), "generator.dp.target_epsilon")

    def epsilon_at(self, sigma: float) -> float:
        return composed_epsilon([(sigma, q, s) for q, s in self.mechanisms], self.delta, self.dp.accountant)


class ActivityDistribution:
    """Items per synthetic user: the members' activities, or under DP a noisy log-binned histogram."""

    def __init__(self, activity: np.ndarray, n_items: int, sigma: float | None, bins: int, rng: np.random.Generator):
        activity = activity[activity > 0]
        self.n_items = n_items
        if sigma is None:
            self.values = activity
            return
        self.values = None
        self.edges = np.unique(np.geomspace(1, n_items + 1, bins + 1).astype(int))
        counts = np.histogram(activity, self.edges)[0].astype(float)
        noisy = np.clip(counts + sigma * rng.standard_normal(len(counts)), 0, None)
        self.probs = noisy / noisy.sum() if noisy.sum() > 0 else np.full(len(counts), 1.0 / len(counts))

    def draw(self, n: int, rng: np.random.Generator) -> np.ndarray:
        if self.values is not None:
            k = rng.choice(self.values, size=n, replace=True)
        else:
            b = rng.choice(len(self.probs), size=n, p=self.probs)
            k = rng.integers(self.edges[b], self.edges[b + 1])  # uniform within the bin
        return np.clip(k, 1, self.n_items)


class SyntheticGenerator:
    """Base class: ``fit(rows)``, then ``sample(n)``; subclasses give ``stages``, ``_fit`` and ``scores``."""

    name = "base"

    def __init__(self, n_items: int, seed: int = 0, temperature: float = 1.0, binarize: str = "sample",
                 dp: DPSGDConfig | None = None, activity_bins: int = 16):
        if binarize not in ("sample", "topk"):
            raise ConfigError(f"generator.binarize: expected sample or topk, got {binarize!r}")
        if temperature <= 0:
            raise ConfigError(f"generator.temperature: must be positive, got {temperature}")
        if activity_bins < 1:
            raise ConfigError(f"generator.activity_bins: must be >= 1, got {activity_bins}")
        self.n_items, self.seed, self.temperature, self.binarize = n_items, seed, float(temperature), binarize
        self.dp, self.activity_bins = dp, int(activity_bins)
        self.plan: PrivacyPlan | None = None
        self.history: list[tuple[float, float, int]] = []

    # ------------------------------------------------------------------ subclass interface
    def stages(self) -> list[tuple[int, int]]:
        """(batch size, epochs) of every training stage, in order (the privacy plan needs them up front)."""
        raise NotImplementedError

    def _fit(self, rows: sp.csr_matrix) -> None:
        raise NotImplementedError

    def scores(self, n: int, g: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------------ shared
    def fit(self, rows: sp.csr_matrix) -> "SyntheticGenerator":
        rows = sp.csr_matrix(rows)
        if rows.shape[1] != self.n_items:
            raise ConfigError(f"generator: rows have {rows.shape[1]} items, the generator {self.n_items}")
        n = int((np.diff(rows.indptr) > 0).sum())
        if n < 2:
            raise ConfigError(f"generator: needs at least 2 members with interactions, got {n}")
        torch.manual_seed(self.seed)
        self.rng = np.random.default_rng(self.seed)
        self.plan = PrivacyPlan(self.dp, n, self.stages()) if self.dp is not None else None
        sigma = None if self.plan is None else self.plan.noise_multiplier
        self.activity = ActivityDistribution(np.diff(rows.indptr), self.n_items, sigma, self.activity_bins, self.rng)
        if self.plan is not None:
            self.history = [(sigma, *HISTOGRAM)]
        self._fit(rows)
        return self

    def train_stage(self, model: Recommender, optimizer: torch.optim.Optimizer, rows, batch_size: int,
                    epochs: int) -> None:
        """Train ``model`` (its per-user ``loss``) for ``epochs``; DP-SGD when the plan says so."""
        if self.plan is None:
            for _ in range(epochs):
                train_epoch(model, optimizer, rows, batch_size, self.rng)
        else:
            cfg = DPSGDConfig(noise_multiplier=self.plan.noise_multiplier, max_grad_norm=self.dp.max_grad_norm,
                              delta=self.plan.delta, accountant=self.dp.accountant,
                              grad_sample_mode=self.dp.grad_sample_mode)
            trainer = DPSGDTrainer(model, optimizer, rows, batch_size, cfg, epochs, int(self.rng.integers(2**31)))
            for _ in range(epochs):
                trainer.epoch()
            self.history += [tuple(h) for h in trainer.engine.accountant.history]
            trainer.module._close()  # drop Opacus's hooks: the model is used plainly from here on
        model.eval()

    def epsilon(self) -> float:
        """The composed epsilon of everything the fit released (inf without DP)."""
        if self.plan is None:
            return math.inf
        return composed_epsilon(self.history, self.plan.delta, self.dp.accountant)

    @torch.no_grad()
    def sample(self, n: int, seed: int | None = None, chunk: int = 1024) -> sp.csr_matrix:
        """``n`` synthetic users as a 0/1 CSR matrix."""
        seed = self.seed + 1 if seed is None else seed
        g = torch.Generator().manual_seed(seed)
        ks = self.activity.draw(n, np.random.default_rng([seed, 2]))
        parts = []
        for s in range(0, n, chunk):
            logits = self.scores(min(chunk, n - s), g)
            k = torch.from_numpy(ks[s:s + chunk])
            if self.binarize == "sample":  # Gumbel top-k = k draws without replacement from softmax(logits/T)
                u = torch.rand(logits.shape, generator=g).clamp(1e-12, 1 - 1e-12)
                logits = logits / self.temperature - torch.log(-torch.log(u))
            top = torch.topk(logits, int(k.max()), dim=1).indices
            keep = torch.arange(top.shape[1])[None, :] < k[:, None]
            r = np.repeat(np.arange(len(k)), keep.sum(1).numpy())
            parts.append(sp.csr_matrix((np.ones(len(r), np.float32), (r, top[keep].numpy())),
                                       shape=(len(k), self.n_items)))
        return sp.vstack(parts).tocsr()


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


def build_generator(cfg, n_items: int, seed: int) -> SyntheticGenerator:
    """The generator of ``conf/generator/<name>.yaml`` (``cfg`` = the ``generator`` block)."""
    from omegaconf import OmegaConf

    from fedrec.privacy.dpsgd import dpsgd_config
    from fedrec.privacy.sdrm import SDRM, SDRMConfig

    raw = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    name = raw.pop("name", None)
    dp_raw = raw.pop("dp", None)
    off = not dp_raw or (dp_raw.get("target_epsilon") is None and dp_raw.get("noise_multiplier") is None)
    dp = None if off else dpsgd_config(dp_raw, where="generator.dp")
    common = {k: raw.pop(k) for k in ("temperature", "binarize", "activity_bins") if k in raw}
    if name == "sdrm":
        known = set(SDRMConfig.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"generator.{unknown[0]}: unknown key for sdrm; known: {sorted(known | set(common))}")
        return SDRM(SDRMConfig(**raw), n_items, seed, dp=dp, **common)
    if name == "zoo":
        unknown = sorted(set(raw) - {"model", "epochs"})
        if unknown or "model" not in raw:
            raise ConfigError(f"generator.{(unknown or ['model'])[0]}: a zoo generator takes 'model' and 'epochs'")
        return ZooGenerator(raw["model"], raw.get("epochs", 100), n_items, seed, dp=dp, **common)
    raise ConfigError(f"generator.name: unknown generator {name!r}; expected sdrm or zoo")
