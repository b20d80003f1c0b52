"""Schema of the ``glow`` config section (2D/3D Glow, Shibata et al.)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class GlowConfig:
    model: str = "m0"  # m0 = trained on S_normal (train/normal), m1 = on S_mixture (train/mixture)
    levels: int = 7  # L
    steps: int = 32  # K per level
    hidden_channels: int = 512
    # paper: sigma(h - 0.1) + 0.6 ; glow: sigma(h + 2) (normflows' original)
    coupling_scale: str = "paper"
    checkpointing: bool = False  # gradient checkpointing of the coupling networks
    # ActNorm + 1x1 conv applied as one convolution (same function, less memory and time)
    fuse_actnorm: bool = True
    n_bits: int = 8  # dequantisation bit depth (8 for RSNA, 7 for brain-window CT)
    sample_temperature: float = 0.7
    n_samples: int = 16  # fictional images saved to <out_dir>/samples.png after training
