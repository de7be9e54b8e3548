"""Defenses as mechanisms (``fedrec.mechanisms``, Hydra group ``defense``).

``norm_bound``: every update's L2 norm bounded before aggregation (Sun et al., 2019).
"""
