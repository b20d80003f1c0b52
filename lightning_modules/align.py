"""Pose alignment of radiographs to a template of the normal training images (in neither
paper; ``patch.align=similarity`` for the patch detector, ``glow.align=similarity`` for the 2D
flow posterior).

The paper compares a patch with the normal patches at the same grid position (within a small
locality window), so it assumes every radiograph shows the patient in the same place. Real
positioning varies: rotation of a few degrees, shifts, magnification. The benchmark's hard
chest phantoms (experiments/benchmarks/detection.py) carry exactly that variation, and with it
switched off the patch detector's test AUROC on dev seed 100 rose from 0.73 to 0.92 (the
enlarged heart from 0.54 to 0.86): pose, not the encoders, is what the score was mostly
measuring. A flow trained on a few hundred images spends its capacity on the same nuisance. This module removes it the usual way of atlas-based pipelines: each image is mapped
onto a template by the similarity transform (rotation, isotropic scale, translation) that
maximises the normalised cross-correlation (NCC) with the template, found by gradient ascent
from the identity, coarse to fine; the template is the mean of the normal training images after
a few rounds of aligning them to their own mean (group-wise registration), kept at their
average pose.

torch only (``affine_grid`` / ``grid_sample``): neither torchvision nor the field's libraries
here offer intensity-based registration, and a similarity transform of a few hundred small
images needs nothing more. It is written for anatomy that fills most of the image (radiographs);
a transform is limited to ±20°, scale 0.75–1.33 and shifts of ±25 % of the image.

``mode="affine"`` (``patch.align=affine`` / ``glow.align=affine``) adds the two remaining degrees
of freedom of a 2D affine map, an aspect ratio (log, ±log 1.25) and a shear (±0.25), so body
habitus (a wider or narrower thorax at the same height) is normalised as well; the pose vector
is then (B, 6), the similarity's four followed by the two.

Volumes (B, C, D, H, W) (``glow.align`` for head CT, our choice) get one in-plane transform per
volume, the same for every slice: their slices are registered together as the channels of one
2D image. That is the head pose the axial acquisition varies most (rotation about the
cranio-caudal axis, shift, size); a tilt out of the axial plane is not corrected.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lightning_modules.patch_detector.config import ALIGN_MODES

__all__ = ["ALIGN_MODES", "align_poses", "coverage", "estimate_pose", "fit_template", "ncc", "unwarp",
           "warp"]
_MAX_ANGLE = math.radians(20.0)
_MAX_LOG_SCALE = math.log(4.0 / 3.0)
_MAX_SHIFT = 0.5  # in affine_grid units ([-1, 1] spans the image): 25 % of the side
_MAX_LOG_ASPECT = math.log(1.25)  # mode="affine" only
_MAX_SHEAR = 0.25
_LEVELS = ((32, 60), (64, 40))  # (registration side, gradient steps), coarse to fine
N_PARAMS = {"similarity": 4, "affine": 6}  # pose vector length per mode


def _clamp(p: torch.Tensor) -> torch.Tensor:
    lim = p.new_tensor([_MAX_ANGLE, _MAX_LOG_SCALE, _MAX_SHIFT, _MAX_SHIFT, _MAX_LOG_ASPECT,
                        _MAX_SHEAR][:p.shape[1]])
    return torch.maximum(torch.minimum(p, lim), -lim)


def theta(p: torch.Tensor) -> torch.Tensor:
    """(B, 4) (angle, log scale, tx, ty) or (B, 6) (..., log aspect k, shear h) -> (B, 2, 3)
    ``affine_grid`` matrices. The matrix maps template (output) coordinates to image (input)
    coordinates: x_img = s R(a) [[e^k, h], [0, e^-k]] x_tpl + t (k = h = 0 for four values)."""
    p = _clamp(p)
    a, log_s, tx, ty = p[:, :4].unbind(1)
    s = log_s.exp()
    c, si = a.cos() * s, a.sin() * s
    if p.shape[1] == 4:
        return torch.stack([torch.stack([c, -si, tx], 1), torch.stack([si, c, ty], 1)], 1)
    k, h = p[:, 4].exp(), p[:, 5]
    ik = 1.0 / k  # s R(a) @ [[k, h], [0, 1/k]]
    return torch.stack([torch.stack([c * k, c * h - si * ik, tx], 1),
                        torch.stack([si * k, si * h + c * ik, ty], 1)], 1)


def _planes(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) unchanged; a volume (B, C, D, H, W) as (B, C * D, H, W): its slices become
    channels, so one in-plane transform moves them all."""
    return x.flatten(1, -3) if x.dim() > 4 else x


def warp(images: torch.Tensor, p: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """(B, C, H, W) or volumes (B, C, D, H, W) resampled onto the template frame by the poses
    ``p`` (B, 4 or 6), in plane; outside the image the border values are repeated. ``mode``:
    ``grid_sample``'s interpolation; bicubic keeps small images sharper (bilinear blurs by an
    amount that depends on each image's sub-pixel shift) but may overshoot the input's range
    slightly."""
    x = _planes(images)
    grid = F.affine_grid(theta(p).to(x.dtype), list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode=mode, padding_mode="border", align_corners=False)
    return out.reshape(images.shape)


def coverage(p: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, 1, H, W): how much of each template-frame pixel :func:`warp` took from inside the
    image (1 inside, 0 where it only repeated the border, between at the edge) for poses ``p``
    (B, 4 or 6) and a template of ``size`` (H, W)."""
    shape = [p.shape[0], 1, *size]
    grid = F.affine_grid(theta(p).float(), shape, align_corners=False)
    ones = torch.ones(shape, dtype=grid.dtype, device=grid.device)
    return F.grid_sample(ones, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def ncc(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Normalised cross-correlation per image of (B, ...) and (B or 1, ...) -> (B,)."""
    a = a.flatten(1) - a.flatten(1).mean(1, keepdim=True)
    b = b.flatten(1) - b.flatten(1).mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)


def estimate_pose(images: torch.Tensor, template: torch.Tensor, lr: float = 0.03,
                  mode: str = "similarity") -> torch.Tensor:
    """Poses (B, 4) (``mode="similarity"``) or (B, 6) (``"affine"``) that map each of ``images``
    (B, 1, H, W) onto ``template`` (1, 1, H', W'): NCC ascent (Adam) from the identity, at 32²
    then 64² (area-resampled). Volumes (B, 1, D, H, W) onto (1, 1, D, H, W): one in-plane pose
    per volume, its slices registered together.
    Non-finite pixels are refused (ValueError): they have no pose, and grid_sample's backward
    on them can crash the process rather than raise."""
    bad = ~torch.isfinite(images.flatten(1)).all(1)
    if bad.any() or not torch.isfinite(template).all():
        where = "the template" if not bad.any() else \
            f"image(s) {bad.nonzero().flatten().tolist()} of the batch"
        raise ValueError(f"estimate_pose: non-finite pixel values in {where}")
    # Lightning scores under inference mode, which enable_grad alone does not lift; the
    # inputs are cloned out of it so autograd may save them
    with torch.inference_mode(False), torch.enable_grad():
        images, template = _planes(images).clone(), _planes(template).clone()
        if mode not in N_PARAMS:
            raise ValueError(f"estimate_pose: mode={mode!r} is not one of {list(N_PARAMS)}")
        p = images.new_zeros(images.shape[0], N_PARAMS[mode], dtype=torch.float32)
        for side, steps in _LEVELS:
            x = F.interpolate(images.float(), size=(side, side), mode="area")
            t = F.interpolate(template.float(), size=(side, side), mode="area")
            p = p.detach().requires_grad_(True)
            opt = torch.optim.Adam([p], lr=lr)
            for _ in range(steps):
                loss = -ncc(warp(x, p), t).sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
    return _clamp(p.detach())


def align_poses(images: torch.Tensor, template: torch.Tensor, mode: str = "bilinear",
                transform: str = "similarity") -> tuple[torch.Tensor, torch.Tensor]:
    """``images`` (B, 1, H, W) aligned to ``template`` at their own resolution (interpolated
    by ``mode``, see :func:`warp`) by a ``transform`` (similarity | affine), and the poses that
    did it (for :func:`unwarp`)."""
    p = estimate_pose(images, template, mode=transform)
    return warp(images.float(), p, mode).to(images.dtype), p


def unwarp(maps: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`warp`: (B, C, H, W) or (B, C, D, H, W) in the template frame ->
    each image's frame (0 outside the template)."""
    fwd = theta(p)  # (B, 2, 3); as a 3x3 homogeneous matrix it is inverted exactly
    last = fwd.new_tensor([0.0, 0.0, 1.0]).expand(fwd.shape[0], 1, 3)
    m = torch.linalg.inv(torch.cat([fwd, last], 1))[:, :2]
    x = _planes(maps)
    grid = F.affine_grid(m.to(x.dtype), list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.reshape(maps.shape)


def fit_template(images: torch.Tensor, rounds: int = 3, mode: str = "similarity"
                 ) -> torch.Tensor:
    """Group-wise template (1, 1, H, W) of normal images (N, 1, H, W) (or (1, 1, D, H, W) of
    volumes (N, 1, D, H, W)): the mean, then ``rounds``
    times the mean of the images aligned to it (by ``mode``'s transform), with the poses centred
    on their average so the template keeps the group's average position, size and shape rather
    than drifting."""
    t = images.float().mean(0, keepdim=True)
    for _ in range(rounds):
        p = estimate_pose(images, t, mode=mode)
        t = warp(images.float(), p - p.mean(0, keepdim=True)).mean(0, keepdim=True)
    return t
