"""The flow's local score options (ours, not in Shibata et al.): likelihood-only map, z per
position against normal maps, interior region; their state survives save -> load (fast tier)."""

from __future__ import annotations

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from lightning_modules.flow_posterior.lightning_model import FlowPosteriorModule
from lightning_modules.flow_posterior.posterior import (
    interior_mask,
    likelihood_map,
    likelihood_score,
    map_score,
    normalise_map,
    position_statistics,
)
from lightning_modules.flow_posterior.scoring import score_batches
from tests.support import MapModel, auroc, fit_flow, phantom_set


def test_unsmoothed_likelihood_map_sums_to_minus_log_p_m0():
    rng = np.random.default_rng(0)
    l0 = rng.normal(size=(3, 4, 5, 5))
    np.testing.assert_allclose(likelihood_map(l0).reshape(3, -1).sum(1),
                               likelihood_score(l0.reshape(3, -1).sum(1)))
    # smoothing over the spatial axes only: a constant map stays constant
    np.testing.assert_allclose(likelihood_map(np.full((2, 6, 6), 2.0), 1.0), -2.0)


def test_interior_mask_drops_background_top_level_and_one_pixel_rim():
    x = np.zeros((1, 1, 7, 7))
    x[0, 0, 1:6, 1:6] = 100 / 255  # a 5x5 tissue block on an empty background
    m = interior_mask(x, n_bits=8)
    want = np.zeros((7, 7), bool)
    want[2:5, 2:5] = True  # eroded by one pixel (cross-shaped)
    np.testing.assert_array_equal(m[0], want)
    x[0, 0, 3, 3] = 1.0  # a pixel at the top level (bone in the brain window) is not interior,
    m = interior_mask(x, n_bits=8)  # nor are its four neighbours after the erosion
    assert not m[0, 3, 3] and not m[0, 2, 3] and not m[0, 3, 2] and m[0, 2, 2]
    v = np.zeros((2, 1, 5, 5, 5))
    v[:, :, 1:4, 1:4, 1:4] = 60 / 127
    m3 = interior_mask(v, n_bits=7)  # 3D: only the centre voxel of the 3x3x3 block
    assert m3.shape == (2, 5, 5, 5) and m3.sum() == 2 and m3[:, 2, 2, 2].all()


def test_position_statistics_are_mean_and_floored_sd_per_position():
    rng = np.random.default_rng(1)
    maps = rng.normal(size=(50, 4, 6)) * np.linspace(0.0, 2.0, 24).reshape(4, 6) + 3.0
    mean, sd = position_statistics(maps, sd_floor_quantile=0.1)
    np.testing.assert_allclose(mean, maps.mean(0))
    raw = maps.std(0)  # population SD (ddof 0)
    floor = np.quantile(raw, 0.1) + 1e-9
    np.testing.assert_allclose(sd, np.maximum(raw, floor))
    assert sd[0, 0] == pytest.approx(floor)  # the constant position is floored, not 0
    z = normalise_map(maps[:3], mean, sd)
    np.testing.assert_allclose(z, (maps[:3] - mean) / sd)
    with pytest.raises(ValueError, match="at least 2"):
        position_statistics(maps[:1])


def test_position_statistics_count_only_valid_entries():
    """glow.align: a position the registration did not reach in an image holds 0, not a
    measurement; it must not pull the mean towards 0 nor widen the SD."""
    rng = np.random.default_rng(2)
    maps = rng.normal(3.0, 1.0, size=(40, 3, 3))
    valid = rng.random((40, 3, 3)) > 0.3
    valid[:, 0, 0] = False
    valid[0, 0, 0] = True  # one valid map there: too few for statistics
    mean, sd = position_statistics(np.where(valid, maps, 0.0), 0.1, valid)
    for i, j in ((1, 1), (2, 0)):
        v = maps[valid[:, i, j], i, j]
        assert mean[i, j] == pytest.approx(v.mean())
        assert sd[i, j] == pytest.approx(max(v.std(), sd.min()))
    assert mean[0, 0] == 0.0 and sd[0, 0] == pytest.approx(sd.min())
    assert abs(mean[1, 1] - 3.0) < 0.5  # counting the zeros would give ~2.1
    with pytest.raises(ValueError, match="no position"):
        position_statistics(maps, valid=np.zeros_like(valid))


def test_the_local_score_skips_positions_the_registration_did_not_reach():
    from lightning_modules.flow_posterior.scoring import gather_scores

    a = np.zeros((2, 4, 4))
    a[:, 0, 0] = 100.0  # outside the template: unwarp's fill, whatever z it gets
    a[1, 2, 2] = 5.0  # a real finding inside
    valid = np.ones((2, 4, 4), bool)
    valid[:, 0, 0] = False
    part = {"log_p_m0": torch.zeros(2), "log_p_m1": torch.zeros(2),
            "zero_fraction": torch.zeros(2), "anomaly_map": a, "valid": valid}
    out = gather_scores([part], "local", 1 / 16)
    np.testing.assert_allclose(out.map_image_score, [0.0, 5.0])
    assert (out.anomaly_map[:, 0, 0] == 0).all() and out.anomaly_map[1, 2, 2] == 5.0  # shown as 0
    region = np.ones((2, 4, 4), bool)
    region[1, 2, 2] = False  # with an interior region as well: both must hold
    out = gather_scores([{**part, "region": region}], "local", 1 / 16)
    np.testing.assert_allclose(out.map_image_score, [0.0, 0.0])


def test_map_score_over_a_region_uses_only_its_pixels():
    a = np.arange(32.0).reshape(2, 4, 4)
    region = np.zeros((2, 4, 4), bool)
    region[0, :2] = True  # values 0..7
    # image 0: top 2 of its 8 region pixels; image 1 (empty region): top 4 of all 16
    np.testing.assert_allclose(map_score(a, 0.25, region), [6.5, 29.5])
    np.testing.assert_allclose(map_score(a, 0.25), [13.5, 29.5])


def _trainer():
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_model_summary=False, enable_progress_bar=False)


def _glow(seed: int):
    from lightning_modules.glow import GlowModule

    torch.manual_seed(seed)
    m = GlowModule({"levels": 2, "steps": 1, "hidden_channels": 8}, [1, 8, 8], n_bits=8)
    m.model.initialize_actnorm(m._flow_input(torch.rand(8, 1, 8, 8), noise=True))
    return m.eval()


def test_position_statistics_live_in_the_state_and_load_gives_identical_scores(tmp_path):
    from torch.utils.data import DataLoader

    g = torch.Generator().manual_seed(0)
    normals = torch.rand(12, 1, 8, 8, generator=g) * 0.8 + 0.1
    xt = torch.rand(6, 1, 8, 8, generator=g)
    yt = torch.tensor([0, 1] * 3)
    module = FlowPosteriorModule(_glow(0), _glow(1), score="local", map_source="likelihood",
                                 map_norm="position", map_region="interior", map_sigma=0.5)
    test = DataLoader([{"image": x, "label": y} for x, y in zip(xt, yt)], batch_size=4)
    with pytest.raises(RuntimeError, match="fit_map_statistics"):
        _trainer().test(module, test, verbose=False)
    module.fit_map_statistics(DataLoader([{"image": x} for x in normals], batch_size=5))
    trainer = _trainer()
    trainer.test(module, test, verbose=False)
    want = module.test_result
    # the same numbers by hand: z of M0's smoothed likelihood map against the normals' maps
    with torch.no_grad():
        ref = likelihood_map(module.m0.log_likelihood_map(normals).double().numpy(), 0.5)
        amap = likelihood_map(module.m0.log_likelihood_map(xt).double().numpy(), 0.5)
    mean, sd = position_statistics(ref)
    expect = map_score(normalise_map(amap, mean, sd), 0.01, interior_mask(xt.numpy(), 8))
    np.testing.assert_allclose(want.score, expect, rtol=1e-6)
    path = tmp_path / "flow_posterior.ckpt"
    trainer.save_checkpoint(path)
    loaded = FlowPosteriorModule.load(path)
    np.testing.assert_array_equal(loaded.map_mean, module.map_mean)
    np.testing.assert_array_equal(loaded.map_sd, module.map_sd)
    assert loaded.hparams.map_norm == "position" and loaded.hparams.map_region == "interior"
    pred = loaded.predict_step({"image": xt}, 0)
    np.testing.assert_allclose(pred["score"], want.score, rtol=1e-6)
    np.testing.assert_allclose(pred["map"], want.anomaly_map, rtol=1e-6)


def test_module_rejects_unknown_map_options():
    for key, bad in (("map_source", "m1"), ("map_norm", "image"), ("map_region", "body")):
        with pytest.raises(ValueError, match=key):
            FlowPosteriorModule(_glow(0), _glow(1), **{key: bad})


def test_quality_guard_likelihood_map_z_per_position_detects_and_noise_does_not():
    """Quality guard of the head-CT cpu score: a tiny real Glow M0 trained on normal phantoms,
    its likelihood map as z per position against the training normals, top 2 % over the
    interior, separates normal from abnormal phantoms; noise maps stay at chance."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from lightning_modules.glow import GlowModule

        rng = np.random.default_rng(0)
        gen = torch.Generator().manual_seed(0)
        s_normal, _ = phantom_set(rng, 128, 0)
        s_unknown, labels = phantom_set(rng, 64, 64)
        torch.manual_seed(0)
        m0 = fit_flow(GlowModule({"levels": 2, "steps": 2, "hidden_channels": 16}, [1, 16, 16],
                             n_bits=8), s_normal, 150, gen)
        kw = {"score": "local", "map_sigma": 1.0, "map_top_fraction": 0.02,
              "map_source": "likelihood", "map_region": "interior"}
        with torch.no_grad():
            ref = likelihood_map(m0.log_likelihood_map(s_normal).double().numpy(), 1.0)
        stats = position_statistics(ref)
        scores = score_batches(m0, m0, [s_unknown], progress=False, map_stats=stats, **kw)
        noise = torch.Generator().manual_seed(1)
        n0 = MapModel(lambda x: torch.randn(x.shape, generator=noise, dtype=torch.float64))
        nref = likelihood_map(n0.log_likelihood_map(s_normal).numpy(), 1.0)
        control = score_batches(n0, n0, [s_unknown], progress=False,
                                map_stats=position_statistics(nref), **kw)
    finally:
        torch.set_num_threads(threads)
    # 0.74 at the time of writing (64 + 64 items: CI about +-0.09); the body's margin varies
    # from 1 to 4 px, so part of the z comes from edges that moved, not from the lesion
    assert auroc(scores.score, labels) > 0.65
    assert 0.3 < auroc(control.score, labels) < 0.7


@pytest.mark.parametrize("source", ["posterior", "likelihood"])
def test_maps_give_the_log_likelihoods_with_one_pass_per_model(source):
    """With maps, log p(x|M) is the map's sum: the flow runs once per model and batch, and
    the global scores equal those of a run without maps."""
    from lightning_modules.flow_posterior.scoring import score_batch

    calls = {"map": 0, "sum": 0}

    class Counted(MapModel):
        def log_likelihood_map(self, x):
            calls["map"] += 1
            return super().log_likelihood_map(x)

        def log_likelihood(self, x):
            calls["sum"] += 1
            return super().log_likelihood(x)

    m0 = Counted(lambda x: -0.5 * (x - 0.4) ** 2 / 0.01)
    m1 = Counted(lambda x: -0.5 * (x - 0.6) ** 2 / 0.04)
    x = torch.rand(5, 1, 6, 6)
    plain = score_batch(m0, m1, x)
    assert calls == {"map": 0, "sum": 2}
    with_maps = score_batch(m0, m1, x, maps=True, map_source=source)
    want = {"map": 2, "sum": 2} if source == "posterior" else {"map": 1, "sum": 3}
    assert calls == want  # no model runs twice on the batch
    for k in ("log_p_m0", "log_p_m1"):
        torch.testing.assert_close(with_maps[k], plain[k])
        assert with_maps[k].dtype == torch.float32 and with_maps[k].shape == (5,)
