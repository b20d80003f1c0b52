"""Reference database of normal patch features (Kim et al., Sci Rep 2023).

Every patch of every normal training image, for one patch size, is stored with its feature
``h`` (the encoder output, projection head discarded), its position ``(x, y)``, grid cell
``(row, col)`` and the index of its image. One file per patch size, in safetensors (no pickle:
loading a database never executes code). The file's metadata records the sha256 of the encoder
checkpoint that produced the features and the settings that define the patches; loading a
database with another encoder or other settings is an error, because its distances would be
meaningless.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lightning_modules.checkpoint import file_sha256  # noqa: F401  (re-exported)

FORMAT_VERSION = "1"


class ReferenceDBMismatch(ValueError):
    """The database was built with another encoder or other patch settings."""


@dataclass
class ReferenceDB:
    patch_size: int
    features: torch.Tensor  # (N, D) float32
    x: torch.Tensor  # (N,) int32, left pixel of the patch
    y: torch.Tensor  # (N,) int32, top pixel
    row: torch.Tensor  # (N,) int32 grid cell
    col: torch.Tensor  # (N,) int32
    image_index: torch.Tensor  # (N,) int32 into image_ids
    image_ids: list[str] = field(default_factory=list)
    encoder_sha256: str = ""
    config: dict = field(default_factory=dict)  # settings that define the patches

    def __post_init__(self):
        n = self.features.shape[0]
        for name in ("x", "y", "row", "col", "image_index"):
            if getattr(self, name).shape != (n,):
                raise ValueError(f"ReferenceDB.{name} must have shape ({n},)")

    def __len__(self) -> int:
        return self.features.shape[0]

    @property
    def cells(self) -> torch.Tensor:
        return torch.stack([self.row, self.col], 1).long()  # (N, 2)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {
            "features": self.features.float().contiguous(),
            **{k: getattr(self, k).to(torch.int32).contiguous()
               for k in ("x", "y", "row", "col", "image_index")},
        }
        meta = {
            "format_version": FORMAT_VERSION,
            "patch_size": str(self.patch_size),
            "encoder_sha256": self.encoder_sha256,
            "config": json.dumps(self.config, sort_keys=True),
            "image_ids": json.dumps(self.image_ids),
        }
        save_file(tensors, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path, expected_sha256: str | None = None,
             expected_config: dict | None = None) -> ReferenceDB:
        """Load a database; check that it was built by the expected encoder and settings."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Reference database {path} does not exist.")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if meta.get("format_version") != FORMAT_VERSION:
            raise ReferenceDBMismatch(f"{path} is not a reference database of format "
                                      f"{FORMAT_VERSION}; rebuild it.")
        sha = meta.get("encoder_sha256", "")
        if expected_sha256 is not None and sha != expected_sha256:
            raise ReferenceDBMismatch(
                f"Reference database {path} was built with the encoder of sha256 {sha}, but the "
                f"current encoder checkpoint has sha256 {expected_sha256}. Delete the database "
                "to rebuild it with this encoder."
            )
        config = json.loads(meta.get("config", "{}"))
        if expected_config is not None:
            diff = {k: (config.get(k), v) for k, v in expected_config.items()
                    if config.get(k) != v}
            if diff:
                detail = ", ".join(f"{k}: database {a!r} vs current {b!r}"
                                   for k, (a, b) in diff.items())
                raise ReferenceDBMismatch(
                    f"Reference database {path} was built with other settings ({detail}). "
                    "Delete it to rebuild."
                )
        return cls(
            patch_size=int(meta["patch_size"]),
            features=tensors["features"],
            **{k: tensors[k] for k in ("x", "y", "row", "col", "image_index")},
            image_ids=json.loads(meta.get("image_ids", "[]")),
            encoder_sha256=sha,
            config=config,
        )
