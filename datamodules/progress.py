"""Progress bars for long loops (indexing, feature extraction, scoring); the lowest layer, so
every package may use it."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def track(iterable: Iterable[T], description: str, total: int | None = None,
          enabled: bool = True) -> Iterator[T]:
    """A rich progress bar for long loops (feature extraction, scoring)."""
    if not enabled:
        yield from iterable
        return
    from rich.progress import track as rich_track

    yield from rich_track(iterable, description=description, total=total, transient=False)
