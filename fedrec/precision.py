"""Compute precision of a run: the top-level config key ``precision`` (``fp32`` | ``bf16`` | ``auto``).

What runs in bf16 (``bf16``, or ``auto`` where it resolves so): the matrix products of a model's
forward pass (``torch.autocast`` with ``dtype=torch.bfloat16`` on the resolved device, ``cpu`` or
``cuda``) in centralised training (:func:`fedrec.train.train_epoch`), in evaluation
(:func:`fedrec.eval.evaluate_model`) and in cross-device local steps
(:func:`fedrec.federated.cross_device.train_users`). Autocast multiplies bf16 operands with fp32
accumulation (oneDNN/AMX on the CPU, tensor cores on a GPU) and leaves elementwise arithmetic on fp32
tensors alone. What stays fp32:

* the parameters (the optimiser's master weights), their gradients and every optimiser state: the
  backward pass returns fp32 gradients for fp32 leaves;
* losses and scores: a model's per-example loss and its scores are cast back to fp32 before they
  leave the model; top-K, masks and the metric sums run on fp32 scores;
* diffusion arithmetic: the schedule (alphas, betas, posterior coefficients, float64 then fp32), the
  forward noising x_t, the posterior means of the reverse chain and the SNR loss weights are all
  fp32, because the denoiser (:class:`fedrec.models.denoiser.DenoiserMLP`) returns fp32. This
  matters for DiffRec: its noise scale is 0.005 (betas ~1e-4 .. 5e-5) next to history entries of 1,
  and bf16's 8-bit mantissa has a spacing of 2^-7 = 0.0078 at 1, so a bf16 x_t = sqrt(ab) x0 +
  sqrt(1 - ab) eps would round most of the noise away; only the MLP's input copy is rounded;
* privacy: DP-SGD (Opacus' per-sample gradients, clipping, noise) trains with its own loop and
  never enters autocast, so it is fp32 whatever ``precision`` says; accountants and node-level /
  user-level DP clipping and noise operate on the fp32 parameters and updates.

``auto`` is bf16 only where both hold: the hardware multiplies bf16 fast (:func:`fast_bf16`: a GPU
with bf16 tensor cores, compute capability >= 8.0; a CPU with AMX-BF16, read from torch's CPU
capability or the kernel's CPU flags) and the model is in :data:`BF16_MODELS` for that use
(training or evaluation), the models whose metrics were measured unchanged in bf16 (docs/RESULTS.md,
"bf16 and the speed path"). Elsewhere ``auto`` is fp32; ``bf16`` forces it for any model and use.

Per model (see docs/RESULTS.md for the figures): DiffRec's evaluation in bf16 is measured (ML-1M
clean, one checkpoint: test Recall@20 / NDCG@20 0.0003 / 0.0002 from fp32) and allow-listed; its bf16
training under the official protocol ended 0.005 below fp32 in test Recall@20 (early stopping chose
epoch 5 instead of 15, one seed), so ``auto`` trains it in fp32. L-DiffRec, MultVAE, BPR and SASRec-lite are not
measured in bf16, so ``auto`` keeps them fp32; ``bf16`` on them is allowed but unverified (for BPR the
dot products of two bf16 embeddings lose ranking resolution; for L-DiffRec the latent diffusion runs
on encoder outputs rounded to bf16).
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch

from fedrec.errors import ConfigError

PRECISIONS = ("fp32", "bf16", "auto")

#: models whose test metrics were measured unchanged (within 0.002) in bf16, per use: what ``precision=auto``
#: may run in bf16. DiffRec's evaluation is (ML-1M clean: 0.0003 / 0.0002 from fp32 on one checkpoint); its
#: bf16 *training* under the official protocol selected another epoch (test Recall@20 0.1689 against fp32's
#: 0.1739 on seed 0), so auto trains it in fp32.
BF16_MODELS = {"train": frozenset(), "eval": frozenset({"diffrec"})}
USES = ("train", "eval")


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def fast_bf16(device) -> bool:
    """Whether ``device`` multiplies bf16 matrices much faster than fp32 (AMX on a CPU, tensor cores on a GPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        return torch.cuda.is_bf16_supported() and torch.cuda.get_device_capability(index)[0] >= 8
    if device.type != "cpu":
        return False
    # torch reports AMX in its capability string on some builds ("AMX" / "AVX512_AMX"); else the kernel's flags.
    return "AMX" in torch.backends.cpu.get_cpu_capability().upper() or "amx_bf16" in _cpu_flags()


def resolve_precision(name, device, model_name: str, use: str = "train") -> torch.dtype:
    """The compute dtype (``torch.float32`` or ``torch.bfloat16``) for a ``precision`` config value, for
    ``use`` = "train" (training and cross-device local steps) or "eval" (evaluation)."""
    value = str(name).strip().lower()
    if value not in PRECISIONS:
        raise ConfigError(f"precision: expected one of {', '.join(PRECISIONS)}, got {name!r}")
    if use not in USES:
        raise ValueError(f"use: expected one of {USES}, got {use!r}")
    if value == "bf16":
        return torch.bfloat16
    if value == "auto" and model_name in BF16_MODELS[use] and fast_bf16(device):
        return torch.bfloat16
    return torch.float32


def cfg_precision(cfg, device=None, use: str = "train") -> torch.dtype:
    """The compute dtype of a composed config (fp32 when the key is absent, e.g. an older run's config)."""
    from fedrec.devices import cfg_device

    device = cfg_device(cfg) if device is None else device
    return resolve_precision(cfg.get("precision", "fp32") or "fp32", device, str(cfg.model.name), use)


def set_precision(model: torch.nn.Module, cfg, device=None) -> torch.nn.Module:
    """Sets ``model.compute_dtype`` (training) and ``model.eval_dtype`` from the config; returns the model."""
    model.compute_dtype = cfg_precision(cfg, device, "train")
    model.eval_dtype = cfg_precision(cfg, device, "eval")
    return model


def compute_dtype(model: torch.nn.Module, use: str = "train") -> torch.dtype:
    """The model's dtype for ``use``; evaluation follows ``compute_dtype`` unless ``eval_dtype`` is set."""
    train = getattr(model, "compute_dtype", torch.float32)
    return getattr(model, "eval_dtype", train) if use == "eval" else train


def autocast(model: torch.nn.Module, device=None, use: str = "train"):
    """The autocast context of ``model``'s dtype for ``use`` on its device (a no-op context for fp32)."""
    dtype = compute_dtype(model, use)
    if dtype == torch.float32:
        return nullcontext()
    if device is None:
        from fedrec.devices import model_device

        device = model_device(model)
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)
