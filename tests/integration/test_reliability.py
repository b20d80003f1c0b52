"""Issue 15, reliability: checkpoints survive a kill or a full disk mid-write, a truncated
checkpoint is one clear error, reruns keep stable checkpoint names, a diverged state is never
saved (and resuming from the last good one works), detect_image goes on past bad files.

Tiny Glow on the fake data module of test_glow_training (CPU, seconds)."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from experiments.common import (
    AtomicCheckpointIO,
    CheckpointWriteError,
    DivergenceGuard,
    TrainingDiverged,
    build_trainer,
    resolve_ckpt_path,
)
from experiments.train_glow import init_weights, train
from lightning_modules.checkpoint import CheckpointError, read_checkpoint
from lightning_modules.glow import GlowModule, load_glow
from lightning_modules.simclr import load_encoder
from tests.support import REPO_ROOT, TINY_2D, FakeDM, fail_checkpoint_writes, glow_cfg

ROOT = REPO_ROOT
SMALL = [*TINY_2D, "data.batch_size=4"]  # 8 items: 2 optimiser steps per epoch


pytestmark = pytest.mark.usefixtures("one_thread")


def _train(out, *extra, n=8, **kw):
    cfg = glow_cfg(out, "cxr", [*SMALL, *extra])
    return train(cfg, datamodule=FakeDM(cfg.data, n=n), **kw)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _step(path: Path) -> int:
    return int(torch.load(path, weights_only=True)["global_step"])


def _raise(exc):
    def fail():
        raise exc

    return fail


# --- 1 + 5: atomic writes, fault injection -------------------------------------------------
def test_build_trainer_uses_atomic_io_and_the_guard(out_dir):
    cfg = glow_cfg(out_dir, "cxr", SMALL)
    trainer = build_trainer(cfg, out_dir, monitor="val/bpd")
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert any(isinstance(c, DivergenceGuard) for c in trainer.callbacks)


@pytest.mark.parametrize("exc,match", [
    (OSError(errno.ENOSPC, "No space left on device"), r"^Could not write .*\(No space left on device\).*Free disk"),
    (SystemExit(143), None),  # a SIGTERM handler exiting mid-write (a scheduler's preemption)
], ids=["disk_full", "killed"])
def test_failed_write_keeps_previous_checkpoint_and_resume_works(out_dir, monkeypatch, exc,
                                                                 match):
    _train(out_dir, "trainer.max_epochs=1")
    ckpts = out_dir / "checkpoints"
    before = {p.name: _sha(p) for p in ckpts.glob("*.ckpt")}
    assert set(before) == {"best.ckpt", "last.ckpt"} and _step(ckpts / "last.ckpt") == 2

    with monkeypatch.context() as m:
        fail_checkpoint_writes(m, _raise(exc))
        if match:
            with pytest.raises(CheckpointWriteError, match=match) as e:
                _train(out_dir, "trainer.max_epochs=2", "ckpt_path=last")
            assert re.search(rf"checkpoint {ckpts}/(best|last)\.ckpt .*previous (best|last)"
                             r"\.ckpt is unchanged.*resume with ckpt_path=last", str(e.value))
        else:
            with pytest.raises(SystemExit):
                _train(out_dir, "trainer.max_epochs=2", "ckpt_path=last")
    # the previous files are byte-identical, loadable, and no partial file is left
    assert {p.name: _sha(p) for p in ckpts.glob("*.ckpt")} == before
    assert sorted(p.name for p in ckpts.iterdir()) == ["best.ckpt", "last.ckpt"]
    load_glow(ckpts / "last.ckpt")
    _train(out_dir, "trainer.max_epochs=2", "ckpt_path=last")  # resume works afterwards
    assert _step(ckpts / "last.ckpt") == 4


CHILD = """
import sys, time, torch
sys.path[:0] = [{root!r}]
torch.set_num_threads(1)
import pytest
from experiments.train_glow import train
from tests.support import FakeDM, fail_checkpoint_writes, glow_cfg

def hang():  # half-written: tell the parent, then wait for its SIGKILL
    with open({marker!r}, "w"):
        pass
    time.sleep(600)

fail_checkpoint_writes(pytest.MonkeyPatch(), hang)
cfg = glow_cfg({out!r}, "cxr", {argv!r})
train(cfg, datamodule=FakeDM(cfg.data, n=8))
"""


def test_sigkill_during_write_keeps_previous_checkpoint(out_dir):
    _train(out_dir, "trainer.max_epochs=1")
    last = out_dir / "checkpoints" / "last.ckpt"
    before = {p.name: _sha(p) for p in last.parent.glob("*.ckpt")}
    marker = out_dir / "writing"
    code = CHILD.format(root=str(ROOT), marker=str(marker),
                        out=str(out_dir), argv=[*SMALL, "trainer.max_epochs=2", "ckpt_path=last"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    child = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert child.poll() is None, child.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the child never reached the write"
            time.sleep(0.2)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    assert list(last.parent.glob(".*.ckpt.*.tmp"))  # the half-written file the kill left
    assert {p.name: _sha(p) for p in last.parent.glob("*.ckpt")} == before
    assert _step(last) == 2
    load_glow(last)
    _train(out_dir, "trainer.max_epochs=2", "ckpt_path=last")
    assert _step(last) == 4
    assert not list(last.parent.glob(".*.tmp"))  # the next write removed the orphan


# --- 1: truncated / empty checkpoints are one clear error -----------------------------------
@pytest.fixture
def broken(tmp_path, request):
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.ones(64)}, "global_step": 3}, good)
    data = good.read_bytes()
    out = {}
    for name, content in (("empty", b""), ("half", data[: len(data) // 2]),
                          ("tail_cut", data[:-10])):
        out[name] = tmp_path / f"{name}.ckpt"
        out[name].write_bytes(content)
    return out


@pytest.mark.parametrize("kind", ["empty", "half", "tail_cut"])
def test_truncated_checkpoint_is_a_clear_error_everywhere(out_dir, broken, kind):
    bad = broken[kind]
    one_line = rf"^{re.escape(str(bad))}[^\n]*not a usable checkpoint[^\n]*new out_dir\.$"
    for load in (read_checkpoint, load_glow, load_encoder,
                 lambda p: AtomicCheckpointIO().load_checkpoint(p, weights_only=True),
                 lambda p: init_weights(None, p)):
        with pytest.raises(CheckpointError, match=one_line):
            load(bad)
    # resume: ckpt_path=FILE and ckpt_path=last, before any training starts
    cfg = glow_cfg(out_dir, "cxr", [*SMALL, f"ckpt_path={bad}"])
    with pytest.raises(CheckpointError, match=rf"^ckpt_path={re.escape(str(bad))}: "):
        resolve_ckpt_path(cfg, out_dir)
    (out_dir / "checkpoints").mkdir()
    (out_dir / "checkpoints" / "last.ckpt").write_bytes(bad.read_bytes())
    cfg = glow_cfg(out_dir, "cxr", [*SMALL, "ckpt_path=last"])
    with pytest.raises(CheckpointError, match=r"^ckpt_path=last: .*last\.ckpt is not a usable"):
        train(cfg, datamodule=FakeDM(cfg.data, n=8))


def test_good_checkpoint_still_loads_and_malicious_pickle_is_still_refused(tmp_path):
    import pickle

    good = tmp_path / "good.ckpt"
    torch.save({"w": torch.arange(3)}, good)
    assert torch.equal(read_checkpoint(good)["w"], torch.arange(3))

    class RunsCode:
        def __reduce__(self):
            return os.system, ("touch PWNED",)

    bad = tmp_path / "bad.ckpt"
    torch.save({"x": RunsCode()}, bad)
    with pytest.raises(pickle.UnpicklingError):
        read_checkpoint(bad)


# --- 2: stable names on a rerun --------------------------------------------------------------
def test_rerun_into_same_out_dir_keeps_names_and_last_is_newest(out_dir):
    _train(out_dir, "trainer.max_epochs=1")
    best = _train(out_dir, "trainer.max_epochs=2")  # a fresh run, 4 steps
    ckpts = out_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("*.ckpt")) == ["best.ckpt", "last.ckpt"]
    assert best == ckpts / "best.ckpt"
    assert _step(ckpts / "last.ckpt") == 4


# --- 3: divergence ----------------------------------------------------------------------------
def test_divergence_that_ended_in_linalgerror_is_a_clear_error(out_dir):
    """lr=1000 without clipping: one step makes the 1x1 convolutions singular, so val/bpd is
    NaN; this used to write best/last and end in torch's LinAlgError (W^-1 in sampling)."""
    with pytest.raises(TrainingDiverged, match=r"global step 1 \(epoch 0\): val/bpd \(nan\) "
                                               r".*No checkpoint was written yet.*optim\.lr=100"):
        _train(out_dir, "trainer.max_epochs=1", "optim.lr=1000", "optim.grad_clip=null", n=4)
    assert not list(out_dir.glob("checkpoints/*.ckpt"))


def test_nan_validation_is_not_saved_and_resume_from_last_good_works(out_dir, monkeypatch):
    original = GlowModule.validation_step

    def nan_in_second_epoch(self, batch, batch_idx):
        if self.current_epoch == 0:
            return original(self, batch, batch_idx)
        self.log("val/bpd", torch.tensor(float("nan")), prog_bar=True, sync_dist=True,
                 batch_size=batch["image"].shape[0])

    with monkeypatch.context() as m:
        m.setattr(GlowModule, "validation_step", nan_in_second_epoch)
        with pytest.raises(TrainingDiverged, match=r"global step 4 \(epoch 1\): val/bpd \(nan\)"
                                                   r".*last\.ckpt is the last good checkpoint"
                                                   r".*ckpt_path=last optim\.grad_clip"):
            _train(out_dir, "trainer.max_epochs=3")
    last = out_dir / "checkpoints" / "last.ckpt"
    assert _step(last) == 2  # epoch 0's, not the NaN state
    assert all(torch.isfinite(v).all() for v in read_checkpoint(last)["state_dict"].values()
               if v.is_floating_point())
    _train(out_dir, "trainer.max_epochs=3", "ckpt_path=last")  # the advice works
    assert _step(last) == 6


def test_non_finite_parameter_after_a_step_stops_naming_it(out_dir, monkeypatch):
    real_step = torch.optim.Adam.step

    def step(self, *a, **k):
        out = real_step(self, *a, **k)
        self._n = getattr(self, "_n", 0) + 1
        if self._n == 3:  # the third optimiser step (epoch 1) produces an inf weight
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    with pytest.raises(TrainingDiverged, match=r"global step 3 \(epoch 1\): parameter model\."):
        _train(out_dir, "trainer.max_epochs=2")
    assert _step(out_dir / "checkpoints" / "last.ckpt") == 2


def test_lower_lr_given_on_resume_is_used(out_dir):
    """Lightning restores the optimiser's lr from the checkpoint; the advice 'resume with a
    lower optim.lr' only works because the guard rescales it."""
    _train(out_dir, "trainer.max_epochs=1", "optim.lr=1e-3")
    _train(out_dir, "trainer.max_epochs=2", "optim.lr=1e-4", "ckpt_path=last")
    ck = torch.load(out_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ck["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(1e-4)


# --- 4: detect_image goes on past bad files, unique overlay names ----------------------------
class _FakeDetector:
    image_size = 16

    def __call__(self, x):
        return {"score": x.mean((1, 2, 3)), "map": x[:, 0]}


def _png(path: Path, value: int) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((16, 16), value, np.uint8)).save(path)
    return path


def test_detect_image_skips_bad_files_and_names_overlays_uniquely(tmp_path, monkeypatch,
                                                                   capsys):
    from experiments import detect_image

    monkeypatch.setattr(detect_image, "load_detector",
                        lambda run_dir, device: (_FakeDetector(), {"threshold": 0.5}))
    uid = _png(tmp_path / "in" / "1.2.840.113619.2.55.3.png", 200)
    uid2 = _png(tmp_path / "in" / "1.2.840.113619.2.55.4.png", 10)
    dup = _png(tmp_path / "other" / "1.2.840.113619.2.55.3.png", 100)
    broken = tmp_path / "in" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    missing = tmp_path / "in" / "missing.png"
    out = tmp_path / "out"
    results = detect_image.main([str(uid), str(broken), str(uid2), str(missing), str(dup),
                                 f"run_dir={tmp_path}", f"out={out}"])
    err = capsys.readouterr().err
    assert [r["name"] for r in results] == ["1.2.840.113619.2.55.3", "1.2.840.113619.2.55.4",
                                            "1.2.840.113619.2.55.3-2"]
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{r['name']}_overlay.png"
                                                           for r in results)
    skipped = [line for line in err.splitlines() if line.startswith("skipped ")]
    assert len(skipped) == 2
    assert skipped[0].startswith(f"skipped {broken}: ") and "PNG" in skipped[0]
    assert skipped[1].startswith(f"skipped {missing}: ")
    assert "3 scored, 2 skipped" in err


def test_detect_image_fails_only_if_every_file_failed(tmp_path, monkeypatch, capsys):
    from experiments import detect_image

    monkeypatch.setattr(detect_image, "load_detector",
                        lambda run_dir, device: (_FakeDetector(), {"threshold": 0.5}))
    bad = tmp_path / "a.png"
    bad.write_bytes(b"")
    with pytest.raises(SystemExit) as e:
        detect_image.main([str(bad), str(tmp_path / "b.png"), f"run_dir={tmp_path}",
                           f"out={tmp_path / 'out'}"])
    assert e.value.code != 0 and "None of the 2 images" in str(e.value.code)
    assert "0 scored, 2 skipped" in capsys.readouterr().err
