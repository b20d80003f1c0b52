"""Schema of the ``patch`` config section (multiresolution patch detector, Kim et al. 2023)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PatchConfig:
    patch_sizes: list[int] = field(default_factory=lambda: [128, 256, 512, 1024])
    locality: list[int] = field(default_factory=lambda: [2, 1, 0, 0])  # Chebyshev d per size
    weights: list[float] = field(default_factory=lambda: [0.1, 1.2, 1.2, 1.0])  # eq. 6
    distance: str = "mahalanobis"  # euclidean | manhattan | cosine | mahalanobis
    threshold: float = 0.5
    shrinkage: float = 0.1  # covariance shrinkage for Mahalanobis
    stride_fraction: float = 1.0  # 1.0 = paper's non-overlapping grid; 0.5 = overlapping
    chunk_size: int = 4096
    encoder_dir: str | None = None  # folder with trained encoders; None = <out_dir>/encoders
