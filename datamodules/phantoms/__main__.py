"""``python -m datamodules.phantoms --format padchest|rsna|bct|folder --out DIR ...``"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from datamodules.phantoms.writers import write_bct, write_folder, write_padchest, write_rsna


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(prog="python -m datamodules.phantoms",
                                description="Write phantom data in a real on-disk format.")
    p.add_argument("--format", required=True, choices=["padchest", "rsna", "bct", "folder"])
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--modality", default="cxr", choices=["cxr", "bct"],
                   help="folder format only: 2D chest radiographs or 3D head CT")
    p.add_argument("--n", type=int, default=20, help="items per class (folder: per train "
                   "group; val/test get N//4 per class)")
    p.add_argument("--size", type=int, default=None,
                   help="image side (2D, default 256) or in-plane side of a CT volume "
                        "(depth = side//4, default 32x128x128)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--style", default="default", choices=["default", "hard"],
                   help="folder format only: `hard` = the detection benchmark's nuisance "
                        "variation (pose, exposure, habitus) and small, faint lesions")
    a = p.parse_args(argv)
    n, t0 = a.n, time.perf_counter()
    if a.format == "padchest":
        out = write_padchest(a.out, n_normal=n, n_abnormal=n, size=a.size or 256, seed=a.seed)
        what = f"{2 * n} PA/Physician rows (+ rows to filter), labels {out.name}"
    elif a.format == "rsna":
        out = write_rsna(a.out, n, n, n, size=a.size or 256, seed=a.seed)
        what = f"{3 * n} patients (Normal / Not Normal / Lung Opacity: {n} each)"
    elif a.format == "bct":
        shape = (32, 128, 128) if a.size is None else (max(a.size // 4, 4), a.size, a.size)
        out = write_bct(a.out, n, n // 2, n - n // 2, shape=shape, seed=a.seed)
        what = f"{2 * n} CT series ({n} normal, {n // 2} haemorrhage, {n - n // 2} infarct)"
    else:
        nv = max(1, n // 4)
        out = write_folder(a.out, a.modality, n_train_normal=n, n_train_mixture=n, n_val=nv,
                           n_test=nv, size=a.size, seed=a.seed, style=a.style)
        what = (f"{a.modality}: train {n} normal + {n} mixture, val/test {nv} per class")
    print(f"phantoms [{a.format}] {what} -> {out} ({time.perf_counter() - t0:.1f} s)")
    return out


if __name__ == "__main__":
    main()
