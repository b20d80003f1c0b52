"""openai/glow's recipe as options (Shibata et al. ran "the original Glow code"): Adamax, the
linear warm-up, and the coupling network with ActNorm and a zero-initialised conv with a learned
log-scale; plus the held-out validation and rotation copies of train_glow."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from lightning_modules.glow import GlowModule, build_glow
from lightning_modules.glow.layers2d import (
    LOGSCALE_FACTOR,
    ActNormLayer,
    AffineCouplingBlock,
    CouplingNet,
    ZeroConv,
    coupling_scale,
)
from lightning_modules.optim import build_optimizer, build_scheduler, warmup_factor
from tests.support import FakeDM

GLOW = dict(levels=2, steps=2, hidden_channels=8, coupling_scale="paper")


def test_warmup_lr_at_step_k_is_lr_k_over_warmup_steps_then_constant():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = build_optimizer("adamax", [p], lr=1e-3)
    sched = build_scheduler(opt, "warmup", warmup_steps=8, total_steps=40)
    lrs = []
    for _ in range(40):
        lrs.append(opt.param_groups[0]["lr"])
        p.grad = torch.ones(3)
        opt.step()
        sched.step()
    for k, lr in enumerate(lrs):  # openai/glow: lr * min(1, n_processed / n_warmup)
        assert lr == pytest.approx(1e-3 * min(1.0, k / 8), abs=1e-15), k
    assert lrs[0] == 0.0 and lrs[8:] == [pytest.approx(1e-3)] * 32
    assert warmup_factor(5, 0) == 1.0


def test_adamax_step_is_the_infinity_norm_update():
    """Two steps against the hand-written Adamax (Kingma & Ba, Alg. 2; openai/glow's adamax):
    m = b1 m + (1 - b1) g, u = max(b2 u, |g|), w -= lr / (1 - b1^t) * m / (u + eps)."""
    w0 = torch.tensor([0.5, -1.0, 2.0])
    grads = [torch.tensor([0.3, -2.0, 0.1]), torch.tensor([-1.0, 0.5, 0.2])]
    p = torch.nn.Parameter(w0.clone())
    opt = build_optimizer("adamax", [p], lr=0.1)
    assert isinstance(opt, torch.optim.Adamax)
    b1, b2, eps, lr = 0.9, 0.999, 1e-8, 0.1
    w, m, u = w0.clone(), torch.zeros(3), torch.zeros(3)
    for t, g in enumerate(grads, start=1):
        p.grad = g.clone()
        opt.step()
        m = b1 * m + (1 - b1) * g
        u = torch.maximum(b2 * u, g.abs() + eps)
        w = w - lr / (1 - b1**t) * m / u
    torch.testing.assert_close(p.detach(), w)
    # Adam would differ at step 2 (second moment instead of the infinity norm)
    q = torch.nn.Parameter(w0.clone())
    adam = build_optimizer("adam", [q], lr=0.1)
    for g in grads:
        q.grad = g.clone()
        adam.step()
    assert not torch.allclose(q.detach(), w)


def test_glow_module_uses_adamax_with_warmup_over_epochs():
    m = GlowModule(GLOW, [1, 8, 8], optim={"name": "adamax", "lr": 1e-3, "scheduler": "warmup",
                                           "warmup_epochs": 2})
    m.trainer = SimpleNamespace(estimated_stepping_batches=50, max_epochs=10)  # 5 steps/epoch
    cfg = m.configure_optimizers()
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    assert isinstance(opt, torch.optim.Adamax) and cfg["lr_scheduler"]["interval"] == "step"
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:11] == pytest.approx([1e-3 * min(1, k / 10) for k in range(11)])
    # today's default stays Adam without a schedule
    assert type(GlowModule(GLOW, [1, 8, 8]).configure_optimizers()) is torch.optim.Adam


@pytest.mark.parametrize("dims", [2, 3])
def test_zero_conv_applies_the_learned_log_scale_times_3(dims):
    zc = ZeroConv(4, 6, dims)
    x = torch.randn(2, 4, *(5,) * dims)
    assert torch.count_nonzero(zc(x)) == 0  # zero-initialised
    with torch.no_grad():
        zc.conv.weight.normal_()
        zc.conv.bias.normal_()
        zc.logs.copy_(torch.linspace(-0.2, 0.3, 6).reshape(6, *(1,) * dims))
    conv = zc.conv(x)
    expected = conv * torch.exp(3.0 * zc.logs)  # openai/glow conv2d_zeros, logscale_factor=3
    assert LOGSCALE_FACTOR == 3.0
    torch.testing.assert_close(zc(x), expected)
    assert not torch.allclose(zc(x), conv)


@pytest.mark.parametrize("dims", [2, 3])
def test_openai_coupling_net_layout_and_actnorm_init(dims):
    net = CouplingNet(2, 8, 4, dims, style="openai")
    kinds = [type(m).__name__ for m in net.net]
    assert kinds == ["Conv2d" if dims == 2 else "Conv3d", "ActNormLayer", "ReLU",
                     "Conv2d" if dims == 2 else "Conv3d", "ActNormLayer", "ReLU", "ZeroConv"]
    assert net.net[0].kernel_size == (3,) * dims and net.net[3].kernel_size == (1,) * dims
    assert net.net[0].bias is None and net.net[3].bias is None  # ActNorm replaces the bias
    x = torch.randn(16, 2, *(6,) * dims)
    h = net.net[1](net.net[0](x))  # the first ActNorm initialises from this batch
    dims_b = (0, *range(2, 2 + dims))
    torch.testing.assert_close(h.mean(dims_b), torch.zeros(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(h.std(dims_b), torch.ones(8), atol=1e-3, rtol=0)
    assert isinstance(net.net[1], ActNormLayer)
    with pytest.raises(ValueError, match="coupling_net"):
        CouplingNet(2, 8, 4, dims, style="resnet")


@pytest.mark.parametrize("dims", [2, 3])
def test_zero_initialised_openai_coupling_starts_as_a_constant_scale(dims):
    """NN() = 0 at init, so shift = 0 and scale = s(0) for every input: z1 passes, z2 is
    multiplied by sigma(-0.1) + 0.6 (the paper's scale map), log|det| = n log s(0)."""
    block = AffineCouplingBlock(4, 8, dims, "paper", net_style="openai")
    x = torch.randn(3, 4, *(4,) * dims)
    z, ld = block.inverse(x)
    s0 = coupling_scale(torch.zeros(()), "paper")
    torch.testing.assert_close(z[:, :2], x[:, :2])
    torch.testing.assert_close(z[:, 2:], x[:, 2:] * s0)
    n = x[:, 2:].numel() // 3
    torch.testing.assert_close(ld, torch.full((3,), n * math.log(float(s0))))


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 4, 8, 8)])
def test_glow_with_openai_coupling_is_invertible_and_all_actnorms_initialise(shape):
    model = build_glow({**GLOW, "coupling_net": "openai"}, shape).double()
    assert not model.initialized
    x = torch.rand(6, *shape, dtype=torch.float64) - 0.5
    model.initialize_actnorm(x)
    n_net = sum(isinstance(m, ActNormLayer) for m in model.modules())
    assert n_net == 2 * 2 * 2  # 2 per coupling network, L * K couplings
    assert model.initialized  # includes the coupling networks' ActNorms (DDP broadcast too)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, ZeroConv):
                m.conv.weight.normal_(std=0.05)
                m.logs.fill_(0.1)
    z, ld = model.inverse_and_log_det(x)
    x_rec, ld_f = model.forward_and_log_det(z)
    torch.testing.assert_close(x_rec, x, atol=1e-6, rtol=0)
    torch.testing.assert_close(ld + ld_f, torch.zeros_like(ld), atol=1e-8, rtol=0)


def _tiny_cfg(out_dir, *extra):
    from experiments.train_glow import load

    return load(["profile=cpu", f"out_dir={out_dir}", "logger=none", "data.image_size=16",
                 "glow.levels=2", "glow.steps=2", "glow.hidden_channels=8", "data.batch_size=4",
                 *extra])


@pytest.mark.parametrize("model,group", [("m0", "normal"), ("m1", "mixture")])
def test_best_checkpoint_is_chosen_on_held_out_data_of_the_models_own_training_set(
        tmp_path, model, group):

    from experiments.train_glow import build_loaders

    cfg = _tiny_cfg(tmp_path, f"glow.model={model}", "glow.val_fraction=0.25")
    dm = FakeDM(cfg.data, n=16)
    train, val = build_loaders(cfg, dm, select="best")
    own = {it.path for it in dm.items("train", group)}
    held = {it.path for it in val.dataset.items}
    trained = {it.path for it in train.dataset.items}
    assert len(held) == 4 and held <= own and not held & trained and held | trained == own
    assert not held & {it.path for it in dm.items("val")}  # never the labelled val set
    # select=last (the papers' fixed length): every training item is trained on, no val
    train, val = build_loaders(cfg, dm, select="last")
    assert val is None and {it.path for it in train.dataset.items} == own


def test_rotation_copies_give_seven_rotations_within_2_degrees(tmp_path):

    from experiments.train_glow import RotatedCopies, build_loaders, rotate_in_plane

    cfg = _tiny_cfg(tmp_path, "glow.rotation_copies=7", "glow.rotation_deg=2.0")
    dm = FakeDM(cfg.data, n=4)
    train, _ = build_loaders(cfg, dm, select="last")
    ds = train.dataset
    assert isinstance(ds, RotatedCopies) and len(ds) == 4 * 7
    assert list(ds.angles) == pytest.approx([-2, -4 / 3, -2 / 3, 0, 2 / 3, 4 / 3, 2])
    torch.testing.assert_close(ds[3]["image"], ds.base[0]["image"])  # the 0-degree copy
    assert not torch.allclose(ds[0]["image"], ds.base[0]["image"])
    # a rotation by 90 degrees of a 3D volume rotates every axial slice
    v = torch.zeros(1, 2, 8, 8)
    v[0, :, 1, 2:6] = 1.0
    r = rotate_in_plane(v, 90.0)
    assert any(torch.allclose(r[0, 0], torch.rot90(v[0, 0], k), atol=1e-5) for k in (1, -1))
    torch.testing.assert_close(r[0, 0], r[0, 1])
