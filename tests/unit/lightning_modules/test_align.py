"""Pose alignment (patch.align=similarity): the registration undoes a known similarity
transform, the inverse warp brings maps back, the template keeps the group's average pose."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from datamodules.phantoms import make_cxr
from lightning_modules.align import (
    align_poses,
    estimate_pose,
    fit_template,
    ncc,
    theta,
    unwarp,
    warp,
)
from lightning_modules.patch_detector.intensity import rank_normalize


def _chest(seed: int, size: int = 64) -> torch.Tensor:
    img = make_cxr(np.random.default_rng(seed), size, style="default")[0]
    return rank_normalize(torch.from_numpy(np.ascontiguousarray(img)).float()[None, None])


def _centre(x: torch.Tensor, margin: int = 12) -> torch.Tensor:
    return x[..., margin:-margin, margin:-margin]


@pytest.mark.parametrize("pose", [(0.09, 0.06, 0.12, -0.1), (-0.1, -0.08, -0.08, 0.14)])
def test_registration_undoes_a_known_pose(pose):
    x = _chest(3)
    moved = warp(x, torch.tensor([pose]))  # rotated ~5 deg, scaled ~7 %, shifted ~5 %
    aligned, p = align_poses(moved, x)
    before, after = ncc(_centre(moved), _centre(x)).item(), ncc(_centre(aligned), _centre(x)).item()
    assert after > 0.98 and after > before + 0.1, (before, after)
    # the estimate is the inverse pose: angle and log-scale negated (to a few per cent)
    assert p[0, 0].item() == pytest.approx(-pose[0], abs=0.02)
    assert p[0, 1].item() == pytest.approx(-pose[1], abs=0.02)
    # an image already at the template's pose stays (nearly) where it is
    assert estimate_pose(x, x).abs().max().item() < 0.02


def test_unwarp_inverts_warp():
    torch.manual_seed(0)
    m = torch.nn.functional.interpolate(torch.rand(2, 1, 8, 8), size=(64, 64), mode="bicubic")
    p = torch.tensor([[0.1, 0.05, 0.1, -0.05], [-0.05, -0.1, -0.1, 0.1]])
    back = unwarp(warp(m, p), p)
    assert torch.allclose(_centre(back, 16), _centre(m, 16), atol=0.03)
    assert not torch.allclose(_centre(warp(m, p), 16), _centre(m, 16), atol=0.03)


def test_template_keeps_the_average_pose_of_the_group():
    """Copies of one chest at symmetric shifts: the template is that chest where it was, not
    the blurred mean and not moved to one copy's pose."""
    x = _chest(5)
    shifts = torch.tensor([[0.0, 0.0, d, e] for d in (-0.12, 0.12) for e in (-0.1, 0.1)])
    group = warp(x.repeat(4, 1, 1, 1), shifts)
    mean = group.mean(0, keepdim=True)
    t = fit_template(group)
    assert ncc(_centre(t), _centre(x)).item() > 0.97
    assert ncc(_centre(t), _centre(x)).item() > ncc(_centre(mean), _centre(x)).item() + 0.05


def test_estimate_pose_refuses_non_finite_pixels_instead_of_crashing():
    x = torch.rand(3, 1, 32, 32)
    x[1, 0, 5, 5] = float("nan")
    with pytest.raises(ValueError, match=r"image\(s\) \[1\]"):
        estimate_pose(x, torch.rand(1, 1, 32, 32))
    with pytest.raises(ValueError, match="template"):
        estimate_pose(torch.rand(2, 1, 32, 32), torch.full((1, 1, 32, 32), float("inf")))


def test_affine_pose_with_no_aspect_or_shear_is_the_similarity():
    p = torch.tensor([[0.1, 0.05, 0.1, -0.05], [-0.05, -0.1, -0.1, 0.1]])
    six = torch.cat([p, torch.zeros(2, 2)], 1)
    torch.testing.assert_close(theta(six), theta(p))
    # aspect k stretches x by e^k and y by e^-k (before rotation and scale); shear adds h*y to x
    m = theta(torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.2, 0.1]]))[0]
    torch.testing.assert_close(m[:, :2], torch.tensor([[math.exp(0.2), 0.1],
                                                       [0.0, math.exp(-0.2)]]))


def test_affine_registration_undoes_a_wider_thorax_that_the_similarity_cannot():
    """A chest stretched sideways (aspect e^0.15, shear 0.08: a wider habitus, not a larger
    patient): the affine mode recovers it, the similarity mode only approximates it."""
    x = _chest(4)
    moved = warp(x, torch.tensor([[0.05, 0.03, 0.05, -0.04, 0.15, 0.08]]))
    sim, _ = align_poses(moved, x, transform="similarity")
    aff, p = align_poses(moved, x, transform="affine")
    n_sim, n_aff = (ncc(_centre(a), _centre(x)).item() for a in (sim, aff))
    assert p.shape == (1, 6)
    assert n_aff > 0.98 and n_aff > n_sim + 0.1, (n_sim, n_aff)
    assert p[0, 4].item() == pytest.approx(-0.15, abs=0.04)  # the inverse aspect


def test_estimate_pose_refuses_an_unknown_mode():
    with pytest.raises(ValueError, match="mode='rigid'"):
        estimate_pose(torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32), mode="rigid")


def _head(seed: int, shape=(4, 32, 32)) -> torch.Tensor:
    from datamodules.phantoms import make_head_ct

    hu = make_head_ct(np.random.default_rng(seed), shape)[0]
    return torch.from_numpy(np.clip(hu + 14.0, 0, 127) / 127.0).float()[None, None]


def test_a_volume_moves_as_its_slices_do_and_its_in_plane_pose_is_recovered():
    """Volumes (B, 1, D, H, W): one in-plane pose per volume. Warping the volume equals warping
    each slice by that pose (a fold of D into the wrong axis would mix slices), unwarp inverts
    it (as it does each slice), and registration undoes a known pose."""
    v = _head(0)
    p = torch.tensor([[0.2, 0.08, 0.15, -0.1]])  # ~11 deg, x1.08, shifts of 7 % / 5 %
    moved = warp(v, p)
    per_slice = torch.stack([warp(v[:, :, k], p) for k in range(v.shape[2])], 2)
    torch.testing.assert_close(moved, per_slice)
    back = unwarp(moved, p)
    torch.testing.assert_close(back, torch.stack([unwarp(moved[:, :, k], p)
                                                  for k in range(v.shape[2])], 2))
    assert ncc(_centre(back, 8), _centre(v, 8)).item() > 0.9
    aligned, q = align_poses(moved, v)
    before, after = ncc(moved, v).item(), ncc(aligned, v).item()
    assert after > 0.95 and after > before + 0.2, (before, after)
    # q maps the template frame into the moved volume: the inverse of p's map
    last = torch.tensor([[[0.0, 0.0, 1.0]]])
    inverse = torch.linalg.inv(torch.cat([theta(p), last], 1))[:, :2]
    torch.testing.assert_close(theta(q), inverse, atol=0.03, rtol=0)
    assert fit_template(torch.cat([_head(s) for s in range(3)])).shape == (1, 1, 4, 32, 32)


def test_coverage_is_one_inside_the_image_and_zero_where_warp_repeats_the_border():
    from lightning_modules.align import coverage

    assert torch.equal(coverage(torch.zeros(1, 4), (8, 8)), torch.ones(1, 1, 8, 8))
    c = coverage(torch.tensor([[0.0, 0.0, 0.5, 0.0]]), (8, 8))  # shifted by a quarter
    # the template's right quarter samples beyond the image's right edge
    assert (c[0, 0, :, -2:] == 0).all() and (c[0, 0, :, :5] == 1).all()
    x = torch.rand(1, 1, 8, 8)
    moved = warp(x, torch.tensor([[0.0, 0.0, 0.5, 0.0]]))
    torch.testing.assert_close(moved[0, 0, :, -1], moved[0, 0, :, -2])  # border repeated
