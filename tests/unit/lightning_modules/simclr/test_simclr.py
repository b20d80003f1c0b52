"""SimCLR patch encoders (Kim et al. 2023): loss, optimiser, schedule, augmentations,
checkpoints, training entry point, resume and DDP equivalence."""

from __future__ import annotations

import json
import math
import sys
import types
from types import SimpleNamespace

import pytest
import torch
from lightly.loss import NTXentLoss
from torch import nn
from torch.utils.data import DataLoader, Dataset

from experiments.config import ConfigError, load_config
from lightning_modules.simclr import SimCLRModule, encoder_feature_dim, load_encoder, scale_lr
from lightning_modules.simclr.lightning_model import (
    alignment,
    knn_balanced_accuracy,
    uniformity,
)
from lightning_modules.simclr.transforms import view_transform
from tests.support import FakeCXR

TINY = {"backbone": "resnet18", "proj_hidden_dim": 32, "proj_out_dim": 16}


def nt_xent_by_hand(z0: torch.Tensor, z1: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent (Chen et al. 2020, eq. 1 of Kim et al. 2023) with explicit loops.

    2N views u_k = z/||z||; anchor k's positive is the other view of the same patch;
    l_k = -log( exp(u_k.u_p / t) / sum_{j != k} exp(u_k.u_j / t) ); loss = mean_k l_k.
    """
    n = z0.shape[0]
    u = [v / v.norm() for v in torch.cat([z0, z1]).double()]
    losses = []
    for k in range(2 * n):
        p = k + n if k < n else k - n
        num = math.exp(float(u[k] @ u[p]) / temperature)
        den = sum(math.exp(float(u[k] @ u[j]) / temperature) for j in range(2 * n) if j != k)
        losses.append(-math.log(num / den))
    return torch.tensor(sum(losses) / len(losses), dtype=torch.float64)


@pytest.mark.parametrize("n,dim", [(1, 3), (2, 4), (5, 16)])
@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0])
def test_lightly_ntxent_equals_hand_formula(n, dim, temperature):
    z0, z1 = torch.randn(n, dim), torch.randn(n, dim)
    loss = NTXentLoss(temperature=temperature, gather_distributed=True)(z0, z1)
    assert torch.allclose(loss.double(), nt_xent_by_hand(z0, z1, temperature), atol=1e-5)


@pytest.mark.parametrize("temperature", [0.2, 0.5])
def test_module_loss_is_nt_xent_of_its_projections(temperature):
    m = SimCLRModule(32, temperature=temperature, **TINY)
    x0, x1 = torch.rand(3, 1, 32, 32), torch.rand(3, 1, 32, 32)
    h0, h1, z0, z1, loss = m.forward_views(x0, x1)
    assert h0.shape == (3, 512) and z0.shape == (3, 16)
    assert torch.allclose(loss.double(), nt_xent_by_hand(z0.detach(), z1.detach(), temperature),
                          atol=1e-5)
    # training_step computes the same loss (train-mode BatchNorm over both views: same batch)
    m.log = lambda *a, **k: None
    m.optimizers = lambda: SimpleNamespace(param_groups=[{"lr": 0.0}])
    assert torch.allclose(m.training_step({"view0": x0, "view1": x1}, 0), loss, atol=1e-6)


def test_backbone_feature_dims_and_one_channel_input():
    for name, dim in (("resnet18", 512), ("resnet34", 512), ("resnet50", 2048)):
        assert encoder_feature_dim(name) == dim
    m = SimCLRModule(64, backbone="resnet50", proj_hidden_dim=2048, proj_out_dim=128).eval()
    assert m.model.backbone.conv1.in_channels == 1
    head = [mod for mod in m.model.projection_head.modules() if isinstance(mod, nn.Linear)]
    assert [(lin.in_features, lin.out_features) for lin in head] == [(2048, 2048), (2048, 128)]
    with torch.no_grad():
        h, z = m.model(torch.rand(2, 1, 64, 64))
    assert h.shape == (2, 2048) and z.shape == (2, 128)
    with pytest.raises(ValueError, match="resnet101"):
        encoder_feature_dim("resnet101")


def test_lr_scaling():
    assert scale_lr(4.8, 256, "none") == 4.8
    assert scale_lr(0.3, 4096, "linear", 256) == pytest.approx(4.8)  # SimCLR: 0.3 * B / 256
    assert scale_lr(4.8, 64, "linear", 256) == pytest.approx(1.2)
    assert scale_lr(4.8, 64, "sqrt", 256) == pytest.approx(2.4)
    assert scale_lr(1.0, 1024, "sqrt", 256) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="lr_scaling"):
        scale_lr(1.0, 256, "cubic")


def _attach_fake_trainer(m, total_steps, max_epochs):
    m.trainer = SimpleNamespace(estimated_stepping_batches=total_steps, max_epochs=max_epochs)


def test_lars_groups_exclude_bias_and_norm_from_weight_decay():
    from lightly.utils.lars import LARS

    m = SimCLRModule(32, weight_decay=1e-6, scheduler="none", **TINY)
    _attach_fake_trainer(m, 10, 1)
    opt = m.configure_optimizers()
    assert isinstance(opt, LARS)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 1e-6 and no_decay["weight_decay"] == 0.0
    no_decay_ids = {id(p) for p in no_decay["params"]}
    names = {id(p): n for n, p in m.model.named_parameters()}
    for mod_name, mod in m.model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            expect_no_decay = isinstance(mod, nn.modules.batchnorm._BatchNorm) or pname == "bias"
            assert (id(p) in no_decay_ids) == expect_no_decay, f"{mod_name}.{pname}"
    assert len(decay["params"]) + len(no_decay["params"]) == len(names)
    # LARS leaves parameters of groups with weight_decay 0 unadapted: a plain SGD step there
    p = no_decay["params"][0]
    p.grad = torch.ones_like(p)
    before = p.detach().clone()
    for q in decay["params"]:
        q.grad = None
    for q in no_decay["params"][1:]:
        q.grad = None
    opt.step()
    assert torch.allclose(p.detach(), before - opt.param_groups[1]["lr"], atol=1e-6)


def test_warmup_cosine_schedule_per_step():
    lr = 4.8
    m = SimCLRModule(32, lr=lr, warmup_epochs=2, **TINY)
    _attach_fake_trainer(m, total_steps=100, max_epochs=10)  # 10 steps/epoch -> 20 warm-up
    cfg = m.configure_optimizers()
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    assert cfg["lr_scheduler"]["interval"] == "step"
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(lr / 20) and lrs[19] == pytest.approx(lr)
    assert all(b > a for a, b in zip(lrs[:19], lrs[1:20]))  # linear warm-up
    assert all(b <= a for a, b in zip(lrs[20:], lrs[21:]))  # cosine decay
    # cosine part: lr * (end + (1 - end) * (1 + cos(pi * t / (T - 1))) / 2), end = 0.001,
    # t = step - 20, T = 80 cosine steps (lightly's cosine_warmup_schedule)
    cosine = 0.001 + (1 - 0.001) * 0.5 * (1 + math.cos(math.pi * 40 / 79))
    assert lrs[60] == pytest.approx(lr * cosine, rel=1e-6)
    assert lrs[-1] == pytest.approx(lr * 0.001)


def test_extended_resume_stretches_the_schedule_horizon():
    m = SimCLRModule(32, warmup_epochs=1, **TINY)
    _attach_fake_trainer(m, total_steps=20, max_epochs=2)
    sched = m.configure_optimizers()["lr_scheduler"]["scheduler"]
    # resumed with trainer.max_epochs=4: the restored scheduler still ends at step 20
    m.trainer = SimpleNamespace(estimated_stepping_batches=40, max_epochs=4,
                                lr_scheduler_configs=[SimpleNamespace(scheduler=sched)])
    m.on_train_start()
    assert (sched.max_epochs, sched.warmup_epochs) == (40, 10)


def test_view_transform_shapes_range_and_parameters():
    t = view_transform(24, crop_scale=0.5, rotation_deg=5.0)
    rot, crop = t.transforms[0], t.transforms[1]
    assert list(rot.degrees) == [-5.0, 5.0]
    assert tuple(crop.scale) == (0.5, 0.5)
    x = torch.rand(1, 48, 48)
    v0, v1 = t(x), t(x)
    assert v0.shape == (1, 24, 24) and v0.dtype == torch.float32
    assert 0.0 <= float(v0.min()) and float(v0.max()) <= 1.0
    assert not torch.equal(v0, v1)
    # No crop and no rotation: the patch itself (no intensity normalisation anywhere)
    ident = view_transform(48, crop_scale=1.0, rotation_deg=0.0)
    assert torch.allclose(ident(x), x, atol=1e-6)
    with pytest.raises(ValueError, match="crop_scale"):
        view_transform(24, crop_scale=0.0)


def test_val_metrics_against_known_values():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert float(alignment(a, a)) == 0.0
    assert float(alignment(a, -a)) == pytest.approx(4.0)  # ||u - (-u)||^2 = 4
    # two antipodal unit vectors: log exp(-2 * 4) = -8
    assert float(uniformity(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))) == pytest.approx(-8.0)
    # two clusters of images: kNN separates them; neighbours of the own image are excluded
    h = torch.cat([torch.randn(6, 8) * 0.1 + 5, torch.randn(6, 8) * 0.1 - 5])
    labels = torch.tensor([0] * 6 + [1] * 6)
    groups = torch.arange(12) // 2
    assert knn_balanced_accuracy(h, labels, groups, k=3) == 1.0
    assert knn_balanced_accuracy(h, labels * 0, groups) is None  # one class only
    # a lone abnormal image whose patches only resemble each other is misclassified
    h2 = torch.cat([torch.randn(8, 4) * 0.1 + torch.tensor([5.0, -5, 5, -5]),
                    torch.full((2, 4), 9.0)])
    lab2 = torch.tensor([0] * 8 + [1] * 2)
    grp2 = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    assert knn_balanced_accuracy(h2, lab2, grp2, k=1) == pytest.approx(0.5)


# --- training entry point ---------------------------------------------------------------
def _tiny_argv(out_dir, *extra):
    return ["profile=cpu", f"out_dir={out_dir}", "logger=none", "data.image_size=64",
            "simclr.patch_size=32", "data.batch_size=8", "simclr.proj_hidden_dim=32",
            "simclr.proj_out_dim=16", "simclr.val_max_patches=16", "trainer.progress_bar=false",
            "optim.warmup_epochs=0", *extra]


def test_config_paper_and_cpu_profiles():
    paper = load_config("simclr", ["profile=paper"])
    assert paper.trainer.devices == 4 and paper.trainer.strategy == "ddp"
    assert paper.trainer.sync_batchnorm and paper.trainer.max_epochs == 100
    assert paper.data.batch_size == 256 and paper.data.image_size == 1024
    assert (paper.optim.name, paper.optim.lr, paper.optim.weight_decay) == ("lars", 4.8, 1e-6)
    assert paper.simclr.backbone == "resnet50" and paper.out_dir == "outputs/simclr/res256"
    cpu = load_config("simclr", ["profile=cpu", "simclr.patch_size=32"])
    assert cpu.simclr.backbone == "resnet18" and cpu.trainer.devices == 1
    assert cpu.out_dir == "outputs/simclr/res32"
    assert cpu.data.root is None and cpu.data.name == "folder"  # phantoms when no DATA
    with pytest.raises(ConfigError, match="simclr.tempertaure"):
        load_config("simclr", ["simclr.tempertaure=0.1"])


def test_list_sizes_follows_the_profile(capsys):
    from experiments.train_simclr import main

    main(["--list-sizes", "profile=paper"])
    assert capsys.readouterr().out.split() == ["128", "256", "512", "1024"]
    main(["--list-sizes", "profile=cpu"])
    assert capsys.readouterr().out.split() == ["32", "64", "128", "256"]


def test_per_device_batch_size():
    from experiments.train_simclr import per_device_batch_size

    assert per_device_batch_size(256, 4) == 64
    assert per_device_batch_size(256, 8) == 32
    with pytest.raises(ConfigError, match="not divisible"):
        per_device_batch_size(256, 3)


def test_fast_dev_run_through_main(out_dir, monkeypatch):
    """``main(argv)`` end to end on phantom-like images, with a stand-in data factory."""
    from experiments import train_simclr

    fake = types.ModuleType("datamodules.factory")
    fake.build_datamodule = lambda data_cfg: FakeCXR(n_train=3, n_val=1, size=64)
    monkeypatch.setitem(sys.modules, "datamodules.factory", fake)
    train_simclr.main(_tiny_argv(out_dir, "trainer.fast_dev_run=true"))
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["patch_size"] == 32 and metrics["backbone"] == "resnet18"
    assert math.isfinite(metrics["train/loss"]) and "val/alignment" in metrics
    assert (out_dir / "config.yaml").is_file()


def test_fast_dev_run_on_real_phantoms(out_dir):
    pytest.importorskip("datamodules.factory", reason="feat/data not merged yet")
    from experiments import train_simclr

    train_simclr.main(_tiny_argv(out_dir, "trainer.fast_dev_run=true", "data.phantom_count=12"))
    assert "train/loss" in json.loads((out_dir / "metrics.json").read_text())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One epoch of real training on tiny data (shared by the checkpoint and resume tests)."""
    from experiments.train_simclr import train

    out = tmp_path_factory.mktemp("simclr_run")
    cfg = load_config("simclr", _tiny_argv(out, "trainer.max_epochs=2"))
    dm = FakeCXR(n_train=4, n_val=1, size=64)  # 16 train patches -> 2 steps of 8

    def stop_after_first_epoch(self):  # an interrupted run (e.g. a preempted job)
        self.trainer.should_stop = True

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SimCLRModule, "on_train_epoch_end", stop_after_first_epoch, raising=False)
        best = train(cfg, datamodule=dm)
    return SimpleNamespace(out=out, best=best, dm=dm)


def test_checkpoints_named_by_resolution_and_weights_only(trained):
    ckpts = trained.out / "checkpoints"
    assert trained.best == ckpts / "simclr-res32-best.ckpt" and trained.best.is_file()
    assert (ckpts / "last.ckpt").is_file()
    ckpt = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["simclr_encoder"] == {"patch_size": 32, "input_size": 32,
                                      "backbone": "resnet18", "feature_dim": 512}
    assert ckpt["hyper_parameters"]["patch_size"] == 32
    metrics = json.loads((trained.out / "metrics.json").read_text())
    for key in ("train/loss", "train/lr", "train/throughput", "val/loss", "val/alignment",
                "val/uniformity"):
        assert math.isfinite(metrics[key]), key
    assert metrics["epoch"] == 1 and metrics["global_step"] == 2


def test_load_encoder_returns_the_trained_backbone(trained):
    enc = load_encoder(trained.best)
    assert (enc.patch_size, enc.backbone_name, enc.feature_dim) == (32, "resnet18", 512)
    assert not enc.training
    ckpt = torch.load(trained.best, map_location="cpu", weights_only=True)
    module = SimCLRModule(**ckpt["hyper_parameters"])
    module.load_state_dict(ckpt["state_dict"])
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(enc(x), module.model.backbone.eval()(x), atol=1e-6)
        assert enc(x).shape == (3, 512)
    with pytest.raises(ValueError, match="trained on"):
        enc(torch.rand(1, 1, 64, 64))
    with pytest.raises(FileNotFoundError, match="train-simclr"):
        load_encoder(trained.out / "nope.ckpt")


def test_resume_from_last_continues_the_epoch_count(trained, monkeypatch):
    from experiments.train_simclr import train

    steps = []
    original = SimCLRModule.training_step

    def counting(self, batch, batch_idx):
        steps.append((self.current_epoch, self.global_step))
        return original(self, batch, batch_idx)

    monkeypatch.setattr(SimCLRModule, "training_step", counting)
    before = torch.load(trained.out / "checkpoints" / "last.ckpt", weights_only=True)
    cfg = load_config("simclr", _tiny_argv(trained.out, "trainer.max_epochs=2", "ckpt_path=last"))
    train(cfg, datamodule=trained.dm)
    # only the second epoch ran, starting where the first ended
    assert steps == [(1, 2), (1, 3)]
    after = torch.load(trained.out / "checkpoints" / "last.ckpt", weights_only=True)
    assert after["global_step"] == 4
    # Lightning's epoch counter: one epoch started before the interruption, two in total
    progress = [c["loops"]["fit_loop"]["epoch_progress"]["total"] for c in (before, after)]
    assert [p["started"] for p in progress] == [1, 2]
    sb, sa = before["lr_schedulers"][0], after["lr_schedulers"][0]
    assert sb["max_epochs"] == sa["max_epochs"] == 4  # same horizon: an exact resume
    assert sa["last_epoch"] == sb["last_epoch"] + 2  # the schedule continued, not restarted
    assert before["optimizer_states"][0]["state"]  # momentum buffers were saved and restored


# --- DDP ----------------------------------------------------------------------------------
class FixedViews(Dataset):
    """Fixed view pairs: no augmentation randomness, so both runs see identical inputs."""

    def __init__(self, n=8, size=32):
        g = torch.Generator().manual_seed(1)
        self.v0 = torch.rand(n, 1, size, size, generator=g)
        self.v1 = torch.rand(n, 1, size, size, generator=g)

    def __len__(self):
        return len(self.v0)

    def __getitem__(self, i):
        return {"view0": self.v0[i], "view1": self.v1[i]}


def _batchnorm_free(module: SimCLRModule) -> SimCLRModule:
    """Replace every BatchNorm by Identity.

    Why: with plain BatchNorm each DDP rank normalises with the statistics of its own half
    batch, so its features differ from a single process normalising over the whole batch and
    the comparison would fail for a reason unrelated to the loss. SyncBatchNorm (what the
    paper config uses) would make them equal, but PyTorch only implements it on CUDA.
    Removing BatchNorm leaves the loss as the only coupling between samples, which is exactly
    what ``gather_distributed=True`` must get right.
    """
    for child in list(module.model.modules()):
        for attr, sub in list(child.named_children()):
            if isinstance(sub, nn.modules.batchnorm._BatchNorm):
                setattr(child, attr, nn.Identity())
    return module


@pytest.mark.slow
@pytest.mark.parametrize("chunk", [None, 3])  # 3: simclr.chunk_size composes with gathering
def test_ddp_two_processes_equal_one_process_on_the_global_batch(tmp_path, chunk):
    import pytorch_lightning as pl

    lr = 0.05
    kwargs = dict(TINY, optimizer="sgd", lr=lr, momentum=0.0, weight_decay=0.0,
                  scheduler="none", temperature=0.5)
    ds = FixedViews(n=8)

    # Reference: one process, the whole batch of 8 pairs, one SGD step by hand.
    ref = _batchnorm_free(SimCLRModule(32, **kwargs))
    init = {k: v.clone() for k, v in ref.state_dict().items()}
    *_, ref_loss = ref.forward_views(ds.v0, ds.v1)
    ref_loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters()}

    # Sensitivity check: without gathering, each rank would see only its own 4 pairs as
    # negatives; the mean of those two losses differs from the global-batch loss.
    with torch.no_grad():
        half = [ref.forward_views(ds.v0[r::2], ds.v1[r::2])[-1] for r in (0, 1)]
    assert abs(float(sum(half) / 2) - float(ref_loss.detach())) > 1e-3

    # DDP: 2 CPU processes (gloo), 4 pairs each (DistributedSampler: rank r gets r, r+2, ...).
    ddp = _batchnorm_free(SimCLRModule(32, **kwargs, chunk_size=chunk))
    ddp.load_state_dict(init)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=1,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(ddp, DataLoader(ds, batch_size=4, shuffle=False))

    # Logged with sync_dist: mean over ranks of the per-rank losses = the global-batch loss.
    assert float(trainer.callback_metrics["train/loss"]) == pytest.approx(float(ref_loss.detach()),
                                                                          abs=1e-5)
    # DDP averages the ranks' gradients; lightly's GatherLayer sums the gradient flowing back
    # into each rank's features from every rank's loss, so the average is d(global loss)/dθ.
    ddp_state = ddp.state_dict()
    for name, g in ref_grads.items():
        ddp_grad = (init[name] - ddp_state[name]) / lr
        assert torch.allclose(ddp_grad, g, atol=1e-5, rtol=1e-3), name
