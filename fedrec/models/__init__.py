"""The recommender zoo and its builder: ``build_model(cfg.model, shape)``.

``conf/model/<name>.yaml`` holds ``name``, the model's hyperparameters (the fields of its config
dataclass) and an ``optim`` block (lr, weight_decay, batch_size) read by trainers.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from fedrec.errors import ConfigError
from fedrec.models.base import Batch, DataShape, Recommender

# name -> (module path, class name, config class name); imported lazily to keep start-up fast.
REGISTRY: dict[str, tuple[str, str, str]] = {
    "diffrec": ("fedrec.models.diffrec", "DiffRec", "DiffRecConfig"),
    "ldiffrec": ("fedrec.models.ldiffrec", "LDiffRec", "LDiffRecConfig"),
    "bpr": ("fedrec.models.bpr", "BPRMF", "BPRConfig"),
    "vbpr": ("fedrec.models.vbpr", "VBPR", "VBPRConfig"),
    "multvae": ("fedrec.models.multvae", "MultVAE", "MultVAEConfig"),
    "sasrec_lite": ("fedrec.models.sasrec", "SASRecLite", "SASRecConfig"),
    # baselines (issue 13): training-free item-item models and LightGCN
    "pop": ("fedrec.models.pop", "Pop", "PopConfig"),
    "itemknn": ("fedrec.models.itemknn", "ItemKNN", "ItemKNNConfig"),
    "ease": ("fedrec.models.ease", "EASE", "EASEConfig"),
    "gfcf": ("fedrec.models.gfcf", "GFCF", "GFCFConfig"),
    "turbocf": ("fedrec.models.turbocf", "TurboCF", "TurboCFConfig"),
    "bspm": ("fedrec.models.bspm", "BSPM", "BSPMConfig"),
    "lightgcn": ("fedrec.models.lightgcn", "LightGCN", "LightGCNConfig"),
    "giffcf": ("fedrec.models.giffcf", "GiffCF", "GiffCFConfig"),
    # DiffRec variants (issue 13): temporal reweighting, classifier-free guidance
    "tdiffrec": ("fedrec.models.tdiffrec", "TDiffRec", "TDiffRecConfig"),
    "ltdiffrec": ("fedrec.models.ltdiffrec", "LTDiffRec", "LTDiffRecConfig"),
    "cfgdiffrec": ("fedrec.models.cfgdiffrec", "CFGDiffRec", "CFGDiffRecConfig"),
    # DDGM recommenders and the multi-hop guided DiffRec (issue 13)
    "codigem": ("fedrec.models.codigem", "CODIGEM", "CODIGEMConfig"),
    "recfusion": ("fedrec.models.recfusion", "RecFusion", "RecFusionConfig"),
    "cfdiff": ("fedrec.models.cfdiff", "CFDiff", "CFDiffConfig"),

    # item-graph diffusion recommenders (issue 13)
    "gdiff": ("fedrec.models.gdiff", "GDiff", "GDiffConfig"),
    "diffkg": ("fedrec.models.diffkg", "DiffKG", "DiffKGConfig"),

    # diffusion over a CF backbone's embeddings (issue 13)
    "ddrm": ("fedrec.models.ddrm", "DDRM", "DDRMConfig"),

    # explicit ratings (issue 13): models whose Batch.x is the user's rating row (dataset.ratings=true)
    "dgrm": ("fedrec.models.dgrm", "DGRM", "DGRMConfig"),
    "edgerec": ("fedrec.models.edgerec", "EDGERec", "EDGERecConfig"),
    # fairness / diversity (issue 13)
    "diffairec": ("fedrec.models.diffairec", "DifFaiRec", "DifFaiRecConfig"),
    "d3rec": ("fedrec.models.d3rec", "D3Rec", "D3RecConfig"),
}

NON_MODEL_KEYS = {"name", "optim"}


def _plain(cfg: Any) -> dict:
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(cfg):
            return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except ImportError:  # pragma: no cover
        pass
    return dict(cfg)


def model_config(cfg: Any):
    """The typed config dataclass for ``cfg`` (a DictConfig or dict with ``name``)."""
    raw = _plain(cfg)
    name = raw.get("name")
    if name not in REGISTRY:
        raise ConfigError(f"model.name: unknown model {name!r}; expected one of {sorted(REGISTRY)}")
    module, _, cfg_cls = REGISTRY[name]
    cls = getattr(__import__(module, fromlist=[cfg_cls]), cfg_cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in raw.items() if k not in NON_MODEL_KEYS}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise ConfigError(f"model.{unknown[0]}: unknown key for model {name!r}; known: {sorted(fields)}")
    return cls(**kwargs)


def check_dataset_needs(cfg: Any) -> None:
    """What the run's model needs from the dataset config, checked before any file is read.

    A model config class may name the item graph it smooths over (``ITEM_GRAPH``, GiffCF:
    "co_interaction"); the run must ask the dataset for it (``dataset.item_graph``). A model that learns
    from explicit ratings (``RATINGS = True``: DGRM, EDGE-Rec) needs ``dataset.ratings=true`` on a source
    kind with a rating column (DiffRec's .npy splits and sequence files have none). It may also say
    why it cannot run federated (``FEDERATION_REFUSAL``) or under DP-SGD (``DPSGD_REFUSAL``): a
    one-line ConfigError names the mode and the reason.
    """
    name = _plain(cfg.model).get("name")
    if name not in REGISTRY:
        return  # model_config / build_model name the bad model
    module, _, cfg_cls = REGISTRY[name]
    config_class = getattr(__import__(module, fromlist=[cfg_cls]), cfg_cls)
    mode = str(cfg.get("federation", {}).get("mode", "none"))
    refusal = getattr(config_class, "FEDERATION_REFUSAL", None)
    if refusal and mode != "none":
        raise ConfigError(f"federation={mode}: model {name!r} {refusal}; use federation=none")
    refusal = getattr(config_class, "DPSGD_REFUSAL", None)
    if refusal and str(cfg.get("privacy", {}).get("name", "none")) == "dpsgd":
        raise ConfigError(f"privacy=dpsgd: model {name!r} {refusal}")
    dataset = cfg.get("dataset", {})
    if getattr(config_class, "RATINGS", False):
        from fedrec.data.loaders import RATING_KINDS

        kind = dataset.get("kind", None)
        if kind not in RATING_KINDS:
            raise ConfigError(f"dataset.ratings: model {name!r} learns from explicit ratings, but dataset "
                              f"{dataset.get('name', None)!r} (kind {kind!r}) has no rating values; use a source with a "
                              f"rating column ({', '.join(RATING_KINDS)}), e.g. dataset=ml-100k-ratings")
        if dataset.get("ratings", None) is not True:
            raise ConfigError(f"dataset.ratings: model {name!r} learns from explicit ratings; set dataset.ratings=true "
                              f"(got {dataset.get('ratings', None)!r}), e.g. dataset=ml-100k-ratings")
    need = getattr(config_class, "ITEM_GRAPH", None)
    have = dataset.get("item_graph", None)
    if need is not None and str(have) != need:
        raise ConfigError(f"dataset.item_graph: model {name!r} smooths over the {need} item graph; set "
                          f"dataset.item_graph={need} (got {have!r}; it is refused under DP: the graph is private)")


def build_model(cfg: Any, shape: DataShape) -> Recommender:
    mcfg = model_config(cfg)
    name = _plain(cfg)["name"]
    module, cls_name, _ = REGISTRY[name]
    cls = getattr(__import__(module, fromlist=[cls_name]), cls_name)
    return cls(mcfg, shape)


def svd_item_embeddings(matrix, svd_dim: int = 64, seed: int = 0) -> np.ndarray | None:
    """Item embeddings from a truncated SVD of a user x item matrix (item side scaled by the singular values)."""
    from scipy.sparse.linalg import svds

    k = int(min(svd_dim, min(matrix.shape) - 1))
    if k < 1:
        return None
    v0 = np.random.default_rng(seed).standard_normal(min(matrix.shape))
    _, s, vt = svds(matrix.astype(np.float64), k=k, v0=v0)
    return (vt.T * s).astype(np.float32)


def data_shape(data, svd_dim: int = 64, seed: int = 0) -> DataShape:
    """The model-visible shape of an ``Interactions``.

    Item embeddings: the dataset's own (DiffRec's LightGCN ``item_emb.npy``) when present,
    otherwise a truncated SVD of the training matrix — a documented stand-in so that L-DiffRec's
    item clustering works on every dataset. Item side data: the dataset's public ``item_side``;
    with ``dataset.item_graph=co_interaction`` also ``item_graph_fn``, the training co-occurrence
    graph built on first use (private; refused under DP by :mod:`fedrec.privacy.public_only`).
    """
    def svd_embeddings() -> np.ndarray | None:
        if getattr(data, "_svd_item_emb", None) is None:
            data._svd_item_emb = svd_item_embeddings(data.train, svd_dim, seed)
        return data._svd_item_emb

    def co_graph(**weighting):
        # one cached graph per weighting (GiffCF's normalised one beside the plain counts)
        cache = data.__dict__.setdefault("_co_graphs", {})
        key = tuple(sorted(weighting.items()))
        if key not in cache:
            from fedrec.data.side import co_interaction_graph

            cache[key] = co_interaction_graph(data.train, **weighting)
        return cache[key]

    def transitions(users=None):
        # G-Diff's directed graph of consecutive training items (of ``users`` only, e.g. a silo
        # node's own users; None: all); needs each user's time order
        if data.train_seq is None:
            raise ConfigError(f"dataset: {data.name!r} has no time order of the training items, which the "
                              "transition graph (model gdiff) needs; use a dataset with timestamps")
        from fedrec.data.side import transition_graph

        if users is not None:
            seq = data.train_seq.subset(users)
            return transition_graph(seq.items, seq.indptr, data.n_items)
        if getattr(data, "_transition_graph", None) is None:
            data._transition_graph = transition_graph(data.train_seq.items, data.train_seq.indptr, data.n_items)
        return data._transition_graph
    def groups(grouping: str, top: float = 0.2):
        from fedrec.eval.fairness import user_groups

        return user_groups(data, grouping, top)

    side = data.item_side
    wants_co_graph = side.graph is None and side.private_graph == "co_interaction"
    user_codes = {k: np.asarray(v, dtype=np.int64) for k, v in data.user_features.items()
                  if not k.endswith("_vocab") and np.ndim(v) == 1 and np.issubdtype(np.asarray(v).dtype, np.integer)}
    return DataShape(n_users=data.n_users, n_items=data.n_items, item_emb=data.item_emb,
                     item_emb_fn=None if data.item_emb is not None else svd_embeddings,
                     item_side=side, item_graph_fn=co_graph if wants_co_graph else None,
                     item_transitions_fn=transitions if side.private_graph == "co_interaction" else None,
                     user_features=user_codes,
                     user_groups_fn=groups)


__all__ = ["Batch", "DataShape", "Recommender", "build_model", "check_dataset_needs", "model_config", "data_shape", "svd_item_embeddings", "REGISTRY"]
