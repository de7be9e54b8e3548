"""Data layer: load a configured dataset as train/valid/test matrices and spread users over nodes.

``load_dataset(cfg, seed)`` turns a ``conf/dataset/*.yaml`` node into an :class:`Interactions`;
``load_run_data(cfg, seed, transforms)`` is what every process of a run calls: the dataset, then the
run's data transforms (:mod:`fedrec.data.transforms`: fake-user injection, purification);
``partition_users`` / ``partition_from_cfg`` decide which users each federated node hosts.
"""

from fedrec.data.interactions import Interactions
from fedrec.data.loaders import load_dataset, resolve_data_path
from fedrec.data.partition import PARTITION_METHODS, partition_from_cfg, partition_users
from fedrec.data.splits import Split, split_interactions
from fedrec.data.synthetic import generate_synthetic
from fedrec.data.transforms import DataTransform, load_run_data, transform_keys

__all__ = [
    "DataTransform",
    "Interactions",
    "PARTITION_METHODS",
    "Split",
    "generate_synthetic",
    "load_dataset",
    "load_run_data",
    "partition_from_cfg",
    "partition_users",
    "resolve_data_path",
    "split_interactions",
    "transform_keys",
]
