"""Tests of the built-in demo stack and of the spatially varying convolution."""

from __future__ import annotations

import math

import numpy as np
import pytest
import xarray as xr
from scipy.signal import fftconvolve

from pipeline.core.moments import FWHM_PER_SIGMA
from pipeline.errors import InputError, OptionError
from pipeline.sim.demo import PATCH, DemoTruth, demo_dataset, write_demo_stack
from pipeline.sim.scenes import convolve_varying, gaussian_kernel

# --------------------------------------------------------------------------
# convolve_varying


@pytest.mark.parametrize(
    ("shape", "patch", "size"),
    [((256, 256), 32, 15), ((100, 77), 32, 15), ((50, 61), 8, 21), ((40, 40), 7, 3),
     ((5, 6), 32, 9), ((33, 20), 1, 5)],
)
def test_convolve_varying_constant_field_is_fftconvolve(shape: tuple[int, int], patch: int,
                                                        size: int) -> None:
    rng = np.random.default_rng(1)
    image = rng.normal(size=shape) * 100.0 + 50.0
    kernel = gaussian_kernel(size, fwhm=2.7, e1=0.1, e2=-0.05, dy=0.3, dx=-1.2, flux=0.9)
    out = convolve_varying(image, lambda yc, xc: kernel, patch=patch, kernel_size=size)
    assert out.shape == shape and out.dtype == np.float64
    expect = fftconvolve(image, kernel, mode="same")
    np.testing.assert_allclose(out, expect, rtol=0, atol=1e-10 * np.abs(expect).max())


def test_convolve_varying_two_valued_field() -> None:
    rng = np.random.default_rng(2)
    image = rng.random((80, 100))
    left = gaussian_kernel(11, fwhm=2.0)
    right = gaussian_kernel(11, fwhm=3.5, e1=0.2, dx=1.0, flux=1.3)
    calls: list[tuple[float, float]] = []

    def field(yc: float, xc: float) -> np.ndarray:
        calls.append((yc, xc))
        return left if xc < 32 else right

    out = convolve_varying(image, field, patch=32, kernel_size=11)
    # Block centres y0 + (rows - 1) / 2, the last (ragged) blocks included.
    assert sorted(calls) == [(y, x) for y in (15.5, 47.5, 71.5)
                             for x in (15.5, 47.5, 79.5, 97.5)]
    expect_left = fftconvolve(image, left, mode="same")
    expect_right = fftconvolve(image, right, mode="same")
    np.testing.assert_allclose(out[:, :32], expect_left[:, :32], rtol=0, atol=1e-12)
    np.testing.assert_allclose(out[:, 32:], expect_right[:, 32:], rtol=0, atol=1e-12)
    # Each block takes light through its own kernel: no blending at the seam.
    assert np.abs(out[:, 31] - expect_right[:, 31]).max() > 1e-3
    assert np.abs(out[:, 32] - expect_left[:, 32]).max() > 1e-3


def test_convolve_varying_rejects_bad_input() -> None:
    image = np.ones((20, 20))
    k = gaussian_kernel(5, fwhm=2.0)
    with pytest.raises(InputError):
        convolve_varying(image, lambda y, x: np.ones((5, 7)), kernel_size=5)
    with pytest.raises(InputError):
        convolve_varying(image, lambda y, x: np.full((5, 5), np.nan), kernel_size=5)
    with pytest.raises(InputError):
        convolve_varying(np.ones((2, 20, 20)), lambda y, x: k, kernel_size=5)
    with pytest.raises(InputError):
        convolve_varying(np.full((20, 20), np.inf), lambda y, x: k, kernel_size=5)
    with pytest.raises(OptionError):
        convolve_varying(image, lambda y, x: k, kernel_size=4)
    with pytest.raises(OptionError):
        convolve_varying(image, lambda y, x: k, patch=0, kernel_size=5)
    with pytest.raises(OptionError):
        convolve_varying(image, k, kernel_size=5)  # type: ignore[arg-type]


# --------------------------------------------------------------------------
# the demo stack

SIZE = 256


@pytest.fixture(scope="module")
def noisy() -> tuple[xr.Dataset, DemoTruth]:
    return demo_dataset(n_images=2, size=SIZE, seed=11)


@pytest.fixture(scope="module")
def clean() -> tuple[xr.Dataset, DemoTruth]:
    return demo_dataset(n_images=2, size=SIZE, seed=11, noise=False, bad_pixels=False)


@pytest.fixture(scope="module")
def default_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, DemoTruth]:
    path = str(tmp_path_factory.mktemp("demo") / "demo.zarr")
    return path, write_demo_stack(path)


def test_default_store_layout(default_store: tuple[str, DemoTruth]) -> None:
    path, truth = default_store
    ds = xr.open_zarr(path)
    assert set(ds.data_vars) == {"source", "target"}
    assert ds["source"].dims == ("y", "x") and ds["source"].shape == (768, 768)
    assert ds["target"].dims == ("image", "y", "x") and ds["target"].shape == (3, 768, 768)
    assert ds["source"].dtype == np.float32 and ds["target"].dtype == np.float32
    assert ds["target"].encoding["chunks"] == (1, 256, 256)
    assert ds["source"].encoding["chunks"] == (256, 256)
    assert ds["target"].data.chunksize == (1, 256, 256)
    assert list(ds["image"].values) == ["epoch-0", "epoch-1", "epoch-2"]
    assert truth.labels == ("epoch-0", "epoch-1", "epoch-2")
    assert (truth.n_images, truth.shape, truth.kernel_size) == (3, (768, 768), 15)
    assert ds.attrs["seed"] == 2026 and ds.attrs["kernel_field_patch"] == PATCH
    assert "0.035" in ds.attrs["kernel_e1"] and "1.4" in ds.attrs["kernel_fwhm"]
    assert DemoTruth.from_attrs(ds.attrs) == truth
    source, target = ds["source"].values, ds["target"].values
    assert np.isfinite(source).all()
    for i in range(3):
        frac = np.isnan(target[i]).mean()
        assert 0 < frac < 0.005, frac
    # Bad pixels differ from epoch to epoch.
    assert not np.array_equal(np.isnan(target[0]), np.isnan(target[1]))


def test_store_is_deterministic_and_refuses_to_overwrite(tmp_path) -> None:
    kw = dict(n_images=2, size=96, kernel_size=11, seed=3, chunk=64)
    t1 = write_demo_stack(tmp_path / "a.zarr", **kw)
    t2 = write_demo_stack(str(tmp_path / "b.zarr"), **kw)
    assert t1 == t2
    a, b = xr.open_zarr(tmp_path / "a.zarr"), xr.open_zarr(tmp_path / "b.zarr")
    for name in ("source", "target"):
        np.testing.assert_array_equal(a[name].values, b[name].values)
    assert a["target"].encoding["chunks"] == (1, 64, 64)
    assert a.attrs == b.attrs
    with pytest.raises(InputError, match="overwrite"):
        write_demo_stack(tmp_path / "a.zarr", **kw)
    t3 = write_demo_stack(tmp_path / "a.zarr", **{**kw, "seed": 4}, overwrite=True)
    c = xr.open_zarr(tmp_path / "a.zarr")
    assert c.attrs["seed"] == 4 and t3 != t1
    assert not np.array_equal(c["source"].values, b["source"].values)


def test_epochs_do_not_depend_on_the_number_of_images() -> None:
    one, t1 = demo_dataset(n_images=1, size=64, kernel_size=9, seed=8)
    two, t2 = demo_dataset(n_images=2, size=64, kernel_size=9, seed=8)
    np.testing.assert_array_equal(one["source"].values, two["source"].values)
    np.testing.assert_array_equal(one["target"].values[0], two["target"].values[0])
    assert t1.kernel(0, 10.0, 20.0).tolist() == t2.kernel(0, 10.0, 20.0).tolist()


@pytest.mark.parametrize(
    "kwargs",
    [dict(n_images=0), dict(size=16), dict(kernel_size=14), dict(kernel_size=1),
     dict(seed=-1), dict(seed=1.5), dict(size=64, kernel_size=65)],
)
def test_demo_rejects_bad_options(kwargs: dict) -> None:
    with pytest.raises(OptionError):
        demo_dataset(**kwargs)


def test_truth_is_smooth_and_in_range(noisy: tuple[xr.Dataset, DemoTruth]) -> None:
    _, truth = noisy
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(float)
    for i in range(truth.n_images):
        fwhm = truth.fwhm(i, y, x)
        e1, e2 = truth.ellipticity(i, y, x)
        assert fwhm.shape == e1.shape == e2.shape == (SIZE, SIZE)
        shift = truth.fwhm_shift[i]
        assert abs(shift) <= 0.3
        # About 2.0 px on the left, 3.4 px on the right, before the epoch's shift.
        assert fwhm[:, 0].mean() - shift == pytest.approx(2.0, abs=1e-12)
        assert fwhm[:, -1].mean() - shift == pytest.approx(3.4, abs=1e-12)
        assert 1.55 - 1e-12 <= fwhm.min() and fwhm.max() <= 3.85 + 1e-12
        e = np.hypot(e1, e2)
        assert e.max() <= 0.1 + 1e-12 and e.max() > 0.05
        # The distortion's position angle turns across the field.
        angle = 0.5 * np.arctan2(e2, e1)
        assert np.ptp(np.cos(2 * angle)) > 1.0
        # Smooth: tiny changes from one pixel to the next.
        for field, limit in ((fwhm, 0.01), (e1, 0.002), (e2, 0.002)):
            assert np.abs(np.diff(field, axis=0)).max() < limit
            assert np.abs(np.diff(field, axis=1)).max() < limit
        assert 0.9 <= truth.flux(i) <= 1.1
        assert 0.1 <= math.hypot(*truth.offset(i)) <= 0.4
        assert -20 <= truth.background(i) <= 50
        k = truth.kernel(i, 100.0, 30.0)
        assert k.shape == (15, 15) and k.sum() == pytest.approx(truth.flux(i))
        # Its unweighted moments are the requested shape and offset.
        g = np.arange(15) - 7
        cy, cx = (k.sum(1) * g).sum() / k.sum(), (k.sum(0) * g).sum() / k.sum()
        yy = (k.sum(1) * (g - cy) ** 2).sum() / k.sum()
        xx = (k.sum(0) * (g - cx) ** 2).sum() / k.sum()
        xy = (k * np.outer(g - cy, g - cx)).sum() / k.sum()
        fwhm_k = FWHM_PER_SIGMA * (yy * xx - xy * xy) ** 0.25
        assert fwhm_k == pytest.approx(float(truth.fwhm(i, 100.0, 30.0)), rel=1e-4)
        e1_k, e2_k = truth.ellipticity(i, 100.0, 30.0)
        assert (xx - yy) / (xx + yy) == pytest.approx(float(e1_k), abs=1e-4)
        assert 2 * xy / (xx + yy) == pytest.approx(float(e2_k), abs=1e-4)
        assert (cy, cx) == (pytest.approx(truth.offset(i)[0], abs=1e-6),
                            pytest.approx(truth.offset(i)[1], abs=1e-6))
    # Epochs differ.
    assert truth.fwhm_shift[0] != truth.fwhm_shift[1]
    with pytest.raises(OptionError):
        truth.fwhm(2, 0.0, 0.0)


def test_target_is_the_patch_kernel_convolution(clean: tuple[xr.Dataset, DemoTruth]) -> None:
    ds, truth = clean
    source = ds["source"].values.astype(np.float64)
    target = ds["target"].values.astype(np.float64)
    assert np.isfinite(target).all()
    h = truth.kernel_size // 2
    for i in range(truth.n_images):
        scale = np.abs(target[i]).max()
        # Every block at least a kernel half-size from the image edges.
        for by in range(1, SIZE // PATCH - 1):
            for bx in range(1, SIZE // PATCH - 1):
                y0, x0 = by * PATCH, bx * PATCH
                yc, xc = y0 + (PATCH - 1) / 2, x0 + (PATCH - 1) / 2
                kernel = truth.kernel(i, yc, xc)
                np.testing.assert_array_equal(truth.patch_kernel(i, y0 + 3, x0 + 30), kernel)
                window = source[y0 - h:y0 + PATCH + h, x0 - h:x0 + PATCH + h]
                expect = fftconvolve(window, kernel, mode="same")[h:-h, h:-h]
                got = target[i, y0:y0 + PATCH, x0:x0 + PATCH]
                np.testing.assert_allclose(got, expect + truth.background(i),
                                           rtol=1e-6, atol=1e-6 * scale)
        # The check tells neighbouring blocks' kernels apart.
        y0, x0 = 3 * PATCH, 4 * PATCH
        window = source[y0 - h:y0 + PATCH + h, x0 - h:x0 + PATCH + h]
        other = truth.kernel(i, y0 + (PATCH - 1) / 2, x0 + PATCH + (PATCH - 1) / 2)
        wrong = fftconvolve(window, other, mode="same")[h:-h, h:-h] + truth.background(i)
        assert np.abs(target[i, y0:y0 + PATCH, x0:x0 + PATCH] - wrong).max() > 1e-3 * scale
    # At the edges the target also holds light from beyond the image.
    whole = fftconvolve(source, truth.kernel(0, 15.5, 15.5), mode="same") + truth.background(0)
    assert np.abs(target[0, :2, :PATCH] - whole[:2, :PATCH]).max() > 1.0


def test_noise_is_as_documented(noisy: tuple[xr.Dataset, DemoTruth],
                                clean: tuple[xr.Dataset, DemoTruth]) -> None:
    ds, truth = noisy
    ref, _ = clean
    assert ds.attrs["seed"] == ref.attrs["seed"] == 11
    sky, read_noise = 1000.0, 5.0
    src, src_true = ds["source"].values, ref["source"].values.astype(np.float64)
    z = (src - src_true) / np.sqrt(src_true + sky + read_noise ** 2)
    assert abs(z.mean()) < 0.02 and z.std() == pytest.approx(1.0, abs=0.02)
    assert np.percentile(src_true, 99.9) > 50 * math.sqrt(sky + read_noise ** 2)
    for i in range(truth.n_images):
        tgt, tgt_true = ds["target"].values[i], ref["target"].values[i].astype(np.float64)
        bad = np.isnan(tgt)
        assert 0 < bad.mean() < 0.01
        mu = tgt_true - truth.background(i) + sky
        z = ((tgt - tgt_true) / np.sqrt(mu + read_noise ** 2))[~bad]
        assert abs(z.mean()) < 0.02 and z.std() == pytest.approx(1.0, abs=0.02)
