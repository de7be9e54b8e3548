"""A small image diffusion model of the item catalogue, for IPDGI's guided generation (attacks/ipdgi.py)
and Yuan et al.'s image purification (fedrec/defenses/image_purify.py).

The diffusion arithmetic is the shared core's (:class:`fedrec.models.diffusion.GaussianDiffusion`:
the schedule, q_sample, the eps-prediction loss, the DDIM sampler with classifier guidance and
``purify``); this module adds only what is image-specific:

* :class:`TinyUNet`: an eps-predicting denoiser for (B, 3, H, W) images scaled to [-1, 1]: the
  image as 2 x 2 pixel blocks (pixel unshuffle, so the convolutions run at half resolution), one
  down-sampling level (conv blocks of ``channels`` and 2 x ``channels`` with GroupNorm and SiLU), a
  skip connection, and the sinusoidal timestep embedding added to every block (the DDPM UNet's
  structure, Ho et al. 2020, cut down to one level so it trains in a minute on a CPU on 32 x 32
  images: a deliberate size choice, not a reproduction of any paper's network);
* :func:`train_image_diffusion`: trains it on the catalogue's images with the core's loss (uniform
  t, plain MSE on eps, Adam), seeded; one trained model per (images, config, seed) is kept in memory,
  so an attack and a defense of one run share the work (each would train its own in reality; they
  would differ only by their seeds);
* :class:`ImageDiffusion`: ``edit`` -- SDEdit (Meng et al., ICLR 2022): noise the images to step
  ``t_star`` and run the guided DDIM reverse from there (the core's ``purify``) -- in pixel space
  [0, 1], with an optional objective on the predicted clean image whose gradient guides every step.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedrec.errors import ConfigError
from fedrec.models.diffusion import ClassifierGuidance, DDIMSampler, GaussianDiffusion


@dataclass(frozen=True)
class ImageDiffusionConfig:
    channels: int = 16  # width of the first UNet level (the second has twice as many)
    steps: int = 100  # diffusion steps T (cosine schedule)
    train_steps: int = 1500  # Adam steps on the catalogue
    batch_size: int = 32  # images per step
    lr: float = 2e-3  # Adam learning rate
    seed: int = 0  # the model's own seed (init, batches, noise)

    def __post_init__(self):
        for k in ("channels", "steps", "train_steps", "batch_size"):
            if int(getattr(self, k)) < 1:
                raise ConfigError(f"diffusion.{k}: must be >= 1, got {getattr(self, k)}")
        if not self.lr > 0:
            raise ConfigError(f"diffusion.lr: must be positive, got {self.lr}")


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], -1)


class _Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, t_dim: int):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(c_in, c_out, 3, padding=1), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.norm1, self.norm2 = nn.GroupNorm(8, c_out), nn.GroupNorm(8, c_out)
        self.time = nn.Linear(t_dim, c_out)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, temb):
        h = F.silu(self.norm1(self.conv1(x))) + self.time(temb)[:, :, None, None]
        return F.silu(self.norm2(self.conv2(h))) + self.skip(x)


class TinyUNet(nn.Module):
    """eps_theta(x_t, t) for (B, C, H, W) images in [-1, 1] (H, W multiples of 4); see the module docstring."""

    def __init__(self, channels: int = 32, in_channels: int = 3):
        super().__init__()
        c, t_dim = int(channels), 4 * int(channels)
        self.t_dim = c
        self.time = nn.Sequential(nn.Linear(c, t_dim), nn.SiLU(), nn.Linear(t_dim, t_dim))
        self.inp = nn.Conv2d(4 * in_channels, c, 3, padding=1)  # on 2x2 pixel blocks (pixel unshuffle)
        self.down = _Block(c, c, t_dim)
        self.mid = _Block(c, 2 * c, t_dim)
        self.up = _Block(3 * c, c, t_dim)
        self.out = nn.Conv2d(c, 4 * in_channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = self.time(timestep_embedding(t, self.t_dim))
        h1 = self.down(self.inp(F.pixel_unshuffle(x, 2)), temb)
        h2 = self.mid(F.avg_pool2d(h1, 2), temb)
        up = F.interpolate(h2, scale_factor=2, mode="nearest")
        return F.pixel_shuffle(self.out(self.up(torch.cat([up, h1], 1), temb)), 2)


class RefinedDDIM(DDIMSampler):
    """Deterministic DDIM whose clean estimate is changed at every step by ``refine(x0_hat) -> x0_hat``
    (in [0, 1] pixel units), with eps_hat re-derived from x_t so the chain stays consistent: backward
    universal guidance (Bansal et al., CVPR workshops 2023, sec. 3.2) when ``refine`` ascends an
    objective on x0_hat, a constrained sampler when it projects (e.g. into a perturbation ball)."""

    def __init__(self, steps: int, refine):
        super().__init__(steps=steps, eta=0.0)
        self.refine_x0 = refine

    def refine(self, d, x, x0, eps, i: int):
        x0 = self.refine_x0((x0 + 1.0) / 2.0) * 2.0 - 1.0
        return x0, (x - d.sqrt_ac[i] * x0) / d.sqrt_one_minus_ac[i]


class ImageDiffusion:
    """A trained catalogue diffusion model in pixel space [0, 1] (the core works on [-1, 1])."""

    def __init__(self, diffusion: GaussianDiffusion, net: TinyUNet):
        self.diffusion, self.net = diffusion, net

    @property
    def steps(self) -> int:
        return self.diffusion.steps

    def predict_clean(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x0_hat in [0, 1]-pixel units from the chain's x_t (in [-1, 1] units); differentiable."""
        return (self.diffusion.predict_x0(self.net, x_t, t) + 1.0) / 2.0

    def edit(self, images: torch.Tensor, t_star: int, generator: torch.Generator, sample_steps: int = 10,
             objective=None, scale: float = 0.0, refine=None) -> torch.Tensor:
        """SDEdit: noise ``images`` (B, C, H, W in [0, 1]) to step ``t_star``, reverse with deterministic
        DDIM on ``sample_steps`` steps; with ``objective(x0_hat) -> (B,)`` (x0_hat in [0, 1]) every
        step is guided by ``scale`` x its gradient (classifier guidance of the core: forward guidance);
        with ``refine(x0_hat) -> x0_hat`` (in [0, 1]) every step's clean estimate is replaced before the
        chain moves on (:class:`RefinedDDIM`: backward guidance, projection). Returns [0, 1]."""
        if not 1 <= int(sample_steps) <= int(t_star) + 1:
            raise ConfigError(f"sample_steps: must be in 1..t_star+1 = {int(t_star) + 1}, got {sample_steps}")
        guidance = None
        if objective is not None and scale != 0:
            guidance = ClassifierGuidance(lambda x_t, t: objective(self.predict_clean(x_t, t)), float(scale))
        self.net.eval()
        sampler = DDIMSampler(steps=int(sample_steps)) if refine is None else RefinedDDIM(int(sample_steps), refine)
        out = self.diffusion.purify(self.net, images * 2.0 - 1.0, int(t_star), generator,
                                    sampler=sampler, guidance=guidance)
        return ((out + 1.0) / 2.0).clamp(0.0, 1.0)


_TRAINED: dict[str, ImageDiffusion] = {}


def config_of(block, seed: int) -> ImageDiffusionConfig:
    """The diffusion model a mechanism's block asks for (``diffusion_channels``/``_steps``/``_train_steps``)."""
    return ImageDiffusionConfig(channels=int(block.diffusion_channels), steps=int(block.diffusion_steps),
                                train_steps=int(block.diffusion_train_steps), seed=int(seed))


def cache_dir(cfg):
    """Where trained catalogue diffusion models are kept: ``<paths.output_root>/cache``."""
    from pathlib import Path

    return Path(str(cfg.paths.output_root)) / "cache"


def catalogue_model(data, block, cfg) -> ImageDiffusion:
    """The run's catalogue diffusion model (trained, or loaded from the cache)."""
    return train_image_diffusion(data.item_side.all_images(), config_of(block, cfg.seed), cache_dir(cfg))


def _cache_key(images: torch.Tensor, cfg: ImageDiffusionConfig) -> str:
    digest = hashlib.sha256(images.detach().cpu().numpy().astype(np.float32).tobytes()).hexdigest()[:16]
    return f"{digest}:{sorted(asdict(cfg).items())}"


def train_image_diffusion(images: torch.Tensor, cfg: ImageDiffusionConfig, cache_dir=None) -> ImageDiffusion:
    """The catalogue diffusion model of (B, C, H, W) ``images`` in [0, 1], trained once per process per
    (images, config); with ``cache_dir`` also kept on disk (``<cache_dir>/image_diffusion-<digest>.pt``,
    the digest covering the images' bytes and every config field), so runs on one catalogue share it."""
    key = _cache_key(images, cfg)
    if key in _TRAINED:
        return _TRAINED[key]
    path = None
    if cache_dir is not None:
        from pathlib import Path

        path = Path(cache_dir) / f"image_diffusion-{hashlib.sha256(key.encode()).hexdigest()[:20]}.pt"
        if path.exists():
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if saved["key"] != key:
                raise ConfigError(f"{path}: cached image diffusion model of another catalogue/config; delete it")
            model = _build(images, cfg)
            model.net.load_state_dict(saved["net"])
            model.final_loss = float(saved["final_loss"])
            _freeze(model.net)
            _TRAINED[key] = model
            return model
    model = _train(images, cfg)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"key": key, "net": model.net.state_dict(), "final_loss": model.final_loss}, path)
    _TRAINED[key] = model
    return model


def _build(images: torch.Tensor, cfg: ImageDiffusionConfig) -> ImageDiffusion:
    if images.shape[-1] % 4 or images.shape[-2] % 4:
        raise ConfigError(f"diffusion: image sides must be multiples of 4, got {tuple(images.shape[-2:])} (dataset.image_size)")
    with torch.random.fork_rng(devices=[]):  # the init must not move the run's global torch stream
        torch.manual_seed(int(cfg.seed))
        net = TinyUNet(cfg.channels, images.shape[1])
    diffusion = GaussianDiffusion(cfg.steps, noise_schedule="cosine", noise_scale=1.0, mean_type="eps",
                                  reweight=False, importance_sampling=False)
    return ImageDiffusion(diffusion, net)


def _freeze(net: nn.Module) -> None:
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)


def _train(images: torch.Tensor, cfg: ImageDiffusionConfig) -> ImageDiffusion:
    model = _build(images, cfg)
    net, diffusion = model.net, model.diffusion
    torch_gen = torch.Generator().manual_seed(int(cfg.seed))
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    x_all = images.detach().float() * 2.0 - 1.0
    n = len(x_all)
    net.train()
    for _ in range(int(cfg.train_steps)):
        idx = torch.randint(0, n, (min(int(cfg.batch_size), n),), generator=torch_gen)
        x0 = x_all[idx]
        t = torch.randint(0, cfg.steps, (len(x0),), generator=torch_gen)
        noise = torch.randn(x0.shape, generator=torch_gen)
        loss = diffusion.training_loss(net, x0, t=t, noise=noise)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    _freeze(net)
    model.final_loss = float(loss.detach())
    return model
