"""What a Flower node knows: the config the server sent, the users it hosts and its local state.

Everything a node needs arrives in the message (the resolved config as YAML) or lives on the node
(its data files, found through the config's dataset path or the node-config key ``data-path``), so
the same ClientApp runs in Ray simulation and on real SuperNodes: nothing is shared with the server.
Datasets are cached per process, keyed by the config, so a Ray actor serving many virtual nodes
loads the files once.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from omegaconf import DictConfig, OmegaConf

from fedrec.data import load_dataset
from fedrec.data.interactions import Interactions
from fedrec.data.partition import partition_from_cfg
from fedrec.errors import ConfigError


def config_digest(cfg_yaml: str) -> str:
    return hashlib.sha256(cfg_yaml.encode()).hexdigest()[:16]


@lru_cache(maxsize=4)
def _dataset(dataset_yaml: str, seed: int) -> Interactions:
    return load_dataset(OmegaConf.create(dataset_yaml), seed)


@lru_cache(maxsize=4)
def _partitions(dataset_yaml: str, partition_yaml: str, num_nodes: int, seed: int) -> list[np.ndarray]:
    data = _dataset(dataset_yaml, seed)
    return partition_from_cfg(data, OmegaConf.create(partition_yaml), num_nodes, seed)


@dataclass
class NodeView:
    cfg: DictConfig
    data: Interactions  # the full catalogue; only ``users`` rows are this node's
    users: np.ndarray
    partition_id: int


def node_view(cfg_yaml: str, node_config: dict) -> NodeView:
    """The node's config, data and users, from the server's config and this node's config."""
    cfg = OmegaConf.create(cfg_yaml)
    if "data-path" in node_config and str(node_config["data-path"]):
        cfg.dataset.path = str(node_config["data-path"])
    num_nodes = int(cfg.federation.num_nodes)
    pid = int(node_config.get("partition-id", -1))
    if not 0 <= pid < num_nodes:
        raise ConfigError(f"node-config partition-id: {pid} is not in 0..{num_nodes - 1} "
                          f"(federation.num_nodes={num_nodes})")
    if "num-partitions" in node_config and int(node_config["num-partitions"]) != num_nodes:
        raise ConfigError(f"node-config num-partitions: {node_config['num-partitions']} differs from "
                          f"federation.num_nodes={num_nodes}")
    ds_yaml = OmegaConf.to_yaml(cfg.dataset, resolve=True)
    data = _dataset(ds_yaml, int(cfg.seed))
    parts = _partitions(ds_yaml, OmegaConf.to_yaml(cfg.partition, resolve=True), num_nodes, int(cfg.seed))
    return NodeView(cfg=cfg, data=data, users=parts[pid], partition_id=pid)
