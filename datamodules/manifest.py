"""The split manifest: which item is in which split, for a reviewer to check that no
validation or test case reached training.

``splits.csv`` has one row per indexed item, columns ``item,patient,split,group,label``:
``item`` the path relative to ``data.root`` (absolute if outside it), ``patient`` the case /
patient id (``Item.group_id``; empty for the folder layout, which has none), ``split``
``train|val|test``, ``group`` ``normal|mixture|abnormal``, ``label`` 0 / 1 and empty for the
unlabeled mixture. Rows are sorted, so the same split gives the same file and the same sha256,
which ``run_info.json`` records as ``splits_sha256``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path

from datamodules.base import SPLIT_GROUPS, UNLABELED

COLUMNS = ("item", "patient", "split", "group", "label")


def manifest_rows(dm) -> list[tuple[str, str, str, str, str]]:
    dm.setup()
    root = Path(dm.root).resolve() if getattr(dm, "root", None) else None
    rows = []
    for split, groups in SPLIT_GROUPS.items():
        for group in groups:
            for it in dm.items(split, group):
                p = Path(it.path).resolve()
                rel = p.relative_to(root).as_posix() if root and p.is_relative_to(root) \
                    else p.as_posix()
                patient = it.group_id if getattr(dm, "patient_ids", True) else ""
                label = "" if it.label == UNLABELED else str(int(it.label))
                rows.append((rel, patient, split, group, label))
    return sorted(rows)


def write_splits_csv(dm, path: str | Path) -> str:
    """Write the manifest of ``dm`` to ``path``; returns its sha256 (hex)."""
    buf = io.StringIO()
    wr = csv.writer(buf, lineterminator="\n")
    wr.writerow(COLUMNS)
    wr.writerows(manifest_rows(dm))
    data = buf.getvalue().encode()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return hashlib.sha256(data).hexdigest()


def record_splits(dm, out_dir: str | Path) -> str:
    """``OUT/splits.csv`` and its sha256 in ``OUT/run_info.json`` (when that file exists)."""
    out = Path(out_dir)
    sha = write_splits_csv(dm, out / "splits.csv")
    info_path = out / "run_info.json"
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        info["splits_sha256"] = sha
        info_path.write_text(json.dumps(info, indent=2))
    return sha
