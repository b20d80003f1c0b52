"""Schema of the ``patch`` config section (multiresolution patch detector, Kim et al. 2023)."""

from __future__ import annotations

from dataclasses import dataclass, field

# Allowed values of our options (validated with every config in experiments.config).
FEATURE_MODES = ("pooled", "dense")
INTENSITY_NORMS = ("none", "percentile", "rank")
ALIGN_MODES = ("none", "similarity", "affine")
IMAGE_SCORES = ("max", "topk")
REUSE_MODES = ("check", "retrain", "force")
DB_DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class PatchConfig:
    patch_sizes: list[int] = field(default_factory=lambda: [128, 256, 512, 1024])
    locality: list[int] = field(default_factory=lambda: [2, 1, 0, 0])  # Chebyshev d per size
    weights: list[float] = field(default_factory=lambda: [0.1, 1.2, 1.2, 1.0])  # eq. 6
    distance: str = "mahalanobis"  # euclidean | manhattan | cosine | mahalanobis
    # How eq. 6 combines the per-size maps: geometric (weights as exponents, default: in a plain
    # product the weights are a constant factor that the normalisation removes) | product
    fusion: str = "geometric"
    threshold: float = 0.5
    # Mahalanobis: Ledoit-Wolf-style shrinkage a of (1-a) S + a tr(S)/p I; 0 = pseudo-inverse
    shrinkage: float = 0.1
    # divide each patch distance by the median leave-one-image-out distance of the normal
    # reference patches at its grid cell (not in the paper; see detector.py)
    cell_normalize: bool = False
    # z-score each patch's log distance by the mean / SD of the leave-one-image-out log
    # distances of the normal reference patches at its grid cell (not in the paper)
    cell_zscore: bool = False
    # also store reference patches on the grid shifted by +-reference_shift x patch size
    # (8 neighbours; 0 = off, paper): pose robustness (not in the paper)
    reference_shift: float = 0.0
    # none (paper) | similarity = each image resampled onto a pose template of the normal
    # training images (rotation, scale, shift by NCC; see align.py) before the encoders
    align: str = "none"
    # --- our options (not in the paper; profile=paper keeps the defaults) ---
    # pooled = one globally pooled h per patch (paper) | dense = every position of the encoder's
    # mid-level feature map is its own cell in the locality search (see detector.py)
    features: str = "pooled"
    dense_layers: list[str] = field(default_factory=lambda: ["layer2"])  # ResNet layers, dense
    dense_pool: int = 3  # local average pooling of the dense maps (PatchCore's 3x3)
    # none = raw intensities (paper) | percentile = each image's p1/p99 mapped to 0/1 |
    # rank = each pixel -> its mid-rank in its own image (histogram equalisation)
    intensity_norm: str = "none"
    # Choose eq. 6's weights on the validation set (ours): among patch.weights and
    # weight_candidates (null = each size alone, each two adjacent sizes, all sizes equally),
    # the one whose raw image score has the highest validation AUROC; ties keep the earlier.
    select_weights: bool = False
    weight_candidates: list[list[float]] | None = None
    image_score: str = "max"  # max of A_final (paper) | topk = mean of its top topk_fraction
    topk_fraction: float = 0.01
    stride_fraction: float = 1.0  # 1.0 = paper's non-overlapping grid; 0.5 = overlapping
    chunk_size: int = 4096  # rows per block of the locality search (bounds memory)
    # ours: the prepared reference database in float32 | float16 | bfloat16 (half the memory at
    # paper scale; benchmarks/locality_search --paper-scale: 99.4 / 99.9 % same neighbours)
    db_dtype: str = "float32"
    feature_batch_size: int = 256  # patches per encoder forward pass
    encoder_dir: str | None = None  # folder with res<s>/ encoders; None = <out_dir>/encoders
    # Train the encoders that are missing (false: a missing encoder is an error)
    train_encoders: bool = True
    # Per-size simclr.input_size used when training an encoder here (None = simclr.input_size)
    encoder_input_sizes: list[int] | None = None
    # Per-size trainer.max_epochs when training an encoder here (None = trainer.max_epochs)
    encoder_epochs: list[int] | None = None
    # An encoder in <out_dir>/encoders is reused only when its fingerprint.json (training
    # images, resolved settings, code version) matches: check | retrain (train it again) |
    # force (use it whatever it was trained on). Encoders in patch.encoder_dir are used as given.
    reuse_encoders: str = "check"
    n_folds_run: int = 1  # >1: run folds 0..n-1 of data.n_folds and report mean ± sd
    device: str = "auto"  # auto | cpu | cuda
