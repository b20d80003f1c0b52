"""Choosing among a few scoring variants on the labelled validation set (never test).

Our choice, not in the papers (issue 11): which variant of a method's score carries the signal
depends on the data — for the patch detector the patch sizes of eq. 6 (``patch.select_weights``),
for the flow posterior the image score (``glow.select_score``: the whole-image posterior, the
likelihood alone, or the anomaly map's top part). A validation set with both classes is what
the methods already need for their thresholds, so it also picks the variant:

- the validation AUROC of each candidate's image score decides; ties keep the earlier
  candidate, and the configured variant comes first;
- a candidate that gives every validation image the same score ranks nothing and is never
  chosen (a collapsed encoder gives AUROC 0.5 that way);
- with fewer than :data:`MIN_PER_CLASS` normal or abnormal validation images a choice would be
  noise: the first candidate is kept, and a warning says so.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)

MIN_PER_CLASS = 10


def choose_on_validation(labels: np.ndarray, scores: Sequence[np.ndarray | torch.Tensor],
                         what: str) -> tuple[int, list[float]]:
    """``(index of the chosen candidate, validation AUROC of each)``; ``what`` names the option
    in messages (e.g. ``"patch.select_weights"``)."""
    from torchmetrics.functional.classification import binary_auroc

    y = torch.as_tensor(np.asarray(labels).astype(np.int64))
    n_normal, n_abnormal = int((y == 0).sum()), int((y == 1).sum())
    if not (n_normal and n_abnormal):
        raise RuntimeError(f"{what} needs normal and abnormal validation images; set "
                           f"{what}=false or label both in the val split.")
    units = [_unit_interval(s) for s in scores]
    aucs = [float(binary_auroc(u, y)) for u in units]
    if min(n_normal, n_abnormal) < MIN_PER_CLASS:
        log.warning("%s: only %d normal / %d abnormal validation images (< %d each): keeping "
                    "the configured choice", what, n_normal, n_abnormal, MIN_PER_CLASS)
        return 0, aucs
    best, best_auc = 0, -1.0
    for i, (u, auc) in enumerate(zip(units, aucs, strict=True)):
        if u.max() > 0 and auc > best_auc + 1e-12:  # a constant score maps to all zeros
            best, best_auc = i, auc
    return best, aucs


def _unit_interval(scores: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Scores mapped into [0, 1], order kept: torchmetrics reads inputs outside [0, 1] as logits
    and applies a sigmoid, which saturates in float64 beyond ~37 and turns a log-likelihood
    score (~1e3 nats) into ties (AUROC 0.5)."""
    s = torch.as_tensor(scores).double().flatten()
    span = s.max() - s.min()
    return (s - s.min()) / span if span > 0 else torch.zeros_like(s)
