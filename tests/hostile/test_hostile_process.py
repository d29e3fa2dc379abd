"""Hostile inputs given to the command as a user runs it, in a process of its own (``python -m pipeline`` and
the installed ``kernelmap``): the exit status of the refusal, one message on stderr and no traceback, nothing
on stdout, nothing written, and a refusal that comes at once (a pipe in a file's place is not waited on)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from .conftest import assert_unchanged, job_file, small_stack, snapshot


def _kernelmap() -> list[str]:
    found = shutil.which("kernelmap", path=os.path.dirname(sys.executable)) or shutil.which("kernelmap")
    if found is None:
        pytest.skip("the kernelmap command is not installed (pip install -e .) in this environment")
    return [found]


def _module() -> list[str]:
    return [sys.executable, "-m", "pipeline"]


def _missing_store(tmp: Path) -> tuple[list[str], str]:
    return ["run", str(job_file(tmp)), "--quiet"], "input.path: no Zarr store at"


def _not_yaml(tmp: Path) -> tuple[list[str], str]:
    small_stack(tmp / "stack.zarr")
    return ["run", str(job_file(tmp, "input: {path: [x\n")), "--quiet"], "invalid YAML"


def _enum_typo(tmp: Path) -> tuple[list[str], str]:
    small_stack(tmp / "stack.zarr")
    return (["run", str(job_file(tmp)), "--quiet", "--set", "kernel.method=welsh"],
            "kernel.method: 'welsh' is not one of lstsq, welch, ratio (did you mean 'welch'?)")


def _fits_pipe(tmp: Path) -> tuple[list[str], str]:
    from astropy.io import fits

    fits.PrimaryHDU(np.ones((32, 32), np.float32)).writeto(tmp / "ref.fits")
    os.mkfifo(tmp / "target.fits")
    return (["ingest", str(tmp / "ref.fits"), str(tmp / "target.fits"), "--out", str(tmp / "stack.zarr"), "--quiet"],
            "target.fits is not a regular file (a pipe")


def _unreachable_object_store(tmp: Path) -> tuple[list[str], str]:
    """An S3 endpoint nothing listens on: s3fs's own error (not an OSError) and, before, a hundred lines of
    abandoned requests' tracebacks after the message."""
    pytest.importorskip("s3fs")
    text = ("input:\n  path: s3://bucket/stack.zarr\n  storage_options: {endpoint_url: 'http://127.0.0.1:9', "
            "key: a, secret: b}\noutput:\n  path: kernels.zarr\n")
    return ["run", str(job_file(tmp, text)), "--dry-run"], "input.path: cannot read s3://bucket/stack.zarr"


@pytest.mark.parametrize(("how", "build"), [(_module, _missing_store), (_module, _fits_pipe), (_kernelmap, _not_yaml),
                                           (_kernelmap, _enum_typo), (_kernelmap, _unreachable_object_store)],
                         ids=["module-missing-store", "module-fits-pipe", "kernelmap-not-yaml", "kernelmap-enum-typo",
                              "kernelmap-unreachable-object-store"])
def test_the_process_exits_2_with_one_message_and_no_traceback(tmp_path, how, build):
    argv, message = build(tmp_path)
    before = snapshot(tmp_path)
    done = subprocess.run([*how(), *argv], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"kernelmap {argv[0]}: ")
    assert done.stdout == ""
    assert "Exception ignored" not in done.stderr
    assert_unchanged(before, snapshot(tmp_path))
