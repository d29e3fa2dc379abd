"""A kernel field applied to an image: the matched and difference images (``pipeline.core.apply``)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.signal import fftconvolve

from pipeline.core.apply import difference_image, matched_image, matched_variance, tile_background
from pipeline.core.field import KernelField, polynomial_terms


def _field(degree: int, k: int, rng: np.random.Generator, shape: tuple[int, int]) -> KernelField:
    """A random field of ``degree`` over an image of ``shape`` (its frame: the image's extent)."""
    terms = len(polynomial_terms(degree))
    coefficients = rng.normal(size=(terms, k, k))
    coefficients[1:] *= 0.3
    ny, nx = shape
    return KernelField(degree=degree, coefficients=coefficients, centre=((ny - 1) / 2, (nx - 1) / 2),
                       scale=((ny - 1) / 2, (nx - 1) / 2), used=np.ones(1, bool), rejected=np.zeros(1, bool),
                       cv_error=0.0, cv_errors={})


def _direct(source: np.ndarray, field: KernelField, y: int, x: int) -> float:
    """The matched value of pixel ``(y, x)`` summed directly with the kernel of that pixel."""
    kernel = field.kernel_at(float(y), float(x))
    h = kernel.shape[0] // 2
    stamp = source[y - h : y + h + 1, x - h : x + h + 1][::-1, ::-1]  # S(y - dy, x - dx) at K(h + dy, h + dx)
    return float(np.sum(stamp * kernel))


def test_a_constant_field_matches_the_convolution_inside_and_is_nan_within_its_half_size_of_the_edges():
    rng = np.random.default_rng(1)
    source = rng.normal(size=(30, 41))
    field = _field(0, 5, rng, source.shape)
    matched = matched_image(source, field)
    inside = (slice(2, -2), slice(2, -2))
    np.testing.assert_allclose(matched[inside], fftconvolve(source, field.coefficients[0], mode="same")[inside],
                               rtol=1e-12, atol=1e-12)
    edge = np.ones(source.shape, bool)
    edge[inside] = False
    assert np.all(np.isnan(matched[edge])) and np.all(np.isfinite(matched[inside]))


@settings(max_examples=20, deadline=None)
@given(degree=st.integers(0, 3), k=st.sampled_from([1, 3, 5]), seed=st.integers(0, 2**32 - 1))
def test_every_pixel_is_matched_with_its_own_kernel(degree, k, seed):
    rng = np.random.default_rng(seed)
    source = rng.normal(size=(23, 19))
    field = _field(degree, k, rng, source.shape)
    matched = matched_image(source, field, rows=7)  # bands of rows: the same values
    h = k // 2
    for y in range(h, source.shape[0] - h):
        for x in range(h, source.shape[1] - h):
            assert matched[y, x] == pytest.approx(_direct(source, field, y, x), rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("degree", [0, 2])
def test_the_matched_variance_sums_each_pixels_own_kernel_squared_over_the_source_variance(degree):
    rng = np.random.default_rng(degree)
    variance = rng.uniform(1.0, 5.0, size=(21, 26))
    field = _field(degree, 5, rng, variance.shape)
    out = matched_variance(variance, field, rows=4)
    for y in range(2, 19):
        for x in range(2, 24):
            kernel = field.kernel_at(float(y), float(x))
            direct = np.sum(variance[y - 2 : y + 3, x - 2 : x + 3][::-1, ::-1] * kernel**2)
            assert out[y, x] == pytest.approx(direct, rel=1e-9)
    assert np.isnan(out[:2]).all() and np.isnan(out[:, -2:]).all()


def test_overlapping_pieces_give_the_whole_images_values():
    """Each piece with the kernel's half-size of its neighbours (NaN beyond the image) and its origin."""
    rng = np.random.default_rng(4)
    source = rng.normal(size=(50, 64))
    field = _field(2, 7, rng, source.shape)
    whole = matched_image(source, field)
    h = 3
    padded = np.pad(source, h, constant_values=np.nan)
    for y0, y1 in ((0, 20), (20, 50)):
        for x0, x1 in ((0, 33), (33, 64)):
            piece = padded[y0 : y1 + 2 * h, x0 : x1 + 2 * h]
            out = matched_image(piece, field, origin=(y0 - h, x0 - h))[h:-h, h:-h]
            np.testing.assert_array_equal(np.isnan(out), np.isnan(whole[y0:y1, x0:x1]))
            np.testing.assert_allclose(out, whole[y0:y1, x0:x1], rtol=1e-12, atol=1e-12)


def test_a_bad_source_pixel_spoils_exactly_the_pixels_whose_stamp_holds_it():
    rng = np.random.default_rng(5)
    source = rng.normal(size=(30, 30))
    source[12, 17] = np.nan
    matched = matched_image(source, _field(1, 5, rng, source.shape))
    expected = np.zeros(source.shape, bool)
    expected[10:15, 15:20] = True
    expected[:2], expected[-2:], expected[:, :2], expected[:, -2:] = True, True, True, True
    np.testing.assert_array_equal(np.isnan(matched), expected)


def test_the_tile_background_is_each_tiles_median_interpolated_between_the_tile_centres():
    yy, xx = np.mgrid[0:96, 0:128].astype(np.float64)
    plane = 3.0 + 0.01 * yy - 0.02 * xx
    background = tile_background(plane, 32)
    inside = (slice(16, 80), slice(16, 112))  # between the outermost tile centres (15.5 ... 111.5)
    np.testing.assert_allclose(background[inside], plane[inside], rtol=0, atol=1e-12)
    # constant beyond the outermost centres; outliers and NaN do not move a tile's median much
    spoilt = np.full((96, 128), 7.0)
    spoilt[5, 5] = 1e6
    spoilt[40:44, 60:64] = np.nan
    np.testing.assert_array_equal(tile_background(spoilt, 32), 7.0)
    # a last row and column of tiles end at the edges, as the job's tiles do
    np.testing.assert_allclose(tile_background(plane[:90, :120], 32)[16:74, 16:104], plane[16:74, 16:104],
                               rtol=0, atol=1e-12)


def test_the_difference_of_an_exact_pair_is_zero_and_shows_what_changed_at_its_flux():
    rng = np.random.default_rng(7)
    source = rng.gamma(2.0, 50.0, size=(64, 80))
    field = _field(2, 7, rng, source.shape)
    field.coefficients[0] = np.abs(field.coefficients[0])
    target = matched_image(source, field) + 12.5
    changed = target.copy()
    changed[40, 30] += 500.0  # a new point source
    difference, matched, background = difference_image(changed, source, field, tile_size=32)
    valid = np.isfinite(difference)
    assert valid[3:-3, 3:-3].all() and not valid[:3].any()
    np.testing.assert_allclose(background, 12.5, rtol=0, atol=1e-9)
    np.testing.assert_allclose(matched[valid], (target - 12.5)[valid], rtol=1e-12, atol=1e-9)
    assert difference[40, 30] == pytest.approx(500.0, abs=1e-8)
    rest = valid.copy()
    rest[40, 30] = False
    np.testing.assert_allclose(difference[rest], 0.0, atol=1e-8)


def test_a_reversed_pair_convolves_the_target_and_keeps_the_sign_of_what_changed_in_it():
    rng = np.random.default_rng(9)
    target = rng.gamma(2.0, 50.0, size=(64, 80))  # the sharper image: source = K * target + b
    field = _field(2, 7, rng, target.shape)
    field.coefficients[0] = np.abs(field.coefficients[0])
    source = matched_image(target, field) + 12.5
    changed = target.copy()
    changed[40, 30] += 500.0  # new in the target
    difference, matched, background = difference_image(changed, source, field, tile_size=32, direction=-1)
    valid = np.isfinite(difference)
    assert valid[3:-3, 3:-3].all() and not valid[:3].any()
    np.testing.assert_allclose(background, -12.5, rtol=0, atol=1e-9)  # the sky of matched - source
    np.testing.assert_allclose(matched, matched_image(changed, field), rtol=0, atol=0)
    spot = np.zeros_like(target)
    spot[40, 30] = 500.0
    blurred = np.array([[_direct(spot, field, y, x) for x in range(27, 34)] for y in range(37, 44)])
    np.testing.assert_allclose(difference[37:44, 27:34], blurred, rtol=1e-9, atol=1e-8)  # K * spot, each pixel's K
    flux = 500.0 * field.kernel_at(40.0, 30.0).sum()  # the kernel changes little over its stamp
    assert flux > 0 and difference[37:44, 27:34].sum() == pytest.approx(flux, rel=1e-3)
    rest = valid.copy()
    rest[37:44, 27:34] = False
    np.testing.assert_allclose(difference[rest], 0.0, atol=1e-8)
    # the forward formula on the same pair is not zero: the direction matters
    wrong, _, _ = difference_image(changed, source, field, tile_size=32, direction=1)
    assert np.nanstd(wrong[rest]) > 10.0


@settings(max_examples=15, deadline=None)
@given(degree=st.integers(0, 2), k=st.sampled_from([3, 5, 7]), seed=st.integers(0, 2**31 - 1),
       sky=st.floats(-50.0, 50.0))
def test_a_reversed_difference_is_minus_the_forward_difference_of_the_swapped_pair(degree, k, seed, sky):
    # matched(target) - source - median(...) = -(source - matched(target) - median(...)), exactly
    rng = np.random.default_rng(seed)
    target, source = rng.normal(100.0, 10.0, size=(2, 40, 52))
    source += sky
    target[rng.integers(0, 40, 3), rng.integers(0, 52, 3)] = np.nan  # bad pixels spread alike either way
    field = _field(degree, k, rng, target.shape)
    reverse = difference_image(target, source, field, tile_size=16, direction=-1)
    forward = difference_image(source, target, field, tile_size=16, direction=1)
    np.testing.assert_array_equal(reverse[0], -forward[0])
    np.testing.assert_array_equal(reverse[1], forward[1])  # the same image convolved
    np.testing.assert_array_equal(reverse[2], -forward[2])


@pytest.mark.parametrize("degree", [0, 1])
def test_the_difference_variance_passes_the_convolved_images_variance_through_the_kernel_squared(degree):
    from pipeline.core.apply import difference_variance

    rng = np.random.default_rng(10 + degree)
    vt, vs = rng.uniform(1.0, 4.0, size=(2, 40, 48))
    field = _field(degree, 5, rng, vt.shape)
    np.testing.assert_array_equal(difference_variance(vt, vs, field), vt + matched_variance(vs, field))
    np.testing.assert_array_equal(difference_variance(vt, vs, field, direction=-1), matched_variance(vt, field) + vs)


def test_the_difference_refuses_a_direction_that_is_neither():
    from pipeline.errors import OptionError

    rng = np.random.default_rng(11)
    for bad in (0, 2, True, "reverse", 1.0):
        with pytest.raises(OptionError, match="use 1 \\(forward: the source convolved\\) or -1"):
            difference_image(np.zeros((10, 10)), np.zeros((10, 10)), _field(0, 3, rng, (10, 10)), tile_size=8,
                             direction=bad)


def test_the_difference_refuses_images_of_other_shapes():
    rng = np.random.default_rng(8)
    with pytest.raises(ValueError, match=r"must be 2-D, got shape \(2, 10, 10\)"):
        matched_image(np.zeros((2, 10, 10)), _field(0, 3, rng, (10, 10)))
    with pytest.raises(ValueError, match="differ in shape"):
        difference_image(np.zeros((10, 10)), np.zeros((10, 11)), _field(0, 3, rng, (10, 10)), tile_size=8)


# --------------------------------------------------------------------------- a simulated pair, end to end


@pytest.fixture(scope="module")
def demo_pair(tmp_path_factory):
    """The demo's first epoch (a kernel that varies across the field, noise, no bad pixels), its noiseless
    twin, and the kernel field a default run (the joint model) fitted to it."""
    import pipeline
    from pipeline.job.config import job_from_dict
    from pipeline.job.run import run_job
    from pipeline.sim.demo import demo_dataset

    folder = tmp_path_factory.mktemp("apply")
    noisy, truth = demo_dataset(n_images=1, noise=True, bad_pixels=False)
    clean, _ = demo_dataset(n_images=1, noise=False, bad_pixels=False)
    noisy.to_zarr(folder / "stack.zarr", mode="w", consolidated=False)
    job = job_from_dict({"input": {"path": str(folder / "stack.zarr")}, "tiles": {"size": TILE},
                         "kernel": {"size": truth.kernel_size}, "output": {"path": str(folder / "kernels.zarr")},
                         "compute": {"scheduler": "threads"}})
    assert job.model.method == "joint"
    run_job(job, progress=False)
    km = pipeline.KernelMap.open(folder / "kernels.zarr")
    return noisy, clean, truth, km.field(km.ds["image"].values[0]), folder


TILE = 128


def _expected_variance(clean, truth, field) -> np.ndarray:
    """The difference's variance: the target's plus the matched source's (Poisson and read noise), ADU²."""
    from pipeline.sim.demo import GAIN, READ_NOISE, SKY

    def variance(signal):  # Poisson in electrons plus read noise, converted to ADU²
        return (signal * GAIN + READ_NOISE**2) / GAIN**2

    target = variance(clean["target"].values[0] - truth.background(0) + SKY)
    source = variance(clean["source"].values.astype(np.float64) + SKY)
    return target + matched_variance(source, field)


def test_the_difference_of_a_pair_with_nothing_changed_is_noise_at_its_expected_level_without_seams(demo_pair):
    noisy, clean, truth, field, _ = demo_pair
    difference, _, background = difference_image(noisy["target"].values[0], noisy["source"].values, field,
                                                 tile_size=TILE)
    assert np.nanmedian(background) == pytest.approx(truth.background(0), abs=0.5)
    z = difference / np.sqrt(_expected_variance(clean, truth, field))
    valid = np.isfinite(z)
    assert valid.mean() > 0.95
    assert np.sqrt(np.mean(z[valid] ** 2)) == pytest.approx(1.0, abs=0.05)
    n = z.shape[0] // TILE
    for i in range(n):
        for j in range(n):
            tile = z[i * TILE : (i + 1) * TILE, j * TILE : (j + 1) * TILE]
            assert np.sqrt(np.nanmean(tile**2)) == pytest.approx(1.0, abs=0.05), (i, j)
    # no seams: pixels within 4 px of a boundary between tiles against those 16 px or more from any
    yy, xx = np.mgrid[0 : z.shape[0], 0 : z.shape[1]]
    apart = np.minimum(np.abs((yy + TILE // 2) % TILE - TILE // 2), np.abs((xx + TILE // 2) % TILE - TILE // 2))
    inner_grid = (yy > TILE // 2) & (xx > TILE // 2) & (yy < z.shape[0] - TILE // 2) & (xx < z.shape[1] - TILE // 2)
    seams = np.sqrt(np.mean(z[valid & inner_grid & (apart < 4)] ** 2))
    inside = np.sqrt(np.mean(z[valid & (apart >= 16)] ** 2))
    assert seams / inside == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("y, x", [(300, 420), (150, 600), (600, 150)])
def test_a_source_new_in_the_target_is_recovered_at_its_flux(demo_pair, y, x):
    from pipeline.sim.demo import _PSF_BETA, PSF_FWHM
    from pipeline.sim.scenes import moffat_psf

    noisy, _, truth, field, _ = demo_pair
    psf = moffat_psf(41, fwhm=PSF_FWHM, beta=_PSF_BETA)
    star = 1e5 * fftconvolve(psf / psf.sum(), truth.kernel(0, y, x), mode="same")  # the target's PSF there
    added = np.zeros(noisy["target"].shape[1:])
    added[y - 20 : y + 21, x - 20 : x + 21] = star
    shot = np.random.default_rng(y).normal(size=added.shape) * np.sqrt(added)  # its own Poisson noise
    difference, _, _ = difference_image(noisy["target"].values[0] + added + shot, noisy["source"].values, field,
                                        tile_size=TILE)
    yy, xx = np.mgrid[0 : added.shape[0], 0 : added.shape[1]]
    aperture = (yy - y) ** 2 + (xx - x) ** 2 <= 8**2
    # aperture photometry, corrected with the injected star's own fraction in the aperture
    assert difference[aperture].sum() / added[aperture].sum() == pytest.approx(1.0, abs=0.03)


def test_the_apply_job_writes_in_chunks_what_the_library_gives_for_the_whole_image(demo_pair, tmp_path):
    import xarray as xr

    from pipeline.errors import OptionError
    from pipeline.job.apply import apply_kernel_map

    noisy, _, _, field, folder = demo_pair
    out = tmp_path / "difference.zarr"
    summary = apply_kernel_map(folder / "kernels.zarr", out, chunk=200, log=lambda _: None)  # chunks off the tiles
    assert summary.skipped == [] and len(summary.images) == 1
    ds = xr.open_zarr(out, consolidated=False)
    assert "normalised" not in ds  # the inputs give no variances
    difference, matched, background = difference_image(noisy["target"].values[0], noisy["source"].values, field,
                                                       tile_size=TILE)
    np.testing.assert_array_equal(np.isnan(ds["matched"].values[0]), np.isnan(matched))
    np.testing.assert_allclose(ds["matched"].values[0], matched, rtol=1e-6, atol=1e-3)
    np.testing.assert_allclose(ds["background"].values[0], background, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(ds["difference"].values[0], difference, rtol=0, atol=0.02)  # float32 matched
    before = {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    with pytest.raises(OptionError, match="already exists: nothing was changed"):
        apply_kernel_map(folder / "kernels.zarr", out, log=lambda _: None)
    assert {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
    apply_kernel_map(folder / "kernels.zarr", out, mode="overwrite", log=lambda _: None)
    inputs = _files(folder)
    # the kernel map, a folder holding it and its input, or a place inside its input: refused, nothing deleted
    for where in (folder / "kernels.zarr", folder, folder / "stack.zarr" / "images"):
        with pytest.raises(OptionError, match=r"is, holds or lies inside (the kernel map|its input stack) .*nothing "
                                              r"was changed"):
            apply_kernel_map(folder / "kernels.zarr", where, mode="overwrite", log=lambda _: None)
    # something apply did not write is not replaced
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(OptionError, match="is not an output of kernelmap apply: nothing was changed"):
        apply_kernel_map(folder / "kernels.zarr", tmp_path / "mine", mode="overwrite", log=lambda _: None)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep" and _files(folder) == inputs
    # a FITS folder that exists is not written into by an apply that starts afresh
    (tmp_path / "fits").mkdir()
    with pytest.raises(OptionError, match="fits already exists: nothing was changed"):
        apply_kernel_map(folder / "kernels.zarr", tmp_path / "new.zarr", mode="resume", fits=tmp_path / "fits",
                         log=lambda _: None)
    assert not (tmp_path / "new.zarr").exists()


def test_kernelmap_apply_writes_the_images_and_refuses_to_overwrite(demo_pair, tmp_path, capsys):
    from pipeline.cli import main

    folder = demo_pair[-1]
    out = tmp_path / "images.zarr"
    assert main(["apply", str(folder / "kernels.zarr"), "--out", str(out), "--chunk", "512"]) == 0
    assert "arrays matched, difference, background; 1 image(s)" in capsys.readouterr().out
    assert main(["apply", str(folder / "kernels.zarr"), "--out", str(out)]) == 2
    assert "already exists: nothing was changed" in capsys.readouterr().err
    assert main(["apply", str(folder / "kernels.zarr"), "--out", str(out), "--overwrite"]) == 0
    assert main(["apply", str(folder / "kernels.zarr"), "--out", str(out), "--overwrite",
                 "--storage-options", "{anon: true}"]) == 2
    assert "--storage-options is not JSON" in capsys.readouterr().err
    assert main(["apply", str(folder / "kernels.zarr"), "--out", str(out), "--overwrite",
                 "--storage-options", "[1]"]) == 2
    assert "must be a JSON object" in capsys.readouterr().err


def test_with_the_images_variances_apply_writes_the_noise_normalised_difference(tmp_path):
    import xarray as xr

    from pipeline.job.apply import apply_kernel_map
    from pipeline.job.config import job_from_dict
    from pipeline.job.run import run_job
    from pipeline.sim.demo import READ_NOISE, SKY, demo_dataset

    noisy, truth = demo_dataset(n_images=1, size=512, noise=True, bad_pixels=False)
    clean, _ = demo_dataset(n_images=1, size=512, noise=False, bad_pixels=False)
    noisy["target_variance"] = (clean["target"] - truth.background(0) + SKY + READ_NOISE**2).astype(np.float32)
    noisy["source_variance"] = (clean["source"] + SKY + READ_NOISE**2).astype(np.float32)
    noisy.to_zarr(tmp_path / "stack.zarr", mode="w", consolidated=False)
    job = job_from_dict({"input": {"path": str(tmp_path / "stack.zarr"),
                                   "variance": {"target": "target_variance", "source": "source_variance"}},
                         "tiles": {"size": TILE}, "kernel": {"size": truth.kernel_size},
                         "output": {"path": str(tmp_path / "kernels.zarr")}, "compute": {"scheduler": "threads"}})
    run_job(job, progress=False)
    apply_kernel_map(tmp_path / "kernels.zarr", tmp_path / "images.zarr", chunk=300, log=lambda _: None)
    ds = xr.open_zarr(tmp_path / "images.zarr", consolidated=False)
    z = ds["normalised"].values[0]
    expected = ds["difference"].values[0] / np.sqrt(noisy["target_variance"].values[0] + matched_variance(
        noisy["source_variance"].values.astype(np.float64), _first_field(tmp_path / "kernels.zarr")))
    np.testing.assert_allclose(z, expected, rtol=1e-4, atol=1e-5)
    valid = np.isfinite(z)
    assert valid.mean() > 0.9 and np.sqrt(np.mean(z[valid] ** 2)) == pytest.approx(1.0, abs=0.05)


def _first_field(path):
    """The kernel-field model of a kernel map's first image."""
    import pipeline

    km = pipeline.KernelMap.open(path)
    return km.field(km.ds["image"].values[0])


# --------------------------------------------------------------------------- resuming an interrupted apply


@pytest.fixture(scope="module")
def three_images(tmp_path_factory):
    """A kernel map of a 3-image stack (3x3 tiles of 64 px, each image with its model)."""
    from conftest import job_dict
    from stacks import make_stack

    from pipeline.job.config import job_from_dict
    from pipeline.job.run import run_job

    folder = tmp_path_factory.mktemp("resume")
    make_stack(folder / "stack.zarr", n_images=3, noise=0.5)
    run_job(job_from_dict(job_dict(folder)), progress=False)
    return folder / "kernels.zarr"


def interrupt(out, *, unmatched: int, matched: int) -> None:
    """As if an apply into ``out`` was killed: image ``unmatched`` with nothing recorded, image ``matched``
    with its matched image only, both images' unrecorded pixels scribbled over."""
    import zarr

    from pipeline.job.apply import STATUS

    group = zarr.open_group(str(out), mode="r+")
    group[STATUS][unmatched] = [0, 0]
    group[STATUS][matched] = [1, 0]
    for name in ("matched", "difference", "background"):
        group[name][unmatched] = 7.0
    for name in ("difference", "background"):
        group[name][matched] = -3.0
    group.attrs["kernelmap_status"] = "incomplete"


def _files(folder) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("sharded", [True, False])
def test_an_interrupted_apply_is_finished_by_resume_as_an_uninterrupted_one_wrote_it(three_images, tmp_path,
                                                                                      monkeypatch, sharded):
    import xarray as xr
    import zarr

    from pipeline.errors import OptionError
    from pipeline.io import store
    from pipeline.job.apply import STATUS, apply_kernel_map

    if not sharded:  # images too large to share a file: each chunk written by its own task
        monkeypatch.setattr(store, "SHARD_BYTES", 192 * 192 * 4 * 2 - 1)
    out = tmp_path / "images.zarr"
    first = apply_kernel_map(three_images, out, chunk=64, log=lambda _: None)
    assert first.kept == [] and len(first.images) == 3
    group = zarr.open_group(str(out), mode="r")
    for name in ("matched", "difference", "background", STATUS):
        assert group[name].shards == (((3, 2) if name == STATUS else (3, 192, 192)) if sharded else None), name
        files = [f for f in (out / name / "c").rglob("*") if f.is_file()]
        # one file an array where the 3 images share a shard, else one a chunk (9 an image) or record
        assert len(files) == (1 if sharded else 3 if name == STATUS else 27), name
    reference = xr.open_zarr(out, consolidated=False).load()
    assert reference.attrs["kernelmap_status"] == "complete" and "status" not in reference.variables
    np.testing.assert_array_equal(zarr.open_group(str(out), mode="r")[STATUS][:], 1)
    labels = list(reference["image"].values)
    interrupt(out, unmatched=1, matched=2)
    before = _files(out)
    with pytest.raises(OptionError, match="already exists: nothing was changed; pass --resume"):
        apply_kernel_map(three_images, out, chunk=64, log=lambda _: None)
    assert _files(out) == before
    summary = apply_kernel_map(three_images, out, mode="resume", chunk=64, log=lambda _: None)
    assert summary.kept == [labels[0]] and summary.images == labels[1:]
    xr.testing.assert_identical(xr.open_zarr(out, consolidated=False).load(), reference)
    # a complete image is kept as its record says: not computed again (the scribble stays)
    zarr.open_group(str(out), mode="r+")["difference"][0, :2, :2] = 5.0
    again = apply_kernel_map(three_images, out, mode="resume", chunk=64, log=lambda _: None)
    assert again.images == [] and again.kept == labels
    np.testing.assert_array_equal(xr.open_zarr(out, consolidated=False)["difference"].values[0, :2, :2], 5.0)
    # where nothing exists, resume starts afresh
    fresh = apply_kernel_map(three_images, tmp_path / "fresh.zarr", mode="resume", chunk=64, log=lambda _: None)
    assert fresh.images == labels
    xr.testing.assert_identical(xr.open_zarr(tmp_path / "fresh.zarr", consolidated=False).load(), reference)


def test_resume_refuses_an_output_of_another_kernel_map_or_settings_naming_what_differs(three_images, tmp_path):
    import shutil

    import xarray as xr

    from pipeline.errors import OptionError
    from pipeline.job.apply import apply_kernel_map

    out = tmp_path / "images.zarr"
    apply_kernel_map(three_images, out, chunk=64, log=lambda _: None)
    interrupt(out, unmatched=0, matched=1)
    before = _files(out)
    with pytest.raises(OptionError, match=r"other settings \(the chunk side: 64 there, 96 here\).* resume it with "
                                          r"--chunk 64"):
        apply_kernel_map(three_images, out, mode="resume", chunk=96, log=lambda _: None)
    other = tmp_path / "other-kernels.zarr"  # the same kernels, another kernel map (another store id)
    shutil.copytree(three_images, other)
    import zarr

    zarr.open_group(str(other), mode="r+").attrs["kernelmap_store_id"] = "0" * 32
    with pytest.raises(OptionError, match=r"another kernel map .*\(the kernel map \(its kernelmap_store_id\): "
                                          r"'[0-9a-f]{32}' there, '0{32}' here\)"):
        apply_kernel_map(other, out, mode="resume", chunk=64, log=lambda _: None)
    older = tmp_path / "older-kernels.zarr"  # a kernel map without a store id: no output of it is resumed
    shutil.copytree(three_images, older)
    del zarr.open_group(str(older), mode="r+").attrs["kernelmap_store_id"]
    apply_kernel_map(older, tmp_path / "older.zarr", chunk=64, log=lambda _: None)
    with pytest.raises(OptionError, match="the kernel map has no kernelmap_store_id"):
        apply_kernel_map(older, tmp_path / "older.zarr", mode="resume", chunk=64, log=lambda _: None)
    xr.Dataset({"a": ("x", np.arange(3.0))}).to_zarr(tmp_path / "plain.zarr", zarr_format=3, consolidated=False)
    with pytest.raises(OptionError, match="was not made by kernelmap apply"):
        apply_kernel_map(three_images, tmp_path / "plain.zarr", mode="resume", chunk=64, log=lambda _: None)
    assert _files(out) == before


def test_kernelmap_apply_resume(three_images, tmp_path, capsys):
    from pipeline.cli import main

    out = tmp_path / "images.zarr"
    assert main(["apply", str(three_images), "--out", str(out), "--chunk", "64"]) == 0
    interrupt(out, unmatched=2, matched=0)
    assert main(["apply", str(three_images), "--out", str(out), "--chunk", "64", "--resume"]) == 0
    assert "arrays matched, difference, background; 2 image(s); 1 already complete" in capsys.readouterr().out
    assert main(["apply", str(three_images), "--out", str(out), "--resume"]) == 2
    assert "the chunk side: 64 there, 1024 here" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["apply", str(three_images), "--out", str(out), "--resume", "--overwrite"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_apply_refuses_an_output_under_a_file(three_images, tmp_path):
    from pipeline.errors import OptionError
    from pipeline.job.apply import apply_kernel_map

    (tmp_path / "notes.txt").write_text("a file")
    with pytest.raises(OptionError, match=r"notes.txt is a file, not a folder, so nothing can be written under it"):
        apply_kernel_map(three_images, tmp_path / "notes.txt" / "images.zarr", log=lambda _: None)
    assert (tmp_path / "notes.txt").read_text() == "a file"
