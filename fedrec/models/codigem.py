"""CODIGEM (Walker, Zhong, Zhang, Gao and Zhou, "Recommendation via Collaborative Diffusion Generative
Model", KSEM 2022, LNCS 13370, pp. 593-605; survey section 3.1). Official code:
github.com/joojowalker/CODIGEM (``ddgm_model_rs.py``, ``main.py``), read line by line; it is the
DDGM of Tomczak's *Deep Generative Modeling* applied to the user's interaction vector.

Algorithm as implemented (the official code's):

* **Forward chain** (the shared core's ``GaussianDiffusion.q_chain`` on the ``constant`` schedule):
  T steps z_1 = sqrt(1 - beta) x + sqrt(beta) eps_1, z_t = sqrt(1 - beta) z_{t-1} + sqrt(beta) eps_t,
  one beta for every step (official T = 3, beta = 1e-4), drawn step by step.
* **Reverse nets**: T - 1 MLPs p_i (D -> M, PReLU, four M -> M PReLU layers, M -> 2D), each giving a
  mean and a log-variance; the decoder (D -> M, PReLU, four M -> M PReLU layers, M -> D, tanh)
  maps z_1 to the reconstruction mu_x. Initialisation as official: the first Linear of every p_i
  N(0, 1e-4) for weights and biases; the decoder keeps torch's default (the official loop meant to
  re-initialise it compares ``str(layer) == "Linear"``, which never holds).
* **Loss** per user (the official negative ELBO, ``anneal`` fixed at 1 as the official forward does):
  -(RE - KL) with RE = sum_items log N(x - mu_x; 0, 1), KL = sum_items [log N(z_T; sqrt(1-beta) z_T, beta)
  - log N(z_T; 0, 1)] + sum_i sum_items [log N(z_i'; sqrt(1-beta) z_i', beta) - log N(z_i'; mu_i, exp(lv_i))],
  where, as in the official code, the list of reverse outputs is built from the noisiest step down
  (mu_0 from p_{T-2}(z_T), ..., mu_{T-2} from p_0(z_2)) and paired with z_1', ..., z_{T-1}' in
  increasing order; the q-terms are constants in the parameters. For T = 3 (official) this pairs
  z_1 with the net fed z_3 and z_2 with the net fed z_2 itself: kept, since the recommendation
  does not depend on it (below).
* **Recommendation** (official ``evaluate``): the decoder of the first step, mu_x = decoder(z_1),
  z_1 = sqrt(1 - beta) x + sqrt(beta) eps with fresh noise (``inference_noise``; false: eps = 0),
  scores every item. The decoder is trained only by RE (the reverse nets share no parameter with
  it), so CODIGEM recommends with a denoising autoencoder at noise level beta; the reverse nets
  are trained as official and carried (aggregated in a federation) but never score.

Defaults (conf/model/codigem.yaml) are official ``main.py``: T = 3, beta = 1e-4, M = 200, batch 200,
lr 1e-3, 100 epochs with early stopping (patience 10 on validation Recall@50 there).

Deviations: the optimiser is fedrec's AdamW with weight decay 0 (Adam) instead of the official
Adamax (fedrec trains every model with one optimiser; lr kept); the official early stopping on
Recall@50 is fedrec's ``train.select_metric`` / ``train.patience``; training visits every user
(the official loader too). Federation and DP: the loss of a user reads only that user's row, so
silo, cross-device (``draw_randomness``: the T per-step noises) and DP-SGD all run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fedrec.errors import ConfigError
from fedrec.models.base import Batch, DataShape, Recommender
from fedrec.models.diffusion import GaussianDiffusion, gaussian_like, log_normal_diag, log_standard_normal


def ddgm_mlp(d_in: int, hidden: int, depth: int, d_out: int, out_act: nn.Module | None = None,
             tied: bool = False) -> nn.Sequential:
    """D -> M, PReLU, ``depth`` x (M -> M, PReLU), M -> d_out (, out_act): the DDGM nets of CODIGEM
    and RecFusion. ``tied``: the hidden layer is ONE Linear + PReLU applied ``depth`` times (the
    official RecFusion MLP builds them as ``[nn.Linear(M, M), nn.PReLU()] * depth``, a repeated
    module); untied: ``depth`` separate layers (CODIGEM)."""
    if min(d_in, hidden, d_out) < 1 or depth < 0:
        raise ConfigError(f"model.hidden/depth: need hidden >= 1 and depth >= 0, got {hidden}, {depth}")
    if tied:
        shared = [nn.Linear(hidden, hidden), nn.PReLU()]
        mid = shared * depth
    else:
        mid = [m for _ in range(depth) for m in (nn.Linear(hidden, hidden), nn.PReLU())]
    tail = [nn.Linear(hidden, d_out)] + ([out_act] if out_act is not None else [])
    return nn.Sequential(nn.Linear(d_in, hidden), nn.PReLU(), *mid, *tail)


@dataclass
class CODIGEMConfig:
    steps: int = 3  # T, diffusion steps (official 3)
    beta: float = 1e-4  # the constant per-step noise variance (official 1e-4)
    hidden: int = 200  # M, width of every net (official 200)
    depth: int = 4  # M -> M layers per net (official 4)
    inference_noise: bool = True  # score decoder(z_1) with fresh noise as official; False: z_1 = sqrt(1-beta) x

    def __post_init__(self) -> None:
        if int(self.steps) < 2:
            raise ConfigError(f"model.steps: CODIGEM needs T >= 2 (T - 1 reverse nets), got {self.steps}")
        if not 0.0 < float(self.beta) < 1.0:
            raise ConfigError(f"model.beta: must be in (0, 1), got {self.beta}")


class CODIGEM(Recommender):
    name = "codigem"

    def __init__(self, cfg: CODIGEMConfig, shape: DataShape):
        super().__init__()
        self.cfg = cfg
        d, m = shape.n_items, int(cfg.hidden)
        self.diffusion = GaussianDiffusion(int(cfg.steps), "constant", 1.0, float(cfg.beta), float(cfg.beta),
                                           reweight=False, importance_sampling=False)
        self.p_dnns = nn.ModuleList(ddgm_mlp(d, m, int(cfg.depth), 2 * d) for _ in range(int(cfg.steps) - 1))
        self.decoder = ddgm_mlp(d, m, int(cfg.depth), d, nn.Tanh())
        for net in self.p_dnns:  # official init_weights: the first layer of each reverse net
            nn.init.normal_(net[0].weight, 0.0, 1e-4)
            nn.init.normal_(net[0].bias, 0.0, 1e-4)

    def loss(self, batch: Batch) -> torch.Tensor:
        x = batch.x
        noises = None if batch.rand is None else batch.rand["noise"].transpose(0, 1)  # (T, B, n)
        zs = self.diffusion.q_chain(x, noises)
        beta = self.diffusion.betas[0]
        mus, log_vars = [], []
        for i in range(len(self.p_dnns) - 1, -1, -1):  # official order: from the noisiest step down
            mu, log_var = torch.chunk(self.p_dnns[i](zs[i + 1]), 2, dim=1)
            mus.append(mu)
            log_vars.append(log_var)
        mu_x = self.decoder(zs[0])
        re = log_standard_normal(x - mu_x).sum(-1)
        keep, log_beta = torch.sqrt(1.0 - beta), torch.log(beta)
        kl = (log_normal_diag(zs[-1], keep * zs[-1], log_beta) - log_standard_normal(zs[-1])).sum(-1)
        for i in range(len(mus)):
            kl = kl + (log_normal_diag(zs[i], keep * zs[i], log_beta) - log_normal_diag(zs[i], mus[i], log_vars[i])).sum(-1)
        return -(re - kl)

    def draw_randomness(self, batch: Batch, rnd) -> dict[str, torch.Tensor]:
        n, T = batch.x.shape[1], self.diffusion.steps
        return {"noise": rnd.normal(1, T * n).reshape(-1, T, n)}

    def scores(self, batch: Batch) -> torch.Tensor:
        x = batch.x
        beta = self.diffusion.betas[0]
        z1 = torch.sqrt(1.0 - beta) * x
        if self.cfg.inference_noise:
            z1 = z1 + torch.sqrt(beta) * gaussian_like(x, None)
        return self.decoder(z1)
