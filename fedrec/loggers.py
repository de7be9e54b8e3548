"""Optional live sinks of the per-round metrics (``logger=`` config group, conf/logger/).

The recorder hands every metrics.jsonl line to the sink as the round ends; ``logger=tensorboard``
writes the curves of fedrec/plots.py as TensorBoard scalars into ``<run>/tensorboard/``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedrec.errors import ConfigError

LOGGERS = ("none", "tensorboard")


@dataclass(frozen=True)
class TensorBoardConfig:
    pass  # no options yet; the typed block still rejects a misspelt key (+logger.KEY=...) by name


def check_logger(cfg) -> None:
    """Reject an unknown logger, an unknown key or a missing package before any file is written."""
    block = cfg.get("logger") or {"name": "none"}
    name = block.get("name", "none")
    if name not in LOGGERS:
        raise ConfigError(f"logger.name: unknown logger {name!r}; expected one of {list(LOGGERS)}")
    if name == "tensorboard":
        from fedrec.typed_config import typed_block

        typed_block(TensorBoardConfig, block, "logger")
        try:
            import tensorboard  # noqa: F401  (torch's SummaryWriter needs it)
        except ImportError:
            raise ConfigError("logger=tensorboard: the tensorboard package is not installed "
                              "(pip install -e '.[tensorboard]')") from None


class TensorBoardSink:
    """Event files in ``folder``; ``resumed_at``: a resumed run hides the old session's later rounds."""

    def __init__(self, folder: str | Path, resumed_at: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: rounds after the checkpoint a resume starts from were recorded by the killed
        # session and are recorded again; TensorBoard drops the old events from that step on.
        self.writer = SummaryWriter(str(folder), purge_step=resumed_at + 1 if resumed_at else None)

    def write(self, line: dict) -> None:
        from fedrec.plots import scalars

        for tag, value in scalars(line).items():
            self.writer.add_scalar(tag, value, global_step=int(line["round"]))
        self.writer.flush()  # one flush per round: a live TensorBoard shows each round as it ends

    def close(self) -> None:
        self.writer.close()


def open_sink(cfg, run_path: Path, resumed_at: int = 0) -> TensorBoardSink | None:
    """The sink ``cfg.logger`` names (None for ``logger=none``); ``check_logger`` has accepted it."""
    block = cfg.get("logger") or {}
    if block.get("name", "none") == "tensorboard":
        return TensorBoardSink(Path(run_path) / "tensorboard", resumed_at)
    return None
