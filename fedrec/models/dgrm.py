"""DGRM: a diffusion + GAN recommender on each user's explicit rating vector.

Paper: Jiangzhou Deng, Songli Wang, Jianmei Ye, Lianghao Ji, Yong Wang. "DGRM: Diffusion-GAN
recommendation model to alleviate the mode collapse problem in sparse environments". Pattern
Recognition 157, 110692 (2024), doi:10.1016/j.patcog.2024.110692. No official code was found
(searched GitHub for DGRM / Diffusion-GAN recommendation); the paper body was not available here
either, so this module implements what the abstract and the survey (Wei et al., section 3.1,
"Explicit Ratings") state, and fills every gap with the standard piece named below. Each such choice
is a deviation from an unseen original and says so.

What the sources state, and how it is implemented:

1. "The forward process of DM generates conditional vectors that guide the training of the GAN
   generator": a user's rating row r (0 = unrated) is scaled to x0 = r / rating_max; t is drawn
   uniformly in 0..T-1 and the forward process of the shared core gives x_t = sqrt(a_t) x0 +
   sqrt(1 - a_t) eps (``GaussianDiffusion.q_sample``, DiffRec's small-noise linear-variance schedule).
   The generator G(x_t, t) (a DiffRec denoiser MLP, :class:`fedrec.models.denoiser.DenoiserMLP`)
   predicts x0_hat from that conditional vector.
2. "The backward process of DM assists the GAN discriminator using Wasserstein distance": the
   critic D scores one reverse step, the pair (x_{t-1}, x_t) at t, as in the denoising diffusion GAN
   (Xiao et al., ICLR 2022): real x_{t-1} ~ q(x_{t-1} | x_t, x0), fake x_{t-1} ~ q(x_{t-1} | x_t,
   m * x0_hat) (the posterior of the core's schedule, m the rated-item mask). Wasserstein losses
   (Arjovsky et al. 2017): L_D = D(fake) - D(real), the generator's adversarial term -D(fake).
   Deviation (gap): no Lipschitz constraint is enforced by weight clipping or a gradient penalty
   (clipping needs a post-step hook the shared trainers do not have; a gradient penalty needs
   double backward, which neither Opacus nor ``torch.func.vmap`` training takes); the critic is kept
   bounded by the drift penalty of Karras et al. (2018), ``drift * (D(real)^2 + D(fake)^2)``.
3. "Masking is applied to the matrix to only compute loss on rated items": the generator's
   reconstruction loss is the mean squared error over the rated items only,
   sum(m (x0_hat - x0)^2) / sum(m), and the critic sees the generated vector masked to the rated
   items (m * x0_hat, the masking of CFGAN, Chae et al. 2018), so unrated entries never enter a loss.
   Generator loss: ``rec_weight * masked MSE - adv_weight * D(fake)``. Trained on rated items only, the
   generator predicts "the rating if rated", so ranking every item by it favours rarely rated,
   well-rated items (docs/RESULTS.md measures it). ``zero_reconstruction`` > 0 adds, as an option that
   is *not* part of DGRM, CFGAN's zero-reconstruction term (Chae et al. 2018): the mean of x0_hat^2
   over the unrated items, weighted, which turns the output into "rated, and how well" for ranking.
4. "At inference, the noisy matrix is denoised for a fewer number of time steps to preserve
   personalised information and retain some noise": the rating row is noised to step
   ``inference_start`` (< T) and reversed from there to 0 with the posterior mean (the core's
   ``DDPMSampler(noise=False)``, G as the x0 predictor); predicted ratings are x0_hat * rating_max
   (every item, ranked as scores; RMSE on held-out ratings is reported beside).

One per-example loss, simultaneous updates: the shared trainers take one loss and one optimiser, so
the per-user loss is L_G + L_D with the two players' gradients separated by stop-gradients: the
critic's loss reads the generated step detached, and the generator's adversarial term calls the
critic with its weights detached (functional ``F.linear``: the critic's Opacus hooks only see the
critic's own loss). One backward pass then gives each player the gradient of its own loss — the
simultaneous-gradient form of GAN training, instead of alternating critic/generator steps
(deviation: the shared trainer has no alternating schedule; ``critic_lr_scale`` can rebalance).

Federation and privacy: one example is one user's rating row, and nothing couples users, so DGRM
runs centrally, in silos, cross-device (every draw explicit: ``draw_randomness``) and under DP-SGD
(Opacus per-user clipping of both players' gradients).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from fedrec.errors import ConfigError
from fedrec.models.base import Batch, DataShape, Recommender
from fedrec.models.denoiser import DenoiserMLP, timestep_embedding
from fedrec.models.diffrec import DiffusionConfig
from fedrec.models.diffusion import DDPMSampler, expand_to, gaussian_like


@dataclass
class DGRMConfig(DiffusionConfig):
    RATINGS = True  # learns from explicit ratings: fedrec.models.check_dataset_needs asks for dataset.ratings
    dims: list[int] = field(default_factory=lambda: [200, 600])  # generator hidden dims (DiffRec's)
    emb_size: int = 10  # timestep embedding size (generator and critic)
    dropout: float = 0.5  # generator input dropout (DiffRec's)
    beta_fixed: bool = True  # first beta := 1e-5, as DiffRec (conf/model/dgrm.yaml)
    critic_dims: list[int] = field(default_factory=lambda: [600, 200])  # critic hidden dims
    rating_max: float = 5.0  # top of the rating scale: x0 = rating / rating_max
    rec_weight: float = 1.0  # weight of the masked reconstruction loss in the generator's loss
    adv_weight: float = 0.1  # weight of the Wasserstein adversarial term in the generator's loss
    drift: float = 1e-3  # drift penalty on the critic's outputs
    zero_reconstruction: float = 0.0  # weight of CFGAN's zero-reconstruction term on unrated items (0: as published)
    critic_lr_scale: float = 1.0  # the critic's learning rate relative to optim.lr
    inference_start: int = 2  # noise the rating row to this step, then denoise back to 0
    importance_sampling: bool = False  # uniform t (the adversarial terms have no per-t loss history)
    reweight: bool = False  # plain masked MSE, no SNR weights

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mean_type != "x0":
            raise ConfigError("model.mean_type: DGRM's generator predicts x0 (the rating vector); use x0")
        if not 0 <= self.inference_start < self.steps:
            raise ConfigError(f"model.inference_start: must be in 0..{self.steps - 1}, got {self.inference_start}")
        if self.rating_max <= 0:
            raise ConfigError(f"model.rating_max: must be positive, got {self.rating_max}")
        for key in ("rec_weight", "adv_weight", "drift", "critic_lr_scale", "zero_reconstruction"):
            if getattr(self, key) < 0:
                raise ConfigError(f"model.{key}: must be non-negative, got {getattr(self, key)}")


class Critic(nn.Module):
    """Wasserstein critic of one reverse step: D(x_{t-1}, x_t, t) -> a score per example."""

    def __init__(self, n_items: int, dims: list[int], emb_size: int):
        super().__init__()
        self.emb_size = emb_size
        sizes = [2 * n_items + emb_size, *dims, 1]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x_prev: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, frozen: bool = False) -> torch.Tensor:
        """Scores of x_prev (B, n) or (B, k, n) (k candidates per example, e.g. real and fake: one call per layer,
        as Opacus' per-sample clipping needs) -> (B,) or (B, k). ``frozen``: the weights enter detached and
        outside the modules (no gradient to the critic, no Opacus hook)."""
        emb = timestep_embedding(t, self.emb_size).to(x_t.dtype)
        if x_prev.dim() == 3:
            k = x_prev.shape[1]
            x_t, emb = x_t.unsqueeze(1).expand(-1, k, -1), emb.unsqueeze(1).expand(-1, k, -1)
        h = torch.cat([x_prev, x_t, emb], dim=-1)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            h = F.linear(h, layer.weight.detach(), layer.bias.detach()) if frozen else layer(h)
            if i != last:
                h = F.leaky_relu(h, 0.2)
        return h[..., 0].float()


class DGRM(Recommender):
    name = "dgrm"
    input_values = "rating"

    def __init__(self, cfg: DGRMConfig, shape: DataShape):
        super().__init__()
        self.cfg = cfg
        out_dims = list(cfg.dims) + [shape.n_items]
        self.generator = DenoiserMLP(out_dims[::-1], out_dims, cfg.emb_size, False, cfg.dropout)
        self.critic = Critic(shape.n_items, list(cfg.critic_dims), cfg.emb_size)
        self.diffusion = cfg.build()

    # ----------------------------------------------------------------- training
    def posterior_sample(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """x_{t-1} ~ q(x_{t-1} | x_t, x0) of the core's schedule, given the standard normal draw ``z``."""
        d = self.diffusion
        mean = expand_to(d.posterior_coef1[t], x0) * x0 + expand_to(d.posterior_coef2[t], x0) * x_t
        return mean + expand_to(d.posterior_variance[t].clamp(min=0).sqrt(), x0) * z

    def loss_terms(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Every per-example term of the loss (see the module docstring), for tests and logging."""
        c, d, r = self.cfg, self.diffusion, batch.rand
        x0 = batch.x / c.rating_max
        rated = (batch.x > 0).to(x0.dtype)
        if r is None:
            t, _ = d.sample_timesteps(x0.shape[0], x0.device)
            noise, z_real, z_fake = (gaussian_like(x0, None) for _ in range(3))
            keep = None
        else:
            t, noise, z_real, z_fake, keep = r["t"], r["noise"], r["z_real"], r["z_fake"], r["keep"]
        x_t = d.q_sample(x0, t, noise)
        x0_hat = self.generator(x_t, t, keep)
        masked_mse = (rated * (x0_hat - x0) ** 2).sum(1) / rated.sum(1).clamp(min=1.0)
        fake_prev = self.posterior_sample(rated * x0_hat, x_t, t, z_fake)
        real_prev = self.posterior_sample(x0, x_t, t, z_real)
        # real and (detached) fake in one critic call per example: a module called twice per forward is
        # "parameter tying" to Opacus' per-sample clipping
        d_real, d_fake = self.critic(torch.stack([real_prev, fake_prev.detach()], dim=1), x_t, t).unbind(1)
        d_fake_for_g = self.critic(fake_prev, x_t, t, frozen=True)
        critic_loss = d_fake - d_real + c.drift * (d_real ** 2 + d_fake ** 2)
        generator_loss = c.rec_weight * masked_mse - c.adv_weight * d_fake_for_g
        if c.zero_reconstruction > 0:  # optional, not in DGRM: unrated items pulled toward 0 (CFGAN's ZR)
            unrated = 1.0 - rated
            generator_loss = generator_loss + c.zero_reconstruction * (unrated * x0_hat ** 2).sum(1) / unrated.sum(
                1).clamp(min=1.0)
        return {"loss": generator_loss + critic_loss, "masked_mse": masked_mse, "critic_loss": critic_loss,
                "generator_loss": generator_loss, "x0_hat": x0_hat, "t": t}

    def loss(self, batch: Batch) -> torch.Tensor:
        return self.loss_terms(batch)["loss"]

    def draw_randomness(self, batch: Batch, rnd) -> dict[str, torch.Tensor]:
        n = batch.x.shape[1]
        return {"t": rnd.randint(0, 1, self.diffusion.steps)[:, 0], "noise": rnd.normal(1, n),
                "z_real": rnd.normal(2, n), "z_fake": rnd.normal(3, n),
                "keep": rnd.keep_mask(4, n, self.cfg.dropout)}

    def optimizer_groups(self, lr: float, weight_decay: float):
        gen = [p for n, p in self.named_parameters() if not n.startswith("critic.")]
        return [{"params": gen, "lr": lr, "weight_decay": weight_decay},
                {"params": list(self.critic.parameters()), "lr": lr * self.cfg.critic_lr_scale,
                 "weight_decay": weight_decay}]

    # ----------------------------------------------------------------- inference
    def predict_x0(self, x: torch.Tensor) -> torch.Tensor:
        """x0_hat of rating rows ``x``: noised to ``inference_start``, then reversed to 0 (posterior mean)."""
        c, d = self.cfg, self.diffusion
        x0 = x / c.rating_max
        s = c.inference_start
        if s > 0:
            x0 = d.q_sample(x0, torch.full((x.shape[0],), s, dtype=torch.long, device=x.device))
        return DDPMSampler(noise=False).sample(d, self.generator, x0, start=s)

    def scores(self, batch: Batch) -> torch.Tensor:
        """Predicted ratings of every item (rating scale)."""
        return self.predict_x0(batch.x) * self.cfg.rating_max


__all__ = ["DGRM", "DGRMConfig", "Critic"]
