"""The one device picker: ``auto`` = the GPU when there is one, else the CPU."""

from __future__ import annotations

import torch


def pick_device(want: str = "auto", key: str = "device") -> torch.device:
    """``auto | cpu | cuda | gpu`` (also a ``trainer.accelerator`` value) -> a torch device;
    asking for a GPU that is not there is an error naming the setting ``key`` and what to set
    instead."""
    want = str(want)
    if want == "cpu":
        return torch.device("cpu")
    if want in ("gpu", "cuda") or want.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"{key}={want} but CUDA is not available; use cpu or auto "
                               f"({key}=cpu).")
        return torch.device("cuda" if want == "gpu" else want)
    if want != "auto":
        raise ValueError(f"device {want!r} is not one of auto, cpu, cuda, gpu")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
