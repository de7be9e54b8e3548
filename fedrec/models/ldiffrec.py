"""L-DiffRec (Wang et al., SIGIR 2023, section 3.1 of the survey): latent diffusion for large catalogues.

Implements the official ``L-DiffRec/`` code (github.com/YiyanXu/DiffRec): items are clustered by
k-means on pretrained item embeddings (LightGCN, ``item_emb.npy``); each cluster has its own
variational encoder (Linear + tanh, input dropout 0.1) to a latent slice sized by the cluster's
share of items; the concatenated latent is diffused with the same Gaussian core as DiffRec; a
decoder maps the denoised latent back to item scores. Loss = lambda * diffusion loss +
multinomial log-likelihood + beta * KL, lambda annealed per epoch from ``lamda`` to
``anneal_cap`` over ``anneal_steps`` epochs, beta per batch up to ``vae_anneal_cap``.

The clustering is the official one: ``kmeans_pytorch``'s procedure re-implemented in :func:`kmeans`,
started from ``np.random.choice`` under the official seed 1 (``cluster_seed``), which reproduces
the official cluster sizes (ML-1M clean, n_cate=2: 1850 / 960 items).

Deviations: when a dataset has no item embeddings, they are taken from a truncated SVD of the
training matrix (documented in ``DataShape``); k-means keeps the centre of an empty cluster and
stops after ``KMEANS_MAX_ITER`` iterations where the official code would produce NaN or loop on;
scores are returned in the original item order instead of the cluster order. The denoiser is
DiffRec's (``denoiser.py``) with the official L-DiffRec initialisation (zero biases).

Step-level equivalence with the official code (``simulations/compare_ldiffrec.py``, which runs the
official ``main.py`` beside this model with the same weights, batches and random draws): the
encoder input, latent, KL, x0_hat, decoded scores, lambda / KL weight, the annealing counters, the
importance-sampling distribution and the inference scores and metrics agree exactly or to < 3e-7
relative; gradients agree to float32 rounding (each side ~1e-6 from a float64 recomputation of the
step, fedrec no farther than the official code), the remaining arithmetic difference being that the
official code multiplies the reweighted diffusion loss in float64 (fedrec: float32, weights formed in
float64). Not replayed: the random streams themselves. The official code shuffles with a torch
DataLoader (4 workers) and fedrec with NumPy (``train_epoch``): the same batches per epoch (every user
once, 400 users a batch, the last one smaller, no drop_last), in a different order; the official
run seeds torch with 1 for the initialisation, k-means with NumPy's seed 1 (``cluster_seed``, kept).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedrec.errors import ConfigError
from fedrec.models.base import Batch, DataShape, Recommender
from fedrec.models.denoiser import DenoiserMLP
from fedrec.models.diffrec import DiffusionConfig


#: Lloyd iterations after which k-means gives up (kmeans_pytorch loops until convergence)
KMEANS_MAX_ITER = 10_000


def kmeans(x: np.ndarray, k: int, seed: int, tol: float = 1e-4, max_iter: int = KMEANS_MAX_ITER) -> np.ndarray:
    """The official L-DiffRec clustering (``kmeans_pytorch`` 0.3, euclidean); returns a label per row.

    Same steps and float32 arithmetic as ``kmeans_pytorch.kmeans``: the initial centres are ``k``
    distinct rows drawn by NumPy's legacy ``np.random.choice(n, k, replace=False)`` (the official
    main.py seeds NumPy with 1 just before, so ``seed=1`` reproduces its clusters); then Lloyd
    iterations (assign each row to the nearest centre by squared euclidean distance, move every
    centre to its cluster's mean) until (sum over clusters of the centre shift) ** 2 < ``tol``.
    The labels returned are the assignment of the last iteration, made before its centre update.

    Deviations, both only where the official code would fail: an empty cluster keeps its centre
    (kmeans_pytorch's mean of no rows is NaN) and the loop stops after ``max_iter`` iterations
    (kmeans_pytorch has no limit).
    """
    x = torch.as_tensor(np.asarray(x)).float()
    start = np.random.RandomState(seed).choice(len(x), k, replace=False)
    centers = x[torch.from_numpy(start)].clone()
    for _ in range(max_iter):
        # (n, k) distances for all rows at once; the broadcast difference is kmeans_pytorch's own formula
        labels = ((x[:, None, :] - centers[None]) ** 2).sum(-1).argmin(1)
        prev = centers.clone()
        for j in range(k):  # a loop over the k clusters; each mean is one reduction as in the official code
            members = x[labels == j]
            if len(members):
                centers[j] = members.mean(0)
        shift = torch.sqrt(((centers - prev) ** 2).sum(1)).sum()
        if shift ** 2 < tol:
            break
    return labels.numpy().astype(np.int64)


@dataclass
class LDiffRecConfig(DiffusionConfig):
    n_cate: int = 2  # number of item clusters
    in_dims: list[int] = field(default_factory=lambda: [300])  # encoder dims, last = latent size
    out_dims: list[int] = field(default_factory=list)  # decoder hidden dims ([] = one shared Linear)
    mlp_dims: list[int] = field(default_factory=lambda: [300])  # denoiser hidden dims
    emb_size: int = 10
    norm: bool = False
    dropout: float = 0.5  # denoiser input dropout
    encoder_dropout: float = 0.1
    reparam: bool = True
    lamda: float = 0.03  # weight of the diffusion loss (annealed)
    anneal_cap: float = 0.005
    anneal_steps: int = 500  # epochs
    vae_anneal_cap: float = 0.3
    vae_anneal_steps: int = 200  # batches
    lr_autoencoder: float | None = 1e-3  # official lr1; None: the trainer's lr
    lr_denoiser: float | None = 5e-4  # official lr2
    cluster_seed: int = 1  # NumPy seed of the k-means start (official main.py: np.random.seed(1))
    steps: int = 40
    noise_max: float = 0.02
    beta_fixed: bool = False  # official L-DiffRec/models/gaussian_diffusion.py default (DiffRec's is on)


class LDiffRec(Recommender):
    name = "ldiffrec"

    def __init__(self, cfg: LDiffRecConfig, shape: DataShape):
        super().__init__()
        self.cfg = cfg
        n = shape.n_items
        if cfg.n_cate < 1 or cfg.n_cate > n:
            raise ConfigError(f"model.n_cate: must be in 1..{n}, got {cfg.n_cate}")
        latent = int(list(cfg.in_dims)[-1])
        if cfg.n_cate > 1:
            emb = shape.item_embeddings()
            if emb is None:
                raise ConfigError("model.n_cate: > 1 needs item embeddings (dataset item_emb)")
            labels = kmeans(emb, cfg.n_cate, cfg.cluster_seed)
        else:
            labels = np.zeros(n, dtype=np.int64)
        groups = [np.flatnonzero(labels == j) for j in range(cfg.n_cate)]
        self.register_buffer("category_map", torch.as_tensor(np.concatenate(groups)), persistent=True)
        self.group_sizes = [len(g) for g in groups]
        dims = np.asarray(cfg.in_dims)
        slice_dims, encoders = [], []
        for j, size in enumerate(self.group_sizes):
            if j == cfg.n_cate - 1:
                d = list(dims - np.asarray(slice_dims).sum(axis=0)) if slice_dims else list(dims)
            else:
                d = [max(int(size / n * v), 1) for v in dims]
            d = [int(v) for v in d]
            slice_dims.append(d)
            sizes = [size] + d[:-1] + [d[-1] * 2]
            mods: list[nn.Module] = []
            for a, b in zip(sizes[:-1], sizes[1:]):
                mods += [nn.Linear(a, b), nn.Tanh()]
            encoders.append(nn.Sequential(*mods))
        self.encoders = nn.ModuleList(encoders)
        self.latent_slices = [d[-1] for d in slice_dims]
        if not cfg.out_dims:
            self.decoders = nn.ModuleList([nn.Linear(latent, n)])
        else:
            decs = []
            for d, size in zip(slice_dims, self.group_sizes):
                sizes = d[::-1][:1] + list(cfg.out_dims) + [size]
                mods = []
                for a, b in zip(sizes[:-1], sizes[1:]):
                    mods += [nn.Linear(a, b), nn.Tanh()]
                decs.append(nn.Sequential(*mods[:-1]))
            self.decoders = nn.ModuleList(decs)
        for m in [*self.encoders.modules(), *self.decoders.modules()]:
            if isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)
        self.enc_drop = nn.Dropout(cfg.encoder_dropout)
        mlp_out = list(cfg.mlp_dims) + [latent]
        # the official L-DiffRec DNN: Xavier-normal weights, zero biases (DiffRec's DNN: biases N(0, 0.001))
        self.denoiser = DenoiserMLP(mlp_out[::-1], mlp_out, cfg.emb_size, cfg.norm, cfg.dropout, bias_std=0.0)
        self.diffusion = cfg.build()
        # Annealing counters are state (checkpointed), not parameters.
        self.register_buffer("epochs_done", torch.zeros((), dtype=torch.long))
        self.register_buffer("batches_done", torch.zeros((), dtype=torch.long))

    # -------------------------------------------------------------- autoencoder
    def encode(self, x: torch.Tensor, keep: torch.Tensor | None = None, eps: torch.Tensor | None = None):
        x = x * keep if keep is not None else self.enc_drop(x)
        x_cate = x[:, self.category_map]
        mus, logvars, start = [], [], 0
        for enc, size, d in zip(self.encoders, self.group_sizes, self.latent_slices):
            h = enc(x_cate[:, start:start + size])
            start += size
            mus.append(h[:, :d])
            logvars.append(h[:, d:])
        mu, logvar = torch.cat(mus, -1), torch.cat(logvars, -1)
        if eps is not None:
            z = mu + eps * torch.exp(0.5 * logvar) if self.cfg.reparam else mu
        else:
            z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if (self.training and self.cfg.reparam) else mu
        kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1)
        return x_cate, z, kl

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scores in cluster order."""
        if len(self.decoders) == 1:
            return self.decoders[0](z)
        outs, start = [], 0
        for dec, d in zip(self.decoders, self.latent_slices):
            outs.append(dec(z[:, start:start + d]))
            start += d
        return torch.cat(outs, -1)

    # -------------------------------------------------------------- interface
    def _weights(self) -> tuple[float, float]:
        """(lambda, beta): diffusion-loss weight annealed per epoch, KL weight per batch."""
        c = self.cfg
        e, b = float(self.epochs_done), float(self.batches_done)
        lamda = max((1.0 - e / c.anneal_steps) * c.lamda, c.anneal_cap) if c.anneal_steps > 0 else max(c.lamda, c.anneal_cap)
        beta = min(c.vae_anneal_cap, b / c.vae_anneal_steps) if c.vae_anneal_steps > 0 else c.vae_anneal_cap
        return lamda, beta

    def loss(self, batch: Batch) -> torch.Tensor:
        c = self.cfg
        r = batch.rand
        if r is None:
            x_cate, z, kl = self.encode(batch.x)
            terms = self.diffusion.training_loss(self.denoiser, z)
            lamda, beta = self._weights()
            if self.training:
                self.batches_done += 1
        else:  # explicit draws; annealing weights from the schedule position the cross-device step set
            x_cate, z, kl = self.encode(batch.x, r["enc_keep"], r["eps"])
            terms = self.diffusion.training_loss(lambda x, t: self.denoiser(x, t, r["keep"]), z,
                                                 t=r["t"], noise=r["noise"])
            lamda, beta = r["lamda"], r["beta"]
        recon = self.decode(terms["pred_x0"])
        mult = -(F.log_softmax(recon, 1) * x_cate).sum(-1)
        if c.reweight:
            return lamda * terms["loss"] + mult + beta * kl
        return terms["loss"] + lamda * (mult + beta * kl)

    def draw_randomness(self, batch: Batch, rnd) -> dict[str, torch.Tensor]:
        b, n = batch.x.shape
        latent = self.denoiser.out_layers[-1].out_features
        lamda, beta = self._weights()
        dev = batch.x.device
        return {"enc_keep": rnd.keep_mask(0, n, self.cfg.encoder_dropout), "eps": rnd.normal(1, latent),
                "t": rnd.randint(2, 1, self.diffusion.steps)[:, 0], "noise": rnd.normal(3, latent),
                "keep": rnd.keep_mask(4, latent, self.cfg.dropout),
                "lamda": torch.full((b,), lamda, device=dev), "beta": torch.full((b,), beta, device=dev)}

    def scores(self, batch: Batch) -> torch.Tensor:
        c = self.cfg
        _, z, _ = self.encode(batch.x)
        z = self.diffusion.reverse(self.denoiser, z, c.sampling_steps, c.inference_steps, c.sampling_noise)
        return self._item_order(self.decode(z))

    def generate(self, n: int, generator: torch.Generator) -> torch.Tensor:
        latent = self.denoiser.out_layers[-1].out_features
        z = self.diffusion.generate(self.denoiser, (n, latent), generator, self.cfg.inference_steps)
        return self._item_order(self.decode(z))

    def _item_order(self, pred: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(pred)
        out[:, self.category_map] = pred
        return out

    def on_epoch_end(self) -> None:
        self.epochs_done += 1

    def set_schedule_position(self, epochs: int, updates: int) -> None:
        self.epochs_done.fill_(int(epochs))
        self.batches_done.fill_(int(updates))

    def optimizer_groups(self, lr: float, weight_decay: float):
        ae = [*self.encoders.parameters(), *self.decoders.parameters()]
        return [
            {"params": ae, "lr": self.cfg.lr_autoencoder or lr, "weight_decay": weight_decay},
            {"params": list(self.denoiser.parameters()), "lr": self.cfg.lr_denoiser or lr,
             "weight_decay": weight_decay},
        ]
