"""GlowModule and experiments.train_glow on a small fake data module (CPU, seconds)."""

import json
import sys
import types

import numpy as np
import pytest
import torch

from experiments.config import ConfigError
from experiments.train_glow import load, main, train
from lightning_modules.glow import GlowModule, NonFiniteLossError, load_glow
from tests.support import TINY_2D, FakeDM, glow_cfg

pytestmark = pytest.mark.usefixtures("one_thread")


TINY_3D = ["data.volume_size=[8,8,8]", "glow.levels=2", "glow.steps=2", "glow.checkpointing=true",
           "glow.hidden_channels=8", "data.batch_size=4", "glow.n_samples=2",
           "glow.m0_epochs=null"]


@pytest.mark.parametrize("modality,extra", [("cxr", TINY_2D), ("bct", TINY_3D)])
def test_train_writes_checkpoint_metrics_and_samples(out_dir, modality, extra):
    cfg = glow_cfg(out_dir / modality, modality, [*extra, "trainer.max_epochs=2"])
    bits = 8 if modality == "cxr" else 7
    assert cfg.glow.n_bits == bits
    best = train(cfg, datamodule=FakeDM(cfg.data, n=16, bits=bits))
    out = out_dir / modality
    metrics = json.loads((out / "metrics.json").read_text())
    assert np.isfinite(metrics["val/bpd"]) and 0 < metrics["val/bpd"] < 20
    assert (out / "samples.png").stat().st_size > 0
    assert (out / "checkpoints" / "last.ckpt").is_file() and best.is_file()
    raw = torch.load(best, map_location="cpu", weights_only=True)  # safe loading works
    hp = raw["hyper_parameters"]
    assert hp["n_bits"] == bits and hp["data"]["modality"] == modality
    assert hp["input_shape"] == ([1, 16, 16] if modality == "cxr" else [1, 8, 8, 8])
    module = load_glow(best)
    assert not module.training and module.model.initialized
    x = torch.rand(3, *hp["input_shape"][1:])
    ll = module.log_likelihood(x)
    assert ll.shape == (3,) and ll.dtype == torch.float32
    torch.testing.assert_close(ll, module.log_likelihood(x))  # deterministic
    s = module.sample(2, temperature=0.5)
    assert s.shape == (2, *hp["input_shape"]) and s.min() >= 0 and s.max() <= 1


def test_trained_flow_prefers_training_data_over_noise(out_dir):
    # raw intensities: with the cpu profile's glow.intensity_norm=rank a uniform-noise image
    # becomes a permutation of ranks, as uniform as any image, so "noise" would mean nothing
    cfg = glow_cfg(out_dir, "cxr", [*TINY_2D, "trainer.max_epochs=4", "glow.intensity_norm=none"])
    dm = FakeDM(cfg.data, n=32)
    module = load_glow(train(cfg, datamodule=dm))
    data = torch.stack([torch.from_numpy(dm.load(it)) for it in dm.items("val", "normal")])
    noise = torch.rand_like(data)
    ll_data, ll_noise = module.log_likelihood(data), module.log_likelihood(noise)
    assert ll_data.min() > ll_noise.max()
    # the learnt model beats a uniform density over the 8-bit cube (8 bits/dim)
    bpd = -ll_data / (data[0].numel() * np.log(2))
    assert bpd.mean() < 8


def test_resume_from_last_is_exact(out_dir):
    extra = [*TINY_2D, "data.batch_size=4"]
    full = glow_cfg(out_dir / "full", "cxr", [*extra, "trainer.max_epochs=2"])
    train(full, datamodule=FakeDM(full.data, n=8))
    first = glow_cfg(out_dir / "resumed", "cxr", [*extra, "trainer.max_epochs=1"])
    train(first, datamodule=FakeDM(first.data, n=8))
    second = glow_cfg(out_dir / "resumed", "cxr", [*extra, "trainer.max_epochs=2", "ckpt_path=last"])
    train(second, datamodule=FakeDM(second.data, n=8))
    a = torch.load(out_dir / "full/checkpoints/last.ckpt", weights_only=True)
    b = torch.load(out_dir / "resumed/checkpoints/last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 4
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][k], v, msg=k)


def test_non_finite_loss_stops_with_clear_message(out_dir):
    # with glow.align (the cpu profile's) the NaN image is refused earlier, by name
    cfg = glow_cfg(out_dir, "cxr", [*TINY_2D, "data.batch_size=4", "trainer.max_epochs=1"])
    dm = FakeDM(cfg.data, n=8, nan_item=True)
    with pytest.raises(ConfigError, match=r"fake/nan: non-finite pixel values.*glow.align=none"):
        train(cfg, datamodule=dm)
    cfg.glow.align = "none"
    with pytest.raises(NonFiniteLossError, match=r"global step \d+.*lower optim\.lr"):
        # shuffling puts the NaN image in one of the two batches; ActNorm init sees it too
        torch.manual_seed(0)
        train(cfg, datamodule=dm)
    assert not list((out_dir / "checkpoints").glob("*.ckpt"))


def test_m1_trains_on_the_mixture(out_dir, monkeypatch):
    seen = []

    class Spy(FakeDM):
        def load(self, item):
            seen.append(item.path)
            return super().load(item)

    factory = types.ModuleType("datamodules.factory")
    factory.build_datamodule = lambda data_cfg: Spy(data_cfg, n=8)
    monkeypatch.setitem(sys.modules, "datamodules.factory", factory)
    main(["modality=cxr", "profile=cpu", f"out_dir={out_dir}", "logger=none",
          "trainer.progress_bar=false", *TINY_2D, "glow.model=m1", "trainer.max_epochs=1",
          "glow.align=none"])  # (glow.align reads S_normal too: for M0's pose template)
    assert any("/train/mixture/" in p for p in seen)
    assert not any("/train/normal/" in p for p in seen)
    assert json.loads((out_dir / "metrics.json").read_text())["val/bpd"] > 0


def test_init_ckpt_starts_from_those_weights(out_dir):
    """glow.m1_init=m0: M1 starts from M0's weights (with its ActNorms initialised), so with
    lr=0 it ends exactly where M0 ended; a different architecture is a clear error."""
    m0 = glow_cfg(out_dir / "m0", "cxr", [*TINY_2D, "trainer.max_epochs=1"])
    ckpt = train(m0, datamodule=FakeDM(m0.data, n=8))
    m1 = glow_cfg(out_dir / "m1", "cxr", [*TINY_2D, "glow.model=m1", "trainer.max_epochs=1",
                                      "optim.lr=0"])
    ckpt1 = train(m1, datamodule=FakeDM(m1.data, n=8), init_ckpt=ckpt)
    a = torch.load(ckpt, weights_only=True)["state_dict"]
    b = torch.load(ckpt1, weights_only=True)["state_dict"]
    for k, v in a.items():
        torch.testing.assert_close(b[k], v, msg=k)
    fresh = glow_cfg(out_dir / "fresh", "cxr", [*TINY_2D, "glow.model=m1", "trainer.max_epochs=1",
                                            "optim.lr=0"])
    c = torch.load(train(fresh, datamodule=FakeDM(fresh.data, n=8)), weights_only=True)
    assert any(not torch.equal(c["state_dict"][k], v) for k, v in a.items())
    wide = glow_cfg(out_dir / "wide", "cxr", [*TINY_2D, "glow.hidden_channels=8",
                                          "trainer.max_epochs=1"])
    with pytest.raises(ConfigError, match="do not fit this Glow"):
        train(wide, datamodule=FakeDM(wide.data, n=8), init_ckpt=ckpt)


def test_modality_selector_is_stripped_and_picks_the_yaml():
    from experiments.config import resolve_job

    job = resolve_job("train_glow", ["--modality=bct", "a.b=1"])
    assert job.yamls == ("glow_bct",) and job.argv == ("a.b=1", "data.modality=bct")
    assert resolve_job("train_glow", ["data.modality=bct"]).yamls == ("glow_bct",)
    cfg = load(["modality=bct", "profile=paper"])
    assert cfg.glow.levels == 4 and cfg.data.volume_size == [32, 128, 128]
    assert cfg.glow.n_bits == 7 and cfg.optim.lr == 1e-4 and cfg.trainer.max_epochs == 30
    cfg = load(["profile=paper"])
    assert cfg.glow.levels == 7 and cfg.data.image_size == 512 and cfg.data.batch_size == 128
    assert cfg.glow.n_bits == 8 and cfg.optim.lr == 1e-3 and cfg.optim.name == "adamax"
    assert cfg.out_dir == "outputs/glow/cxr_m0"
    # train-glow resolves the per-model epochs (head CT, Table 4: M1 20 epochs)
    assert load(["modality=bct", "profile=paper", "glow.model=m1"]).trainer.max_epochs == 20
    # the cpu profile keeps the fast recipe (make demo)
    cpu = load(["modality=bct", "profile=cpu"])
    assert (cpu.optim.name, cpu.optim.scheduler, cpu.glow.coupling_net) == \
        ("adam", "none", "normflows")


def test_glow_module_hparams_are_plain():
    m = GlowModule(glow=dict(levels=1, steps=1, hidden_channels=4), input_shape=[1, 4, 4],
                   n_bits=7, data={"modality": "cxr", "image_size": 4})
    assert m.hparams.n_bits == 7 and m.hparams.data["image_size"] == 4


def _ddp_worker(rank, world, port, out):
    import torch.distributed as dist

    from lightning_modules.glow.lightning_model import broadcast_actnorm
    from lightning_modules.glow.torch_model import build_glow

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    torch.manual_seed(0)  # same architecture and LU init on both ranks (DDP's wrap-time sync)
    model = build_glow(dict(levels=2, steps=1, hidden_channels=4), (1, 8, 8))
    torch.manual_seed(100 + rank)  # each rank's first batch differs
    model.initialize_actnorm(torch.rand(4, 1, 8, 8) * (rank + 1) - 0.5)
    broadcast_actnorm(model)
    torch.save({k: v for k, v in model.state_dict().items() if "actnorm" in k},
               f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_actnorm_init_is_identical_across_ddp_ranks(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert a.keys() == b.keys() and any(k.endswith(".s") for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)


def test_effective_batch_is_split_over_devices_and_accumulation(out_dir):
    from experiments.config import ConfigError
    from experiments.train_glow import per_device_batch_size

    cfg = load(["profile=paper"])
    assert cfg.data.batch_size == 128 and per_device_batch_size(cfg) == 64  # 2 x 64
    cfg.trainer.devices = 2
    cfg.glow.accumulate_grad_batches = 1
    assert per_device_batch_size(cfg) == 64
    cfg.data.batch_size = 127
    with pytest.raises(ConfigError, match="divisible"):
        per_device_batch_size(cfg)


def test_accumulation_trains(out_dir):
    cfg = glow_cfg(out_dir, "cxr", [*TINY_2D, "trainer.max_epochs=1",
                                "glow.accumulate_grad_batches=2"])
    train(cfg, datamodule=FakeDM(cfg.data, n=8))
    ck = torch.load(out_dir / "checkpoints/last.ckpt", weights_only=True)
    assert ck["global_step"] == 1  # 8 items, micro-batches of 4, 2 per optimiser step


class _RunsCode:
    """A pickle payload: unpickling it calls ``os.system`` (what a crafted checkpoint does)."""

    def __reduce__(self):
        import os

        return os.system, ("touch PWNED",)


def test_init_weights_refuses_a_malicious_checkpoint(out_dir, monkeypatch):
    """glow.m1_init=m0 loads OUT/m0's checkpoint: a pickle that runs code must be refused by
    torch's weights_only loader, and the code must not have run."""
    import pickle

    from experiments.train_glow import init_weights

    monkeypatch.chdir(out_dir)
    bad = out_dir / "best.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"x": _RunsCode()}}, bad)
    with pytest.raises(pickle.UnpicklingError):
        init_weights(None, bad)  # refused before the module is touched
    assert not (out_dir / "PWNED").exists()
