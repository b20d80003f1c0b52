"""Augmentations of Kim et al. 2023 for single-channel patches (torchvision.transforms.v2).

"random crop (50 %) and rotation (+-5 deg)"; no colour jitter, no blur, no grey-scale step
(the patches are grey already) and no ImageNet normalisation (the paper feeds raw [0, 1]
intensities). lightly's ``SimCLRTransform`` is built for RGB ImageNet images, hence our own.
"""

from __future__ import annotations

import math

import torch
from torchvision.transforms import v2


class Clamp01(torch.nn.Module):
    """Clip to [0, 1] (antialiased resizing can overshoot slightly); picklable, unlike a lambda."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(0.0, 1.0)


def view_transform(output_size: int, crop_scale: float = 0.5, crop_scale_max: float | None = None,
                   rotation_deg: float = 5.0, brightness: float = 0.0, contrast: float = 0.0,
                   gamma: float = 0.0) -> v2.Compose:
    """One random view of a (1, s, s) patch in [0, 1] -> (1, S, S), S = ``output_size``.

    Rotation first (bilinear, corners filled with 0 = background), then a random crop keeping
    ``crop_scale`` .. ``crop_scale_max`` of the area (aspect 3/4..4/3, torchvision's default),
    resized back to ``output_size``: cropping after rotating removes most of the filled corners.
    ``brightness`` / ``contrast`` / ``gamma`` > 0 add :class:`RandomIntensity` (ours) last.
    """
    hi = crop_scale if crop_scale_max is None else crop_scale_max
    if not 0.0 < crop_scale <= hi <= 1.0:
        raise ValueError(f"need 0 < simclr.crop_scale ({crop_scale}) <= crop_scale_max ({hi}) <= 1")
    steps = [
        v2.RandomRotation(degrees=rotation_deg, interpolation=v2.InterpolationMode.BILINEAR,
                          fill=0.0),
        v2.RandomResizedCrop(size=(output_size, output_size), scale=(crop_scale, hi),
                             interpolation=v2.InterpolationMode.BILINEAR, antialias=True),
        Clamp01(),
    ]
    if brightness > 0 or contrast > 0 or gamma > 0:
        steps.append(RandomIntensity(brightness, contrast, gamma))
    return v2.Compose(steps)


def resize_transform(output_size: int) -> v2.Compose:
    """The un-augmented patch at the encoder's input size (identity when sizes agree)."""
    return v2.Compose([
        v2.Resize(size=(output_size, output_size), interpolation=v2.InterpolationMode.BILINEAR,
                  antialias=True),
    ])


def resize_batch(x: torch.Tensor, output_size: int) -> torch.Tensor:
    """(B, 1, s, s) -> (B, 1, S, S) bilinear with antialias; no-op when s == S."""
    if x.shape[-1] == output_size and x.shape[-2] == output_size:
        return x
    return torch.nn.functional.interpolate(x, size=(output_size, output_size), mode="bilinear",
                                           align_corners=False, antialias=True)


class RandomIntensity(torch.nn.Module):
    """Random brightness, contrast and gamma of a grey-scale view (ours, not in Kim et al.).

    Exposure and detector response differ between radiographs; without this augmentation the
    SimCLR features separate patches by brightness, which the detector then reads as anomaly.
    Factors: brightness and contrast uniform in [1 - x, 1 + x], gamma log-uniform in
    [1/(1 + g), 1 + g] (torchvision.transforms.v2.functional).
    """

    def __init__(self, brightness: float = 0.0, contrast: float = 0.0, gamma: float = 0.0):
        super().__init__()
        for name, v in (("brightness", brightness), ("contrast", contrast), ("gamma", gamma)):
            if v < 0.0 or (name != "gamma" and v >= 1.0):
                raise ValueError(f"simclr.{name}={v} out of range")
        self.brightness, self.contrast, self.gamma = brightness, contrast, gamma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as TF

        def u(a: float, b: float) -> float:
            return float(torch.empty(1).uniform_(a, b))

        if self.brightness > 0:
            x = TF.adjust_brightness(x, u(1 - self.brightness, 1 + self.brightness))
        if self.contrast > 0:
            x = TF.adjust_contrast(x, u(1 - self.contrast, 1 + self.contrast))
        if self.gamma > 0:
            lg = math.log1p(self.gamma)
            x = TF.adjust_gamma(x.clamp(0.0, 1.0), math.exp(u(-lg, lg)))
        return x.clamp(0.0, 1.0)
