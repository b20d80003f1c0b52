"""Helpers shared by several test modules: fake data modules, tiny configs, phantoms and
fault injectors. (Tests import them from here, never from each other.)"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import normflows as nf
import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn
from torchmetrics.functional.classification import binary_auroc

from datamodules.base import ABNORMAL, NORMAL, UNLABELED, Item, MedicalDataModule
from experiments.train_glow import load

REPO_ROOT = Path(__file__).resolve().parents[1]


class FakeDM(MedicalDataModule):
    """Smooth 'anatomy' (a bright disc on a dark background) plus a little texture, in the
    data's bit depth; the ``nan`` group returns a NaN image (for the non-finite test)."""

    def __init__(self, cfg, n=24, bits=8, nan_item=False):
        super().__init__(cfg)
        self.n, self.bits, self.nan_item = n, bits, nan_item

    def build_index(self):
        def items(split, group, n, label):
            return [Item(f"fake/{split}/{group}/{i}", label) for i in range(n)]

        index = {("train", "normal"): items("train", "normal", self.n, NORMAL),
                 ("train", "mixture"): items("train", "mixture", self.n, UNLABELED),
                 ("val", "normal"): items("val", "normal", 8, NORMAL)}
        if self.nan_item:
            index[("train", "normal")][3] = Item("fake/nan", NORMAL)
        return index

    def load(self, item):
        if item.path == "fake/nan":
            return np.full(self.shape, np.nan, np.float32)
        rng = np.random.default_rng(abs(hash(item.path)) % 2**32)
        grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in self.shape], indexing="ij")
        r = np.sqrt(sum(g**2 for g in grids))
        img = 0.15 + 0.6 * (r < 0.6 + 0.1 * rng.random()) + 0.03 * rng.standard_normal(self.shape)
        top = 2**self.bits - 1
        return (np.round(np.clip(img, 0, 1) * top) / top).astype(np.float32)

    @property
    def shape(self):
        if self.cfg.modality == "bct":
            return tuple(self.cfg.volume_size)
        return (self.cfg.image_size, self.cfg.image_size)


def glow_cfg(out_dir, modality="cxr", extra=()):
    return load([f"modality={modality}", "profile=cpu", f"out_dir={out_dir}", "logger=none",
                 "trainer.progress_bar=false", *extra])


TINY_2D = ["data.image_size=16", "glow.levels=2", "glow.steps=2", "glow.hidden_channels=16",
           "data.batch_size=8", "glow.n_samples=4"]


class FakeCXR(MedicalDataModule):
    """Deterministic phantom-like 2D images (a bright body, two darker lungs, noise); abnormal
    images get a bright blob. Counts ``load`` calls to check the in-memory cache."""

    def __init__(self, n_train=4, n_val=2, size=64):
        super().__init__(OmegaConf.create({"image_size": size, "batch_size": 4, "num_workers": 0}))
        self.n_train, self.n_val, self.size = n_train, n_val, size
        self.n_loads = 0

    def build_index(self):
        idx = {("train", "normal"): [Item(f"train/n{i}.png", NORMAL) for i in range(self.n_train)]}
        idx[("val", "normal")] = [Item(f"val/n{i}.png", NORMAL) for i in range(self.n_val)]
        idx[("val", "abnormal")] = [Item(f"val/a{i}.png", ABNORMAL) for i in range(self.n_val)]
        return idx

    def load(self, item):
        self.n_loads += 1
        rng = np.random.default_rng(abs(hash(item.path)) % 2**32)
        s = self.size
        yy, xx = np.mgrid[0:s, 0:s] / s
        img = 0.6 * (((xx - 0.5) / 0.45) ** 2 + ((yy - 0.5) / 0.48) ** 2 < 1)
        for cx in (0.32, 0.68):
            img -= 0.35 * (((xx - cx) / 0.15) ** 2 + ((yy - 0.5) / 0.3) ** 2 < 1)
        if item.label == ABNORMAL:
            img += 0.5 * np.exp(-(((xx - 0.3) ** 2 + (yy - 0.45) ** 2) / 0.005))
        img += 0.03 * rng.standard_normal((s, s))
        return np.clip(img, 0, 1).astype(np.float32)


HP = {"input_shape": (1, 8, 8), "glow": {"n_bits": 8}, "data": {"modality": "cxr",
      "image_size": 8, "volume_size": [4, 8, 8]}}


class VectorFlow(nn.Module):
    """A tiny random RealNVP on flattened images (stand-in for a Glow), built with normflows."""

    def __init__(self, dim: int, seed: int, hparams: dict | None = None):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        flows = []
        for _ in range(3):
            net = nf.nets.MLP([dim // 2, 16, dim], init_zeros=False)
            flows += [nf.flows.AffineCouplingBlock(net), nf.flows.Permute(dim, mode="shuffle")]
        self.flow = nf.NormalizingFlow(nf.distributions.DiagGaussian(dim), flows)
        with torch.no_grad():  # deterministic, non-trivial weights
            for p in self.flow.parameters():
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        self.hparams = hparams if hparams is not None else HP

    def log_likelihood(self, x: torch.Tensor) -> torch.Tensor:
        return self.flow.log_prob(x.flatten(1))  # (B,)


MARGIN_P = {False: [0.4, 0.3, 0.2, 0.1], True: [0.1, 0.2, 0.3, 0.4]}  # margins 1..4 px


def phantom(rng: np.random.Generator, abnormal: bool, size: int = 16) -> np.ndarray:
    """A 'radiograph': a textured body on an empty (zero) background, quantised to 8 bits.
    Both classes share the range of empty borders, but abnormal images tend to have wider ones
    (more zero pixels, like the paper's RSNA non-normal images, Appendix A) and carry a subtle
    lesion (a brighter 3x3 opacity within the body's intensity range)."""
    margin = 1 + int(rng.choice(4, p=MARGIN_P[abnormal]))
    img = np.zeros((size, size), np.float32)
    body = rng.normal(0.5, 0.08, (size - 2 * margin,) * 2).clip(0.1, 0.9)
    img[margin:size - margin, margin:size - margin] = body
    if abnormal:
        r, c = rng.integers(margin, size - margin - 3, size=2)
        img[r:r + 3, c:c + 3] += 0.15
    return np.round(img.clip(0, 1) * 255) / 255


def phantom_set(rng, n_normal: int, n_abnormal: int) -> tuple[torch.Tensor, torch.Tensor]:
    labels = [0] * n_normal + [1] * n_abnormal
    x = np.stack([phantom(rng, bool(y)) for y in labels])[:, None]  # (N, 1, 16, 16)
    return torch.from_numpy(x), torch.tensor(labels)


def auroc(scores: np.ndarray, labels: torch.Tensor) -> float:
    """Rank-based AUROC (torchmetrics would squash raw scores of ~1e3 nats with a sigmoid)."""
    ranks = torch.as_tensor(scores).argsort().argsort().double() / len(scores)  # in [0, 1)
    return float(binary_auroc(ranks, labels))


class MapModel:
    """Stand-in with a per-pixel log-likelihood map (i.i.d. pixels) and its sum."""

    def __init__(self, fn, hparams=None):
        self.fn, self.hparams = fn, hparams if hparams is not None else {}

    def log_likelihood_map(self, x):
        return self.fn(x)[:, 0]  # (B, H, W)

    def log_likelihood(self, x):
        return self.fn(x).flatten(1).sum(1)


def fit_flow(m, x: torch.Tensor, steps: int, gen: torch.Generator):
    from lightning_modules.glow.torch_model import bits_per_dim as bpd

    opt = torch.optim.Adam(m.model.parameters(), lr=2e-3)
    m.train()
    for _ in range(steps):
        xb = x[torch.randint(len(x), (32,), generator=gen)]
        if not m.model.initialized:
            m.model.initialize_actnorm(m._flow_input(xb, noise=True))
        loss = bpd(m.model.log_prob(m._flow_input(xb, noise=True)), m.n_dims).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


def phantom_volume_hu(rng: np.random.Generator, abnormal: bool, shape=(8, 16, 16)) -> np.ndarray:
    """A head-CT-like volume in HU: brain (~30 HU) in air (-1000 HU, 0 after the brain window);
    abnormal: more air around it and a hyperdense (~75 HU, haemorrhage-like) lesion."""
    d, h, w = shape
    m = int(rng.integers(3, 5) if abnormal else rng.integers(1, 3))
    vol = np.full(shape, -1000.0, np.float32)
    vol[1:d - 1, m:h - m, m:w - m] = rng.normal(30, 4, (d - 2, h - 2 * m, w - 2 * m))
    if abnormal:
        z, r, c = rng.integers(1, d - 3), *rng.integers(m, h - m - 3, size=2)
        vol[z:z + 2, r:r + 3, c:c + 3] = 75.0
    return vol.astype(np.int16)


def write_folder_phantoms(root, modality: str, seed: int = 0, n_train: int = 32,
                          n_eval: int = 8) -> None:
    """The folder layout (README: "Your own images (folder layout)") with tiny 2D PNGs or 3D .npy HU volumes."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    groups = {("train", "normal"): [0] * n_train,
              ("train", "mixture"): [0] * (n_train // 2) + [1] * (n_train // 2),
              ("val", "normal"): [0] * n_eval, ("val", "abnormal"): [1] * n_eval,
              ("test", "normal"): [0] * n_eval, ("test", "abnormal"): [1] * n_eval}
    for (split, group), labels in groups.items():
        folder = root / split / group
        folder.mkdir(parents=True)
        for i, y in enumerate(labels):
            if modality == "cxr":
                img = (phantom(rng, bool(y)) * 255).round().astype(np.uint8)
                Image.fromarray(img).save(folder / f"{group}{i:03d}.png")
            else:
                np.save(folder / f"{group}{i:03d}.npy", phantom_volume_hu(rng, bool(y)))


class FailingFile:
    """A file that takes ``budget`` bytes, then calls ``fail`` (raise = disk full or a signal,
    sleep = a process about to be SIGKILLed): a fault at the OS level, whatever the writer."""

    def __init__(self, f, budget: int, fail):
        self._f, self._left, self._fail = f, budget, fail

    def write(self, b):
        if len(b) > self._left:
            self._f.write(bytes(b[: self._left]))
            self._f.flush()
            self._fail()
        self._left -= len(b)
        return self._f.write(b)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def fail_checkpoint_writes(monkeypatch, fail, budget: int = 4096) -> None:
    """Every file opened for writing whose name contains '.ckpt' fails after ``budget`` bytes;
    ``os.rename`` fails as across filesystems (``os.replace`` still works in one folder)."""
    import builtins

    real_open = builtins.open

    def fake_open(file, mode="r", *a, **k):
        f = real_open(file, mode, *a, **k)
        if "w" in mode and isinstance(file, (str, os.PathLike)) and ".ckpt" in os.fspath(file):
            return FailingFile(f, budget, fail)
        return f

    def no_rename(src, dst, *a, **k):  # a temporary file on another filesystem (/tmp on a
        raise OSError(errno.EXDEV, "Invalid cross-device link")  # cluster node): no rename

    def no_sendfile(*a, **k):  # copies go through file.write(), where the fault is
        raise OSError(errno.ENOTSOCK, "sendfile unavailable")

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(os, "rename", no_rename)
    monkeypatch.setattr(os, "sendfile", no_sendfile)


class PoolEncoder(nn.Module):
    """A fixed 'encoder': 4x4 average pooling (16-d features), like h of a trained net."""

    def forward(self, x):  # (B, 1, s, s) -> (B, 16)
        return nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)


def random_images(n, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.linspace(0, 1, size)[None, :] * torch.linspace(0.5, 1, size)[:, None]
    return (base + 0.05 * torch.randn(n, 1, size, size, generator=g)).clamp(0, 1)


def toy_detector(stride_fraction=1.0, **kw):
    """A patch detector on 32² images (sizes 8 and 16, PoolEncoder features) with reference
    databases of 20 random_images."""
    from lightning_modules.patch_detector.detector import PatchAnomalyDetector
    from lightning_modules.patch_detector.reference_db import ReferenceDB

    sizes = [8, 16]
    kw.setdefault("distance", "euclidean")
    det = PatchAnomalyDetector({s: PoolEncoder() for s in sizes}, 32, sizes, [1, 0],
                               stride_fraction=stride_fraction, **kw)
    ref = random_images(20)
    feats = det.features(ref)
    for s in sizes:
        f = feats[s]
        n_img, n, d = f.shape
        ct = det.cell_tensors(s)
        det.set_db(ReferenceDB(s, f.reshape(-1, d), **{k: v.repeat(n_img) for k, v in ct.items()},
                               image_index=torch.arange(n_img).repeat_interleave(n).int(),
                               config=det.patch_config(s)))
    return det
