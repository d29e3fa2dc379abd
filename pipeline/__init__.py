"""kernelmap: estimate how one image is blurred relative to another, tile by tile.

The import package is ``pipeline``; the command is ``kernelmap``.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from .analysis.hook import register_accessor as _register_accessor
from .core.estimate import DEFAULT_METHOD, METHODS, KernelEstimates, estimate_kernel, estimate_kernels
from .core.options import LstsqOptions, RatioOptions, WelchOptions
from .errors import (
    BatchError,
    ConfigError,
    InputError,
    KernelmapError,
    KernelmapWarning,
    OptionError,
    OutsideImageError,
    OutsideImageWarning,
)

try:
    __version__ = version("kernelmap")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

_register_accessor()  # ds.kernelmap, as soon as xarray is imported (pipeline itself imports no xarray)


def __getattr__(name: str):
    # the job runner pulls in Dask, xarray and Zarr: imported only when asked for
    if name in ("run_job", "plan_job", "load_job"):
        from .job import config, run

        return {"run_job": run.run_job, "plan_job": run.plan_job, "load_job": config.load_job}[name]
    if name == "KernelMap":  # reading kernel maps needs xarray; importing it registers ds.kernelmap
        from .analysis.maps import KernelMap

        return KernelMap
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")


__all__ = [
    "__version__",
    "run_job",
    "plan_job",
    "load_job",
    "KernelMap",
    "DEFAULT_METHOD",
    "METHODS",
    "LstsqOptions",
    "WelchOptions",
    "RatioOptions",
    "KernelEstimates",
    "estimate_kernel",
    "estimate_kernels",
    "KernelmapError",
    "InputError",
    "OptionError",
    "OutsideImageError",
    "ConfigError",
    "BatchError",
    "KernelmapWarning",
    "OutsideImageWarning",
]
