"""Drive the official DiffRec code (github.com/YiyanXu/DiffRec, ``DiffRec/``) one step at a time, for
``python -m simulations.bench diffrec-speed bench.official=PATH``.

``python -m simulations.official_diffrec PATH DATA_DIR THREADS`` imports the official modules from
``PATH/DiffRec`` (``models.gaussian_diffusion``, ``models.DNN``, ``data_utils``, ``evaluate_utils``;
PATH is a local checkout, never part of fedrec), builds the model, diffusion and optimiser exactly as
the official ``main.py`` does with the ML-1M clean hyperparameters of its README (lr 1e-3, weight
decay 0, batch 400, dims [200,600], emb 10, T = 40, noise scale 0.005, min 0.005, max 0.01,
reweight on, x0 prediction, no sampling noise, sampling steps 0), then answers commands on stdin:

``epoch [THREADS]``
    one training epoch as main.py's loop runs it (its DataLoader: 4 workers, pinned memory,
    shuffled; ``diffusion.training_losses``; AdamW), timed; prints ``{"epoch_s": ...}``.
``eval [THREADS]``
    main.py's validation and test evaluation (its ``evaluate``: ``diffusion.p_sample`` over the
    unshuffled training rows, masking, top-100, ``evaluate_utils.computeTopNAccuracy``), timed;
    prints ``{"eval_s": ..., "test_recall20": ..., "test_ndcg20": ...}``.
``quit``

THREADS (default: the command line's) sets ``torch.set_num_threads`` before the command.

Each answer carries wall seconds and CPU seconds (this process's threads plus the loader's
worker processes). One JSON line per command on stdout (the official code's own prints go to stderr). The code
below is main.py's, with two changes: scipy's removed ``.A`` is ``.toarray()`` here, and the
official ``evaluate`` closure (which reads main.py's globals) is inlined with the same statements.
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import redirect_stdout


def cpu_seconds() -> float:
    """CPU seconds of this process (all threads) plus its finished children (the loader's worker processes,
    re-created and joined every epoch): the work done, which a loaded machine inflates far less than the wall
    clock."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main(argv: list[str]) -> int:
    path, data_dir, threads = argv[0], argv[1], int(argv[2])
    import numpy as np
    import torch
    from torch.utils.data import DataLoader

    torch.set_num_threads(threads)
    sys.path.insert(0, os.path.join(path, "DiffRec"))
    with redirect_stdout(sys.stderr):
        import data_utils
        import evaluate_utils
        import models.gaussian_diffusion as gd
        from models.DNN import DNN

        torch.manual_seed(1)
        np.random.seed(1)
        batch_size, top_n = 400, [10, 20, 50, 100]
        train_data, valid_y_data, test_y_data, n_user, n_item = data_utils.data_load(
            os.path.join(data_dir, "train_list.npy"), os.path.join(data_dir, "valid_list.npy"),
            os.path.join(data_dir, "test_list.npy"))
        train_dataset = data_utils.DataDiffusion(torch.FloatTensor(train_data.toarray()))
        train_loader = DataLoader(train_dataset, batch_size=batch_size, pin_memory=True, shuffle=True,
                                  num_workers=4, worker_init_fn=lambda worker_id: np.random.seed(1 + worker_id))
        test_loader = DataLoader(train_dataset, batch_size=batch_size, shuffle=False)
        mask_tv = train_data + valid_y_data
        device = torch.device("cpu")
        diffusion = gd.GaussianDiffusion(gd.ModelMeanType.START_X, "linear-var", 0.005, 0.005, 0.01, 40,
                                         device).to(device)
        out_dims = [200, 600] + [n_item]
        model = DNN(out_dims[::-1], out_dims, 10, time_type="cat", norm=False).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)

    def evaluate(data_loader, data_te, mask_his):
        model.eval()
        e_idxlist = list(range(mask_his.shape[0]))
        e_n = mask_his.shape[0]
        predict_items, target_items = [], []
        for i in range(e_n):
            target_items.append(data_te[i, :].nonzero()[1].tolist())
        with torch.no_grad():
            for batch_idx, batch in enumerate(data_loader):
                his_data = mask_his[e_idxlist[batch_idx * batch_size:batch_idx * batch_size + len(batch)]]
                batch = batch.to(device)
                prediction = diffusion.p_sample(model, batch, 0, False)
                prediction[his_data.nonzero()] = -np.inf
                _, indices = torch.topk(prediction, top_n[-1])
                predict_items.extend(indices.cpu().numpy().tolist())
        return evaluate_utils.computeTopNAccuracy(target_items, predict_items, top_n)

    def epoch():
        model.train()
        total_loss = 0.0
        for batch in train_loader:
            batch = batch.to(device)
            optimizer.zero_grad()
            losses = diffusion.training_losses(model, batch, True)
            loss = losses["loss"].mean()
            total_loss += loss  # as main.py (the graph-carrying sum)
            loss.backward()
            optimizer.step()
        return float(total_loss.detach()) if torch.is_tensor(total_loss) else float(total_loss)

    for line in sys.stdin:
        cmd, *rest = line.split() or [""]
        if cmd == "quit":
            break
        torch.set_num_threads(int(rest[0]) if rest else threads)
        with redirect_stdout(sys.stderr):
            t0, c0 = time.perf_counter(), cpu_seconds()
            if cmd == "epoch":
                loss = epoch()
                out = {"epoch_s": time.perf_counter() - t0, "epoch_cpu_s": cpu_seconds() - c0, "loss": loss}
            elif cmd == "eval":
                valid = evaluate(test_loader, valid_y_data, train_data)
                test = evaluate(test_loader, test_y_data, mask_tv)
                out = {"eval_s": time.perf_counter() - t0, "eval_cpu_s": cpu_seconds() - c0,
                       "valid_recall20": valid[1][1], "test_recall20": test[1][1], "test_ndcg20": test[2][1]}
            else:
                out = {"error": f"unknown command {cmd!r}"}
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
