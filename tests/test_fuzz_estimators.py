"""Property-based tests of the estimators' inputs: any shape, dtype, NaN pattern or option gives kernels and
flags, or the package's input or option error; never another exception, a warning, or an unflagged NaN kernel."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import strict_warnings
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from scipy.signal import fftconvolve

from pipeline import estimate_kernel, estimate_kernels
from pipeline import flags as fl
from pipeline.errors import InputError, OptionError

DEFINED = sum(f.mask for f in fl.FLAGS)
DTYPES = st.one_of(st.sampled_from(["float64", "float32"]),
                   st.sampled_from(["float16", "int8", "int32", "int64", "uint8", "uint16", "uint64", "bool",
                                    "complex64"]))
#: what the pixels hold before any NaN: noise, a blurred scene, zeros, a constant, one bright pixel, a ramp,
#: huge or tiny values (any units), a saturated-looking level
CONTENTS = ("noise", "scene", "zeros", "constant", "spike", "ramp", "huge", "tiny", "level")
#: where NaN/inf go (floats only)
HOLES = ("none", "random", "row", "column", "all", "all_but_few", "edge", "inf")
#: kernel sizes: mostly small odd ones, else even, too large, not integers
KERNEL_SIZES = st.sampled_from([1, 3, 3, 3, 5, 5, 7] * 6 + [9, 15, 2, 4, 0, -1, 41, 3.0, "5", True, None])
settings_ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _pixels(rng: np.random.Generator, content: str, shape: tuple[int, ...]) -> np.ndarray:
    if content == "noise":
        return rng.normal(size=shape)
    if content == "scene":
        stars = np.where(rng.random(shape) < 0.02, rng.uniform(10, 1000, shape), 0.0)
        blur = np.ones((1,) * (len(shape) - 2) + (3, 3)) / 9
        return fftconvolve(stars, blur, mode="same") + rng.normal(size=shape)
    if content == "zeros":
        return np.zeros(shape)
    if content == "constant":
        return np.full(shape, rng.normal() * 100)
    if content == "spike":
        out = np.zeros(shape)
        out[..., shape[-2] // 2, shape[-1] // 2] = 1e4
        return out
    if content == "ramp":
        return np.cumsum(np.ones(shape), axis=-1)
    if content == "huge":
        return rng.normal(size=shape) * 1e200
    if content == "tiny":
        return rng.normal(size=shape) * 1e-200
    return np.full(shape, 65535.0) - rng.integers(0, 2, shape) * rng.uniform(0, 100, shape)


def _holes(rng: np.random.Generator, pixels: np.ndarray, holes: str) -> np.ndarray:
    out = pixels.copy()
    if holes == "random":
        out[rng.random(out.shape) < rng.uniform(0, 0.5)] = np.nan
    elif holes == "row":
        out[..., rng.integers(out.shape[-2]), :] = np.nan
    elif holes == "column":
        out[..., rng.integers(out.shape[-1])] = np.nan
    elif holes == "all":
        out[...] = np.nan
    elif holes == "all_but_few":
        out[rng.random(out.shape) > 0.02] = np.nan
    elif holes == "edge":
        out[..., :2, :] = np.nan
    elif holes == "inf":
        out[rng.random(out.shape) < 0.05] = np.inf
        out[rng.random(out.shape) < 0.05] = -np.inf
    return out


def _as(pixels: np.ndarray, dtype: str) -> np.ndarray:
    """``pixels`` in ``dtype``: integers clipped to their range (NaN as 0), bool as ``> 0``."""
    kind = np.dtype(dtype)
    with np.errstate(all="ignore"):
        if kind.kind == "b":
            return pixels > 0
        if kind.kind in "iu":
            info = np.iinfo(kind)
            return np.clip(np.nan_to_num(pixels, posinf=info.max, neginf=info.min), info.min, info.max).astype(kind)
        return pixels.astype(kind)


@st.composite
def cases(draw) -> dict:
    """Arguments of :func:`estimate_kernels`: images, kernel size, method, options and extras."""
    n = draw(st.integers(1, 3))
    sides = st.one_of(*[st.integers(12, 40)] * 9, st.integers(1, 11))  # mostly tiles that fit a small kernel
    ny, nx = draw(sides), draw(sides)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    shared = draw(st.booleans())
    source = _pixels(rng, draw(st.sampled_from(CONTENTS)), (ny, nx) if shared else (n, ny, nx))
    if draw(st.booleans()):  # a target related to its source: a blur, a scale and an offset
        kernel = np.zeros((3, 3))
        kernel[1, 1], kernel[0, 1] = 0.7, 0.3
        with np.errstate(all="ignore"):
            target = fftconvolve(np.broadcast_to(source, (n, ny, nx)), kernel[None], mode="same") * 2.0 + 5.0
    else:
        target = _pixels(rng, draw(st.sampled_from(CONTENTS)), (n, ny, nx))
    source = _holes(rng, source, draw(st.sampled_from(HOLES)))
    target = _holes(rng, target, draw(st.sampled_from(HOLES)))
    args = {"sources": _as(source, draw(DTYPES)), "targets": _as(target, draw(DTYPES)),
            "kernel_size": draw(KERNEL_SIZES),
            "method": draw(st.sampled_from(["lstsq", "welch", "ratio"]))}
    if draw(st.booleans()):
        mask = rng.random((ny, nx) if draw(st.booleans()) else (n, ny, nx)) < draw(st.sampled_from([0.0, 0.1, 1.0]))
        args["mask"] = _as(mask.astype(float), draw(st.sampled_from(["bool", "uint8", "float32"])))
    if args["method"] == "lstsq":
        args["penalty"] = draw(st.sampled_from(["compact", "wings", "laplacian", "identity"]))
        args["regularization"] = draw(st.sampled_from(["auto", 0.0, 1e-6, 10.0, 1e12]))
        args["robust"] = draw(st.booleans())
        args["bad_source"] = draw(st.sampled_from(["fill", "exclude"]))
        if draw(st.booleans()):
            variance = np.abs(rng.normal(size=(n, ny, nx))) * draw(st.sampled_from([1e-200, 1.0, 1e200]))
            args["variance"] = _holes(rng, variance, draw(st.sampled_from(["none", "random", "all"])))
        if draw(st.booleans()):
            args["source_variance"] = np.zeros((ny, nx)) if draw(st.booleans()) else np.ones((n, ny, nx))
    elif args["method"] == "welch":
        args["segment_size"] = draw(st.one_of(st.integers(7, max(7, min(ny, nx))), st.integers(2, 40)))
        args["overlap"] = draw(st.sampled_from([0.0, 0.5, 0.9]))
        args["window"] = draw(st.sampled_from(["auto", "hann", "sine", "tukey", "none"]))
        args["regularization"] = draw(st.sampled_from([0.0, 1e-3, 1.0]))
        args["find_defects"] = draw(st.booleans())
    args["normalize"] = draw(st.booleans())
    args["workers"] = draw(st.sampled_from([1, 2]))
    args["direction"] = draw(st.sampled_from(["forward", "forward", "auto", "reverse", "majority"]))
    return args


def _check_estimates(result, n: int, k: int) -> None:
    """Kernels ``(n, k, k)``, per-tile arrays of ``n``; a kernel that is not finite has a BAD flag (and is
    NaN), a BAD flag means a NaN kernel; flags use defined bits only."""
    assert result.kernels.shape == (n, k, k)
    assert all(len(values) == n for values in result.as_dict().values())
    assert result.flags.dtype == fl.FLAG_DTYPE
    flags = result.flags.astype(np.int64)
    assert not np.any(flags & ~DEFINED), [fl.describe(f) for f in flags]
    finite = np.all(np.isfinite(result.kernels), axis=(1, 2))
    bad = (flags & fl.BAD) != 0
    assert np.array_equal(~finite, bad), (finite, [fl.describe(f) for f in flags])
    assert np.all(np.isnan(result.kernels[bad]))
    assert np.all(np.isfinite(result.flux[~bad]))


@settings_
@given(cases())
def test_estimators_give_flagged_kernels_or_the_package_error(args):
    before = {name: np.array(value, copy=True) for name, value in args.items() if isinstance(value, np.ndarray)}
    n = args["targets"].shape[0] if args["targets"].ndim else 0
    with strict_warnings():
        try:
            result = estimate_kernels(**args)
        except (InputError, OptionError) as exc:
            event(f"{type(exc).__name__}: {str(exc)[:50]}")
            assert str(exc).strip()
        else:
            event(f"kernels, {np.count_nonzero(result.flags & fl.BAD)} of {n} flagged unusable")
            _check_estimates(result, n, args["kernel_size"])
    for name, value in before.items():  # the inputs are never written
        assert np.array_equal(args[name], value, equal_nan=True), name


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_one_kernel_is_finite_or_the_package_error(args):
    """:func:`estimate_kernel` (one image pair): a finite kernel, or an error saying why there is none."""
    single = {"source": args["sources"] if args["sources"].ndim == 2 else args["sources"][0],
              "target": args["targets"][0], "kernel_size": args["kernel_size"], "method": args["method"],
              "normalize": args["normalize"]}
    single.update({key: value for key, value in args.items() if key not in (
        "sources", "targets", "kernel_size", "method", "normalize", "mask", "variance", "source_variance", "workers")})
    with strict_warnings():
        try:
            kernel = estimate_kernel(**single)
        except (InputError, OptionError) as exc:
            assert str(exc).strip()
        else:
            assert kernel.shape == (args["kernel_size"],) * 2
            assert np.all(np.isfinite(kernel))


# --- what the properties found, pinned -------------------------------------------------------------


def _pair(n: int = 2, size: int = 32, seed: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    source = fftconvolve(rng.normal(size=(n, size, size)), np.ones((1, 3, 3)) / 9, mode="same") * 5
    kernel = np.zeros((5, 5))
    kernel[2, 2], kernel[1, 2], kernel[3, 2] = 0.6, 0.2, 0.2
    target = fftconvolve(source, kernel[None], mode="same") + 0.01 * rng.normal(size=source.shape)
    return source, target, kernel


@pytest.mark.parametrize("method", ["lstsq", "welch", "ratio"])
@pytest.mark.parametrize("dtype, units", [(dtype, units) for dtype in ("float32", "float64")
                                          for units in (1e-150, 1e-30, 1e-20, 1e20, 1e150)
                                          if dtype == "float64" or 1e-30 <= units <= 1e30])
def test_kernels_do_not_depend_on_the_images_units(method, dtype, units):
    """Images in any units (flux densities of 1e-20, counts of 1e20) give the same kernel as in units
    near 1: no overflow, no underflow, no float32 Gram that loses them."""
    source, target, kernel = _pair()
    options = {"segment_size": 16} if method == "welch" else {}
    reference = estimate_kernels(source.astype(dtype), target.astype(dtype), kernel_size=5, method=method,
                                 **options)
    scaled = estimate_kernels((source * units).astype(dtype), (target * units * 4).astype(dtype), kernel_size=5,
                              method=method, **options)
    np.testing.assert_allclose(scaled.kernels, 4 * reference.kernels, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(scaled.background / units, reference.background * 4, rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(scaled.flags, reference.flags)
    assert np.abs(reference.kernels - kernel).max() < 0.1


def test_source_units_apart_from_the_targets():
    """A source in other units than its target (1e-20 against 1e3): the kernel carries the ratio."""
    source, target, kernel = _pair(n=1)
    result = estimate_kernels(source * 1e-20, target * 1e3, kernel_size=5)
    np.testing.assert_allclose(result.kernels[0] / 1e23, kernel, atol=0.05)
    assert result.flags[0] & fl.BAD == 0


def test_a_kernel_beyond_the_float_range_is_flagged():
    """A target some 1e600 times its source has no kernel a float can hold: NaN and flagged."""
    source, target, _ = _pair(n=1)
    result = estimate_kernels(source * 1e-300, target * 1e300, kernel_size=5)
    assert np.all(np.isnan(result.kernels)) and result.flags[0] & fl.NO_SIGNAL


@pytest.mark.parametrize("method, penalty", [("lstsq", "compact"), ("lstsq", "wings"), ("lstsq", "laplacian"),
                                             ("lstsq", "identity"), ("welch", None), ("ratio", None)])
def test_one_pixel_kernel_is_the_flux_scale(method, penalty):
    """``kernel_size=1``: the kernel is the flux scale (lstsq's Gram failed on it, ``wings`` had no penalty,
    and the evidence search stopped at its start with the compact penalties, whose two terms coincide)."""
    rng = np.random.default_rng(3)
    source = rng.normal(size=(2, 24, 25)) * 10
    target = 2 * source + 1 + rng.normal(size=source.shape)
    options = {"penalty": penalty} if method == "lstsq" else {"segment_size": 16} if method == "welch" else {}
    result = estimate_kernels(source, target, kernel_size=1, method=method, **options)
    np.testing.assert_allclose(result.kernels[:, 0, 0], 2.0, atol=0.01)
    assert not np.any(result.flags & (fl.BAD | fl.REGULARIZATION_AT_BOUND))


@pytest.mark.parametrize("method", ["lstsq", "welch", "ratio"])
def test_normalizing_a_zero_kernel_flags_it(method):
    """A blank target gives a kernel of zeros, which has no normalised form: NaN, flagged."""
    source, _, _ = _pair()
    options = {"segment_size": 16} if method == "welch" else {}
    result = estimate_kernels(source, np.zeros_like(source), kernel_size=5, method=method, normalize=True,
                              **options)
    assert np.all(np.isnan(result.kernels))
    assert np.all(result.flags & fl.BAD)
    with pytest.raises(InputError, match="no kernel could be estimated"):
        estimate_kernel(source[0], np.zeros_like(source[0]), kernel_size=5, method=method, normalize=True,
                        **options)


def test_defects_search_with_its_sampled_rows_all_masked():
    """The blind defect search samples every n-th row for the sky level; those rows all masked left an
    empty median (a RuntimeWarning) before."""
    source, target, _ = _pair(n=1, size=48)
    target[:, ::3] = np.nan  # every row the sky statistics sample
    result = estimate_kernels(source, target, kernel_size=5)
    assert result.flags[0] & fl.MASKED and not result.flags[0] & fl.BAD


def test_normal_equations_are_kept_in_the_images_units():
    """``statistics=True`` (for the joint fit): the normal equations of tiny-valued images are those of the
    same images in units near 1, rescaled (Gram by the source's units squared, and so on)."""
    source, target, _ = _pair()
    units = 1e-20
    plain = estimate_kernels(source, target, kernel_size=5, statistics=True).statistics
    scaled = estimate_kernels(source * units, target * units * 4, kernel_size=5, statistics=True).statistics
    for ours, theirs, factor in zip(scaled, plain, (units**2, 4 * units**2, 16 * units**2, 1.0), strict=True):
        np.testing.assert_allclose(ours, theirs * factor, rtol=1e-6, atol=1e-12 * np.abs(theirs * factor).max())
