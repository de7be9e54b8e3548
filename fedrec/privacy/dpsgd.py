"""DP-SGD with Opacus for any model of the zoo (Abadi et al., CCS 2016).

The privacy unit is the user: a model's per-example loss is one user's loss, so clipping each
example's gradient bounds each user's influence. Steps, as Opacus's ``PrivacyEngine`` runs them:

1. Poisson-sample users (each with probability batch_size / n_users) for every step;
2. compute each user's gradient norm — with ghost clipping (``grad_sample_mode="ghost"``) from the
   layer inputs and output gradients, without materialising per-user gradients (the only mode fast
   on CPU, ~2x a plain step), or with per-sample hooks (``"hooks"``) otherwise;
3. clip to ``max_grad_norm``, sum, add Gaussian noise of std ``noise_multiplier * max_grad_norm``;
4. account the step (PRV or RDP accountant); epsilon at ``delta`` (default 1/n_users) is reported
   after every epoch. Steps whose Poisson batch is empty are accounted too.

Note: Opacus divides the noisy clipped sum by ``int(n_users * sample_rate)``, which float rounding can
make one less than ``batch_size`` (e.g. 9 for 40 users at rate 1/4); tests follow Opacus's value.

Randomness: the Poisson sampling and the noise come from two explicit generators derived from the
trainer's ``seed`` (``fedrec.rng``), so a silo's round gets its own draws and a run is reproducible.

``grad_sample_mode="auto"`` takes ghost clipping when every trainable layer supports it and hooks
otherwise; a model neither supports fails with an error naming the layer.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedrec.errors import ConfigError
from fedrec.models.base import Batch, Recommender
from fedrec.privacy.accounting import check_noise_or_target


# Opacus's notices on every run: secure_mode is off on purpose (a simulator's noise need not resist
# floating-point attacks on the RNG; deployments would turn it on), and ghost clipping's backward hooks
# fire on module outputs by design. Neither says anything about a given run.
warnings.filterwarnings("ignore", message="Secure RNG turned off")
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")


@dataclass
class DPSGDConfig:
    noise_multiplier: float | None = 1.0  # sigma; null when target_epsilon is set
    target_epsilon: float | None = None  # calibrate sigma to reach this epsilon after train.epochs (inf: no noise)
    max_grad_norm: float = 1.0  # per-user clipping bound C
    delta: float | None = None  # null: 1 / number of training users
    accountant: str = "prv"  # prv | rdp
    grad_sample_mode: str = "auto"  # auto | ghost | hooks

    def __post_init__(self):
        if self.accountant not in ("prv", "rdp"):
            raise ConfigError(f"privacy.accountant: expected prv or rdp, got {self.accountant!r}")
        if self.grad_sample_mode not in ("auto", "ghost", "hooks"):
            raise ConfigError(f"privacy.grad_sample_mode: expected auto, ghost or hooks, got {self.grad_sample_mode!r}")
        if self.max_grad_norm <= 0:
            raise ConfigError(f"privacy.max_grad_norm: must be positive, got {self.max_grad_norm}")
        check_noise_or_target(self.noise_multiplier, self.target_epsilon)
        if self.delta is not None and not 0 < self.delta < 1:
            raise ConfigError(f"privacy.delta: must be in (0, 1), got {self.delta}")


def dpsgd_config(cfg, where: str = "privacy") -> DPSGDConfig:
    """The typed config from ``conf/privacy/dpsgd.yaml`` or a generator's ``dp`` block."""
    from fedrec.typed_config import typed_block

    return typed_block(DPSGDConfig, cfg, where)


class LossModule(nn.Module):
    """``forward(batch)`` = per-example loss, the module Opacus wraps."""

    def __init__(self, model: Recommender):
        super().__init__()
        self.model = model

    def forward(self, users: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.model.loss(Batch(users=users, x=x))


class PerExampleLoss(nn.Module):
    """The 'criterion' Opacus's ghost clipping calls: the model already returns per-example losses."""

    def __init__(self):
        super().__init__()
        self.reduction = "mean"

    def forward(self, per_example: torch.Tensor, target=None) -> torch.Tensor:
        return per_example if self.reduction == "none" else per_example.mean()


def _unsupported_layer(module: nn.Module, supported: dict) -> str | None:
    """The first trainable layer whose type is not in Opacus's registry ``supported``, or None."""
    for name, sub in module.named_modules():
        own = [p for p in sub.parameters(recurse=False) if p.requires_grad]
        if own and type(sub) not in supported:
            return f"{name} ({type(sub).__name__})"
    return None


class DPSGDTrainer:
    """Private training of ``model`` on ``rows`` (a ``TrainRows``); ``epoch()`` then ``epsilon()``."""

    def __init__(self, model: Recommender, optimizer: torch.optim.Optimizer, rows, batch_size: int,
                 cfg: DPSGDConfig, epochs: int, seed: int):
        from opacus import PrivacyEngine

        if model.input_kind != "user_vector":
            # Opacus's per-sample hooks need every layer's input batched by example; a sequence
            # model's positional table is not, so its per-user gradients would be wrong.
            raise ConfigError(f"privacy=dpsgd: model {model.name!r} reads sequences, which DP-SGD does not "
                              "support yet; use a user-vector model or privacy=none")
        self.model, self.rows, self.cfg = model, rows, cfg
        n = len(rows)
        self.delta = cfg.delta if cfg.delta is not None else 1.0 / n
        module = LossModule(model)
        from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping

        from fedrec.privacy.grad_samplers import register

        register()  # fedrec's samplers for layers Opacus lacks (PReLU)

        mode = cfg.grad_sample_mode
        if mode in ("auto", "ghost"):
            bad = _unsupported_layer(module, GradSampleModuleFastGradientClipping.NORM_SAMPLERS)
            if bad and mode == "ghost":
                raise ConfigError(f"privacy.grad_sample_mode: ghost clipping does not support layer {bad}")
            mode = "hooks" if bad else "ghost"
        if mode == "hooks":
            bad = _unsupported_layer(module, GradSampleModule.GRAD_SAMPLERS)
            if bad:
                raise ConfigError(f"privacy: Opacus cannot compute per-user gradients of layer {bad}")
        self.mode = mode
        from fedrec.rng import PURPOSE_DP_NOISE, PURPOSE_DP_SAMPLING, torch_stream

        # Explicit generators, keyed by the caller's seed: Opacus samples users from the loader's
        # generator and draws its noise from ``noise_generator`` (not torch's global generator). The
        # noise lands on the parameters' device, so its generator lives there; sampling stays on the CPU.
        loader = DataLoader(TensorDataset(torch.arange(n)), batch_size=batch_size,
                            generator=torch_stream(seed, PURPOSE_DP_SAMPLING))
        from fedrec.devices import model_device

        self.noise_generator = torch_stream(seed, PURPOSE_DP_NOISE, device=model_device(model))
        self.engine = PrivacyEngine(accountant=cfg.accountant, secure_mode=False)
        common = dict(module=module, optimizer=optimizer, data_loader=loader, max_grad_norm=cfg.max_grad_norm,
                      poisson_sampling=True, grad_sample_mode=mode, noise_generator=self.noise_generator)
        if mode == "ghost":
            common["criterion"] = PerExampleLoss()
        if cfg.target_epsilon is not None and math.isinf(cfg.target_epsilon):
            out = self.engine.make_private(noise_multiplier=0.0, **common)  # epsilon = inf: clipping only
        elif cfg.target_epsilon is not None:
            out = self.engine.make_private_with_epsilon(target_epsilon=cfg.target_epsilon, target_delta=self.delta,
                                                        epochs=epochs, **common)
        else:
            out = self.engine.make_private(noise_multiplier=cfg.noise_multiplier, **common)
        # Opacus returns 4 values with a criterion (ghost) and 3 without.
        self.module, self.optimizer, *rest = out
        if mode == "ghost":
            self.criterion, self.loader = rest
        else:
            self.criterion, self.loader = None, rest[0]
        self.noise_multiplier = float(self.optimizer.noise_multiplier)
        self.sample_rate = 1.0 / len(loader)  # Opacus's Poisson rate: batch_size / n_users

    def epoch(self) -> dict[str, float]:
        self.module.train()
        total, n = 0.0, 0
        for (idx,) in self.loader:
            if len(idx) == 0:
                # Poisson sampling drew nobody. The analysis counts this step, so account it;
                # releasing no update at all is post-processing of the noisy one.
                self.engine.accountant.step(noise_multiplier=self.noise_multiplier,
                                            sample_rate=self.sample_rate)
                continue
            b = self.rows.batch(idx.numpy())
            per_example = self.module(b.users, b.x)
            if self.criterion is not None:
                loss = self.criterion(per_example)
            else:
                loss = per_example.mean()
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            total += float(per_example.detach().sum())
            n += len(idx)
        self.model.on_epoch_end()
        return {"loss": total / max(n, 1), "examples": n, "epsilon": self.epsilon(),
                "noise_multiplier": self.noise_multiplier}

    def epsilon(self) -> float:
        if self.noise_multiplier == 0:
            return math.inf
        return float(self.engine.get_epsilon(self.delta))


def local_dpsgd_round(model: Recommender, optimizer: torch.optim.Optimizer, rows, batch_size: int, cfg: DPSGDConfig,
                      rounds: int, local_epochs: int, history: list[tuple[float, float, int]], seed: int) -> dict:
    """One federated round of DP-SGD inside a silo; the silo's accountant ``history`` carries across rounds.

    The privacy unit is a user of this silo. ``target_epsilon`` calibrates the multiplier for the whole
    run (``rounds`` x ``local_epochs`` epochs at this silo's Poisson rate), so every silo meets it for its
    own users; delta defaults to 1 / the silo's users.
    """
    from dataclasses import replace

    from fedrec.privacy.accounting import calibrate_noise, composed_epsilon

    n = len(rows)
    steps = math.ceil(n / batch_size)
    delta = cfg.delta if cfg.delta is not None else 1.0 / n
    if cfg.target_epsilon is None:
        sigma = float(cfg.noise_multiplier)
    elif math.isinf(cfg.target_epsilon):
        sigma = 0.0
    else:
        total = [(1.0 / steps, rounds * local_epochs * steps)]
        sigma = calibrate_noise(lambda s: composed_epsilon([(s, q, k) for q, k in total], delta, cfg.accountant),
                                float(cfg.target_epsilon), "privacy.target_epsilon")
    trainer = DPSGDTrainer(model, optimizer, rows, batch_size,
                           replace(cfg, noise_multiplier=sigma, target_epsilon=None, delta=delta), local_epochs, seed)
    losses = [trainer.epoch()["loss"] for _ in range(local_epochs)]
    trainer.module._close()  # the model leaves the round without Opacus's hooks
    history = list(history) + [tuple(h) for h in trainer.engine.accountant.history]
    return {"losses": losses, "history": history, "noise_multiplier": sigma, "delta": delta,
            "epsilon": composed_epsilon(history, delta, cfg.accountant)}
