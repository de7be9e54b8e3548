"""Where a run's tensors live: the top-level config key ``device`` (``cpu`` | ``cuda`` | ``auto``).

``cpu`` is the default. ``auto`` is ``cuda`` when torch sees a GPU, else ``cpu``; ``cuda`` without a
GPU is a :class:`~fedrec.errors.ConfigError` naming the key, raised by ``fedrec.config.validate``
before any file of the run is written. Every process resolves the key itself: the main process
(centralised training, server-side evaluation) and each Flower node, which sees the GPUs its
Ray task was given (``federation.client_gpus``) or those of its own machine.

Tensors that leave a process (Flower messages, checkpoints, node state) are moved to the CPU first,
so the values in a message do not depend on where they were computed.
"""

from __future__ import annotations

import torch

from fedrec.errors import ConfigError

DEVICES = ("cpu", "cuda", "auto")


def resolve_device(name) -> torch.device:
    """The torch device for a ``device`` config value."""
    value = str(name).strip().lower()
    if value not in DEVICES:
        raise ConfigError(f"device: expected one of {', '.join(DEVICES)}, got {name!r}")
    if value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if value == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda requested but torch sees no CUDA GPU (torch.cuda.is_available() is "
                          "False); use device=cpu or device=auto")
    return torch.device(value)


def cfg_device(cfg) -> torch.device:
    """The device of a composed config (``cpu`` when the key is absent, e.g. an older run's config)."""
    return resolve_device(cfg.get("device", "cpu") or "cpu")


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of ``model``'s parameters (CPU for a model without any)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
