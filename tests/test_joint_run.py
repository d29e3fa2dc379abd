"""Runs whose kernel-field model is the joint fit (``model.method: joint``)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import xarray as xr
import zarr
from conftest import job_dict
from stacks import make_stack

import pipeline
from pipeline import flags as fl
from pipeline.core.estimate import estimate_kernels
from pipeline.core.field import tile_weights
from pipeline.core.joint import (
    RUN_VARIATION,
    RUN_VARIATION_TILES,
    core_radius_for,
    fit_joint_tiles,
    pack_statistics,
    variation_basis,
    variation_for,
)
from pipeline.job.config import job_from_dict
from pipeline.job.run import run_job

TILE, K = 64, 9


@pytest.fixture(scope="module")
def joint_run(tmp_path_factory):
    """Two noisy images of 3x3 tiles, one tile a block, the joint model; and the stack's truth."""
    folder = tmp_path_factory.mktemp("joint")
    truth = make_stack(folder / "stack.zarr", n_images=2, noise=0.5)
    data = job_dict(folder, model={"method": "joint"}, compute={"block_tiles": 1})
    summary = run_job(job_from_dict(data), progress=False)
    return folder, data, truth, summary


def _open(path) -> xr.Dataset:
    return xr.open_zarr(path).load()


def test_the_run_stores_the_field_the_library_fits_to_the_same_tiles(joint_run):
    folder, _, _, summary = joint_run
    assert summary.tiles_computed == 18
    ds = _open(folder / "kernels.zarr")
    stack = xr.open_zarr(folder / "stack.zarr", consolidated=False)
    source = stack["source"].values.astype(np.float64)
    for image in range(2):
        target = stack["target"].values[image].astype(np.float64)
        cut = [(slice(ty * TILE, (ty + 1) * TILE), slice(tx * TILE, (tx + 1) * TILE))
               for ty in range(3) for tx in range(3)]
        res = estimate_kernels(np.stack([source[c] for c in cut]), np.stack([target[c] for c in cut]),
                               kernel_size=K, statistics=True)
        kernels = ds["kernel"].values[image]  # as the run gave them to its model (output dtype)
        usable = fl.modelled(kernels, ds["quality_flag"].values[image].astype(np.int64))
        weights = tile_weights(ds["snr"].values[image], ds["flux"].values[image])
        fwhm = float(np.median(ds["fwhm"].values[image][usable]))
        field, residual, _ = fit_joint_tiles(
            ds["y"].values, ds["x"].values, kernels, usable, weights, pack_statistics(res.statistics),
            res.n_valid.reshape(3, 3), max_degree=3, core_radius=core_radius_for(fwhm, K))
        assert int(ds["model_degree"].values[image]) == field.degree
        stored = ds["model_coefficient"].values[image][: len(field.coefficients)]
        np.testing.assert_allclose(stored, field.coefficients, rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(ds["model_residual"].values[image], residual, rtol=1e-5)


def test_the_grams_in_single_precision_move_the_field_by_far_less_than_its_error(joint_run):
    """A run keeps the tiles' Grams in single precision (``pack_statistics``) from its blocks to the fit."""
    folder, _, truth, _ = joint_run
    ds = _open(folder / "kernels.zarr")
    stack = xr.open_zarr(folder / "stack.zarr", consolidated=False)
    source = stack["source"].values.astype(np.float64)
    target = stack["target"].values[0].astype(np.float64)
    cut = [(slice(ty * TILE, (ty + 1) * TILE), slice(tx * TILE, (tx + 1) * TILE)) for ty in range(3) for tx in range(3)]
    res = estimate_kernels(np.stack([source[c] for c in cut]), np.stack([target[c] for c in cut]),
                           kernel_size=K, statistics=True)
    kernels = ds["kernel"].values[0]
    usable = fl.modelled(kernels, ds["quality_flag"].values[0].astype(np.int64))
    weights = tile_weights(ds["snr"].values[0], ds["flux"].values[0])
    fields = [fit_joint_tiles(ds["y"].values, ds["x"].values, kernels, usable, weights, statistics,
                              res.n_valid.reshape(3, 3), max_degree=3)[0]
              for statistics in (res.statistics, pack_statistics(res.statistics))]
    assert fields[0].degree == fields[1].degree
    centres = ds["y"].values[:, None], ds["x"].values[None, :]
    double, single = (f.kernel_at(*centres) for f in fields)
    error = np.sqrt(((double - truth["kernels"][0]) ** 2).sum(axis=(-2, -1)))
    moved = np.sqrt(((single - double) ** 2).sum(axis=(-2, -1)))
    assert moved.max() > 0 and moved.max() < 1e-3 * error.min()


def test_a_run_of_64_tiles_fits_the_variation_in_a_basis_of_its_tiles_kernels_as_the_library_does(tmp_path):
    n = 8  # 8x8 tiles: at least RUN_VARIATION_TILES, enough for a field that varies
    make_stack(tmp_path / "stack.zarr", n_images=1, size=n * TILE, noise=0.5)
    run_job(job_from_dict(job_dict(tmp_path, model={"method": "joint"})), progress=False)
    ds = _open(tmp_path / "kernels.zarr")
    kernels = ds["kernel"].values[0]
    usable = fl.modelled(kernels, ds["quality_flag"].values[0].astype(np.int64))
    assert usable.sum() >= RUN_VARIATION_TILES and variation_for(int(usable.sum())) == RUN_VARIATION
    degree = int(ds["model_degree"].values[0])
    assert degree >= 1  # the field varies: variation terms to look at
    coef = ds["model_coefficient"].values[0][1 : (degree + 1) * (degree + 2) // 2].reshape(-1, K * K)
    basis = variation_basis(kernels.reshape(-1, K * K)[usable.ravel()].astype(np.float64), RUN_VARIATION)
    np.testing.assert_allclose(coef - coef @ basis @ basis.T, 0, atol=1e-9 * np.abs(coef).max())
    source = xr.open_zarr(tmp_path / "stack.zarr", consolidated=False)["source"].values.astype(np.float64)
    target = xr.open_zarr(tmp_path / "stack.zarr", consolidated=False)["target"].values[0].astype(np.float64)
    cut = [(slice(ty * TILE, (ty + 1) * TILE), slice(tx * TILE, (tx + 1) * TILE)) for ty in range(n) for tx in range(n)]
    res = estimate_kernels(np.stack([source[c] for c in cut]), np.stack([target[c] for c in cut]),
                           kernel_size=K, statistics=True)
    weights = tile_weights(ds["snr"].values[0], ds["flux"].values[0])
    fwhm = float(np.median(ds["fwhm"].values[0][usable]))
    field, _, _ = fit_joint_tiles(ds["y"].values, ds["x"].values, kernels, usable, weights,
                                  pack_statistics(res.statistics), res.n_valid.reshape(n, n), max_degree=3,
                                  core_radius=core_radius_for(fwhm, K), variation=RUN_VARIATION)
    assert field.degree == degree
    np.testing.assert_allclose(ds["model_coefficient"].values[0][: len(field.coefficients)], field.coefficients,
                               rtol=1e-10, atol=1e-14)


def test_the_joint_field_is_evaluated_anywhere_like_any_model(joint_run):
    folder, _, truth, _ = joint_run
    km = pipeline.KernelMap.open(folder / "kernels.zarr")
    centres = np.array([31.5, 95.5, 159.5])
    for image in range(2):
        model = km.kernel_at(image, centres[:, None], centres[None, :])
        assert model.shape == (3, 3, K, K) and np.isfinite(model).all()
        # each tile's kernel is its own here (no smooth field): the model is a smooth compromise
        rel = np.sqrt(((model - truth["kernels"][image]) ** 2).sum(axis=(-2, -1))
                      / (truth["kernels"][image] ** 2).sum(axis=(-2, -1)))
        assert np.median(rel) < 0.5
    with pytest.raises(pipeline.OutsideImageError):
        km.kernel_at(0, 500.0, 10.0)


def _forget(path, image: int, tiles: list[tuple[int, int]]) -> None:
    """As if a run had been killed: ``image``'s model not written and ``tiles`` (blocks of one tile) not done."""
    group = zarr.open_group(str(path), mode="r+")
    group["model_degree"][image] = -1
    records = zarr.open_array(str(path / "status" / "records"), mode="r+")
    written = records.attrs["fields"].index("written")
    for ty, tx in tiles:
        records[image, ty, tx, written] = 0
    group.attrs["kernelmap_status"] = "incomplete"


def test_a_resumed_joint_run_computes_the_statistics_again_and_ends_as_the_uninterrupted_one(joint_run, tmp_path,
                                                                                              capsys):
    folder, data, _, _ = joint_run
    reference = _open(folder / "kernels.zarr")
    copy = tmp_path / "kernels.zarr"
    shutil.copytree(folder / "kernels.zarr", copy)
    _forget(copy, 1, [(0, 1), (2, 2)])  # image 1: 7 blocks stored, 2 to do, no model; image 0: done
    resumed = run_job(job_from_dict({**data, "output": {"path": str(copy), "mode": "resume"}}))
    said = capsys.readouterr().out
    assert "computing 7 stored blocks again for the joint model's statistics (1 image without" in said
    assert resumed.tiles_computed == 2 and resumed.tiles_skipped == 16
    xr.testing.assert_identical(_open(copy).drop_attrs(), reference.drop_attrs())
    # every block stored, the model of image 0 lost: all of its blocks computed again, none written
    _forget(copy, 0, [])
    again = run_job(job_from_dict({**data, "output": {"path": str(copy), "mode": "resume"}}), progress=False)
    assert again.tiles_computed == 0
    xr.testing.assert_identical(_open(copy).drop_attrs(), reference.drop_attrs())


def test_a_run_on_a_local_cluster_fits_on_the_workers_and_gives_the_same_joint_model(joint_run, tmp_path,
                                                                                    monkeypatch):
    from pipeline.job.finish import ImageFinisher

    folder, data, _, _ = joint_run
    fitted, sent = [], []
    original, add = ImageFinisher.fitted, ImageFinisher.add
    monkeypatch.setattr(ImageFinisher, "fitted", lambda self, fit: (fitted.append(fit.image), original(self, fit)))
    monkeypatch.setattr(ImageFinisher, "add", lambda self, block, record, kernels, statistics=None: (
        sent.append(statistics is not None), add(self, block, record, kernels, statistics)))
    local = {**data, "output": {"path": str(tmp_path / "local.zarr")},
             "compute": {"scheduler": "local", "n_workers": 2, "dashboard_address": None, "block_tiles": 2}}
    run_job(job_from_dict(local), progress=False)
    assert sorted(fitted) == [0, 1]  # each image's model came back from a worker
    assert len(sent) == 8 and not any(sent)  # the blocks' statistics stayed on the workers
    xr.testing.assert_identical(_open(tmp_path / "local.zarr").drop_attrs(),
                                _open(folder / "kernels.zarr").drop_attrs())


def test_a_masked_stack_with_a_blank_image_gets_joint_models_for_the_others_and_resumes_the_same(tmp_path,
                                                                                                  capsys):
    make_stack(tmp_path / "stack.zarr", n_images=3, mask=True, noise=0.5)
    target = zarr.open_group(str(tmp_path / "stack.zarr"), mode="r+")["target"]
    target[1] = np.full(target.shape[1:], np.nan, dtype=target.dtype)  # every tile of image 1 unusable
    data = job_dict(tmp_path, input={"mask": "mask"}, model={"method": "joint"}, compute={"block_tiles": 2})
    summary = run_job(job_from_dict(data), progress=False)
    assert [u.index for u in summary.unusable_images] == [1]
    ds = _open(tmp_path / "kernels.zarr")
    assert ds["model_degree"].values[1] == -1 and np.all(ds["model_degree"].values[[0, 2]] >= 0)
    assert np.isnan(ds["model_residual"].values[1]).all() and np.isfinite(ds["model_residual"].values[0]).all()
    # on a local cluster: the same (the blank image is finished without a fit, its blocks' results let go)
    local = {**data, "output": {"path": str(tmp_path / "local.zarr")},
             "compute": {"scheduler": "local", "n_workers": 2, "dashboard_address": None, "block_tiles": 2}}
    assert [u.index for u in run_job(job_from_dict(local), progress=False).unusable_images] == [1]
    xr.testing.assert_identical(_open(tmp_path / "local.zarr").drop_attrs(), ds.drop_attrs())
    # resumed complete: the image without a model, none of whose tiles can enter one, is finished from the
    # store without computing its blocks again (unusable again, no model); the others are kept
    capsys.readouterr()
    again = run_job(job_from_dict({**data, "output": {**data["output"], "mode": "resume"}}))
    assert "computing" not in capsys.readouterr().out
    assert [u.index for u in again.unusable_images] == [1] and again.tiles_computed == 0
    xr.testing.assert_identical(_open(tmp_path / "kernels.zarr").drop_attrs(), ds.drop_attrs())
    # its model lost too: image 0 (usable tiles) is computed again, image 1 still not
    _forget(tmp_path / "kernels.zarr", 0, [])
    again = run_job(job_from_dict({**data, "output": {**data["output"], "mode": "resume"}}))
    said = capsys.readouterr().out
    assert "computing 4 stored blocks again for the joint model's statistics (1 image without" in said
    assert [u.index for u in again.unusable_images] == [1]
    xr.testing.assert_identical(_open(tmp_path / "kernels.zarr").drop_attrs(), ds.drop_attrs())


def test_the_dry_run_shows_the_model_and_what_its_statistics_hold(tmp_path, capsys):
    import yaml

    from pipeline.cli import main

    make_stack(tmp_path / "stack.zarr", n_images=1)
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(job_dict(tmp_path, model={"method": "joint"})))
    assert main(["run", str(job_file), "--dry-run"]) == 0
    k2 = K * K
    per_tile = (k2 * (k2 + 1) // 2 * 4 + (k2 + 8) * 8) / 2**20  # the packed Gram in single precision
    packed = k2 * (k2 + 1) // 2 * 8
    fit = 2 * (10 * k2) ** 2 * 8 + 55 * packed + 9 * packed + 3 * 32 * k2**2 * 4  # degree 3: 10 terms; 9 tiles
    assert (f"model      joint fit to all tiles' pixels, degree up to 3; each block returns its tiles' normal "
            f"equations ({per_tile:.2f} MiB a tile, {9 * per_tile:.1f} MiB an image, kept where the blocks ran "
            f"until the image's fit, which takes up to about {fit / 2**20:.0f} MiB more)") in capsys.readouterr().out
    assert main(["run", str(job_file), "--dry-run", "--set", "model.method=kernels"]) == 0
    assert "model      fitted to the tile kernels, degree up to 3" in capsys.readouterr().out


def test_an_images_model_degree_is_written_after_everything_else_of_the_image(joint_run, tmp_path, monkeypatch):
    """A resumed joint run leaves images whose ``model_degree`` is set as they are: a run killed while it
    wrote an image must not leave that set before the image's diagnostics, coefficients and residuals."""
    from pipeline.io.store import DIAGNOSTICS, ImageResults, OutputStore

    folder = joint_run[0]
    copy = tmp_path / "kernels.zarr"
    shutil.copytree(folder / "kernels.zarr", copy)
    km = pipeline.KernelMap.open(copy)
    records = zarr.open_array(str(copy / "status" / "records"), mode="r")[1]
    results = ImageResults(1, records, np.zeros(records.shape[:2], dtype=np.int64), km.field(km.ds["image"].values[1]),
                           km.ds["model_residual"].values[1])
    written = []
    original = zarr.Array.__setitem__

    def record(self, key, value):
        written.append(self.basename)
        return original(self, key, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", record)
    OutputStore(str(copy)).write_images([results])
    assert written[-1] == "model_degree" and written.count("model_degree") == 1
    assert set(DIAGNOSTICS) | {"model_coefficient", "model_residual", "model_cv_error"} <= set(written[:-1])
