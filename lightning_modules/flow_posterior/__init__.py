"""Semi-supervised flow posterior detector (Shibata et al., https://arxiv.org/abs/2001.07847).

``posterior``: the pure functions (log posterior, scores, zero-pixel fraction, preprocessing
checks); ``scoring``: batched scoring of items with the two flows M0 (S_normal) and M1
(S_mixture) on CPU or GPU.
"""

from lightning_modules.devices import pick_device  # noqa: F401  (kept importable from here)
from lightning_modules.flow_posterior.posterior import (
    PreprocessingMismatch,
    anomaly_map,
    check_same_preprocessing,
    likelihood_score,
    log_posterior,
    map_score,
    posterior_score,
    preprocessing_signature,
    zero_fraction,
)
from lightning_modules.flow_posterior.scoring import (
    FlowScores,
    check_models,
    score_batches,
)
from lightning_modules.glow.config import IMAGE_SCORES  # the flow's image scores

__all__ = [
    "IMAGE_SCORES",
    "FlowScores",
    "PreprocessingMismatch",
    "anomaly_map",
    "check_models",
    "check_same_preprocessing",
    "likelihood_score",
    "log_posterior",
    "map_score",
    "pick_device",
    "posterior_score",
    "preprocessing_signature",
    "score_batches",
    "zero_fraction",
]
