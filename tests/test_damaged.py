"""A damaged input chunk: the run stops with a message naming the array, the chunk and the store, keeps what
it finished, and once the chunk is restored the resumed run equals an uninterrupted one."""

from __future__ import annotations

import shutil

import pytest
import xarray as xr
import yaml
from conftest import job_dict
from stacks import make_stack

from pipeline.cli import main
from pipeline.io.store import OutputStore


@pytest.mark.parametrize("direction", ["auto", "forward"])
def test_a_truncated_target_chunk_is_named_and_the_run_resumes_once_it_is_restored(tmp_path, capsys, direction):
    """Either direction setting (``auto`` fits a block of an undecided image in its own tiles' way): the blocks
    finished before the damaged chunk are kept."""
    make_stack(tmp_path / "stack.zarr", n_images=3, noise=0.5)
    shutil.copytree(tmp_path / "stack.zarr", tmp_path / "intact.zarr")
    chunk = tmp_path / "stack.zarr" / "target" / "c" / "1" / "2" / "0"  # image 1, the third row of 64-px chunks
    intact = chunk.read_bytes()
    chunk.write_bytes(intact[: len(intact) // 3])
    job = job_dict(tmp_path, output={"images_per_shard": 1},  # each block kept as its task writes it
                   kernel={"direction": direction})
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(job))
    assert main(["run", str(job_file)]) == 2
    err = capsys.readouterr().err
    assert "array 'target', chunk (1, 2, 0)" in err and "cannot be read" in err and "stack.zarr" in err
    assert "Restore it from its source" in err and "output.mode=resume" in err
    assert "Traceback" not in err
    assert chunk.read_bytes() == intact[: len(intact) // 3]  # the input is not written
    done = OutputStore(str(tmp_path / "kernels.zarr")).completed_blocks()
    assert 0 < done.sum() < done.size and not done[1, 2, 0]
    chunk.write_bytes(intact)  # restored
    assert main(["run", str(job_file), "--set", "output.mode=resume"]) == 0
    reference = job_dict(tmp_path, input={"path": str(tmp_path / "intact.zarr")},
                         output={"path": str(tmp_path / "reference.zarr")}, kernel={"direction": direction})
    (tmp_path / "reference.yaml").write_text(yaml.safe_dump(reference))
    assert main(["run", str(tmp_path / "reference.yaml")]) == 0
    xr.testing.assert_identical(xr.open_zarr(tmp_path / "kernels.zarr").load().drop_attrs(),
                                xr.open_zarr(tmp_path / "reference.zarr").load().drop_attrs())
