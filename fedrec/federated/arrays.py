"""Moving model state in and out of Flower records, split by parameter group.

Global parameters travel in the message's ArrayRecord. Private parameters (user embeddings,
personal heads) and non-parameter state (DiffRec's importance-sampling history, annealing counters)
stay on the node in ``context.state`` and are never sent. Records are built from CPU copies, so a
model on a GPU sends the same numpy arrays as one on the CPU.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from flwr.app import ArrayRecord

from fedrec.errors import FedrecInputError
from fedrec.models.base import Recommender


def global_names(model: Recommender) -> list[str]:
    private = model.private_parameter_names()
    return [n for n, _ in model.named_parameters() if n not in private]


def global_arrays(model: Recommender) -> ArrayRecord:
    params = dict(model.named_parameters())
    return ArrayRecord(OrderedDict((n, params[n].detach().to("cpu", copy=True)) for n in global_names(model)))


def local_state(model: Recommender) -> ArrayRecord:
    """Private parameters and persistent buffers: what a node keeps between rounds."""
    private = model.private_parameter_names()
    sd = model.state_dict()
    keep = OrderedDict((k, v.detach().to("cpu", copy=True)) for k, v in sd.items()
                       if k in private or k not in dict(model.named_parameters()))
    return ArrayRecord(keep)


def load_arrays(model: Recommender, arrays: ArrayRecord | dict[str, torch.Tensor], what: str) -> None:
    """Load named tensors into ``model`` after checking names, shapes and finiteness."""
    state = arrays.to_torch_state_dict() if isinstance(arrays, ArrayRecord) else arrays
    own = model.state_dict()
    for name, value in state.items():
        if name not in own:
            raise FedrecInputError(f"{what}: unknown array {name!r} for model {model.name!r}")
        if tuple(value.shape) != tuple(own[name].shape):
            raise FedrecInputError(f"{what}: array {name!r} has shape {tuple(value.shape)}, "
                                   f"expected {tuple(own[name].shape)}")
    model.load_state_dict(state, strict=False)


def check_update(reference: dict[str, tuple], arrays: ArrayRecord) -> str | None:
    """Why an uploaded update must be rejected, or None if it is well-formed and finite."""
    if set(arrays.keys()) != set(reference):
        return "array names differ from the global model's"
    for name, arr in arrays.items():
        a = arr.numpy()
        if tuple(a.shape) != reference[name]:
            return f"array {name!r} has shape {tuple(a.shape)}, expected {reference[name]}"
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            return f"array {name!r} contains NaN or Inf"
    return None
