"""Local training shared by the centralised trainer and every Flower client.

One epoch = one shuffled pass over the examples of the model's ``train_unit``, in mini-batches of
``batch_size`` examples: over the users (a batch of dense history rows; every model but BPR) or
over the training interactions (BPR, RecBole's epoch: each (user, item) once, with the user's
row in ``x`` and the item in ``Batch.items``). Rows are densified once when they fit in memory
(ML-1M: 67 MB), else per batch. Batches are built on the model's device (config ``device``): the
dense cache lives there, so only a batch's indices cross over; uncached rows are densified on the
CPU and moved per batch. A sequence model (``input_kind == "sequence"``) gets the same user
examples with ``Batch.seq`` filled too: each user's last ``model.max_len`` training items,
left-padded with ``n_items`` (:meth:`fedrec.data.sequences.Sequences.padded`); build its rows with
:func:`model_rows`. The forward pass runs in the model's compute precision (``fedrec/precision.py``:
bf16 autocast under ``precision=bf16``); the loss is fp32, backward and the (fused) AdamW step update
the fp32 weights.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from fedrec.data.sequences import Sequences
from fedrec.devices import model_device
from fedrec.errors import ConfigError
from fedrec.models.base import Batch, Recommender
from fedrec.precision import autocast

DENSE_CACHE_LIMIT = 256 * 2**20  # bytes
TRAIN_UNITS = ("user", "interaction")


def _check_unit(unit: str) -> None:
    if unit not in TRAIN_UNITS:
        raise ValueError(f"unknown training unit {unit!r}; expected one of {TRAIN_UNITS}")


class TrainRows:
    """Training rows of a user subset, as dense float tensors on ``device``, on demand."""

    def __init__(self, train: sp.csr_matrix, users: np.ndarray, seq: tuple[Sequences, int] | None = None,
                 device="cpu"):
        users = np.asarray(users, dtype=np.int64)
        self.device = torch.device(device)
        self._seq = seq  # (training sequences of all users, padded length) for sequence models
        counts = np.diff(train.indptr)[users]
        self.users = users[counts > 0]  # users without training items have nothing to learn from
        self._csr = train[self.users]
        self._nz_row: np.ndarray | None = None  # row position of every stored interaction, on first use
        self._dense = None
        if len(self.users) * train.shape[1] * 4 <= DENSE_CACHE_LIMIT:
            self._dense = torch.from_numpy(self._csr.toarray().astype(np.float32, copy=False)).to(self.device)

    def __len__(self) -> int:
        return len(self.users)

    def batch(self, idx: np.ndarray) -> Batch:
        # .to(self.device) is a no-op on the CPU (no copy)
        if self._dense is not None:  # index_select: about twice as fast as fancy indexing on CPU
            pick = torch.from_numpy(np.asarray(idx, dtype=np.int64)).to(self.device)
            x = torch.index_select(self._dense, 0, pick)
        else:
            x = torch.from_numpy(self._csr[idx].toarray().astype(np.float32, copy=False)).to(self.device)
        seq = None
        if self._seq is not None:
            seqs, length = self._seq
            seq = seqs.padded(self.users[idx], length, pad=self._csr.shape[1]).to(self.device)
        return Batch(users=torch.from_numpy(self.users[idx]).to(self.device), x=x, seq=seq)

    def n_examples(self, unit: str) -> int:
        """Users, or training interactions (the stored non-zeros), of this subset."""
        _check_unit(unit)
        return len(self) if unit == "user" else int(self._csr.nnz)

    def examples(self, unit: str, idx: np.ndarray) -> Batch:
        """The examples ``idx`` of ``unit``: users by position, or interactions by position in CSR order."""
        _check_unit(unit)
        if unit == "user":
            return self.batch(idx)
        if self._nz_row is None:
            self._nz_row = np.repeat(np.arange(len(self.users)), np.diff(self._csr.indptr))
        out = self.batch(self._nz_row[idx])
        out.items = torch.from_numpy(self._csr.indices[idx].astype(np.int64)).to(self.device)
        return out


def model_rows(model: Recommender, data, users: np.ndarray) -> TrainRows:
    """The training rows of ``users`` in the form ``model`` reads (dense rows, plus sequences for sequence
    models), built on the model's device."""
    device = model_device(model)
    if model.input_kind == "sequence":
        return TrainRows(data.train, users, seq=(data.input_sequences("train"), int(model.max_len)), device=device)
    return TrainRows(data.train, users, device=device)


class DenseRows:
    """Dense per-user input vectors (e.g. SDRM's latents) with the ``TrainRows`` interface."""

    def __init__(self, x: torch.Tensor):
        self.x = x
        self.users = np.arange(len(x))

    def __len__(self) -> int:
        return len(self.x)

    def batch(self, idx: np.ndarray) -> Batch:
        return Batch(users=torch.from_numpy(self.users[idx]), x=self.x[idx])

    def n_examples(self, unit: str) -> int:
        self._user_only(unit)
        return len(self)

    def examples(self, unit: str, idx: np.ndarray) -> Batch:
        self._user_only(unit)
        return self.batch(idx)

    @staticmethod
    def _user_only(unit: str) -> None:
        _check_unit(unit)
        if unit != "user":
            raise ConfigError("model.sampling: dense input vectors have no interactions to train on; use 'user'")


def make_optimizer(model: Recommender, optim_cfg: Any) -> torch.optim.Optimizer:
    lr, wd = float(optim_cfg.lr), float(optim_cfg.get("weight_decay", 0.0))
    if lr <= 0:
        raise ConfigError(f"model.optim.lr: must be positive, got {lr}")
    if wd < 0:
        raise ConfigError(f"model.optim.weight_decay: must be non-negative, got {wd}")
    # fused: one kernel per parameter for the whole AdamW update (torch's CPU default is a loop of ~8
    # elementwise passes per parameter, a fifth of a DiffRec epoch on ML-1M); the same update rule.
    return torch.optim.AdamW(model.optimizer_groups(lr, wd), lr=lr, weight_decay=wd, fused=True)


def train_epoch(model: Recommender, optimizer: torch.optim.Optimizer, rows: TrainRows, batch_size: int,
                rng: np.random.Generator, prox: tuple[float, dict[str, torch.Tensor]] | None = None) -> dict[str, float]:
    """One shuffled pass over the ``model.train_unit`` examples of ``rows``; returns the mean
    per-example loss and the example count (users or interactions).

    ``prox`` = (mu, global parameters) adds FedProx's proximal term mu/2 * ||w - w_global||^2.
    """
    if batch_size < 1:
        raise ConfigError(f"model.optim.batch_size: must be >= 1, got {batch_size}")
    model.train()
    model.on_epoch_start()
    unit = model.train_unit
    order = rng.permutation(rows.n_examples(unit))
    total, n = 0.0, 0
    named = dict(model.named_parameters()) if prox else {}
    for start in range(0, len(order), batch_size):
        batch = rows.examples(unit, order[start:start + batch_size])
        with autocast(model):  # bf16 matrix products under precision=bf16; the loss comes back fp32
            per_example = model.loss(batch).float()
        loss = per_example.mean()
        if prox and prox[0] > 0:
            mu, ref = prox
            loss = loss + 0.5 * mu * sum(((named[k] - v) ** 2).sum() for k, v in ref.items())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += float(per_example.detach().sum())
        n += len(per_example)
    model.on_epoch_end()
    return {"loss": total / max(n, 1), "examples": n}
