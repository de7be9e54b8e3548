"""T-DiffRec (Wang et al., "Diffusion Recommender Model", SIGIR 2023, section 3.4 "T-DiffRec"; survey 3.1).

Implements the official ``T-DiffRec/`` code (github.com/YiyanXu/DiffRec): DiffRec (``diffrec.py``: the
same denoiser MLP, the same Gaussian diffusion, loss, reweighting, importance sampling and inference;
the official T-DiffRec ``models/DNN.py`` and ``models/gaussian_diffusion.py`` are byte-identical to
DiffRec's) fed with *time-aware* interaction vectors instead of binary ones: each user's training
interactions, oldest first, get the weights ``np.linspace(w_min, w_max, n_u)`` (official
``data_utils.data_load``), so recent interactions weigh more. The weighted vector is the diffusion's
x_0 in training (input and target) and the history the reverse process starts from at inference
(official ``test_loader`` over the weighted ``train_data``); the evaluation's seen-item mask stays the
binary interactions (official ``mask_tv = train_data_ori + valid``). The weights are the data layer's
(:mod:`fedrec.data.input_weights`, ``TemporalLinspace``), declared through
``Recommender.input_weighting``; the time order is ``train_timestamps`` (DiffRec's ``.npy`` splits:
the row position in ``train_list.npy``, the order the official loader reads).

Defaults: the official code ships T-DiffRec settings for Amazon-book and Yelp only (``inference.py``
raises for any other dataset). ``conf/model/tdiffrec.yaml`` therefore takes DiffRec's official ML-1M
(clean) settings (``diffrec.yaml``) with the official argparse defaults w_min 0.1, w_max 1.0 (also the
Amazon-book setting; Yelp: 0.5 / 1.0).

Deviations: a dataset without training timestamps is refused (ConfigError) where the official code
always takes file order; w_min must be > 0 (a zero weight would hide the oldest interaction from the
dense input, and from the official validation mask, which reads the weighted matrix's non-zeros); a
pair repeated in the training file counts once (fedrec's loaders keep its first row) where the official
csr constructor sums the repeated weights (the ML-1M clean split has no repeated pair). Everything
else is DiffRec's, with DiffRec's documented deviations (``diffrec.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

from fedrec.data.input_weights import TemporalLinspace
from fedrec.models.base import DataShape
from fedrec.models.diffrec import DiffRec, DiffRecConfig


@dataclass
class TemporalWeights:
    """The config keys of T-DiffRec's time-aware rows (mixed into a DiffRec-family config)."""

    w_min: float = 0.1  # weight of a user's oldest training interaction (official --w_min default)
    w_max: float = 1.0  # weight of the most recent one (official --w_max default)


class TemporalInput:
    """Mixin for a DiffRec-family model: it reads T-DiffRec's time-aware rows of its config's w_min / w_max."""

    def __init__(self, cfg: TemporalWeights, shape: DataShape):
        super().__init__(cfg, shape)
        self.input_weighting = TemporalLinspace(cfg.w_min, cfg.w_max)  # checks 0 < w_min <= w_max


@dataclass
class TDiffRecConfig(TemporalWeights, DiffRecConfig):
    pass


class TDiffRec(TemporalInput, DiffRec):
    name = "tdiffrec"
