"""Score an official GiffCF checkpoint with fedrec's GiffCF and fedrec's evaluation.

The official repository (github.com/VinciZhu/GiffCF) ships trained weights, ``checkpoints/legacy/
movielens.keras`` (the paper's) and ``checkpoints/movielens.keras`` (retrained), Keras ``save_weights``
HDF5 files. This loads one into :class:`fedrec.models.giffcf.GiffCF` built on the same split and
prints the test metrics, which the official README lists (legacy: Recall@20 0.1947, NDCG@20 0.1221):
equal figures mean fedrec's graph, filters, denoiser, sampler and metric are the official ones.

    python -m simulations.giffcf_official /path/to/GiffCF/checkpoints/legacy/movielens.keras \
        [dataset=diffrec-ml-1m-clean] [other overrides]

With ``train.epochs=N`` (N > 0) it first trains N epochs from those weights with fedrec's trainer
(Adam at ``model.optim``, shuffled batches), printing each epoch's mean loss: started from the
official code's initial weights (``model.save_weights`` after its ``seed_everything``/``load_model``)
this is a side-by-side of the training curves from the same initialisation. Without ``train.epochs``
it only scores; every ``train.eval_every`` epochs of training it prints the validation and test
figures.

Needs ``h5py`` (``pip install -e .[official]``).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

from fedrec.errors import ConfigError

#: official Keras Dense layer (by creation order, whatever group the file nests it in) -> fedrec module
KERAS_DENSE_TO_FEDREC = {
    "dense": "denoiser.t_embed1.hidden", "dense_1": "denoiser.t_embed1.out",
    "dense_2": "denoiser.t_embed2.hidden", "dense_3": "denoiser.t_embed2.out",
    "dense_4": "denoiser.embed_mixer.hidden", "dense_5": "denoiser.embed_mixer.out",
    "dense_6": "denoiser.score_mixer.hidden", "dense_7": "denoiser.score_mixer.out",
}


def official_state(path: str | Path) -> dict[str, torch.Tensor]:
    """fedrec GiffCF parameters from an official HDF5 weights file (Keras kernels transposed).

    The legacy and the retrained checkpoints nest the mixers' Dense layers differently
    (``denoiser/dense_4`` vs ``denoiser/simple_mixer/dense_4``); the layer names are the same. A
    ``model.save_weights("x.weights.h5")`` file of the official code names them by attribute instead
    (``denoiser/embed_mixer/hidden/vars/0``), which are fedrec's names.
    """
    try:
        import h5py
    except ImportError:
        raise ConfigError("simulations.giffcf_official: needs h5py (pip install h5py)") from None
    arrays: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: arrays.__setitem__(name, np.asarray(obj)) if hasattr(obj, "shape") else None)
    state = {}
    for name, value in arrays.items():
        parts = name.split("/")
        if parts[-2:-1] == ["vars"]:  # Keras 3 ``.weights.h5`` layout: denoiser/<attribute>/<layer>/vars/<i>
            if parts[:-2] == ["denoiser"]:
                state["denoiser.item_embed"] = torch.from_numpy(value)
            elif parts[0] == "denoiser" and len(parts) == 5:
                module = f"denoiser.{parts[1]}.{parts[2]}"
                if parts[-1] == "0":
                    state[f"{module}.weight"] = torch.from_numpy(value).T.contiguous()
                else:
                    state[f"{module}.bias"] = torch.from_numpy(value)
        elif parts[-1] == "item_embed:0":
            state["denoiser.item_embed"] = torch.from_numpy(value)
        elif len(parts) >= 2 and parts[-2] in KERAS_DENSE_TO_FEDREC:
            module = KERAS_DENSE_TO_FEDREC[parts[-2]]
            if parts[-1] == "kernel:0":
                state[f"{module}.weight"] = torch.from_numpy(value).T.contiguous()
            elif parts[-1] == "bias:0":
                state[f"{module}.bias"] = torch.from_numpy(value)
    return state


def main(argv: list[str]) -> dict:
    if not argv or "=" in argv[0]:
        raise SystemExit(__doc__)
    from hydra import compose, initialize_config_dir

    from fedrec.data import load_dataset
    from fedrec.eval import evaluate_model
    from fedrec.models import build_model, data_shape

    conf = Path(__file__).resolve().parents[1] / "conf"
    overrides = ["dataset=diffrec-ml-1m-clean", "model=giffcf", "federation=none", "dataset.item_graph=co_interaction",
                 "train.epochs=0", *argv[1:]]
    with initialize_config_dir(str(conf), version_base=None):
        cfg = compose("config", overrides=overrides)
    data = load_dataset(cfg.dataset, int(cfg.seed))
    t0 = time.perf_counter()
    model = build_model(cfg.model, data_shape(data, seed=int(cfg.seed)))
    build_s = time.perf_counter() - t0
    model.load_state_dict(official_state(argv[0]), strict=True)  # every parameter, nothing else
    if int(cfg.train.epochs) > 0:
        from fedrec.train import make_optimizer, model_rows, train_epoch

        torch.manual_seed(int(cfg.seed))
        optimizer = make_optimizer(model, cfg.model.optim)
        rows = model_rows(model, data, np.arange(data.n_users))
        rng = np.random.default_rng(int(cfg.seed))
        for epoch in range(1, int(cfg.train.epochs) + 1):
            t0 = time.perf_counter()
            stats = train_epoch(model, optimizer, rows, int(cfg.model.optim.batch_size), rng)
            print(f"epoch {epoch} loss {stats['loss']:.4f} ({time.perf_counter() - t0:.1f}s)", flush=True)
            if epoch % int(cfg.train.eval_every) == 0 and epoch < int(cfg.train.epochs):
                mid = evaluate_model(model, data, list(cfg.eval.ks), int(cfg.eval.batch_size))
                print(f"  epoch {epoch} valid capped_recall@20 {mid['valid']['capped_recall@20']:.4f} test "
                      f"capped_recall@20 {mid['test']['capped_recall@20']:.4f} ndcg@20 {mid['test']['ndcg@20']:.4f}",
                      flush=True)
    t0 = time.perf_counter()
    res = evaluate_model(model, data, list(cfg.eval.ks), int(cfg.eval.batch_size))
    eval_s = time.perf_counter() - t0
    print(f"checkpoint {argv[0]}  build {build_s:.1f}s  eval {eval_s:.1f}s  lambda_1 {float(model.top_eigenvalue):.6f}")
    for split in ("valid", "test"):
        print(split, " ".join(f"{m}@{k} {res[split][f'{m}@{k}']:.4f}" for m in ("capped_recall", "recall", "ndcg", "mrr")
                              for k in cfg.eval.ks))
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
