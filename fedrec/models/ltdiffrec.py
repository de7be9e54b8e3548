"""LT-DiffRec (Wang et al., "Diffusion Recommender Model", SIGIR 2023: L-DiffRec with T-DiffRec's
temporal reweighting; survey section 3.1).

Implements the official ``LT-DiffRec/`` code (github.com/YiyanXu/DiffRec): L-DiffRec (``ldiffrec.py``:
clustered variational item encoders, latent Gaussian diffusion, decoder; the official LT-DiffRec
``models/`` files are byte-identical to L-DiffRec's and its ``main.py`` differs only in the data) fed
with T-DiffRec's time-aware interaction vectors: each user's training interactions, oldest first,
weighted ``np.linspace(w_min, w_max, n_u)`` (``tdiffrec.py``, :mod:`fedrec.data.input_weights`). The
weighted vector is the encoder's input and the multinomial reconstruction target in training (official
``compute_loss(batch_recon, batch)`` on the weighted batch) and the history at inference; the seen-item
mask of evaluation stays binary (official ``mask_tv = train_data_ori + valid``).

Defaults: the official code ships LT-DiffRec settings for Amazon-book and Yelp only; ``ltdiffrec.yaml``
takes L-DiffRec's official ML-1M (clean) settings (``ldiffrec.yaml``) with the official w_min 0.1 /
w_max 1.0 defaults. Deviations: T-DiffRec's (``tdiffrec.py``: no time order refused, w_min > 0, a
repeated training pair counted once) plus L-DiffRec's (``ldiffrec.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

from fedrec.models.ldiffrec import LDiffRec, LDiffRecConfig
from fedrec.models.tdiffrec import TemporalInput, TemporalWeights


@dataclass
class LTDiffRecConfig(TemporalWeights, LDiffRecConfig):
    pass


class LTDiffRec(TemporalInput, LDiffRec):
    name = "ltdiffrec"
