"""End to end: real Zarr stores on disk, real schedulers, the ``kernelmap`` command."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import time
import typing
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import yaml
import zarr
from conftest import job_dict, kill_run_after, strict_warnings
from hypothesis import given
from hypothesis import strategies as st
from stacks import make_stack

from pipeline import flags as fl
from pipeline.cli import main
from pipeline.core.tiles import grown_blocks
from pipeline.errors import OptionError
from pipeline.job.config import job_from_dict
from pipeline.job.run import plan_job, run_job

K = 9
TILE = 64


def open_result(path) -> xr.Dataset:
    with strict_warnings():  # a plain open must not warn
        return xr.open_zarr(path).load()


def tree_digest(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        digest.update(file.read_bytes())
        digest.update(str(file.stat().st_mtime_ns).encode())
    return digest.hexdigest()


def assert_matches_truth(ds: xr.Dataset, truth: dict, tol: float = 2e-3) -> None:
    est = ds["kernel"].values.astype(float)
    true = truth["kernels"]
    err = np.sqrt(((est - true) ** 2).sum(axis=(-2, -1)) / (true**2).sum(axis=(-2, -1)))
    assert err.max() < tol, err
    np.testing.assert_allclose(ds["flux"].values, true.sum(axis=(-2, -1)), rtol=5e-4)
    np.testing.assert_allclose(ds["background"].values, truth["background"][:, None, None]
                               * np.ones(ds["background"].shape), atol=0.05)


@pytest.mark.parametrize(
    ("writer", "zarr_format", "shared"),
    [("xarray", 3, True), ("xarray", 2, False), ("zarr", 3, False), ("zarr", 2, True)],
)
def test_kernel_map_matches_the_truth_at_tile_centres(tmp_path, writer, zarr_format, shared):
    truth = make_stack(tmp_path / "stack.zarr", writer=writer, zarr_format=zarr_format, shared_source=shared)
    summary = run_job(job_from_dict(job_dict(tmp_path)), progress=False)
    ds = open_result(summary.path)
    assert ds["kernel"].dims == ("image", "y", "x", "ky", "kx")
    assert ds["kernel"].dtype == np.float32
    np.testing.assert_array_equal(ds["y"].values, np.arange(3) * TILE + (TILE - 1) / 2)
    np.testing.assert_array_equal(ds["ky"].values, np.arange(-(K // 2), K // 2 + 1))
    if writer == "xarray":
        assert list(ds["image"].values) == ["epoch-0", "epoch-1"]
    else:
        assert list(ds["image"].values) == [0, 1]
    assert_matches_truth(ds, truth)
    assert ds.attrs["kernelmap_status"] == "complete"
    assert "kernelmap_config" in ds.attrs and "kernelmap_version" in ds.attrs
    assert yaml.safe_load(ds.attrs["kernelmap_config"])["tiles"]["size"] == TILE
    flag = ds["quality_flag"]
    assert list(flag.attrs["flag_masks"]) == [f.mask for f in fl.FLAGS]
    assert flag.attrs["flag_meanings"].split() == [f.name for f in fl.FLAGS]
    assert summary.tiles_computed == 2 * 9 and summary.tiles_skipped == 0


def test_mask_excludes_garbage_pixels(tmp_path):
    truth = make_stack(tmp_path / "stack.zarr", mask=True)
    run_job(job_from_dict(job_dict(tmp_path, input={"mask": "mask"})), progress=False)
    ds = open_result(tmp_path / "kernels.zarr")
    assert_matches_truth(ds, truth)
    assert np.all(ds["quality_flag"].values[:, 0, 0] & fl.MASKED)


def test_local_cluster_with_processes_equals_a_synchronous_run(tmp_path):
    make_stack(tmp_path / "stack.zarr", n_images=2)
    run_job(job_from_dict(job_dict(tmp_path)), progress=False)
    reference = open_result(tmp_path / "kernels.zarr")
    other = job_dict(tmp_path, output={"path": str(tmp_path / "cluster.zarr")},
                     compute={"scheduler": "local", "n_workers": 2, "processes": True})
    run_job(job_from_dict(other), progress=False)
    xr.testing.assert_identical(open_result(tmp_path / "cluster.zarr").drop_attrs(), reference.drop_attrs())


def test_a_local_clusters_workers_run_in_the_worker_environment(tmp_path):
    """The job's worker processes get ``WORKER_ENV`` (one thread a transform; the allocator keeping the
    tasks' memory), not dask's defaults."""
    import os
    from contextlib import ExitStack

    from pipeline.job.executors import WORKER_ENV, connect

    assert WORKER_ENV["MALLOC_TRIM_THRESHOLD_"] != "65536"  # dask's default, which slows the tasks
    job = job_from_dict(job_dict(tmp_path, compute={"scheduler": "local", "n_workers": 1, "processes": True}))
    with ExitStack() as stack:
        client = connect(job, stack, log=lambda message: None)()
        seen = client.run(lambda: {name: os.environ.get(name) for name in WORKER_ENV})
    assert list(seen.values()) == [WORKER_ENV]


def test_create_refuses_an_existing_store_and_leaves_it_untouched(tmp_path):
    make_stack(tmp_path / "stack.zarr")
    job = job_from_dict(job_dict(tmp_path))
    run_job(job, progress=False)
    before = tree_digest(tmp_path / "kernels.zarr")
    inputs_before = tree_digest(tmp_path / "stack.zarr")
    with pytest.raises(OptionError, match="already exists.*output.mode=resume.*overwrite"):
        run_job(job, progress=False)
    assert tree_digest(tmp_path / "kernels.zarr") == before
    assert tree_digest(tmp_path / "stack.zarr") == inputs_before  # the input is never written


def test_a_plan_executed_later_reads_the_output_again(tmp_path):
    """A plan made before its output existed refuses to create it over a store made since, untouched;
    a plan executed twice in resume mode computes nothing the second time."""
    make_stack(tmp_path / "stack.zarr")
    job = job_from_dict(job_dict(tmp_path))
    late = plan_job(job)
    run_job(job, progress=False)
    before = tree_digest(tmp_path / "kernels.zarr")
    with pytest.raises(OptionError, match="already exists and output.mode is 'create': nothing was changed"):
        late.execute(progress=False)
    assert tree_digest(tmp_path / "kernels.zarr") == before
    resume = plan_job(job_from_dict(job_dict(tmp_path, output={"mode": "resume"})))
    assert resume.execute(progress=False).tiles_computed == 0
    assert resume.execute(progress=False).tiles_skipped == resume.n_tiles


def test_resume_refuses_a_store_of_another_configuration(tmp_path):
    make_stack(tmp_path / "stack.zarr")
    run_job(job_from_dict(job_dict(tmp_path)), progress=False)
    other = job_from_dict(job_dict(tmp_path, kernel={"size": 7}, output={"mode": "resume"}))
    with pytest.raises(OptionError, match="different configuration"):
        run_job(other, progress=False)


def test_overwrite_replaces_and_resume_of_a_complete_store_skips_everything(tmp_path):
    make_stack(tmp_path / "stack.zarr")
    run_job(job_from_dict(job_dict(tmp_path)), progress=False)
    first = open_result(tmp_path / "kernels.zarr")
    again = run_job(job_from_dict(job_dict(tmp_path, output={"mode": "resume"})), progress=False)
    assert again.tiles_skipped == again.n_tiles and again.tiles_computed == 0
    run_job(job_from_dict(job_dict(tmp_path, output={"mode": "overwrite"})), progress=False)
    xr.testing.assert_identical(open_result(tmp_path / "kernels.zarr").drop_attrs(), first.drop_attrs())
    # what kernelmap run did not write is not replaced: another program's store, a folder of files
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("keep")
    shutil.copytree(tmp_path / "stack.zarr", tmp_path / "copy.zarr")
    for other in (tmp_path / "stack.zarr", tmp_path / "notes"):
        job = job_from_dict(job_dict(tmp_path, input={"path": str(tmp_path / "copy.zarr")},
                                     output={"path": str(other), "mode": "overwrite"}))
        with pytest.raises(OptionError, match="is not a kernel map written by kernelmap run: nothing was changed"):
            run_job(job, progress=False)
    assert (tmp_path / "notes" / "a.txt").read_text() == "keep" and (tmp_path / "stack.zarr" / "zarr.json").exists()
    (tmp_path / "empty").mkdir()  # an empty folder is
    run_job(job_from_dict(job_dict(tmp_path, output={"path": str(tmp_path / "empty"), "mode": "overwrite"})),
            progress=False)


def test_block_records_hold_the_diagnostics_and_rebuild_them_on_resume(tmp_path):
    """Each block's record carries its tiles' diagnostics; a run killed after the last block
    but before an image's diagnostics were copied is finished from the records alone."""
    make_stack(tmp_path / "stack.zarr", n_images=2)
    kernels = {"method": "kernels"}  # (a resumed joint run leaves images with a model as they are)
    run_job(job_from_dict(job_dict(tmp_path, model=kernels, compute={"block_tiles": 2})), progress=False)
    path = tmp_path / "kernels.zarr"
    first = open_result(path)
    records = zarr.open_array(str(path / "status" / "records"), mode="r")
    fields = records.attrs["fields"]
    values = records[...]
    assert records.chunks == (1, 2, 2, len(fields)) and values.shape == (2, 3, 3, len(fields))
    assert np.all(values[..., fields.index("written")] == 1)
    for name in ("flux", "background", "fwhm", "e1", "n_valid", "quality_flag"):
        assert first[name].encoding["chunks"] == (2, 3, 3)  # both images in one chunk
        np.testing.assert_array_equal(values[..., fields.index(name)].astype(first[name].dtype),
                                      first[name].values, err_msg=name)
    group = zarr.open_group(str(path), mode="r+")
    for name in ("flux", "fwhm", "quality_flag"):  # as if killed before image 1's diagnostics
        group[name][1] = group[name].fill_value
    group.attrs["kernelmap_status"] = "incomplete"
    # resumed with the default blocks (1x1 here): the store's own 2x2 blocks are kept
    again = run_job(job_from_dict(job_dict(tmp_path, model=kernels, output={"mode": "resume"})), progress=False)
    assert again.tiles_computed == 0 and again.blocks_skipped == 2 * 4
    resumed = open_result(path)
    assert resumed.attrs["kernelmap_status"] == "complete"
    xr.testing.assert_identical(resumed.drop_attrs(), first.drop_attrs())


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    """SIGKILL a ``kernelmap run`` mid-way, resume it, compare with a run never interrupted (which shards its
    arrays: the values do not depend on it)."""
    make_stack(tmp_path / "stack.zarr", n_images=3, size=256, chunk=64)
    data = job_dict(tmp_path, compute={"scheduler": "threads", "n_workers": 1, "block_tiles": 1},
                    output={"images_per_shard": 1})  # every block written by its task: kept when killed
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(data))
    done = kill_run_after(job_file, tmp_path / "kernels.zarr", 5, poll=0.05)
    partial = xr.open_zarr(tmp_path / "kernels.zarr")
    assert partial.attrs["kernelmap_status"] == "incomplete"
    assert 0 < done < 48
    # what a chunk write cut by the kill leaves (Zarr writes NAME.<token>.partial, then renames it)
    planted = tmp_path / "kernels.zarr" / "kernel" / "c" / "0" / "0" / "0" / "0" / "0.5f1d2e.partial"
    planted.parent.mkdir(parents=True, exist_ok=True)
    planted.write_bytes(b"cut short")
    assert main(["run", str(job_file), "--quiet", "--set", "output.mode=resume"]) == 0
    assert not list((tmp_path / "kernels.zarr").rglob("*.partial"))  # removed by the resume
    resumed = open_result(tmp_path / "kernels.zarr")
    assert resumed.attrs["kernelmap_status"] == "complete"
    reference = job_dict(tmp_path, output={"path": str(tmp_path / "reference.zarr")})
    run_job(job_from_dict(reference), progress=False)
    xr.testing.assert_identical(resumed.drop_attrs(), open_result(tmp_path / "reference.zarr").drop_attrs())


def test_command_line_values_beat_the_file(tmp_path, capsys):
    make_stack(tmp_path / "stack.zarr")
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(job_dict(tmp_path)))
    assert main(["config", str(job_file), "--set", "tiles.size=96", "--set", "kernel.method=welch",
                 "--set", "kernel.segment_size=32"]) == 0
    effective = yaml.safe_load(capsys.readouterr().out)
    assert effective["tiles"] == {"size": 96, "step": 96}
    assert effective["kernel"]["method"] == "welch" and effective["kernel"]["segment_size"] == 32
    assert effective["compute"]["n_workers"] == 2  # defaults filled in
    assert main(["run", str(job_file), "--dry-run", "--set", "tiles.step=32"]) == 0
    plan = capsys.readouterr().out
    assert "tiles      64 px every 32 px: 5x5 per image, 50 in all" in plan
    assert "tasks" in plan and "MiB per task" in plan
    assert not (tmp_path / "kernels.zarr").exists()  # a dry run writes nothing


def test_bad_job_files_fail_before_any_work_with_every_error(tmp_path, capsys):
    make_stack(tmp_path / "stack.zarr")
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(job_dict(tmp_path, tiles={"size": 8}, kernel={"penalty": "tv"},
                                                output={"mode": "append"})))
    assert main(["run", str(job_file)]) == 2
    err = capsys.readouterr().err
    assert "tiles.size: 8 is too small" in err
    assert "kernel.penalty: 'tv' is not one of" in err
    assert "output.mode: 'append' is not one of" in err
    assert not (tmp_path / "kernels.zarr").exists()
    job_file.write_text(yaml.safe_dump(job_dict(tmp_path, input={"target": "tgt"})))
    assert main(["run", str(job_file)]) == 2
    assert "no array 'tgt'" in capsys.readouterr().err


def test_plan_groups_tiles_into_chunk_aligned_blocks(tmp_path):
    make_stack(tmp_path / "stack.zarr", size=256, chunk=128)
    plan = plan_job(job_from_dict(job_dict(tmp_path)))
    assert plan.grid.block_tiles == (2, 2)
    blocks = plan.blocks
    assert len(blocks) == 2 * 4 and sum(b.n_tiles for b in blocks) == plan.n_tiles
    ys, xs = plan.grid.pixel_region(blocks[1])
    assert (ys.start, ys.stop, xs.start, xs.stop) == (0, 128, 128, 256)


@pytest.mark.parametrize(("kernel", "compute", "expected"), [
    ({"method": "welch"}, {"scheduler": "synchronous"}, (6, 6)),  # 3x3 chunks: 16 blocks; 4x4 would leave 4
    ({"method": "welch"}, {"scheduler": "local", "n_workers": 2}, (6, 6)),  # 16 blocks, 8 a worker
    ({"method": "welch"}, {"scheduler": "local", "n_workers": 2, "threads_per_worker": 2}, (2, 2)),  # 2x2: 16 < 32
    ({"method": "welch"}, {"scheduler": "synchronous", "block_tiles": 3}, (3, 3)),  # as asked
    ({}, {"scheduler": "synchronous"}, (2, 2)),  # lstsq: one chunk a block
])
def test_welch_blocks_hold_whole_chunks_while_every_worker_keeps_eight(tmp_path, kernel, compute, expected):
    make_stack(tmp_path / "stack.zarr", n_images=4, size=512, chunk=128)  # 8x8 tiles of 64 an image
    plan = plan_job(job_from_dict(job_dict(tmp_path, kernel=kernel, compute=compute)))
    assert plan.grid.block_tiles == expected
    assert sum(b.n_tiles for b in plan.blocks) == plan.n_tiles == 4 * 64


@given(by=st.integers(1, 9), bx=st.integers(1, 9), ty=st.integers(1, 40), tx=st.integers(1, 40),
       n_images=st.integers(1, 50), workers=st.integers(1, 16))
def test_grown_blocks_take_the_largest_factor_within_every_bound(by, bx, ty, tx, n_images, workers):
    def fits(f: int) -> bool:
        blocks = n_images * -(-ty // (by * f)) * -(-tx // (bx * f))
        return by * f * bx * f <= 64 and by * f <= ty and bx * f <= tx and blocks >= 8 * workers

    gy, gx = grown_blocks((by, bx), (ty, tx), n_images, workers=workers)
    factor = gy // by
    assert (gy, gx) == (by * factor, bx * factor) and factor >= 1
    assert factor == 1 or all(fits(f) for f in range(2, factor + 1))
    assert not fits(factor + 1)


def test_demo_command_runs_the_demo_job(tmp_path, capsys):
    from pipeline.job.config import load_job
    from pipeline.sim.demo import demo_job

    shipped = load_job(Path(__file__).parents[1] / "configs" / "demo.yaml")
    built_in = demo_job("demo-output")
    assert built_in == shipped  # configs/demo.yaml documents exactly what `kernelmap demo` runs
    assert main(["demo", "--dir", str(tmp_path / "demo"), "--images", "2", "--size", "256",
                 "--set", "compute.scheduler=threads"]) == 0
    out = capsys.readouterr().out
    assert "kernel FWHM across the field" in out and "relative L2 error" in out
    report = tmp_path / "demo" / "report" / "index.html"
    assert f"report (open it in a browser): {report}" in out and report.exists()
    ds = open_result(tmp_path / "demo" / "kernels.zarr")
    assert ds["kernel"].shape == (2, 2, 2, 15, 15)
    assert np.all(np.isfinite(ds["fwhm"].values))


def test_a_running_scheduler_is_used_by_address(tmp_path):
    """A ``dask scheduler`` and a ``dask worker`` started as separate processes, reached by address."""
    import socket

    make_stack(tmp_path / "stack.zarr", n_images=1)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    bin_dir = Path(sys.executable).parent
    logs = open(tmp_path / "dask.log", "w")  # closed below
    procs = [subprocess.Popen([str(bin_dir / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--dashboard-address", ":0"], stdout=logs, stderr=logs)]
    try:
        procs.append(subprocess.Popen([str(bin_dir / "dask"), "worker", address, "--nthreads", "1",
                                       "--nworkers", "1", "--local-directory", str(tmp_path / "w")],
                                      stdout=logs, stderr=logs))
        data = job_dict(tmp_path, compute={"scheduler": address})
        summary = run_job(job_from_dict(data), progress=False)
        assert summary.tiles_computed == 9
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        logs.close()
    assert open_result(tmp_path / "kernels.zarr").attrs["kernelmap_status"] == "complete"


def test_performance_report_is_written(tmp_path):
    make_stack(tmp_path / "stack.zarr", n_images=1)
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(job_dict(tmp_path, compute={"scheduler": "local", "n_workers": 1})))
    report = tmp_path / "report.html"
    assert main(["run", str(job_file), "--quiet", "--performance-report", str(report)]) == 0
    assert report.stat().st_size > 1000 and "<html" in report.read_text()[:2000].lower()


def test_output_to_an_fsspec_url(tmp_path):
    truth = make_stack(tmp_path / "stack.zarr", n_images=1)
    url = (tmp_path / "remote.zarr").as_uri()
    data = job_dict(tmp_path, input={"path": (tmp_path / "stack.zarr").as_uri()},
                    output={"path": url})
    run_job(job_from_dict(data), progress=False)
    ds = open_result(url)
    assert_matches_truth(ds, {**truth, "background": truth["background"][:1]})
    run_job(job_from_dict({**data, "output": {"path": url, "mode": "overwrite"}}), progress=False)
    assert open_result(url).attrs["kernelmap_status"] == "complete"


def test_welch_job_without_diagnostics(tmp_path):
    truth = make_stack(tmp_path / "stack.zarr", n_images=1)
    run_job(job_from_dict(job_dict(tmp_path, kernel={"method": "welch", "segment_size": 32,
                                                     "diagnostics": False})), progress=False)
    ds = open_result(tmp_path / "kernels.zarr")
    assert np.all(np.isnan(ds["residual"].values)) and np.all(np.isnan(ds["noise"].values))
    assert np.all(np.isfinite(ds["flux"].values)) and np.all(np.isfinite(ds["fwhm"].values))
    est, true = ds["kernel"].values, truth["kernels"]
    assert np.median(np.sqrt(((est - true) ** 2).sum(axis=(-2, -1)) / (true**2).sum(axis=(-2, -1)))) < 0.1


def _lose_blocks(path: Path) -> None:
    """As if a run with 2x2-tile blocks was killed: image 1's right-hand blocks and its diagnostics
    were never written."""
    group = zarr.open_group(str(path), mode="r+")
    group["status/records"][1, :, 2:] = np.nan
    group["kernel"][1, :, 2:] = np.nan
    for name in ("flux", "fwhm", "quality_flag", "model_degree", "model_coefficient", "model_residual"):
        group[name][1] = group[name].fill_value
    group.attrs["kernelmap_status"] = "incomplete"


def test_resume_dry_run_shows_the_stores_blocks_and_the_blocks_done(tmp_path, capsys):
    make_stack(tmp_path / "stack.zarr", n_images=2)
    run_job(job_from_dict(job_dict(tmp_path, compute={"block_tiles": 2})), progress=False)
    _lose_blocks(tmp_path / "kernels.zarr")
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(job_dict(tmp_path)))  # blocks of 1x1 tile (the input's chunks)
    before = tree_digest(tmp_path / "kernels.zarr")
    assert main(["run", str(job_file), "--dry-run", "--set", "output.mode=resume"]) == 0
    plan = capsys.readouterr().out
    assert "blocks     2x2 tiles each: 2x2 per image, 8 tasks" in plan  # the store's, not the job's 1x1
    assert ("resume     6 of 8 blocks already done, skipped; the store's own blocks of 2x2 tiles are kept "
            "(compute.block_tiles asks for 1x1)") in plan
    assert "chunks (1, 2, 2, 9, 9)" in plan
    assert main(["run", str(job_file), "--dry-run"]) == 0  # mode create: the run would refuse, and says so
    plan = capsys.readouterr().out
    assert "blocks     1x1 tiles each: 3x3 per image, 18 tasks" in plan
    assert "refused    output.path" in plan and "already exists and output.mode is 'create'" in plan
    assert "\nresume " not in plan
    assert tree_digest(tmp_path / "kernels.zarr") == before  # a dry run writes nothing
    plan = plan_job(job_from_dict(job_dict(tmp_path, compute={"block_tiles": 2}, output={"mode": "resume"})))
    assert plan.grid.block_tiles == (2, 2) and plan.asked_block_tiles == (2, 2)
    assert plan.done.sum() == 6 and not plan.done[1, :, 1].any()
    assert "(compute.block_tiles asks" not in plan.describe()


def test_resume_of_another_configuration_is_refused_in_the_dry_run_and_before_anything_starts(tmp_path, capsys):
    make_stack(tmp_path / "stack.zarr")
    run_job(job_from_dict(job_dict(tmp_path)), progress=False)
    before = tree_digest(tmp_path / "kernels.zarr")
    other = job_dict(tmp_path, kernel={"size": 7}, output={"mode": "resume"},
                     compute={"scheduler": "local", "n_workers": 1})
    plan = plan_job(job_from_dict(other))
    assert "refused    output.mode=resume:" in plan.describe() and "different configuration" in plan.describe()
    started = []
    with pytest.raises(OptionError, match="different configuration"):
        plan.execute(progress=False, log=started.append)
    assert started == [] and tree_digest(tmp_path / "kernels.zarr") == before


def test_a_refused_resume_names_the_settings_that_differ(tmp_path):
    """E.g. a store made when the model of the tile kernels was the default, resumed with a job that does
    not name the model: the default is now the joint fit."""
    make_stack(tmp_path / "stack.zarr")
    run_job(job_from_dict(job_dict(tmp_path, model={"method": "kernels"})), progress=False)
    before = tree_digest(tmp_path / "kernels.zarr")
    plan = plan_job(job_from_dict(job_dict(tmp_path, output={"mode": "resume"})))
    with pytest.raises(OptionError) as refused:
        plan.execute(progress=False)
    said = str(refused.value)
    assert 'model.method: "kernels" in the store, "joint" here' in said and "--set model.method=" in said
    plan = plan_job(job_from_dict(job_dict(tmp_path, kernel={"size": 7}, model={"method": "kernels"},
                                           output={"mode": "resume"})))
    assert "kernel.size: 9 in the store, 7 here" in plan.describe()
    assert tree_digest(tmp_path / "kernels.zarr") == before


@pytest.mark.parametrize("block_tiles", [1, 2])
def test_resumed_run_finishes_stored_blocks_through_the_same_path(tmp_path, monkeypatch, block_tiles):
    """Blocks already in the store go through ``ImageFinisher.add`` like computed ones, whatever
    ``compute.block_tiles`` says now; the result equals the uninterrupted run's."""
    from pipeline.job.finish import ImageFinisher

    make_stack(tmp_path / "stack.zarr", n_images=2)
    kernels = {"method": "kernels"}  # (the joint model's resume: tests/test_joint_run.py)
    run_job(job_from_dict(job_dict(tmp_path, model=kernels, compute={"block_tiles": 2})), progress=False)
    first = open_result(tmp_path / "kernels.zarr")
    _lose_blocks(tmp_path / "kernels.zarr")
    added = []
    original = ImageFinisher.add

    def add(self, block, record, kernels, statistics=None):
        assert statistics is None  # the model of the kernels needs none
        added.append((block.image, block.by, block.bx, record.shape, kernels.shape))
        original(self, block, record, kernels, statistics)

    monkeypatch.setattr(ImageFinisher, "add", add)
    job = job_from_dict(job_dict(tmp_path, model=kernels, compute={"block_tiles": block_tiles},
                                 output={"mode": "resume"}))
    summary = run_job(job, progress=False)
    assert summary.blocks_skipped == 6 and summary.blocks_computed == 2
    assert summary.tiles_skipped == 15 and summary.tiles_computed == 3
    fields = len(zarr.open_array(str(tmp_path / "kernels.zarr" / "status" / "records"), mode="r").attrs["fields"])

    def shape(by: int, bx: int) -> tuple[int, int]:  # blocks of 2x2 tiles on 3x3 tiles
        return (2 if by == 0 else 1, 2 if bx == 0 else 1)

    expected = [(image, by, bx, (*shape(by, bx), fields), (*shape(by, bx), K, K))
                for image in range(2) for by in range(2) for bx in range(2)]
    assert sorted(added) == expected  # every block once, with the store's blocks
    assert {a[:3] for a in added[-2:]} == {(1, 0, 1), (1, 1, 1)}  # the stored ones first, then those computed
    resumed = open_result(tmp_path / "kernels.zarr")
    assert resumed.attrs["kernelmap_status"] == "complete"
    xr.testing.assert_identical(resumed.drop_attrs(), first.drop_attrs())


def test_worker_watch_cancels_what_is_left_once_no_worker_comes_back():
    """Without workers for ``give_up_after`` seconds the watch cancels the futures not yet read (the
    run's thread removes read ones meanwhile) and holds the advice the run raises."""
    from types import SimpleNamespace

    from pipeline.errors import BatchError
    from pipeline.job.executors import WaitingFutures, WorkerWatch

    class Client:
        cancelled: typing.ClassVar[list] = []

        def scheduler_info(self, n_workers):
            return {"workers": {}}

        def cancel(self, futures):
            self.cancelled.extend(futures)

    futures = [SimpleNamespace(key=f"kernelmap-block-0-0-{i}") for i in range(5)]
    waiting = WaitingFutures(futures)
    waiting.remove(futures[0].key)
    lines = []
    client = Client()
    with WorkerWatch(client, waiting, 0.5, lines.append) as watch:
        deadline = time.monotonic() + 20
        while watch.error is None and time.monotonic() < deadline:
            time.sleep(0.05)
    assert isinstance(watch.error, BatchError) and "(4 blocks left)" in str(watch.error)
    assert client.cancelled == futures[1:] and len(waiting) == 4
    assert lines and lines[0].startswith("no workers connected for 0 s")


@pytest.mark.parametrize(("command", "argv", "hint"), [
    ("run", ["run", "job.yaml"], "output.mode=resume"),
    ("apply", ["apply", "kernels.zarr", "--out", "images.zarr"], "kernelmap apply again with --resume"),
    ("ingest", ["ingest", "ref.fits", "t.fits", "--out", "stack.zarr"], "same kernelmap ingest again"),
])
def test_an_interrupted_command_says_how_to_finish_it(monkeypatch, capsys, command, argv, hint):
    import pipeline.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, f"_cmd_{command}", interrupted)
    assert main(argv) == 130
    assert hint in capsys.readouterr().err


def test_an_output_under_a_file_is_refused_with_a_message_not_a_traceback(tmp_path, capsys):
    make_stack(tmp_path / "stack.zarr")
    (tmp_path / "notes.txt").write_text("a file")
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(job_dict(tmp_path, output={"path": str(tmp_path / "notes.txt" / "k.zarr")})))
    assert main(["run", str(job_file)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'notes.txt'} is a file, not a folder" in err and "choose another output.path" in err
    assert (tmp_path / "notes.txt").read_text() == "a file"
    assert main(["run", str(job_file), "--dry-run"]) == 0  # the plan says so too
    assert "refused    output.path" in capsys.readouterr().out
