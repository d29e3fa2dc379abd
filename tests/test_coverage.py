"""Every pixel in a tile: the last tiles end at the far edges, their centres are stored right, the dry run
says what is covered, and a store written with the older grid resumes with it."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import xarray as xr
import yaml
import zarr
from conftest import job_dict, strict_warnings
from hypothesis import given
from hypothesis import strategies as st

import pipeline
from pipeline.cli import main
from pipeline.core.tiles import EDGE, STEP, TileGrid
from pipeline.errors import OptionError
from pipeline.job.config import job_from_dict
from pipeline.job.plan import Plan
from pipeline.job.run import execute_plan, plan_job, run_job

SHAPE = (150, 200)  # tiles of 64: 2 rows and 3 columns every 64 px, then one more of each at the edge
K = 9


def painted(grid: TileGrid) -> np.ndarray:
    """``(ny, nx)`` number of tiles over each pixel, tile by tile."""
    count = np.zeros((grid.ny, grid.nx), dtype=int)
    for y0 in grid.y0:
        for x0 in grid.x0:
            count[y0: y0 + grid.size, x0: x0 + grid.size] += 1
    return count


@pytest.mark.parametrize(
    ("ny", "nx", "size", "step", "shape", "last"),
    [
        (1500, 2000, 256, 256, (6, 8), (1244, 1744)),  # the shape of the issue: 23.5 % uncovered before
        (1024, 768, 256, 256, (4, 3), (768, 512)),  # a multiple of the step: the grid as before
        (1500, 2000, 256, 100, (14, 19), (1244, 1744)),  # step < size
        (256, 256, 256, 256, (1, 1), (0, 0)),  # the image is one tile
        (256, 300, 256, 64, (1, 2), (0, 44)),  # one tile high, two wide
    ],
)
def test_every_pixel_is_in_a_tile_and_the_last_tiles_end_at_the_edge(ny, nx, size, step, shape, last):
    grid = TileGrid(ny, nx, size, step, (2, 2))
    assert grid.rule == EDGE and grid.shape == shape
    assert (int(grid.y0[-1]), int(grid.x0[-1])) == last
    assert grid.y0[-1] + size == ny and grid.x0[-1] + size == nx and grid.uncovered == (0, 0)
    count = painted(grid)
    assert count.min() >= 1
    covered, shared = grid.coverage()
    assert covered == 1.0 and shared == pytest.approx(np.mean(count > 1))
    np.testing.assert_array_equal(grid.centres_y, grid.y0 + (size - 1) / 2)
    np.testing.assert_array_equal(grid.centres_x, grid.x0 + (size - 1) / 2)
    # the tiles before the edge ones are the older grid's, which leaves the far edges out
    old = TileGrid(ny, nx, size, step, (2, 2), rule=STEP)
    np.testing.assert_array_equal(grid.y0[: len(old.y0)], old.y0)
    np.testing.assert_array_equal(grid.x0[: len(old.x0)], old.x0)
    assert old.coverage()[0] == pytest.approx(np.mean(painted(old) > 0))
    if (ny, nx, step) == (1500, 2000, 256):
        assert 1 - old.coverage()[0] == pytest.approx(0.2354, abs=1e-4)
        assert old.uncovered == ((ny - size) % step, (nx - size) % step)


@given(ny=st.integers(1, 90), nx=st.integers(1, 90), size=st.integers(1, 40), step=st.integers(1, 40),
       by=st.integers(1, 4), bx=st.integers(1, 4))
def test_blocks_cut_every_tile_from_its_own_pixels(ny, nx, size, step, by, bx):
    ny, nx, step = ny + size - 1, nx + size - 1, min(step, size)  # images at least one tile, step <= size
    grid = TileGrid(ny, nx, size, step, (by, bx))
    image = np.arange(ny * nx, dtype=np.float64).reshape(ny, nx)
    assert painted(grid).min() >= 1 and grid.y0[-1] + size == ny and grid.x0[-1] + size == nx
    assert np.all(np.diff(grid.y0) > 0) and np.all(np.diff(grid.y0) <= step)
    seen = np.zeros(grid.shape, dtype=int)
    for block in grid.blocks(1):
        ys, xs = grid.pixel_region(block)
        tiles = grid.cut(np.stack([image[ys, xs]] * 2), block)  # a leading axis, as the reader gives
        assert tiles.shape == (2, block.n_tiles, size, size)
        n = 0
        for ty in range(block.ty0, block.ty1):
            for tx in range(block.tx0, block.tx1):
                y0, x0 = grid.y0[ty], grid.x0[tx]
                np.testing.assert_array_equal(tiles[1, n], image[y0: y0 + size, x0: x0 + size])
                seen[ty, tx] += 1
                n += 1
    assert np.all(seen == 1)


def test_the_tile_grid_rule_is_checked():
    with pytest.raises(OptionError, match="tile-grid rule 'spiral' is not one of edge, step"):
        TileGrid(100, 100, 32, 32, (1, 1), rule="spiral")


# --------------------------------------------------------------------------- a run on an awkward shape


# edge_run (conftest): the default job on a 150x200 stack, kernel 9, 64-px tiles


def test_a_run_on_an_awkward_shape_stores_the_edge_tiles_at_their_centres(edge_run):
    folder, truth = edge_run
    with strict_warnings():  # a plain open must not warn
        ds = xr.open_zarr(folder / "kernels.zarr").load()
    np.testing.assert_array_equal(ds["y"].values, [31.5, 95.5, 117.5])  # the last tile: rows 86 .. 149
    np.testing.assert_array_equal(ds["x"].values, [31.5, 95.5, 159.5, 167.5])  # columns 136 .. 199
    assert ds.attrs["tile_grid"] == "edge" and ds.attrs["input_shape"] == list(SHAPE)
    assert ds["kernel"].shape == (1, 3, 4, K, K)
    intact = truth["intact"]
    # tiles painted over by a later one (in the last row or column) hold two kernels; the rest one each,
    # the edge tiles among them
    np.testing.assert_array_equal(intact, [[1, 1, 0, 1], [0, 0, 0, 0], [1, 1, 0, 1]])
    est, true = ds["kernel"].values[0].astype(float), truth["kernels"][0]
    err = np.sqrt(((est - true) ** 2).sum(axis=(-2, -1)) / (true**2).sum(axis=(-2, -1)))
    assert err[intact].max() < 2e-3, err
    assert err[~intact].min() > 1e-2  # two kernels, as they should
    np.testing.assert_allclose(ds["background"].values[0][intact], truth["background"][0], atol=0.05)
    np.testing.assert_allclose(ds["flux"].values[0][intact], true.sum(axis=(-2, -1))[intact], rtol=5e-4)
    # the model is fitted at the true centres: the edge tiles are the outermost, the frame spans them
    assert float(ds["model_centre_y"][0]) == pytest.approx((31.5 + 117.5) / 2)
    assert float(ds["model_scale_x"][0]) == pytest.approx((167.5 - 31.5) / 2)


def test_the_report_places_the_edge_tiles_at_their_centres(edge_run):
    from pipeline.analysis.report import _edges, figures

    folder, _ = edge_run
    ds = pipeline.KernelMap.open(folder / "kernels.zarr").ds.load()
    ye, xe = _edges(ds)
    np.testing.assert_array_equal(ye, [-0.5, 63.5, 106.5, 149.5])  # cells end at the image's edges
    np.testing.assert_array_equal(xe, [-0.5, 63.5, 127.5, 163.5, 199.5])
    figs = figures(ds)
    mesh = figs["fwhm"].axes[0].collections[0]
    corners = mesh.get_coordinates()  # (y edges, x edges, (x, y))
    np.testing.assert_array_equal(corners[0, :, 0], xe)
    np.testing.assert_array_equal(corners[:, 0, 1], ye)
    np.testing.assert_array_equal(figs["fwhm"].axes[0].get_xlim(), (-0.5, 199.5))
    import matplotlib.pyplot as plt

    plt.close("all")


def test_the_dry_run_prints_the_coverage(tmp_path, capsys):
    group = zarr.open_group(tmp_path / "stack.zarr", mode="w-", zarr_format=3)
    for name, shape in (("target", (1, 1500, 2000)), ("source", (1500, 2000))):
        group.create_array(name, shape=shape, chunks=(*shape[:-2], 256, 256), dtype="float32", fill_value=1.0)
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(job_dict(tmp_path, tiles={"size": 256}, kernel={"size": 21})))
    assert main(["run", str(job_file), "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert "tiles      256 px every 256 px: 6x8 per image, 48 in all\n" in plan
    assert ("coverage   100 % of each image's pixels in a tile, 4.74 % in more than one; the last tiles end at the "
            "image edges: the last row overlaps its neighbour by 36 rows and the last column overlaps its "
            "neighbour by 48 columns (tiles a step apart overlap by 0)") in plan
    assert "kernel(image=1, y=6, x=8, ky=21, kx=21)" in plan
    assert main(["run", str(job_file), "--dry-run", "--set", "tiles.size=250", "--set", "tiles.step=125"]) == 0
    plan = capsys.readouterr().out
    assert "tiles      250 px every 125 px: 11x15 per image, 165 in all" in plan
    assert ("coverage   100 % of each image's pixels in a tile, 97.9 % in more than one\n") in plan  # fits the step
    assert not (tmp_path / "kernels.zarr").exists()


# --------------------------------------------------------------------------- stores of the older grid


def _old_plan(plan: Plan) -> Plan:
    """The plan an earlier version made: tiles every step only, and no tile_grid or input_shape attribute."""
    grid = replace(plan.grid, rule=STEP)
    return replace(plan, grid=grid, layout=replace(plan.layout, grid=grid))


def test_a_store_of_the_older_grid_resumes_with_it_and_reads_as_before(edge_run, tmp_path, monkeypatch, capsys):
    folder, _ = edge_run
    data = job_dict(folder, compute={"block_tiles": 2}, output={"path": str(tmp_path / "old.zarr")})
    original = Plan.attributes

    def attributes(self):
        attrs = original(self)
        del attrs["tile_grid"], attrs["input_shape"]
        return attrs

    with monkeypatch.context() as patch:  # as an earlier version wrote it
        patch.setattr(Plan, "attributes", attributes)
        execute_plan(_old_plan(plan_job(job_from_dict(data))), progress=False)
    path = tmp_path / "old.zarr"
    first = xr.open_zarr(path).load()
    assert "tile_grid" not in first.attrs and "input_shape" not in first.attrs
    np.testing.assert_array_equal(first["y"].values, [31.5, 95.5])
    np.testing.assert_array_equal(first["x"].values, [31.5, 95.5, 159.5])
    group = zarr.open_group(str(path), mode="r+")  # as if killed: the right-hand blocks never written
    group["status/records"][0, :, 2:] = np.nan
    group["kernel"][0, :, 2:] = np.nan
    for name in ("flux", "fwhm", "quality_flag", "model_degree", "model_coefficient", "model_residual"):
        group[name][0] = group[name].fill_value
    group.attrs["kernelmap_status"] = "incomplete"
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump({**data, "output": {**data["output"], "mode": "resume"}}))
    assert main(["run", str(job_file), "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert "tiles      64 px every 64 px: 2x3 per image, 6 in all" in plan
    assert "coverage   81.92 % of each image's pixels in a tile, 0 % in more than one; 22 rows and 8 columns" in plan
    assert ("resume     1 of 2 blocks already done, skipped; the store's own blocks of 2x2 tiles are kept; so is "
            "its tile grid (tiles every step from 0 only, written by an earlier version: output.mode=overwrite "
            "covers every pixel)") in plan
    logged = []
    summary = run_job(job_from_dict({**data, "output": {**data["output"], "mode": "resume"}}), progress=False,
                      log=logged.append)
    assert summary.blocks_skipped == 1 and summary.blocks_computed == 1 and summary.n_tiles == 6
    assert any("tile grid of an earlier version: 22 rows and 8 columns" in line for line in logged)
    resumed = xr.open_zarr(path).load()
    assert resumed.attrs["kernelmap_status"] == "complete" and "tile_grid" not in resumed.attrs
    xr.testing.assert_identical(resumed.drop_attrs(), first.drop_attrs())
    km = pipeline.KernelMap.open(path)  # read as before
    assert km.fwhm_map(model=True).shape == (1, 2, 3)
    # overwriting it covers every pixel
    run_job(job_from_dict({**data, "output": {**data["output"], "mode": "overwrite"}}), progress=False)
    assert xr.open_zarr(path).attrs["tile_grid"] == "edge"


def test_resume_refuses_a_store_whose_grid_it_cannot_rebuild(edge_run, tmp_path):
    folder, _ = edge_run
    data = job_dict(folder, output={"path": str(tmp_path / "k.zarr")})
    run_job(job_from_dict(data), progress=False)
    resume = job_from_dict({**data, "output": {**data["output"], "mode": "resume"}})
    group = zarr.open_group(str(tmp_path / "k.zarr"), mode="r+")
    group.attrs["tile_grid"] = "spiral"
    plan = plan_job(resume)
    assert "tile_grid 'spiral', which this version of kernelmap does not know" in plan.describe()
    group.attrs["tile_grid"] = "step"  # the older rule gives 2x3 tiles here, the store holds 3x4
    with pytest.raises(OptionError, match="holds 3x4 tiles per image, but its tile grid \\(step\\) gives 2x3"):
        run_job(resume, progress=False)
