"""Shared fixtures: composed configs for tiny runs, and the real-data location; tests marked ``gpu``
are skipped where torch sees no CUDA GPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("FEDREC_DATA", REPO.parent / "shared" / "data"))

TINY = [
    "dataset.n_users=60", "dataset.n_items=50", "dataset.n_clusters=3", "dataset.mean_interactions=12",
    "model.optim.batch_size=16", "eval.batch_size=64",
    # Federated tiny runs use the in-process transport (the same apps, no Ray start-up of 15-20 s each);
    # the tests of the Ray path itself pass federation.backend=ray, and
    # tests/test_federation.py::test_inprocess_backend_matches_ray shows both give the same numbers.
    "++federation.backend=inprocess",
]
TINY_MODEL = {
    "diffrec": ["model.dims=[16,32]", "model.steps=5"],
    "ldiffrec": ["model.in_dims=[8]", "model.mlp_dims=[8]", "model.steps=5"],
    "bpr": ["model.embedding_size=8"],
    "multvae": ["model.hidden_dims=[16]", "model.latent_dim=8"],
    "sasrec_lite": ["model.hidden_dim=16", "model.max_len=10"],
    "lightgcn": ["model.embedding_size=8"],
    "pop": [], "itemknn": ["model.k=10"], "ease": ["model.l2=10.0"], "gfcf": ["model.factor_dim=8"],
    "turbocf": [], "bspm": ["model.factor_dim=8"],
    "giffcf": ["model.embed_dim=8", "dataset.item_graph=co_interaction"],  # GiffCF needs the co-interaction graph
    "tdiffrec": ["model.dims=[16,32]", "model.steps=5"],
    "ltdiffrec": ["model.in_dims=[8]", "model.mlp_dims=[8]", "model.steps=5"],
    "cfgdiffrec": ["model.dims=[16,32]", "model.steps=5"],
    "codigem": ["model.hidden=16", "model.depth=1"],
    "recfusion": ["model.hidden=16", "model.depth=1"],
    "cfdiff": ["model.latent=16", "model.steps=5", "model.d_model=8", "model.num_heads=2"],

    "gdiff": ["model.hidden_dims=[16]", "dataset.item_graph=co_interaction"],  # the private transition graph
    "diffkg": ["model.embedding_size=8", "model.denoiser_dims=[16]"],  # the synthetic genres are the KG

    "ddrm": ["model.embedding_size=8", "model.dims=[16]", "model.steps=5", "model.n_samples_per_user=4"],

    # rating models need the synthetic ratings (dataset.ratings=true)
    "dgrm": ["model.dims=[16]", "model.critic_dims=[16]", "model.steps=5", "dataset.ratings=true"],
    "edgerec": ["model.n_blocks=1", "model.channels=2", "model.heads=2", "model.dim_head=4", "model.patch_users=8",
                "model.patch_items=8", "model.steps=20", "model.sampling_steps=2", "model.user_features=[cluster]",
                "model.user_id_dim=8", "model.item_id_dim=8", "dataset.ratings=true"],

    "diffairec": ["model.dims=[16,32]", "model.steps=5", "model.group_tokens=2"],
    "d3rec": ["model.dims=[16,8]", "model.steps=3", "model.optim.lr=0.001"],
}


@pytest.fixture
def tiny_cfg(tmp_path):
    from fedrec.config import compose

    def make(*overrides: str, model: str = "diffrec"):
        return compose([f"model={model}", *TINY, *TINY_MODEL[model], f"paths.output_root={tmp_path}", *overrides])

    return make


def need_shared(sub: str) -> Path:
    path = SHARED_DATA / sub
    if not path.exists():
        pytest.skip(f"real data {path} is absent (set FEDREC_DATA to the folder holding {sub})")
    return path


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
