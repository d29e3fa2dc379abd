"""Shared test settings and helpers: hypothesis profiles, the job builder, the run on an awkward shape."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.register_profile(
    "ci",
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@contextmanager
def strict_warnings() -> Iterator[None]:
    """Every warning an error, as pyproject.toml's ``filterwarnings`` makes it, with the same exceptions:
    an aiohttp session that an object-store test left to the garbage collector may be collected inside
    the block, and its ResourceWarning is not the code's under test."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", "Unclosed client session", ResourceWarning)
        warnings.filterwarnings("ignore", "Unclosed connector", ResourceWarning)
        yield


def job_dict(tmp_path: Path, *, base: dict[str, Any] | None = None, **sections: dict[str, Any]) -> dict[str, Any]:
    """A job as a mapping, for ``job_from_dict``: ``base`` (default: the tests' small synchronous job on
    ``tmp_path/stack.zarr``) with ``sections`` on top.

    A ``kernel`` section replaces the base's (keeping its ``size``), so that another method's options do not
    linger; other sections update the base's keys, and a mapping given for a key that holds a mapping
    (``compute={"batch": {...}}``) updates that mapping.
    """
    data = copy.deepcopy(base) if base is not None else {
        "input": {"path": str(tmp_path / "stack.zarr")},
        "tiles": {"size": 64},
        "kernel": {"size": 9},
        "output": {"path": str(tmp_path / "kernels.zarr")},
        "compute": {"scheduler": "synchronous"},
    }
    for section, values in sections.items():
        if section == "kernel":
            data["kernel"] = {"size": data["kernel"]["size"], **values}
            continue
        data.setdefault(section, {})
        for key, value in values.items():
            if isinstance(value, dict) and isinstance(data[section].get(key), dict):
                data[section][key] = {**data[section][key], **value}
            else:
                data[section][key] = value
    return data


@pytest.fixture(scope="session")
def edge_run(tmp_path_factory) -> tuple[Path, dict]:
    """One default job on a 150x200 stack (kernel 9) with 64-px tiles in blocks of 2x2: tile centres
    31.5 .. 117.5 and 31.5 .. 167.5, the edge tiles sharing blocks.  ``(folder, truth)``; read it, do
    not write into it."""
    from stacks import make_edge_stack

    from pipeline.job.config import job_from_dict
    from pipeline.job.run import run_job

    folder = tmp_path_factory.mktemp("edge")
    truth = make_edge_stack(folder / "stack.zarr", shape=(150, 200), k=9)
    run_job(job_from_dict(job_dict(folder, compute={"block_tiles": 2})), progress=False)
    return folder, truth


def kill_run_after(job_file: Path, output: Path, blocks: int, *, poll: float = 0.02, timeout: float = 120) -> int:
    """Start ``kernelmap run JOB_FILE`` in a process, SIGKILL it once ``output`` records at least ``blocks``
    blocks done, and return how many it had (the test fails where the run ends before)."""
    from pipeline.io.store import OutputStore

    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(job_file), "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    done = 0
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            done = int(OutputStore(str(output)).completed_blocks().sum())
        except Exception:  # not created yet, or a chunk or shard caught mid-write: look again
            done = 0
        if done >= blocks:
            break
        time.sleep(poll)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return done
