"""Attacks on federated recommenders: the attacker's side of a run (never imported by ``fedrec.eval``).

* :mod:`attacks.shilling` -- heuristic fake-user profiles (random, average, bandwagon, segment), data
  transforms (:mod:`fedrec.data.transforms`) that inject users marked ``injected``;
* :mod:`attacks.model_poisoning` -- malicious clients craft their uploads (scaling / sign-flip baselines);
* :mod:`attacks.fedrecattack` -- FedRecAttack (Rong et al., ICDE 2022): injected fake clients upload
  item-row gradients crafted from public interactions (at most kappa rows each);
* :mod:`attacks.ipdgi` -- IPDGI (Chen et al., TOIS 2024): a trained visual recommender's target image
  replaced by a guided, bounded diffusion edit of itself;
* :mod:`attacks.image_poison` -- gradual, bounded PGD on the target's image while the model trains
  (Yuan et al., TOIS 2023); :mod:`attacks.image_common` -- what both share (objective, bound, targets);
* :mod:`attacks.threat` -- the keyed choice of malicious clients.

Each attack is a mechanism (``fedrec.mechanisms``, Hydra group ``attack``).
"""
