"""An official-structure DiffRec loop, kept only as the baseline of ``bench diffrec-speed``.

It re-creates the *structure* of the official implementation's ``main.py`` (github.com/YiyanXu/DiffRec)
so that speed ratios are measured side by side on the same machine: a DataLoader over dense rows
(4 workers, pinned memory, as official),
the per-example Python loop that updates the timestep-loss history, a reverse process that builds a
timestep tensor per step and runs separately for validation and test, and per-user Python metric
lists (``computeTopNAccuracy``). The arithmetic (denoiser, schedule) is fedrec's, so both sides
compute the same model; only the loop structure differs. Like the official code, batches are moved
to the model's device (``.to(device)``) after the loader, so the baseline also runs on a GPU.
Not used by any run.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from fedrec.models.diffrec import DiffRec


def official_style_epoch(model: DiffRec, optimizer, train_dense: torch.Tensor, batch_size: int,
                         lt_history: torch.Tensor, lt_count: torch.Tensor) -> float:
    diff = model.diffusion
    device = lt_history.device
    # The official loader: 4 worker processes and pinned memory, re-created every epoch.
    loader = DataLoader(TensorDataset(train_dense), batch_size=batch_size, shuffle=True, num_workers=4,
                        pin_memory=True, worker_init_fn=lambda worker_id: np.random.seed(1 + worker_id))
    model.train()
    total = 0.0
    for (batch,) in loader:
        batch = batch.to(device)
        optimizer.zero_grad()
        n = batch.shape[0]
        if bool((lt_count == 10).all()):
            lt = torch.sqrt(torch.mean(lt_history ** 2, dim=-1))
            p = lt / lt.sum() * (1 - 0.001) + 0.001 / len(lt)
            ts = torch.multinomial(p, n, replacement=True)
            pt = p.gather(0, ts) * len(p)
        else:
            ts = torch.randint(0, diff.steps, (n,), device=device).long()
            pt = torch.ones_like(ts).float()
        noise = torch.randn_like(batch)
        x_t = diff.q_sample(batch, ts, noise)
        out = model.denoiser(x_t, ts)
        mse = ((batch - out) ** 2).mean(dim=-1)
        weight = diff.snr[(ts - 1).clamp(min=0)] - diff.snr[ts]
        weight = torch.where(ts == 0, torch.ones_like(weight), weight)
        loss = weight * mse
        for t, value in zip(ts, loss):  # the official per-example history update
            if lt_count[t] == 10:
                old = lt_history.clone()
                lt_history[t, :-1] = old[t, 1:]
                lt_history[t, -1] = value.detach()
            else:
                lt_history[t, lt_count[t]] = value.detach()
                lt_count[t] += 1
        loss = (loss / pt).mean()
        total += float(loss.detach())
        loss.backward()
        optimizer.step()
    return total


def _p_sample(model: DiffRec, x: torch.Tensor) -> torch.Tensor:
    diff = model.diffusion
    for i in list(range(diff.steps))[::-1]:
        t = torch.tensor([i] * x.shape[0]).to(x.device)
        out = model.denoiser(x, t)
        x = diff.posterior_coef1[t].unsqueeze(-1) * out + diff.posterior_coef2[t].unsqueeze(-1) * x
    return x


def _compute_topn(ground_truth: list[list[int]], predicted: list[list[int]], top_n: list[int]) -> dict:
    out = {}
    for k in top_n:
        s_prec = s_rec = s_ndcg = s_mrr = 0.0
        users = 0
        for gt, pred in zip(ground_truth, predicted):
            if not gt:
                continue
            users += 1
            hits, dcg, idcg, mrr_flag = 0, 0.0, 0.0, True
            for j in range(k):
                if pred[j] in gt:
                    dcg += 1.0 / math.log2(j + 2)
                    if mrr_flag:
                        s_mrr += 1.0 / (j + 1.0)
                        mrr_flag = False
                    hits += 1
                if len(gt) > j:
                    idcg += 1.0 / math.log2(j + 2)
            s_prec += hits / k
            s_rec += hits / len(gt)
            s_ndcg += dcg / idcg
        out[k] = {"precision": s_prec / users, "recall": s_rec / users, "ndcg": s_ndcg / users, "mrr": s_mrr / users}
    return out


@torch.no_grad()
def official_style_evaluate(model: DiffRec, data, top_n: list[int], batch_size: int = 400) -> dict:
    """Validation and test as the official loop does them: two reverse passes, Python metrics."""
    model.eval()
    device = next(model.parameters()).device
    train_dense = torch.from_numpy(data.train.toarray().astype(np.float32))
    results = {}
    for split, mask in (("valid", data.train), ("test", data.train + data.valid)):
        target = getattr(data, split)
        target_items = [target[i].nonzero()[1].tolist() for i in range(data.n_users)]
        predicted: list[list[int]] = []
        loader = DataLoader(TensorDataset(train_dense), batch_size=batch_size, shuffle=False)
        for b, (batch,) in enumerate(loader):
            his = mask[b * batch_size: b * batch_size + len(batch)]
            pred = _p_sample(model, batch.to(device))
            pred[his.nonzero()] = -np.inf
            predicted.extend(torch.topk(pred, top_n[-1]).indices.tolist())
        results[split] = _compute_topn(target_items, predicted, top_n)
    return results
