"""Many small images: the kernel map's arrays along ``image`` are Zarr 3 sharded, written by the client, and
an interrupted run still resumes to the uninterrupted result."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import yaml
import zarr
from conftest import job_dict, kill_run_after
from hypothesis import given, settings
from hypothesis import strategies as st
from stacks import make_stack

from pipeline.cli import main
from pipeline.core.field import polynomial_terms
from pipeline.core.tiles import TileGrid
from pipeline.errors import ConfigError
from pipeline.io.store import (
    IMAGES_PER_CHUNK,
    MAX_IMAGES_PER_SHARD,
    RECORD_FIELDS,
    SHARD_BYTES,
    OutputStore,
    StoreLayout,
)
from pipeline.job.config import job_from_dict
from pipeline.job.finish import ImageFinisher
from pipeline.job.run import plan_job, run_job

N_IMAGES = 40  # 2.5 shards of 16 images
IMAGE_ARRAYS = ("kernel", "flux", "quality_flag", "model_coefficient", "model_degree", "model_residual",
                "status/records")


def layout(n: int, ty: int, tx: int, k: int, dtype: str = "float32", degree: int = 3,
           asked: int | None = None, block: tuple[int, int] = (1, 1)) -> StoreLayout:
    grid = TileGrid(ty * 64, tx * 64, 64, 64, block)
    return StoreLayout(grid, np.arange(n), {}, k, dtype, degree, shard_images=asked)


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 30_000), ty=st.integers(1, 80), tx=st.integers(1, 80),
       k=st.integers(1, 25).map(lambda h: 2 * h + 1), dtype=st.sampled_from(["float32", "float64"]),
       degree=st.integers(0, 4), asked=st.one_of(st.none(), st.just(1), st.integers(1, 300).map(lambda m: 16 * m)))
def test_images_per_shard_holds_whole_chunks_within_the_size_and_the_images(n, ty, tx, k, dtype, degree, asked):
    lay = layout(n, ty, tx, k, dtype, degree, asked)
    shard, per = lay.images_per_shard, min(n, IMAGES_PER_CHUNK)
    expected_bytes = max(ty * tx * k * k * np.dtype(dtype).itemsize, ty * tx * len(RECORD_FIELDS) * 8,
                         len(polynomial_terms(degree)) * k * k * 8)
    assert lay.image_bytes == expected_bytes
    if n == 1 or asked == 1:
        assert shard == 1
        return
    if shard > 1:  # whole chunks of the per-image variables, no more than the images need
        assert shard % per == 0 and shard <= -(-n // per) * per
    if asked is None:
        fits = per * expected_bytes <= SHARD_BYTES
        assert (shard > 1) == fits  # sharded exactly where a chunk's images fit
        if fits:
            assert shard * expected_bytes <= SHARD_BYTES and shard <= MAX_IMAGES_PER_SHARD
            # as many whole chunks as fit (or all the images)
            assert shard == -(-n // per) * per or (shard + per) * expected_bytes > SHARD_BYTES \
                or shard + per > MAX_IMAGES_PER_SHARD
    else:
        assert shard == min(asked, -(-n // per) * per) // per * per


def test_images_per_shard_must_be_one_or_whole_chunks(tmp_path):
    with pytest.raises(ConfigError, match="output.images_per_shard: 24 is not 1 or a multiple of 16"):
        job_from_dict(job_dict(tmp_path, output={"images_per_shard": 24}))
    assert job_from_dict(job_dict(tmp_path, output={"images_per_shard": 32})).output.images_per_shard == 32
    base = job_from_dict(job_dict(tmp_path))
    # how the output is written, not what it holds
    assert job_from_dict(job_dict(tmp_path, output={"images_per_shard": 1})).fingerprint() == base.fingerprint()


@pytest.fixture(scope="module")
def many(tmp_path_factory) -> Path:
    """40 images of 2x2 tiles (64 px, kernel 9)."""
    folder = tmp_path_factory.mktemp("many")
    make_stack(folder / "stack.zarr", n_images=N_IMAGES, size=128, noise=0.5)
    return folder


def many_job(folder: Path, out: str, **output) -> dict:
    return job_dict(folder, output={"path": str(folder / out), **output})


@pytest.fixture(scope="module")
def unsharded(many) -> xr.Dataset:
    """The kernel map written block by block by the tasks (no shards)."""
    summary = run_job(job_from_dict(many_job(many, "unsharded.zarr", images_per_shard=1)), progress=False)
    assert zarr.open_group(summary.path, mode="r")["kernel"].shards is None
    return xr.open_zarr(summary.path).load()


def files_of(path: Path, array: str) -> int:
    return sum(1 for f in (path / array / "c").rglob("*") if f.is_file())


def test_many_small_images_share_files_and_the_values_of_an_unsharded_run(many, unsharded, capsys):
    job = many_job(many, "sharded.zarr", images_per_shard=16)
    plan = plan_job(job_from_dict(job))
    assert plan.images_per_shard() == 16
    assert "shards of 16 images (3 file(s) an array" in plan.describe()
    summary = run_job(job_from_dict(job), progress=False)
    path = Path(summary.path)
    group = zarr.open_group(path, mode="r")
    for name in IMAGE_ARRAYS:  # (the per-image variables' chunks are 16 images already: not sharded)
        assert (group[name].shards or group[name].chunks)[0] == 16, name
        assert files_of(path, name) == 3, name  # one file a shard: ceil(40 / 16)
    assert files_of(many / "unsharded.zarr", "kernel") == 4 * N_IMAGES  # one a block (a tile here)
    assert files_of(many / "unsharded.zarr", "status/records") == 4 * N_IMAGES
    total = sum(1 for f in path.rglob("*") if f.is_file())
    unsharded_total = sum(1 for f in (many / "unsharded.zarr").rglob("*") if f.is_file())
    assert total == unsharded_total - 2 * (4 * N_IMAGES - 3)  # the same files but the blocks'
    xr.testing.assert_identical(xr.open_zarr(path).load().drop_attrs(), unsharded.drop_attrs())
    assert OutputStore(str(path)).completed_blocks().all()


def test_by_default_small_images_are_sharded_all_to_one_file(many, unsharded):
    summary = run_job(job_from_dict(many_job(many, "default.zarr")), progress=False)
    group = zarr.open_group(summary.path, mode="r")
    assert group["kernel"].shards[0] == 48  # 40 images rounded up to whole chunks of 16
    assert files_of(Path(summary.path), "kernel") == 1
    xr.testing.assert_identical(xr.open_zarr(summary.path).load().drop_attrs(), unsharded.drop_attrs())


def test_shards_written_in_many_parts_hold_every_part(many, unsharded, monkeypatch):
    """Every finished image written alone (a shard rewritten whole each time): nothing written before is lost."""
    monkeypatch.setattr(ImageFinisher, "FLUSH_SECONDS", -1.0)
    writes = []
    original = OutputStore.write_images
    monkeypatch.setattr(OutputStore, "write_images", lambda self, results: (writes.append(len(results)),
                                                                             original(self, results))[1])
    summary = run_job(job_from_dict(many_job(many, "parts.zarr", images_per_shard=32)), progress=False)
    assert sum(writes) == N_IMAGES and max(writes) == 1
    xr.testing.assert_identical(xr.open_zarr(summary.path).load().drop_attrs(), unsharded.drop_attrs())


def forget(path: Path, images: slice) -> None:
    """As if the run had stopped before writing ``images``: no records, kernels, diagnostics or model."""
    group = zarr.open_group(path, mode="r+")
    for name in IMAGE_ARRAYS:
        group[name][images] = group[name].fill_value
    group.attrs["kernelmap_status"] = "incomplete"


@pytest.mark.parametrize("method", ["joint", "kernels"])
def test_a_sharded_store_resumes_to_the_uninterrupted_result(many, unsharded, method):
    path = many / f"resumed-{method}.zarr"
    job = many_job(many, path.name, images_per_shard=16)
    job["model"] = {"method": method}
    reference = run_job(job_from_dict({**job, "output": {**job["output"], "path": str(many / f"ref-{method}.zarr")}}),
                        progress=False)
    run_job(job_from_dict(job), progress=False)
    forget(path, slice(10, 30))  # the ends of one shard and the start of the next
    assert OutputStore(str(path)).completed_blocks().sum() == (N_IMAGES - 20) * 4
    # another images_per_shard asked: the store keeps its own
    again = job_from_dict({**job, "output": {**job["output"], "mode": "resume", "images_per_shard": 1}})
    summary = run_job(again, progress=False)
    assert summary.tiles_computed == 20 * 4 and summary.tiles_skipped == (N_IMAGES - 20) * 4
    assert zarr.open_group(path, mode="r")["kernel"].shards[0] == 16
    xr.testing.assert_identical(xr.open_zarr(path).load().drop_attrs(),
                                xr.open_zarr(reference.path).load().drop_attrs())


def test_a_killed_sharded_run_resumes_to_the_uninterrupted_result(tmp_path, many, unsharded):
    """SIGKILL a ``kernelmap run`` after its first shard is written, resume it, compare with a run never
    interrupted."""
    data = many_job(many, "unused.zarr", images_per_shard=16)
    data["input"]["path"] = str(many / "stack.zarr")
    data["output"]["path"] = str(tmp_path / "kernels.zarr")
    data["compute"] = {"scheduler": "threads", "n_workers": 1}
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(data))
    done = kill_run_after(job_file, tmp_path / "kernels.zarr", 1)
    assert 0 < done < N_IMAGES * 4 and done % 4 == 0  # whole images (a shard's, or 10 s worth)
    assert main(["run", str(job_file), "--quiet", "--set", "output.mode=resume"]) == 0
    resumed = xr.open_zarr(tmp_path / "kernels.zarr").load()
    assert resumed.attrs["kernelmap_status"] == "complete"
    xr.testing.assert_identical(resumed.drop_attrs(), unsharded.drop_attrs())


def test_a_sharded_run_stopped_by_an_exception_keeps_the_images_it_finished(many, unsharded, monkeypatch):
    """Ctrl-C (or a failing task) after 25 images: the finished images are written before the run stops
    (a sharded store holds their kernels only once the client writes them); the resumed run computes the
    rest and equals an uninterrupted one."""
    from pipeline.job.blocks import BlockTask

    path = many / "stopped.zarr"
    job = many_job(many, path.name, images_per_shard=32)
    original = BlockTask.__call__
    calls = []

    def stop_after_25_images(self, block, *args):
        calls.append(block)
        if len(calls) > 25 * 4:
            raise KeyboardInterrupt
        return original(self, block, *args)

    monkeypatch.setattr(BlockTask, "__call__", stop_after_25_images)
    with pytest.raises(KeyboardInterrupt):
        run_job(job_from_dict(job), progress=False)
    monkeypatch.setattr(BlockTask, "__call__", original)
    done = OutputStore(str(path)).completed_blocks()
    assert done.sum() == 25 * 4 and done[:25].all()  # none written before, all written on the way out
    assert (zarr.open_group(path, mode="r")["model_degree"][:25] >= 0).all()
    summary = run_job(job_from_dict({**job, "output": {**job["output"], "mode": "resume"}}), progress=False)
    assert summary.tiles_computed == (N_IMAGES - 25) * 4
    xr.testing.assert_identical(xr.open_zarr(path).load().drop_attrs(), unsharded.drop_attrs())
