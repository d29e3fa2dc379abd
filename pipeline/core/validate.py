"""Input checks shared by every estimator: clear errors before any heavy work."""

from __future__ import annotations

import numbers

import numpy as np

from ..errors import InputError, OptionError

__all__ = ["check_int", "check_positive_int", "check_odd_size", "check_kernel_size", "odd_size_problem",
           "as_image_stack", "either_bad", "max_kernel_size"]


def check_int(name: str, value: object, minimum: int) -> int:
    """``value`` as ``int`` if it is an integer (not a bool) ``>= minimum``, else an :class:`OptionError`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < minimum:
        raise OptionError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_positive_int(name: str, value: object) -> int:
    """``value`` as ``int`` if it is an integer >= 1 (a count of threads, tiles, ...)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 1:
        raise OptionError(f"{name} must be a positive integer (>= 1), got {value!r}")
    return int(value)


def odd_size_problem(size: int) -> str | None:
    """What is wrong with an integer kernel side (``None`` if it is odd and positive).

    The fix is part of the text: a side needs a centre pixel.
    """
    if size < 1:
        return f"{size} is too small: the kernel size must be an odd integer >= 1"
    if size % 2 == 0:
        return f"{size} is even: the kernel needs a centre pixel, use {size - 1} or {size + 1}"
    return None


def check_odd_size(name: str, value: object) -> int:
    """``value`` as ``int`` if it is an odd positive integer (a kernel side), else an :class:`OptionError`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise OptionError(
            f"{name} must be an odd integer, got {value!r} ({type(value).__name__}); pass e.g. {name}=21"
        )
    size = int(value)
    if size < 1 or size % 2 == 0:
        raise OptionError(
            f"{name} must be odd and positive so the kernel has a centre pixel, "
            f"got {size}; use {max(size + 1, 1)} or {max(size - 1, 1)}"
        )
    return size


def max_kernel_size(tile_shape: tuple[int, int]) -> int:
    """Largest odd kernel side allowed for tiles of this shape (half the shorter side)."""
    largest = min(tile_shape) // 2
    return largest if largest % 2 else largest - 1


def check_kernel_size(kernel_size: object, tile_shape: tuple[int, int]) -> int:
    """Validate ``kernel_size`` against the tile shape and return it as ``int``."""
    size = check_odd_size("kernel_size", kernel_size)
    largest = max_kernel_size(tile_shape)
    if size > largest:
        raise OptionError(
            f"kernel_size={size} is too large for {tile_shape[0]}x{tile_shape[1]} tiles: "
            f"at most {largest} (the kernel may span at most half the tile); "
            "use a smaller kernel or larger tiles"
        )
    return size


def as_image_stack(array: object, name: str, *, ndim: tuple[int, ...]) -> np.ndarray:
    """``array`` as a real-valued ndarray with one of the allowed dimensionalities.

    The input is never modified; a view or a copy is returned.
    """
    arr = np.asarray(array)
    if arr.dtype == object or not (
        np.issubdtype(arr.dtype, np.floating)
        or np.issubdtype(arr.dtype, np.integer)
        or np.issubdtype(arr.dtype, np.bool_)
    ):
        raise InputError(
            f"{name} must hold real numbers, got dtype {arr.dtype}; "
            "convert it (complex data: take .real or abs)"
        )
    if arr.ndim not in ndim:
        dims = " or ".join(f"{d}-D" for d in ndim)
        raise InputError(f"{name} must be {dims}, got shape {arr.shape} ({arr.ndim}-D)")
    if arr.size == 0:
        raise InputError(f"{name} is empty (shape {arr.shape})")
    return arr


def either_bad(*maps: np.ndarray | None) -> np.ndarray | None:
    """The union of optional boolean bad-pixel maps (``None`` when none is given)."""
    given = [np.asarray(m, dtype=bool) for m in maps if m is not None]
    if not given:
        return None
    return given[0] if len(given) == 1 else np.logical_or.reduce(given)
