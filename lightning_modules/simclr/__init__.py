"""SimCLR patch encoders, one per patch size (Kim et al., Sci Rep 2023).

Names are imported lazily: ``experiments.config`` imports this package's ``config`` module,
and loading a configuration should not pull in torchvision and lightly.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "SimCLRModule": "lightning_modules.simclr.lightning_model",
    "load_encoder": "lightning_modules.simclr.lightning_model",
    "scale_lr": "lightning_modules.simclr.lightning_model",
    "PatchEncoder": "lightning_modules.simclr.torch_model",
    "SimCLRModel": "lightning_modules.simclr.torch_model",
    "build_backbone": "lightning_modules.simclr.torch_model",
    "encoder_feature_dim": "lightning_modules.simclr.torch_model",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
