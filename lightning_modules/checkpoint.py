"""Reading checkpoint files: a missing, empty or truncated file is one clear error.

Every loader of the project (Glow, SimCLR encoders, M1's start from M0, Lightning's resume via
``experiments.common.AtomicCheckpointIO``) reads through :func:`read_checkpoint`, always with
``weights_only=True`` (a pickle that would run code is refused by torch, unchanged).
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import torch


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and the fix."""


def file_sha256(path: str | Path, block: int = 1 << 20) -> str:
    """sha256 of a file's bytes (checkpoint identity in fingerprints and databases)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def _broken(path: Path, reason: str) -> CheckpointError:
    return CheckpointError(
        f"{path} is not a usable checkpoint ({reason}): it was cut short or damaged, e.g. by a "
        "kill or a full disk while an older version wrote it. Delete it and resume from another "
        f"checkpoint in {path.parent} (ckpt_path=FILE) or retrain in a new out_dir.")


def check_checkpoint_file(path: str | Path) -> Path:
    """Cheap structural check (no tensor is read): the file exists, is not empty and its zip
    directory (torch.save's format, written last) is complete. Returns the path."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {path} does not exist.")
    if path.stat().st_size == 0:
        raise _broken(path, "empty file")
    try:
        with zipfile.ZipFile(path) as z:
            z.namelist()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise _broken(path, f"truncated: {e}") from None
    return path


def read_checkpoint(path: str | Path, map_location=None, weights_only: bool = True) -> dict:
    """``torch.load(path, weights_only=True)`` after :func:`check_checkpoint_file`; a file
    damaged inside (a bad record, a CRC mismatch) is a :class:`CheckpointError` too."""
    path = check_checkpoint_file(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except EOFError:
        raise _broken(path, "ends early") from None
    except RuntimeError as e:
        if "PytorchStreamReader" not in str(e):  # e.g. a CUDA map_location on a CPU machine
            raise
        raise _broken(path, str(e).split(". ")[0]) from None
