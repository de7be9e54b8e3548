"""Defenses as mechanisms (``fedrec.mechanisms``, Hydra group ``defense``).

``norm_bound``: every update's L2 norm bounded before aggregation (Sun et al., 2019).
``row_median``, ``row_trimmedmean``, ``row_krum``, ``row_norm_bound``, ``hierarchical_clip``: FedRec-aware
rules over each item row's touching users (``batch_rules``, arithmetic in :mod:`strategies.row_robust`).
``update_detect``: server-side update anomaly detection, flagged users dropped (``update_detect``).
``krum``, ``multikrum``, ``bulyan``, ``median``, ``trimmedmean``: Flower's rules (``batch_rules.FlowerRule``).
``image_purify``: item images purified by a catalogue diffusion model, adversarial ones detected by the
encoding distance of original and purified image (Yuan et al., TOIS 2023).
``degree_detect`` / ``pca_detect`` / ``diffusion_detect``: fake-profile detectors on the training data that
drop the flagged users' training rows; ``profile_purify``: diffusion purification of every profile
(``profiles.py``).
"""
