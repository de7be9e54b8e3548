"""Tests drive whole rounds through fedrec's in-process transport (``federation.backend=inprocess``)."""

from fedrec.federated.inprocess import InProcessGrid

__all__ = ["InProcessGrid"]
