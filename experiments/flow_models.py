"""The two Glows of the flow posterior (Shibata et al., arXiv:2001.07847): M0 on S_normal
(train/normal), M1 on S_mixture (train/mixture), and with ``glow.schedule=matched`` their shared
start, each in ``OUT/<name>``.

A finished model is reused only when its ``OUT/<name>/fingerprint.json`` proves it is the same:
the items of its training set, the resolved configuration of its training, the checkpoint it
started from and the code version (``git_commit``). The fingerprint names the checkpoint
relative to the run folder, so a copied run folder uses its own files. On a mismatch the run
stops and says how to choose (``glow.reuse_models=retrain`` trains again, ``force`` reuses
anyway); an interrupted training resumes from ``OUT/<name>/checkpoints/last.ckpt``. Each model
is its own W&B run (``glow_<modality>_<name>``), grouped with the evaluation's.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from experiments.config import ConfigError, check_fingerprint, git_commit, json_digest
from lightning_modules.checkpoint import file_sha256

log = logging.getLogger(__name__)

MODELS = {"m0": ("train", "normal", "S_normal"), "m1": ("train", "mixture", "S_mixture"),
          # glow.schedule=matched: the shared start of M0 and M1, trained on S_normal
          "start": ("train", "normal", "S_normal")}
FINGERPRINT = "fingerprint.json"  # written after a finished training
# glow.* keys that do not change a trained model (how it is scored or reused)
SCORING_ONLY = ("reuse_models", "select_align", "score", "map_sigma", "map_top_fraction", "map_source",
                "map_norm", "map_region", "map_frame", "n_samples", "sample_temperature")


def model_set(cfg: DictConfig, name: str) -> tuple[str, str | None, str]:
    """(split, group, name) of the set ``name`` trains on; group None = every training item
    (the shared start with glow.matched_start=all)."""
    if name == "start" and str(cfg.glow.matched_start) == "all":
        return "train", None, "S_normal + S_mixture"
    return MODELS[name]


def model_cfg(cfg: DictConfig, name: str, out_dir: Path) -> DictConfig:
    """The configuration ``name`` is trained with (glow.m0_epochs / m1_epochs resolved)."""
    sub = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    OmegaConf.set_struct(sub, True)
    sub.glow.model = "m0" if name == "start" else name
    if name != "start":  # the matched schedule's shared start keeps trainer.max_epochs
        from experiments.train_glow import model_epochs

        sub.trainer.max_epochs = model_epochs(sub)
    sub.out_dir = str(out_dir)
    sub.job = "train_glow"
    sub.ckpt_path = "last" if (out_dir / "checkpoints" / "last.ckpt").is_file() else None
    return sub


def resolved_model_configs(cfg: DictConfig) -> dict[str, DictConfig]:
    """The configurations M0 and M1 are trained with, as :func:`ensure_model` builds them."""
    out = Path(cfg.out_dir)
    return {name: model_cfg(cfg, name, out / name) for name in ("m0", "m1")}


def fingerprint(sub: DictConfig, items: list, init_ckpt: Path | None, max_steps: int | None,
                select: str, template=None) -> dict:
    """What a trained model depends on (``ckpt_path``, ``out_dir`` and the data root excluded:
    the item list stands for the data; a resumed training is the same training). ``template``:
    the pose template (glow.align), which depends on S_normal even when M1 trains on S_mixture."""

    data = {k: v for k, v in OmegaConf.to_container(sub.data, resolve=True).items()
            if k not in ("num_workers", "root")}
    settings = {k: OmegaConf.to_container(sub[k], resolve=True)
                for k in ("glow", "optim", "trainer")}
    for key in SCORING_ONLY:
        settings["glow"].pop(key, None)
    settings.update(data=data, seed=int(sub.seed), max_steps=max_steps, select=select)
    return {"items": json_digest([[str(it.path), it.label] for it in items]),
            "settings": json_digest(settings),
            "init": file_sha256(init_ckpt) if init_ckpt is not None else None,
            "template": None if template is None else hashlib.sha256(
                template.detach().cpu().float().contiguous().numpy().tobytes()).hexdigest(),
            "code": git_commit()}


def reusable(cfg: DictConfig, folder: Path, fp: dict) -> Path | None:
    """The finished model in ``folder`` when its fingerprint matches ``fp``; None when there
    is none (or ``glow.reuse_models=retrain``); a mismatch is a :class:`ConfigError`."""
    path, mode = folder / FINGERPRINT, str(cfg.glow.reuse_models)
    if mode == "retrain" or not path.is_file():
        return None
    old = json.loads(path.read_text())
    ckpt = folder / old.get("ckpt", "")
    if not ckpt.is_file():
        log.warning("%s names %s, which does not exist: training again.", path, ckpt)
        return None
    check_fingerprint(folder, old, fp, mode, "glow.reuse_models", "a model")
    return ckpt


def ensure_model(cfg: DictConfig, name: str, out: Path, dm, init_ckpt: Path | None = None,
                 max_steps: int | None = None, template=None) -> Path:
    """The checkpoint of ``name`` (m0 | m1 | start) under ``OUT/<name>``: reused when its
    fingerprint matches, else trained. ``init_ckpt``: start from these weights (M1 from M0 with
    ``glow.m1_init=m0``; M0 and M1 from the shared start with ``glow.schedule=matched``).
    ``max_steps``: exactly this many optimiser steps, keeping the last checkpoint.
    ``template``: the pose template of S_normal (glow.align), the same for every model."""
    from experiments.common import finish_wandb

    folder = out / name
    split, group, set_name = model_set(cfg, name)
    items = dm.items(split, group)
    sub = model_cfg(cfg, name, folder)
    select = str(sub.glow.select)  # best: on a held-out part of the model's own training set
    if max_steps is not None:
        sub.trainer.max_epochs = -1  # the step count decides
        select = "last"
    elif name == "start":
        select = "last"  # the shared start: a fixed length
    fp = fingerprint(sub, items, init_ckpt, max_steps, select, template)
    ckpt = reusable(cfg, folder, fp)
    if ckpt is not None:
        log.info("Reusing %s = %s (same data, settings and code)", name.upper(), ckpt)
        return ckpt
    if not items:
        raise ConfigError(
            f"{set_name} ({split}/{group}) is empty: {name.upper()} cannot be trained. For "
            f"data=folder put the images in <data.root>/{split}/{group}/ (README: 'Your own "
            "images (folder layout)').")
    from experiments.train_glow import train

    log.info("Training %s on %s (%s/%s, %d items) into %s%s%s%s", name.upper(), set_name, split,
             group, len(items), folder, " (resuming from last.ckpt)" if sub.ckpt_path else "",
             f", starting from {init_ckpt}" if init_ckpt is not None else "",
             f", {max_steps} steps" if max_steps else "")
    log.info("%s: %d epochs, optim %s lr %g (%s, %g warm-up epochs), checkpoint %s",
             name.upper(), int(sub.trainer.max_epochs), sub.optim.name, float(sub.optim.lr),
             sub.optim.scheduler, float(sub.optim.warmup_epochs), select)
    kw = {"max_steps": max_steps} if max_steps else {}
    if template is not None:
        kw["template"] = template
    if select != "best":
        kw["select"] = select
    if group is None:
        kw["group"] = "all"
    ckpt = Path(train(sub, datamodule=dm, init_ckpt=init_ckpt, **kw))
    finish_wandb()  # one W&B run per model: train() leaves its run open
    folder.mkdir(parents=True, exist_ok=True)
    rel = ckpt.resolve().relative_to(folder.resolve()) if ckpt.resolve().is_relative_to(
        folder.resolve()) else ckpt.resolve()
    (folder / FINGERPRINT).write_text(json.dumps({**fp, "ckpt": str(rel)}, indent=2))
    return ckpt


def train_models(cfg: DictConfig, out: Path, dm) -> dict[str, Path]:
    """M0 and M1 per ``glow.schedule``.

    independent (paper): M0 on S_normal for trainer.max_epochs; M1 on S_mixture for
    trainer.max_epochs, from scratch or from M0 (``glow.m1_init``).
    matched (ours): a shared start on S_normal (glow.matched_start=all: on S_normal and
    S_mixture together) for trainer.max_epochs (OUT/start), then M0
    continues on S_normal and M1 on S_mixture, each for exactly ``glow.matched_steps``
    optimiser steps (``glow.m1_init`` is then irrelevant: both start from the shared start).
    glow.align != none: every model aligns to one pose template of S_normal, fitted here.
    """
    from experiments.train_glow import fit_align_template

    tpl = fit_align_template(cfg, dm)
    if cfg.glow.schedule == "matched":
        start = ensure_model(cfg, "start", out, dm, template=tpl)
        steps = int(cfg.glow.matched_steps)
        return {"start": start,
                "m0": ensure_model(cfg, "m0", out, dm, init_ckpt=start, max_steps=steps,
                                   template=tpl),
                "m1": ensure_model(cfg, "m1", out, dm, init_ckpt=start, max_steps=steps,
                                   template=tpl)}
    ckpts = {"m0": ensure_model(cfg, "m0", out, dm, template=tpl)}
    ckpts["m1"] = ensure_model(cfg, "m1", out, dm, template=tpl,
                               init_ckpt=ckpts["m0"] if cfg.glow.m1_init == "m0" else None)
    return ckpts
