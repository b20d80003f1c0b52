"""How every entry point ends.

- A configuration, data or checkpoint error prints one line on stderr — the message names the
  key or file and the fix — and exits with status 2; its traceback would only bury that line.
  ``MEDANOMALY_DEBUG=1`` re-raises it with the full traceback.
- ``print_config=true`` prints the resolved configuration as YAML and exits 0.
- Anything else is a bug: it propagates with its traceback (exit status 1).
- A process group left by a DDP run is destroyed before the exit (:func:`end_distributed`).
- torch's intra-op thread count is chosen from the cores this process may use and the load
  already on them (:func:`pick_threads`): on a 2-core machine shared with one other CPU-bound
  job, two OpenMP threads per process slow each other down by 10x or more, one does not.
  ``MEDANOMALY_THREADS=N`` sets it.

Entry points end with ``if __name__ == "__main__": entry(main)``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from experiments.config import ConfigError, PrintConfig

DEBUG_ENV = "MEDANOMALY_DEBUG"
THREADS_ENV = "MEDANOMALY_THREADS"


def pick_threads() -> int:
    """Threads for torch: ``MEDANOMALY_THREADS``, else the usable cores minus the load that
    other processes already put on them (1-minute load average), at least 1."""
    if os.environ.get(THREADS_ENV):
        return max(1, int(os.environ[THREADS_ENV]))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        busy = os.getloadavg()[0]
    except OSError:
        busy = 0.0
    return max(1, min(int(cores or 1), int(cores or 1) - int(round(busy))))


def configure_threads() -> int:
    import torch

    n = pick_threads()
    if "OMP_NUM_THREADS" not in os.environ or os.environ.get(THREADS_ENV):
        torch.set_num_threads(n)
    return torch.get_num_threads()


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message is meant for the user (imported only when one is raised)."""
    from datamodules.common import EmptySplitError
    from datamodules.errors import ImageReadError
    from datamodules.splits import SplitLeakError
    from experiments.common import CheckpointWriteError, TrainingDiverged
    from lightning_modules.checkpoint import CheckpointError
    from lightning_modules.flow_posterior.posterior import PreprocessingMismatch
    from lightning_modules.glow.lightning_model import NonFiniteLossError
    from lightning_modules.patch_detector.reference_db import ReferenceDBMismatch

    return (ConfigError, ImageReadError, EmptySplitError, SplitLeakError, ReferenceDBMismatch,
            PreprocessingMismatch, NonFiniteLossError, FileNotFoundError, CheckpointError,
            CheckpointWriteError, TrainingDiverged)


def run(main: Callable, argv: list[str] | None = None) -> int:
    """``main(argv)`` -> the process exit status (see the module docstring)."""
    try:
        main(argv)
    except PrintConfig as request:
        print(request.yaml, end="")
        return 0
    except user_errors() as e:
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"error: {message} ({DEBUG_ENV}=1 shows the traceback)", file=sys.stderr)
        return 2
    return 0


def end_distributed() -> None:
    """Destroy the default process group if a DDP run left one: with gloo, a rank that exits
    with the group alive can abort ("terminate called without an active exception", exit -6)
    after a successful run, which a sweep would count as a failed trial."""
    dist = getattr(sys.modules.get("torch"), "distributed", None)
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def entry(main: Callable) -> None:
    configure_threads()  # an explicit OMP_NUM_THREADS is respected
    status = run(main)
    end_distributed()
    sys.exit(status)
