"""Read one option of a dataset config node, with a default only for keys that are truly absent.

A key that is missing (or null) gives the default. Anything else that goes wrong while reading
it -- an interpolation that does not resolve, a mandatory ``???`` left unset, a node that is not a
mapping at all -- is a one-line :class:`ConfigError` naming the key, never a silent default.
"""

from __future__ import annotations

from collections.abc import Mapping

from omegaconf import DictConfig, OmegaConf

from fedrec.errors import ConfigError


def _one_line(exc: Exception) -> str:
    # OmegaConf appends "full_key: ... object_type=..." lines; the first line is the message.
    first = str(exc).strip().split("\n", 1)[0]
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def get_option(cfg, key: str, default=None, where: str = "dataset"):
    """``cfg[key]`` of a DictConfig or dict node called ``where``; ``default`` when absent or null."""
    if cfg is None:
        return default
    name = f"{where}.{key}"
    if not isinstance(cfg, (Mapping, DictConfig)):
        raise ConfigError(
            f"{where}={cfg!r}: expected a mapping of options (with {key}), got {type(cfg).__name__}"
        ) from None
    if isinstance(cfg, DictConfig) and key in cfg.keys() and OmegaConf.is_missing(cfg, key):
        raise ConfigError(f"{name}: mandatory value '???' is not set") from None
    if key not in cfg:
        return default
    try:
        value = cfg[key]
    except Exception as exc:  # interpolation errors and the like: surface them, naming the key
        raise ConfigError(f"{name}: cannot be read ({_one_line(exc)})") from None
    return default if value is None else value
