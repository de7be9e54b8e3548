"""Shared command-line plumbing of the non-Hydra entry points (bench, synthesize)."""

from __future__ import annotations

import sys
from typing import Callable

from fedrec.errors import FedrecInputError


def split_options(argv: list[str], prefix: str) -> tuple[list[str], dict[str, str]]:
    """Hydra overrides, and ``<prefix>.KEY=VALUE`` options as a dict."""
    opts = dict(a[len(prefix) + 1:].split("=", 1) for a in argv if a.startswith(prefix + "."))
    return [a for a in argv if not a.startswith(prefix + ".")], opts


def run_reporting_input_errors(fn: Callable[[], None]) -> int:
    """Run ``fn``; bad input becomes one ``error:`` line on stderr and exit status 2."""
    try:
        fn()
    except FedrecInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
