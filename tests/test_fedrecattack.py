"""FedRecAttack's setting (Rong et al., ICDE 2022) on tiny synthetic data: the client loss (BPR-MF
``sampling=all_pairs``), passes over all clients in batches (``federation.sampling=permutation``), the
injected malicious clients and the attack's crafted uploads (attacks/fedrecattack.py)."""

from __future__ import annotations

import numpy as np
import torch
from omegaconf import OmegaConf

from fedrec.models.base import Batch, DataShape
from fedrec.models.bpr import BPRConfig, BPRMF


def test_all_pairs_loss_is_the_official_client_loss():
    """Sum over every positive once with its negative, plus 0.5 reg (||u||^2 + sum of the pairs' rows^2)."""
    torch.manual_seed(0)
    model = BPRMF(BPRConfig(embedding_size=4, sampling="all_pairs", reg_weight=0.1, init_std=0.3), DataShape(3, 9))
    x = torch.zeros(3, 9)
    x[0, [1, 4, 5]] = 1
    x[1, [0]] = 1  # user 2: an empty row (an injected client): loss 0
    from fedrec.rng import UserRandom

    rand = model.draw_randomness(Batch(users=torch.arange(3), x=x), UserRandom(0, 1, np.arange(3), 0, "cpu"))
    assert rand["pos"].shape == (3, 3)
    got = model.loss(Batch(users=torch.arange(3), x=x, rand=rand))
    u, it = model.user_emb.weight.detach(), model.item_emb.weight.detach()
    for b in range(3):
        pos = torch.nonzero(x[b]).flatten()
        neg = rand["neg"][b, :len(pos)]
        assert not (x[b, neg] > 0).any()
        d = (u[b] * (it[pos] - it[neg])).sum(-1)
        want = -torch.nn.functional.logsigmoid(d).sum()
        if len(pos):
            want = want + 0.05 * (u[b].pow(2).sum() + it[pos].pow(2).sum() + it[neg].pow(2).sum())
        torch.testing.assert_close(got[b], want, rtol=1e-5, atol=1e-6)
    assert float(got[2].detach()) == 0.0
    assert torch.allclose(model.item_emb.weight.std(), torch.tensor(0.3), rtol=0.5)


def test_permutation_sampling_visits_every_user_once_per_pass():
    from fedrec.federated.device_node import permutation_round, rounds_per_pass

    n, m = 23, 5
    assert rounds_per_pass(n, m) == 5
    for p in range(3):
        masks = [permutation_round(7, p * 5 + k + 1, n, m) for k in range(5)]
        assert [int(mk.sum()) for mk in masks] == [5, 5, 5, 5, 3]
        np.testing.assert_array_equal(np.sum(masks, axis=0), np.ones(n))  # each user exactly once per pass
    first = [np.flatnonzero(permutation_round(7, k + 1, n, m)) for k in range(5)]
    second = [np.flatnonzero(permutation_round(7, 5 + k + 1, n, m)) for k in range(5)]
    assert any(not np.array_equal(a, b) for a, b in zip(first, second))  # a fresh shuffle per pass
    np.testing.assert_array_equal(permutation_round(7, 3, n, m), permutation_round(7, 3, n, m))
