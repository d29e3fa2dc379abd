"""PSF variation across a survey: principal components, trends and outliers, the per-image table, the report."""

from __future__ import annotations

import importlib.util

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from conftest import job_dict, strict_warnings
from hypothesis import given
from hypothesis import strategies as st
from stacks import make_stack

import pipeline
from pipeline import flags as fl
from pipeline.analysis import pca as pca_module
from pipeline.analysis.maps import model_kernels_at, read_kernel_map
from pipeline.analysis.pca import kernel_pca
from pipeline.analysis.report import panel_images
from pipeline.analysis.survey import (
    COLUMNS,
    TREND_QUANTITIES,
    Coordinate,
    find_outliers,
    running_median,
    survey,
    trend_coordinates,
)
from pipeline.errors import InputError, OptionError
from pipeline.io.store import consolidate
from pipeline.job.config import job_from_dict
from pipeline.job.run import run_job

# --------------------------------------------------------------------------- principal components


def _known_stack(n: int = 60, grid: tuple[int, int] = (5, 5), k: int = 7, seed: int = 3):
    """``mean + a_i C1 + b_i C2``: C1, C2 orthogonal and separable (pattern x kernel), a, b uncorrelated."""
    rng = np.random.default_rng(seed)
    g = int(np.prod(grid))
    e1, e2 = rng.standard_normal(k * k), rng.standard_normal(k * k)
    e2 -= (e1 @ e2) / (e1 @ e1) * e1  # orthogonal eigen-kernels: orthogonal components
    p1 = 1.0 + rng.random(g)  # positive patterns: their sign convention is the truth's
    p2 = 0.5 + rng.random(g)
    c1, c2 = np.outer(p1, e1), np.outer(p2, e2)
    a, b = rng.standard_normal(n), rng.standard_normal(n)
    a -= a.mean()
    b -= b.mean()
    b -= (a @ b) / (a @ a) * a
    a *= 3.0 / np.linalg.norm(c1) * np.sqrt(n)  # variances along the components 9 : 1
    b *= 1.0 / np.linalg.norm(c2) * np.sqrt(n)
    mean = rng.random((g, k * k))
    x = mean[None] + a[:, None, None] * c1[None] + b[:, None, None] * c2[None]
    return x.reshape(n, *grid, k, k), (a, b), (c1, c2), (p1, p2), (e1, e2)


@pytest.mark.parametrize("exact", [True, False])
def test_pca_recovers_known_components_fractions_and_amplitudes(exact, monkeypatch):
    if not exact:
        monkeypatch.setattr(pca_module, "EXACT_LIMIT", 10)  # the randomised solver
    x, (a, b), (c1, c2), (p1, p2), (e1, e2) = _known_stack()
    pca = kernel_pca(x, n_components=3)
    n1, n2 = np.linalg.norm(c1), np.linalg.norm(c2)
    for j, (c, norm) in enumerate(((c1, n1), (c2, n2))):
        found = pca.components[j].ravel()
        assert abs(found @ c.ravel() / norm) == pytest.approx(1.0, abs=1e-9)
    # the sign convention: patterns sum positive, eigen-kernels' strongest pixel positive
    for j, (p, e) in enumerate(((p1, e1), (p2, e2))):
        sign = np.sign(e[np.argmax(np.abs(e))])
        np.testing.assert_allclose(pca.eigen_kernels[j].ravel(), sign * e / np.linalg.norm(e), atol=1e-9)
        np.testing.assert_allclose(pca.patterns[j].ravel(), p / np.linalg.norm(p), atol=1e-9)
        assert pca.separability[j] == pytest.approx(1.0, abs=1e-9)
    truth = np.array([(a @ a) * n1**2, (b @ b) * n2**2])
    np.testing.assert_allclose(pca.explained_fraction[:2], truth / truth.sum(), rtol=1e-9)
    assert pca.explained_fraction[2] == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(pca.explained_variance[:2], truth / (len(a) - 1), rtol=1e-9)
    s1 = np.sign(pca.components[0].ravel() @ c1.ravel())
    s2 = np.sign(pca.components[1].ravel() @ c2.ravel())
    np.testing.assert_allclose(pca.amplitudes[:, 0], s1 * a * n1, atol=1e-8 * np.abs(a * n1).max())
    np.testing.assert_allclose(pca.amplitudes[:, 1], s2 * b * n2, atol=1e-8 * np.abs(b * n2).max())
    np.testing.assert_allclose(pca.mean, x.mean(axis=0), atol=1e-12)
    np.testing.assert_allclose(pca.reconstruct(), x, atol=1e-9)


def test_pca_normalisation_removes_the_flux_scale():
    x, *_ = _known_stack()
    x = x + 1.0  # kernels summing to something positive
    scale = np.linspace(0.5, 2.0, len(x))[:, None, None, None, None]
    shapes = kernel_pca(x / x.sum(axis=(-2, -1), keepdims=True), n_components=2)
    scaled = kernel_pca(x * scale, n_components=2, normalize="kernel")
    np.testing.assert_allclose(scaled.explained_fraction, shapes.explained_fraction, rtol=1e-9)
    np.testing.assert_allclose(np.abs(scaled.amplitudes), np.abs(shapes.amplitudes), rtol=1e-7, atol=1e-12)
    per_image = kernel_pca(x * scale, n_components=2, normalize="image")
    plain = kernel_pca(x / x.sum(axis=(-2, -1), keepdims=True).mean(axis=(1, 2), keepdims=True), n_components=2)
    np.testing.assert_allclose(per_image.explained_fraction, plain.explained_fraction, rtol=1e-9)


def test_pca_refuses_what_it_cannot_decompose():
    x, *_ = _known_stack(n=4)
    with pytest.raises(InputError, match=r"kernels of images \[1\] are not finite"):
        kernel_pca(np.where(np.arange(4)[:, None, None, None, None] == 1, np.nan, x))
    with pytest.raises(InputError, match="at least 2 images"):
        kernel_pca(x[:1])
    with pytest.raises(InputError, match=r"\(n_images, \*grid, k, k\)"):
        kernel_pca(x[:, 0, 0, 0])
    with pytest.raises(OptionError, match="normalize must be one of"):
        kernel_pca(x, normalize="flux")
    with pytest.raises(OptionError, match="n_components must be a positive integer"):
        kernel_pca(x, n_components=0)
    assert kernel_pca(x, n_components=10).n_components == 4  # at most one per image


# --------------------------------------------------------------------------- trends and outliers


def test_running_median_follows_a_trend_and_ignores_spikes():
    x = np.arange(200.0)[::-1]  # unsorted input
    values = 0.1 * x
    values[50] += 100.0
    trend = running_median(x, values, window=11)
    np.testing.assert_allclose(trend, 0.1 * x, atol=0.11)  # the window's median, shifted at the ends: close
    assert np.isnan(running_median(np.array([0.0, np.nan]), np.array([1.0, 2.0]))[1])


def _planted_table(n: int = 600, seed: int = 1):
    rng = np.random.default_rng(seed)
    airmass = rng.uniform(1.0, 2.0, n)
    filters = rng.choice(np.array(["g", "r", "i"]), n)
    offset = pd.Series(filters).map({"g": 0.4, "r": 0.0, "i": -0.3}).to_numpy()
    fwhm = 3.0 + 1.5 * (airmass - 1.0) ** 1.5 + offset + rng.normal(0, 0.05, n)
    ellipticity = 0.05 + rng.normal(0, 0.005, n)
    degree = np.full(n, 2)
    flagged = rng.integers(0, 3, n)
    planted = {"fwhm_median": [7, 300], "ellipticity_median": [42], "model_degree": [99], "tiles_flagged": [500]}
    fwhm[7] += 0.6  # 12 sigma, but well inside the spread of all filters together
    fwhm[300] -= 0.5
    ellipticity[42] += 0.05
    degree[99] = -1  # 3 below: more than 5 x 0.5
    degree[100] = 1  # 1 below: not an outlier (a count's resolution)
    flagged[500] = 40
    table = pd.DataFrame({"image": [f"im{i}" for i in range(n)], "fwhm_median": fwhm,
                          "ellipticity_median": ellipticity, "model_degree": degree, "tiles_flagged": flagged})
    coords = [Coordinate("airmass", "numeric", airmass, airmass)]
    groups, codes = np.unique(filters, return_inverse=True)
    coords.append(Coordinate("filter", "categorical", filters, codes.astype(float), tuple(groups)))
    return table, coords, planted


def test_outliers_planted_in_a_trend_are_found_and_nothing_else():
    table, coords, planted = _planted_table()
    outliers, trends = find_outliers(table, coords)
    against_airmass = outliers[outliers["coordinate"] == "airmass"]
    found = {q: sorted(against_airmass.loc[against_airmass["quantity"] == q, "index"]) for q in planted}
    assert found == planted
    assert set(outliers["index"]) == {i for v in planted.values() for i in v}
    # within each filter the trend follows airmass: the bad images stand out by many sigma
    row = outliers[(outliers["index"] == 7) & (outliers["coordinate"] == "airmass")].iloc[0]
    assert row["deviation"] > 8 and row["quantity"] == "fwhm_median"
    assert abs(outliers["deviation"].iloc[0]) >= abs(outliers["deviation"].iloc[-1])  # sorted by |deviation|
    t = trends[("fwhm_median", "airmass")]
    assert t.scale[0] == pytest.approx(0.05, rel=0.2)  # the robust scatter within a filter
    # without the groups the filters' spread hides the two FWHM outliers
    no_groups, _ = find_outliers(table, coords[:1])
    assert 7 not in set(no_groups.loc[no_groups["quantity"] == "fwhm_median", "index"])
    with pytest.raises(OptionError, match="threshold must be a positive number"):
        find_outliers(table, coords, threshold=0)


@given(indices=st.lists(st.integers(0, 29), max_size=12), n=st.integers(1, 30), most=st.integers(0, 12))
def test_panel_images_take_the_outliers_first_then_the_first_images(indices, n, most):
    indices = [i for i in indices if i < n]
    shown = panel_images(pd.DataFrame({"index": indices}), n, most)
    assert shown == sorted(set(shown)) and len(shown) == min(n, most)
    deviant_first = list(dict.fromkeys(indices))
    assert set(deviant_first[:most]) <= set(shown)
    rest = [i for i in shown if i not in deviant_first]
    assert rest == [i for i in range(n) if i not in deviant_first][: len(rest)]


def test_few_images_call_no_outliers():
    table, coords, _ = _planted_table()
    keep = [0, 1, 2, 3]
    few = table.iloc[keep].reset_index(drop=True)
    few.loc[0, "fwhm_median"] = 100.0
    coords = [Coordinate(c.name, c.kind, c.values[keep], c.position[keep], c.groups) for c in coords]
    assert len(find_outliers(few, coords)[0]) == 0


def test_coordinates_numeric_times_groups_and_labels():
    n = 6
    ds = xr.Dataset(coords={
        "image": ("image", [f"exp-{i}" for i in range(n)]),
        "mjd": ("image", np.datetime64("2026-01-01") + np.arange(n) * np.timedelta64(36, "h")),
        "airmass": ("image", np.linspace(1, 2, n)),
        "filter": ("image", ["g", "r"] * 3),
        "ccd": ("image", [f"c{i}" for i in range(n)]),
    })
    coords, skipped = trend_coordinates(ds)
    kinds = {c.name: c.kind for c in coords}
    assert kinds == {"mjd": "time", "airmass": "numeric", "filter": "categorical"}
    mjd = next(c for c in coords if c.name == "mjd")
    np.testing.assert_allclose(mjd.position, 1.5 * np.arange(n))
    assert set(skipped) == {"image", "ccd"} and "labels, not groups" in skipped["ccd"]
    only_labels, _ = trend_coordinates(ds[["image"]].drop_vars(["mjd", "airmass", "filter", "ccd"]))
    assert [c.name for c in only_labels] == ["index"]


# --------------------------------------------------------------------------- a real store


@pytest.fixture(scope="module")
def small_map(tmp_path_factory):
    """A run on 6 images of 3x3 tiles, with airmass, filter and time coordinates added along image."""
    folder = tmp_path_factory.mktemp("survey")
    make_stack(folder / "stack.zarr", n_images=6, noise=0.5)
    run_job(job_from_dict(job_dict(folder)), progress=False)
    path = folder / "kernels.zarr"
    xr.Dataset(coords={"airmass": ("image", np.linspace(1.0, 1.5, 6)),
                       "filter": ("image", np.array(["g", "r"] * 3, dtype=object)),
                       "mjd": ("image", 60000.0 + np.arange(6.0))},
               attrs=xr.open_zarr(path).attrs).to_zarr(path, mode="a", consolidated=False, zarr_format=3)
    consolidate(str(path))
    return path


def test_model_kernels_of_every_image_at_once_equal_kernel_at(small_map):
    km = pipeline.KernelMap.open(small_map)
    y, x = np.array([[40.0, 100.5], [150.0, 31.0]]), np.array([[31.5, 96.0], [160.0, 150.0]])
    every = model_kernels_at(km.ds, y, x)
    assert every.shape == (6, 2, 2, 9, 9)
    for i in range(6):
        np.testing.assert_allclose(every[i], km.kernel_at(i, y, x), rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(model_kernels_at(km.ds, y, x, images=[4, 1]), every[[4, 1]])
    none = km.ds.assign(model_degree=km.ds["model_degree"].where(km.ds["image"] != km.ds["image"][2], -1))
    assert np.isnan(model_kernels_at(none, y, x)[2]).all() and np.isfinite(model_kernels_at(none, y, x)[3]).all()


def test_the_image_table_has_a_row_per_image_and_its_columns(small_map):
    ds = read_kernel_map(small_map, lazy=("kernel",))
    assert not isinstance(ds["kernel"].variable._data, np.ndarray)  # left lazy
    result = survey(ds)
    table = result.table
    assert len(table) == 6 and list(table["image"]) == [f"epoch-{i}" for i in range(6)]
    expected = {"image", "index", "direction", "airmass", "filter", "mjd", "tiles", "tiles_unusable",
                "tiles_flagged", "tiles_model_outlier", "tiles_target_sharper", "tiles_nearly_equal", "fwhm_median",
                "fwhm_iqr", "ellipticity_median", "e1_median", "e2_median",
                "flux_median", "background_median", "residual_median", "snr_median", "model_degree",
                "model_cv_error", "model_residual_median", "model_fwhm_median", "model_fwhm_range",
                "model_ellipticity_median", "pc1", "pc2", "pc3", "pc4", "outlier", "outlier_reasons"}
    assert set(table.columns) == expected
    assert set(expected) - {"airmass", "filter", "mjd", "pc1", "pc2", "pc3", "pc4"} <= set(COLUMNS)
    # the truth's FWHM grows by 0.15 px per image; the table's medians and the model's follow it
    np.testing.assert_allclose(np.diff(table["fwhm_median"]), 0.15, atol=0.05)
    np.testing.assert_allclose(table["model_fwhm_median"], table["fwhm_median"], rtol=0.05)
    np.testing.assert_array_equal(table["tiles"], 9)
    assert result.pca is not None and len(result.pca_images) == 6 and result.without_model == []
    assert result.pca.explained_fraction[0] > 0.5  # one direction (the width) dominates the stack
    assert abs(np.corrcoef(table["pc1"], np.arange(6))[0, 1]) > 0.95
    assert [c.name for c in result.coordinates] == ["airmass", "filter", "mjd"]
    # a stack of one direction: every image forward, no direction coordinate, every image in the components
    assert list(table["direction"]) == ["forward"] * 6 and result.other_direction == []


def test_tiles_flagged_counts_problem_flags_only(small_map):
    """masked and outliers_clipped (pixels left out) are set on most tiles of a good run, nearly_equal where the
    PSFs are alike: not "flagged"; target_sharper (the kernel sharpens) is."""
    ds = read_kernel_map(small_map)
    flags = np.zeros(ds["quality_flag"].shape, dtype=np.int64)
    flags[0] = fl.MASKED | fl.OUTLIERS_CLIPPED                     # every tile of image 0: information only
    flags[1, 0, 0] = fl.MASKED | fl.HIGH_RESIDUAL                  # one problem among information
    flags[2, :2, 0] = fl.MOMENTS_FAILED
    flags[3, 1, 1] = fl.NO_DATA
    flags[4, :, 2] = fl.TARGET_SHARPER | fl.OUTLIERS_CLIPPED      # a problem: the kernel sharpens
    flags[5] = fl.NEARLY_EQUAL                                     # information: PSFs nearly equal
    flags[5, 2, 2] |= fl.TARGET_SHARPER
    ds["quality_flag"] = ds["quality_flag"].copy(data=flags.astype(ds["quality_flag"].dtype))
    table = survey(ds).table
    np.testing.assert_array_equal(table["tiles_flagged"], [0, 1, 2, 1, 3, 1])
    np.testing.assert_array_equal(table["tiles_unusable"], [0, 0, 0, 1, 0, 0])
    np.testing.assert_array_equal(table["tiles_target_sharper"], [0, 0, 0, 0, 3, 1])
    np.testing.assert_array_equal(table["tiles_nearly_equal"], [0, 0, 0, 0, 0, 9])
    assert fl.INFORMATIONAL | fl.PROBLEMS == sum(f.mask for f in fl.FLAGS) and fl.INFORMATIONAL & fl.PROBLEMS == 0
    assert [f.name for f in fl.FLAGS if f.kind == fl.INFORMATION] == ["masked", "outliers_clipped", "nearly_equal"]


def test_images_without_a_model_are_left_out_of_the_components_and_listed(small_map):
    ds = read_kernel_map(small_map)
    ds["model_degree"] = ds["model_degree"].where(np.arange(6) != 3, -1)
    result = survey(ds)
    assert result.without_model == ["epoch-3"]
    np.testing.assert_array_equal(result.pca_images, [0, 1, 2, 4, 5])
    assert np.isnan(result.table.loc[3, "pc1"]) and np.isfinite(result.table.loc[2, "pc1"])
    assert np.isnan(result.model_fwhm[3]).all()
    # a map without the model at all: the measurements still summarised, nothing of a model
    bare = survey(ds.drop_vars([name for name in ds.data_vars if name.startswith("model_")]))
    assert bare.pca is None and len(bare.without_model) == 6 and len(bare.table) == 6
    assert np.isfinite(bare.table["fwhm_median"]).all() and (bare.table["model_degree"] == -1).all()


def test_report_writes_the_survey_figures_tables_and_pages(small_map, tmp_path, capsys):
    from matplotlib.image import imread

    from pipeline.cli import main

    out = tmp_path / "report"
    assert main(["report", str(small_map), "--out", str(out), "--rows", "4", "--max-images", "2"]) == 0
    assert "report:" in capsys.readouterr().out
    index = (out / "index.html").read_text()
    assert "3x3 tiles of 64 px" in index and "store complete" in index
    shown = panel_images(pd.read_csv(out / "outliers.csv"), 6, 2)
    assert len(shown) == 2 and "per-image figures show 2 of 6 images" in index
    for stem in ("trends-airmass", "trends-filter", "trends-mjd", "pca", "pca-amplitudes", "stack", "model-fwhm",
                 "model-ellipticity", "model-residual", f"kernels-{shown[1]}", "fwhm"):
        image = imread(out / f"{stem}.png")
        assert image.shape[0] > 200 and image.shape[1] > 200, stem
        assert f'<img src="{stem}.png"' in index
    assert sorted(int(p.stem.split("-")[1]) for p in out.glob("kernels-*.png")) == shown
    table = pd.read_csv(out / "images.csv")
    assert len(table) == 6 and "pc1" in table and "outlier_reasons" in table
    assert list(pd.read_csv(out / "outliers.csv").columns) == ["image", "index", "quantity", "coordinate", "value",
                                                               "trend", "deviation"]
    assert (out / "images.parquet").exists() == (importlib.util.find_spec("pyarrow") is not None)
    assert "The first 4 of 6 images" in index and 'href="images-001.html"' in index
    page = (out / "images-001.html").read_text()
    assert page.count("<tr>") == 7 and "epoch-5" in page  # header + every image
    assert "epoch-4" not in index.split("<h2>Images</h2>")[1].split("<h2>")[0]  # only the first 4 on the page
    for name in TREND_QUANTITIES:
        assert name in index


def test_report_takes_coordinates_from_a_table(small_map, tmp_path, capsys):
    from pipeline.analysis.survey import with_coordinates
    from pipeline.cli import main

    table = tmp_path / "exposures.csv"
    pd.DataFrame({"image": [f"epoch-{i}" for i in (5, 0, 1, 2, 3)],  # any order, one image missing
                  "seeing": [1.5, 1.0, 1.1, 1.2, 1.3],
                  "night": ["a", "a", "b", "b", "a"],
                  "time": [f"2026-03-0{i + 1}T02:00:00" for i in (5, 0, 1, 2, 3)]}).to_csv(table, index=False)
    ds = with_coordinates(read_kernel_map(small_map, lazy=("kernel",)), table)
    np.testing.assert_array_equal(ds["seeing"].values, [1.0, 1.1, 1.2, 1.3, np.nan, 1.5])
    assert list(ds["night"].values) == ["a", "b", "b", "a", "", "a"]
    assert ds["time"].dtype.kind == "M" and np.isnat(ds["time"].values[4])
    coords, _ = trend_coordinates(ds)
    assert {c.name: c.kind for c in coords} == {"airmass": "numeric", "mjd": "numeric", "seeing": "numeric",
                                                "filter": "categorical", "night": "categorical", "time": "time"}
    out = tmp_path / "report"
    assert main(["report", str(small_map), "--out", str(out), "--coords", str(table), "--max-images", "1"]) == 0
    assert (out / "trends-seeing.png").exists() and (out / "trends-time.png").exists()
    assert "seeing" in pd.read_csv(out / "images.csv")
    pd.DataFrame({"label": ["epoch-0"]}).to_csv(tmp_path / "bad.csv", index=False)
    assert main(["report", str(small_map), "--out", str(out), "--coords", str(tmp_path / "bad.csv")]) == 2
    assert "has no 'image' column" in capsys.readouterr().err
    with pytest.raises(InputError, match="no image of the store"):
        with_coordinates(ds, pd.DataFrame({"image": ["x"], "a": [1.0]}))


def test_report_of_an_incomplete_store_says_so_and_gives_no_warnings(tmp_path, capsys):
    """A run interrupted before two images' diagnostics were written: the report shows what is there, says
    the store is incomplete and how many images have no diagnostics, and leaves them out of the outliers."""
    import zarr

    from pipeline.cli import main

    make_stack(tmp_path / "stack.zarr", n_images=5, noise=0.5)
    run_job(job_from_dict(job_dict(tmp_path)), progress=False)
    path = tmp_path / "kernels.zarr"
    group = zarr.open_group(str(path), mode="r+")
    for name in group.array_keys():  # every per-image variable back to its fill value, as never written
        array = group[name]
        if name != "image" and array.metadata.dimension_names[0] == "image":
            for i in (1, 3):
                array[i] = array.fill_value
    group.attrs["kernelmap_status"] = "incomplete"
    out = tmp_path / "report"
    with strict_warnings():  # no All-NaN slice, Mean of empty slice ...
        assert main(["report", str(path), "--out", str(out)]) == 0
        result = survey(read_kernel_map(path, lazy=("kernel",)))
    captured = capsys.readouterr()
    assert f"report: {out / 'index.html'}" in captured.out
    for text in (captured.err, (out / "index.html").read_text()):
        assert "the store is incomplete" in text
        assert "2 of 5 image(s) have no diagnostics yet (epoch-1, epoch-3)" in text
        assert "the figures and tables show what is there" in text and "output.mode=resume" in text
    assert result.without_diagnostics == ["epoch-1", "epoch-3"]
    assert not {"epoch-1", "epoch-3"} & set(pd.read_csv(out / "outliers.csv")["image"])
    table = pd.read_csv(out / "images.csv")
    assert table["fwhm_median"].isna().tolist() == [False, True, False, True, False]
    for stem in ("fwhm", "ellipticity", "stack", "trends-index", "pca"):
        assert (out / f"{stem}.png").stat().st_size > 1000, stem
    # a finished store says nothing of the kind
    assert survey(read_kernel_map(path).isel(image=[0, 2, 4])).without_diagnostics == []
