"""``make check-data NAME=<name> DATA=DIR``: index and check a data set before a long run, and
write its split manifest."""

from __future__ import annotations

from pathlib import Path

from datamodules.base import MedicalDataModule
from datamodules.factory import build_datamodule
from datamodules.manifest import write_splits_csv
from experiments.cli import entry
from experiments.common import setup_logging
from experiments.config import load_config


def main(argv: list[str] | None = None) -> MedicalDataModule:
    """Index and check a data set before a long run, e.g.::

        python -m experiments.check_data data=padchest data.root=/data/padchest

    Prints the number of items per split/group and the skipped (unreadable) items, and writes
    the split manifest ``outputs/check-data/<data.name>/splits.csv`` (see
    :mod:`datamodules.manifest`). With ``data.verify=none`` only the CSVs and file names are
    read."""
    setup_logging()
    cfg = load_config("base", argv)
    dm = build_datamodule(cfg.data)
    dm.setup()
    manifest = Path("outputs") / "check-data" / str(cfg.data.name) / "splits.csv"
    sha = write_splits_csv(dm, manifest)
    print(f"{type(dm).__name__} ({'3D' if dm.is_3d else '2D'}):")
    for (split, group), items in sorted(dm._index.items()):
        print(f"  {split:5s}/{group:8s} {len(items):7d}")
    skipped = getattr(dm, "skipped", [])
    print(f"  skipped {len(skipped)}")
    for _item, reason in skipped[:20]:
        print(f"    {reason}")
    print(f"  split manifest: {manifest} (sha256 {sha[:12]}...)")
    return dm


if __name__ == "__main__":
    entry(main)
