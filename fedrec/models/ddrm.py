"""DDRM (Zhao, Wenjie, Wang, Li, He and Chua, "Denoising Diffusion Recommender Model", SIGIR 2024).
Official code: github.com/Polaris-JZ/DDRM (``DDRM_MF/``, ``DDRM_LightGCN/``: ``model.py``,
``diffusion.py``, ``utils.BPRLoss``, ``parse.py``, the grids of ``train.py``), read for this module.

DDRM denoises the embeddings of a collaborative-filtering backbone with two conditional diffusion
models and trains them jointly with the backbone's BPR loss. The backbone is fedrec's own BPR-MF
(:mod:`fedrec.models.bpr`) or LightGCN (:mod:`fedrec.models.lightgcn`), held as ``self.backbone``
(their negatives, pair sampling, graph and regulariser are reused, not copied). As implemented, per
training triple (u, i+, i-) with the backbone's final embeddings e_u, e_i+, e_i-:

1. one timestep t ~ U{0..T-1} and two noises (drawn in the official order: t, the user's noise, the
   item's noise); x_u,t = q(e_u, t) and x_i,t = q(e_i+, t) on the shared core's
   :class:`~fedrec.models.diffusion.GaussianDiffusion` (``linear-var`` schedule, first beta fixed to
   1e-5 as the official ``beta_fixed=True``);
2. the user denoiser predicts u^ = f_u(x_u,t, t | e_i+) and the item denoiser i^ = f_i(x_i,t, t | e_u):
   each is DiffRec's MLP (:class:`fedrec.models.denoiser.DenoiserMLP`) with the condition concatenated,
   ``[dropout(x_t) | Linear(sinusoid(t)) | cond]`` (the official ``DNN``, ``time_type="cat"``, dropout
   0.5 on x_t, activation ``act`` after every layer but the last);
3. the reconstruction loss ``(mean (e_u - u^)^2 + mean (e_i+ - i^)^2) / 2`` per triple (the official
   ``get_reconstruct_loss``: no SNR weight, no importance sampling), and the BPR loss on the *denoised* pair,
   ``-log sigmoid(<u^, i^> - <u^, e_i->)`` (the negative stays the backbone's embedding), plus
   ``reg_weight / 2 (||u||^2 + ||i+||^2 + ||i-||^2)`` on the ego embeddings (the official LightGCN
   variant's ``decay``, 1e-4; the MF variant has none: ``reg_weight`` 0 by default; none while frozen);
4. the example's loss ``((1 - alpha) bpr + alpha recon) * sigmoid(<u^, i^>)^beta`` (the weight is
   detached: the official denoising reweighting of ``call_bpr``, which down-weights likely-noisy
   positives); the backbone and both denoisers are updated together (Adam; the denoisers at
   ``diff_lr``, the backbone at ``optim.lr``).

Inference (the official ``computer_infer`` / ``getUsersRating``): the user's "ideal" item embedding is
generated: the mean of the backbone's embeddings of the user's training items is noised to step T-1,
then reversed with the item denoiser conditioned on the backbone's user embedding e_u through steps
``sampling_steps - 1 .. 0`` (posterior means; posterior noise with ``sampling_noise``: the core's
:class:`~fedrec.models.diffusion.DDPMSampler`); every item is scored by its inner product with the
result (``rounding_inner``). As in the official code the user denoiser serves training only (its
inference use is commented out there).

Defaults: the official ML-1M grid of ``DDRM_MF/train.py`` (dims [100, 1000], sigmoid, T = 20,
sampling_steps 20, noise_scale 1e-4, noise_min 1e-4, noise_max 1e-3, alpha 0.4, beta 1, diff_lr
1e-3, batch 2048, embedding 64, time embedding 10); ``conf/model/ddrm.yaml`` lists the LightGCN
grid's values too.

Deviations, each for a reason:

* no pretrained checkpoint: the official runs load a backbone trained beforehand on their own split
  (``pretrain_checkpoint/``) and then freeze it (MF: ``requires_grad = False``) or fine-tune it at lr
  1e-5 (LightGCN); fedrec's splits have no such checkpoint. Instead the backbone starts from the
  official ``normal(0, 0.1)`` init (``init_std``) and either trains jointly from the start at
  ``optim.lr`` (``pretrain_epochs=0``), or first trains alone on its own BPR loss for
  ``pretrain_epochs`` epochs (the checkpoint's stand-in; validation during that phase already scores
  with DDRM's inference), then DDRM's loss takes over, the backbone frozen with ``freeze_backbone``
  (its embeddings detached: no gradient reaches it, the optimiser leaves it as pretrained) or still
  trained at ``optim.lr``. The clock is the model's local epochs (``on_epoch_end``; cross-device:
  the round, ``set_schedule_position``); a silo node counts the local epochs of its round only;
* the official "MF" variant runs its LightGCN class (``--layer 4`` in its grid) over MF-pretrained
  embeddings; here ``backbone=mf`` is plain BPR-MF (no propagation) and ``backbone=lightgcn`` is
  fedrec's LightGCN (RecBole's normalisation);
* the official LightGCN grid uses ``sampling_steps`` 62 > T = 50, which reads past the schedule (its
  ``_extract_into_tensor`` then repeats the last coefficient); here ``sampling_steps`` must be in 1..T;
* the official LightGCN variant adds the batch-mean regulariser to every example before the
  reweighting; here each example carries its own (equal in expectation; identical at beta = 0);
* a user without training items generates from a zero mean (the official mean is NaN there);
* per-user examples (``sampling=user``, DP-SGD, cross-device): ``n_samples_per_user`` triples per
  user, the user's loss their mean, as BPR-MF's; cross-device users take explicit draws
  (:meth:`draw_randomness`: triples, t, noises and the dropout masks).

Federation and privacy follow the backbone: the user embedding table is private; with MF the
model runs central, silo, cross-device and DP-SGD (the item table is row-sparse); with LightGCN
it couples users through the graph, so cross-device and DP-SGD refuse it (silo propagates over each
node's own users, as :mod:`fedrec.models.lightgcn`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from fedrec.errors import ConfigError
from fedrec.models.base import Batch, DataShape, Recommender
from fedrec.models.bpr import SAMPLINGS, BPRConfig, BPRMF
from fedrec.models.denoiser import ACTIVATIONS, DenoiserMLP
from fedrec.models.diffusion import DDPMSampler, GaussianDiffusion, gaussian_like, global_generator
from fedrec.models.lightgcn import LightGCN, LightGCNConfig

BACKBONES = ("mf", "lightgcn")
#: UserRandom streams of DDRM's own draws (BPR-MF's triples use streams 0..33)
_T_STREAM, _NOISE_U, _NOISE_I, _KEEP_U, _KEEP_I = 100, 101, 102, 103, 104


@dataclass
class DDRMConfig:
    backbone: str = "mf"  # mf (BPR-MF) | lightgcn
    embedding_size: int = 64  # backbone embedding dimension (official recdim 64)
    n_layers: int = 2  # LightGCN propagation layers (official LightGCN grid: 2)
    reg_weight: float = 0.0  # L2 on the triple's ego embeddings, reg/2 (...) (official: MF none, LightGCN 1e-4)
    sampling: str = "interaction"  # interaction (official: every training pair once per epoch) | user
    n_samples_per_user: int = 8  # triples per user for per-user examples (sampling=user, DP-SGD, cross-device)
    init_std: float | None = 0.1  # backbone init normal(0, init_std) (official 0.1); null: the backbone's default
    dims: list[int] = field(default_factory=lambda: [100, 1000])  # denoiser hidden dims (official MF grid)
    act: str = "sigmoid"  # denoiser activation: tanh | sigmoid | relu (official MF grid: sigmoid)
    emb_size: int = 10  # timestep embedding size (official 10)
    dropout: float = 0.5  # dropout on the noisy embedding inside the denoiser (official 0.5)
    norm: bool = False  # L2-normalise the noisy embedding first (official False)
    steps: int = 20  # T (official MF grid: 20)
    noise_schedule: str = "linear-var"  # linear | linear-var | cosine (official linear-var)
    noise_scale: float = 1.0e-4  # (official MF grid: 1e-4)
    noise_min: float = 1.0e-4  # (official 1e-4)
    noise_max: float = 1.0e-3  # (official 1e-3)
    beta_fixed: bool = True  # first beta := 1e-5 (official GaussianDiffusion default)
    sampling_steps: int | None = None  # reverse steps at inference, from step sampling_steps-1; None: T (official MF grid: T)
    sampling_noise: bool = False  # posterior noise during inference (official False)
    alpha: float = 0.4  # weight of the reconstruction loss against BPR (official MF grid 0.4)
    beta: float = 1.0  # exponent of the detached sigmoid(<u^, i^>) example weight (official MF grid 1)
    diff_lr: float = 1.0e-3  # learning rate of both denoisers (official 1e-3)
    pretrain_epochs: int = 0  # epochs of the backbone's own BPR loss before DDRM's (official: a pretrained checkpoint)
    freeze_backbone: bool = False  # after pretraining, train the denoisers only (official MF: frozen; LightGCN: tuned)

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ConfigError(f"model.backbone: expected one of {BACKBONES}, got {self.backbone!r}")
        if self.sampling not in SAMPLINGS[:2]:
            raise ConfigError(f"model.sampling: expected interaction or user, got {self.sampling!r}")
        if self.act not in ACTIVATIONS:
            raise ConfigError(f"model.act: expected one of {sorted(ACTIVATIONS)}, got {self.act!r}")
        if not self.dims or any(int(d) < 1 for d in self.dims):
            raise ConfigError(f"model.dims: a non-empty list of positive sizes, got {self.dims}")
        if int(self.emb_size) < 1:
            raise ConfigError(f"model.emb_size: must be >= 1, got {self.emb_size}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ConfigError(f"model.dropout: must be in [0, 1), got {self.dropout}")
        if not float(self.noise_scale) > 0:
            raise ConfigError(f"model.noise_scale: must be > 0 (DDRM reverses a noised chain), got {self.noise_scale}")
        if int(self.steps) < 1:
            raise ConfigError(f"model.steps: must be >= 1, got {self.steps}")
        if self.sampling_steps is not None and not 1 <= int(self.sampling_steps) <= int(self.steps):
            raise ConfigError(f"model.sampling_steps: must be in 1..{self.steps} (model.steps), got {self.sampling_steps}")
        if not 0.0 <= float(self.alpha) <= 1.0:
            raise ConfigError(f"model.alpha: must be in [0, 1], got {self.alpha}")
        if float(self.beta) < 0:
            raise ConfigError(f"model.beta: must be >= 0, got {self.beta}")
        if int(self.pretrain_epochs) < 0:
            raise ConfigError(f"model.pretrain_epochs: must be >= 0, got {self.pretrain_epochs}")
        if not float(self.diff_lr) > 0:
            raise ConfigError(f"model.diff_lr: must be > 0, got {self.diff_lr}")

    def backbone_config(self) -> BPRConfig:
        common = dict(embedding_size=int(self.embedding_size), sampling=self.sampling,
                      n_samples_per_user=int(self.n_samples_per_user), reg_weight=float(self.reg_weight),
                      init_std=self.init_std)
        if self.backbone == "lightgcn":
            return LightGCNConfig(n_layers=int(self.n_layers), **common)
        return BPRConfig(**common)


class DDRM(Recommender):
    """A backbone's embeddings denoised by two conditional diffusion models; see the module docstring."""

    name = "ddrm"

    def __init__(self, cfg: DDRMConfig, shape: DataShape):
        super().__init__()
        self.cfg = cfg
        self.n_items = shape.n_items
        bcfg = cfg.backbone_config()
        self.backbone = LightGCN(bcfg, shape) if cfg.backbone == "lightgcn" else BPRMF(bcfg, shape)
        self.couples_users = self.backbone.couples_users  # LightGCN: the graph couples users
        d, dims = int(cfg.embedding_size), [int(v) for v in cfg.dims]
        out_dims = dims + [d]  # official: out_dims = dims + [recdim], in_dims = out_dims[::-1]

        def denoiser() -> DenoiserMLP:
            return DenoiserMLP(out_dims[::-1], out_dims, int(cfg.emb_size), norm=bool(cfg.norm),
                               dropout=float(cfg.dropout), cond_dim=d, act=cfg.act)

        self.user_dnn, self.item_dnn = denoiser(), denoiser()
        self.diffusion = GaussianDiffusion(int(cfg.steps), cfg.noise_schedule, float(cfg.noise_scale),
                                           float(cfg.noise_min), float(cfg.noise_max), mean_type="x0",
                                           reweight=False, importance_sampling=False,
                                           beta_fixed=bool(cfg.beta_fixed))
        self.epochs_done = 0  # local epochs this model has trained: the pretraining phase's clock

    def on_epoch_end(self) -> None:
        self.epochs_done += 1

    def set_schedule_position(self, epochs: int, updates: int) -> None:
        self.epochs_done = int(epochs)

    def pretraining(self) -> bool:
        """Whether the backbone still trains alone on its own BPR loss (``pretrain_epochs``)."""
        return self.epochs_done < int(self.cfg.pretrain_epochs)

    # -------------------------------------------------------------- the backbone's embeddings
    def fit(self, train) -> None:
        self.backbone.fit(train)  # LightGCN's graph; BPR-MF reads nothing

    @property
    def train_unit(self) -> str:
        return self.backbone.train_unit

    def _lookups(self):
        """(user ids -> final user embeddings, item ids -> final item embeddings, all final item embeddings).

        MF looks up through its ``nn.Embedding`` modules (Opacus' per-sample gradients hook them)."""
        if self.cfg.backbone == "lightgcn":
            users_all, items_all = self.backbone.propagate()
            return (lambda u: users_all[u]), (lambda i: items_all[i]), items_all
        b = self.backbone
        return b.user_emb, b.item_emb, b.item_emb.weight

    # -------------------------------------------------------------- training
    def draw_randomness(self, batch: Batch, rnd) -> dict[str, torch.Tensor]:
        """The backbone's per-user triples (LightGCN refuses), then t, the two noises, the two dropout masks."""
        r = self.backbone.draw_randomness(batch, rnd)
        b, s = r["pos"].shape
        d, p = int(self.cfg.embedding_size), float(self.cfg.dropout)
        r["t"] = rnd.randint(_T_STREAM, s, int(self.cfg.steps))
        r["noise_u"] = rnd.normal(_NOISE_U, s * d).reshape(b, s, d)
        r["noise_i"] = rnd.normal(_NOISE_I, s * d).reshape(b, s, d)
        r["keep_u"] = rnd.keep_mask(_KEEP_U, s * d, p).reshape(b, s, d)
        r["keep_i"] = rnd.keep_mask(_KEEP_I, s * d, p).reshape(b, s, d)
        return r

    def triple_loss(self, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor,
                    draws: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """(B, S) DDRM losses of the triples (users[b], pos[b, s], neg[b, s]); ``draws``: explicit t (B, S),
        noise_u / noise_i / keep_u / keep_i (B, S, d), else drawn from torch's global generator.

        Every tensor keeps the user as its first axis: Opacus (DP-SGD) takes per-user gradients there."""
        user_of, item_of, _ = self._lookups()
        s = pos.shape[1]
        # one lookup per table: Opacus' ghost clipping refuses a module called twice in one step
        e_u = user_of(users)[:, None, :].expand(-1, s, -1)
        e_p, e_n = item_of(torch.cat([pos, neg], 1)).split(s, dim=1)
        frozen = self.cfg.freeze_backbone and int(self.cfg.pretrain_epochs) > 0
        if frozen:  # the backbone gets no gradient (None), so the optimiser leaves it exactly as pretrained
            e_u, e_p, e_n = e_u.detach(), e_p.detach(), e_n.detach()
        if draws is None:  # the official order: t, the user's noise, the item's noise
            draws = {"t": torch.randint(0, self.diffusion.steps, pos.shape, device=e_u.device),
                     "noise_u": gaussian_like(e_u, None), "noise_i": gaussian_like(e_p, None)}
        keep_u, keep_i = draws.get("keep_u"), draws.get("keep_i")  # None: the modules' own dropout
        d = self.diffusion  # x0-predicting denoisers: their outputs are the denoised embeddings
        u_hat = self.user_dnn(d.q_sample(e_u, draws["t"], draws["noise_u"]), draws["t"], keep=keep_u, cond=e_p)
        i_hat = self.item_dnn(d.q_sample(e_p, draws["t"], draws["noise_i"]), draws["t"], keep=keep_i, cond=e_u)
        # the official get_reconstruct_loss: the unweighted MSE per triple (no SNR weight, uniform t)
        recon = (((e_u - u_hat) ** 2).mean(-1) + ((e_p - i_hat) ** 2).mean(-1)) / 2
        pos_score = (u_hat * i_hat).sum(-1)
        bpr = -F.logsigmoid(pos_score - (u_hat * e_n).sum(-1))
        if self.cfg.reg_weight > 0 and not frozen:
            if self.cfg.backbone == "lightgcn":  # the ego (layer-0) embeddings, as LightGCN's own regulariser
                b = self.backbone
                ego_u = b.user_emb(users)[:, None, :]
                ego_p, ego_n = b.item_emb(torch.cat([pos, neg], 1)).split(s, dim=1)
            else:  # MF's embeddings are its ego embeddings (no second lookup: ghost clipping refuses one)
                ego_u, ego_p, ego_n = e_u, e_p, e_n
            ego = ego_u.pow(2).sum(-1) + ego_p.pow(2).sum(-1) + ego_n.pow(2).sum(-1)
            bpr = bpr + 0.5 * float(self.cfg.reg_weight) * ego
        weight = torch.sigmoid(pos_score).detach() ** float(self.cfg.beta)
        a = float(self.cfg.alpha)
        return ((1 - a) * bpr + a * recon) * weight

    def loss(self, batch: Batch) -> torch.Tensor:
        x, b = batch.x, self.backbone
        if self.pretraining():
            return b.loss(batch)  # BPR-MF's / LightGCN's own loss (it reads the same draws)
        if batch.items is not None:  # one training interaction per example, one uniform negative
            with torch.no_grad():
                neg, bad = b._negatives(x, 1, lambda r: torch.randint(0, x.shape[1], (len(x), 1), device=x.device))
            return self.triple_loss(batch.users, batch.items[:, None], neg)[:, 0] * (~bad[:, 0]).to(torch.float32)
        if batch.rand is not None:
            pos, neg, valid = batch.rand["pos"], batch.rand["neg"], batch.rand["valid"]
            draws = {k: batch.rand[k] for k in ("t", "noise_u", "noise_i", "keep_u", "keep_i")}
        else:
            with torch.no_grad():
                pos, neg, valid = b._sample_pairs(x)
            draws = None
        per = self.triple_loss(batch.users, pos, neg, draws)
        vf = valid.to(per.dtype)
        return (per * vf).sum(1) / vf.sum(1).clamp(min=1.0)

    def optimizer_groups(self, lr: float, weight_decay: float):
        """The backbone at ``optim.lr``, both denoisers at ``diff_lr`` (the official three Adams)."""
        dnn = [p for m in (self.user_dnn, self.item_dnn) for p in m.parameters()]
        return [{"params": list(self.backbone.parameters()), "lr": lr, "weight_decay": weight_decay},
                {"params": dnn, "lr": float(self.cfg.diff_lr), "weight_decay": weight_decay}]

    # -------------------------------------------------------------- inference
    def ideal_item(self, batch: Batch, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, d) the generated ideal item embedding of each user (the module docstring's inference)."""
        user_of, _, items_all = self._lookups()
        x = batch.x.to(items_all.dtype)
        history = (x @ items_all) / x.sum(1, keepdim=True).clamp(min=1.0)  # mean of the training items
        d = self.diffusion
        generator = global_generator(history.device) if generator is None else generator
        t = torch.full((len(x),), d.steps - 1, dtype=torch.long, device=x.device)
        x_t = d.q_sample(history, t, gaussian_like(history, generator))
        return DDPMSampler(noise=bool(self.cfg.sampling_noise)).sample(
            d, lambda z, t, cond: self.item_dnn(z, t, cond=cond), x_t, generator,
            start=self.reverse_steps() - 1, cond=user_of(batch.users))

    def reverse_steps(self) -> int:
        """How many reverse steps inference takes (``sampling_steps``, None: T)."""
        s = self.cfg.sampling_steps
        return self.diffusion.steps if s is None else int(s)

    def scores(self, batch: Batch) -> torch.Tensor:
        _, _, items_all = self._lookups()
        return self.ideal_item(batch) @ items_all.T

    # -------------------------------------------------------------- federation
    def private_parameter_names(self) -> set[str]:
        return {"backbone.user_emb.weight"}

    def row_sparse_parameter_names(self) -> set[str]:
        # MF: a user's triples look up only their items' rows; LightGCN's propagation touches every row
        return {f"backbone.{n}" for n in self.backbone.row_sparse_parameter_names()}
