"""kernelmap: estimate how one image is blurred relative to another, tile by tile.

The import package is ``pipeline``; the command is ``kernelmap``.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from .errors import InputError, KernelmapError, OptionError
from .estimate import DEFAULT_METHOD, METHODS, KernelEstimates, estimate_kernel, estimate_kernels

try:
    __version__ = version("kernelmap")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = [
    "__version__",
    "DEFAULT_METHOD",
    "METHODS",
    "KernelEstimates",
    "estimate_kernel",
    "estimate_kernels",
    "KernelmapError",
    "InputError",
    "OptionError",
]
