"""2D/3D Glow (Shibata et al., https://arxiv.org/abs/2001.07847) on normflows."""

from .lightning_model import GlowModule, NonFiniteLossError, load_glow
from .torch_model import (
    Glow,
    bits_per_dim,
    build_glow,
    dequantize,
    estimate_memory,
    quantize,
    saved_activation_bytes,
)

__all__ = [
    "Glow",
    "GlowModule",
    "NonFiniteLossError",
    "bits_per_dim",
    "build_glow",
    "dequantize",
    "estimate_memory",
    "load_glow",
    "quantize",
    "saved_activation_bytes",
]
