"""Configuration: one dataclass schema per section, values in ``configs/*.yaml``.

Merge order (later wins)::

    schema  <-  configs/<job>.yaml  <-  configs/data/<name>.yaml (``data=<name>``)
            <-  profile overlay (configs/profiles/<profile>.yaml, then the job YAML's
                ``profiles.<profile>`` block)  <-  command-line overrides

Overrides are OmegaConf dotlist items, accepted as ``key=value`` and as ``--key=value`` (what
``wandb agent`` passes); the leading dashes are stripped in :func:`parse_overrides` only.
Unknown keys and wrong types fail loudly, naming the key and where it came from.
"""

from __future__ import annotations

import difflib
import json
import logging
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from datamodules.config import DataConfig
from lightning_modules.glow import config as glow_config
from lightning_modules.glow.config import GlowConfig
from lightning_modules.patch_detector import config as patch_config
from lightning_modules.patch_detector.config import PatchConfig
from lightning_modules.simclr.config import SimCLRConfig

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs"


@dataclass
class OptimConfig:
    name: str = "lars"  # lars | adam | adamw | adamax | sgd (lightning_modules/optim.py)
    lr: float = 4.8
    weight_decay: float = 1e-6
    momentum: float = 0.9
    # How ``lr`` is scaled with the global batch size B: none | linear (lr*B/ref) | sqrt
    lr_scaling: str = "none"
    reference_batch_size: int = 256
    warmup_epochs: float = 10.0
    # cosine (warm-up + cosine decay) | warmup (openai/glow: linear warm-up, then constant) | none
    scheduler: str = "cosine"
    grad_clip: float | None = None


@dataclass
class TrainerConfig:
    max_epochs: int = 100
    accelerator: str = "auto"  # auto | cpu | gpu
    devices: Any = 1  # int, list of ids, or "auto"
    num_nodes: int = 1
    strategy: str = "auto"  # auto | ddp | ddp_spawn | ...
    precision: str = "32-true"  # 32-true | bf16-mixed | 16-mixed
    sync_batchnorm: bool = False
    fast_dev_run: bool = False
    # Lightning: a float is a fraction of the batches, an int a number of batches.
    limit_train_batches: Any = 1.0
    limit_val_batches: Any = 1.0
    log_every_n_steps: int = 10
    check_val_every_n_epoch: int = 1
    deterministic: bool = False
    progress_bar: bool = True


@dataclass
class LoggerConfig:
    name: str = "wandb"  # wandb | none
    # offline (default: nothing leaves the machine) | online (opt in) | disabled
    mode: str = "offline"
    project: str = "medanomaly"
    entity: str | None = None
    group: str | None = None
    log_images: bool = False  # images may show patient anatomy: opt in


@dataclass
class EvalConfig:
    threshold: float = 0.5
    n_extremes: int = 36  # top-k most / least anomalous shown in the report
    # flow report: mosaic of the n most likely abnormal test images (Shibata et al. Figs. 9-10:
    # 1,000), capped at the number of test items; 0 = none
    n_mosaic: int = 1000
    n_overlays: int = 8
    # flow pipeline without a validation set (data.val_fraction=0, e.g. the paper's 33 + 33
    # head CTs): decision thresholds cross-fitted on test in this many stratified folds
    cross_fit_folds: int = 5


@dataclass
class Config:
    job: str = "pipeline"
    method: str = "patch"  # patch | flow
    profile: str = "auto"  # auto | cpu | paper
    out_dir: str = "outputs/run"
    seed: int = 0
    ckpt_path: str | None = None  # "last" resumes from <out_dir>/checkpoints/last.ckpt
    data: DataConfig = field(default_factory=DataConfig)
    simclr: SimCLRConfig = field(default_factory=SimCLRConfig)
    glow: GlowConfig = field(default_factory=GlowConfig)
    patch: PatchConfig = field(default_factory=PatchConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# Allowed values of string options; checked after merging (OmegaConf checks types only).
CHOICES: dict[str, tuple[str, ...]] = {
    "method": ("patch", "flow"),
    "profile": ("auto", "cpu", "paper"),
    "data.name": ("padchest", "rsna", "bct", "folder", "phantom_cxr", "phantom_bct"),
    "data.modality": ("cxr", "bct"),
    "data.exclude_policy": ("drop", "keep"),
    "data.suboptimal_policy": ("drop", "keep"),
    "data.verify": ("quick", "full", "none"),
    "simclr.backbone": ("resnet18", "resnet34", "resnet50"),
    "glow.model": ("m0", "m1"),
    "glow.coupling_scale": ("paper", "glow"),
    "glow.m1_init": glow_config.M1_INITS,
    "glow.intensity_norm": glow_config.INTENSITY_NORMS,
    "glow.align": patch_config.ALIGN_MODES,  # one registration (lightning_modules/align.py)
    "glow.schedule": glow_config.SCHEDULES,
    "glow.matched_start": glow_config.MATCHED_STARTS,
    "glow.score": glow_config.IMAGE_SCORES,
    "glow.map_source": glow_config.MAP_SOURCES,
    "glow.map_norm": glow_config.MAP_NORMS,
    "glow.map_region": glow_config.MAP_REGIONS,
    "glow.map_frame": glow_config.MAP_FRAMES,
    "glow.coupling_net": glow_config.COUPLING_NETS,
    "glow.select": glow_config.SELECTS,
    "glow.reuse_models": glow_config.REUSE_MODES,
    "patch.features": patch_config.FEATURE_MODES,
    "patch.intensity_norm": patch_config.INTENSITY_NORMS,
    "patch.align": patch_config.ALIGN_MODES,
    "patch.db_dtype": patch_config.DB_DTYPES,
    "patch.image_score": patch_config.IMAGE_SCORES,
    "patch.reuse_encoders": patch_config.REUSE_MODES,
    "patch.distance": ("euclidean", "manhattan", "cosine", "mahalanobis"),
    "patch.fusion": ("geometric", "product"),
    "optim.name": ("lars", "adam", "adamw", "adamax", "sgd"),  # lightning_modules/optim.py
    "optim.lr_scaling": ("none", "linear", "sqrt"),
    "optim.scheduler": ("cosine", "warmup", "none"),
    "logger.name": ("wandb", "none"),
    "logger.mode": ("offline", "online", "disabled"),
}

def _finite(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and v == v and \
        abs(v) != float("inf")


def _ints(lo: int, n: int | None = None):
    """Check: a list of ints >= lo (of length n when given)."""
    def check(v) -> bool:
        return v is not None and (n is None or len(v) == n) and len(v) > 0 and \
            all(isinstance(x, int) and x >= lo for x in v)
    return check


# Ranges checked after merging: key -> (check, what the value must be). A key missing from the
# schema or set to None is skipped. Each failure names the key and the allowed range.
RANGES: dict[str, tuple[Any, str]] = {
    "trainer.max_epochs": (lambda v: v >= 1, "an integer >= 1"),
    "trainer.log_every_n_steps": (lambda v: v >= 1, "an integer >= 1"),
    "trainer.check_val_every_n_epoch": (lambda v: v >= 1, "an integer >= 1"),
    "data.batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "data.num_workers": (lambda v: v >= 0, "an integer >= 0"),
    "data.image_size": (lambda v: v >= 8, "an integer >= 8 (pixels)"),
    "data.volume_size": (_ints(4, 3), "three integers [D, H, W], each >= 4"),
    "data.n_folds": (lambda v: v >= 1, "an integer >= 1"),
    "data.val_fraction": (lambda v: _finite(v) and 0 <= v < 1, "a number in [0, 1)"),
    "data.phantom_count": (lambda v: v >= 2, "an integer >= 2"),
    "data.phantom_size": (lambda v: v >= 8, "an integer >= 8"),
    "data.n_normal": (lambda v: v >= 1, "an integer >= 1 or null"),
    "data.n_mixture_normal": (lambda v: v >= 0, "an integer >= 0 or null"),
    "data.n_mixture_abnormal": (lambda v: v >= 0, "an integer >= 0 or null"),
    "data.n_unknown_normal": (lambda v: v >= 2, "an integer >= 2 or null"),
    "data.n_unknown_abnormal": (lambda v: v >= 2, "an integer >= 2 or null"),
    "glow.levels": (lambda v: v >= 1, "an integer >= 1"),
    "glow.steps": (lambda v: v >= 1, "an integer >= 1"),
    "glow.hidden_channels": (lambda v: v >= 1, "an integer >= 1"),
    "glow.n_bits": (lambda v: 1 <= v <= 16, "an integer in 1..16"),
    "glow.sample_temperature": (lambda v: _finite(v) and v > 0, "a number > 0"),
    "glow.accumulate_grad_batches": (lambda v: v >= 1, "an integer >= 1"),
    "glow.n_samples": (lambda v: v >= 0, "an integer >= 0"),
    "eval.cross_fit_folds": (lambda v: v >= 2, "an integer >= 2"),
    "patch.patch_sizes": (_ints(1), "a list of integers >= 1"),
    "patch.locality": (_ints(0), "a list of integers >= 0 (Chebyshev radius d)"),
    "patch.weights": (lambda v: len(v) > 0 and all(_finite(x) and x >= 0 for x in v),
                      "a list of numbers >= 0"),
    "patch.shrinkage": (lambda v: _finite(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "patch.threshold": (_finite, "a finite number"),
    "patch.chunk_size": (lambda v: v >= 1, "an integer >= 1"),
    "patch.feature_batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "simclr.temperature": (lambda v: _finite(v) and v > 0, "a number > 0"),
    "simclr.chunk_size": (lambda v: v >= 1, "an integer >= 1 or null"),
    "simclr.chunk_size_per_patch": (
        lambda v: all(isinstance(k, int) and k >= 1 and isinstance(c, int) and c >= 1
                      for k, c in v.items()), "a mapping {patch_size: chunk >= 1}"),
    "simclr.crop_scale": (lambda v: _finite(v) and 0 < v <= 1, "a number in (0, 1]"),
    "optim.lr": (lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
    "optim.weight_decay": (lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
    "optim.momentum": (lambda v: _finite(v) and 0 <= v < 1, "a number in [0, 1)"),
    "optim.warmup_epochs": (lambda v: _finite(v) and v >= 0, "a number >= 0"),
    "optim.grad_clip": (lambda v: _finite(v) and v > 0, "a number > 0 or null"),
    "glow.matched_steps": (lambda v: v >= 1, "an integer >= 1"),
    "glow.m0_epochs": (lambda v: v >= 1, "an integer >= 1 or null"),
    "glow.m1_epochs": (lambda v: v >= 1, "an integer >= 1 or null"),
    "glow.val_fraction": (lambda v: _finite(v) and 0 <= v < 1, "a number in [0, 1)"),
    "glow.rotation_copies": (lambda v: v >= 1, "an integer >= 1"),
    "glow.rotation_deg": (lambda v: _finite(v) and 0 <= v <= 180, "a number in [0, 180]"),
    "glow.map_sigma": (lambda v: _finite(v) and v >= 0, "a number >= 0"),
    "glow.map_top_fraction": (lambda v: _finite(v) and 0 < v <= 1, "a number in (0, 1]"),
    "patch.topk_fraction": (lambda v: _finite(v) and 0 < v <= 1, "a number in (0, 1]"),
    "eval.n_extremes": (lambda v: v >= 0, "an integer >= 0"),
    "eval.n_overlays": (lambda v: v >= 0, "an integer >= 0"),
    "eval.n_mosaic": (lambda v: v >= 0, "an integer >= 0"),
    "eval.threshold": (_finite, "a finite number"),
}


def check_ranges(cfg: DictConfig) -> None:
    for key, (check, what) in RANGES.items():
        try:
            value = OmegaConf.select(cfg, key, throw_on_missing=False)
        except OmegaConfBaseException:
            continue
        if value is None:
            continue
        if isinstance(value, ListConfig):
            value = OmegaConf.to_container(value)
        try:
            ok = bool(check(value))
        except TypeError:
            ok = False
        if not ok:
            raise ConfigError(f"{key}={value!r} is out of range: it must be {what}.")


# Shorthands: ``name=value`` selects a YAML file instead of setting a key.
_FILE_SELECTORS = ("profile", "data")


class ConfigError(ValueError):
    """A configuration that cannot be used; the message says which key and how to fix it."""


class PrintConfig(Exception):  # noqa: N818 - a request, not an error
    """``print_config=true``: the resolved configuration (YAML) instead of a run.

    Raised by :func:`load_config` once the configuration is complete; ``experiments.cli``
    prints it and exits 0 (as Hydra's ``--cfg job`` and LightningCLI's ``--print_config``)."""

    def __init__(self, cfg: DictConfig, yaml: str | None = None):
        super().__init__("print_config=true")
        self.cfg = cfg
        self.yaml = OmegaConf.to_yaml(cfg) if yaml is None else yaml


def is_true(value: str) -> bool:
    """A command-line flag's value: ``true``, ``1`` or ``yes`` (any case)."""
    return value.lower() in ("true", "1", "yes")


def print_config_requested(argv: list[str]) -> bool:
    """Whether ``argv`` asks for ``print_config=true`` (the last one wins, as in a merge)."""
    values = [a.lstrip("-").split("=", 1)[1] for a in argv
              if a.lstrip("-").split("=", 1)[0] == "print_config" and "=" in a]
    return bool(values) and is_true(values[-1])


def parse_overrides(argv: list[str]) -> list[str]:
    """Normalise command-line overrides to OmegaConf dotlist items.

    ``--key=value`` (what ``wandb agent`` passes with ``${args}``) and ``key=value`` are the same.
    ``logger=none`` is a shorthand for ``logger.name=none``.
    """
    items = []
    for arg in argv:
        item = arg.lstrip("-") if arg.startswith("--") else arg
        if "=" not in item:
            raise ConfigError(
                f"Override {arg!r} is not of the form key=value (or --key=value)."
            )
        key, value = item.split("=", 1)
        if key == "logger" and value in ("none", "wandb"):
            key = "logger.name"
        items.append(f"{key}={value}")
    return items


def _schema_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    for k in node:
        full = f"{prefix}{k}"
        keys.append(full)
        child = node._get_node(k)
        if isinstance(child, DictConfig):
            keys.extend(_schema_keys(child, full + "."))
    return keys


def _unknown_key_message(schema: DictConfig, key: str, source: str) -> str:
    known = _schema_keys(schema)
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return f"Unknown config key {key!r} (from {source}).{hint} Valid keys: see experiments/config.py."


def _merge(base: DictConfig, other: DictConfig | dict, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except ConfigKeyError as e:
        raise ConfigError(_unknown_key_message(base, str(e.full_key or e.key), source)) from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"Bad value for {e.full_key!r} (from {source}): {e.msg}") from None


def _load_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        avail = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ConfigError(f"Config file {path} does not exist. Available: {avail}")
    return OmegaConf.load(path)


def resolve_profile(profile: str) -> str:
    if profile != "auto":
        return profile
    import torch

    chosen = "paper" if torch.cuda.is_available() else "cpu"
    log.info("profile=auto -> %s (CUDA %savailable)", chosen, "" if chosen == "paper" else "not ")
    return chosen


# --- which YAML files compose a job: chosen here and nowhere else ---------------------------

ENTRIES = ("pipeline", "train_simclr", "train_glow", "sample_glow")
MODALITIES = ("cxr", "bct")


@dataclass(frozen=True)
class Job:
    """What :func:`resolve_job` read from argv: the YAML files of ``configs/`` that compose
    the run (``yamls``, merged in order; ``presets`` after ``data=<name>``, so a paper preset's
    set sizes win over the data YAML but not over the command line) and the overrides left."""

    entry: str
    yamls: tuple[str, ...]
    presets: tuple[str, ...]
    argv: tuple[str, ...]
    method: str | None = None
    modality: str | None = None


def _yaml_select(path: Path, *keys: str) -> Any:
    if not path.is_file():
        return None
    y = OmegaConf.load(path)
    for key in keys:
        v = OmegaConf.select(y, key, default=None)
        if v is not None:
            return v
    return None


def resolve_job(entry: str, argv: list[str] | None = None) -> Job:
    """The one place that decides, from argv, which YAML files compose a job.

    * ``pipeline``: ``method=patch`` (default) -> simclr + patch; ``method=flow`` ->
      ``glow_<modality>`` + flow [+ ``config=<preset>``, e.g. flow_bct_paper];
    * ``train_simclr`` -> simclr; ``train_glow`` -> ``glow_<modality>``; ``sample_glow`` ->
      ``glow_<modality>`` + ``glow_sample_<modality>``.

    The modality comes from ``data.modality=`` (or ``modality=``), else the preset's YAML, else
    the ``data=`` YAML, else cxr. ``method``, ``config`` and ``modality`` are taken out of the
    overrides (``load_job`` sets ``method``); ``data.modality`` stays, and is added where the
    YAMLs were chosen by a default, so the data section agrees with the Glow chosen."""
    if entry not in ENTRIES:
        raise ValueError(f"unknown entry point {entry!r}")
    argv = sys.argv[1:] if argv is None else list(argv)
    rest, found = [], {}
    for arg, item in zip(argv, parse_overrides(argv), strict=True):
        key, value = item.split("=", 1)
        if key in ("method", "config", "modality"):  # they choose files; not passed on
            found[key] = value
            continue
        if key in ("data.modality", "data"):
            found[key] = str(OmegaConf.from_dotlist([f"v={value}"]).v)  # '"cxr"' -> cxr
        rest.append(arg)
    method = found.get("method", "patch") if entry == "pipeline" else None
    if method is not None and method not in CHOICES["method"]:
        raise ConfigError(f"method={method!r} is not one of {list(CHOICES['method'])}")
    preset = found.get("config")
    if preset is not None:
        if entry != "pipeline" or method != "flow":
            raise ConfigError(f"config={preset}: presets are for `experiments.pipeline "
                              "method=flow` (remove config= or add method=flow).")
        if not (CONFIG_DIR / f"{preset}.yaml").is_file():
            avail = sorted(p.stem for p in CONFIG_DIR.glob("flow_*paper.yaml"))
            raise ConfigError(f"config={preset}: {CONFIG_DIR / preset}.yaml does not exist. "
                              f"Available: {avail}")
        if "data" not in found:  # the preset's data set, unless data= is given
            name = _yaml_select(CONFIG_DIR / f"{preset}.yaml", "data.name")
            if name and (CONFIG_DIR / "data" / f"{name}.yaml").is_file():
                rest.insert(0, f"data={name}")
    modality = (found.get("data.modality") or found.get("modality")
                or (preset and _yaml_select(CONFIG_DIR / f"{preset}.yaml", "data.modality"))
                or ("data" in found and _yaml_select(CONFIG_DIR / "data" / f"{found['data']}.yaml",
                                                     "modality", "data.modality"))
                or "cxr")
    if modality not in MODALITIES:
        raise ConfigError(f"data.modality={modality!r} is not one of {list(MODALITIES)}")
    if entry == "pipeline" and method == "patch":
        yamls: tuple[str, ...] = ("simclr", "patch")
    elif entry == "pipeline":
        yamls = (f"glow_{modality}", "flow")
    elif entry == "train_simclr":
        yamls, modality = ("simclr",), None
    elif entry == "train_glow":
        yamls = (f"glow_{modality}",)
    else:
        yamls = (f"glow_{modality}", f"glow_sample_{modality}")
    if "data.modality" not in found and ("modality" in found or yamls[-1] == "flow"):
        rest.append(f"data.modality={modality}")  # the data section agrees with the YAMLs
    return Job(entry, yamls, (preset,) if preset else (), tuple(rest), method, modality)


def load_job(job: Job) -> DictConfig:
    """:func:`load_config` of the YAML files :func:`resolve_job` chose."""
    cfg = load_config(list(job.yamls), list(job.argv), presets=list(job.presets))
    if job.method is not None:
        cfg.method = job.method
    return cfg


def load_config(job: str | list[str], argv: list[str] | None = None,
                presets: list[str] = ()) -> DictConfig:
    """Build the run configuration for ``job`` (a YAML name in ``configs/``, or several):
    schema <- job YAMLs <- ``data=<name>`` <- ``presets`` <- profile <- command line."""
    argv = sys.argv[1:] if argv is None else argv
    overrides = parse_overrides(argv)
    selectors = {}
    rest = []
    print_config = False
    for item in overrides:
        key, value = item.split("=", 1)
        if key == "print_config":
            print_config = is_true(value)
        elif key in _FILE_SELECTORS:
            selectors[key] = value
        else:
            rest.append(item)

    schema = OmegaConf.structured(Config)
    cfg = schema
    jobs = [job] if isinstance(job, str) else list(job)
    profile_blocks = []
    for name in jobs:
        path = CONFIG_DIR / f"{name}.yaml"
        y = _load_yaml(path)
        if "profiles" in y:
            profile_blocks.append((path, y.pop("profiles")))
        cfg = _merge(cfg, y, str(path))
    if "data" in selectors:
        cfg = _merge(cfg, {"data": _load_yaml(CONFIG_DIR / "data" / f"{selectors['data']}.yaml")},
                     f"data={selectors['data']}")
    for name in presets:  # e.g. the papers' set sizes: more specific than the data YAML
        path = CONFIG_DIR / f"{name}.yaml"
        y = _load_yaml(path)
        if "profiles" in y:
            profile_blocks.append((path, y.pop("profiles")))
        cfg = _merge(cfg, y, str(path))

    profile = selectors.get("profile", cfg.profile)
    if profile not in CHOICES["profile"]:
        raise ConfigError(f"profile={profile!r} is not one of {CHOICES['profile']}")
    profile = resolve_profile(profile)
    cfg.profile = profile
    ppath = CONFIG_DIR / "profiles" / f"{profile}.yaml"
    if ppath.is_file():
        cfg = _merge(cfg, _load_yaml(ppath), str(ppath))
    for path, block in profile_blocks:
        if profile in block:
            cfg = _merge(cfg, block[profile], f"{path}: profiles.{profile}")

    try:
        cli = OmegaConf.from_dotlist(rest)
    except OmegaConfBaseException as e:
        raise ConfigError(f"Cannot parse overrides {rest}: {e}") from None
    cfg = _merge(cfg, cli, "command line")
    validate(cfg)
    OmegaConf.set_readonly(cfg, False)
    OmegaConf.set_struct(cfg, True)
    if print_config:
        raise PrintConfig(cfg)
    return cfg


def validate(cfg: DictConfig) -> None:
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {list(allowed)}")
    check_ranges(cfg)
    if cfg.data.fold < 0 or cfg.data.fold >= cfg.data.n_folds:
        raise ConfigError(f"data.fold={cfg.data.fold} must lie in 0..{cfg.data.n_folds - 1}")
    if cfg.glow.map_frame == "template" and cfg.glow.align == "none":
        raise ConfigError("glow.map_frame=template scores the maps in the pose template's "
                          "frame, which glow.align=none does not have; set glow.align=similarity "
                          "(or glow.map_frame=image)")
    p = cfg.patch
    if not (len(p.patch_sizes) == len(p.locality) == len(p.weights)):
        raise ConfigError(
            "patch.patch_sizes, patch.locality and patch.weights must have the same length "
            f"(got {len(p.patch_sizes)}, {len(p.locality)}, {len(p.weights)})"
        )


def json_digest(obj) -> str:
    """sha256 of ``obj`` as canonical JSON (keys sorted): the fingerprints of reused work."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def check_fingerprint(folder: Path, old: dict, new: dict, mode: str, key: str,
                      what: str) -> None:
    """Reuse of work in ``folder`` (recorded ``old`` vs current ``new`` fingerprint) under
    ``key=check|force`` (``retrain`` never gets here): a difference is a :class:`ConfigError`
    naming what differs and both ways out; with ``force`` it is logged and reuse goes on."""
    differs = [k for k in new if old.get(k) != new[k]]
    if not differs:
        return
    if mode != "force":
        raise ConfigError(
            f"{folder} holds {what} trained with other {' / '.join(differs)}; pass "
            f"{key}=retrain to train it again, or {key}=force to use it anyway (or choose "
            "another out_dir).")
    logging.getLogger(__name__).warning("%s: reusing %s trained with other %s (%s=force).",
                                        folder, what, " / ".join(differs), key)


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        )
        commit = out.stdout.strip() or "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=10,
        ).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def prepare_run_dir(cfg: DictConfig, out_dir: str | Path | None = None) -> Path:
    """Create the output folder; write the resolved config, git commit and timestamp into it."""
    out = Path(out_dir or cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, out / "config.yaml", resolve=True)
    info = {
        "git_commit": git_commit(),
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "job": cfg.job,
        "profile": cfg.profile,
        "argv": sys.argv[1:],
    }
    (out / "run_info.json").write_text(json.dumps(info, indent=2))
    return out
