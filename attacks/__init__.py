"""Attacks on federated recommenders, as mechanisms (``fedrec.mechanisms``, Hydra group ``attack``).

``model_poisoning``: malicious clients craft their uploads (scaling / sign-flip baselines).
"""
