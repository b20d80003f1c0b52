"""The flow posterior detector's lifecycle as a LightningModule (Shibata et al.,
arXiv:2001.07847): it wraps the two trained Glows M0 (S_normal) and M1 (S_mixture).

- **validate**: scores the validation images and fixes the decision threshold on them (Youden's
  J, or the 95th percentile of the normal scores when val has no abnormal image) — never on
  test; ``val_result`` holds the scores;
- **test**: scores S_unknown; ``test_result`` holds log p(x|M0), log p(x|M1), the posterior
  (eq. 3), the likelihood-only score (Appendix A) and the anomaly maps;
- **predict**: ``{"score", "log_posterior", "log_p_m0", "log_p_m1", "map"}`` of new images
  (``map``: the anomaly map, None without ``maps``; ``experiments.detect_image``).

M0 and M1 are trained beforehand by ``experiments.train_glow`` (each its own GlowModule, with
its own checkpoint); this module trains nothing. The validation thresholds are part of its
state dict (``get_extra_state``), as are the per-position statistics of normal maps
(``map_norm="position"``, fitted by :meth:`FlowPosteriorModule.fit_map_statistics` on
training normals, never on test), and the two Glows' hyper-parameters part of its own, so
:meth:`FlowPosteriorModule.load` restores the detector from one checkpoint read with
``weights_only=True``.
"""

from __future__ import annotations

import logging

import numpy as np
import pytorch_lightning as pl
import torch

from lightning_modules.flow_posterior.scoring import FlowScores, gather_scores, score_batch
from lightning_modules.thresholds import decision_threshold

log = logging.getLogger(__name__)


class FlowPosteriorModule(pl.LightningModule):
    """Args:
        m0, m1: models with ``log_likelihood(x) -> (B,)`` (and ``log_likelihood_map`` for maps).
        n_bits: the data's bit depth (for the zero-pixel fraction).
        score: ``global`` = -log p(normal|x) (paper) | ``local`` = the anomaly map's top part |
            ``likelihood`` = -log p(x|M0) (Appendix A).
        select_score: choose the score in validation (``score`` first, then the others; the
            rules of :mod:`lightning_modules.selection`); the chosen one replaces
            ``hparams.score``, so test, predict and the checkpoint use it.
        maps: compute the anomaly maps (implied by ``score="local"``).
        map_source, map_norm, map_region (our options; the local score and the map only):
            ``posterior`` (l1 - l0) | ``likelihood`` (-l0) map; ``position``: z per position
            against normal maps (:meth:`fit_map_statistics`); ``interior``: the top part only
            over pixels inside the intensity window (``posterior.interior_mask``); ``map_frame``
            ``template``: maps normalised and scored in the Glows' pose-template frame
            (``scoring.score_batch``).
    """

    def __init__(self, m0, m1, n_bits: int = 8, score: str = "global", maps: bool = True,
                 map_sigma: float = 1.0, map_top_fraction: float = 0.01,
                 map_source: str = "posterior", map_norm: str = "none",
                 map_region: str = "all", select_score: bool = False,
                 map_frame: str = "image"):
        super().__init__()
        from lightning_modules.glow.config import (
            IMAGE_SCORES,
            MAP_FRAMES,
            MAP_NORMS,
            MAP_REGIONS,
            MAP_SOURCES,
        )

        for name, value, allowed in (("score", score, IMAGE_SCORES),
                                     ("map_source", map_source, MAP_SOURCES),
                                     ("map_norm", map_norm, MAP_NORMS),
                                     ("map_region", map_region, MAP_REGIONS),
                                     ("map_frame", map_frame, MAP_FRAMES)):
            if value not in allowed:
                raise ValueError(f"glow.{name}={value!r} is not one of {allowed}")
        self.m0, self.m1 = m0, m1
        glow_hp = {name: dict(m.hparams) for name, m in (("m0", m0), ("m1", m1))
                   if isinstance(getattr(m, "hparams", None), dict)}
        self.save_hyperparameters({"glows": glow_hp, "n_bits": int(n_bits), "score": score,
                                   "maps": bool(maps or score == "local"),
                                   "map_sigma": float(map_sigma),
                                   "map_top_fraction": float(map_top_fraction),
                                   "map_source": map_source, "map_norm": map_norm,
                                   "map_region": map_region, "map_frame": map_frame,
                                   "select_score": bool(select_score)}, logger=False)
        self.map_mean: np.ndarray | None = None  # (*spatial) with map_norm="position"
        self.map_sd: np.ndarray | None = None
        self.threshold: float | None = None
        self.threshold_source = ""
        self.likelihood_threshold: float | None = None
        self.score_selection: dict[str, float] = {}
        self._parts: list[dict] = []
        self._labels: list[torch.Tensor] = []
        self.val_result: FlowScores | None = None
        self.val_labels: np.ndarray | None = None
        self.test_result: FlowScores | None = None

    @classmethod
    def load(cls, path, map_location="cpu") -> FlowPosteriorModule:
        """The detector saved by the flow pipeline (``OUT/flow_posterior.ckpt``), in eval mode;
        read with ``weights_only=True``."""
        from lightning_modules.checkpoint import CheckpointError, read_checkpoint
        from lightning_modules.glow import GlowModule

        ckpt = read_checkpoint(path, map_location=map_location)
        hp = dict(ckpt.get("hyper_parameters") or {})
        glows = hp.pop("glows", {})
        if set(glows) != {"m0", "m1"}:
            raise CheckpointError(f"{path} is not a flow posterior checkpoint (no M0/M1 "
                                  "hyper-parameters); use OUT/flow_posterior.ckpt of a flow run.")
        module = cls(GlowModule(**glows["m0"]), GlowModule(**glows["m1"]), **hp)
        module.load_state_dict(ckpt["state_dict"])
        return module.eval()

    def get_extra_state(self) -> dict:
        stats = {k: None if v is None else torch.from_numpy(np.ascontiguousarray(v))
                 for k, v in (("map_mean", self.map_mean), ("map_sd", self.map_sd))}
        return {"threshold": self.threshold, "threshold_source": self.threshold_source,
                "likelihood_threshold": self.likelihood_threshold, **stats}

    def set_extra_state(self, state: dict) -> None:
        self.threshold = state["threshold"]
        self.threshold_source = state["threshold_source"]
        self.likelihood_threshold = state["likelihood_threshold"]
        for key in ("map_mean", "map_sd"):
            value = state.get(key)
            setattr(self, key, None if value is None else value.double().cpu().numpy())

    @torch.no_grad()
    def fit_map_statistics(self, batches) -> None:
        """Per-position mean / SD of the maps of normal images (``map_norm="position"``):
        ``batches`` yields dicts with an ``"image"`` (or tensors), normal images only (the
        pipeline passes S_normal, the training normals; never test)."""
        from lightning_modules.flow_posterior.posterior import position_statistics

        hp = self.hparams
        parts = []
        for batch in batches:
            x = batch["image"] if isinstance(batch, dict) else batch
            x = x.to(self.device, dtype=torch.float32)
            parts.append(score_batch(self.m0, self.m1, x, hp.n_bits, True, hp.map_sigma,
                                     hp.map_source, map_frame=hp.get("map_frame", "image")))
        maps = np.concatenate([p["anomaly_map"] for p in parts])  # (N, *spatial)
        # glow.align: only the positions each image's registration reached count
        valid = np.concatenate([p["valid"] for p in parts]) if "valid" in parts[0] else None
        self.map_mean, self.map_sd = position_statistics(maps, valid=valid)
        log.info("Anomaly map: per-position statistics of %d normal maps", len(maps))

    def configure_optimizers(self):
        return None

    def _step(self, batch: dict) -> dict:
        hp = self.hparams
        part = score_batch(self.m0, self.m1, batch["image"].float(), hp.n_bits, hp.maps,
                           hp.map_sigma, hp.map_source,
                           hp.map_region, hp.get("map_frame", "image"))
        self._parts.append(part)
        if "label" in batch:
            self._labels.append(torch.as_tensor(batch["label"]).cpu())
        return part

    def _take(self) -> tuple[FlowScores, np.ndarray]:
        hp = self.hparams
        parts, label_parts = self._parts, self._labels
        self._parts, self._labels = [], []  # a failed split leaves nothing for the next one
        stats = None
        if hp.map_norm == "position" and hp.maps:
            if self.map_mean is None:
                raise RuntimeError("map_norm='position' needs fit_map_statistics(normal "
                                   "images) before scoring")
            stats = (self.map_mean, self.map_sd)
        scores = gather_scores(parts, hp.score, hp.map_top_fraction, stats)
        labels = torch.cat(label_parts).numpy() if label_parts else np.zeros(0, int)
        return scores, labels

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch)

    def on_validation_epoch_end(self) -> None:
        val, labels = self._take()
        if self.hparams.select_score:
            self.select_score(val, labels)
        self.val_result, self.val_labels = val, labels
        self.threshold, self.threshold_source = decision_threshold(labels, val.score)
        self.likelihood_threshold, _ = decision_threshold(labels, val.score_likelihood)
        if "percentile" in self.threshold_source:
            log.warning("val has no abnormal images: threshold = %s (specificity 0.95 on val) "
                        "instead of Youden's J.", self.threshold_source)

    def select_score(self, val: FlowScores, labels: np.ndarray) -> None:
        """``glow.select_score``: the image score with the best validation AUROC becomes
        ``hparams.score`` (and ``val``'s score); ``self.score_selection`` = each one's AUROC."""
        from lightning_modules.glow.config import IMAGE_SCORES
        from lightning_modules.selection import choose_on_validation

        hp = self.hparams
        every = {"global": val.score_global, "local": val.map_image_score,
                 "likelihood": val.score_likelihood}
        names = [n for n in (hp.score, *IMAGE_SCORES) if every[n] is not None]
        names = list(dict.fromkeys(names))  # the configured score first, once
        best, aucs = choose_on_validation(labels, [every[n] for n in names], "glow.select_score")
        hp.score = names[best]
        val.use(hp.score)
        self.score_selection = dict(zip(names, aucs, strict=True))
        log.info("glow.select_score: %s (validation AUROC %s)", hp.score,
                 ", ".join(f"{n} {a:.3f}" for n, a in self.score_selection.items()))

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch)

    def on_test_epoch_end(self) -> None:
        self.test_result, _ = self._take()

    def predict_step(self, batch: dict, batch_idx: int) -> dict[str, np.ndarray]:
        self._parts, self._labels = [], []
        self._step(batch)
        s, _ = self._take()
        return {"score": s.score, "log_posterior": s.log_posterior, "log_p_m0": s.log_p_m0,
                "log_p_m1": s.log_p_m1, "map": s.anomaly_map}
