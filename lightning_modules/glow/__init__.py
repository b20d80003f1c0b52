"""2D/3D Glow (Shibata et al., https://arxiv.org/abs/2001.07847) on normflows.

Names are imported lazily (:mod:`lightning_modules.lazy`): loading a configuration should not
pull in torch, Lightning and normflows.
"""

from lightning_modules.lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "lightning_modules.glow.lightning_model": ["GlowModule", "NonFiniteLossError", "load_glow"],
    "lightning_modules.glow.torch_model": ["Glow", "bits_per_dim", "build_glow", "dequantize",
                                           "estimate_memory", "quantize",
                                           "saved_activation_bytes"],
})
