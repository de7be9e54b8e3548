"""fedrec: federated, privacy-focused simulation of diffusion recommenders."""

__version__ = "0.1.0"
