"""What a Flower node knows: the config the server sent, the users it hosts and its local state.

Everything a node needs arrives in the message (the resolved config as YAML) or lives on the node
(its data files, found through the config's dataset path or the node-config key ``data-path``), so
the same ClientApp runs in Ray simulation and on real SuperNodes: nothing is shared with the server.
Datasets are cached per process, keyed by (dataset config, seed, the data transforms' keys), so a
Ray actor serving many virtual nodes loads the files and runs the transforms once; the transforms
(a mechanism's data hook, e.g. fake-user injection) are rebuilt by each process from the config and
passed to :func:`node_view`, and :func:`fedrec.data.load_run_data` makes their result identical to
the server's.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from omegaconf import DictConfig, OmegaConf

# The package first, then its submodules (as this module always did): with a submodule imported
# first, a `flwr run` simulation once failed loading the ClientApp with "partially initialized module
# fedrec.data.interactions" -- likely the ServerApp's thread importing fedrec.data at the same time.
from fedrec.data import load_run_data, transform_keys
from fedrec.data.interactions import Interactions
from fedrec.data.partition import partition_from_cfg
from fedrec.data.transforms import DataTransform
from fedrec.errors import ConfigError


def config_digest(cfg_yaml: str) -> str:
    return hashlib.sha256(cfg_yaml.encode()).hexdigest()[:16]


CACHE_SIZE = 4  # datasets (and partitionings) kept per process
_DATA: OrderedDict[tuple, Interactions] = OrderedDict()
_PARTS: OrderedDict[tuple, list[np.ndarray]] = OrderedDict()


def _cached(cache: OrderedDict, key: tuple, make):
    # A small LRU by hand: functools.lru_cache would key by the transform objects, but the
    # transforms' identity is their key() text (each process builds its own objects).
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    value = cache[key] = make()
    while len(cache) > CACHE_SIZE:
        cache.popitem(last=False)
    return value


def _dataset(dataset_yaml: str, seed: int, transforms: Sequence[DataTransform] = ()) -> Interactions:
    key = (dataset_yaml, seed, transform_keys(transforms))
    return _cached(_DATA, key, lambda: load_run_data(OmegaConf.create(dataset_yaml), seed, tuple(transforms)))


def _partitions(dataset_yaml: str, partition_yaml: str, num_nodes: int, seed: int,
                transforms: Sequence[DataTransform] = ()) -> list[np.ndarray]:
    key = (dataset_yaml, partition_yaml, num_nodes, seed, transform_keys(transforms))
    return _cached(_PARTS, key, lambda: partition_from_cfg(_dataset(dataset_yaml, seed, transforms),
                                                           OmegaConf.create(partition_yaml), num_nodes, seed))


def clear_cache() -> None:
    _DATA.clear()
    _PARTS.clear()


@dataclass
class NodeView:
    cfg: DictConfig
    data: Interactions  # the full catalogue; only ``users`` rows are this node's
    users: np.ndarray
    partition_id: int


def node_view(cfg_yaml: str, node_config: dict, transforms: Sequence[DataTransform] | None = None) -> NodeView:
    """The node's config, data and users, from the server's config and this node's config.

    ``transforms`` are the run's data transforms; None: the data hooks of the mechanisms the config
    names (``fedrec.mechanisms``), built from the same config as the server's, so the node's data,
    injected users included, and its partition equal the server's.
    """
    cfg = OmegaConf.create(cfg_yaml)
    if transforms is None:
        from fedrec.mechanisms import data_transforms, node_mechanisms

        transforms = data_transforms(node_mechanisms(cfg))
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
    data = _dataset(ds_yaml, int(cfg.seed), transforms)
    parts = _partitions(ds_yaml, OmegaConf.to_yaml(cfg.partition, resolve=True), num_nodes, int(cfg.seed),
                        transforms)
    return NodeView(cfg=cfg, data=data, users=parts[pid], partition_id=pid)
