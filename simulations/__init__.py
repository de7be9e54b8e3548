"""Entry points: run (one experiment or a Hydra sweep), bench (named benchmarks)."""
