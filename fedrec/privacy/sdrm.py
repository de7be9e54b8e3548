"""SDRM: synthetic users from a diffusion model over a MultVAE latent space.

Lilienthal et al. 2024, "Multi-Resolution Diffusion for Privacy-Sensitive Recommender Systems":
a MultVAE-style encoder densifies the sparse 0/1 interaction rows into continuous latents, a
score-based diffusion model learns the latent distribution, and sampled latents are decoded and
binarised to the real data's sparsity, giving synthetic users that can be released instead of real
ones.

Implemented here: (1) fedrec's MultVAE trained on the real rows; (2) the latent means, standardised,
modelled by a DDPM with eps-prediction (fedrec's diffusion core, cosine schedule, an MLP denoiser with
timestep embedding, three hidden layers per side) — the DDPM is the discrete-time score model; (3) generation by deterministic DDIM
from pure noise, decoding, and binarising each synthetic user to a number of items k drawn from the real
users' activity distribution: k items drawn without replacement from the softmax of the decoded
scores (``binarize=sample``, the multinomial the MultVAE decoder models) or the k best (``topk``).
Deviations: a single latent resolution (the paper's multi-resolution variant is not built); no DP
training of the generator yet.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch

from fedrec.models import DataShape, build_model
from fedrec.models.base import Batch
from fedrec.models.denoiser import DenoiserMLP
from fedrec.models.diffusion import GaussianDiffusion


@dataclass
class SDRMConfig:
    vae_hidden: list[int] = field(default_factory=lambda: [600])
    latent_dim: int = 64
    vae_epochs: int = 100
    vae_lr: float = 1e-3
    batch_size: int = 128
    diffusion_steps: int = 200
    denoiser_hidden: int = 512
    denoiser_layers: int = 3  # hidden layers on each side of the denoiser MLP's bottleneck
    diffusion_epochs: int = 600
    diffusion_lr: float = 1e-3
    sampling_steps: int = 50  # DDIM steps at generation
    binarize: str = "sample"  # sample: k items drawn from softmax(logits) (Gumbel top-k); topk: the k best
    temperature: float = 1.25  # softmax temperature of the sampled binarisation (> 1: more diverse users)


class SDRM:
    def __init__(self, cfg: SDRMConfig, n_items: int, seed: int = 0):
        self.cfg, self.n_items, self.seed = cfg, n_items, seed
        torch.manual_seed(seed)
        self.vae = build_model({"name": "multvae", "hidden_dims": list(cfg.vae_hidden), "latent_dim": cfg.latent_dim,
                                "total_anneal_steps": 2000}, DataShape(1, n_items))
        d, h = cfg.latent_dim, cfg.denoiser_hidden
        depth = max(1, int(cfg.denoiser_layers))
        self.denoiser = DenoiserMLP([d] + [h] * depth, [h] * depth + [d], emb_size=16, dropout=0.0)
        self.diffusion = GaussianDiffusion(cfg.diffusion_steps, "cosine", mean_type="eps", reweight=False,
                                           importance_sampling=False, noise_scale=1.0)
        self.activity: np.ndarray | None = None

    def _batches(self, n: int, rng: np.random.Generator):
        order = rng.permutation(n)
        for s in range(0, n, self.cfg.batch_size):
            yield order[s:s + self.cfg.batch_size]

    def fit(self, rows: sp.csr_matrix) -> "SDRM":
        rng = np.random.default_rng(self.seed)
        x = torch.from_numpy(rows.toarray().astype(np.float32))
        self.activity = np.asarray(rows.sum(1)).ravel().astype(int)
        self.activity = self.activity[self.activity > 0]
        opt = torch.optim.Adam(self.vae.parameters(), lr=self.cfg.vae_lr)
        self.vae.train()
        for _ in range(self.cfg.vae_epochs):
            for idx in self._batches(len(x), rng):
                loss = self.vae.loss(Batch(users=torch.as_tensor(idx), x=x[idx])).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
        self.vae.eval()
        with torch.no_grad():
            mu, _ = self.vae.encode(x)
        self.mean, self.std = mu.mean(0), mu.std(0).clamp(min=1e-6)
        z = (mu - self.mean) / self.std
        opt = torch.optim.Adam(self.denoiser.parameters(), lr=self.cfg.diffusion_lr)
        self.denoiser.train()
        for _ in range(self.cfg.diffusion_epochs):
            for idx in self._batches(len(z), rng):
                loss = self.diffusion.training_loss(self.denoiser, z[idx], record=False)["loss"].mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
        self.denoiser.eval()
        return self

    @torch.no_grad()
    def sample(self, n: int, seed: int | None = None) -> sp.csr_matrix:
        g = torch.Generator().manual_seed(self.seed + 1 if seed is None else seed)
        noise = torch.randn(n, self.cfg.latent_dim, generator=g)
        z = self.diffusion.reverse(self.denoiser, noise, 0, self.cfg.sampling_steps)
        logits = self.vae.decoder(z * self.std + self.mean)
        rng = np.random.default_rng(self.seed + 2 if seed is None else seed + 1)
        k = torch.from_numpy(rng.choice(self.activity, size=n, replace=True).clip(1, self.n_items))
        if self.cfg.binarize == "sample":  # Gumbel top-k = k draws without replacement from softmax(logits)
            u = torch.rand(logits.shape, generator=g).clamp(1e-12, 1 - 1e-12)
            logits = logits / float(self.cfg.temperature) - torch.log(-torch.log(u))
        top = torch.topk(logits, int(k.max()), dim=1).indices
        keep = torch.arange(top.shape[1])[None, :] < k[:, None]
        rows = np.repeat(np.arange(n), keep.sum(1).numpy())
        return sp.csr_matrix((np.ones(len(rows), np.float32), (rows, top[keep].numpy())), shape=(n, self.n_items))
