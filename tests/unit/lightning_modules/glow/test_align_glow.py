"""glow.align=similarity (ours): the pose template of S_normal travels in every Glow
checkpoint, M0 and M1 share it, per-pixel maps come back in each image's own frame, and the
posterior refuses two models aligned to different templates."""

import numpy as np
import pytest
import torch

from datamodules.phantoms import make_cxr
from experiments.config import ConfigError
from experiments.flow_models import fingerprint
from experiments.train_glow import PoseAligned, fit_align_template, train
from lightning_modules.align import fit_template, unwarp, warp
from lightning_modules.flow_posterior import PreprocessingMismatch, check_models
from lightning_modules.glow import GlowModule, load_glow
from tests.support import TINY_2D, FakeDM, glow_cfg

pytestmark = pytest.mark.usefixtures("one_thread")

ALIGN = [*TINY_2D, "glow.align=similarity", "trainer.max_epochs=1"]


def _glow(size: int = 32, align: str = "similarity") -> GlowModule:
    cfg = {"levels": 2, "steps": 2, "hidden_channels": 16, "align": align}
    return GlowModule(glow=cfg, input_shape=[1, size, size], n_bits=8)


def _chest(seed: int, size: int = 32) -> torch.Tensor:
    img = make_cxr(np.random.default_rng(seed), size, style="default")[0]
    return torch.from_numpy(np.ascontiguousarray(img)).float()[None, None]


def test_m0_and_m1_share_the_template_of_s_normal_and_keep_it_in_their_checkpoints(out_dir):
    m0 = glow_cfg(out_dir / "m0", "cxr", ALIGN)
    dm = FakeDM(m0.data, n=8)
    template = fit_align_template(m0, dm)
    normals = torch.stack([torch.from_numpy(dm.load(it)) for it in dm.items("train", "normal")])
    torch.testing.assert_close(template, fit_template(normals[:, None]))
    g0 = load_glow(train(m0, datamodule=dm))
    m1 = glow_cfg(out_dir / "m1", "cxr", [*ALIGN, "glow.model=m1"])
    g1 = load_glow(train(m1, datamodule=dm))  # trains on train/mixture, aligns to S_normal
    for g in (g0, g1):
        assert g.has_template
        torch.testing.assert_close(g.align_template, template)
    check_models(g0, g1)  # same template: accepted


@pytest.mark.parametrize("mode", ["similarity", "affine"])
def test_training_items_are_aligned_exactly_as_the_scorer_aligns_them(mode):
    """PoseAligned (training, poses estimated once) and GlowModule.align_input (scoring) must
    give the flow the same image, or M0 would be scored on inputs unlike its training set."""
    g = _glow(align=mode)
    g.set_template(_chest(0))
    images = [warp(_chest(s), torch.tensor([[0.05 * s, 0.0, 0.1, -0.1, 0.05 * s, 0.0]]))
              for s in range(1, 4)]
    base = [{"image": x[0], "label": 0} for x in images]
    aligned = PoseAligned(base, g.align_template, batch_size=2, mode=mode)
    scored, poses = g.align_input(torch.cat(images))
    assert poses.shape == (3, 4 if mode == "similarity" else 6)
    torch.testing.assert_close(aligned.poses, poses, atol=1e-4, rtol=0)
    for i in range(len(base)):
        torch.testing.assert_close(aligned[i]["image"], scored[i], atol=1e-4, rtol=0)
        assert not torch.allclose(aligned[i]["image"], images[i][0], atol=1e-2)
    assert 0.0 <= scored.min() and scored.max() <= 1.0


def test_posterior_refuses_models_aligned_to_different_templates():
    a, b, plain = _glow(), _glow(), _glow(align="none")
    a.set_template(_chest(1))
    b.set_template(_chest(2))
    with pytest.raises(PreprocessingMismatch, match="different pose templates"):
        check_models(a, b)
    with pytest.raises(PreprocessingMismatch, match="align"):
        check_models(a, plain)  # one aligned, one not: the signatures differ
    affine = _glow(align="affine")
    affine.set_template(_chest(1))
    with pytest.raises(PreprocessingMismatch, match="align"):
        check_models(a, affine)  # same template, another transform
    b.set_template(_chest(1))
    check_models(a, b)


def test_an_aligned_glow_without_a_template_refuses_to_score():
    with pytest.raises(RuntimeError, match="no pose template"):
        _glow().log_likelihood(torch.rand(2, 1, 32, 32))


def test_the_likelihood_map_of_a_moved_image_moves_with_it():
    """The map is computed on the aligned image and resampled back: for an image moved by a
    pose p the map is (nearly) the original map moved by p, not the original map itself (as
    it would be if the map stayed in the template's frame)."""
    g = _glow()
    x = _chest(0)
    g.set_template(x)
    g.model.initialize_actnorm(g._flow_input(torch.cat([_chest(s) for s in range(8)]), True))
    p = torch.tensor([[0.1, 0.05, 0.3, -0.2]])  # 6 degrees, x1.05, shifts of 15 % / 10 %
    moved = warp(x, p)
    m_x, m_moved = g.log_likelihood_map(torch.cat([x, moved]))
    expected = warp(m_x[None, None], p)[0, 0]
    inner = (slice(6, -6), slice(6, -6))

    def corr(a, b):
        return float(np.corrcoef(a[inner].flatten(), b[inner].flatten())[0, 1])

    assert corr(m_moved, expected) > 0.8
    assert corr(m_moved, expected) > corr(m_moved, m_x) + 0.2


def test_scores_with_maps_keep_the_log_likelihood_of_the_aligned_image():
    """The map is resampled back onto each image, which changes its sum by the pose's area
    change (scale 0.9-1.1: hundreds of nats); log p(x|M) must still be the flow's own, as
    without maps, not that sum."""
    from lightning_modules.flow_posterior.scoring import score_batch

    m0, m1 = _glow(), _glow()
    for g in (m0, m1):
        g.set_template(_chest(0))
        g.model.initialize_actnorm(g._flow_input(torch.cat([_chest(s) for s in range(8)]), True))
    x = torch.cat([warp(_chest(s), torch.tensor([[0.1, 0.08 * (s - 2), 0.1, -0.1]]))
                   for s in range(1, 5)])
    plain, with_maps = score_batch(m0, m1, x), score_batch(m0, m1, x, maps=True)
    for k, m in (("log_p_m0", m0), ("log_p_m1", m1)):
        torch.testing.assert_close(with_maps[k], m.log_likelihood(x))
        torch.testing.assert_close(with_maps[k], plain[k])
    lp, lp_map = m0.log_likelihood_and_map(x)
    torch.testing.assert_close(lp_map, m0.log_likelihood_map(x))
    assert (lp_map.flatten(1).sum(1) - lp).abs().max() > 50  # the resampled map's sum is not it


def test_align_takes_images_or_volumes_and_map_frame_template_needs_it():
    for shape in ([1, 8, 8, 8], [1, 8, 8]):  # a volume and an image are accepted
        GlowModule(glow={"levels": 1, "steps": 1, "hidden_channels": 4, "align": "similarity"},
                   input_shape=shape, n_bits=7)
    glow_cfg("/tmp/unused", "bct", ["glow.align=similarity", "glow.map_frame=template"])
    with pytest.raises(ConfigError, match="glow.map_frame=template"):
        glow_cfg("/tmp/unused", "cxr", ["glow.align=none", "glow.map_frame=template"])


def _pair(align: str = "similarity") -> tuple[GlowModule, GlowModule]:
    pair = (_glow(align=align), _glow(align=align))
    for g in pair:
        if align != "none":
            g.set_template(_chest(0))
        g.model.initialize_actnorm(g._flow_input(torch.cat([_chest(s) for s in range(8)]), True))
    return pair


def test_map_frame_template_scores_the_maps_where_the_flow_saw_them():
    """map_frame=template: the batch is registered once, both models score that same input,
    and the map stays in the template's frame, where it sums to log p(x|M) exactly (each map
    is M's per-pixel contributions); gather_scores maps it back onto each image only after
    the image score is taken there. Would fail if the map were resampled in score_batch (its
    sum then moves by hundreds of nats) or if the log-likelihoods differed from the per-model
    registration's."""
    from lightning_modules.flow_posterior.posterior import map_score
    from lightning_modules.flow_posterior.scoring import gather_scores, score_batch

    m0, m1 = _pair()
    x = torch.cat([warp(_chest(s), torch.tensor([[0.1, 0.08 * (s - 2), 0.1, -0.1]]))
                   for s in range(1, 5)])
    image = score_batch(m0, m1, x, maps=True, map_sigma=0.0, map_source="likelihood")
    tpl = score_batch(m0, m1, x, maps=True, map_sigma=0.0, map_source="likelihood",
                      map_frame="template")
    assert "poses" in tpl and "poses" not in image
    from lightning_modules.align import coverage

    np.testing.assert_array_equal(tpl["valid"],
                                  (coverage(tpl["poses"], (32, 32)) > 1 - 1e-3)[:, 0].numpy())
    _, poses = m0.align_input(x)
    torch.testing.assert_close(tpl["poses"], poses)
    for k in ("log_p_m0", "log_p_m1"):
        torch.testing.assert_close(tpl[k], image[k])
    # likelihood map (-l0): its sum over the template frame is -log p(x|M0)
    np.testing.assert_allclose(tpl["anomaly_map"].reshape(4, -1).sum(1),
                               -tpl["log_p_m0"].double().numpy(), rtol=1e-5)
    assert np.abs(image["anomaly_map"].reshape(4, -1).sum(1)
                  + image["log_p_m0"].double().numpy()).max() > 50
    out = gather_scores([tpl], "local", 0.05)
    np.testing.assert_allclose(out.map_image_score,
                               map_score(tpl["anomaly_map"], 0.05, tpl["valid"]))
    shown = unwarp(torch.from_numpy(np.where(tpl["valid"], tpl["anomaly_map"], 0.0))[:, None],
                   poses.double())[:, 0]
    np.testing.assert_allclose(out.anomaly_map, shown.numpy())
    # without glow.align the template frame is the image's: identical to map_frame=image
    p0, p1 = _pair("none")
    a = score_batch(p0, p1, x, maps=True, map_frame="template")
    b = score_batch(p0, p1, x, maps=True)
    assert "poses" not in a
    np.testing.assert_allclose(a["anomaly_map"], b["anomaly_map"])


def test_scoring_registers_once_and_marks_what_the_template_did_not_reach():
    """score_batch registers the batch once for both models and maps each model's map back
    itself: the result must equal the model's own log_likelihood_map (which registers and
    maps back alone); ``valid`` is False exactly where the map back had nothing to sample
    (a strongly shifted image leaves a border outside the template)."""
    from lightning_modules.flow_posterior.scoring import score_batch

    m0, m1 = _pair()
    x = torch.cat([warp(_chest(s), torch.tensor([[0.05, 0.1, 0.3 * (s - 2), -0.2]]))
                   for s in range(1, 4)])
    out = score_batch(m0, m1, x, maps=True, map_sigma=0.0, map_source="likelihood")
    np.testing.assert_allclose(out["anomaly_map"], -m0.log_likelihood_map(x).double().numpy(),
                               rtol=1e-5, atol=1e-4)
    _, poses = m0.align_input(x)
    cover = unwarp(torch.ones_like(x), poses)[:, 0].numpy()
    np.testing.assert_array_equal(out["valid"], cover > 1 - 1e-3)
    assert 0 < (~out["valid"]).sum() < out["valid"].size / 2
    post = score_batch(m0, m1, x, maps=True)
    assert "valid" in post and np.isfinite(post["anomaly_map"]).all()


def test_a_volume_glow_registers_in_plane_and_scores_in_the_template_frame():
    """Head CT (glow.align on (1, D, H, W)): one in-plane pose per volume; a volume moved by a
    pose is brought back onto the template (NCC up), every slice moved alike."""
    from datamodules.phantoms import make_head_ct
    from lightning_modules.align import ncc
    from lightning_modules.flow_posterior.scoring import score_batch

    rng = np.random.default_rng(0)
    vols = torch.stack([torch.from_numpy(np.clip(make_head_ct(rng, (4, 16, 16))[0] + 14.0, 0,
                                                 127) / 127.0).float() for _ in range(6)])[:, None]
    cfg = {"levels": 1, "steps": 2, "hidden_channels": 8, "align": "similarity"}
    m0, m1 = (GlowModule(glow=cfg, input_shape=[1, 4, 16, 16], n_bits=7) for _ in range(2))
    for g in (m0, m1):
        g.set_template(fit_template(vols))
        g.model.initialize_actnorm(g._flow_input(vols, True))
    moved = warp(vols[:2], torch.tensor([[0.2, 0.1, 0.2, -0.1], [-0.2, -0.05, -0.1, 0.2]]))
    back, poses = m0.align_input(moved)
    t = m0.align_template
    assert (ncc(back, t) > ncc(moved, t) + 0.1).all()
    assert poses.shape == (2, 4)
    out = score_batch(m0, m1, moved, n_bits=7, maps=True, map_frame="template",
                      map_source="likelihood", map_region="interior")
    assert out["anomaly_map"].shape == (2, 4, 16, 16) and out["region"].shape == (2, 4, 16, 16)
    torch.testing.assert_close(out["poses"], poses)
    assert out["valid"].shape == (2, 4, 16, 16) and not out["valid"].all()
    assert (out["valid"] == out["valid"][:, :1]).all()  # one in-plane mask for every slice


def test_the_model_fingerprint_follows_the_template(out_dir):
    cfg = glow_cfg(out_dir, "cxr", ALIGN)
    items = FakeDM(cfg.data, n=4).items("train", "mixture")
    a, b = _chest(1), _chest(2)
    fa = fingerprint(cfg, items, None, None, "best", a)
    assert fa == fingerprint(cfg, items, None, None, "best", a.clone())
    assert fa["template"] != fingerprint(cfg, items, None, None, "best", b)["template"]
    assert fingerprint(cfg, items, None, None, "best")["template"] is None
