"""The error every reader raises for an item it cannot read (the data modules catch, count and
skip it); the message names the file and the fix."""

from __future__ import annotations


class ImageReadError(ValueError):
    """An image or volume that cannot be read; the message names the file and the fix."""
