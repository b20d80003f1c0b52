"""Batched scoring of images with the two flows M0 and M1 (Shibata et al., arXiv 2001.07847).

A model is anything with ``log_likelihood(x) -> (B,)`` log p(x) in nats for x in [0, 1] as
returned by ``MedicalDataModule.load`` (the project's ``GlowModule``, or a stand-in in tests).
Its preprocessing is read from ``model.hparams`` (what ``save_hyperparameters`` stored in the
checkpoint) and must match the other model's and the data configuration's.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from datamodules.progress import track
from lightning_modules.align import coverage, unwarp
from lightning_modules.flow_posterior.posterior import (
    PreprocessingMismatch,
    anomaly_map,
    check_same_preprocessing,
    interior_mask,
    likelihood_map,
    likelihood_score,
    log_posterior,
    map_score,
    normalise_map,
    posterior_score,
    preprocessing_signature,
    zero_fraction,
)
from lightning_modules.glow.config import IMAGE_SCORES, MAP_FRAMES, MAP_REGIONS, MAP_SOURCES

log = logging.getLogger(__name__)


@dataclass
class FlowScores:
    """Per-item results, aligned with the scored items (float64 numpy arrays, nats)."""

    log_p_m0: np.ndarray
    log_p_m1: np.ndarray
    zero_fraction: np.ndarray
    log_prior_normal: float = 0.0
    extra: dict[str, np.ndarray] = field(default_factory=dict)
    # With maps: the anomaly map (B, *spatial) (``posterior.anomaly_map``) and its image score
    # (``posterior.map_score``).
    anomaly_map: np.ndarray | None = None
    map_image_score: np.ndarray | None = None
    # Which image score is the anomaly score: global (paper) | local (the map's) | likelihood
    kind: str = "global"

    @property
    def log_posterior(self) -> np.ndarray:
        """log p(normal|x) = log p(x|M0) - log p(x|M1) (+ log p(normal))."""
        return log_posterior(self.log_p_m0, self.log_p_m1, self.log_prior_normal)

    @property
    def score_global(self) -> np.ndarray:
        """-log p(normal|x) of the whole image (paper, eq. 3)."""
        return posterior_score(self.log_posterior)

    @property
    def local_score(self) -> np.ndarray | None:
        """The map's image score when it is the anomaly score (``kind="local"``), else None."""
        return self.map_image_score if self.kind == "local" else None

    @property
    def score(self) -> np.ndarray:
        """The anomaly score, higher = more anomalous: by ``kind``, the local score of the
        anomaly map, -log p(x|M0), or -log p(normal|x) (paper)."""
        if self.kind == "local":
            return self.map_image_score
        return self.score_likelihood if self.kind == "likelihood" else self.score_global

    @property
    def score_likelihood(self) -> np.ndarray:
        """Likelihood-only baseline -log p(x|M0) (Appendix A)."""
        return likelihood_score(self.log_p_m0)

    def __len__(self) -> int:
        return len(self.log_p_m0)

    def columns(self) -> dict[str, np.ndarray]:
        """The extra columns of scores.csv."""
        cols = {
            "log_p_m0": self.log_p_m0,
            "log_p_m1": self.log_p_m1,
            "log_posterior": self.log_posterior,
            "score_likelihood": self.score_likelihood,
            "zero_fraction": self.zero_fraction,
        }
        if self.kind != "global":
            cols["score_global"] = self.score_global
        if self.map_image_score is not None and self.kind != "local":  # the map's score too
            cols["score_local"] = self.map_image_score
        return cols

    def use(self, score: str) -> None:
        """Make ``score`` (``IMAGE_SCORES``) the anomaly score (``glow.select_score``); the
        local score needs the maps."""
        if score not in IMAGE_SCORES:
            raise ValueError(f"score={score!r} is not one of {IMAGE_SCORES}")
        if score == "local" and self.map_image_score is None:
            raise ValueError("score='local' needs the anomaly maps (maps=True)")
        self.kind = score


def model_hparams(model: Any) -> Mapping[str, Any]:
    """The hyper-parameters a model was saved with (``LightningModule.hparams``), or {}."""
    hp = getattr(model, "hparams", None)
    return hp if hp is not None else {}


def data_signature(data_cfg: Any, n_bits: int | None = None,
                   input_shape: Sequence[int] | None = None) -> dict[str, Any]:
    """The preprocessing the current configuration feeds the models, in the keys of
    :func:`preprocessing_signature`."""
    tree: dict[str, Any] = {"data": data_cfg}
    if n_bits is not None:
        tree["n_bits"] = n_bits
    if input_shape is not None:
        tree["input_shape"] = tuple(input_shape)
    return preprocessing_signature(tree)


def check_models(m0: Any, m1: Any, data_cfg: Any = None, n_bits: int | None = None,
                 input_shape: Sequence[int] | None = None) -> dict[str, Any]:
    """Check that M0, M1 (and the data configuration, if given) share their preprocessing.

    Raises :class:`PreprocessingMismatch` naming the mismatching keys; returns M0's signature.
    """
    sigs = {
        "M0": preprocessing_signature(model_hparams(m0)),
        "M1": preprocessing_signature(model_hparams(m1)),
    }
    if data_cfg is not None or input_shape is not None:
        sigs["data config"] = data_signature(data_cfg or {}, n_bits, input_shape)
    for name in ("M0", "M1"):
        if not sigs[name]:
            log.warning("%s has no preprocessing hyper-parameters to check against.", name)
    check_same_preprocessing(sigs)
    t0, t1 = (getattr(m, "align_template", None) for m in (m0, m1))
    if t0 is not None and t1 is not None and not torch.equal(t0.cpu(), t1.cpu()):
        raise PreprocessingMismatch(
            "M0 and M1 were aligned to different pose templates (glow.align): the "
            "posterior subtracts log-likelihoods of the same aligned input, so both must be "
            "trained with the template of the same S_normal (train them in one flow pipeline "
            "run, or delete OUT/m0 and OUT/m1 to retrain both).")
    return sigs["M0"]


def _check_finite(name: str, values: np.ndarray) -> None:
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        raise FloatingPointError(
            f"{name} returned a non-finite log-likelihood for {bad.size} of {values.size} items "
            f"(positions {bad[:10].tolist()}{' ...' if bad.size > 10 else ''}). Check the "
            "checkpoint (training diverged?) and that inputs lie in [0, 1]."
        )



def likelihood_and_map(m: Any, x: torch.Tensor, aligned: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(x|m) (B,) float32, its map (B, *spatial) float64) on the CPU, from one pass of
    the model. A model's map sums to its log-likelihood, so log p(x|m) is the map's sum (float64)
    rather than a second pass through the flow; a model whose map is resampled after the flow
    (GlowModule with glow.align) gives both itself (``log_likelihood_and_map``), the sum taken
    before the resampling. ``aligned``: x is in the model's template frame already (see
    :func:`score_batch`'s ``map_frame``)."""
    both = getattr(m, "log_likelihood_and_map", None)
    if both is not None:
        lp, a = both(x, aligned=True) if aligned else both(x)
        return lp.float().reshape(-1).cpu(), a.double().cpu()
    a = m.log_likelihood_map(x).double().cpu()
    return a.flatten(1).sum(1).float(), a


def _map_back(a: torch.Tensor, poses: torch.Tensor) -> torch.Tensor:
    """A map (B, *spatial) in the template frame -> each image's frame (0 outside)."""
    return unwarp(a.unsqueeze(1), poses.to(a)).squeeze(1)


def _aligns(m: Any) -> bool:
    """Whether ``m`` registers its input to a pose template (GlowModule with glow.align)."""
    return getattr(m, "align", "none") != "none" and hasattr(m, "align_input")


@torch.no_grad()
def score_batch(m0: Any, m1: Any, x: torch.Tensor, n_bits: int = 8, maps: bool = False,
                map_sigma: float = 1.0, map_source: str = "posterior",
                map_region: str = "all", map_frame: str = "image") -> dict[str, Any]:
    """One batch (B, C, ...) in [0, 1] on the models' device: ``log_p_m0``, ``log_p_m1``,
    ``zero_fraction`` (B,) float32 on the CPU and, with ``maps``, ``anomaly_map`` (numpy):
    the posterior map (``posterior.anomaly_map``) or with ``map_source="likelihood"`` M0's
    likelihood-only map (``posterior.likelihood_map``); with ``map_region="interior"`` also
    ``region`` (``posterior.interior_mask``).

    ``map_frame="template"`` (our option; models with glow.align only, otherwise it is the
    image's frame): the batch is registered once, with M0's template (M1 shares it,
    :func:`check_models`), both models score the registered batch, and the map and region stay
    in the template's frame, so that position statistics compare the same anatomy in every
    image; ``poses`` (B, 4 or 6) are returned for :func:`gather_scores` to map the maps back
    onto each image, and ``valid`` marks the template positions the image reached (elsewhere
    the registration repeated its border). ``"image"``: the batch is registered once all the
    same, each model's map is mapped back onto the image, and ``valid`` (B, *spatial) bool
    marks the positions that mapping reached (the rest lay outside the template: no
    measurement, 0 in the map), which the position statistics and the local score leave out."""
    if map_source not in MAP_SOURCES:
        raise ValueError(f"glow.map_source={map_source!r} is not one of {MAP_SOURCES}")
    if map_region not in MAP_REGIONS:
        raise ValueError(f"glow.map_region={map_region!r} is not one of {MAP_REGIONS}")
    if map_frame not in MAP_FRAMES:
        raise ValueError(f"glow.map_frame={map_frame!r} is not one of {MAP_FRAMES}")
    out = {"zero_fraction": zero_fraction(x, n_bits).cpu()}  # (B,)
    if not maps:
        out["log_p_m0"] = m0.log_likelihood(x).float().reshape(-1).cpu()  # (B,)
        out["log_p_m1"] = m1.log_likelihood(x).float().reshape(-1).cpu()  # (B,)
        return out
    aligned = _aligns(m0) and _aligns(m1)
    image, poses = x, None
    if aligned:  # registered once: M1 shares M0's template (check_models)
        x, poses = m0.align_input(x)
    kw = {"aligned": True} if aligned else {}
    out["log_p_m0"], a0 = likelihood_and_map(m0, x, aligned)
    if map_source == "likelihood":
        out["log_p_m1"] = m1.log_likelihood(x, **kw).float().reshape(-1).cpu()
    else:
        out["log_p_m1"], a1 = likelihood_and_map(m1, x, aligned)
    if aligned and map_frame == "template":  # the border warp repeated is no measurement
        out["poses"] = poses.cpu()
        inside = coverage(poses, tuple(a0.shape[-2:])) > 1.0 - 1e-3  # (B, 1, H, W)
        out["valid"] = inside.reshape(len(a0), *([1] * (a0.dim() - 3)), *a0.shape[-2:]) \
            .expand(a0.shape).cpu().numpy()
    elif aligned:  # each map back onto its image; positions the template missed are not valid
        a0 = _map_back(a0, poses)
        if map_source != "likelihood":
            a1 = _map_back(a1, poses)
        out["valid"] = (_map_back(torch.ones_like(a0), poses) > 1.0 - 1e-3).cpu().numpy()
        x = image
    if map_source == "likelihood":
        out["anomaly_map"] = likelihood_map(a0.numpy(), map_sigma)
    else:
        out["anomaly_map"] = anomaly_map(a0.numpy(), a1.numpy(), map_sigma)
    if map_region == "interior":
        out["region"] = interior_mask(x.cpu(), n_bits)  # (B, *spatial) bool
    return out


def gather_scores(parts: Sequence[Mapping[str, Any]], score: str = "global",
                  map_top_fraction: float = 0.01,
                  map_stats: tuple[np.ndarray, np.ndarray] | None = None) -> FlowScores:
    """The :func:`score_batch` outputs of a split -> :class:`FlowScores` (float64), checked
    finite; with maps, the image score of each map (the anomaly score for ``score="local"``).
    ``map_stats``: (mean, sd) per position of normal images' maps (glow.map_norm=position):
    the map becomes its z per position before its top part is taken; a ``region`` in the
    parts restricts the top part to it; ``poses`` in the parts (map_frame=template) map the
    anomaly maps back onto each image after that (the scores are taken in the template's
    frame)."""
    if score not in IMAGE_SCORES:
        raise ValueError(f"score={score!r} is not one of {IMAGE_SCORES}")
    if not parts:
        empty = np.zeros(0, dtype=np.float64)
        return FlowScores(empty, empty.copy(), empty.copy())
    out = FlowScores(*(torch.cat([p[k] for p in parts]).double().numpy()
                       for k in ("log_p_m0", "log_p_m1", "zero_fraction")))
    _check_finite("M0", out.log_p_m0)
    _check_finite("M1", out.log_p_m1)
    if "anomaly_map" in parts[0]:
        out.anomaly_map = np.concatenate([p["anomaly_map"] for p in parts])
        if map_stats is not None:
            out.anomaly_map = normalise_map(out.anomaly_map, *map_stats)
        region = np.concatenate([p["region"] for p in parts]) if "region" in parts[0] else None
        if "valid" in parts[0]:  # no measurement there: shown as 0 (nothing unusual), unscored
            valid = np.concatenate([p["valid"] for p in parts])
            out.anomaly_map = np.where(valid, out.anomaly_map, 0.0)
            region = valid if region is None else region & valid
        local = map_score(out.anomaly_map, map_top_fraction, region)
        _check_finite("The anomaly map", local)
        out.map_image_score = local
        if "poses" in parts[0]:  # map_frame=template: scored there, shown on each image
            poses = torch.cat([p["poses"] for p in parts])
            out.anomaly_map = _map_back(torch.from_numpy(out.anomaly_map), poses).numpy()
    # without maps, score="local" falls back to the global score (as before)
    out.kind = score if score != "local" or out.map_image_score is not None else "global"
    return out


def score_batches(m0: Any, m1: Any, batches: Iterable[Any], *, device: torch.device | str = "cpu",
                  n_bits: int = 8, total: int | None = None, progress: bool = True,
                  description: str = "Scoring with M0 and M1", maps: bool = False,
                  score: str = "global", map_sigma: float = 1.0,
                  map_top_fraction: float = 0.01, map_source: str = "posterior",
                  map_region: str = "all", map_frame: str = "image",
                  map_stats: tuple[np.ndarray, np.ndarray] | None = None) -> FlowScores:
    """log p(x|M0), log p(x|M1) and the zero-pixel fraction of every image in ``batches``.

    ``batches`` yields (B, C, ...) tensors or dicts with an ``"image"`` tensor in [0, 1]. Both
    models see exactly the same tensor. log-likelihoods are kept in float32 on the device and
    gathered as float64 (a 512² NLL is ~1e5-1e6 nats).

    ``maps`` (implied by ``score="local"``; models need ``log_likelihood_map``): also the
    anomaly map of every image (``anomaly_map`` with ``map_sigma``) and its image score
    (``map_score`` with ``map_top_fraction``); with ``score="local"`` that is the anomaly score.
    ``map_source``, ``map_region``, ``map_frame``, ``map_stats``: see :func:`score_batch`,
    :func:`gather_scores`.
    """
    if score not in IMAGE_SCORES:
        raise ValueError(f"score={score!r} is not one of {IMAGE_SCORES}")
    maps = maps or score == "local"
    device = torch.device(device)
    for m in (m0, m1):
        if isinstance(m, torch.nn.Module):
            m.to(device).eval()
    parts = []
    for batch in track(batches, description, total=total, enabled=progress):
        x = batch["image"] if isinstance(batch, Mapping) else batch
        x = x.to(device, dtype=torch.float32, non_blocking=True)  # (B, C, H, W) | (B, C, D, H, W)
        parts.append(score_batch(m0, m1, x, n_bits, maps, map_sigma, map_source, map_region,
                                 map_frame))
    return gather_scores(parts, score, map_top_fraction, map_stats)
