"""Hostile pixels: images all NaN, all inf, constant, or whose chunks are gone, and a chunk whose bytes are
damaged.  Pixels are read only by the run itself, so these are not refused up front: an image none of whose
tiles is usable gives exit status 3 after a complete output (naming the image, the flag and what to change),
and a damaged chunk stops the run with exit status 2 (:class:`InputError` naming the array, the chunk and the
fix), keeping the blocks done for a resume.  In every case no byte of the input changes."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from pipeline.cli import main
from pipeline.errors import InputError
from pipeline.job.run import EXIT_UNUSABLE, run_job

from .conftest import assert_unchanged, job_file, raises_exactly, small_stack, snapshot


def _fill(value: float, array: str = "target", image: int = 1):
    def mutate(stack: Path) -> None:
        z = zarr.open_group(str(stack), mode="r+")[array]
        z[image] = np.full(z.shape[1:], value, dtype=z.dtype)
    return mutate


def _chunks_gone(stack: Path) -> None:
    shutil.rmtree(stack / "target" / "c" / "1")  # every chunk of image 1: read as the fill value, NaN


UNUSABLE = [
    pytest.param(_fill(np.nan), {}, "image 1 ('epoch-1'): 4 of 4 tiles unusable: no_data 4",
                 "set kernel.size smaller or tiles.size larger", id="all-nan-target"),
    pytest.param(_fill(np.inf), {}, "image 1 ('epoch-1'): 4 of 4 tiles unusable: no_data 4",
                 "NaN/inf in the source or target", id="all-inf-target"),
    pytest.param(_fill(7.0, "source", 0), {"shared_source": False},
                 "image 0 ('epoch-0'): 4 of 4 tiles unusable: no_signal 4",
                 "neither image is blank or constant", id="constant-source"),
    pytest.param(_chunks_gone, {}, "image 1 ('epoch-1'): 4 of 4 tiles unusable: no_data 4",
                 "mask fewer pixels", id="missing-chunks-of-an-image"),
]


@pytest.mark.parametrize(("mutate", "stack_options", "named", "fix"), UNUSABLE)
def test_an_unusable_image_is_named_after_a_complete_output(tmp_path, capsys, mutate, stack_options, named, fix):
    small_stack(tmp_path / "stack.zarr", **stack_options)
    mutate(tmp_path / "stack.zarr")
    job = job_file(tmp_path)
    before = snapshot(tmp_path / "stack.zarr", job)
    capsys.readouterr()
    assert main(["run", str(job), "--quiet"]) == EXIT_UNUSABLE == 3
    err = capsys.readouterr().err
    assert named in err and fix in err and "Traceback" not in err
    assert f"the output is complete: {tmp_path / 'kernels.zarr'}" in err
    assert_unchanged(before, snapshot(tmp_path / "stack.zarr", job))
    ds = xr.open_zarr(tmp_path / "kernels.zarr")
    assert ds.attrs["kernelmap_status"] == "complete"
    image = int(named.split()[1])
    assert np.isnan(ds["kernel"].values[image]).all() and np.isfinite(ds["kernel"].values[1 - image]).all()
    summary = run_job(job, overrides=["output.mode=resume"], progress=False)  # the API says so in its summary
    assert [u.index for u in summary.unusable_images] == [image]
    assert_unchanged(before, snapshot(tmp_path / "stack.zarr", job))


def test_a_damaged_chunk_stops_the_run_naming_it_and_the_fix(tmp_path, capsys):
    small_stack(tmp_path / "stack.zarr")
    chunk = tmp_path / "stack.zarr" / "target" / "c" / "1" / "1" / "0"
    chunk.write_bytes(b"\x00 not zstd \xff" * 3)
    job = job_file(tmp_path, output={"images_per_shard": 1})
    before = snapshot(tmp_path / "stack.zarr", job)
    capsys.readouterr()
    assert main(["run", str(job), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "array 'target', chunk (1, 1, 0)" in err and "cannot be read" in err and "Traceback" not in err
    assert "Restore it from its source" in err and "output.mode=resume" in err
    assert_unchanged(before, snapshot(tmp_path / "stack.zarr", job))
    assert xr.open_zarr(tmp_path / "kernels.zarr").attrs["kernelmap_status"] == "incomplete"  # kept to resume
    error = raises_exactly(InputError, lambda: run_job(job, overrides=["output.mode=resume"], progress=False),
                           watch=[tmp_path / "stack.zarr"])
    assert "chunk (1, 1, 0)" in str(error)
