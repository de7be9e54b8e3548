"""The synthetic-release generator interface and what every generator shares.

``SyntheticGenerator`` (fit on the members' rows, then sample binarised synthetic users), the DP plan
that gives every training stage one noise multiplier (``PrivacyPlan``), the members' noisy activity
distribution and the binarisations. The generators themselves live in ``generators.py`` (zoo
models), ``sdrm.py`` and ``latent_ddpm.py``; ``generators.build_generator`` picks one from the config.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import scipy.sparse as sp
import torch

from fedrec.errors import ConfigError
from fedrec.models import DataShape, build_model
from fedrec.models.base import Recommender
from fedrec.privacy.accounting import calibrate_noise, composed_epsilon
from fedrec.privacy.dpsgd import DPSGDConfig, DPSGDTrainer
from fedrec.train import TrainRows, train_epoch

HISTOGRAM = (1.0, 1)  # (sample rate, steps) of the activity histogram: one Gaussian mechanism on everyone
BINARIZE = ("sample", "topk", "quantile")


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

    def density(self) -> float:
        """Expected share of ones per synthetic row: mean activity / items (under DP, of the noisy histogram)."""
        if self.values is not None:
            return float(self.values.mean()) / self.n_items
        mids = (self.edges[:-1] + self.edges[1:] - 1) / 2.0  # mean of the uniform integer draw in each bin
        return float(self.probs @ mids) / self.n_items

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
        if binarize not in BINARIZE:
            raise ConfigError(f"generator.binarize: expected one of {', '.join(BINARIZE)}, got {binarize!r}")
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
                    epochs: int, lr_at: Callable[[int], float] | None = None,
                    grad_sample_mode: str | None = None) -> None:
        """Train ``model`` (its per-user ``loss``) for ``epochs``; DP-SGD when the plan says so.

        ``lr_at(epoch)`` sets the learning rate before each epoch; ``grad_sample_mode`` overrides
        ``generator.dp.grad_sample_mode`` for a model that needs one mode.
        """
        def set_lr(epoch: int) -> None:
            if lr_at is not None:
                for group in optimizer.param_groups:  # Opacus's DPOptimizer shares these groups
                    group["lr"] = lr_at(epoch)

        if self.plan is None:
            for epoch in range(epochs):
                set_lr(epoch)
                train_epoch(model, optimizer, rows, batch_size, self.rng)
        else:
            cfg = DPSGDConfig(noise_multiplier=self.plan.noise_multiplier, max_grad_norm=self.dp.max_grad_norm,
                              delta=self.plan.delta, accountant=self.dp.accountant,
                              grad_sample_mode=grad_sample_mode or self.dp.grad_sample_mode)
            trainer = DPSGDTrainer(model, optimizer, rows, batch_size, cfg, epochs, int(self.rng.integers(2**31)))
            for epoch in range(epochs):
                set_lr(epoch)
                trainer.epoch()
            self.history += [tuple(h) for h in trainer.engine.accountant.history]
            trainer.module._close()  # drop Opacus's hooks: the model is used plainly from here on
        model.eval()

    def multvae_latents(self, rows: sp.csr_matrix, hidden: list[int], latent_dim: int, lr: float, batch_size: int,
                        epochs: int, anneal_cap: float, anneal_steps: int) -> tuple[Recommender, torch.Tensor, torch.Tensor]:
        """Stage 1 of the latent generators: fedrec's MultVAE (Adam) on the members' rows, then the
        posterior means and standard deviations of every member (eval mode: no dropout)."""
        vae = build_model({"name": "multvae", "hidden_dims": list(hidden), "latent_dim": latent_dim,
                           "anneal_cap": anneal_cap, "total_anneal_steps": anneal_steps},
                          DataShape(rows.shape[0], self.n_items))
        real = TrainRows(rows, np.arange(rows.shape[0]))
        self.train_stage(vae, torch.optim.Adam(vae.parameters(), lr=lr), real, batch_size, epochs)
        with torch.no_grad():
            enc = [vae.encode(real.batch(np.arange(s, min(s + 1024, len(real)))).x) for s in range(0, len(real), 1024)]
        return vae, torch.cat([m for m, _ in enc]), torch.cat([torch.exp(0.5 * lv) for _, lv in enc])

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
        if self.binarize == "quantile":
            scores = torch.cat([self.scores(min(chunk, n - s), g) for s in range(0, n, chunk)])
            return quantile_binarize(scores, self.activity.density())
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


def quantile_binarize(scores: torch.Tensor, share: float) -> sp.csr_matrix:
    """Ones where a score reaches the (1 - share) quantile of all scores (numpy's linear quantile, as the
    official SDRM code): the release keeps ``share`` of its cells, however they fall over users."""
    flat = scores.numpy().ravel()
    threshold = np.quantile(flat, 1.0 - share)
    r, c = np.nonzero(scores.numpy() >= threshold)
    return sp.csr_matrix((np.ones(len(r), np.float32), (r, c)), shape=tuple(scores.shape))
