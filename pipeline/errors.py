"""Exceptions raised by kernelmap.

Every error kernelmap raises on bad input derives from :class:`KernelmapError`,
which is itself a :class:`ValueError`, so callers can catch either.
"""

from __future__ import annotations

__all__ = ["KernelmapError", "InputError", "OptionError"]


class KernelmapError(ValueError):
    """Base class of every error raised by kernelmap."""


class InputError(KernelmapError):
    """An input array is unusable (shape, dimensionality, dtype, content)."""


class OptionError(KernelmapError):
    """An option has a value outside what is allowed."""
