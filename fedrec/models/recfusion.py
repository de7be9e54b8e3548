"""RecFusion (Benedict, Jeunen, Papa, Bhargav, Odijk and de Rijke, "RecFusion: A Binomial Diffusion
Process for 1D Data for Recommendation", arXiv:2306.08947, 2023; survey section 3.1). Official
code: github.com/gabriben/recfusion (a RecPack fork; ``recpack/algorithms/recfusionBin.py`` the
binomial model, ``recfusionMLP.py`` the Gaussian one, ``train.py`` the entry point), read line by line.

Algorithm as implemented (the official MLP models'):

* **Forward chain**, T steps drawn one after the other from the user's 0/1 row x, on a beta
  schedule from ``beta_start`` to ``beta_end`` (official ``get_beta_schedule``: quadratic by
  default, linear, or constant, the official 'fixed'):
  - ``diffusion: binomial`` (``recfusionBin.py``, the paper's titular process): each step flips
    every bit with probability beta_t (the shared core's :class:`BinomialDiffusion`, ``q_chain``);
  - ``diffusion: gaussian`` (``recfusionMLP.py``): z_t = sqrt(1 - beta_t) z_{t-1} + sqrt(beta_t) eps
    (the core's ``GaussianDiffusion.q_chain``).
* **Denoiser**: ONE MLP without a timestep input applied to every z_t: D -> M, PReLU, then the same
  M -> M Linear + PReLU applied ``depth`` times (the official ``[nn.Linear(M, M), nn.PReLU()] * depth``
  repeats one module, so these layers share weights), M -> D, then sigmoid (binomial) or tanh
  (Gaussian); torch's default initialisation (official ``xavier_initialization=False``).
* **Loss** (``objective: official``), per user, with z_hat_t = MLP(z_t), as the official
  ``_compute_loss``: loss = -(RE - anneal * KL), anneal = ``anneal_cap`` = 1 (official
  ``total_anneal_steps = 0``), with
  KL = sum_items [log N(z_hat_{T}; sqrt(1-beta_1) z_hat_{T}, beta_1) - log N(z_hat_{T}; 0, 1)]
       + sum_t sum_items [log N(z_t; sqrt(1-beta_t) z_t, beta_t) - log N(z_t; z_hat_t, var = exp(beta_t))]
  (the official passes beta_t where ``log_normal_diag`` takes a log-variance: kept) and
  - binomial: RE = -BCE(input = x, target = z_hat_1), the official ``nn.BCELoss()(X, Z_hat[0])``
    with its arguments in that order (torch clamps each log at -100, so for a 0/1 x this is
    -100 |x - z_hat_1| per item), per-user mean over items (the official mean over the batch is the
    mean of these);
  - gaussian: RE = sum_items log N(x - z_hat_1; 0, 1).
  ``objective: elbo`` instead trains the binomial model with the core's binomial ELBO
  (``BinomialDiffusion.training_loss``: t uniform, the KL of the D3PM-parameterised posteriors,
  the Bernoulli NLL at t = 0), an option beside the official code, not in it.
* **Recommendation** (official ``_batch_predict``): one pass of the MLP on the user's history,
  MLP(x), no noise: "the inference process terminates after one reverse step" (survey).

Defaults (conf/model/recfusion.yaml) are the official constructor's: T = 3, M = 200, depth 4,
quadratic betas 1e-4 .. 0.1, batch 200, lr 1e-4 (Adam), max 200 epochs, early stopping on NDCG.

Deviations: the official U-Net 1D / 2D denoisers (``recfusionUnet1D.py``, ``recfusion.py``) and the
MLP+T / MLP+Var variants are not ported (the MLP is the model of the official ``train.py``);
the 'Jascha' binomial process is not ported (its official ``make_noise`` returns x * Bernoulli(...),
which never turns a 0 into a 1); fedrec's AdamW with weight decay 0 is Adam; gradient accumulation
(off by default) is not ported. Federation and DP: a user's loss reads its own row only, so silo,
cross-device (``draw_randomness``: the chain's T draws per item) and DP-SGD all run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fedrec.errors import ConfigError
from fedrec.models.base import Batch, DataShape, Recommender
from fedrec.models.codigem import ddgm_mlp
from fedrec.models.diffusion import BinomialDiffusion, GaussianDiffusion, log_normal_diag, log_standard_normal

#: torch's ``BCELoss`` clamps every log at this value
BCE_LOG_FLOOR = -100.0


@dataclass
class RecFusionConfig:
    diffusion: str = "binomial"  # binomial (recfusionBin) | gaussian (recfusionMLP)
    objective: str = "official"  # official: the official _compute_loss | elbo: the core's binomial ELBO
    steps: int = 3  # T (official 3)
    schedule: str = "quadratic"  # quadratic | linear | constant (official 'fixed')
    beta_start: float = 1e-4  # first beta (official b_start)
    beta_end: float = 0.1  # last beta (official b_end)
    hidden: int = 200  # M (official 200)
    depth: int = 4  # repeats of the shared M -> M layer (official p_dnns_depth 4)
    anneal_cap: float = 1.0  # weight of the KL terms (official anneal_cap 1, no annealing)

    def __post_init__(self) -> None:
        if self.diffusion not in ("binomial", "gaussian"):
            raise ConfigError(f"model.diffusion: expected binomial or gaussian, got {self.diffusion!r}")
        if self.objective not in ("official", "elbo"):
            raise ConfigError(f"model.objective: expected official or elbo, got {self.objective!r}")
        if self.objective == "elbo" and self.diffusion != "binomial":
            raise ConfigError("model.objective: elbo is the binomial ELBO; use diffusion=binomial")
        if not 0.0 < float(self.beta_start) <= float(self.beta_end) < 1.0:
            raise ConfigError(f"model.beta_start/beta_end: need 0 < start <= end < 1, got {self.beta_start}, {self.beta_end}")


class RecFusion(Recommender):
    name = "recfusion"

    def __init__(self, cfg: RecFusionConfig, shape: DataShape):
        super().__init__()
        self.cfg = cfg
        d, T = shape.n_items, int(cfg.steps)
        binomial = cfg.diffusion == "binomial"
        if binomial:
            self.diffusion = BinomialDiffusion(T, cfg.schedule, cfg.beta_start, cfg.beta_end)
            self.register_buffer("betas", self.diffusion.flip.clone(), persistent=False)
        else:
            if cfg.schedule not in ("quadratic", "linear", "constant"):
                raise ConfigError(f"model.schedule: expected quadratic, linear or constant, got {cfg.schedule!r}")
            self.diffusion = GaussianDiffusion(T, cfg.schedule, 1.0, cfg.beta_start, cfg.beta_end,
                                               reweight=False, importance_sampling=False)
            self.register_buffer("betas", self.diffusion.betas.clone(), persistent=False)
        self.mlp = ddgm_mlp(d, int(cfg.hidden), int(cfg.depth), d, nn.Sigmoid() if binomial else nn.Tanh(), tied=True)

    def loss(self, batch: Batch) -> torch.Tensor:
        x, r = batch.x, batch.rand
        if self.cfg.objective == "elbo":
            t, u = (None, None) if r is None else (r["t"], r["u"])
            return self.diffusion.training_loss(lambda z, _t: self.mlp(z), x, t=t, u=u)["loss"]
        draws = None if r is None else r["chain"].transpose(0, 1)  # (T, B, n)
        zs = self.diffusion.q_chain(x, draws)
        z_hat = [self.mlp(z) for z in zs]
        return self.official_loss(x, zs, z_hat)

    def official_loss(self, x: torch.Tensor, zs: list[torch.Tensor], z_hat: list[torch.Tensor]) -> torch.Tensor:
        """The official ``_compute_loss`` per user (module docstring)."""
        b = self.betas
        if self.cfg.diffusion == "binomial":
            log_x = torch.log(x).clamp(min=BCE_LOG_FLOOR)
            log_1mx = torch.log(1.0 - x).clamp(min=BCE_LOG_FLOOR)
            re = (z_hat[0] * log_x + (1.0 - z_hat[0]) * log_1mx).mean(-1)  # -BCE(input=x, target=z_hat_1)
        else:
            re = log_standard_normal(x - z_hat[0]).sum(-1)
        last = z_hat[-1]
        kl = (log_normal_diag(last, torch.sqrt(1.0 - b[0]) * last, torch.log(b[0])) - log_standard_normal(last)).sum(-1)
        for i in range(len(z_hat)):
            kl = kl + (log_normal_diag(zs[i], torch.sqrt(1.0 - b[i]) * zs[i], torch.log(b[i]))
                       - log_normal_diag(zs[i], z_hat[i], b[i])).sum(-1)
        return -(re - float(self.cfg.anneal_cap) * kl)

    def draw_randomness(self, batch: Batch, rnd) -> dict[str, torch.Tensor]:
        n, T = batch.x.shape[1], int(self.cfg.steps)
        if self.cfg.objective == "elbo":
            return {"t": rnd.randint(0, 1, T)[:, 0], "u": rnd.uniform(1, n)}
        draw = rnd.uniform if self.cfg.diffusion == "binomial" else rnd.normal
        return {"chain": draw(1, T * n).reshape(-1, T, n)}

    def scores(self, batch: Batch) -> torch.Tensor:
        return self.mlp(batch.x)
