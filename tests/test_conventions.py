"""The fixed conventions (docs/conventions.md) and the invariants every method keeps.

One parametrized layer over all methods of the registry; tolerances differ
where the methods do (Welch keeps a taper bias of a few percent, the others
are exact on noise-free data).  What only one method does is tested in its
own file (test_lstsq.py, test_welch.py, test_ratio.py).
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kernels import circular_convolve, delta, l_kernel, rel_l2
from scipy.ndimage import gaussian_filter
from scipy.signal import fftconvolve

import pipeline as km
from pipeline import flags as fl
from pipeline.core.estimate import REGISTRY

METHODS = list(km.METHODS)
#: Relative L2 error of a kernel recovered from noise-free data.
TOLERANCE = {"lstsq": 1e-7, "welch": 0.08, "ratio": 1e-7}
#: Methods whose background is exact on noise-free data (Welch's carries the taper bias).
EXACT_BACKGROUND = {"lstsq", "ratio"}
#: Options for 128-pixel tiles: several Welch segments per tile.
SMALL_TILE_OPTIONS = {"lstsq": {}, "welch": {"segment_size": 32}, "ratio": {}}


def test_the_registry_is_what_these_tests_cover():
    assert METHODS == ["lstsq", "welch", "ratio"]
    assert km.DEFAULT_METHOD == "lstsq"


def scene(rng, size, margin=12, smooth=0.0):
    """A random source on a canvas larger than the tile, and the tile slice."""
    canvas = gaussian_filter(rng.normal(size=(size + 2 * margin, size + 2 * margin)), smooth)
    canvas *= 100.0 / canvas.std()
    inner = (slice(margin, margin + size), slice(margin, margin + size))
    return canvas, inner


def convolved_pair(rng, kernel, size=96, periodic=False):
    """``(source, target)``: the tile of a 'same' convolution, or a circular one (``periodic``)."""
    canvas, inner = scene(rng, size)
    if periodic:
        src = canvas[inner]
        return src, circular_convolve(src, kernel)
    return canvas[inner], fftconvolve(canvas, kernel, mode="same")[inner]


def pair_for(method, rng, kernel, size=96):
    """The textbook ratio is exact only on periodic tiles; the others take real ('same') tiles."""
    return convolved_pair(rng, kernel, size=size, periodic=(method == "ratio"))


def test_circular_and_same_convolutions_agree_away_from_the_edges():
    """The test pairs' orientation: both convolutions put the kernel the same way round."""
    rng = np.random.default_rng(5)
    kern = l_kernel(7)
    src = rng.standard_normal((64, 64))
    same = fftconvolve(src, kern, mode="same")
    np.testing.assert_allclose(same[5:-5, 5:-5], circular_convolve(src, kern)[5:-5, 5:-5], atol=1e-10)


# --- orientation and shifts --------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shift", [(2, -1), (-3, 0), (0, 4), (1, 1)])
def test_integer_shift_is_a_delta_at_centre_plus_shift(method, shift):
    rng = np.random.default_rng(1)
    k = 11
    kernel = delta(k, *shift)
    src, tgt = pair_for(method, rng, kernel)
    # the kernel as a shift: target(y, x) == source(y - dy, x - dx)
    np.testing.assert_allclose(tgt[8:-8, 8:-8], np.roll(src, shift, axis=(0, 1))[8:-8, 8:-8], atol=1e-9)
    est = km.estimate_kernel(src, tgt, kernel_size=k, method=method)
    assert np.unravel_index(np.argmax(est), est.shape) == (k // 2 + shift[0], k // 2 + shift[1])
    assert rel_l2(est, kernel) < max(TOLERANCE[method], 1e-6) * 3


@pytest.mark.parametrize(("method", "options", "tolerance"),
                         [("lstsq", {}, 1e-6), ("welch", {"regularization": 1e-3}, 0.5),
                          ("welch", {}, 0.15), ("ratio", {}, 1e-8)])
def test_shift_of_a_smooth_periodic_image(method, options, tolerance):
    """A smooth source (little power at high frequencies) shifted: still a delta at the shift.

    Noise free, the Welch segments' only misfit is the taper's: ``"auto"``, whose
    noise is measured frequency by frequency, hardly smooths (lam 1e-6: 0.11; the
    fixed ridge 1e-3: 0.42; generalised cross-validation, which reads the taper's
    misfit as noise, chose 0.01: 0.57).
    """
    img = gaussian_filter(np.random.default_rng(4).standard_normal((128, 128)), 1.0, mode="wrap")
    est = km.estimate_kernel(img, np.roll(img, (3, -2), axis=(0, 1)), kernel_size=11, method=method,
                             **options)
    assert np.unravel_index(np.argmax(est), est.shape) == (5 + 3, 5 - 2)
    assert rel_l2(est, delta(11, 3, -2)) < tolerance


@pytest.mark.parametrize("method", METHODS)
def test_asymmetric_kernel_comes_back_unflipped(method):
    rng = np.random.default_rng(2)
    kernel = l_kernel(9)
    src, tgt = pair_for(method, rng, kernel)
    est = km.estimate_kernel(src, tgt, kernel_size=9, method=method)
    assert rel_l2(est, kernel) < TOLERANCE[method]
    assert rel_l2(est, kernel[::-1, ::-1]) > 0.5
    assert rel_l2(est, kernel.T) > 0.3  # the transpose shares the centre pixel


# --- linearity: offsets and scales -------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_constant_offsets_leave_the_kernel_and_show_as_background(method):
    rng = np.random.default_rng(3)
    kernel = np.outer([1, 3, 5, 3, 1], [1, 2, 3, 2, 1]) / 81.0 * 0.8
    src, tgt = pair_for(method, rng, kernel)
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
    if method in EXACT_BACKGROUND:
        np.testing.assert_allclose(base.background, 0.0, atol=1e-8)


@pytest.mark.parametrize("method", METHODS)
def test_scaling_the_target_scales_the_kernel(method):
    rng = np.random.default_rng(4)
    kernel = np.outer([1, 4, 6, 4, 1], [1, 4, 6, 4, 1]) / 256.0
    src, tgt = pair_for(method, rng, kernel)
    options = {"regularization": 0.0} if method == "lstsq" else {}
    one = km.estimate_kernel(src, tgt, kernel_size=7, method=method, **options)
    three = km.estimate_kernel(src, 3.0 * tgt, kernel_size=7, method=method, **options)
    np.testing.assert_allclose(three, 3.0 * one, rtol=1e-8, atol=1e-10)


@settings(max_examples=15, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(
    half=st.integers(2, 4),
    seed=st.integers(0, 2**32 - 1),
    offset=st.floats(-1e3, 1e3),
    scale=st.floats(0.1, 10.0),
)
@pytest.mark.parametrize("method", METHODS)
def test_random_kernels_offsets_and_scales(method, half, seed, offset, scale):
    """Noise-free periodic pairs: the kernel is linear in the target and blind to its offset
    (exactly, for every method), and comes back within the method's tolerance."""
    rng = np.random.default_rng(seed)
    k = 2 * half + 1
    kernel = rng.uniform(0.0, 1.0, size=(k, k)) + 0.2
    src = rng.standard_normal((96, 96))
    tgt = circular_convolve(src, kernel)
    options = SMALL_TILE_OPTIONS[method]
    base = km.estimate_kernels(src[None], tgt[None], kernel_size=k, method=method, **options)
    moved = km.estimate_kernels(src[None], scale * tgt[None] + offset, kernel_size=k, method=method, **options)
    np.testing.assert_allclose(moved.kernels, scale * base.kernels, atol=1e-8 * scale * np.abs(base.kernels).max())
    assert moved.background[0] - scale * base.background[0] == pytest.approx(offset, abs=1e-6 * (1 + abs(offset)))
    assert moved.flux[0] == pytest.approx(scale * base.flux[0], rel=1e-8)
    assert rel_l2(base.kernels[0], kernel) < {"welch": 0.25}.get(method, 1e-6)


def test_normalize_divides_by_the_sum_and_reports_the_flux():
    rng = np.random.default_rng(5)
    kernel = np.outer([1, 2, 1], [1, 2, 1]) / 16.0 * 2.5
    src, tgt = convolved_pair(rng, kernel)
    res = km.estimate_kernels(src[None], tgt[None], kernel_size=5, normalize=True)
    assert res.kernels[0].sum() == pytest.approx(1.0, abs=1e-12)
    assert res.flux[0] == pytest.approx(2.5, rel=1e-8)


# --- batches ------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_shared_source_broadcasts_over_the_batch(method):
    kernels = [np.outer([1, 2, 1], [1, 2, 1]) / 16.0, np.outer([0, 1, 3], [1, 1, 1]) / 12.0]
    pairs = [pair_for(method, np.random.default_rng(6), kern) for kern in kernels]
    src = pairs[0][0]
    tgts = np.stack([p[1] for p in pairs])
    shared = km.estimate_kernels(src, tgts, kernel_size=5, method=method)
    stacked = km.estimate_kernels(np.stack([src, src]), tgts, kernel_size=5, method=method)
    np.testing.assert_array_equal(shared.kernels, stacked.kernels)
    assert np.linalg.norm(shared.kernels[0] - shared.kernels[1]) > 0.1


@pytest.mark.parametrize("method", METHODS)
def test_batch_equals_one_by_one(method):
    """Eleven tiles: several of the estimators' chunks, some tiles with bad pixels."""
    rng = np.random.default_rng(7)
    kern = np.outer([1, 2, 3, 2, 1], [1, 2, 3, 2, 1]) / 81.0
    srcs, tgts = zip(*[convolved_pair(rng, kern, size=128) for _ in range(11)])
    srcs, tgts = np.stack(srcs), np.stack(tgts) + rng.normal(size=(11, 128, 128))
    mask = np.zeros(tgts.shape, dtype=bool)
    mask[3, 5, 5] = mask[8, 100:, :] = True
    options = SMALL_TILE_OPTIONS[method]
    batch = km.estimate_kernels(srcs, tgts, kernel_size=5, method=method, mask=mask, **options)
    for i in range(len(srcs)):
        one = km.estimate_kernels(srcs[i][None], tgts[i : i + 1], kernel_size=5, method=method,
                                  mask=mask[i : i + 1], **options)
        np.testing.assert_allclose(one.kernels[0], batch.kernels[i], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(one.background[0], batch.background[i], rtol=1e-4, atol=1e-6)
        assert one.flags[0] == batch.flags[i]
    assert batch.flags[3] & fl.MASKED and batch.flags[8] & fl.MASKED and not batch.flags[0] & fl.MASKED


# --- bad pixels and bad tiles --------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_bad_pixel_values_are_never_used(method):
    rng = np.random.default_rng(2)
    src, tgt = convolved_pair(rng, l_kernel(7), size=128)
    tgt = tgt + rng.normal(size=tgt.shape)
    mask = np.zeros(src.shape, dtype=np.uint8)
    mask[10:14, 40:44] = 1
    options = SMALL_TILE_OPTIONS[method]
    clean = km.estimate_kernels(src[None], tgt[None], kernel_size=7, mask=mask, method=method, **options)
    corrupt_src, corrupt_tgt = src.copy(), tgt.copy()
    corrupt_src[mask != 0] = 1e30
    corrupt_tgt[mask != 0] = -1e25
    dirty = km.estimate_kernels(corrupt_src[None], corrupt_tgt[None], kernel_size=7, mask=mask,
                                method=method, **options)
    np.testing.assert_allclose(dirty.kernels, clean.kernels, rtol=1e-9, atol=1e-12)
    assert dirty.flags[0] & fl.MASKED
    # NaN at the same pixels of both images is the same as the mask (a mask marks both)
    nan_src, nan_tgt = np.where(mask != 0, np.nan, src), np.where(mask != 0, np.nan, tgt)
    nan_res = km.estimate_kernels(nan_src[None], nan_tgt[None], kernel_size=7, method=method, **options)
    np.testing.assert_allclose(nan_res.kernels, clean.kernels, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_an_all_bad_tile_gives_nan_and_a_bad_flag(method):
    rng = np.random.default_rng(3)
    src, tgt = convolved_pair(rng, l_kernel(7), size=64)
    mask = np.zeros((2, 64, 64), dtype=bool)
    mask[0] = True
    res = km.estimate_kernels(np.stack([src, src]), np.stack([tgt, tgt]), kernel_size=7, mask=mask,
                              method=method, **SMALL_TILE_OPTIONS[method])
    assert res.flags[0] & fl.BAD and res.flags[0] & fl.MASKED
    assert np.all(np.isnan(res.kernels[0])) and np.isnan(res.background[0])
    assert not res.flags[1] & fl.BAD and np.all(np.isfinite(res.kernels[1]))


@pytest.mark.parametrize("method", METHODS)
def test_source_without_power_is_flagged_in_a_batch(method):
    rng = np.random.default_rng(5)
    src, tgt = convolved_pair(rng, l_kernel(7), size=64)
    flat = np.full_like(src, 4.0)
    res = km.estimate_kernels(np.stack([flat, src]), np.stack([tgt, tgt]), kernel_size=7, method=method,
                              **SMALL_TILE_OPTIONS[method])
    assert res.flags[0] & fl.NO_SIGNAL and np.all(np.isnan(res.kernels[0]))
    assert not res.flags[1] & fl.BAD


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("with_nan", [False, True])
def test_inputs_are_not_written(method, dtype, with_nan):
    rng = np.random.default_rng(9)
    src, tgt = convolved_pair(rng, np.outer([1, 2, 1], [1, 2, 1]) / 16.0, size=64)
    src, tgt = src.astype(dtype)[None], (tgt + rng.normal(size=tgt.shape)).astype(dtype)[None]
    if with_nan:
        src[0, 5, 5] = np.nan
    before = (src.copy(), tgt.copy())
    km.estimate_kernels(src, tgt, kernel_size=5, method=method)
    np.testing.assert_array_equal(src, before[0])
    np.testing.assert_array_equal(tgt, before[1])


# --- flags and diagnostics -----------------------------------------------------


def test_flag_table_is_consistent():
    attrs = fl.cf_flag_attrs()
    assert len(attrs["flag_masks"]) == len(attrs["flag_meanings"].split())
    assert len(set(attrs["flag_masks"].tolist())) == len(fl.FLAGS)
    assert fl.describe(fl.NO_DATA | fl.MASKED) == ["no_data", "masked"]


def test_flag_decisions():
    """The bits :mod:`pipeline.flags` sets from what the estimators found."""
    bits = fl.fit_flags(masked=[True, False, False, False], no_data=[False, True, False, False],
                        no_signal=[False, False, True, False], outliers_clipped=[False, False, False, True],
                        regularization_at_bound=[True, False, False, False])
    assert bits.dtype == fl.FLAG_DTYPE
    assert [fl.describe(b) for b in bits] == [["masked", "regularization_at_bound"], ["no_data"], ["no_signal"],
                                              ["outliers_clipped"]]
    kernels = np.stack([delta(5), np.full((5, 5), np.nan), delta(5), delta(5)])
    flags, unusable = fl.unusable_kernels(np.array([0, 0, fl.NO_DATA, 0], dtype=fl.FLAG_DTYPE), kernels)
    assert unusable.tolist() == [False, True, True, False]
    assert flags.tolist() == [0, fl.NO_SIGNAL, fl.NO_DATA, 0]  # NO_SIGNAL only where no other bit says why
    ring = np.zeros((5, 5))
    ring[0, :] = 0.5
    ring[2, 2] = 1.0
    kernels = np.stack([delta(5), -delta(5), ring, delta(5)])
    flux = kernels.sum(axis=(1, 2))
    bits = fl.kernel_flags(kernels, flux, residual=np.array([1.0, 1.0, 1.0, fl.HIGH_RESIDUAL_RATIO + 0.1]),
                           moments_converged=np.array([True, False, True, True]),
                           unusable=np.zeros(4, dtype=bool))
    assert [fl.describe(b) for b in bits] == [[], ["moments_failed", "non_positive_flux"], ["kernel_truncated"],
                                              ["high_residual"]]


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


# --- options -------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_options_object_or_keywords_give_the_same_result(method):
    rng = np.random.default_rng(10)
    src, tgt = convolved_pair(rng, l_kernel(7), size=128)
    cls = REGISTRY[method].options
    keywords = SMALL_TILE_OPTIONS[method]
    by_keywords = km.estimate_kernels(src[None], tgt[None], kernel_size=7, method=method, **keywords)
    by_object = km.estimate_kernels(src[None], tgt[None], kernel_size=7, method=method, options=cls(**keywords))
    np.testing.assert_array_equal(by_object.kernels, by_keywords.kernels)
    assert cls.method == method


def test_options_errors():
    img = np.random.default_rng(0).normal(size=(1, 64, 64))
    with pytest.raises(km.OptionError, match=r"unknown option\(s\) clip for method='welch'; "
                                             r"allowed: segment_size, overlap, window, regularization"):
        km.estimate_kernels(img, img, kernel_size=5, method="welch", clip=3.0)
    with pytest.raises(km.OptionError, match=r"unknown option\(s\) penalty for method='ratio'; allowed: none"):
        km.estimate_kernels(img, img, kernel_size=5, method="ratio", penalty="compact")
    with pytest.raises(km.OptionError, match=r"options=WelchOptions\(...\) does not fit method='lstsq'"):
        km.estimate_kernels(img, img, kernel_size=5, options=km.WelchOptions())
    with pytest.raises(km.OptionError, match=r"overlap must be a number >= 0 and < 1, got 1.0"):
        km.WelchOptions(overlap=1.0)
    with pytest.raises(km.OptionError, match=r"clip must be a number > 0, got 0"):
        km.LstsqOptions(clip=0)
    with pytest.raises(km.OptionError, match=r"robust must be True or False"):
        km.LstsqOptions(robust="yes")
    with pytest.raises(TypeError):
        km.LstsqOptions("auto")  # keyword-only
    # keywords beat the options object
    res = km.estimate_kernels(img, img, kernel_size=5, options=km.LstsqOptions(regularization=5.0),
                              regularization=0.0, robust=False)
    assert res.regularization[0] == pytest.approx(1e-12)


def test_help_shows_every_option_with_its_default():
    import pydoc
    from dataclasses import fields

    text = pydoc.render_doc(km.estimate_kernels, renderer=pydoc.plaintext)
    for method in REGISTRY.values():
        cls_text = pydoc.render_doc(method.options, renderer=pydoc.plaintext)
        for f in fields(method.options):
            assert f"{f.name}={f.default!r}" in " ".join(text.split())
            assert f"{f.name} = {f.default!r}" in cls_text
