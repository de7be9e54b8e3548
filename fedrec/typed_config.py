"""Typed config blocks: a dataclass built from a Hydra/OmegaConf block, with one-line errors.

Kept apart from ``fedrec.config`` (composition and whole-run validation) so that every module with a
typed block (privacy mechanisms, loggers, generators) can use it without importing the validator.
"""

from __future__ import annotations

from fedrec.errors import ConfigError


def typed_block(cls, cfg, where: str):
    """``cls(**block)`` for a config block (minus its ``name``); unknown keys and bad values name ``where``."""
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    raw.pop("name", None)
    known = set(cls.__dataclass_fields__)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key; known: {sorted(known)}")
    import dataclasses

    for f in dataclasses.fields(cls):  # numbers given as text on the command line ("inf", "1e-3") become floats
        if f.name in raw and raw[f.name] is not None and str(f.type).startswith("float"):
            try:
                value = raw[f.name]
                raw[f.name] = float(value.replace(".inf", "inf") if isinstance(value, str) else value)  # YAML's .inf
            except (TypeError, ValueError):
                raise ConfigError(f"{where}.{f.name}: expected a number, got {raw[f.name]!r}") from None
    try:
        return cls(**raw)
    except ConfigError as e:  # the dataclasses name their keys privacy.*: name the block they came from
        raise ConfigError(str(e).replace("privacy.", f"{where}.", 1)) from None
