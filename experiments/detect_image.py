"""Score new images with a trained detector: the multiresolution patch detector (Kim et al.,
Sci Rep 2023) or the flow posterior (Shibata et al., arXiv:2001.07847).

    python -m experiments.detect_image IMAGE [IMAGE ...] run_dir=OUT [out=DIR] [threshold=T]
        [device=auto|cpu|cuda] [print_config=true]

``run_dir`` is the ``out_dir`` of a ``python -m experiments.pipeline`` run. A patch run's
``patch_detector.ckpt`` holds the detector's settings, encoders, reference databases and the
Normalize fitted on validation; a flow run's ``flow_posterior.ckpt`` holds M0, M1 and the
decision threshold (``ckpt=FILE`` is accepted too; both read with ``weights_only=True``). Images
are PNG (8/16-bit) or DICOM, read and resized as the data modules do; for a head-CT flow run, a
volume (``.npy`` in HU, a DICOM series folder or a NIfTI file), brain-windowed and resampled as
in training. The flow's map is its anomaly map (per-pixel log p(x|M1) - log p(x|M0), shown on
the middle axial slice of a volume). For each image the score and the
verdict (abnormal iff score > threshold) are printed, and ``<out>/<name>_overlay.png`` shows the
final anomaly map on the image (default ``out``: ``<run_dir>/detections``); ``<name>`` is the
file name less its suffix, made unique within the batch (``img``, ``img-2``, ...). A file that
cannot be read is reported on one line (file and reason) and skipped; the count of skipped files
is printed at the end, and the exit status is non-zero only if no image could be scored.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import torch

from datamodules.errors import ImageReadError
from datamodules.images import IMAGE_SUFFIXES
from experiments.cli import entry
from experiments.common import setup_logging
from experiments.config import ConfigError, PrintConfig, is_true
from lightning_modules.devices import pick_device
from lightning_modules.patch_detector.detector import PatchAnomalyDetector
from lightning_modules.patch_detector.lightning_model import PatchDetectorModule

log = logging.getLogger(__name__)
CKPT_FILE = "patch_detector.ckpt"
FLOW_CKPT_FILE = "flow_posterior.ckpt"
KEYS = ("run_dir", "ckpt", "out", "threshold", "device", "print_config")
READ_SUFFIXES = (*IMAGE_SUFFIXES, ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")  # what read_2d takes


def load_detector(run_dir: str | Path, device: str | torch.device = "cpu"
                  ) -> tuple[PatchAnomalyDetector, dict]:
    """The fitted detector of a patch pipeline run (encoders, databases and normalisation all
    come from ``OUT/patch_detector.ckpt``, read with ``weights_only=True``) and its settings."""
    path = Path(run_dir)
    if path.is_dir():
        path = path / CKPT_FILE
    module = PatchDetectorModule.load(path, map_location=device)
    return module.detector, {"threshold": float(module.hparams.threshold),
                             "image_size": module.detector.image_size}


class FlowDetector:
    """A flow run's :class:`FlowPosteriorModule` behind the patch detector's interface:
    ``reader(path)`` gives the model's input, ``detector(x)`` ``{"score", "map"}``."""

    def __init__(self, path: Path, device):
        from lightning_modules.flow_posterior.lightning_model import FlowPosteriorModule

        self.module = FlowPosteriorModule.load(path, map_location=device).to(device)
        self.data = dict(self.module.m0.hparams["data"])
        self.threshold = self.module.threshold

    def read(self, path: str | Path) -> np.ndarray:
        if self.data["modality"] == "bct":
            from datamodules.dicom import load_brain_volume

            if not Path(path).exists():
                raise FileNotFoundError(f"{path} does not exist.")
            return load_brain_volume(path, tuple(int(s) for s in self.data["volume_size"]))
        return read_image(path, int(self.data["image_size"]))

    def __call__(self, x: torch.Tensor) -> dict:
        out = self.module.predict_step({"image": x}, 0)
        return {"score": out["score"], "map": torch.from_numpy(np.asarray(out["map"]))}


def load_run(run_dir: Path, device) -> tuple[object, float, object, dict]:
    """``(detector, threshold, reader, overlay settings)`` of a patch or a flow run."""
    path = run_dir
    if run_dir.is_dir():
        flow = run_dir / FLOW_CKPT_FILE  # a flow run's folder; else the patch run's file
        path = flow if flow.is_file() and not (run_dir / CKPT_FILE).is_file() else \
            run_dir / CKPT_FILE
    is_flow = path.name == FLOW_CKPT_FILE
    if not is_flow and path.name != CKPT_FILE and path.is_file():  # a renamed file: look inside
        from lightning_modules.checkpoint import read_checkpoint

        is_flow = "glows" in (read_checkpoint(path).get("hyper_parameters") or {})
    if is_flow:
        det = FlowDetector(path, device)
        if det.threshold is None:
            raise ConfigError(f"{path} has no decision threshold; pass threshold=T.")
        return det, float(det.threshold), det.read, {
            "map_label": "log p(x|M1) - log p(x|M0) per pixel"}
    det, state = load_detector(path, device)
    return det, state["threshold"], lambda p: read_image(p, det.image_size), {
        "vmin": 0.0, "vmax": 1.0, "map_label": "A_final"}


def read_image(path: str | Path, image_size: int) -> np.ndarray:
    """PNG or DICOM -> (H, W) float32 in [0, 1] at ``image_size`` (as the data modules load)."""
    from datamodules.images import read_2d, resize_2d

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist.")
    return resize_2d(read_2d(path), image_size)


def parse_argv(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    paths, opts = [], {}
    for a in argv:
        item = a[2:] if a.startswith("--") else a
        key = item.split("=", 1)[0]
        if "=" in item and key in KEYS:
            opts[key] = item.split("=", 1)[1]
        elif "=" in item and not Path(a).exists():
            raise ConfigError(f"Unknown option {a!r}; options are {', '.join(KEYS)} (key=value)")
        else:
            paths.append(a)
    if not paths:
        raise ConfigError("Give one or more image paths (PNG or DICOM).")
    if "run_dir" not in opts and "ckpt" not in opts:
        raise ConfigError("Give run_dir=OUT (the out_dir of a patch or flow pipeline run).")
    return paths, opts


def skip_reason(path: str | Path, e: Exception) -> str:
    """One line: the reader's own message (which names the file and the fix) without the
    leading path, or the exception type and text for anything else."""
    msg = " ".join(str(e).split()) or type(e).__name__
    if not isinstance(e, (ImageReadError, FileNotFoundError)):
        msg = f"{type(e).__name__}: {msg}"
    return msg.removeprefix(f"{path}: ")


def unique_name(path: Path, taken: set[str]) -> str:
    """The file name without its last suffix (DICOM UIDs such as ``1.2.840.113619.2.55.3``
    keep every dot), ``-2``, ``-3``, ... appended if an earlier image of the batch had it."""
    base = path.name[: -len(path.suffix)] if path.suffix.lower() in READ_SUFFIXES else path.name
    name, k = base, 1
    while name in taken:
        k += 1
        name = f"{base}-{k}"
    taken.add(name)
    return name


@torch.no_grad()
def main(argv: list[str] | None = None) -> list[dict]:
    setup_logging()
    paths, opts = parse_argv(sys.argv[1:] if argv is None else argv)
    run_dir = Path(opts.get("run_dir") or opts["ckpt"])
    if is_true(opts.get("print_config", "false")):
        from omegaconf import OmegaConf

        raise PrintConfig(OmegaConf.create({
            "images": paths, "run_dir": str(run_dir), "device": opts.get("device", "auto"),
            "threshold": float(opts["threshold"]) if "threshold" in opts else None,  # None: the run's
            "out": opts.get("out") or str((run_dir if run_dir.is_dir() else run_dir.parent)
                                          / "detections")}))
    device = pick_device(opts.get("device", "auto"))
    det, threshold, read, overlay_kw = load_run(run_dir, device)
    threshold = float(opts.get("threshold", threshold))
    out = Path(opts.get("out") or (run_dir if run_dir.is_dir() else run_dir.parent) / "detections")
    out.mkdir(parents=True, exist_ok=True)

    from experiments.plots import plot_overlays
    from experiments.report_flow import display

    results, skipped, names = [], 0, set()
    for p in paths:
        try:
            img = read(p)  # (H, W) | (D, H, W)
        except Exception as e:  # a bad file is reported and skipped, the batch goes on
            skipped += 1
            print(f"skipped {p}: {skip_reason(p, e)}", file=sys.stderr)
            continue
        res = det(torch.from_numpy(img)[None, None].to(device))
        score = float(res["score"][0])
        verdict = "abnormal" if score > threshold else "normal"
        name = unique_name(Path(p), names)
        overlay = plot_overlays(out / f"{name}_overlay.png", [display(img)],
                                [display(res["map"][0].cpu().numpy())],
                                [f"{name}: {score:.3f} ({verdict})"], ncases=1, **overlay_kw)
        print(f"{p}\tscore={score:.4f}\t{verdict}\t{overlay}")
        results.append({"path": str(p), "name": name, "score": score, "verdict": verdict,
                        "overlay": str(overlay)})
    print(f"{len(results)} scored, {skipped} skipped", file=sys.stderr)
    if not results:
        raise SystemExit(f"None of the {len(paths)} images could be scored (reasons above).")
    return results


if __name__ == "__main__":
    entry(main)
