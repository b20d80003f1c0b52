"""Lifecycle of the multiresolution patch detector as a LightningModule (Kim et al., Sci Rep 2023).

The torch model (:class:`.detector.PatchAnomalyDetector`: encoders, locality search, eq. 6) is
built outside and passed in. This module adds what a run does with it, in Lightning's stages:

- **fit** (one epoch, no optimiser): ``training_step`` collects the features of every patch of
  the normal training images; they become the reference databases before validation;
- **validate**: ``validation_step`` scores the validation patches; at the end of the epoch
  Normalize (eq. 6) is fitted on them: m_s on the normal images, c and σ on all — never on test;
- **test**: ``test_step`` scores the test patches; ``test_result`` holds the patch scores,
  A_final and the image scores (in loader order, with the dataset indices);
- **predict**: ``predict_step`` gives ``{"score", "map"}`` of new images (``detect_image``).

The learned state — reference databases, the fitted normalisation and the encoders' weights —
is part of the state dict (``get_extra_state``), and the detector's settings are the module's
hyper-parameters, so :meth:`PatchDetectorModule.load` restores a detector from one checkpoint
read with ``weights_only=True``; nothing is rebuilt by hand from a side file.

One device: the reference database is gathered in this process (no DDP for the patch scoring).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch

from lightning_modules.patch_detector.anomaly_map import MapNormalizer
from lightning_modules.patch_detector.detector import PatchAnomalyDetector
from lightning_modules.patch_detector.reference_db import ReferenceDB

log = logging.getLogger(__name__)

DB_FIELDS = ("features", "x", "y", "row", "col", "image_index")


@dataclass
class SplitScores:
    """Scores of one labelled split, in loader order."""

    index: np.ndarray  # (n,) dataset indices
    labels: np.ndarray  # (n,)
    patch_scores: dict[int, torch.Tensor]  # {size: (n, N)} raw, on the CPU
    final_maps: torch.Tensor | None = None  # (n, H/g, W/g) A_final
    scores: np.ndarray | None = None  # (n,) image scores in (0, 1)
    raw: np.ndarray | None = None  # (n,) image score of the fused log map, before calibration
    extra: dict = field(default_factory=dict)
    poses: torch.Tensor | None = None  # (n, 4 or 6) with patch.align: for detector.upsample


def fit_normalizer(det: PatchAnomalyDetector, val: SplitScores, sizes: list[int],
                   weights: list[float], fusion: str, image_score: str = "max",
                   topk_fraction: float = 0.01) -> MapNormalizer:
    """Normalize of eq. 6 on the validation set only (see anomaly_map)."""
    normal = val.labels == 0
    if not normal.any():
        raise RuntimeError("The validation set has no normal images: Normalize (eq. 6) is "
                           "fitted on them.")
    norm = MapNormalizer.fit_scales([val.patch_scores[s][torch.from_numpy(normal)]
                                     for s in sizes], sizes, weights, fusion,
                                    image_score, topk_fraction)
    norm.fit_calibration(det.raw_image_scores(val.patch_scores, norm, val.poses).numpy(),
                         val.labels)
    return norm


def default_weight_candidates(n_sizes: int) -> list[list[float]]:
    """Each size alone, each two adjacent sizes, all sizes equally (``patch.select_weights``)."""
    eye = [[float(i == j) for j in range(n_sizes)] for i in range(n_sizes)]
    pairs = [[float(j in (i, i + 1)) for j in range(n_sizes)] for i in range(n_sizes - 1)]
    return eye + pairs + [[1.0] * n_sizes]


def select_weights(det: PatchAnomalyDetector, val: SplitScores, sizes: list[int],
                   candidates: list[list[float]], fusion: str, image_score: str = "max",
                   topk_fraction: float = 0.01) -> tuple[list[float], list[dict]]:
    """The weights of eq. 6 whose raw image score ranks the validation set best
    (``patch.select_weights``; the rules are :mod:`lightning_modules.selection`'s).

    On the benchmark's dev sets the finest sizes win on chest phantoms and the coarse ones on
    digits, and a fixed vector tuned on one kind of data costs the other up to 0.06 AUROC.
    The candidates share m_s, fitted on the validation normals as ``fit_normalizer`` does.
    ``fusion="product"`` takes positive weights only, so candidates with a zero are left out
    there. Returns ``(weights, [{"weights", "val_auroc"}, ...])``.
    """
    from dataclasses import replace

    from lightning_modules.selection import choose_on_validation

    normal = torch.from_numpy(np.asarray(val.labels) == 0)
    # m_s and the per-size maps do not depend on the weights: fitted / built once
    base = MapNormalizer.fit_scales([val.patch_scores[s][normal] for s in sizes], sizes,
                                    [1.0] * len(sizes), fusion, image_score, topk_fraction)
    maps = det.size_maps(val.patch_scores, sizes)
    kept, raws = [], []
    for w in candidates:
        if len(w) != len(sizes) or not any(x > 0 for x in w):
            raise ValueError(f"weight candidate {list(w)} needs {len(sizes)} numbers >= 0, "
                             "not all zero (patch.weight_candidates)")
        if fusion == "product" and min(w) <= 0:
            continue  # a zero weight zeroes the product (anomaly_map.fuse_log_maps)
        norm = replace(base, weights=[float(x) for x in w])
        kept.append(norm.weights)
        raws.append(norm.image_raw(det.fused_map(val.patch_scores, norm, val.poses, maps)))
    if not kept:
        raise ValueError("patch.select_weights: every weight candidate has a zero, which "
                         "patch.fusion=product cannot take; give positive candidates")
    best, aucs = choose_on_validation(val.labels, raws, "patch.select_weights")
    return kept[best], [{"weights": w, "val_auroc": a} for w, a in zip(kept, aucs)]


def apply_normalizer(det: PatchAnomalyDetector, split: SplitScores, norm: MapNormalizer) -> None:
    """A_final, image scores and raw scores of ``split`` under ``norm`` (in place)."""
    fused = det.fused_map(split.patch_scores, norm, split.poses)  # once: maps, scores, raw
    raw = norm.image_raw(fused)
    split.final_maps = norm.normalize(fused)
    split.scores = norm.normalize(raw).numpy().astype(np.float64)
    split.raw = raw.numpy()


def _encoder_info(enc) -> dict:
    return {"patch_size": int(enc.patch_size), "input_size": int(enc.input_size),
            "backbone": str(enc.backbone_name)}


class PatchDetectorModule(pl.LightningModule):
    """Args:
        detector: the torch model with its encoders (databases and normaliser may be empty).
        weights, fusion, image_score, topk_fraction: Normalize (eq. 6), fitted in validation.
        select_weights, weight_candidates: choose the weights in validation among ``weights``
            and the candidates (:func:`select_weights`); the chosen ones replace
            ``hparams.weights``, so the checkpoint holds what the scores used.
        threshold: abnormal iff image score > threshold (0.5: the calibrated cut-off).
        image_ids: names of the normal training images, in loader order (stored with the DB).
        encoder_sha256: ``{size: sha256}`` of the encoder checkpoints (provenance only).
    """

    def __init__(self, detector: PatchAnomalyDetector, weights: list[float],
                 fusion: str = "geometric", image_score: str = "max",
                 topk_fraction: float = 0.01, threshold: float = 0.5,
                 image_ids: list[str] | None = None,
                 encoder_sha256: dict[int, str] | None = None, select_weights: bool = False,
                 weight_candidates: list[list[float]] | None = None):
        super().__init__()
        self.detector = detector
        self.automatic_optimization = False  # nothing is trained here: the encoders are fixed
        self.save_hyperparameters({
            "detector": detector.settings(),
            "encoders": {str(s): _encoder_info(detector.encoders[str(s)])
                         for s in detector.patch_sizes},
            "weights": [float(w) for w in weights], "fusion": str(fusion),
            "image_score": str(image_score), "topk_fraction": float(topk_fraction),
            "threshold": float(threshold), "select_weights": bool(select_weights),
            "weight_candidates": None if weight_candidates is None
            else [[float(x) for x in w] for w in weight_candidates],
        }, logger=False)
        self.image_ids = list(image_ids or [])
        self.encoder_sha256 = {int(k): str(v) for k, v in (encoder_sha256 or {}).items()}
        self._ref: dict[int, list[torch.Tensor]] = {}
        self._collected: dict[int, list[torch.Tensor]] = {}
        self._labels: list[torch.Tensor] = []
        self._index: list[torch.Tensor] = []
        self._poses: list[torch.Tensor] = []
        self.val_result: SplitScores | None = None
        self.test_result: SplitScores | None = None

    # --- state in the checkpoint ---------------------------------------------------------
    def get_extra_state(self) -> dict:
        dbs = {}
        for s, db in self.detector.dbs.items():
            dbs[str(s)] = {**{k: getattr(db, k).contiguous() for k in DB_FIELDS},
                           "image_ids": list(db.image_ids), "config": dict(db.config),
                           "encoder_sha256": db.encoder_sha256}
        norm = self.detector.normalizer
        stats = {str(s): {"mean": m.contiguous(), "sd": sd.contiguous()}
                 for s, (m, sd) in self.detector.cell_stats.items()}
        tpl = self.detector.template
        return {"dbs": dbs, "normalizer": None if norm is None else norm.to_dict(),
                "cell_stats": stats, "template": None if tpl is None else tpl.contiguous()}

    def set_extra_state(self, state: dict) -> None:
        for s, d in state["dbs"].items():
            self.detector.set_db(ReferenceDB(
                patch_size=int(s), **{k: d[k] for k in DB_FIELDS}, image_ids=d["image_ids"],
                encoder_sha256=d["encoder_sha256"], config=d["config"]))
        norm = state["normalizer"]
        self.detector.normalizer = None if norm is None else MapNormalizer.from_dict(norm)
        # after set_db, which drops the statistics of the database it replaces
        for s, d in state.get("cell_stats", {}).items():
            self.detector.cell_stats[int(s)] = (d["mean"], d["sd"])
        self.detector.template = state.get("template")

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu"
             ) -> PatchDetectorModule:
        """A fitted detector from ``trainer.save_checkpoint`` output (``weights_only=True``)."""
        from lightning_modules.checkpoint import read_checkpoint
        from lightning_modules.simclr.torch_model import PatchEncoder, build_backbone

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: give the patch_detector.ckpt of a "
                                    "finished `python -m experiments.pipeline method=patch` run.")
        ckpt = read_checkpoint(path, map_location=map_location)  # weights_only=True
        hp = ckpt.get("hyper_parameters")
        if not hp or "detector" not in hp:
            raise ValueError(f"{path} is not a patch detector checkpoint (no detector settings)")
        encoders = {int(s): PatchEncoder(build_backbone(e["backbone"]), patch_size=e["patch_size"],
                                         backbone_name=e["backbone"], input_size=e["input_size"])
                    for s, e in hp["encoders"].items()}
        det = PatchAnomalyDetector(encoders, **hp["detector"])
        module = cls(det, hp["weights"], hp["fusion"], hp["image_score"], hp["topk_fraction"],
                     hp["threshold"], select_weights=hp.get("select_weights", False),
                     weight_candidates=hp.get("weight_candidates"))
        module.load_state_dict(ckpt["state_dict"])
        return module.to(map_location).eval()

    # --- fit: the reference databases -----------------------------------------------------
    def configure_optimizers(self):
        return None

    def on_train_start(self) -> None:
        """``patch.align=similarity``: the pose template of the normal training images, before
        their features enter the reference database (one extra pass over the loader)."""
        det = self.detector
        if det.align_mode != "none" and det.template is None:
            loader = self.trainer.train_dataloader
            images = torch.cat([b["image"] for b in loader]).to(self.device)
            det.fit_alignment(images)
            log.info("patch.align: pose template of %d normal training images", len(images))

    def on_train_epoch_start(self) -> None:
        self.detector.eval()  # fixed encoders: BatchNorm keeps its running statistics

    def training_step(self, batch: dict, batch_idx: int) -> None:
        if (batch["label"] != 0).any():
            raise ValueError("The reference database takes normal training images only.")
        x = self.detector.prepare(batch["image"])[0]  # once for every size (and shift)
        for s, f in self.detector.features(x, prepared=True).items():  # {size: (B, N, D)}
            if self.detector.shifts(s):  # reference_shift: + the shifted grids' patches
                f = torch.cat([f, self.detector.shifted_features(x, s, prepared=True)], 1)
            self._ref.setdefault(s, []).append(f.cpu())

    def build_reference_dbs(self) -> None:
        """The collected normal training features -> one reference database per size."""
        if not self._ref:
            return
        det = self.detector
        for s, chunks in self._ref.items():
            f = torch.cat(chunks)  # (n_img, N, D)
            n_img, n, dim = f.shape
            if self.image_ids and len(self.image_ids) != n_img:
                raise RuntimeError(f"{n_img} reference images but {len(self.image_ids)} ids")
            ct = det.cell_tensors(s)
            if det.shifts(s):  # each image: its N grid patches, then its shifted ones
                sh = det.shifted_cells(s)
                ct = {k: torch.cat([v, sh[k]]) for k, v in ct.items()}
                n = len(ct["x"])
            det.set_db(ReferenceDB(
                patch_size=s, features=f.reshape(n_img * n, dim),
                **{k: v.repeat(n_img) for k, v in ct.items()},
                image_index=torch.arange(n_img, dtype=torch.int32).repeat_interleave(n),
                image_ids=self.image_ids or [str(i) for i in range(n_img)],
                encoder_sha256=self.encoder_sha256.get(s, ""), config=det.patch_config(s)))
        self._ref = {}

    def on_validation_epoch_start(self) -> None:
        self.build_reference_dbs()  # Lightning validates before on_train_epoch_end

    def on_train_end(self) -> None:
        self.build_reference_dbs()  # fit without a validation loader

    # --- validate / test: patch scores of labelled images -----------------------------------
    def _collect(self, batch: dict) -> None:
        keep = batch["label"] >= 0  # unlabeled items are not scored
        if not keep.any():
            return
        x, poses = self.detector.prepare(batch["image"][keep])
        for s, f in self.detector.features(x, prepared=True).items():  # {size: (B, N, D)}
            self._collected.setdefault(s, []).append(f)
        if poses is not None:
            self._poses.append(poses.cpu())
        self._labels.append(batch["label"][keep].cpu())
        self._index.append(batch["index"][keep].cpu())

    def _take(self, stage: str) -> SplitScores:
        """Patch scores of everything collected in this stage (one locality search per size)."""
        if not self._labels:
            raise RuntimeError(f"No labelled {stage} images.")
        scores = self.detector.patch_scores({s: torch.cat(v) for s, v in self._collected.items()})
        out = SplitScores(torch.cat(self._index).numpy(), torch.cat(self._labels).numpy(),
                          {s: v.cpu() for s, v in scores.items()},
                          poses=torch.cat(self._poses) if self._poses else None)
        self._collected, self._labels, self._index, self._poses = {}, [], [], []
        return out

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._collect(batch)

    def on_validation_epoch_end(self) -> None:
        hp = self.hparams
        val = self._take("val")
        if hp.select_weights:
            sizes = self.detector.patch_sizes
            cands = hp.weight_candidates or default_weight_candidates(len(sizes))
            hp.weights, val.extra["weight_selection"] = select_weights(
                self.detector, val, sizes, [list(hp.weights), *cands], hp.fusion,
                hp.image_score, hp.topk_fraction)
            log.info("patch.select_weights: weights %s (%d candidates)", hp.weights,
                     len(val.extra["weight_selection"]))
        self.detector.normalizer = fit_normalizer(
            self.detector, val, self.detector.patch_sizes, hp.weights, hp.fusion,
            hp.image_score, hp.topk_fraction)
        apply_normalizer(self.detector, val, self.detector.normalizer)
        self.val_result = val

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._collect(batch)

    def on_test_epoch_end(self) -> None:
        test = self._take("test")
        apply_normalizer(self.detector, test, self.detector.normalizer)
        self.test_result = test

    # --- predict: new images ----------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.detector(images)  # (B, 1, H, W) -> map (B, H, W), score (B,)

    def predict_step(self, batch: dict, batch_idx: int) -> dict[str, torch.Tensor]:
        out = self(batch["image"])
        return {"score": out["score"], "map": out["map"]}
