"""``build_datamodule(data_cfg)``: the one place a data module is chosen from the config.

``data.name``: padchest | rsna | bct | folder | phantom_cxr | phantom_bct. When ``data.root``
is null/empty, phantom data are generated in that data set's real on-disk format by
:mod:`datamodules.phantoms` into ``.cache/phantoms/<name>-<modality>-<size>-<count>-<seed>/``
under the repository root (reused when its completion marker exists), and a WARNING says so.
"""

from __future__ import annotations

import copy
import logging
import shutil
import tempfile
from pathlib import Path

from datamodules.base import MedicalDataModule
from datamodules.common import CACHE_DIR
from datamodules.config import data_config

log = logging.getLogger(__name__)

PHANTOM_DIR = CACHE_DIR / "phantoms"
MARKER = ".complete"
NAMES = ("padchest", "rsna", "bct", "folder", "phantom_cxr", "phantom_bct")


def _classes():
    from datamodules.brainct import BrainCTDataModule
    from datamodules.folder import FolderDataModule
    from datamodules.padchest import PadChestDataModule
    from datamodules.rsna import RSNADataModule

    return {"padchest": PadChestDataModule, "rsna": RSNADataModule, "bct": BrainCTDataModule,
            "folder": FolderDataModule, "phantom_cxr": FolderDataModule,
            "phantom_bct": FolderDataModule}


def _with(cfg, **values):
    """A copy of the typed ``cfg`` with ``values`` set."""
    out = copy.deepcopy(data_config(cfg))
    for k, v in values.items():
        out[k] = v
    return out


def modality_of(cfg) -> str:
    cfg = data_config(cfg)
    name = str(cfg.name)
    if name in ("bct", "phantom_bct"):
        return "bct"
    if name in ("padchest", "rsna", "phantom_cxr"):
        return "cxr"
    return str(cfg.modality)


def phantom_root(cfg) -> Path:
    cfg = data_config(cfg)
    name = str(cfg.name)
    name = "folder" if name.startswith("phantom_") else name
    modality = modality_of(cfg)
    size = "x".join(map(str, _volume_shape(cfg))) if modality == "bct" else \
        str(int(cfg.phantom_size))
    count = int(cfg.phantom_count)
    seed = int(cfg.phantom_seed)
    return PHANTOM_DIR / f"{name}-{modality}-{size}-{count}-{seed}"


def _phantom_writer(name: str):
    try:
        from datamodules import phantoms
    except ImportError as e:
        raise ImportError(
            "data.root is empty, so phantom data would be generated, but datamodules.phantoms "
            f"is not importable ({e}). Set data.root=DIR to use real data."
        ) from None
    attr = {"padchest": "write_padchest", "rsna": "write_rsna", "bct": "write_bct"}.get(
        name, "write_folder")
    fn = getattr(phantoms, attr, None)
    if fn is None:
        raise ImportError(f"datamodules.phantoms has no {attr}(); cannot generate phantom data.")
    return fn


def _phantom_kwargs(name: str, cfg) -> dict:
    """Arguments of the phantom writer for ``data.name``, from ``data.phantom_*``.

    ``phantom_count`` = number of normal images/cases; abnormal ones are half as many (split
    between the lesion kinds), and the folder layout gets ``count`` mixture items and
    ``count / 8`` val/test items per class."""
    count = max(int(cfg.phantom_count), 8)
    size = int(cfg.phantom_size)
    seed = int(cfg.phantom_seed)
    if name == "padchest":
        return dict(n_normal=count, n_abnormal=count // 2, size=size, seed=seed)
    if name == "rsna":
        return dict(n_normal=count, n_not_normal=count // 4, n_opacity=count // 4, size=size,
                    seed=seed)
    if name == "bct":
        return dict(n_normal=count, n_haemorrhage=count // 4, n_infarct=count // 4,
                    shape=_volume_shape(cfg), seed=seed)
    modality = modality_of(cfg)
    return dict(modality=modality, n_train_normal=count, n_train_mixture=count,
                n_val=max(2, count // 8), n_test=max(2, count // 8),
                size=_volume_shape(cfg) if modality == "bct" else size, seed=seed)


def _volume_shape(cfg) -> tuple[int, int, int]:
    cfg = data_config(cfg)
    return tuple(int(v) for v in cfg.volume_size)


def ensure_phantoms(cfg) -> Path:
    """Generate (once) and return the phantom data folder for ``cfg``."""
    cfg = data_config(cfg)
    root = phantom_root(cfg)
    if (root / MARKER).is_file():
        log.warning("data.root is empty: using PHANTOM data from %s (synthetic images, not "
                    "patient data; results say nothing about real performance).", root)
        return root
    name = str(cfg.name)
    fn = _phantom_writer(name)
    kwargs = _phantom_kwargs("folder" if name.startswith("phantom_") else name, cfg)
    log.warning("data.root is empty: generating PHANTOM data (%s) in %s. Set data.root=DIR to "
                "use real data.", fn.__name__, root)
    root.parent.mkdir(parents=True, exist_ok=True)
    # Write into a temporary sibling and rename, so an interrupted or concurrent run never sees
    # a half-written folder; the marker is written last.
    tmp = Path(tempfile.mkdtemp(prefix=root.name + ".", dir=root.parent))
    try:
        fn(tmp, **kwargs)
        (tmp / MARKER).write_text("complete\n")
        try:
            tmp.rename(root)
        except OSError:
            if not (root / MARKER).is_file():  # not a concurrent winner: a real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def build_datamodule(data_cfg) -> MedicalDataModule:
    """The data module for ``data_cfg`` (the ``data`` config section)."""
    data_cfg = data_config(data_cfg)
    name = str(data_cfg.name)
    classes = _classes()
    if name not in classes:
        raise ValueError(f"data.name={name!r} is not one of {list(classes)}")
    cfg = data_cfg
    if name in ("phantom_cxr", "phantom_bct") or name == "bct":
        cfg = _with(cfg, modality=modality_of(cfg))
    if not cfg.root:
        root = ensure_phantoms(cfg)
        # Set sizes from the real-data YAMLs (e.g. the paper's RSNA Table 1) do not apply to
        # the small phantom set: use every phantom case with the default shares.
        cfg = _with(cfg, root=str(root), n_normal=None, n_mixture_normal=None,
                    n_mixture_abnormal=None, n_unknown_normal=None, n_unknown_abnormal=None)
    return classes[name](cfg)
