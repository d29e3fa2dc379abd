"""Kernel maps as written by a run: the stored kernel-field model, KernelMap and ds.kernelmap."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
import xarray as xr
from conftest import strict_warnings

import pipeline
from pipeline import flags as fl
from pipeline.core.field import fit_tiles, tile_weights
from pipeline.errors import InputError
from pipeline.job.run import run_job
from pipeline.sim.demo import demo_job, model_against_truth, write_demo_stack


@pytest.fixture(scope="module")
def demo_map(tmp_path_factory):
    """The demo job (3 epochs of 768x768, 6x6 tiles of 128) run in threads."""
    folder = tmp_path_factory.mktemp("demo")
    job = demo_job(folder, ["compute.scheduler=threads"])
    truth = write_demo_stack(job.input.path, n_images=3, size=768, kernel_size=job.kernel.size)
    run_job(job, progress=False)
    return pipeline.KernelMap.open(job.output.path), truth


def test_the_model_is_closer_to_the_truth_than_the_tiles(demo_map):
    km, truth = demo_map
    tiles, model = model_against_truth(km.ds, truth)
    assert np.all(model < 0.8 * tiles), (tiles, model)
    assert np.all(km.ds["model_degree"].values >= 1)
    cv = km.ds["model_cv_error"].values
    assert np.all(np.isfinite(cv)) and np.all(cv < 0.2)


@pytest.fixture(scope="module")
def demo_map_of_kernels(tmp_path_factory):
    """The demo job with the model fitted to the tile kernels (``model.method: kernels``)."""
    folder = tmp_path_factory.mktemp("demo-kernels")
    job = demo_job(folder, ["compute.scheduler=threads", "model.method=kernels"])
    truth = write_demo_stack(job.input.path, n_images=3, size=768, kernel_size=job.kernel.size)
    run_job(job, progress=False)
    return pipeline.KernelMap.open(job.output.path), truth


def test_the_demo_runs_the_joint_model_closer_to_the_truth_than_the_model_of_the_kernels(demo_map,
                                                                                         demo_map_of_kernels):
    joint, truth = demo_map
    of_kernels, _ = demo_map_of_kernels
    assert joint.ds.attrs["kernelmap_config"].count("method: joint") == 1
    _, joint_error = model_against_truth(joint.ds, truth)
    _, kernels_error = model_against_truth(of_kernels.ds, truth)
    assert np.median(joint_error) < np.median(kernels_error), (joint_error, kernels_error)


def test_stored_model_is_the_fit_of_the_stored_tiles(demo_map_of_kernels):
    km, _ = demo_map_of_kernels
    ds = km.ds
    for i in range(ds.sizes["image"]):
        kernels = ds["kernel"].values[i].astype(np.float64)
        usable = np.all(np.isfinite(kernels), axis=(-2, -1)) & ((ds["quality_flag"].values[i] & fl.NOT_MODELLED) == 0)
        field, residual, rejected = fit_tiles(ds["y"].values, ds["x"].values, kernels, usable,
                                              tile_weights(ds["snr"].values[i], ds["flux"].values[i]))
        stored = km.field(ds["image"].values[i])
        assert stored.degree == field.degree
        # the run weighted the tiles with snr and flux before they were stored as float32
        np.testing.assert_allclose(stored.coefficients, field.coefficients, rtol=1e-4, atol=1e-9)
        np.testing.assert_allclose(ds["model_residual"].values[i], residual, rtol=1e-3)
        np.testing.assert_array_equal((ds["quality_flag"].values[i] & fl.MODEL_OUTLIER) != 0, rejected)


def test_kernel_at_through_the_class_and_the_accessor(demo_map):
    km, truth = demo_map
    ds = km.ds
    label = ds["image"].values[1]
    y, x = np.array([50.0, 400.25, 700.0]), np.array([700.0, 10.0, 383.5])
    kernels = km.kernel_at(label, y, x)
    assert kernels.shape == (3, 15, 15)
    np.testing.assert_array_equal(ds.kernelmap.kernel_at(label, y=y, x=x), kernels)
    np.testing.assert_array_equal(ds.kernelmap.kernel_at(image=label, y=y, x=x), kernels)
    np.testing.assert_array_equal(km.kernel_at(1, y, x), kernels)  # a position works too
    # at a tile centre the model is the smooth version of that tile
    centre = km.kernel_at(label, float(ds["y"][2]), float(ds["x"][3]))
    tile = ds["kernel"].values[1, 2, 3]
    assert np.linalg.norm(centre - tile) / np.linalg.norm(centre) == pytest.approx(
        float(ds["model_residual"].values[1, 2, 3]), rel=1e-5)
    true = truth.kernel(1, 700.0, 383.5)  # between tile centres
    assert np.linalg.norm(kernels[2] - true) / np.linalg.norm(true) < 0.1
    with pytest.raises(InputError, match="neither a label"):
        km.kernel_at("no-such-epoch", 1.0, 1.0)


def test_the_class_and_the_accessor_take_the_same_arguments_and_raise_the_same_errors(demo_map):
    import inspect

    km, _ = demo_map
    ds = km.ds
    for verb in ("kernel_at", "model_kernels", "fwhm_map", "ellipticity_map"):
        assert (inspect.signature(getattr(pipeline.KernelMap, verb)).parameters.keys()
                == inspect.signature(getattr(type(ds.kernelmap), verb)).parameters.keys()), verb
    # the README's form, both ways
    np.testing.assert_array_equal(ds.kernelmap.kernel_at("epoch-1", y=300.0, x=250.5),
                                  km.kernel_at("epoch-1", y=300.0, x=250.5))
    for image in ("no-such-epoch", 3, -4):
        for reader in (km, ds.kernelmap):
            with pytest.raises(InputError, match=f"image {image!r} is neither a label"):
                reader.kernel_at(image, 1.0, 1.0)
    bare = ds[["kernel", "fwhm", "quality_flag"]]
    for make in (pipeline.KernelMap, lambda d: d.kernelmap.fwhm_map(model=True)):
        with pytest.raises(InputError, match="not a kernelmap kernel map: no model_coefficient, model_degree"):
            make(bare)


def test_one_reader_of_stores_for_the_class_report_and_compare(demo_map, tmp_path):
    from pipeline.analysis.maps import read_kernel_map

    km, _ = demo_map
    loaded = read_kernel_map(km.path)
    xr.testing.assert_identical(loaded, km.ds.load())
    for path in (tmp_path / "missing.zarr", tmp_path / "not-a-store.txt"):
        if path.suffix == ".txt":
            path.write_text("not a store")
        for opener in (pipeline.KernelMap.open, read_kernel_map):
            with pytest.raises(InputError, match="cannot open .* as a Zarr store"):
                opener(path)
    xr.Dataset({"kernel": (("image", "y", "x", "ky", "kx"), np.zeros((1, 1, 1, 3, 3)))}).to_zarr(
        tmp_path / "no-model.zarr", zarr_format=3, consolidated=False)
    for opener in (pipeline.KernelMap.open, read_kernel_map):
        with pytest.raises(InputError, match=r"no-model.zarr is not a kernelmap kernel map \(no "):
            opener(tmp_path / "no-model.zarr")


def test_import_pipeline_registers_the_accessor_without_importing_xarray():
    heavy = ("xarray", "dask", "zarr", "yaml", "pydantic")
    code = (
        "import sys\n"
        "import pipeline\n"
        f"print(sorted(m for m in {heavy!r} if m in sys.modules))\n"
        "import importlib.util; assert importlib.util.find_spec('xarray') is not None  # a look-up only\n"
        "import numpy as np, xarray as xr\n"
        "assert 'pipeline.analysis.maps' in sys.modules\n"
        "assert not any(type(f).__module__ == 'pipeline.analysis.hook' for f in sys.meta_path)\n"
        "assert xr.__spec__.loader is xr.__loader__ and type(xr.__loader__).__module__ != 'pipeline.analysis.hook'\n"
        "ds = xr.Dataset({'kernel': (('image', 'y', 'x', 'ky', 'kx'), np.zeros((1, 1, 1, 3, 3)))})\n"
        "try:\n"
        "    ds.kernelmap.kernel_at(0, y=0.0, x=0.0)\n"
        "except pipeline.InputError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "[]", "not a kernelmap kernel map: no model_coefficient, model_degree in the dataset"]
    # xarray first, then pipeline: registered at once
    code = "import xarray, pipeline; print(hasattr(xarray.Dataset, 'kernelmap'))"
    out = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "True", out.stderr


def test_fwhm_maps_measured_and_modelled(demo_map):
    km, truth = demo_map
    ds = km.ds
    measured = ds.kernelmap.fwhm_map()
    modelled = ds.kernelmap.fwhm_map(model=True)
    assert modelled.dims == measured.dims == ("image", "y", "x")
    yy, xx = np.meshgrid(ds["y"].values, ds["x"].values, indexing="ij")
    true = np.stack([truth.fwhm(i, yy, xx) for i in range(ds.sizes["image"])])
    assert np.median(np.abs(modelled.values / true - 1)) <= np.median(np.abs(measured.values / true - 1)) + 0.01
    assert isinstance(ds.kernelmap.ellipticity_map(model=True), xr.DataArray)


def test_a_dataset_without_a_model_is_refused(tmp_path):
    ds = xr.Dataset({"kernel": (("image", "y", "x", "ky", "kx"), np.zeros((1, 1, 1, 3, 3)))})
    with pytest.raises(InputError, match="not a kernelmap kernel map: no model_coefficient, model_degree"):
        ds.kernelmap.kernel_at(0, y=0.0, x=0.0)


# --------------------------------------------------------------------------- report and compare


def test_report_figures_carry_their_panels_and_titles(demo_map):
    from pipeline.analysis.report import FIGURES, figures

    km, _ = demo_map
    ds = km.ds.load()
    figs = figures(ds)
    assert set(figs) == {"kernels-0", "kernels-1", "kernels-2", "trends-index", *FIGURES}
    labels = [str(v) for v in ds["image"].values]  # the panels are titled with the image labels
    for stem in ("fwhm", "flux", "background", "residual", "ellipticity", "flags"):
        fig = figs[stem]
        assert fig._suptitle.get_text().startswith(FIGURES[stem])
        titles = [ax.get_title().split(":")[0] for ax in fig.axes]
        assert all(label in titles for label in labels), (stem, titles)
    colorbar_labels = [ax.get_ylabel() for ax in figs["fwhm"].axes]
    assert "kernel FWHM (pixel)" in colorbar_labels
    assert figs["kernels-1"].axes[0].get_title() == f"Kernels across the field, {labels[1]}"
    from pipeline.analysis.survey import TREND_QUANTITIES

    assert [ax.get_ylabel() for ax in figs["trends-index"].axes] == [q.label for q in TREND_QUANTITIES.values()]
    import matplotlib.pyplot as plt

    plt.close("all")


def test_report_command_writes_pngs_and_an_index(demo_map, tmp_path, capsys):
    from matplotlib.image import imread

    from pipeline.cli import main

    km, _ = demo_map
    out = tmp_path / "report"
    assert main(["report", km.path, "--out", str(out)]) == 0
    assert f"report: {out / 'index.html'}" in capsys.readouterr().out
    index = (out / "index.html").read_text()
    for stem in ("fwhm", "ellipticity", "flux", "background", "residual", "flags", "trends-index", "kernels-0"):
        image = imread(out / f"{stem}.png")
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200
        assert f'<img src="{stem}.png"' in index
    assert index.count("<tr>") == 1 + km.ds.sizes["image"]  # header + one row per image
    assert "epoch-2" in index and "model_cv_error" in index


def test_compare_gives_per_tile_differences(demo_map, tmp_path):
    from pipeline.analysis.compare import compare_maps

    km, _ = demo_map
    a = km.ds.load()
    same = compare_maps(a, a)
    assert float(np.nanmax(np.abs(same["fwhm"].values))) == 0.0
    assert float(np.nanmax(same["kernel_difference"].values)) == 0.0
    b = a.copy()
    b["fwhm"] = a["fwhm"] + 0.25
    b["kernel"] = a["kernel"] * 1.1
    diff = compare_maps(a, b)
    np.testing.assert_allclose(diff["fwhm"].values, 0.25, rtol=1e-6)
    np.testing.assert_allclose(diff["kernel_difference"].values, 0.1, rtol=1e-5)
    single = compare_maps(a, b.isel(image=[1]))  # every image of A against the one of B
    np.testing.assert_allclose(single["flux"].values[2], a["flux"].values[1] - a["flux"].values[2],
                               rtol=1e-6, atol=1e-7)
    from pipeline.errors import InputError

    with pytest.raises(InputError, match="different tile grids along x"):
        compare_maps(a, b.isel(x=slice(0, 3)))


def test_compare_command(demo_map, tmp_path, capsys):
    from pipeline.cli import main

    km, _ = demo_map
    path = km.path
    out = tmp_path / "cmp"
    assert main(["compare", path, path, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "fwhm: median +0" in text and (out / "compare.png").stat().st_size > 1000
    assert xr.open_zarr(out / "compare.zarr")["fwhm"].dims == ("image", "y", "x")
    assert main(["compare", path, path, "--out", str(out)]) == 2  # never overwrites
    from pipeline.analysis.compare import compare_figure, compare_maps

    fig = compare_figure(compare_maps(km.ds, km.ds), image=0)
    label = str(km.ds["image"].values[0])
    assert fig._suptitle.get_text() == f"B - A per tile, {label}"
    bars = [ax.get_ylabel() for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(bars) == 4 and all(re.search(r"\([a-z][^)]*\)$", text) for text in bars), bars
    assert not any("(1)" in text for text in bars)
    assert not any(ax.yaxis_inverted() for ax in fig.axes)
    assert "already exists" in capsys.readouterr().err


def test_the_flag_table_round_trips_through_cf_attributes(demo_map):
    from pipeline.analysis.maps import decode_flags

    km, _ = demo_map
    ds = km.ds
    decoded = ds.kernelmap.flags()
    assert list(decoded) == [f.name for f in fl.FLAGS]
    values = ds["quality_flag"].values
    for flag in fl.FLAGS:
        np.testing.assert_array_equal(decoded[flag.name].values, (values & flag.mask) != 0)
    # every combination of bits, through attributes written and read back from a store
    every = xr.DataArray(np.arange(2 ** len(fl.FLAGS), dtype=np.uint16), dims="t", name="quality_flag",
                         attrs={k: v for k, v in fl.cf_flag_attrs().items() if k != "flag_descriptions"})
    store = km.path + ".flags.zarr"
    every.to_dataset().to_zarr(store, mode="w", zarr_format=3, consolidated=False)
    back = xr.open_zarr(store, consolidated=False)["quality_flag"].load()
    table = decode_flags(back)
    for value in range(2 ** len(fl.FLAGS)):
        assert [name for name in table if bool(table[name].values[value])] == fl.describe(value)


def test_integer_image_labels_are_labels_first_and_positions_inside(demo_map):
    km, _ = demo_map
    relabelled = pipeline.KernelMap(km.ds.assign_coords(image=[1, 2, 3]))
    y, x = float(km.ds["y"][1]), float(km.ds["x"][4])
    for position, label in enumerate([1, 2, 3]):
        expected = km.kernel_at(position, y, x)
        np.testing.assert_array_equal(relabelled.kernel_at(label, y, x), expected)
        np.testing.assert_allclose(relabelled.model_kernels().values[position, 1, 4], expected, rtol=1e-12, atol=1e-15)


def test_report_names_what_is_wrong_with_its_store(tmp_path):
    from pipeline.analysis.report import write_report
    from pipeline.errors import InputError

    with pytest.raises(InputError, match="cannot open .* as a Zarr store"):
        write_report(tmp_path / "missing.zarr", tmp_path / "out")
    xr.Dataset({"a": ("x", np.arange(3.0))}).to_zarr(tmp_path / "other.zarr", zarr_format=3, consolidated=False)
    with pytest.raises(InputError, match="not a kernelmap kernel map"):
        write_report(tmp_path / "other.zarr", tmp_path / "out")
    with pytest.raises(InputError, match="is a URL: give --out"):
        write_report("s3://bucket/kernels.zarr")
    assert not (tmp_path / "out").exists()


def _nan_copy(ds: xr.Dataset, names) -> xr.Dataset:
    """``ds`` with the floating-point variables ``names`` (along image) NaN everywhere."""
    out = ds.copy()
    for name in names:
        out[name] = xr.full_like(out[name], np.nan)
    return out


def test_compare_refuses_maps_without_a_finite_tile_in_common(demo_map, tmp_path, capsys):
    from pipeline.analysis.compare import compare_maps
    from pipeline.cli import main

    km, _ = demo_map
    a = km.ds.load()
    floats = [name for name in a.data_vars if a[name].dims[:1] == ("image",) and a[name].dtype.kind == "f"]
    empty = _nan_copy(a, floats)  # as a run stopped before any diagnostics were written
    empty.attrs["kernelmap_status"] = "incomplete"
    path = tmp_path / "empty.zarr"
    empty.drop_encoding().to_zarr(path, zarr_format=3, consolidated=False)
    out = tmp_path / "cmp"
    with strict_warnings():  # no All-NaN slice, Mean of empty slice ...
        assert main(["compare", km.path, str(path), "--out", str(out)]) == 2
        with pytest.raises(InputError, match="no tile where both are finite") as info:
            compare_maps(empty, a)
    err = capsys.readouterr().err
    assert f"the kernel maps {km.path} and {path} have no tile where both are finite" in err
    assert f"0 in {path}, whose store is incomplete" in err and "output.mode=resume" in err
    assert "+nan" not in err and not out.exists()  # nothing written
    assert "0 finite tile(s) in A, whose store is incomplete" in str(info.value)


def test_compare_says_which_quantities_have_no_common_finite_tiles(demo_map, tmp_path, capsys):
    from pipeline.cli import main

    km, _ = demo_map
    path = tmp_path / "no-flux.zarr"
    _nan_copy(km.ds.load(), ["flux"]).drop_encoding().to_zarr(path, zarr_format=3, consolidated=False)
    out = tmp_path / "cmp"
    with strict_warnings():
        assert main(["compare", km.path, str(path), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "flux: no common finite tiles" in text and "nan" not in text
    assert "fwhm: median +0, max |.| 0" in text and (out / "compare.png").exists()
