"""Images whose kernels are reversed (the target the sharper): ``kernelmap apply`` convolves the target and keeps
the difference's sign, ``kernelmap compare`` does not difference kernels of opposite directions.

One stack (:func:`stacks.make_direction_stack`: ``blurrier`` forward, ``sharper`` reverse, ``crossing`` mostly
forward), run once with ``kernel.direction: auto`` and once with ``forward``, and applied once.
"""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.core.apply import (
    FORWARD,
    REVERSE,
    difference_image,
    difference_variance,
    interpolated_background,
    matched_image,
    matched_variance,
    tile_median,
)

#: A transient added to the target of the reversed image: position (pixels), Gaussian sigma and flux (ADU).
SPOT, SPOT_SIGMA, SPOT_FLUX = (100, 300), 1.2, 20000.0
TILE, K, CHUNK = 128, 15, 1024  # one chunk a whole image: the direct calls below are the job's, bit for bit
QUIET = {"log": lambda _: None}


def _job(folder, direction: str) -> dict:
    return {"input": {"path": str(folder / "stack.zarr"),
                      "variance": {"target": "target_variance", "source": "source_variance"}},
            "tiles": {"size": TILE}, "kernel": {"size": K, "direction": direction},
            "output": {"path": str(folder / f"{direction}.zarr")},
            "compute": {"scheduler": "threads", "n_workers": 2}}


@pytest.fixture(scope="session")
def reversed_maps(tmp_path_factory):
    """The stack (a transient in the reversed image's target), its kernel maps (``auto``, ``forward``), the
    auto map applied (with FITS files), and the stack's arrays."""
    import xarray as xr
    import zarr
    from stacks import make_direction_stack

    from pipeline.job.apply import apply_kernel_map
    from pipeline.job.config import job_from_dict
    from pipeline.job.run import run_job

    folder = tmp_path_factory.mktemp("reversed")
    truth = make_direction_stack(folder / "stack.zarr", tile=TILE, k=K)
    y, x = np.mgrid[:256, :1024]
    spot = SPOT_FLUX / (2 * np.pi * SPOT_SIGMA**2) * np.exp(
        -((y - SPOT[0]) ** 2 + (x - SPOT[1]) ** 2) / (2 * SPOT_SIGMA**2))
    group = zarr.open_group(str(folder / "stack.zarr"), mode="r+")
    group["target"][1] = (np.asarray(group["target"][1], dtype=np.float64) + spot).astype(np.float32)
    for direction in ("auto", "forward"):
        run_job(job_from_dict(_job(folder, direction)), progress=False)
    summary = apply_kernel_map(folder / "auto.zarr", folder / "images.zarr", chunk=CHUNK, fits=folder / "fits",
                               **QUIET)
    stack = xr.open_zarr(folder / "stack.zarr", consolidated=False).load()
    return {"folder": folder, "truth": truth, "summary": summary, "stack": stack, "spot": spot}


def _field(folder, name: str, image: int):
    import pipeline

    km = pipeline.KernelMap.open(folder / name)
    return km.field(km.ds["image"].values[image])


def _images(folder):
    import xarray as xr

    return xr.open_zarr(folder / "images.zarr", consolidated=False)


def _padded(values: np.ndarray, field, apply) -> np.ndarray:
    """``apply`` (:func:`matched_image`, :func:`matched_variance`) to a whole image as the job's one chunk
    does it: padded with NaN by the kernel's half-size, evaluated there, cut back."""
    half = field.coefficients.shape[-1] // 2
    padded = np.pad(np.asarray(values, dtype=np.float64), half, constant_values=np.nan)
    return apply(padded, field, origin=(-half, -half))[half:-half, half:-half]


def _job_background(residual: np.ndarray) -> np.ndarray:
    """The job's background of a whole image's ``residual``: its tiles' medians, interpolated."""
    ny, nx = residual.shape
    y0, x0 = np.arange(0, ny, TILE), np.arange(0, nx, TILE)
    medians = np.array([[tile_median(residual[a:a + TILE, b:b + TILE]) for b in x0] for a in y0])
    return interpolated_background(medians, (y0 + (TILE - 1) / 2, x0 + (TILE - 1) / 2), np.arange(ny),
                                   np.arange(nx))


def _away_from_spot(shape: tuple[int, int], radius: int = 20) -> np.ndarray:
    y, x = np.mgrid[: shape[0], : shape[1]]
    return (y - SPOT[0]) ** 2 + (x - SPOT[1]) ** 2 > radius**2


# --------------------------------------------------------------------------- apply


def test_the_output_says_which_image_of_each_pair_was_convolved(reversed_maps):
    from astropy.io import fits

    folder, summary = reversed_maps["folder"], reversed_maps["summary"]
    ds = _images(folder)
    assert list(reversed_maps["truth"]["direction"][:2, 0]) == [FORWARD, REVERSE]
    np.testing.assert_array_equal(ds["direction"].values, [FORWARD, REVERSE, FORWARD])
    assert ds["direction"].dims == ("image",) and "-1 the target" in ds["direction"].attrs["long_name"]
    assert "kernel * target - source - background" in ds.attrs["kernelmap_difference"]
    assert "matched - source - background where it is -1" in ds["difference"].attrs["long_name"]
    assert summary.reversed == ["sharper"] and summary.images == ["blurrier", "sharper", "crossing"]
    for label, direction, convolved in (("blurrier", FORWARD, "SOURCE"), ("sharper", REVERSE, "TARGET")):
        header = fits.getheader(folder / "fits" / f"{label}.diff.fits")
        assert (header["DIRECTN"], header["CONVOLVD"]) == (direction, convolved)


def test_the_forward_images_outputs_are_the_forward_formula_bit_for_bit(reversed_maps):
    folder, stack = reversed_maps["folder"], reversed_maps["stack"]
    ds = _images(folder)
    field = _field(folder, "auto.zarr", 0)
    source = stack["source"].values[0].astype(np.float64)
    target = stack["target"].values[0].astype(np.float64)
    matched = _padded(source, field, matched_image).astype(np.float32)
    np.testing.assert_array_equal(ds["matched"].values[0], matched)
    background = _job_background(target - matched.astype(np.float64))
    difference = target - matched.astype(np.float64) - background
    np.testing.assert_array_equal(ds["background"].values[0], background.astype(np.float32))
    np.testing.assert_array_equal(ds["difference"].values[0], difference.astype(np.float32))
    spread = _padded(stack["source_variance"].values[0], field, matched_variance)
    normalised = difference / np.sqrt(stack["target_variance"].values[0].astype(np.float64) + spread)
    np.testing.assert_array_equal(ds["normalised"].values[0], normalised.astype(np.float32))


def test_the_reversed_image_convolves_its_target_and_keeps_target_minus_source(reversed_maps):
    folder, stack = reversed_maps["folder"], reversed_maps["stack"]
    ds = _images(folder)
    field = _field(folder, "auto.zarr", 1)
    source = stack["source"].values[1].astype(np.float64)
    target = stack["target"].values[1].astype(np.float64)
    matched = _padded(target, field, matched_image).astype(np.float32)
    np.testing.assert_array_equal(ds["matched"].values[1], matched)  # the target convolved, not the source
    residual = matched.astype(np.float64) - source
    background = _job_background(residual)
    np.testing.assert_array_equal(ds["difference"].values[1], (residual - background).astype(np.float32))
    spread = _padded(stack["target_variance"].values[1], field, matched_variance)
    expected = (residual - background) / np.sqrt(spread + stack["source_variance"].values[1].astype(np.float64))
    np.testing.assert_array_equal(ds["normalised"].values[1], expected.astype(np.float32))
    # the library's whole-image difference agrees (to the float32 the job stores its matched image in)
    library, _, sky = difference_image(target, source, field, tile_size=TILE, direction=REVERSE)
    np.testing.assert_array_equal(np.isnan(library), np.isnan(ds["difference"].values[1]))
    np.testing.assert_allclose(ds["difference"].values[1], library, rtol=0, atol=0.05)
    np.testing.assert_allclose(ds["background"].values[1], sky, rtol=0, atol=0.05)


def test_the_reversed_difference_is_noise_at_its_expected_level_and_the_wrong_direction_is_not(reversed_maps):
    folder, stack = reversed_maps["folder"], reversed_maps["stack"]
    ds = _images(folder)
    field = _field(folder, "auto.zarr", 1)
    difference = ds["difference"].values[1].astype(np.float64)
    keep = np.isfinite(difference) & _away_from_spot(difference.shape)
    assert keep.mean() > 0.85
    sigma = np.sqrt(difference_variance(stack["target_variance"].values[1], stack["source_variance"].values[1],
                                        field, direction=REVERSE))
    values = difference[keep]
    robust = 1.4826 * np.median(np.abs(values - np.median(values)))
    expected = float(np.median(sigma[keep]))
    assert robust == pytest.approx(expected, rel=0.2)
    assert abs(values.mean()) < 0.05 * expected and abs(np.median(values)) < 0.02 * expected
    z = ds["normalised"].values[1][keep]
    rms = float(np.sqrt(np.mean(z.astype(np.float64) ** 2)))
    assert rms == pytest.approx(1.0, abs=0.1)
    # the same kernels convolving the source (the forward formula) leave the stars: far above the noise
    wrong, _, _ = difference_image(stack["target"].values[1], stack["source"].values[1], field, tile_size=TILE,
                                   direction=FORWARD)
    spread = np.sqrt(stack["target_variance"].values[1] + matched_variance(stack["source_variance"].values[1],
                                                                           field))
    both = keep & np.isfinite(wrong)
    wrong_rms = float(np.sqrt(np.mean((wrong[both] / spread[both]) ** 2)))
    assert wrong_rms > 2.0 * rms


def test_a_transient_in_the_reversed_images_target_shows_positive_at_its_flux(reversed_maps):
    folder = reversed_maps["folder"]
    ds = _images(folder)
    field = _field(folder, "auto.zarr", 1)
    difference = ds["difference"].values[1].astype(np.float64)
    y, x = SPOT
    box = difference[y - 12:y + 13, x - 12:x + 13]
    assert np.isfinite(box).all() and np.unravel_index(np.argmax(box), box.shape) == (12, 12)
    flux = float(field.kernel_at(float(y), float(x)).sum())  # the kernel carries the target to the source's flux
    assert box.sum() == pytest.approx(SPOT_FLUX * flux, rel=0.05)
    assert (box[11:14, 11:14] > 0).all()  # its core positive: new in the target
    normalised = ds["normalised"].values[1]
    assert normalised[y, x] > 20  # far above the noise, and positive: new in the target


def test_an_apply_of_a_map_with_reversed_images_resumes_and_refuses_other_directions(reversed_maps, tmp_path):
    import zarr

    from pipeline.errors import OptionError
    from pipeline.job.apply import STATUS, apply_kernel_map

    folder = reversed_maps["folder"]
    whole = _images(folder)
    out = tmp_path / "images.zarr"
    apply_kernel_map(folder / "auto.zarr", out, chunk=CHUNK, **QUIET)
    group = zarr.open_group(str(out), mode="r+")  # as if killed: the reversed image matched only, scribbled over
    group[STATUS][1] = [1, 0]
    group[STATUS][2] = [0, 0]
    for name in ("difference", "background", "normalised"):
        group[name][1] = -3.0
    for name in ("matched", "difference", "background", "normalised"):
        group[name][2] = 7.0
    group.attrs["kernelmap_status"] = "incomplete"
    summary = apply_kernel_map(folder / "auto.zarr", out, mode="resume", chunk=CHUNK, **QUIET)
    assert summary.kept == ["blurrier"] and summary.images == ["sharper", "crossing"]
    resumed = _images(tmp_path)
    for name in ("matched", "difference", "background", "normalised"):
        np.testing.assert_array_equal(resumed[name].values, whole[name].values)
    np.testing.assert_array_equal(resumed["direction"].values, [FORWARD, REVERSE, FORWARD])
    # an output whose directions are not the map's is not resumed into
    group = zarr.open_group(str(out), mode="r+")
    group[STATUS][2] = [0, 0]
    group["direction"][1] = FORWARD
    before = np.asarray(group["difference"][2])
    with pytest.raises(OptionError, match=r"--resume: .* \(the direction of sharper differs\): nothing was "
                                          r"changed; pass --overwrite"):
        apply_kernel_map(folder / "auto.zarr", out, mode="resume", chunk=CHUNK, **QUIET)
    np.testing.assert_array_equal(np.asarray(zarr.open_group(str(out))["difference"][2]), before)


def test_kernelmap_apply_says_which_images_are_reversed(reversed_maps, tmp_path, capsys):
    from pipeline.cli import main

    assert main(["apply", str(reversed_maps["folder"] / "auto.zarr"), "--out", str(tmp_path / "i.zarr")]) == 0
    assert ("3 image(s); 1 reversed, their target convolved: difference = kernel * target - source - background"
            in capsys.readouterr().out)


# --------------------------------------------------------------------------- compare


def _maps(reversed_maps):
    from pipeline.analysis.maps import read_kernel_map

    folder = reversed_maps["folder"]
    return read_kernel_map(folder / "forward.zarr"), read_kernel_map(folder / "auto.zarr")


def test_compare_leaves_out_the_images_whose_directions_differ_and_says_so(reversed_maps):
    from pipeline.analysis.compare import MEASUREMENTS, WHY_NOT, compare_maps, summary_lines

    forward, auto = _maps(reversed_maps)
    diff = compare_maps(forward, auto)
    np.testing.assert_array_equal(diff["direction_a"].values, [FORWARD, FORWARD, FORWARD])
    np.testing.assert_array_equal(diff["direction_b"].values, [FORWARD, REVERSE, FORWARD])
    assert diff.attrs["direction_differs"] == ["sharper"]
    # both maps have finite kernels for the sharper image (the forward run's deconvolving ones), not differenced
    assert np.isfinite(forward["kernel"].values[1]).all(axis=(-2, -1)).any()
    assert np.isfinite(auto["kernel"].values[1]).all(axis=(-2, -1)).any()
    compared = [name for name in (*MEASUREMENTS, "kernel_difference") if name in diff]
    assert "kernel_difference" in compared and "fwhm" in compared and "flux" in compared
    for name in compared:
        assert np.isnan(diff[name].values[1]).all(), name
        # the images of one direction compare as before: B - A
        if name != "kernel_difference":
            np.testing.assert_array_equal(diff[name].values[[0, 2]],
                                          auto[name].values[[0, 2]].astype(np.float64)
                                          - forward[name].values[[0, 2]].astype(np.float64))
    assert np.isfinite(diff["kernel_difference"].values[[0, 2]]).any()
    lines = summary_lines(diff)
    assert lines[0] == ("         direction: differs in 1 of 3 image pair(s), not compared (NaN): sharper (A forward, "
                        "B reverse)")
    assert WHY_NOT in lines[1]
    fwhm = [line for line in lines if line.lstrip().startswith("fwhm:")]
    assert fwhm and f"({np.isfinite(diff['fwhm'].values).sum()} tile(s))" in fwhm[0]


def test_compare_counts_a_map_without_directions_as_forward(reversed_maps):
    from pipeline.analysis.compare import compare_maps, summary_lines

    forward, auto = _maps(reversed_maps)
    older = forward.drop_vars("direction")
    same = compare_maps(older, forward)
    assert same.attrs["direction_differs"] == [] and "direction_note" not in same.attrs
    assert not any("direction" in line for line in summary_lines(same))
    assert float(np.nanmax(np.abs(same["fwhm"].values))) == 0.0
    assert np.isfinite(same["kernel_difference"].values[1]).any()  # forward against forward: compared
    assert compare_maps(older, auto).attrs["direction_differs"] == ["sharper"]
    # every A image against the one B image: its direction against each
    single = compare_maps(auto, forward.isel(image=[1]))
    np.testing.assert_array_equal(single["direction_b"].values, [FORWARD] * 3)
    assert single.attrs["direction_differs"] == ["sharper"]


def test_compare_refuses_maps_whose_every_pair_differs_in_direction(reversed_maps):
    from pipeline.analysis.compare import compare_maps
    from pipeline.errors import InputError

    forward, auto = _maps(reversed_maps)
    with pytest.raises(InputError, match=r"opposite directions in every image pair \(sharper \(A forward, B "
                                         r"reverse\)\): nothing to compare.*same kernel.direction"):
        compare_maps(forward.isel(image=[1]), auto.isel(image=[1]))


def test_kernelmap_compare_prints_and_draws_which_images_differ_in_direction(reversed_maps, tmp_path, capsys):
    import xarray as xr

    from pipeline.analysis.compare import compare_figure
    from pipeline.cli import main

    folder = reversed_maps["folder"]
    out = tmp_path / "cmp"
    assert main(["compare", str(folder / "forward.zarr"), str(folder / "auto.zarr"), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "direction: differs in 1 of 3 image pair(s), not compared (NaN): sharper (A forward, B reverse)" in text
    assert "a forward kernel blurs the source into the target" in text
    diff = xr.open_zarr(out / "compare.zarr")
    assert np.isnan(diff["kernel_difference"].values[1]).all()
    fig = compare_figure(diff, image=1)
    title = fig._suptitle.get_text()
    assert "sharper: not compared, directions differ (sharper (A forward, B reverse))" in title
    assert "directions differ in 1 of 3 pair(s)" in title
    shown = compare_figure(diff, image=0)._suptitle.get_text()
    assert shown.startswith("B - A per tile, blurrier\ndirections differ in 1 of 3 pair(s)")
