"""Hostile case: the output on a filesystem already full."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
import zarr
from conftest import job_dict
from stacks import make_stack

from pipeline.cli import main


def tree_digest(path: Path) -> str:
    """Names, bytes and modification times of every file under ``path``."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(path)} {file.stat().st_mtime_ns}".encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def test_a_run_onto_a_full_disk_says_so_and_leaves_its_inputs_as_they_were(tmp_path):
    """``kernelmap run`` with its output on a tmpfs already full: exit status 1 and one line saying that the
    disk is full, where, and what to do (no traceback); the input stack and the job file are untouched; and
    once space is freed, the run said (output.mode=resume) goes through."""
    make_stack(tmp_path / "stack.zarr", n_images=2, size=128)
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"a full filesystem is needed, and mounting a tmpfs is not permitted here (root only): "
                    f"{mounted.stderr.strip()}")
    try:
        with open(disk / "filler", "wb", buffering=0) as filler, pytest.raises(OSError, match="No space left"):
            while True:  # fill it up
                filler.write(b"\0" * 4096)
        output = disk / "kernels.zarr"
        job_file = tmp_path / "job.yaml"
        job_file.write_text(yaml.safe_dump(job_dict(tmp_path, output={"path": str(output)})))
        before = tree_digest(tmp_path / "stack.zarr"), job_file.read_bytes()
        result = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(job_file), "--quiet"],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 1, result.stderr
        assert result.stderr == (f"kernelmap run: no space left on device writing {output}: free space, then run "
                                 "the job again with output.mode=resume (--set output.mode=resume) to finish it\n")
        assert (tree_digest(tmp_path / "stack.zarr"), job_file.read_bytes()) == before
        (disk / "filler").unlink()  # space freed (and more of it): the run does as it said
        subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True)
        assert main(["run", str(job_file), "--quiet", "--set", "output.mode=resume"]) == 0
        assert zarr.open_group(output, mode="r").attrs["kernelmap_status"] == "complete"
        assert sorted(p.name for p in disk.iterdir()) == ["kernels.zarr"]  # and no lock left
    finally:
        subprocess.run(["umount", str(disk)], check=True)
