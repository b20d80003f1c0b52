"""Schema of the ``glow`` config section (2D/3D Glow, Shibata et al.)."""

from __future__ import annotations

from dataclasses import dataclass

# Allowed values of the options below (validated with every config in experiments.config).
M1_INITS = ("scratch", "m0")
INTENSITY_NORMS = ("none", "rank")
SCHEDULES = ("independent", "matched")
MATCHED_STARTS = ("normal", "all")
IMAGE_SCORES = ("global", "local", "likelihood")
MAP_SOURCES = ("posterior", "likelihood")
MAP_NORMS = ("none", "position")
MAP_REGIONS = ("all", "interior")
MAP_FRAMES = ("image", "template")
COUPLING_NETS = ("normflows", "openai")
SELECTS = ("best", "last")
REUSE_MODES = ("check", "retrain", "force")


@dataclass
class GlowConfig:
    model: str = "m0"  # m0 = trained on S_normal (train/normal), m1 = on S_mixture (train/mixture)
    levels: int = 7  # L
    steps: int = 32  # K per level
    hidden_channels: int = 512
    # paper: sigma(h - 0.1) + 0.6 ; glow: sigma(h + 2) (normflows' original)
    coupling_scale: str = "paper"
    # NN() of the coupling. normflows (default, ours): conv3 -> ReLU -> conv1 -> ReLU -> zero conv3.
    # openai (paper: Shibata et al. ran "the original Glow code"): conv3 -> ActNorm -> ReLU ->
    # conv1 -> ActNorm -> ReLU -> zero conv3 with a learned log-scale (factor 3), openai/glow's f().
    coupling_net: str = "normflows"
    checkpointing: bool = False  # gradient checkpointing of the coupling networks
    # ActNorm + 1x1 conv applied as one convolution (same function, less memory and time)
    fuse_actnorm: bool = True
    n_bits: int = 8  # dequantisation bit depth (8 for RSNA, 7 for brain-window CT)
    sample_temperature: float = 0.7
    # data.batch_size is the effective (global) batch; each optimiser step accumulates this many
    # micro-batches of data.batch_size / (devices * accumulate_grad_batches) per device
    accumulate_grad_batches: int = 1
    n_samples: int = 16  # fictional images saved to <out_dir>/samples.png after training
    # Flow posterior only: how M1 starts. "scratch" (paper): a fresh Glow trained on S_mixture.
    # "m0": M1 starts from M0's weights and is trained on S_mixture for the same epochs (paired
    # initialisation: log p(x|M0) - log p(x|M1) then measures what S_mixture added instead of
    # the run-to-run noise of two independent small flows; for short CPU trainings).
    m1_init: str = "scratch"
    # Epochs per model (glow.schedule=independent); null = trainer.max_epochs. Paper, Table 4
    # (head CT): "Train 1" 30 epochs, "Train 2" 20; our reading: Train 1 = M0 on S_normal,
    # Train 2 = M1 on S_mixture.
    m0_epochs: int | None = None
    m1_epochs: int | None = None
    # Which checkpoint a training returns. last (paper: a fixed number of epochs) | best (ours:
    # the lowest val/bpd on a held-out val_fraction of the model's OWN training set: held-out
    # normals for M0, held-out mixture for M1; never the labelled val/test images).
    select: str = "best"
    val_fraction: float = 0.1  # only with select=best; 0 = no held-out set (train/bpd decides)
    # Training augmentation (the fictional-image training of Shibata et al. section 4.1: each
    # volume "augmented seven times by rotations of +-2 degrees"). Our reading: rotation_copies
    # in-plane (axial) rotations per item at angles evenly spaced in [-rotation_deg,
    # +rotation_deg]. 1 = off.
    rotation_copies: int = 1
    rotation_deg: float = 0.0
    # --- Our options beyond Shibata et al. (profile=paper keeps the published method: all
    # off). Measured effects: configs/flow.yaml and the README's flow section.
    # Per-image intensity normalisation before dequantisation: none (paper) | rank (each pixel
    # -> its mid-rank in its own image; invariant to exposure gain / gamma).
    intensity_norm: str = "none"
    # Pose alignment before the flow: none (paper) | similarity (each image resampled onto a
    # template of S_normal by the rotation / scale / shift maximising its NCC with it,
    # lightning_modules/align.py, before intensity_norm; volumes: one in-plane pose each, the
    # same for every slice). M0 and M1 share the template (fitted on S_normal, stored in each
    # checkpoint); per-pixel maps are mapped back onto each image | affine (the same with an
    # aspect ratio and a shear as well).
    align: str = "none"
    # Flow pipeline only, with align != none: M0 and M1 trained both ways, unaligned (OUT/m0,
    # OUT/m1) and aligned (OUT/align_<align>/), and the pair with the higher validation AUROC
    # kept (lightning_modules/selection.py; the unaligned pair wins ties).
    select_align: bool = False
    # Flow posterior: how M0 and M1 are trained. independent (paper): each for
    # trainer.max_epochs on its own set (M1's start: m1_init). matched: a shared start (a Glow
    # trained on S_normal for trainer.max_epochs), then M0 continues on S_normal and M1 on
    # S_mixture for the same number of optimiser steps (matched_steps), so log p(x|M0) -
    # log p(x|M1) measures what the two sets differ in, not how much each model was trained.
    schedule: str = "independent"
    matched_steps: int = 100
    # schedule=matched: what the shared start is trained on. normal: S_normal (M0 then keeps
    # fitting images it has already fitted while M1 meets new ones, so log p(x|M1) - log p(x|M0)
    # on unseen images is M0's generalisation gap, +280 +- 110 nats on dev bct) | all:
    # S_normal and S_mixture together (both models then continue on images the start has seen).
    matched_start: str = "normal"
    # Flow posterior image score: global (paper eq. 3: -log p(normal|x) of the whole image) |
    # local (the anomaly map, per-pixel contributions to log p(x|M1) - log p(x|M0), smoothed by
    # a Gaussian of map_sigma pixels; image score = mean of its top map_top_fraction pixels) |
    # likelihood (-log p(x|M0) alone, the paper's Appendix A baseline).
    score: str = "global"
    # ours: the image score chosen on the labelled validation set among `score` (tried first),
    # global, local and likelihood, by validation AUROC (lightning_modules/selection.py).
    select_score: bool = False
    map_sigma: float = 1.0
    map_top_fraction: float = 0.01
    # The map the local score (and the report's map) is made of: posterior (l1 - l0) |
    # likelihood (-l0: M0's per-position -log p(x|M0), Appendix A's score made local).
    map_source: str = "posterior"
    # none | position: the map as z per position against the maps of the training normals
    # (S_normal; mean and SD per position, SD floored at its 10th percentile), stored in
    # FlowPosteriorModule's state.
    map_norm: str = "none"
    # all | interior: the top map_top_fraction only over pixels strictly inside the intensity
    # window, eroded by one pixel (head CT: brain and soft tissue, not background nor bone).
    map_region: str = "all"
    # image | template (with align != none; ours): where the map is normalised and scored. image:
    # each map resampled back onto its image first; template: in the template's frame, where a
    # position holds the same anatomy in every image (then resampled back for display).
    map_frame: str = "image"
    # Flow pipeline: a finished M0 / M1 in OUT/<m> is reused only when its fingerprint.json
    # matches (training items, resolved settings, start checkpoint, code version). check: reuse
    # on a match, stop with a message on a mismatch | retrain: always train | force: reuse anyway.
    reuse_models: str = "check"
