"""Per-example gradients for layers Opacus has no sampler of, registered before DP-SGD wraps a model.

``nn.PReLU`` (the DDGM nets of CODIGEM and RecFusion): y = max(0, x) + a min(0, x), so the gradient
of example b in the slope a is the sum of its output gradients times min(0, x) over every position
(one shared slope) or over every position of each channel (dim 1, ``num_parameters`` = channels).
Checked against per-example autograd in tests/test_ddgm_models.py.
"""

from __future__ import annotations

import torch
from torch import nn

_registered = False


def prelu_grad_sample(layer: nn.PReLU, activations, backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    x = activations[0] if isinstance(activations, (list, tuple)) else activations
    g = backprops * torch.clamp(x, max=0.0)
    if layer.weight.numel() == 1:
        per = g.reshape(g.shape[0], -1).sum(1, keepdim=True)
    else:
        per = g.sum(dim=tuple(d for d in range(g.dim()) if d not in (0, 1)))
    return {layer.weight: per}


def register() -> None:
    """Add the samplers above to Opacus's registry (idempotent)."""
    global _registered
    if _registered:
        return
    from opacus.grad_sample import register_grad_sampler

    register_grad_sampler(nn.PReLU)(prelu_grad_sample)
    _registered = True
