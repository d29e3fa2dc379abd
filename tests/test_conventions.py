"""The fixed conventions (DESIGN.md), checked for every method."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.ndimage import gaussian_filter
from scipy.signal import fftconvolve

import pipeline as km
from pipeline import flags as fl

METHODS = ["lstsq", "welch", "ratio"]
# Welch keeps a taper bias of a few percent; lstsq is exact on noise-free data.
TOLERANCE = {"lstsq": 1e-7, "welch": 0.08, "ratio": 1e-7}


def scene(rng, size, margin=12, smooth=0.0):
    """A random source on a canvas larger than the tile, and the tile slice."""
    canvas = gaussian_filter(rng.normal(size=(size + 2 * margin, size + 2 * margin)), smooth)
    canvas *= 100.0 / canvas.std()
    inner = (slice(margin, margin + size), slice(margin, margin + size))
    return canvas, inner


def convolved_pair(rng, kernel, size=96, periodic=False):
    canvas, inner = scene(rng, size)
    if periodic:
        src = canvas[inner]
        tgt = np.real(np.fft.ifft2(np.fft.fft2(src) * np.fft.fft2(
            np.roll(np.pad(kernel, ((0, size - kernel.shape[0]), (0, size - kernel.shape[1]))),
                    (-(kernel.shape[0] // 2), -(kernel.shape[1] // 2)), axis=(0, 1)))))
        return src, tgt
    return canvas[inner], fftconvolve(canvas, kernel, mode="same")[inner]


def rel_err(est, truth):
    return np.linalg.norm(est - truth) / np.linalg.norm(truth)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shift", [(2, -1), (-3, 0), (0, 4), (1, 1)])
def test_integer_shift_is_a_delta_at_centre_plus_shift(method, shift):
    rng = np.random.default_rng(1)
    k = 11
    kernel = np.zeros((k, k))
    kernel[k // 2 + shift[0], k // 2 + shift[1]] = 1.0
    src, tgt = convolved_pair(rng, kernel, periodic=(method == "ratio"))
    # the kernel as a shift: target(y, x) == source(y - dy, x - dx)
    np.testing.assert_allclose(tgt[8:-8, 8:-8], np.roll(src, shift, axis=(0, 1))[8:-8, 8:-8], atol=1e-9)
    est = km.estimate_kernel(src, tgt, kernel_size=k, method=method)
    assert np.unravel_index(np.argmax(est), est.shape) == (k // 2 + shift[0], k // 2 + shift[1])
    assert rel_err(est, kernel) < max(TOLERANCE[method], 1e-6) * 3


@pytest.mark.parametrize("method", METHODS)
def test_asymmetric_kernel_comes_back_unflipped(method):
    rng = np.random.default_rng(2)
    kernel = np.zeros((9, 9))
    kernel[4, 4:8] = [0.4, 0.3, 0.2, 0.1]  # streak to +x
    kernel[5:7, 4] = [0.25, 0.1]  # and to +y
    src, tgt = convolved_pair(rng, kernel, periodic=(method == "ratio"))
    est = km.estimate_kernel(src, tgt, kernel_size=9, method=method)
    assert rel_err(est, kernel) < TOLERANCE[method]
    assert rel_err(est, kernel[::-1, ::-1]) > 0.5


@pytest.mark.parametrize("method", METHODS)
def test_constant_offsets_leave_the_kernel_and_show_as_background(method):
    rng = np.random.default_rng(3)
    kernel = np.outer([1, 3, 5, 3, 1], [1, 2, 3, 2, 1]) / 81.0 * 0.8
    src, tgt = convolved_pair(rng, kernel, periodic=(method == "ratio"))
    base = km.estimate_kernels(src[None], tgt[None], kernel_size=5, method=method)
    shifted_tgt = km.estimate_kernels(src[None], tgt[None] + 250.0, kernel_size=5, method=method)
    shifted_src = km.estimate_kernels(src[None] - 40.0, tgt[None], kernel_size=5, method=method)
    np.testing.assert_allclose(shifted_tgt.kernels, base.kernels, atol=1e-9)
    np.testing.assert_allclose(shifted_src.kernels, base.kernels, atol=1e-9)
    np.testing.assert_allclose(shifted_tgt.background - base.background, 250.0, atol=1e-7)
    # source' = source - 40, so target = K * source' + 40 * flux
    np.testing.assert_allclose(
        shifted_src.background - base.background, 40.0 * base.flux, rtol=1e-8, atol=1e-7
    )
    if method == "lstsq":
        np.testing.assert_allclose(base.background, 0.0, atol=1e-8)


@pytest.mark.parametrize("method", METHODS)
def test_scaling_the_target_scales_the_kernel(method):
    rng = np.random.default_rng(4)
    kernel = np.outer([1, 4, 6, 4, 1], [1, 4, 6, 4, 1]) / 256.0
    src, tgt = convolved_pair(rng, kernel, periodic=(method == "ratio"))
    options = {"regularization": 0.0} if method == "lstsq" else {}
    one = km.estimate_kernel(src, tgt, kernel_size=7, method=method, **options)
    three = km.estimate_kernel(src, 3.0 * tgt, kernel_size=7, method=method, **options)
    np.testing.assert_allclose(three, 3.0 * one, rtol=1e-8, atol=1e-10)


def test_normalize_divides_by_the_sum_and_reports_the_flux():
    rng = np.random.default_rng(5)
    kernel = np.outer([1, 2, 1], [1, 2, 1]) / 16.0 * 2.5
    src, tgt = convolved_pair(rng, kernel)
    res = km.estimate_kernels(src[None], tgt[None], kernel_size=5, normalize=True)
    assert res.kernels[0].sum() == pytest.approx(1.0, abs=1e-12)
    assert res.flux[0] == pytest.approx(2.5, rel=1e-8)


@settings(max_examples=25)
@given(
    half=st.integers(1, 3),
    seed=st.integers(0, 2**32 - 1),
    offset=st.floats(-1e3, 1e3),
    scale=st.floats(0.1, 10.0),
)
def test_exact_recovery_of_random_kernels(half, seed, offset, scale):
    """Noise-free pairs: lstsq returns the kernel exactly, for any kernel, offset, scale."""
    rng = np.random.default_rng(seed)
    k = 2 * half + 1
    kernel = rng.normal(size=(k, k))
    src, tgt = convolved_pair(rng, kernel, size=48)
    res = km.estimate_kernels(src[None], scale * tgt[None] + offset, kernel_size=k)
    np.testing.assert_allclose(res.kernels[0], scale * kernel, atol=1e-6 * scale * np.abs(kernel).max())
    assert res.background[0] == pytest.approx(offset, abs=1e-6 * (1 + abs(offset)))
    assert res.flux[0] == pytest.approx(scale * kernel.sum(), abs=1e-6 * scale * np.abs(kernel).sum())


@settings(max_examples=15)
@given(half=st.integers(1, 3), seed=st.integers(0, 2**32 - 1))
def test_welch_and_ratio_invariants_for_random_kernels(half, seed):
    """Offset and scale invariance hold exactly for the spectral methods too."""
    rng = np.random.default_rng(seed)
    k = 2 * half + 1
    kernel = rng.uniform(0, 1, size=(k, k))
    src, tgt = convolved_pair(rng, kernel, size=64)
    for method in ("welch", "ratio"):
        base = km.estimate_kernels(src[None], tgt[None], kernel_size=k, method=method)
        moved = km.estimate_kernels(src[None] + 7.0, 2.0 * tgt[None] - 30.0, kernel_size=k, method=method)
        np.testing.assert_allclose(moved.kernels, 2.0 * base.kernels, atol=1e-8 * np.abs(base.kernels).max())


@pytest.mark.parametrize("method", METHODS)
def test_shared_source_broadcasts_over_the_batch(method):
    kernels = [np.outer([1, 2, 1], [1, 2, 1]) / 16.0, np.outer([0, 1, 3], [1, 1, 1]) / 12.0]
    pairs = [convolved_pair(np.random.default_rng(6), kern, periodic=(method == "ratio")) for kern in kernels]
    src = pairs[0][0]
    tgts = np.stack([p[1] for p in pairs])
    shared = km.estimate_kernels(src, tgts, kernel_size=5, method=method)
    stacked = km.estimate_kernels(np.stack([src, src]), tgts, kernel_size=5, method=method)
    np.testing.assert_array_equal(shared.kernels, stacked.kernels)
    assert np.linalg.norm(shared.kernels[0] - shared.kernels[1]) > 0.1


@pytest.mark.parametrize("method", METHODS)
def test_batch_equals_one_by_one(method):
    rng = np.random.default_rng(7)
    kern = np.outer([1, 2, 3, 2, 1], [1, 2, 3, 2, 1]) / 81.0
    srcs, tgts = zip(*[convolved_pair(rng, kern, size=64) for _ in range(3)])
    tgts = np.stack(tgts) + rng.normal(size=(3, 64, 64))
    batch = km.estimate_kernels(np.stack(srcs), tgts, kernel_size=5, method=method)
    for i in range(3):
        one = km.estimate_kernels(srcs[i][None], tgts[i : i + 1], kernel_size=5, method=method)
        np.testing.assert_allclose(one.kernels[0], batch.kernels[i], rtol=1e-4, atol=1e-6)
        assert one.flags[0] == batch.flags[i]


def test_flag_table_is_consistent():
    attrs = fl.cf_flag_attrs()
    assert len(attrs["flag_masks"]) == len(attrs["flag_meanings"].split())
    assert len(set(attrs["flag_masks"].tolist())) == len(fl.FLAGS)
    assert fl.describe(fl.NO_DATA | fl.MASKED) == ["no_data", "masked"]


def test_diagnostics_can_be_skipped_without_changing_the_kernels():
    rng = np.random.default_rng(8)
    kern = np.outer([1, 2, 1], [1, 2, 1]) / 16.0
    src, tgt = convolved_pair(rng, kern, size=48)
    tgt = tgt + rng.normal(size=tgt.shape)
    full = km.estimate_kernels(src[None], tgt[None], kernel_size=5)
    lean = km.estimate_kernels(src[None], tgt[None], kernel_size=5, diagnostics=False)
    np.testing.assert_array_equal(lean.kernels, full.kernels)
    assert np.isnan(lean.residual[0]) and np.isnan(lean.noise[0]) and np.isnan(lean.snr[0])
    assert np.isfinite(full.residual[0]) and np.isfinite(full.noise[0])
    assert full.residual[0] == pytest.approx(1.0, abs=0.2)  # the fit leaves just the noise
    assert lean.fwhm[0] == full.fwhm[0] and lean.flux[0] == full.flux[0]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_inputs_without_bad_pixels_are_not_written(method, dtype):
    rng = np.random.default_rng(9)
    src, tgt = convolved_pair(rng, np.outer([1, 2, 1], [1, 2, 1]) / 16.0, size=64)
    src, tgt = src.astype(dtype)[None], (tgt + rng.normal(size=tgt.shape)).astype(dtype)[None]
    before = (src.copy(), tgt.copy())
    km.estimate_kernels(src, tgt, kernel_size=5, method=method)
    np.testing.assert_array_equal(src, before[0])
    np.testing.assert_array_equal(tgt, before[1])


@pytest.mark.parametrize("method", ["lstsq", "welch"])
def test_truncated_and_non_positive_kernels_are_flagged(method):
    from pipeline.sim.scenes import gaussian_kernel

    rng = np.random.default_rng(5)
    source = gaussian_filter(rng.normal(size=(3, 128, 128)), 1.0) * 100
    kernels = [gaussian_kernel(9, fwhm=2.0), gaussian_kernel(9, fwhm=9.0), -gaussian_kernel(9, fwhm=2.0)]
    target = np.stack([fftconvolve(s, k, mode="same") for s, k in zip(source, kernels)])
    res = km.estimate_kernels(source, target, kernel_size=9, method=method)
    truncated = (res.flags & fl.KERNEL_TRUNCATED) != 0
    negative = (res.flags & fl.NON_POSITIVE_FLUX) != 0
    assert truncated.tolist() == [False, True, False]
    assert negative.tolist() == [False, False, True]


@pytest.mark.parametrize(("e1", "e2", "angle"), [(0.2, 0.0, 0.0), (0.0, 0.2, 45.0), (-0.2, 0.0, 90.0),
                                                 (0.0, -0.2, -45.0), (0.1, 0.1, 22.5)])
def test_position_angle_and_size_of_gaussian_kernels(e1, e2, angle):
    """Analytic truths: the major axis angle from +x towards +y; rotating by 90 degrees turns only the angle."""
    from pipeline.sim.scenes import gaussian_kernel

    rng = np.random.default_rng(9)
    source = gaussian_filter(rng.normal(size=(2, 160, 160)), 1.0) * 100
    kern = gaussian_kernel(15, fwhm=3.5, e1=e1, e2=e2)
    turned = np.rot90(kern)  # a quarter turn of the image plane
    target = np.stack([fftconvolve(source[0], kern, mode="same"), fftconvolve(source[1], turned, mode="same")])
    res = km.estimate_kernels(source, target, kernel_size=15)
    got = res.position_angle[0]
    assert abs((got - angle + 90) % 180 - 90) < 0.5
    assert res.size[0] == pytest.approx(res.fwhm[0] / 2.3548200450309493, rel=1e-12)
    assert res.fwhm[0] == pytest.approx(3.5, rel=0.02)
    assert abs((res.position_angle[1] - got) % 180 - 90) < 0.5  # quarter turn: +-90 degrees
    assert res.ellipticity[1] == pytest.approx(res.ellipticity[0], abs=2e-3)
    assert res.fwhm[1] == pytest.approx(res.fwhm[0], rel=2e-3)
