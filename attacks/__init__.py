"""Attacks on federated recommenders: the attacker's side of a run (never imported by ``fedrec.eval``).

* :mod:`attacks.shilling` -- heuristic fake-user profiles (random, average, bandwagon, segment), data
  transforms (:mod:`fedrec.data.transforms`) that inject users marked ``injected``;
* :mod:`attacks.model_poisoning` -- malicious clients craft their uploads (scaling / sign-flip baselines);
* :mod:`attacks.fedrecattack` -- FedRecAttack (Rong et al., ICDE 2022): injected fake clients upload
  item-row gradients crafted from public interactions (at most kappa rows each);
* :mod:`attacks.crafted` -- the machinery those item-side attacks share (fake clients, kappa rows, clip, upload
  scaling, BPR-MF and DiffRec item sides), on which also run :mod:`attacks.pipattack` (PipAttack),
  :mod:`attacks.ara_ahum` (A-ra, A-hum), :mod:`attacks.untargeted` (FedAttack-style) and
  :mod:`attacks.random_update` (Gaussian updates);
* :mod:`attacks.target_tracking` -- target metrics of any attack; :mod:`attacks.clean` -- ``attack=none``,
  which tracks the same metrics on the clean run when given targets;
* :mod:`attacks.threat` -- the keyed choice of malicious clients.

Each attack is a mechanism (``fedrec.mechanisms``, Hydra group ``attack``).
"""
