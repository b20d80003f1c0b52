"""How every entry point ends.

- A configuration, data or checkpoint error prints one line on stderr — the message names the
  key or file and the fix — and exits with status 2; its traceback would only bury that line.
  ``MEDANOMALY_DEBUG=1`` re-raises it with the full traceback.
- ``print_config=true`` prints the resolved configuration as YAML and exits 0.
- Anything else is a bug: it propagates with its traceback (exit status 1).

Entry points end with ``if __name__ == "__main__": entry(main)``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from experiments.config import ConfigError, PrintConfig

DEBUG_ENV = "MEDANOMALY_DEBUG"


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message is meant for the user (imported only when one is raised)."""
    from datamodules.common import EmptySplitError
    from datamodules.errors import ImageReadError
    from datamodules.splits import SplitLeakError
    from lightning_modules.flow_posterior.posterior import PreprocessingMismatch
    from lightning_modules.glow.lightning_model import NonFiniteLossError
    from lightning_modules.patch_detector.reference_db import ReferenceDBMismatch

    return (ConfigError, ImageReadError, EmptySplitError, SplitLeakError, ReferenceDBMismatch,
            PreprocessingMismatch, NonFiniteLossError, FileNotFoundError)


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


def entry(main: Callable) -> None:
    sys.exit(run(main))
