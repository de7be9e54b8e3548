"""Defenses as mechanisms (``fedrec.mechanisms``, Hydra group ``defense``).

``norm_bound``: every update's L2 norm bounded before aggregation (Sun et al., 2019).
``image_purify``: item images purified by a catalogue diffusion model, adversarial ones detected by the
encoding distance of original and purified image (Yuan et al., TOIS 2023).
"""
