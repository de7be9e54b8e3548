"""Privacy audits: membership inference against synthetic data and against trained models.

Every audit reduces to two score sets — higher means "more likely a member" — for member and
non-member users, summarised as ROC AUC, the attack advantage max(TPR - FPR) and the TPR at 1% FPR.

* Synthetic data: distance to closest record (DCR) — a real user whose row has a near copy among the
  synthetic users is flagged; and the nearest-neighbour distance ratio (NNDR: closest / second
  closest synthetic distance). Distances are Jaccard distances between binary rows, computed with
  sparse matrix products (no loop over users).
* Models: the model's own per-user loss (lower loss = member), averaged over ``repeats`` draws for
  diffusion models whose loss is random.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch


def attack_metrics(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> dict[str, float]:
    s = np.concatenate([member_scores, nonmember_scores]).astype(np.float64)
    y = np.concatenate([np.ones(len(member_scores)), np.zeros(len(nonmember_scores))])
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    # ROC over distinct thresholds (ties share a point)
    distinct = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tps = np.cumsum(y)[distinct]
    fps = np.cumsum(1 - y)[distinct]
    tpr = np.r_[0.0, tps / max(y.sum(), 1)]
    fpr = np.r_[0.0, fps / max((1 - y).sum(), 1)]
    auc = float(np.trapezoid(tpr, fpr))
    ok = fpr <= 0.01
    return {"auc": auc, "advantage": float(np.max(tpr - fpr)), "tpr_at_1pct_fpr": float(tpr[ok].max())}


def jaccard_distances(a: sp.csr_matrix, b: sp.csr_matrix, k: int = 2, chunk: int = 2048) -> np.ndarray:
    """(len(a), k) smallest Jaccard distances from each row of ``a`` to the rows of ``b``, ascending."""
    a = sp.csr_matrix(a, dtype=np.float32)
    b = sp.csr_matrix(b, dtype=np.float32)
    na = np.asarray(a.sum(1)).ravel()
    nb = np.asarray(b.sum(1)).ravel()
    out = np.empty((a.shape[0], k))
    bt = b.T.tocsc()
    for start in range(0, a.shape[0], chunk):
        inter = (a[start:start + chunk] @ bt).toarray()
        union = na[start:start + chunk, None] + nb[None, :] - inter
        d = 1.0 - inter / np.maximum(union, 1e-12)
        out[start:start + chunk] = np.sort(np.partition(d, k - 1, axis=1)[:, :k], axis=1)
    return out


def synthetic_mia(real: sp.csr_matrix, members: np.ndarray, nonmembers: np.ndarray,
                  synthetic: sp.csr_matrix) -> dict[str, dict[str, float]]:
    """Distance-based membership inference of real users against a synthetic release."""
    d_m = jaccard_distances(real[members], synthetic)
    d_n = jaccard_distances(real[nonmembers], synthetic)
    nndr = lambda d: d[:, 0] / np.maximum(d[:, 1], 1e-12)  # noqa: E731
    return {"dcr": attack_metrics(-d_m[:, 0], -d_n[:, 0]), "nndr": attack_metrics(-nndr(d_m), -nndr(d_n)),
            "dcr_median_members": float(np.median(d_m[:, 0])), "dcr_median_nonmembers": float(np.median(d_n[:, 0]))}


@torch.no_grad()
def loss_mia(model, rows: sp.csr_matrix, members: np.ndarray, nonmembers: np.ndarray,
             repeats: int = 8, batch_size: int = 512) -> dict[str, float]:
    """Loss-based membership inference against a trained model (lower loss = member)."""
    import copy

    from fedrec.models.base import Batch

    model = copy.deepcopy(model)  # querying the training loss may touch model state (DiffRec's history)
    model.train()  # the training loss, as the attacker would query it
    def losses(users):
        out = np.zeros(len(users))
        for _ in range(repeats):
            for s in range(0, len(users), batch_size):
                u = users[s:s + batch_size]
                x = torch.from_numpy(rows[u].toarray().astype(np.float32))
                out[s:s + batch_size] += model.loss(Batch(users=torch.as_tensor(u), x=x)).numpy()
        return out / repeats
    return attack_metrics(-losses(members), -losses(nonmembers))
