"""SimCLR patch encoders, one per patch size (Kim et al., Sci Rep 2023).

Names are imported lazily (:mod:`lightning_modules.lazy`): loading a configuration should not
pull in torchvision and lightly.
"""

from lightning_modules.lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "lightning_modules.simclr.lightning_model": ["SimCLRModule", "load_encoder", "scale_lr"],
    "lightning_modules.simclr.torch_model": ["PatchEncoder", "SimCLRModel", "build_backbone",
                                             "encoder_feature_dim"],
})
