"""Mathematics of the Glow layers (Shibata et al., arXiv 2001.07847): invertibility and
log-determinants against brute-force Jacobians, in 2D and 3D."""

import math

import normflows as nf
import pytest
import torch

from lightning_modules.glow.layers2d import (
    ActNorm,
    AffineCouplingBlock,
    CouplingNet,
    GlowStep,
    coupling_scale,
)
from lightning_modules.glow.layers3d import InvertibleConv1x1x1, Squeeze3d
from lightning_modules.glow.torch_model import (
    bits_per_dim,
    build_glow,
    dequantize,
    estimate_memory,
    level_shapes,
    quantize,
    saved_activation_bytes,
)

pytestmark = pytest.mark.usefixtures("one_thread")


SHAPES = {2: (2, 4, 4), 3: (2, 2, 4, 4)}  # (C, H, W) / (C, D, H, W)


def brute_force_logdet(fn, x: torch.Tensor) -> float:
    """log|det J| of fn at one sample x (1, ...) via the full Jacobian, float64."""
    n = x.numel()
    jac = torch.autograd.functional.jacobian(lambda v: fn(v.view_as(x)).reshape(-1), x.reshape(-1))
    sign, logabs = torch.linalg.slogdet(jac.reshape(n, n))
    assert sign != 0
    return logabs.item()


def _randomise(module: torch.nn.Module, std: float = 0.3) -> None:
    """Non-trivial parameters (zero-init coupling outputs would make the tests vacuous)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "log_S" in name or name.endswith(".s") or name == "s":
                p.copy_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
            elif p.dim() >= 1:
                p.add_(std * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _layers(dims: int):
    c = SHAPES[dims][0]
    yield "actnorm", ActNorm((c,) + (1,) * dims)
    if dims == 2:
        yield "invconv", nf.flows.Invertible1x1Conv(c, use_lu=True)
    else:
        yield "invconv", InvertibleConv1x1x1(c)
    for sm in ("paper", "glow"):
        yield f"coupling-{sm}", AffineCouplingBlock(c, 8, dims, scale_map=sm)
    yield "step-fused", GlowStep(c, 8, dims, fused=True)
    yield "step-unfused", GlowStep(c, 8, dims, fused=False)
    yield "step-checkpointed", GlowStep(c, 8, dims, checkpointing=True)
    if dims == 3:
        yield "squeeze3d", Squeeze3d()


def _prepared(layer, dims):
    layer = layer.double()
    x = torch.randn(3, *SHAPES[dims], dtype=torch.float64) * 2 + 0.5
    for m in layer.modules():  # data-dependent init first, then perturb
        if isinstance(m, ActNorm):
            m.initialize(x)
    _randomise(layer)
    return layer, x


CASES = [(d, name) for d in (2, 3) for name, _ in _layers(d)]


def _get(dims, name):
    return dict(_layers(dims))[name]


@pytest.mark.parametrize("dims,name", CASES)
def test_layer_is_invertible(dims, name):
    layer, x = _prepared(_get(dims, name), dims)
    z, ld_inv = layer.inverse(x)
    x_rec, ld_fwd = layer(z)
    torch.testing.assert_close(x_rec, x, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.as_tensor(ld_inv + ld_fwd, dtype=torch.float64),
                               torch.zeros_like(torch.as_tensor(ld_inv + ld_fwd,
                                                                dtype=torch.float64)),
                               atol=1e-8, rtol=0)


@pytest.mark.parametrize("dims,name", CASES)
def test_layer_logdet_matches_jacobian(dims, name):
    layer, x = _prepared(_get(dims, name), dims)
    x1 = x[:1]
    _, ld = layer.inverse(x1)
    expected = brute_force_logdet(lambda v: layer.inverse(v)[0], x1)
    ld = torch.as_tensor(ld, dtype=torch.float64).reshape(-1)[0].item()
    assert ld == pytest.approx(expected, abs=1e-6, rel=1e-8)
    if name != "squeeze3d":
        assert abs(expected) > 1e-3  # the test is not vacuous


@pytest.mark.parametrize("dims", [2, 3])
def test_fused_step_equals_unfused(dims):
    fused, x = _prepared(GlowStep(SHAPES[dims][0], 8, dims, fused=True), dims)
    unfused = GlowStep(SHAPES[dims][0], 8, dims, fused=False).double()
    unfused.load_state_dict(fused.state_dict())
    z1, ld1 = fused.inverse(x)
    z2, ld2 = unfused.inverse(x)
    torch.testing.assert_close(z1, z2)
    torch.testing.assert_close(torch.as_tensor(ld1).expand(3), torch.as_tensor(ld2).expand(3))


def test_paper_scale_lies_in_open_interval():
    h = torch.cat([torch.linspace(-30, 30, 1001), torch.randn(1000) * 5]).double()
    s = coupling_scale(h, "paper")
    assert (s > 0.6).all() and (s < 1.6).all()
    assert s.min() < 0.6 + 1e-6 and s.max() > 1.6 - 1e-6  # the bounds are reached, not more
    assert coupling_scale(torch.zeros(1), "paper").item() == pytest.approx(
        1 / (1 + math.exp(0.1)) + 0.6)
    g = coupling_scale(h, "glow")
    assert (g < 1).all() and torch.allclose(g, torch.sigmoid(h + 2))


def test_paper_scale_inside_a_coupling():
    block = AffineCouplingBlock(4, 8, 2, scale_map="paper").double()
    _randomise(block, std=0.2)
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64) * 2
    _, scale = block.coupling._shift_scale(x[:, :2])
    assert (scale > 0.6).all() and (scale < 1.6).all() and scale.std() > 0.05


def test_squeeze3d_moves_each_2x2x2_block_into_channels():
    x = torch.arange(2 * 4 * 4 * 4, dtype=torch.float32).view(1, 2, 4, 4, 4)
    z, _ = Squeeze3d().inverse(x)
    assert z.shape == (1, 16, 2, 2, 2)
    # channel c*8 + 4d + 2h + w of voxel (i, j, k) = x[c, 2i+d, 2j+h, 2k+w]
    assert z[0, 8 + 4 + 0 + 1, 1, 0, 1] == x[0, 1, 3, 0, 3]


def test_2d_squeeze_layout_matches_normflows():
    x = torch.randn(2, 1, 4, 4)
    z2, _ = nf.flows.Squeeze().inverse(x)
    z3, _ = Squeeze3d().inverse(x.unsqueeze(2).repeat(1, 1, 2, 1, 1))
    torch.testing.assert_close(z3[:, :4, 0], z2)  # channels 4d + 2h + w with d = 0: 2D layout


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 4, 8, 8)])
def test_whole_flow_invertible_and_logdet(shape):
    cfg = dict(levels=2, steps=2, hidden_channels=6, coupling_scale="paper")
    model = build_glow(cfg, shape).double()
    x = torch.rand(4, *shape, dtype=torch.float64) - 0.5
    model.initialize_actnorm(x)
    _randomise(model, std=0.1)
    z, ld = model.inverse_and_log_det(x)
    x_rec, ld_f = model.forward_and_log_det(z)
    torch.testing.assert_close(x_rec, x, atol=1e-5, rtol=0)
    torch.testing.assert_close(ld + ld_f, torch.zeros_like(ld), atol=1e-8, rtol=0)

    x1 = x[:1]

    def flat_latent(v):
        return torch.cat([t.reshape(-1) for t in model.inverse_and_log_det(v)[0]])

    n = x1.numel()
    jac = torch.autograd.functional.jacobian(lambda v: flat_latent(v.view_as(x1)), x1.reshape(-1))
    expected = torch.linalg.slogdet(jac.reshape(n, n))[1]
    assert ld[0].item() == pytest.approx(expected.item(), abs=1e-6)
    # log p = log N(z; 0, I) + log|det|
    zs = torch.cat([t[:1].reshape(-1) for t in z])
    log_n = -0.5 * (zs**2).sum() - 0.5 * n * math.log(2 * math.pi)
    assert model.log_prob(x1)[0].item() == pytest.approx((log_n + expected).item(), abs=1e-6)


def test_prior_is_fixed_standard_normal_with_right_shapes():
    model = build_glow(dict(levels=3, steps=1, hidden_channels=4), (1, 16, 16))
    for q in model.q0:
        assert not list(q.parameters())
        assert torch.all(q.loc == 0) and torch.all(q.log_scale == 0)
    shapes = [tuple(q.shape) for q in model.q0]  # deepest level first
    assert shapes == [(16, 2, 2), (4, 4, 4), (2, 8, 8)]
    assert sum(math.prod(s) for s in shapes) == 16 * 16
    assert level_shapes((1, 32, 128, 128), 4)[0] == (8, 16, 64, 64)
    with pytest.raises(ValueError, match="divisible"):
        build_glow(dict(levels=3, steps=1, hidden_channels=4), (1, 12, 12))


def test_log_prob_stays_float32_under_autocast():
    model = build_glow(dict(levels=2, steps=2, hidden_channels=8), (1, 16, 16))
    x = torch.rand(2, 1, 16, 16) - 0.5
    model.initialize_actnorm(x)
    ref = model.log_prob(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp = model.log_prob(x)
    assert lp.dtype == torch.float32
    torch.testing.assert_close(lp, ref, rtol=2e-2, atol=0)


def test_dequantisation_matches_bit_depth():
    x = torch.tensor([0.0, 1 / 127, 0.5, 1.0])
    assert quantize(x, 7).tolist() == [0, 1, 64, 127]
    y = dequantize(x, 7, noise=False)
    torch.testing.assert_close(y, (torch.tensor([0, 1, 64, 127.0]) + 0.5) / 128 - 0.5)
    yn = dequantize(x.repeat(1000), 8, noise=True)
    k = quantize(x.repeat(1000), 8)
    assert ((yn + 0.5) * 256 >= k).all() and ((yn + 0.5) * 256 < k + 1).all()
    assert bits_per_dim(torch.tensor([-8 * math.log(2) * 10]), 10).item() == pytest.approx(8)


def test_meta_memory_estimate_matches_cpu_measurement():
    cfg = dict(levels=2, steps=2, hidden_channels=16, checkpointing=False)
    model = build_glow(cfg, (1, 16, 16))
    x = torch.rand(2, 1, 16, 16)
    model.initialize_actnorm(x)
    measured = saved_activation_bytes(model, x)
    est = estimate_memory(cfg, (1, 16, 16), 2)
    assert est["activations_gib"] * 2**30 == pytest.approx(measured, rel=0.02)
    ck = estimate_memory(cfg, (1, 16, 16), 2, checkpointing=True)
    assert ck["activations_gib"] < est["activations_gib"]


# --- per-position log-density map (our addition: the flow anomaly map) ------------------------

@pytest.mark.parametrize("shape,fused", [((1, 16, 16), True), ((1, 16, 16), False),
                                         ((1, 8, 16, 16), True)])
def test_log_prob_map_sums_to_log_prob(shape, fused):
    cfg = dict(levels=3 if len(shape) == 3 else 2, steps=2, hidden_channels=6,
               coupling_scale="paper", fuse_actnorm=fused)
    model = build_glow(cfg, shape).double()
    x = torch.rand(3, *shape, dtype=torch.float64) - 0.5
    model.initialize_actnorm(x)
    _randomise(model, std=0.1)
    m = model.log_prob_map(x)
    assert m.shape == (3, *shape[1:])
    torch.testing.assert_close(m.flatten(1).sum(1), model.log_prob(x), atol=1e-8, rtol=1e-10)
    # the recording switch is off again and leaves the likelihood unchanged
    assert not any(getattr(c, "record_positions", False) for c in model.modules())


def test_log_prob_map_is_local():
    """Changing one corner pixel changes the map mostly near that corner."""
    cfg = dict(levels=2, steps=2, hidden_channels=6, coupling_scale="paper")
    model = build_glow(cfg, (1, 16, 16)).double()
    x = torch.rand(1, 1, 16, 16, dtype=torch.float64) - 0.5
    model.initialize_actnorm(torch.rand(8, 1, 16, 16, dtype=torch.float64) - 0.5)
    _randomise(model, std=0.1)
    y = x.clone()
    y[0, 0, 1, 1] += 0.4
    d = (model.log_prob_map(y) - model.log_prob_map(x)).abs()[0]  # (16, 16)
    assert d[:8, :8].sum() > 5 * d[8:, 8:].sum()


def test_glow_module_map_sums_to_log_likelihood():
    from lightning_modules.glow import GlowModule

    m = GlowModule({"levels": 2, "steps": 2, "hidden_channels": 8, "intensity_norm": "rank"},
                   [1, 8, 8], n_bits=8)
    x = torch.rand(4, 1, 8, 8)
    m.model.initialize_actnorm(m._flow_input(x, noise=True))
    lm = m.log_likelihood_map(x)
    assert lm.shape == (4, 8, 8)
    torch.testing.assert_close(lm.double().flatten(1).sum(1), m.log_likelihood(x).double(),
                               atol=1e-2, rtol=1e-5)


def test_rank_normalisation_ignores_gain_and_gamma_keeps_order():
    from lightning_modules.glow.torch_model import intensity_normalize

    x = quantize(torch.rand(2, 1, 8, 8), 8) / 255
    x[:, :, :2] = 0.0  # ties (an empty border)
    y = (0.9 * x**1.2).clamp(0, 1)  # another exposure of the same image
    nx, ny = intensity_normalize(x, "rank"), intensity_normalize(y, "rank")
    torch.testing.assert_close(nx, ny)
    assert nx.min() >= 0 and nx.max() <= 1
    flat, nflat = x.flatten(1), nx.flatten(1)
    i, j = torch.argsort(flat[0])[:-1], torch.argsort(flat[0])[1:]
    assert bool((nflat[0, j] >= nflat[0, i]).all())  # increasing
    assert torch.equal(intensity_normalize(x, "none"), x)
    with pytest.raises(ValueError, match="intensity_norm"):
        intensity_normalize(x, "zscore")


@pytest.mark.parametrize("shape,voxel", [((1, 16, 32), (3, 29)), ((1, 8, 16, 32), (5, 10, 27))])
def test_log_prob_map_peaks_at_planted_lesion(shape, voxel):
    """A bright voxel planted in a random input lowers the per-position log-likelihood most at
    that voxel's block: the map is placed in the input's orientation (non-cubic shapes, so a
    transposed, flipped or mis-squeezed axis would move the peak)."""
    model = build_glow(dict(levels=2, steps=2, hidden_channels=6), shape).double()
    model.initialize_actnorm(torch.rand(8, *shape, dtype=torch.float64) - 0.5)
    _randomise(model, std=0.1)
    x = torch.rand(1, *shape, dtype=torch.float64) - 0.5
    y = x.clone()
    y[(0, 0, *voxel)] += 3.0
    drop = (model.log_prob_map(x) - model.log_prob_map(y))[0]  # (*S) > 0 where p fell
    peak = torch.nonzero(drop >= drop.max() - 1e-9)
    block = torch.tensor([v // 2 for v in voxel])  # level-0 positions cover 2 px per axis
    assert bool(((peak // 2) == block).all(1).all()), (peak.tolist(), voxel)


@pytest.mark.parametrize("shape,corner", [((1, 8, 24), (1, 4)), ((1, 8, 16, 24), (1, 2, 4))])
def test_log_prob_map_places_a_known_local_density(shape, corner):
    """With constant coupling networks every step is block-wise, so the flow's density factorises
    over the 2^L-pixel blocks of the deepest level: log p(x) = Σ_B f_B(x_B). Changing block B
    then changes the map's sum over B by exactly Δ log p, and no other block's sum."""
    levels = 2
    model = build_glow(dict(levels=levels, steps=2, hidden_channels=6), shape).double()
    model.initialize_actnorm(torch.rand(8, *shape, dtype=torch.float64) - 0.5)
    _randomise(model, std=0.3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, CouplingNet):
                m.net[-1].weight.zero_()  # h = bias: a constant per-channel affine coupling
    g = torch.Generator().manual_seed(3)
    x = torch.rand(1, *shape, dtype=torch.float64, generator=g) - 0.5
    b = 2**levels
    dims = len(shape) - 1
    pool = {2: torch.nn.functional.avg_pool2d, 3: torch.nn.functional.avg_pool3d}[dims]

    def block_sums(m):  # (1, *S) -> (*S / b) sums over each deepest-level block
        return pool(m[:, None], b)[0, 0] * b**dims

    base = block_sums(model.log_prob_map(x))
    y = x.clone()
    sl = (0, 0, *(slice(c * b, (c + 1) * b) for c in corner))
    y[sl] = torch.rand(y[sl].shape, dtype=torch.float64, generator=g) - 0.5
    changed = block_sums(model.log_prob_map(y)) - base  # block `corner`: off-centre, asymmetric
    expected = torch.zeros_like(changed)
    expected[corner] = model.log_prob(y) - model.log_prob(x)
    torch.testing.assert_close(changed, expected, atol=1e-9, rtol=1e-9)
