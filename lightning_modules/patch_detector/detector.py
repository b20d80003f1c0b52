"""Multiresolution patch anomaly detector as a plain torch model (Kim et al., Sci Rep 2023).

Kim, Moon, Lee et al., *Multiresolution patch-based anomaly detection for chest X-rays*,
Sci Rep 2023. For every patch size ``s`` a SimCLR
encoder maps each grid patch to a feature ``h``; the patch's score is the distance to the
nearest normal reference patch of the same size within Chebyshev distance ``d`` on the grid
(:mod:`.locality`, :mod:`.distances`); the per-size maps are fused by eq. 6 and normalised
(:mod:`.anomaly_map`); the image score is the maximum of the final map.

Optional per-position calibration (``cell_normalize``, not in the paper): a patch's distance is
divided by the typical distance of *normal* patches at the same grid cell, the median over the
reference database of each reference patch's leave-one-image-out nearest-neighbour distance
(same locality window). Normal anatomy is far more variable at some positions (body outline,
neck and shoulders) than at others (lung fields); with a raw distance the image maximum then
falls on those positions in every image, and a lesion in the lung must beat the most variable
normal tissue of the image. Dividing by the local normal spread is the usual remedy (a local
outlier factor on the grid; PaDiM, Defard et al. 2021, models each position separately for the
same reason). It uses the normal training images only.

Options of ours, not in the paper (each off in ``profile=paper``):

- ``features="dense"``: instead of one globally pooled vector ``h`` per patch, the encoder's
  mid-level feature maps (``dense_layers``, e.g. ResNet layer 2; PatchCore-style local
  averaging) are kept, and every feature-map position is its own cell in the locality search,
  of ``s / m`` pixels for an ``m x m`` map. With 32-pixel encoder inputs ResNet layer 4 is
  1 x 1, so a pooled patch feature cannot say *where* in the patch something differs.
  The locality radius ``d`` stays in patch sizes (``d * m`` cells).
- ``intensity_norm="percentile" | "rank"``: each image's own 1st / 99th intensity
  percentiles are mapped to 0 / 1, or each pixel to its mid-rank in the image, before the
  encoders (see :mod:`.intensity`).
- ``cell_zscore``: a patch's score becomes ``z = (log d - mean_c) / sd_c``, the mean and SD of
  the log leave-one-image-out nearest-neighbour distances of the normal reference patches at
  the same grid cell (same window; the reference database only, never validation or test
  images). It is returned as ``exp(z)``, so eq. 6's geometric fusion becomes ``Σ w_s z_s``.
  Unlike ``cell_normalize`` (a ratio to the median), a cell whose normal distances vary a lot
  needs a proportionally larger excess to score high. The statistics are stored in the
  checkpoint (``cell_stats``).
- ``align="similarity"``: each image is resampled onto a pose template of the normal training
  images (rotation, isotropic scale, shift maximising NCC; :mod:`.align`) after the intensity
  normalisation, so a grid cell holds the same anatomy in every image; maps are mapped back
  onto the image (:meth:`upsample` with the poses of :meth:`prepare`). The template is part of
  the checkpoint. ``align="affine"`` adds an aspect ratio and a shear (body habitus).
- ``reference_shift``: the database also holds every normal training patch on the grid shifted
  by ``±reference_shift * s`` pixels (8 neighbours, only those inside the image), filed under
  the cell it overlaps most, so a patient shift by a fraction of a patch finds its normal
  match (pose robustness).

The work is split so that the expensive part is done once: ``features`` (encoders) ->
``patch_scores`` (locality search, any distance) -> ``fuse`` (weights, normalisation), which is
what the ablations re-run for each variant.
"""

from __future__ import annotations

import torch
from torch import nn

from datamodules.patches import patch_grid
from lightning_modules.align import ALIGN_MODES, align_poses, coverage, fit_template, unwarp
from lightning_modules.patch_detector.anomaly_map import (
    MapNormalizer,
    map_block,
    patch_scores_to_map,
)
from lightning_modules.patch_detector.config import DB_DTYPES, FEATURE_MODES
from lightning_modules.patch_detector.distances import fit_transform, prepare
from lightning_modules.patch_detector.intensity import INTENSITY_NORMS, intensity_normalize
from lightning_modules.patch_detector.locality import locality_nearest
from lightning_modules.patch_detector.reference_db import ReferenceDB

_TINY = 1e-12  # floor of a distance before its log (an exact duplicate patch has distance 0)
_ZMAX = 80.0  # exp(z) stays finite in float32


class PatchAnomalyDetector(nn.Module):
    """Encoders per patch size + reference databases -> anomaly maps and image scores.

    Args:
        encoders: ``{patch_size: encoder}``, each mapping (B, 1, s, s) in [0, 1] to (B, D).
        image_size: side of the (square) input images.
        patch_sizes, locality: the sizes and their Chebyshev radii ``d`` (paper: 2, 1, 0, 0).
        stride_fraction: grid stride as a fraction of the patch size (1 = paper, no overlap).
            ``d`` is given in patch sizes, so with stride s/2 the window spans ``d / 0.5`` cells.
    """

    def __init__(self, encoders: dict[int, nn.Module], image_size: int, patch_sizes: list[int],
                 locality: list[int], distance: str = "mahalanobis", shrinkage: float = 0.1,
                 stride_fraction: float = 1.0, chunk_size: int = 4096,
                 feature_batch_size: int = 256, cell_normalize: bool = False,
                 features: str = "pooled", dense_layers: list[str] | None = None,
                 dense_pool: int = 3, intensity_norm: str = "none", cell_zscore: bool = False,
                 reference_shift: float = 0.0, db_dtype: str = "float32",
                 align: str = "none"):
        super().__init__()
        if align not in ALIGN_MODES:
            raise ValueError(f"patch.align={align!r} is not one of {list(ALIGN_MODES)}")
        self.align_mode = align
        # (1, 1, H, W) pose template of the normal training images (align="similarity"; set
        # by fit_alignment, part of the checkpoint)
        self.template: torch.Tensor | None = None
        if db_dtype not in DB_DTYPES:
            raise ValueError(f"patch.db_dtype={db_dtype!r} is not one of {list(DB_DTYPES)}")
        self.db_dtype = db_dtype
        if cell_zscore and cell_normalize:
            raise ValueError("patch.cell_zscore and patch.cell_normalize are two calibrations "
                             "of the same distances: choose one")
        if not 0.0 <= reference_shift < 1.0:
            raise ValueError(f"patch.reference_shift={reference_shift} must lie in [0, 1)")
        if reference_shift and features != "pooled":
            raise ValueError("patch.reference_shift needs patch.features=pooled")
        if features not in FEATURE_MODES:
            raise ValueError(f"patch.features={features!r} is not one of {list(FEATURE_MODES)}")
        if intensity_norm not in INTENSITY_NORMS:
            raise ValueError(f"patch.intensity_norm={intensity_norm!r} is not one of "
                             f"{list(INTENSITY_NORMS)}")
        if features == "dense" and stride_fraction != 1.0:
            raise ValueError("patch.features=dense needs patch.stride_fraction=1 (the feature "
                             "map positions already overlap)")
        self.feature_mode = features
        self.dense_layers = [str(x) for x in (dense_layers or ["layer2"])]
        self.dense_pool = int(dense_pool)
        self.intensity_norm = intensity_norm
        self.patch_sizes = [int(s) for s in patch_sizes]
        if sorted(encoders) != sorted(self.patch_sizes):
            raise ValueError(f"encoders for sizes {sorted(encoders)} but patch_sizes "
                             f"{self.patch_sizes}")
        if not 0.0 < stride_fraction <= 1.0:
            raise ValueError(f"patch.stride_fraction={stride_fraction} must lie in (0, 1]")
        self.encoders = nn.ModuleDict({str(s): encoders[s] for s in self.patch_sizes})
        self.image_size = int(image_size)
        self.locality = dict(zip(self.patch_sizes, [int(d) for d in locality]))
        self.distance, self.shrinkage = distance, float(shrinkage)
        self.stride_fraction = float(stride_fraction)
        self.chunk_size, self.feature_batch_size = int(chunk_size), int(feature_batch_size)
        self.cell_normalize = bool(cell_normalize)
        self.cell_zscore = bool(cell_zscore)
        self.reference_shift = float(reference_shift)
        # {size: (mean (N,), sd (N,))} of log normal distances per cell (cell_zscore), for the
        # detector's own distance; part of the checkpoint (PatchDetectorModule.get_extra_state)
        self.cell_stats: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.dbs: dict[int, ReferenceDB] = {}
        self.normalizer: MapNormalizer | None = None
        self._prepared: dict[tuple[int, str], tuple] = {}
        for s in self.patch_sizes:
            if s > self.image_size:
                raise ValueError(f"patch size {s} is larger than the image ({self.image_size})")
        self._map_side: dict[int, int] = {}
        if self.feature_mode == "dense":
            for s in self.patch_sizes:
                enc = encoders[s]
                if not hasattr(enc, "feature_map"):
                    raise ValueError("patch.features=dense needs encoders with feature_map()")
                with torch.no_grad():
                    was = enc.training
                    m = enc.eval().feature_map(torch.zeros(1, 1, s, s), self.dense_layers,
                                               self.dense_pool).shape[-1]
                    enc.train(was)
                if s % m:
                    raise ValueError(f"patch size {s} is not a multiple of its {m}x{m} "
                                     f"feature map ({self.dense_layers})")
                self._map_side[s] = int(m)

    def settings(self) -> dict:
        """The constructor's arguments other than the encoders (a checkpoint's hparams)."""
        return {"image_size": self.image_size, "patch_sizes": list(self.patch_sizes),
                "locality": [self.locality[s] for s in self.patch_sizes],
                "distance": self.distance, "shrinkage": self.shrinkage,
                "stride_fraction": self.stride_fraction, "chunk_size": self.chunk_size,
                "feature_batch_size": self.feature_batch_size,
                "cell_normalize": self.cell_normalize, "features": self.feature_mode,
                "dense_layers": list(self.dense_layers), "dense_pool": self.dense_pool,
                "intensity_norm": self.intensity_norm, "cell_zscore": self.cell_zscore,
                "reference_shift": self.reference_shift, "db_dtype": self.db_dtype,
                "align": self.align_mode}

    # --- geometry -----------------------------------------------------------------------
    def stride(self, size: int) -> int:
        return max(1, int(round(size * self.stride_fraction)))

    def map_side(self, size: int) -> int:
        """Side ``m`` of the feature map of one patch: 1 for pooled features."""
        return self._map_side.get(size, 1)

    def cell_size(self, size: int) -> int:
        """Pixels per cell of the locality search: the patch (pooled) or one map position."""
        return size // self.map_side(size)

    def cell_stride(self, size: int) -> int:
        return self.stride(size) // self.map_side(size)

    def patch_grid(self, size: int):
        """The grid of patches the encoder sees (row-major)."""
        return patch_grid(self.image_size, size, self.stride(size))

    def grid(self, size: int):
        """The grid of cells that get a score: the patches, or (dense) the positions of their
        feature maps, each a ``cell_size`` square, row-major over the whole image."""
        if self.map_side(size) == 1:
            return self.patch_grid(size)
        c = self.cell_size(size)
        n = (len(self.patch_grid(size)) ** 0.5) * self.map_side(size)  # square grid
        return patch_grid(int(round(n)) * c, c, c)

    def window(self, size: int) -> int:
        """Chebyshev radius in grid cells: ``d`` patch sizes = ``d * s / stride`` cells."""
        return int(round(self.locality[size] * size / self.cell_stride(size)))

    def cell_tensors(self, size: int) -> dict[str, torch.Tensor]:
        g = self.grid(size)
        return {k: torch.tensor([getattr(c, k) for c in g], dtype=torch.int32)
                for k in ("x", "y", "row", "col")}

    @property
    def block(self) -> int:
        return map_block(self.image_size, [(self.cell_size(s), self.cell_stride(s))
                                           for s in self.patch_sizes])

    def patch_config(self, size: int) -> dict:
        """Settings that define a reference database of this size (checked when loading)."""
        cfg = {"image_size": self.image_size, "patch_size": int(size),
               "stride": self.stride(size)}
        if self.feature_mode == "dense":
            cfg.update(features="dense", dense_layers=list(self.dense_layers),
                       dense_pool=self.dense_pool)
        if self.intensity_norm != "none":
            cfg["intensity_norm"] = self.intensity_norm
        if self.reference_shift:
            cfg["reference_shift"] = self.reference_shift
        return cfg

    def shifts(self, size: int) -> list[tuple[int, int]]:
        """Pixel offsets (dy, dx) of the extra reference grids (``reference_shift``): the 8
        neighbours of (0, 0) at ``round(reference_shift * size)`` pixels."""
        delta = int(round(self.reference_shift * size))
        if delta == 0:
            return []
        return [(dy, dx) for dy in (-delta, 0, delta) for dx in (-delta, 0, delta)
                if (dy, dx) != (0, 0)]

    def shifted_cells(self, size: int) -> dict[str, torch.Tensor]:
        """Cells of the shifted reference patches, in the order of :meth:`shifted_features`:
        ``x, y`` = the patch's own top-left pixel, ``row, col`` = the grid cell it is filed
        under (the one whose patch it overlaps most; |shift| < size / 2). Patches that would
        leave the image are not taken (no padding: nothing is invented)."""
        n = len(self.patch_grid(size))
        ct = self.cell_tensors(size)
        out = {k: [] for k in ("x", "y", "row", "col")}
        for dy, dx in self.shifts(size):
            for i in range(n):
                x, y = int(ct["x"][i]) + dx, int(ct["y"][i]) + dy
                if 0 <= x <= self.image_size - size and 0 <= y <= self.image_size - size:
                    for k, v in (("x", x), ("y", y), ("row", ct["row"][i]), ("col", ct["col"][i])):
                        out[k].append(int(v))
        return {k: torch.tensor(v, dtype=torch.int32) for k, v in out.items()}

    # --- input: intensity normalisation and pose alignment ----------------------------------
    @torch.no_grad()
    def fit_alignment(self, images: torch.Tensor) -> None:
        """``align`` != none: the pose template of normal training images (N, 1, H, W)."""
        self.template = fit_template(intensity_normalize(images, self.intensity_norm),
                                     mode=self.align_mode).cpu()

    @torch.no_grad()
    def prepare(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, 1, H, W) -> (the encoders' input, the poses (B, 4 or 6) that aligned it, or None):
        ``intensity_norm``, then with ``align`` != none each image resampled onto the
        template (:mod:`.align`)."""
        images = intensity_normalize(images, self.intensity_norm)
        if self.align_mode == "none":
            return images, None
        if self.template is None:
            raise RuntimeError(f"patch.align={self.align_mode} needs fit_alignment(normal training "
                               "images) before features are computed")
        return align_poses(images, self.template.to(images.device), transform=self.align_mode)

    @torch.no_grad()
    def shifted_features(self, images: torch.Tensor, size: int, prepared: bool = False
                         ) -> torch.Tensor:
        """Pooled features (B, M, D) of the shifted reference patches (``shifted_cells``);
        ``prepared`` as in :meth:`features`."""
        if not prepared:
            images = self.prepare(images)[0]
        cells = self.shifted_cells(size)
        enc = self.encoders[str(size)]
        b = images.shape[0]
        if cells["x"].numel() == 0:
            dim = enc(images[:1, :, :size, :size]).shape[-1]
            return images.new_zeros(b, 0, dim)
        patches = torch.stack([images[:, 0, y:y + size, x:x + size]
                               for x, y in zip(cells["x"].tolist(), cells["y"].tolist())], 1)
        patches = patches.reshape(-1, 1, size, size)  # (B*M, 1, s, s), image-major
        feats = [enc(patches[i:i + self.feature_batch_size])
                 for i in range(0, patches.shape[0], self.feature_batch_size)]
        return torch.cat(feats).float().reshape(b, -1, feats[0].shape[-1])

    # --- features -----------------------------------------------------------------------
    def extract(self, images: torch.Tensor, size: int) -> torch.Tensor:
        """(B, 1, H, W) -> (B * N, 1, s, s) patches in the row-major order of ``grid``."""
        st = self.stride(size)
        p = images[:, 0].unfold(1, size, st).unfold(2, size, st)  # (B, nr, nc, s, s)
        b, nr, nc = p.shape[:3]
        if nr * nc != len(self.patch_grid(size)):
            raise ValueError(f"images of shape {tuple(images.shape)} do not match "
                             f"image_size={self.image_size}")
        return p.reshape(b * nr * nc, 1, size, size)

    @torch.no_grad()
    def features(self, images: torch.Tensor, sizes: list[int] | None = None,
                 prepared: bool = False) -> dict[int, torch.Tensor]:
        """Encoder features of every grid cell: ``{size: (B, N, D)}`` (on the images' device),
        N in the row-major order of :meth:`grid`. ``prepared``: ``images`` are already the
        output of :meth:`prepare`."""
        if not prepared:
            images = self.prepare(images)[0]
        out = {}
        for s in sizes or self.patch_sizes:
            enc = self.encoders[str(s)]
            patches = self.extract(images, s)  # (B*N, 1, s, s)
            if self.feature_mode == "pooled":
                feats = [enc(patches[i:i + self.feature_batch_size])
                         for i in range(0, patches.shape[0], self.feature_batch_size)]
                out[s] = torch.cat(feats).float().reshape(images.shape[0], -1,
                                                          feats[0].shape[-1])
                continue
            feats = torch.cat([enc.feature_map(patches[i:i + self.feature_batch_size],
                                               self.dense_layers, self.dense_pool)
                               for i in range(0, patches.shape[0], self.feature_batch_size)])
            b, n_side = images.shape[0], int(round(len(self.patch_grid(s)) ** 0.5))
            m, dim = feats.shape[-1], feats.shape[1]
            f = feats.float().reshape(b, n_side, n_side, dim, m, m)  # (B, nr, nc, C, m, m)
            # cell (r*m + i, c*m + j) = position (i, j) of patch (r, c): row-major fine grid
            out[s] = f.permute(0, 1, 4, 2, 5, 3).reshape(b, n_side * m * n_side * m, dim)
        return out

    # --- reference database and scores -----------------------------------------------------
    def set_db(self, db: ReferenceDB) -> None:
        if db.patch_size not in self.patch_sizes:
            raise ValueError(f"no encoder for the database's patch size {db.patch_size}")
        want = self.patch_config(db.patch_size)
        got = {k: db.config.get(k) for k in want}
        if got != want:
            raise ValueError(f"reference database of size {db.patch_size} was built with "
                             f"{got}, the detector uses {want}")
        self.dbs[db.patch_size] = db
        self._prepared = {k: v for k, v in self._prepared.items() if k[0] != db.patch_size}
        self.cell_stats.pop(db.patch_size, None)  # fitted on the database it replaces

    def _reference(self, size: int, distance: str, device: torch.device):
        key = (size, distance)
        if key not in self._prepared:
            if size not in self.dbs:
                raise RuntimeError(f"no reference database for patch size {size}")
            db = self.dbs[size]
            t = fit_transform(db.features, distance, self.shrinkage)
            # db_dtype: the prepared database kept in half precision (half the memory; the
            # search upcasts each block to float32, so only the stored values are rounded)
            ref = prepare(db.features, t).to(getattr(torch, self.db_dtype))
            scale = (self.reference_scales(size, t, ref, db) if self.cell_normalize
                     else None)
            if self.cell_zscore:
                if distance == self.distance and size in self.cell_stats:
                    scale = self.cell_stats[size]  # restored from a checkpoint
                else:
                    scale = self.reference_cell_stats(size, t, ref, db)
                    if distance == self.distance:
                        self.cell_stats[size] = scale
            self._prepared[key] = (t, ref, db.cells, scale)
        t, ref, cells, scale = self._prepared[key]
        return t.to(device), ref.to(device), cells.to(device), scale

    def _loo_by_cell(self, size: int, t, ref: torch.Tensor, db: ReferenceDB
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Leave-one-image-out nearest-neighbour distance of every reference patch on the
        regular grid (shifted patches, ``reference_shift``, are candidates but not queries):
        ``(distances (R',), cell index (R',) in grid order)``."""
        n_cols = int(db.col.max()) + 1
        cell = db.row.long() * n_cols + db.col.long()  # (R,) row-major = grid order
        ct = self.cell_tensors(size)
        on_grid = (db.x == ct["x"][cell]) & (db.y == ct["y"][cell])  # (R,) not shifted
        cells = db.cells
        loo, _ = locality_nearest(ref[on_grid], cells[on_grid], ref, cells, self.window(size),
                                  t.kernel, self.chunk_size,
                                  query_groups=db.image_index[on_grid],
                                  ref_groups=db.image_index)  # (R',)
        return loo, cell[on_grid]

    def reference_cell_stats(self, size: int, t, ref: torch.Tensor, db: ReferenceDB
                             ) -> tuple[torch.Tensor, torch.Tensor]:
        """``cell_zscore``: mean and SD ``(N,), (N,)`` of the log leave-one-image-out distance
        of the normal reference patches at each grid cell (see :meth:`patch_scores`)."""
        loo, cell = self._loo_by_cell(size, t, ref, db)
        n_cells = len(self.grid(size))
        ok = torch.isfinite(loo)
        logd = torch.log(loo.clamp_min(_TINY))
        mean, sd = torch.zeros(n_cells), torch.ones(n_cells)
        for c in range(n_cells):
            v = logd[(cell == c) & ok]
            if v.numel() >= 2:
                mean[c], sd[c] = v.mean(), v.std()
            elif v.numel() == 1:
                mean[c] = v[0]
        # our choice: an SD floor of 0.1 x the median cell SD, so a cell whose normal distances
        # barely vary (constant background) cannot turn noise into huge z-scores
        return mean, sd.clamp_min(0.1 * float(sd.median()) + _TINY)

    def reference_scales(self, size: int, t, ref: torch.Tensor, db: ReferenceDB
                         ) -> torch.Tensor:
        """Per-cell scale ``(N,)``: median leave-one-image-out nearest-neighbour distance of the
        reference patches at each grid cell (see the module docstring)."""
        loo, _ = locality_nearest(ref, db.cells, ref, db.cells, self.window(size), t.kernel,
                                  self.chunk_size, query_groups=db.image_index,
                                  ref_groups=db.image_index)  # (R,)
        n_cells = len(self.grid(size))
        n_cols = int(db.col.max()) + 1
        cell = db.row.long() * n_cols + db.col.long()  # (R,) row-major = grid order
        scale = torch.ones(n_cells)
        for c in range(n_cells):
            v = loo[(cell == c) & torch.isfinite(loo)]
            if v.numel():
                scale[c] = v.median()
        pos = scale[scale > 0]
        floor = float(pos.median()) * 1e-3 if pos.numel() else 1.0
        return scale.clamp_min(floor)  # no division by ~0 at constant (e.g. empty) cells

    @torch.no_grad()
    def patch_scores(self, feats: dict[int, torch.Tensor], distance: str | None = None
                     ) -> dict[int, torch.Tensor]:
        """Raw patch anomaly scores ``{size: (B, N)}`` (distance to the nearest normal patch
        within the locality window; ``1 - cos`` for cosine)."""
        distance = distance or self.distance
        out = {}
        for s, f in feats.items():
            b, n, _ = f.shape
            t, ref, ref_cells, scale = self._reference(s, distance, f.device)
            ct = self.cell_tensors(s)
            q_cells = torch.stack([ct["row"], ct["col"]], 1).long().repeat(b, 1)  # (B*N, 2)
            scores, _ = locality_nearest(prepare(f.reshape(b * n, -1), t), q_cells, ref,
                                         ref_cells, self.window(s), t.kernel, self.chunk_size)
            scores = scores.reshape(b, n)
            if self.cell_zscore:
                # z = (log d - mean_c) / sd_c over normal (leave-one-image-out reference)
                # distances at the same cell; returned as exp(z) > 0, so eq. 6's geometric
                # fusion of the per-size maps becomes the weighted sum of z-scores
                mean, sd = (v.to(scores.device)[None, :] for v in scale)
                z = (torch.log(scores.clamp_min(_TINY)) - mean) / sd
                out[s] = torch.exp(z.clamp(max=_ZMAX))
            elif scale is not None:
                out[s] = scores / scale.to(scores.device)[None, :]
            else:
                out[s] = scores
        return out

    # --- maps -----------------------------------------------------------------------------
    def size_maps(self, scores: dict[int, torch.Tensor], sizes: list[int] | None = None
                  ) -> list[torch.Tensor]:
        """A(s) for each size, on the block grid: list of (B, H/g, W/g)."""
        g = self.block
        maps = []
        for s in sizes or self.patch_sizes:
            ct = self.cell_tensors(s)
            maps.append(patch_scores_to_map(scores[s], ct["x"], ct["y"], self.cell_size(s),
                                            self.image_size, g))
        return maps

    def upsample(self, block_map: torch.Tensor, poses: torch.Tensor | None = None
                 ) -> torch.Tensor:
        """(B, H/g, W/g) -> (B, H, W) (each block's value on its pixels). With the ``poses``
        of :meth:`prepare` (``align="similarity"``) the map, computed in the template's frame,
        is mapped back onto each image (0 where the image lies outside the template)."""
        g = self.block
        full = block_map.repeat_interleave(g, dim=-2).repeat_interleave(g, dim=-1)
        if poses is None:
            return full
        return unwarp(full[:, None], poses.to(full.device))[:, 0]

    def covered_blocks(self, poses: torch.Tensor) -> torch.Tensor:
        """(B, H/g, W/g) bool: the map blocks whose every pixel the alignment took from inside
        the image (``poses`` of :meth:`prepare`). The others hold the border repeated, which
        differs from image to image and is no anatomy to compare (our choice: they are not
        scored; dev chest seeds 100-103, test AUROC 0.881 -> 0.895 with the same encoders)."""
        g = self.block
        cov = coverage(poses, (self.image_size, self.image_size))
        return -torch.nn.functional.max_pool2d(-cov, g)[:, 0] > 1.0 - 1e-3

    def fused_map(self, scores: dict[int, torch.Tensor], normalizer: MapNormalizer,
                  poses: torch.Tensor | None = None, maps: list[torch.Tensor] | None = None
                  ) -> torch.Tensor:
        """The fused log-map (B, H/g, W/g) of eq. 6 before calibration (``maps``: the per-size
        maps, if built already). With ``poses`` (``align`` != none) the blocks outside the
        image (:meth:`covered_blocks`) get the image's lowest value, so neither the image
        score nor the map's maximum comes from them."""
        fused = normalizer.fused_log_map(maps or self.size_maps(scores, normalizer.sizes))
        if poses is None:
            return fused
        inside = self.covered_blocks(poses).to(fused.device)
        low = fused.flatten(1).min(1).values[:, None, None].expand_as(fused)
        return torch.where(inside, fused, low)

    def fuse(self, scores: dict[int, torch.Tensor], normalizer: MapNormalizer | None = None,
             poses: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 6 -> (A_final (B, H/g, W/g) in (0, 1), image scores (B,) = max of A_final);
        ``poses``: see :meth:`fused_map`."""
        norm = normalizer or self.normalizer
        if norm is None:
            raise RuntimeError("the detector has no fitted normalisation (fit it on validation)")
        fused = self.fused_map(scores, norm, poses)  # (B, h, w)
        final = norm.normalize(fused)
        return final, norm.normalize(norm.image_raw(fused))

    def raw_image_scores(self, scores: dict[int, torch.Tensor], normalizer: MapNormalizer,
                         poses: torch.Tensor | None = None) -> torch.Tensor:
        """max of the fused log-map, before calibration: (B,)."""
        return normalizer.image_raw(self.fused_map(scores, normalizer, poses))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 1, H, W) in [0, 1] -> ``map`` (B, H, W) A_final in (0, 1), ``score`` (B,)."""
        x, poses = self.prepare(images)
        scores = self.patch_scores(self.features(x, prepared=True))
        final, image_scores = self.fuse(scores, poses=poses)
        return {"map": self.upsample(final, poses), "score": image_scores,
                "patch_scores": scores}
