"""Under a DP mechanism, nothing the model builds from private interactions escapes the accountant.

Two pieces of the zoo use the users' data outside the gradient path that DP-SGD / DP-FedAvg account:

* DiffRec's and L-DiffRec's importance-sampled timesteps: the sampling distribution is a history of
  recent per-user losses, so the timesteps a step draws depend on the data of users outside its
  batch (and in a federation it would be one more unaccounted release). Under DP it is switched
  off (uniform timesteps, the official code's option ``--sampling_type uniform`` equivalent), and
  the resolved ``config.yaml`` records ``model.importance_sampling: false``.
* L-DiffRec's item clusters: without item embeddings shipped with the dataset (public side data,
  e.g. DiffRec's ``item_emb.npy``), fedrec computes them from an SVD of the training matrix, i.e.
  from the users' rows. Under DP that is refused with one line; ``model.n_cate=1`` or a dataset
  with item embeddings works.
* The co-interaction item graph (``dataset.item_graph=co_interaction``, or a model's own
  ``model.item_graph=co_interaction``): item-item co-occurrence counted over the users' training
  rows (:func:`fedrec.data.side.co_interaction_graph`). Under DP it is refused with one line naming
  the key, by :func:`check_side_data` from ``fedrec.config.validate``, before any file is read;
  public graphs (``dataset.item_graph=category``) are fine.
"""

from __future__ import annotations

from fedrec.errors import ConfigError

DP_MECHANISMS = ("dpsgd", "user_dp", "node_dp")


def check_side_data(cfg) -> None:
    """Refuse item side data derived from private interactions under a DP mechanism (config only)."""
    mechanism = cfg.get("privacy", {}).get("name", "none")
    if mechanism not in DP_MECHANISMS:
        return
    for block in ("dataset", "model"):
        if str(cfg.get(block, {}).get("item_graph", None)) == "co_interaction":
            raise ConfigError(f"{block}.item_graph=co_interaction: under privacy={mechanism} the item graph would be "
                              "counted from the users' training interactions, outside the accountant; use a public "
                              "graph (dataset.item_graph=category) or none")


def enforce_public_only(cfg, data) -> list[str]:
    """Adjust or reject ``cfg.model`` for the run's DP mechanism; returns what was switched off."""
    mechanism = cfg.get("privacy", {}).get("name", "none")
    if mechanism not in DP_MECHANISMS:
        return []
    check_side_data(cfg)
    notes = []
    if bool(cfg.model.get("importance_sampling", False)):
        cfg.model.importance_sampling = False
        notes.append(f"privacy={mechanism}: model.importance_sampling set to false (the loss history that "
                     "drives it is data-dependent and outside the accountant)")
    if cfg.model.name == "ldiffrec" and int(cfg.model.get("n_cate", 1)) > 1 and data.item_emb is None:
        raise ConfigError(f"privacy={mechanism}: model.n_cate={cfg.model.n_cate} would cluster items on an SVD of "
                          "the users' interactions, outside the accountant; use a dataset with public item "
                          "embeddings (item_emb) or model.n_cate=1")
    return notes
