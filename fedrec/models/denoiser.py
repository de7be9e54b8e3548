"""DiffRec's denoising MLP: timestep embedding concatenated to the (noisy) vector, tanh layers.

As the official ``models/DNN.py`` (time_type "cat"): sinusoidal timestep embedding -> Linear ->
concatenated with the dropped-out input; tanh after every layer except the last; weights
N(0, 2/(fan_in+fan_out)), biases N(0, 0.001) (``bias_std``; the official L-DiffRec ``DNN`` starts its
biases at 0 with Xavier-normal weights, the same weight distribution: ``bias_std=0``).

``cond_dim`` > 0 concatenates a condition after the timestep embedding, ``[x | emb | cond]``, and
``act`` picks the activation (tanh, sigmoid or relu): DDRM's conditional ``DNN`` (Zhao et al.,
SIGIR 2024, github.com/Polaris-JZ/DDRM ``model.py``), whose condition is the other side's embedding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: int = 10000, sin_first: bool = False) -> torch.Tensor:
    """Sinusoids of t at frequencies max_period^(-j / (dim // 2)): [cos | sin] (DiffRec), or
    [sin | cos] with ``sin_first`` (GiffCF's ``Timestep``, the order its checkpoints expect)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[..., None] * freqs  # t of any shape (B,) or (B, S): the sinusoids on a new last axis
    parts = [torch.sin(args), torch.cos(args)] if sin_first else [torch.cos(args), torch.sin(args)]
    emb = torch.cat(parts, dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[..., :1])], dim=-1)
    return emb


#: the activations of the hidden layers (DiffRec: tanh; DDRM's grid: tanh, sigmoid, relu)
ACTIVATIONS = {"tanh": torch.tanh, "sigmoid": torch.sigmoid, "relu": F.relu}


def _init_linear(layer: nn.Linear, bias_std: float) -> None:
    fan_out, fan_in = layer.weight.shape
    nn.init.normal_(layer.weight, 0.0, math.sqrt(2.0 / (fan_in + fan_out)))
    if bias_std > 0:
        nn.init.normal_(layer.bias, 0.0, bias_std)
    else:
        nn.init.zeros_(layer.bias)


class DenoiserMLP(nn.Module):
    """``in_dims``: [input, hidden..., bottleneck]; ``out_dims``: [bottleneck, hidden..., output]."""

    def __init__(self, in_dims: list[int], out_dims: list[int], emb_size: int = 10,
                 norm: bool = False, dropout: float = 0.5, bias_std: float = 0.001,
                 cond_dim: int = 0, act: str = "tanh"):
        super().__init__()
        if in_dims[-1] != out_dims[0]:
            raise ValueError("denoiser in_dims[-1] must equal out_dims[0]")
        if act not in ACTIVATIONS:
            raise ValueError(f"denoiser act: expected one of {sorted(ACTIVATIONS)}, got {act!r}")
        self.emb_size = emb_size
        self.norm = norm
        self.cond_dim = int(cond_dim)
        self.act = ACTIVATIONS[act]
        self.emb_layer = nn.Linear(emb_size, emb_size)
        dims_in = [in_dims[0] + emb_size + self.cond_dim] + list(in_dims[1:])
        self.in_layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims_in[:-1], dims_in[1:]))
        self.out_layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(out_dims[:-1], out_dims[1:]))
        self.drop = nn.Dropout(dropout)
        for layer in [*self.in_layers, *self.out_layers, self.emb_layer]:
            _init_linear(layer, bias_std)

    def forward(self, x: torch.Tensor, t: torch.Tensor, keep: torch.Tensor | None = None,
                cond: torch.Tensor | None = None) -> torch.Tensor:
        """``keep``: an explicit inverted-dropout mask replacing the module's own dropout; ``cond``:
        the (..., cond_dim) condition (required when ``cond_dim`` > 0). x may be (B, d) with t (B,),
        or (B, S, d) with t (B, S): S vectors per example (DDRM's triples of one user)."""
        emb = self.emb_layer(timestep_embedding(t, self.emb_size))
        if self.norm:
            x = F.normalize(x, dim=-1)
        # Every layer is called as its module (not split into functional pieces): Opacus' per-sample
        # gradients (DP-SGD) hook the nn.Linear modules.
        parts = [x * keep if keep is not None else self.drop(x), emb.to(x.dtype)]
        if self.cond_dim:
            if cond is None:
                raise ValueError("denoiser: built with cond_dim > 0, called without a condition")
            parts.append(cond.to(x.dtype))
        h = torch.cat(parts, dim=-1)
        for layer in self.in_layers:
            h = self.act(layer(h))
        last = len(self.out_layers) - 1
        for i, layer in enumerate(self.out_layers):
            h = layer(h)
            if i != last:
                h = self.act(h)
        # fp32 out whatever autocast multiplied in (fedrec/precision.py): the diffusion arithmetic
        # around the denoiser (x_t, posterior means, loss weights) stays fp32
        return h.float()
