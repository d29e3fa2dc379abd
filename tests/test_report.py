"""The report of a kernel map made from a stack with a reference WCS: maps in RA/Dec, a compass, tiles on the sky."""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import zarr
from conftest import job_dict
from stacks import make_stack

fits = pytest.importorskip("astropy.io.fits")
pytest.importorskip("astropy.visualization.wcsaxes")

from pipeline.analysis.maps import read_kernel_map  # noqa: E402
from pipeline.analysis.report import figures, tile_table, write_report  # noqa: E402
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
            assert (axes[p].get_xlabel(), axes[p].get_ylabel()) == ("RA", "Dec"), (stem, p)
            assert {t.get_text() for t in axes[p].texts} >= {"N", "E"}, (stem, p)
    assert figs["flags"].axes[3].get_xlabel() == "tiles"  # the bar chart stays a bar chart
    assert figs["pca"].axes[4].get_xlabel() == "component"
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
    flagged = (ds["quality_flag"].values != 0).mean(axis=0).ravel()
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
