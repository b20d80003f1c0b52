"""2D/3D Glow (Shibata et al., https://arxiv.org/abs/2001.07847) on normflows.

Names are imported lazily: ``experiments.config`` imports this package's ``config`` module,
and loading a configuration should not pull in torch, Lightning and normflows.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "GlowModule": "lightning_modules.glow.lightning_model",
    "NonFiniteLossError": "lightning_modules.glow.lightning_model",
    "load_glow": "lightning_modules.glow.lightning_model",
    "Glow": "lightning_modules.glow.torch_model",
    "bits_per_dim": "lightning_modules.glow.torch_model",
    "build_glow": "lightning_modules.glow.torch_model",
    "dequantize": "lightning_modules.glow.torch_model",
    "estimate_memory": "lightning_modules.glow.torch_model",
    "quantize": "lightning_modules.glow.torch_model",
    "saved_activation_bytes": "lightning_modules.glow.torch_model",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
