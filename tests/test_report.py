"""The report of a kernel map: maps in RA/Dec with a compass where the stack has a reference WCS, tiles on the
sky; and the conventions of every figure (y up, image labels in titles, units, stretch and colour scale of the
kernel mosaics, reference sticks), flags counted as problems only, the page's numbers, captions and job."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import yaml
import zarr
from conftest import job_dict
from stacks import make_stack

fits = pytest.importorskip("astropy.io.fits")
pytest.importorskip("astropy.visualization.wcsaxes")

from pipeline import flags as fl  # noqa: E402
from pipeline.analysis.maps import read_kernel_map  # noqa: E402
from pipeline.analysis.report import (  # noqa: E402
    SEVERITY,
    column_format,
    figures,
    flag_categories,
    tile_table,
    write_report,
)
from pipeline.analysis.sky import compass, sky_of  # noqa: E402
from pipeline.job.config import job_from_dict  # noqa: E402
from pipeline.job.run import run_job  # noqa: E402

SCALE = 5e-5  # degrees per pixel
ANGLE = 30.0  # degrees: the sky turned against the pixel grid


def rotated_header(angle: float = ANGLE, crpix: tuple[float, float] = (96.5, 96.5)) -> fits.Header:
    """A TAN WCS turned by ``angle``: north neither up nor down the columns."""
    c, s = np.cos(np.radians(angle)), np.sin(np.radians(angle))
    header = fits.Header()
    header.update({"CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CRVAL1": 150.0, "CRVAL2": 2.0,
                   "CRPIX1": crpix[0], "CRPIX2": crpix[1], "CD1_1": -SCALE * c, "CD1_2": SCALE * s,
                   "CD2_1": SCALE * s, "CD2_2": SCALE * c, "CUNIT1": "deg", "CUNIT2": "deg"})
    return header


@pytest.fixture(scope="module")
def maps(tmp_path_factory):
    """Kernel maps of one 3-image stack (3x3 tiles of 64 px): ``(on the sky, without a WCS)``."""
    out = []
    for name, wcs in (("sky", True), ("plain", False)):
        folder = tmp_path_factory.mktemp(name)
        make_stack(folder / "stack.zarr", n_images=3, noise=0.5)
        if wcs:
            zarr.open_group(str(folder / "stack.zarr"), mode="r+").attrs["reference_wcs"] = \
                rotated_header().tostring(sep="\n")
        run_job(job_from_dict(job_dict(folder)), progress=False)
        out.append(folder / "kernels.zarr")
    return tuple(out)


#: figure stem -> the axes that are maps (positions in ``fig.axes`` before the colour bars)
MAP_AXES = {"fwhm": [0, 1, 2], "flux": [0, 1, 2], "background": [0, 1, 2], "residual": [0, 1, 2],
            "ellipticity": [0, 1, 2], "flags": [0, 1, 2], "model-fwhm": [0, 1, 2], "model-ellipticity": [0, 1, 2],
            "model-residual": [0, 1, 2, 3, 4, 5], "stack": [0, 1, 2, 3], "pca": [5, 6, 7]}


def _close():
    import matplotlib.pyplot as plt

    plt.close("all")


def test_a_map_with_a_reference_wcs_has_ra_dec_axes_and_a_compass_pointing_north_and_east(maps):
    sky_path, _ = maps
    ds = read_kernel_map(sky_path, lazy=("kernel",))
    sky = sky_of(ds)
    assert sky.on and sky.note == ""
    figs = figures(ds)
    for stem, positions in MAP_AXES.items():
        axes = figs[stem].axes
        for p in positions:
            assert (axes[p].get_xlabel(), axes[p].get_ylabel()) == ("RA (h m s)", "Dec (d m s)"), (stem, p)
            assert {t.get_text() for t in axes[p].texts} >= {"N", "E"}, (stem, p)
    assert figs["flags"].axes[3].get_xlabel() == "tiles (count)"  # the bar chart stays a bar chart
    assert figs["pca"].axes[4].get_xlabel() == "component (number)"
    check_conventions(figs, ds)
    # the maps' data coordinates stay input pixels: the cells end where the image does
    mesh = figs["fwhm"].axes[0].collections[0].get_coordinates()
    np.testing.assert_array_equal(mesh[0, :, 0], [-0.5, 63.5, 127.5, 191.5])
    # the compass: north and east in input pixels are the columns of the inverse CD matrix (at CRPIX)
    cd = np.array([[rotated_header()["CD1_1"], rotated_header()["CD1_2"]],
                   [rotated_header()["CD2_1"], rotated_header()["CD2_2"]]])
    inverse = np.linalg.inv(cd)  # (dx, dy) per (dRA cos dec, dDec)
    north, east = compass(sky.wcs, 95.5, 95.5)
    for got, column in ((north, inverse[:, 1]), (east, inverse[:, 0])):
        expected = column[::-1] / np.hypot(*column)  # as (dy, dx)
        np.testing.assert_allclose(got, expected, atol=1e-5)
    angle = np.degrees(np.arctan2(north[1], north[0]))  # north turned 30 degrees from +y towards +x
    assert angle == pytest.approx(ANGLE, abs=1e-3)
    # and the arrow labelled N on a map points that way
    ax = figs["fwhm"].axes[0]
    arrows = [a for a in ax.texts if a.get_text() == "" and hasattr(a, "xyann")]
    (x_tip, y_tip), (x_base, y_base) = arrows[0].xy, arrows[0].xyann
    np.testing.assert_allclose(np.array([y_tip - y_base, x_tip - x_base]) / np.hypot(y_tip - y_base, x_tip - x_base),
                               compass(sky.wcs, 95.5, 95.5)[0], atol=1e-3)
    _close()


def test_a_map_without_a_wcs_keeps_pixel_axes(maps):
    _, plain = maps
    ds = read_kernel_map(plain, lazy=("kernel",))
    sky = sky_of(ds)
    assert not sky.on and sky.note == ""
    figs = figures(ds)
    for stem, positions in MAP_AXES.items():
        for p in positions:
            ax = figs[stem].axes[p]
            assert ax.get_xlabel().startswith("x (pixel)") and ax.get_ylabel().startswith("y (pixel)"), (stem, p)
            assert not any(t.get_text() in ("N", "E") for t in ax.texts)
    check_conventions(figs, ds)
    _close()


def test_without_astropy_the_maps_fall_back_to_pixels_and_the_page_says_why(maps, tmp_path, monkeypatch):
    sky_path, _ = maps
    ds = read_kernel_map(sky_path, lazy=("kernel",))
    for name in ("astropy.wcs", "astropy.io.fits"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    sky = sky_of(ds)
    assert not sky.on and "astropy is not installed" in sky.note and "kernelmap[fits]" in sky.note
    assert figures(ds, max_images=1)["fwhm"].axes[0].get_xlabel() == "x (pixel)"
    _close()
    index = write_report(sky_path, tmp_path / "report", max_images=1)
    assert "maps in input pixels (the kernel map has a reference WCS, but astropy is not installed" in \
        index.read_text()


def test_a_wcs_that_does_not_give_the_stored_positions_is_not_used(maps):
    sky_path, _ = maps
    ds = read_kernel_map(sky_path, lazy=("kernel",))
    moved = ds.assign_attrs(reference_wcs=rotated_header(crpix=(90.5, 96.5)).tostring(sep="\n"))
    sky = sky_of(moved)
    assert not sky.on and "from their stored ra/dec" in sky.note
    broken = ds.assign_attrs(reference_wcs="CTYPE1  = 'LINEAR  '\nCTYPE2  = 'LINEAR  '")
    assert not sky_of(broken).on and "no celestial axes" in sky_of(broken).note


def test_the_tile_table_gives_each_tiles_place_on_the_sky_and_its_medians(maps, tmp_path):
    sky_path, plain = maps
    ds = read_kernel_map(sky_path, lazy=("kernel",))
    table = tile_table(ds)
    assert len(table) == 9 and list(table.columns[:6]) == ["ty", "tx", "y", "x", "ra", "dec"]
    np.testing.assert_array_equal(table["ra"], ds["ra"].values.ravel())
    np.testing.assert_array_equal(table["dec"], ds["dec"].values.ravel())
    np.testing.assert_array_equal(table["x"], np.tile(ds["x"].values, 3))
    np.testing.assert_allclose(table["fwhm_median"], np.median(ds["fwhm"].values.astype(float), axis=0).ravel())
    flagged = ((ds["quality_flag"].values.astype(int) & fl.PROBLEMS) != 0).mean(axis=0).ravel()
    np.testing.assert_array_equal(table["flagged_fraction"], flagged)
    assert "ra" not in tile_table(read_kernel_map(plain, lazy=("kernel",)))
    index = write_report(sky_path, tmp_path / "report", max_images=1)
    written = pd.read_csv(tmp_path / "report" / "tiles.csv")
    np.testing.assert_allclose(written["ra"], table["ra"], rtol=1e-15)
    assert "maps in RA/Dec" in index.read_text()
    assert "ra" not in pd.read_csv(tmp_path / "report" / "images.csv")  # the images share the reference grid
    xr.testing.assert_equal(xr.Dataset.from_dataframe(written), xr.Dataset.from_dataframe(table))


@pytest.mark.parametrize("frame", ["swapped", "galactic"])
def test_the_compass_and_the_axis_names_follow_the_wcs_axes_order_and_frame(frame):
    """Longitude on the second axis, or a galactic WCS: north and east are still ICRS north and east, the
    axes named for what they show, the tile centres' ra/dec ICRS."""
    from astropy.wcs import WCS

    from pipeline.analysis.sky import axis_names
    from pipeline.io.store import tile_sky_positions

    header = fits.Header()
    if frame == "swapped":  # Dec along x, RA along y (decreasing upwards)
        header.update({"CTYPE1": "DEC--TAN", "CTYPE2": "RA---TAN", "CRVAL1": 2.0, "CRVAL2": 150.0,
                       "CRPIX1": 50.5, "CRPIX2": 40.5, "CD1_1": SCALE, "CD2_2": -SCALE, "CD1_2": 0.0, "CD2_1": 0.0})
    else:  # the galactic centre, l to the left
        header.update({"CTYPE1": "GLON-TAN", "CTYPE2": "GLAT-TAN", "CRVAL1": 0.0, "CRVAL2": 0.0,
                       "CRPIX1": 50.5, "CRPIX2": 40.5, "CD1_1": -SCALE, "CD2_2": SCALE, "CD1_2": 0.0, "CD2_1": 0.0})
    wcs = WCS(header).celestial
    north, east = compass(wcs, 39.5, 49.5)
    here = wcs.pixel_to_world(49.5, 39.5).icrs
    for vector, moves in ((north, "dec"), (east, "ra")):
        step = 20.0 * vector  # 20 px along it
        there = wcs.pixel_to_world(49.5 + step[1], 39.5 + step[0]).icrs
        d_ra = (there.ra.deg - here.ra.deg) * np.cos(np.radians(here.dec.deg)) * 3600
        d_dec = (there.dec.deg - here.dec.deg) * 3600
        along, across = (d_dec, d_ra) if moves == "dec" else (d_ra, d_dec)
        assert along == pytest.approx(20 * SCALE * 3600, rel=1e-3) and abs(across) < 1e-3 * along, (moves, along,
                                                                                                     across)
    if frame == "swapped":
        np.testing.assert_allclose(north, [0.0, 1.0], atol=1e-6)  # Dec grows along x
        np.testing.assert_allclose(east, [-1.0, 0.0], atol=1e-6)  # RA grows downwards
        assert axis_names(wcs) == ("RA", "Dec")
        ra, dec = tile_sky_positions(header.tostring(sep="\n"), np.array([39.5]), np.array([49.5]))
        np.testing.assert_allclose([ra[0, 0], dec[0, 0]], [150.0, 2.0], atol=1e-9)
    else:
        assert axis_names(wcs) == ("Galactic l", "Galactic b")
        ra, dec = tile_sky_positions(header.tostring(sep="\n"), np.array([39.5]), np.array([49.5]))
        np.testing.assert_allclose([ra[0, 0], dec[0, 0]], [266.405, -28.936], atol=1e-3)  # Sgr A* region, ICRS


def test_a_report_is_not_written_over_anything_unless_asked_and_then_only_over_a_report(maps, tmp_path):
    from pipeline.errors import OptionError

    _, plain_path = maps
    out = tmp_path / "report"
    write_report(plain_path, out, max_images=1)
    (out / "stale.png").write_bytes(b"from an earlier report")
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(OptionError, match="report exists: nothing was changed; pass --overwrite"):
        write_report(plain_path, out, max_images=1)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    write_report(plain_path, out, max_images=1, overwrite=True)
    assert (out / "index.html").exists() and not (out / "stale.png").exists()  # replaced whole
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(OptionError, match="is not a report written by kernelmap report: nothing was changed"):
        write_report(plain_path, tmp_path / "mine", max_images=1, overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    _close()


def test_an_overwrite_that_fails_midway_leaves_the_earlier_report_whole(maps, tmp_path, monkeypatch):
    import pipeline.analysis.report as report_module

    _, plain_path = maps
    out = tmp_path / "report"
    write_report(plain_path, out, max_images=1)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    written = []

    def failing_table(*args, **kwargs):  # the figures are written by now; the tables fail
        written.extend(p.name for p in Path(args[1].root).iterdir())
        raise OSError("disk gone")

    monkeypatch.setattr(report_module, "write_tables", failing_table)
    with pytest.raises(OSError, match="disk gone"):
        write_report(plain_path, out, max_images=1, overwrite=True, stretch="log")
    assert any(name.endswith(".png") for name in written)  # the new report was being written ...
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # ... beside the earlier one, kept whole
    assert not [p for p in tmp_path.iterdir() if ".kernelmap-" in p.name]  # the unfinished one removed
    monkeypatch.undo()
    write_report(plain_path, out, max_images=1, overwrite=True, stretch="log")
    assert (out / "index.html").read_bytes() != before["index.html"]  # the log stretch is said on the page
    assert not [p for p in tmp_path.iterdir() if ".kernelmap-" in p.name]
    _close()


# --------------------------------------------------------------------------- conventions of every figure

#: A unit in parentheses: "kernel FWHM (pixel)", "RA (h m s)", "tiles with a problem flag (% of images)".
UNIT = re.compile(r"\(([^()]+)\)")


def _is_colour_bar(ax) -> bool:
    return ax.get_label() == "<colorbar>"


def check_conventions(figs: dict, ds: xr.Dataset) -> None:
    """Every figure: axes y up (images origin lower); every axis label and colour bar label names a unit
    (never "(1)", never empty on a colour bar); the per-image panels titled with the images' labels, no title
    naming an image by its position."""
    from matplotlib.image import AxesImage

    shown = sorted(int(stem.split("-")[1]) for stem in figs if stem.startswith("kernels-"))
    labels = [str(ds["image"].values[i]) for i in shown]
    for stem, fig in figs.items():
        texts = [fig._suptitle.get_text() if fig._suptitle is not None else ""]
        for ax in fig.axes:
            if not ax.get_visible():
                continue
            assert not ax.yaxis_inverted(), (stem, ax.get_title())
            for image in ax.get_images():
                assert isinstance(image, AxesImage) and image.origin == "lower", (stem, ax.get_title())
            names = [ax.get_xlabel(), ax.get_ylabel()]
            if _is_colour_bar(ax):
                assert any(names), (stem, "a colour bar without a label")
            for name in filter(None, names):
                units = UNIT.findall(name)
                assert units and all(u.strip() not in ("", "1") for u in units), (stem, name)
                assert "(1)" not in name and "()" not in name, (stem, name)
            texts.append(ax.get_title())
        assert not any(re.search(r"\bimage \d", t) for t in texts), (stem, texts)
    for stem in ("fwhm", "flux", "background", "residual", "ellipticity", "flags", "model-fwhm",
                 "model-ellipticity"):
        titles = [ax.get_title() for ax in figs[stem].axes]
        assert [t.split(":")[0] for t in titles[:len(labels)]] == labels, (stem, titles)
    for i, label in zip(shown, labels):
        assert figs[f"kernels-{i}"].axes[0].get_title().startswith(f"Kernels across the field, {label}")


def test_kernel_stamps_lie_y_up_in_the_mosaic_stretched_asinh_on_a_shared_scale_by_default(maps):
    """The mosaic's pixel [r (k + 1) + ky, c (k + 1) + kx] is kernel[r, c, ky, kx], drawn origin lower: tile row 0
    and each stamp's ky = -h at the bottom, as the image's y runs (DESIGN.md: ky along y)."""
    from matplotlib.colors import AsinhNorm

    _, plain = maps
    ds = read_kernel_map(plain, lazy=("kernel",))
    figs = figures(ds, max_images=2)
    kernels = ds["kernel"].values.astype(np.float64)
    k = ds.sizes["ky"]
    finite = kernels[:2][np.isfinite(kernels[:2])]
    for i in range(2):
        ax = figs[f"kernels-{i}"].axes[0]
        (image,) = ax.get_images()
        assert image.origin == "lower" and not ax.yaxis_inverted()
        mosaic = np.asarray(image.get_array().filled(np.nan))
        for r in range(3):
            for c in range(3):
                np.testing.assert_array_equal(mosaic[r * (k + 1): r * (k + 1) + k, c * (k + 1): c * (k + 1) + k],
                                              kernels[i, r, c])
        # y tick labels (tile centres) grow upwards
        assert list(ax.get_yticks()) == [r * (k + 1) + k // 2 for r in range(3)]
        assert [t.get_text() for t in ax.get_yticklabels()] == [f"{v:.0f}" for v in ds["y"].values]
        assert type(image.norm) is AsinhNorm
        assert (image.norm.vmin, image.norm.vmax) == (finite.min(), finite.max())  # shared by both images
        assert image.norm.linear_width == pytest.approx(0.01 * max(abs(finite.min()), finite.max()))
        colour_bar = figs[f"kernels-{i}"].axes[1]
        assert colour_bar.get_ylabel() == ("kernel flux per kernel pixel (ratio target/source)\nasinh stretch, "
                                           "scale shared by the images")
    _close()


@pytest.mark.parametrize("stretch", ["log", "linear"])
def test_the_mosaic_stretch_and_the_per_image_scale_follow_the_options(maps, stretch):
    from matplotlib.colors import LogNorm, Normalize

    _, plain = maps
    ds = read_kernel_map(plain, lazy=("kernel",))
    figs = figures(ds, max_images=2, stretch=stretch, scale="per-image")
    kernels = ds["kernel"].values.astype(np.float64)
    for i in range(2):
        (image,) = figs[f"kernels-{i}"].axes[0].get_images()
        lo, hi = np.nanmin(kernels[i]), np.nanmax(kernels[i])  # this image's own limits
        if stretch == "log":
            assert type(image.norm) is LogNorm and (image.norm.vmin, image.norm.vmax) == pytest.approx((hi * 1e-4, hi))
            assert (image.get_array().compressed() > 0).all()  # values at or below zero at the scale's foot
        else:
            assert type(image.norm) is Normalize and (image.norm.vmin, image.norm.vmax) == (lo, hi)
        assert f"{stretch} stretch, scale of this image" in figs[f"kernels-{i}"].axes[1].get_ylabel()
    # per image: each map panel its own limits (the 1st and 99th percentiles of its values) and colour bar
    for stem, name in (("fwhm", "fwhm"), ("flux", "flux"), ("residual", "residual")):
        fig = figs[stem]
        limits = [fig.axes[p].collections[0].get_clim() for p in range(2)]
        for p in range(2):
            expected = np.percentile(ds[name].values[p].astype(np.float64), [1, 99])
            np.testing.assert_allclose(limits[p], expected)
        assert limits[0] != limits[1]
        assert sum(_is_colour_bar(ax) for ax in fig.axes) == 2
    check_conventions(figs, ds)
    _close()
    shared = figures(ds, max_images=2, stretch=stretch)["fwhm"]
    assert shared.axes[0].collections[0].get_clim() == shared.axes[1].collections[0].get_clim()
    assert sum(_is_colour_bar(ax) for ax in shared.axes) == 1
    _close()


def test_every_whisker_panel_has_a_reference_stick_of_the_whiskers_scale(maps):
    from matplotlib.quiver import Quiver, QuiverKey

    _, plain = maps
    ds = read_kernel_map(plain, lazy=("kernel",))
    for scale in ("shared", "per-image"):
        figs = figures(ds, max_images=3, scale=scale)
        axes = [*figs["ellipticity"].axes[:3], *figs["model-ellipticity"].axes[:3], figs["stack"].axes[1]]
        for p, ax in enumerate(axes):
            (key,) = [a for a in ax.get_children() if isinstance(a, QuiverKey)]
            (quiver,) = [a for a in ax.get_children() if isinstance(a, Quiver)]
            value = float(re.fullmatch(r"\|e\| = ([0-9.]+)", key.text.get_text()).group(1))
            assert value in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5), value
            if p < 3:  # the per-tile whiskers: length |e| times the stick scale
                e = ds["ellipticity"].values[p].astype(np.float64).ravel()
                per_e = np.hypot(quiver.U, quiver.V) / e
                np.testing.assert_allclose(per_e, per_e[0], rtol=1e-5)
                assert key.U == pytest.approx(value * per_e[0])
                assert value <= np.nanmax(ds["ellipticity"].values[:3] if scale == "shared" else e)
        _close()


def test_flag_categories_take_the_most_severe_problem_and_leave_information_apart():
    every = np.arange(2 ** len(fl.FLAGS))
    got = flag_categories(every)
    order = [next(f for f in fl.FLAGS if f.name == name) for name in SEVERITY]
    assert {f.name for f in order} == {f.name for f in fl.FLAGS if f.kind == fl.PROBLEM}
    for value, category in zip(every, got):
        problems = [j for j, f in enumerate(order) if value & f.mask]
        expected = 2 + problems[0] if problems else (1 if value & fl.INFORMATIONAL else 0)
        assert category == expected, (fl.describe(value), category)
    assert flag_categories(fl.MASKED | fl.OUTLIERS_CLIPPED) == 1 and flag_categories(0) == 0
    assert flag_categories(fl.MASKED | fl.HIGH_RESIDUAL | fl.NO_DATA) == 2  # no_data, the most severe


def test_table_numbers_keep_4_significant_figures_counts_whole_and_coordinates_as_given():
    def written(values, dtype=None, exact=False):
        series = pd.Series(values, dtype=dtype)
        return [column_format(series, exact=exact)(v) for v in series]

    assert written([2.55012, 2.7, 12.8479, 9.99996]) == ["2.550", "2.700", "12.85", "10.00"]
    assert written([0.04250, 0.0411749, -0.0012, 0.0]) == ["0.04250", "0.04117", "-0.001200", "0"]
    assert written([6.475e-4, -7.2e-7, 1234.56, 3.2e7]) == ["0.0006475", "-7.200e-07", "1235", "3.200e+07"]
    assert written([3.0, np.nan, 12.0]) == ["3", "", "12"]
    assert written([1, 12, 0], "int64") == ["1", "12", "0"]
    assert written([True, False]) == ["yes", ""]
    assert written(["epoch-1", "a<b"]) == ["epoch-1", "a<b"]
    assert written([60000.37, 60001.0, 60002.125], exact=True) == ["60000.370", "60001.000", "60002.125"]
    assert written([1.0134567, 1.2], exact=True) == ["1.0134567", "1.2000000"]


def test_a_store_with_only_informational_flags_has_no_tile_flagged_and_its_page_links_the_job(maps, tmp_path,
                                                                                              capsys):
    """masked and outliers_clipped on every tile: 0 % flagged in the figures, the tables and the page; the
    report written under an fsspec URL (memory://) with its job.yaml, which loads back to the run's job."""
    import fsspec

    from pipeline.cli import main

    _, plain = maps
    copy = tmp_path / "kernels.zarr"
    shutil.copytree(plain, copy)
    flags = zarr.open_array(str(copy / "quality_flag"), mode="r+")
    pattern = np.array([fl.MASKED, fl.OUTLIERS_CLIPPED, fl.MASKED | fl.OUTLIERS_CLIPPED], dtype=np.uint16)
    flags[...] = np.resize(pattern, flags.shape)
    ds = read_kernel_map(copy, lazy=("kernel",))
    assert (ds["quality_flag"].values != 0).all()
    figs = figures(ds, max_images=3)
    for p in range(3):
        assert figs["flags"].axes[p].get_title() == f"epoch-{p}: 0 % flagged"
        np.testing.assert_array_equal(figs["flags"].axes[p].collections[0].get_array(), np.ones((3, 3)))
    np.testing.assert_array_equal(figs["stack"].axes[3].collections[0].get_array(), np.zeros((3, 3)))
    assert (tile_table(ds)["flagged_fraction"] == 0).all()
    _close()

    url = f"memory://report-{tmp_path.name}"
    assert main(["report", str(copy), "--out", url, "--max-images", "2", "--stretch", "log",
                 "--scale", "per-image"]) == 0
    assert f"report: {url}/index.html" in capsys.readouterr().out
    fs = fsspec.filesystem("memory")
    root = url[len("memory://"):]
    index = fs.cat(f"{root}/index.html").decode()
    assert "Tiles flagged: 0 of 27 (0 %) have a problem flag" in index
    assert (pd.read_csv(fs.open(f"{root}/images.csv"))["tiles_flagged"] == 0).all()
    assert (pd.read_csv(fs.open(f"{root}/tiles.csv"))["flagged_fraction"] == 0).all()
    # the job: linked near the top, and the YAML is the run's job
    assert index.index("<a href='job.yaml'>job.yaml</a>") < index.index("<h2>")
    job = yaml.safe_load(fs.cat(f"{root}/job.yaml").decode())
    assert job_from_dict(job) == job_from_dict(job_dict(plain.parent))
    # a caption under every figure; the options said on the page
    figures_on_page = re.findall(r'<figure><img src="([^"]+)\.png"[^>]*><figcaption>([^<]+)</figcaption></figure>',
                                 index)
    assert len(figures_on_page) == index.count("<img ") and len(figures_on_page) >= 15
    assert all(len(text) > 60 for _, text in figures_on_page)
    assert "kernel mosaics: log stretch; a colour scale per image" in index
    # numbers: 4 significant figures, counts as integers
    rows = re.findall(r"<tr>(<td>.*?)</tr>", index.split("<h2>Images</h2>")[1].split("<h2>")[0])
    header = re.findall(r">([a-z0-9_]+)</th>", index.split("<h2>Images</h2>")[1].split("</tr>")[0])
    cells = [re.findall(r"<td>(.*?)</td>", row) for row in rows]
    column = {name: [row[j] for row in cells] for j, name in enumerate(header)}
    assert all(re.fullmatch(r"\d+", v) for v in column["tiles_flagged"] + column["tiles"])
    assert all(re.fullmatch(r"\d\.\d{3}", v) for v in column["fwhm_median"]), column["fwhm_median"]
    fs.rm(root, recursive=True)


def test_an_unknown_stretch_or_scale_is_refused_before_anything_is_written(maps, tmp_path):
    from pipeline.errors import OptionError

    _, plain = maps
    with pytest.raises(OptionError, match="stretch='sqrt' is not a stretch of the kernel mosaics: use one of "
                                          "linear, asinh, log"):
        write_report(plain, tmp_path / "report", stretch="sqrt")
    with pytest.raises(OptionError, match="scale='each' is not a colour scale of the maps: use one of shared, "
                                          "per-image"):
        write_report(plain, tmp_path / "report", scale="each")
    assert not (tmp_path / "report").exists()
