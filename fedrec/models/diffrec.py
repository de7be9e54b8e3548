"""DiffRec (Wang et al., "Diffusion Recommender Model", SIGIR 2023; survey section 3.1).

Implements the official implementation (github.com/YiyanXu/DiffRec, ``DiffRec/``): the user's
binary interaction vector is diffused with a small ``linear-var`` schedule that never reaches pure
noise, its first beta fixed to 1e-5 (``beta_fixed``, on by default as in the official code); an
MLP with a timestep embedding predicts x0, the per-timestep loss is SNR-reweighted and timesteps
are importance-sampled. Inference starts from the user's history (no added noise) and
runs the reverse posterior mean through all T steps; its output scores every item.

Deviations: none in the centralised model with the defaults (checked: scores equal an
official-structure reverse loop in tests/test_models.py, ML-1M figures in docs/RESULTS.md);
``inference_steps < T`` switches to a DDIM subsequence (an option, off by default); the importance
history update is vectorised (see ``diffusion.py``). Outside the official setting: cross-device users
draw timesteps uniformly (``draw_randomness``: a user's few steps cannot feed an importance history),
and under any DP mechanism importance sampling is switched off (``fedrec/privacy/public_only.py``).
Precision: ``precision=bf16`` multiplies the denoiser's layers in bf16 and keeps everything else fp32
(``fedrec/precision.py``); measured on ML-1M clean in docs/RESULTS.md ("bf16 and the speed path").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fedrec.errors import ConfigError
from fedrec.models.base import Batch, DataShape, Recommender
from fedrec.models.denoiser import DenoiserMLP
from fedrec.models.diffusion import GaussianDiffusion


@dataclass
class DiffusionConfig:
    steps: int = 40  # T, number of diffusion steps
    noise_schedule: str = "linear-var"  # linear | linear-var | cosine
    noise_scale: float = 0.005  # multiplies noise_min/noise_max
    noise_min: float = 0.005
    noise_max: float = 0.01
    beta_fixed: bool = False  # first beta := 1e-5 (official DiffRec default on, L-DiffRec off)
    mean_type: str = "x0"  # the denoiser predicts x0 or eps
    reweight: bool = True  # SNR-difference loss weights
    importance_sampling: bool = True  # loss-proportional timestep sampling
    sampling_steps: int = 0  # noise the history to this step before inference (0: none)
    inference_steps: int | None = None  # None: all T steps (official); k < T: DDIM subsequence
    sampling_noise: bool = False  # add posterior noise during inference

    def __post_init__(self) -> None:
        # Inference settings are checked at build time, not first at the first evaluation.
        if not 0 <= self.sampling_steps <= self.steps:
            raise ConfigError(f"model.sampling_steps: must be in 0..{self.steps} (model.steps), got {self.sampling_steps}")
        if self.inference_steps is not None and not 0 <= self.inference_steps <= self.steps:
            raise ConfigError(f"model.inference_steps: must be null or in 0..{self.steps}, got {self.inference_steps}")

    def build(self) -> GaussianDiffusion:
        return GaussianDiffusion(self.steps, self.noise_schedule, self.noise_scale, self.noise_min,
                                 self.noise_max, self.mean_type, self.reweight, self.importance_sampling,
                                 beta_fixed=self.beta_fixed)


@dataclass
class DiffRecConfig(DiffusionConfig):
    dims: list[int] = field(default_factory=lambda: [200, 600])  # decoder side hidden dims (official --dims)
    emb_size: int = 10  # timestep embedding size
    norm: bool = False  # L2-normalise the input
    dropout: float = 0.5  # input dropout
    beta_fixed: bool = True  # official DiffRec/models/gaussian_diffusion.py default, used by every official run


class DiffRec(Recommender):
    name = "diffrec"

    def __init__(self, cfg: DiffRecConfig, shape: DataShape):
        super().__init__()
        self.cfg = cfg
        out_dims = list(cfg.dims) + [shape.n_items]
        in_dims = out_dims[::-1]
        self.denoiser = DenoiserMLP(in_dims, out_dims, cfg.emb_size, cfg.norm, cfg.dropout)
        self.diffusion = cfg.build()

    def loss(self, batch: Batch) -> torch.Tensor:
        r = batch.rand
        if r is None:
            return self.diffusion.training_loss(self.denoiser, batch.x)["loss"]
        return self.diffusion.training_loss(lambda x, t: self.denoiser(x, t, r["keep"]), batch.x,
                                            t=r["t"], noise=r["noise"])["loss"]

    def draw_randomness(self, batch: Batch, rnd) -> dict[str, torch.Tensor]:
        # Timesteps are uniform here: a single user's few steps cannot feed an importance history.
        n = batch.x.shape[1]
        return {"t": rnd.randint(0, 1, self.diffusion.steps)[:, 0], "noise": rnd.normal(1, n),
                "keep": rnd.keep_mask(2, n, self.cfg.dropout)}

    def scores(self, batch: Batch) -> torch.Tensor:
        c = self.cfg
        return self.diffusion.reverse(self.denoiser, batch.x, c.sampling_steps, c.inference_steps,
                                      c.sampling_noise)

    def generate(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Log of the generated x0 (a 0/1-scale vector, clamped to [1e-6, 1]): release samples items
        proportionally to x0^(1/temperature)."""
        n_items = self.denoiser.out_layers[-1].out_features
        x0 = self.diffusion.generate(self.denoiser, (n, n_items), generator, self.cfg.inference_steps)
        return torch.log(x0.clamp(1e-6, 1.0))
