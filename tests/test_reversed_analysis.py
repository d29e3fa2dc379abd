"""Analysis of a kernel map whose images go both ways: a forward image, a reversed one (its target the sharper) and
one whose field crosses over (majority forward, its left tile columns flagged target_sharper).  The survey table,
the principal components, the report's figures, page and tables, and KernelMap say each image's direction and
never mix the two; a store written before directions existed is reported as all forward."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import zarr
from stacks import make_direction_stack

from pipeline import flags as fl
from pipeline.analysis.maps import KernelMap, image_directions, model_kernels_at, read_kernel_map
from pipeline.analysis.pca import kernel_pca
from pipeline.analysis.report import (
    _CATEGORY_COLOURS,
    SEVERITY,
    caption,
    figures,
    flag_categories,
    tile_table,
    write_report,
)
from pipeline.analysis.survey import survey
from pipeline.errors import InputError, OptionError
from pipeline.io.store import consolidate
from pipeline.job.config import job_from_dict
from pipeline.job.run import run_job

LABELS = ["blurrier", "sharper", "crossing"]
DIRECTIONS = ["forward", "reverse", "forward"]
WIDTH_LABEL = "FWHM(target)\u00b2 \u2212 FWHM(source)\u00b2 (pixel\u00b2)"


@pytest.fixture(scope="session")
def reversed_map(tmp_path_factory):
    """``(store, truth)``: the kernel map of :func:`make_direction_stack` (3 images, 2x8 tiles of 128 px)."""
    folder = tmp_path_factory.mktemp("reversed")
    truth = make_direction_stack(folder / "stack.zarr")
    job = {"input": {"path": str(folder / "stack.zarr"),
                     "variance": {"target": "target_variance", "source": "source_variance"}},
           "tiles": {"size": 128}, "kernel": {"size": 15}, "output": {"path": str(folder / "out.zarr")},
           "compute": {"scheduler": "threads", "n_workers": 2}}
    run_job(job_from_dict(job), progress=False)
    return folder / "out.zarr", truth


@pytest.fixture(scope="session")
def reversed_figures(reversed_map):
    """The report's figures of the map (matplotlib Figures, let go by pyplot: still whole to inspect), its
    dataset and its survey."""
    import matplotlib.pyplot as plt

    store, _ = reversed_map
    ds = read_kernel_map(store, lazy=("kernel",))
    result = survey(ds)
    figs = figures(ds, result=result)
    plt.close("all")
    return figs, ds, result


def _stored_flags(store) -> np.ndarray:
    """The store's quality_flag read with zarr alone, ``(image, tiles)`` int64."""
    flags = np.asarray(zarr.open_array(str(store / "quality_flag"), mode="r")[...]).astype(np.int64)
    return flags.reshape(len(flags), -1)


def test_the_survey_table_gives_each_images_direction_and_counts_its_flags_as_the_store_does(reversed_map):
    store, truth = reversed_map
    ds = read_kernel_map(store, lazy=("kernel",))
    table = survey(ds).table
    assert list(table["image"]) == LABELS and list(table["direction"]) == DIRECTIONS
    # the truth's majority per image: forward, reverse, forward (the crossing image 5 columns of 8 forward)
    assert [("forward" if d.sum() > 0 else "reverse") for d in truth["direction"]] == DIRECTIONS
    flags = _stored_flags(store)
    np.testing.assert_array_equal(table["tiles_target_sharper"], np.count_nonzero(flags & fl.TARGET_SHARPER, axis=1))
    np.testing.assert_array_equal(table["tiles_nearly_equal"], np.count_nonzero(flags & fl.NEARLY_EQUAL, axis=1))
    np.testing.assert_array_equal(table["tiles_flagged"], np.count_nonzero(flags & fl.PROBLEMS, axis=1))
    # the crossing image's kernels sharpen exactly where the truth goes the other way: its 3 left columns
    sharpens = (flags[2].reshape(2, 8) & fl.TARGET_SHARPER) != 0
    np.testing.assert_array_equal(sharpens, np.broadcast_to(truth["direction"][2] == -1, (2, 8)))
    assert list(table["tiles_target_sharper"]) == [0, 0, 6]
    assert (table["tiles_flagged"] >= table["tiles_target_sharper"]).all()  # target_sharper is a problem


def test_the_principal_components_are_of_the_majority_direction_and_a_mixed_stack_is_refused(reversed_map):
    store, _ = reversed_map
    ds = read_kernel_map(store, lazy=("kernel",))
    result = survey(ds)
    assert result.direction == 1 and result.other_direction == ["sharper"] and result.without_model == []
    np.testing.assert_array_equal(result.pca_images, [0, 2])
    assert np.isnan(result.table.loc[1, "pc1"]) and np.isfinite(result.table.loc[[0, 2], "pc1"]).all()
    # kernel_pca itself refuses both directions, naming the fix; one direction decomposes as without them
    yy, xx = np.meshgrid(result.grid_y, result.grid_x, indexing="ij")
    kernels = model_kernels_at(ds, yy, xx)
    with pytest.raises(InputError, match=r"both directions \(2 forward, 1 reverse: images \[1\]\).*"
                                         r"kernels\[directions == 1\]"):
        kernel_pca(kernels, 2, directions=image_directions(ds))
    alone = kernel_pca(kernels[[0, 2]], 2, normalize="kernel", directions=np.array([1, 1]))
    np.testing.assert_allclose(alone.amplitudes, kernel_pca(kernels[[0, 2]], 2, normalize="kernel").amplitudes)
    np.testing.assert_allclose(result.pca.amplitudes, alone.amplitudes)
    # the other direction asked for: one reverse image is too few for components; the forward ones listed
    reverse = survey(ds, pca_direction="reverse")
    assert reverse.pca is None and reverse.direction == -1 and reverse.other_direction == ["blurrier", "crossing"]
    with pytest.raises(OptionError, match="pca_direction='both'"):
        survey(ds, pca_direction="both")


def test_trends_and_outliers_are_found_within_each_direction(reversed_map):
    store, _ = reversed_map
    ds = read_kernel_map(store, lazy=("kernel",))
    result = survey(ds)
    assert [c.name for c in result.coordinates] == ["index", "direction"]
    assert result.groups is not None and result.groups.by == ("direction",)
    for quantity in ("fwhm_median", "flux_median", "background_median"):
        values = result.table[quantity].to_numpy()
        trend = result.trends[(quantity, "direction")].trend
        # each direction's median: the reverse image alone, the two forward ones together
        np.testing.assert_allclose(trend, [np.median(values[[0, 2]]), values[1], np.median(values[[0, 2]])])
        # against the index, the reverse image is its own stack of one: its trend is its own value
        assert result.trends[(quantity, "index")].trend[1] == values[1]


def test_the_width_difference_map_is_diverging_symmetric_and_titled_with_label_and_direction(reversed_map,
                                                                                            reversed_figures):
    store, _ = reversed_map
    figs, ds, result = reversed_figures
    fig = figs["width-difference"]
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert [ax.get_title() for ax in panels] == ["blurrier (forward)", "sharper (reverse)", "crossing (forward)"]
    (bar,) = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert bar.get_ylabel() == WIDTH_LABEL
    stored = np.asarray(zarr.open_array(str(store / "width_difference"), mode="r")[...], dtype=np.float64)
    yy, xx = np.meshgrid(ds["y"].values, ds["x"].values, indexing="ij")
    flags = _stored_flags(store).reshape(stored.shape)
    for i, ax in enumerate(panels):
        (mesh,) = ax.collections
        np.testing.assert_allclose(np.asarray(mesh.get_array()).reshape(2, 8), stored[i])
        assert mesh.get_cmap().name == "RdBu_r" and mesh.norm.vmax > 0 and mesh.norm.vmin == -mesh.norm.vmax
        assert not ax.yaxis_inverted() and ax.get_ylim()[0] < ax.get_ylim()[1]  # y up (origin lower)
        assert ax.get_xlabel() == "x (pixel)" and ax.get_ylabel() == "y (pixel)"
        crosses = [line for line in ax.get_lines() if line.get_label() == "target_sharper"]
        on = (flags[i] & fl.TARGET_SHARPER) != 0
        assert len(crosses) == int(on.any())
        if on.any():
            np.testing.assert_array_equal(crosses[0].get_xdata(), xx[on])
            np.testing.assert_array_equal(crosses[0].get_ydata(), yy[on])
    # the sign says which is blurrier: red (positive) where forward, blue where reverse
    assert (stored[0] > 0).all() and (stored[1] < 0).all()
    text = caption("width-difference", ds, result)
    assert "symmetric about 0" in text and "target_sharper" in text and "direction" in text


def test_reversed_images_say_so_in_their_kernel_mosaics_panels_and_units(reversed_figures):
    figs, ds, result = reversed_figures
    assert figs["kernels-1"].axes[0].get_title() == "Kernels across the field, sharper (reverse: they blur the target)"
    assert "reverse" not in figs["kernels-0"].axes[0].get_title() + figs["kernels-2"].axes[0].get_title()
    assert figs["kernels-1"].axes[1].get_ylabel().startswith("kernel flux per kernel pixel (ratio source/target)")
    assert figs["kernels-0"].axes[1].get_ylabel().startswith("kernel flux per kernel pixel (ratio target/source)")
    assert "blurs the target into the source" in caption("kernels-1", ds, result)
    for stem in ("fwhm", "flux", "background", "residual", "ellipticity", "model-fwhm"):
        titles = [ax.get_title() for ax in figs[stem].axes[:3]]
        assert titles == ["blurrier", "sharper (reverse)", "crossing"], (stem, titles)
    assert figs["flux"].axes[-1].get_ylabel() == "kernel flux (ratio target/source; source/target where reverse)"
    assert figs["background"].axes[-1].get_ylabel() == ("background offset (ADU, target units; source units where "
                                                        "reverse)")
    assert figs["flags"].axes[1].get_title() == "sharper (reverse): 0 % flagged"
    # the stack-wide figures say which direction they are of
    assert "2 forward images (1 reverse left out)" in figs["pca"]._suptitle.get_text()
    assert "over the 2 forward images (1 reverse left out)" in figs["stack"]._suptitle.get_text()
    assert "sharper" in caption("pca", ds, result) and "trends-direction" in figs
    labels = [ax.get_ylabel() for ax in figs["trends-direction"].axes]
    assert "median flux scale (ratio target/source; source/target where reverse)" in labels
    assert "median background (target units, ADU; source units where reverse)" in labels


def test_target_sharper_is_a_problem_coloured_apart_and_nearly_equal_is_information(reversed_map, reversed_figures):
    store, _ = reversed_map
    figs, _, _ = reversed_figures
    assert SEVERITY.index("target_sharper") == SEVERITY.index("non_positive_flux") + 1
    assert SEVERITY.index("target_sharper") < SEVERITY.index("kernel_truncated")
    category = 2 + SEVERITY.index("target_sharper")
    assert flag_categories(fl.TARGET_SHARPER | fl.HIGH_RESIDUAL | fl.MOMENTS_FAILED) == category
    assert flag_categories(fl.NEARLY_EQUAL) == 1 and flag_categories(fl.NEARLY_EQUAL | fl.MASKED) == 1
    n_categories = 2 + len(SEVERITY)
    assert len(set(_CATEGORY_COLOURS[:n_categories])) == n_categories  # every category its own colour
    legend = figs["flags"].legends[0]
    names = [t.get_text() for t in legend.get_texts()]
    assert names[category] == "target_sharper" and "nearly_equal" in names[1] and names[1].startswith(
        "information only")
    # the crossing image's flag map: its sharpening tiles in the target_sharper colour, as the store says
    flags = _stored_flags(store)[2]
    drawn = np.asarray(figs["flags"].axes[2].collections[0].get_array()).ravel()
    np.testing.assert_array_equal(drawn == category, (flags & fl.TARGET_SHARPER) != 0)


def test_the_report_page_and_tables_carry_the_directions(reversed_map, tmp_path):
    store, _ = reversed_map
    index = write_report(store, tmp_path / "report", max_images=3)
    page = index.read_text()
    header = re.findall(r">([a-z0-9_]+)</th>", page.split("<h2>Images</h2>")[1].split("</tr>")[0])
    rows = re.findall(r"<tr>(<td>.*?)</tr>", page.split("<h2>Images</h2>")[1].split("<h2>")[0])
    cells = [re.findall(r"<td>(.*?)</td>", row) for row in rows]
    assert [row[header.index("direction")] for row in cells] == DIRECTIONS
    assert list(pd.read_csv(tmp_path / "report" / "images.csv")["direction"]) == DIRECTIONS
    assert "Directions: 2 forward image(s)" in page and "1 reverse" in page
    assert re.search(r"Tiles target_sharper \(the kernel would sharpen; a problem\): 6; nearly_equal", page)
    assert "left out of the principal components, which are of the forward images" in page
    assert re.search(r'<figure><img src="width-difference\.png"[^>]*><figcaption>[^<]{100,}</figcaption>', page)
    assert (tmp_path / "report" / "width-difference.png").stat().st_size > 0
    # tiles.csv: the measurements' medians over the forward images, the flags over all
    tiles = pd.read_csv(tmp_path / "report" / "tiles.csv")
    ds = read_kernel_map(store, lazy=("kernel",))
    assert (tiles["medians_direction"] == "forward").all() and (tiles["medians_images"] == 2).all()
    np.testing.assert_allclose(tiles["flux_median"],
                               np.median(ds["flux"].values[[0, 2]].astype(np.float64), axis=0).ravel(), rtol=1e-12)
    flags = _stored_flags(store)
    np.testing.assert_allclose(tiles["target_sharper_fraction"], ((flags & fl.TARGET_SHARPER) != 0).mean(axis=0))
    assert tile_table(ds)["width_difference_median"].notna().all()


def test_kernel_map_gives_each_images_direction_and_its_kernels_in_that_direction(reversed_map):
    store, truth = reversed_map
    km = KernelMap.open(store)
    np.testing.assert_array_equal(km.directions, [1, -1, 1])
    assert [km.direction(label) for label in LABELS] == [1, -1, 1] and km.direction(-2) == -1
    assert km.ds.kernelmap.direction("sharper") == -1
    # kernel_at of the reverse image is the kernel blurring its target into its source (the truth that way)
    centres = np.arange(8) * 128 + 63.5
    for i in (0, 1):
        got = km.kernel_at(LABELS[i], 127.5, centres)
        want = truth["kernels"][i]
        assert (truth["direction"][i] == km.directions[i]).all()
        error = np.linalg.norm(got - want, axis=(-2, -1)) / np.linalg.norm(want, axis=(-2, -1))
        assert error.max() < 0.05, error
    # every image's model kernels come with their directions; one direction asked for: its images only
    model = km.model_kernels()
    np.testing.assert_array_equal(model["direction"].values, [1, -1, 1])
    reverse = km.model_kernels("reverse")
    assert list(reverse["image"].values) == ["sharper"]
    np.testing.assert_array_equal(reverse.values[0], model.values[1])
    ds = read_kernel_map(store)
    with pytest.raises(InputError, match=r"direction='forward', but 1 of the images asked for are not forward "
                                         r"\(sharper\).*image_directions\(ds\) == 1"):
        model_kernels_at(ds, 100.0, 100.0, direction="forward")
    np.testing.assert_array_equal(model_kernels_at(ds, 100.0, 100.0, [0, 2], direction="forward"),
                                  model_kernels_at(ds, 100.0, 100.0, [0, 2]))
    with pytest.raises(OptionError, match="direction='both' is not known"):
        km.model_kernels("both")


def test_a_store_written_before_directions_is_reported_as_all_forward_without_a_width_map(reversed_map, tmp_path):
    store, _ = reversed_map
    old = tmp_path / "old.zarr"
    shutil.copytree(store, old)
    for name in ("direction", "width_difference", "width_difference_error"):
        shutil.rmtree(old / name)
    consolidate(str(old))
    ds = read_kernel_map(old, lazy=("kernel",))
    assert "direction" not in ds and "width_difference" not in ds
    np.testing.assert_array_equal(image_directions(ds), [1, 1, 1])
    np.testing.assert_array_equal(KernelMap.open(old).directions, [1, 1, 1])
    result = survey(ds)
    assert list(result.table["direction"]) == ["forward"] * 3 and result.other_direction == []
    np.testing.assert_array_equal(result.pca_images, [0, 1, 2])
    assert [c.name for c in result.coordinates] == ["index"]
    index = write_report(old, tmp_path / "report", max_images=3)
    assert not (tmp_path / "report" / "width-difference.png").exists()
    assert (tmp_path / "report" / "flags.png").exists()
    page = index.read_text()
    assert "Directions: 3 forward image(s)" in page and "width-difference" not in page
    assert "width_difference_median" not in pd.read_csv(tmp_path / "report" / "tiles.csv")
    xr.testing.assert_equal(xr.open_zarr(old)["kernel"], xr.open_zarr(store)["kernel"])  # the copy is whole


def test_every_figure_of_a_mixed_stack_is_y_up_and_names_its_units(reversed_figures):
    """As every report figure (tests/test_report.py): y up, a unit in parentheses on every axis and colour-bar
    label, never "(1)"; no title naming an image by its position."""
    unit = re.compile(r"\(([^()]+)\)")
    figs, _, _ = reversed_figures
    for stem, fig in figs.items():
        for ax in fig.axes:
            if not ax.get_visible():
                continue
            assert not ax.yaxis_inverted(), (stem, ax.get_title())
            assert all(image.origin == "lower" for image in ax.get_images()), stem
            names = [name for name in (ax.get_xlabel(), ax.get_ylabel()) if name]
            if ax.get_label() == "<colorbar>":
                assert names, (stem, "a colour bar without a label")
            for name in names:
                units = unit.findall(name)
                assert units and all(u.strip() not in ("", "1") for u in units), (stem, name)
            assert not re.search(r"\bimage \d", ax.get_title()), (stem, ax.get_title())
