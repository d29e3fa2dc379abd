"""Faults: Ctrl-C, SIGKILLs at random moments, a worker process killed, a full disk.

Each stopped ``kernelmap run`` says what to do in a line and its store resumes to an uninterrupted run's, bit
for bit: every array (kernels, diagnostics, the kernel-field model, the block records, coordinates) with its
metadata, and the root attributes but those that name a run (:data:`BY_DESIGN`).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import yaml
import zarr
from conftest import job_dict
from stacks import make_stack

from pipeline.cli import main
from pipeline.io.store import OutputStore
from pipeline.job.config import job_from_dict
from pipeline.job.run import run_job

SEED = 1203

#: Root attributes that name the run that wrote a store, not what it holds: its identifier, when it was
#: created and finished, the command line that created it, and the job as given (its output.path and
#: compute here).
BY_DESIGN = ("kernelmap_store_id", "kernelmap_created", "kernelmap_finished", "kernelmap_command",
             "kernelmap_config")

#: The stopped run's advice, as ``kernelmap run`` gives it.
RESUME = "run the job again with output.mode=resume (--set output.mode=resume) to finish it"

#: The two layouts of a store, the stacks they are tried on and their blocks: written block by block by the
#: tasks (``images_per_shard: 1``; 8 images of 4x4 tiles, one a block), or in shards of 16 images by the
#: client (160 images of one tile: a shard is written every 16 images).
LAYOUTS = {
    "unsharded": ({"n_images": 8, "size": 256}, {"images_per_shard": 1}),
    "sharded": ({"n_images": 160, "size": 64}, {"images_per_shard": 16}),
}
BLOCKS = {"unsharded": 8 * 16, "sharded": 160}


@pytest.fixture(scope="module")
def stacks(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("faults")
    paths = {}
    for layout, (shape, _) in LAYOUTS.items():
        paths[layout] = folder / f"{layout}-stack.zarr"
        make_stack(paths[layout], chunk=64, noise=0.5, **shape)
    return paths


@pytest.fixture(scope="module")
def references(stacks, tmp_path_factory) -> Callable[[str], Path]:
    """The store of an uninterrupted run of each layout (made on first use)."""
    folder = tmp_path_factory.mktemp("references")
    made: dict[str, Path] = {}

    def reference(layout: str) -> Path:
        if layout not in made:
            data = fault_job(folder, stacks, layout, output=folder / f"{layout}.zarr")
            made[layout] = Path(run_job(job_from_dict(data), progress=False).path)
        return made[layout]

    return reference


def fault_job(folder: Path, stacks: dict[str, Path], layout: str, *, output: Path, **compute: Any) -> dict:
    """The job of ``layout`` (blocks of one tile), in this process's threads unless ``compute`` says otherwise."""
    data = job_dict(folder, compute={"scheduler": "synchronous", "block_tiles": 1, **compute},
                    output={"path": str(output), **LAYOUTS[layout][1]})
    data["input"]["path"] = str(stacks[layout])
    return data


def write_job(folder: Path, data: dict) -> Path:
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def start_run(job_file: Path, *args: str, session: bool = False) -> subprocess.Popen:
    """``kernelmap run JOB_FILE --quiet ARGS`` in a process (in a session of its own: a group Ctrl-C reaches)."""
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(job_file), "--quiet", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=session)


def blocks_done(output: Path) -> int:
    """Blocks the store records done (-1: no store, or its records caught mid-write)."""
    try:
        return int(OutputStore(str(output)).completed_blocks().sum())
    except Exception:
        return -1


def wait_for_blocks(proc: subprocess.Popen, output: Path, at_least: int, *, timeout: float = 120) -> int:
    """Wait until the run's store records at least ``at_least`` blocks; how many it has then."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        done = blocks_done(output)
        if done >= at_least:
            return done
        time.sleep(0.02)
    proc.kill()
    _, err = proc.communicate()
    pytest.fail(f"the run ended (status {proc.returncode}) or took {timeout} s before {at_least} blocks were "
                f"done: {err}")


def resume(job_file: Path) -> None:
    assert main(["run", str(job_file), "--quiet", "--set", "output.mode=resume"]) == 0


def arrays(group: zarr.Group, prefix: str = "") -> Iterator[tuple[str, zarr.Array]]:
    for name, member in sorted(group.members()):
        if isinstance(member, zarr.Group):
            yield from arrays(member, f"{prefix}{name}/")
        else:
            yield f"{prefix}{name}", member


def assert_same_store(path: Path, reference: Path) -> None:
    """Every array of ``path`` equals ``reference``'s bit for bit, with its metadata (chunks, shards, codecs,
    attributes); so do the root attributes but :data:`BY_DESIGN`; and the store is complete."""
    got, want = zarr.open_group(path, mode="r"), zarr.open_group(reference, mode="r")
    got_arrays, want_arrays = dict(arrays(got)), dict(arrays(want))
    assert sorted(got_arrays) == sorted(want_arrays)
    assert "status/records" in want_arrays and "model_coefficient" in want_arrays and "kernel" in want_arrays
    for name, array in want_arrays.items():
        mine = got_arrays[name]
        assert mine.metadata.to_dict() == array.metadata.to_dict(), name
        a, b = np.asarray(mine[...]), np.asarray(array[...])
        assert a.dtype == b.dtype and a.shape == b.shape, name
        if a.dtype.kind in "OUST":
            assert a.tolist() == b.tolist(), name
        else:
            assert np.array_equal(a, b, equal_nan=True) and a.tobytes() == b.tobytes(), name  # NaNs' bits too
    attrs, expected = dict(got.attrs), dict(want.attrs)
    assert attrs["kernelmap_status"] == "complete"
    for key in BY_DESIGN:
        assert key in attrs and key in expected, key
        del attrs[key], expected[key]
    assert attrs == expected


# ---- Ctrl-C


def worker_processes(pid: int) -> list[psutil.Process]:
    """The Dask worker processes a run started (not multiprocessing's resource tracker)."""
    found = []
    for process in psutil.Process(pid).children(recursive=True):
        try:
            if "spawn_main" in " ".join(process.cmdline()):
                found.append(process)
        except psutil.NoSuchProcess:
            pass
    return found


def interrupt(proc: subprocess.Popen) -> str:
    """SIGINT to the run's whole process group, as Ctrl-C at a terminal sends it: the run ends with status
    130 and the one line that says how to finish it, with no traceback or cluster log; its stderr."""
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=90)
    assert proc.returncode == 130, err
    assert err.splitlines()[-1] == f"interrupted; {RESUME}", err
    assert len(err.splitlines()) <= 3 and "Traceback" not in err and "distributed" not in err, err
    return err


def test_ctrl_c_while_the_workers_start_says_one_line(tmp_path, stacks):
    """Ctrl-C as soon as the local cluster's worker processes exist, while they import what they run (where
    each would die printing its traceback): the one line all the same, and the workers are gone."""
    output = tmp_path / "kernels.zarr"
    job_file = write_job(tmp_path, fault_job(tmp_path, stacks, "unsharded", output=output, scheduler="local"))
    proc = start_run(job_file, session=True)
    deadline = time.monotonic() + 60
    while not (workers := worker_processes(proc.pid)) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert workers, "no worker process started"
    interrupt(proc)
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive


def test_ctrl_c_says_one_line_and_the_store_resumes(tmp_path, stacks, references):
    """Ctrl-C once the first blocks are written, on the default local cluster of two worker processes: the
    one line, the workers gone, and the store resumes to the uninterrupted result."""
    output = tmp_path / "kernels.zarr"
    job_file = write_job(tmp_path, fault_job(tmp_path, stacks, "unsharded", output=output, scheduler="local"))
    proc = start_run(job_file, session=True)
    done = wait_for_blocks(proc, output, 2)
    workers = worker_processes(proc.pid)
    assert len(workers) == 2
    interrupt(proc)
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive
    assert 2 <= done <= blocks_done(output) < BLOCKS["unsharded"]
    resume(job_file)
    assert_same_store(output, references("unsharded"))


# ---- SIGKILLs


@pytest.mark.parametrize("layout", ["unsharded", "sharded"])
def test_sigkills_at_random_moments_resume_to_the_uninterrupted_store(tmp_path, stacks, references, layout):
    """Five runs SIGKILLed, each resuming the last: each is killed once its store records a few more blocks
    (unsharded: 1 to 5 more, written by the tasks; sharded: the next shard, written by the client), and a
    random pause later, so that the kill falls anywhere in what follows; then a run to the end.  The store
    equals an uninterrupted run's."""
    rng = random.Random(SEED)
    output = tmp_path / "kernels.zarr"
    job_file = write_job(tmp_path, fault_job(tmp_path, stacks, layout, output=output, scheduler="threads",
                                             n_workers=1))
    done, kills = 0, []
    for trial in range(5):
        proc = start_run(job_file, *(["--set", "output.mode=resume"] if trial else []))
        wait_for_blocks(proc, output, done + (rng.randint(1, 4) if layout == "unsharded" else 1))
        time.sleep(rng.uniform(0.0, 0.05 if layout == "unsharded" else 0.1))
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.kill()
        proc.communicate()
        kills.append(blocks_done(output))
        assert done < kills[-1] < BLOCKS[layout], kills
        done = kills[-1]
    if layout == "sharded":
        assert all(n % 16 == 0 for n in kills), kills  # whole shards (of one-tile images)
    resume(job_file)
    assert_same_store(output, references(layout))


# ---- a worker killed


def test_a_worker_process_killed_at_a_random_moment_changes_nothing(tmp_path, stacks, references):
    """One of the local cluster's two worker processes SIGKILLed at a random moment of the run: Dask runs its
    lost tasks again on the workers left (and the one its nanny starts anew), the run completes, and its store
    equals an uninterrupted run's."""
    rng = random.Random(SEED)
    output = tmp_path / "kernels.zarr"
    job_file = write_job(tmp_path, fault_job(tmp_path, stacks, "unsharded", output=output, scheduler="local",
                                             n_workers=2, threads_per_worker=1))
    proc = start_run(job_file)
    wait_for_blocks(proc, output, rng.randint(1, 24))
    time.sleep(rng.uniform(0.0, 0.2))
    workers = sorted(worker_processes(proc.pid), key=lambda p: p.pid)
    assert len(workers) == 2
    victim = rng.choice(workers)
    assert proc.poll() is None, "the run ended before a worker could be killed"
    victim.kill()
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    assert not victim.is_running()
    assert_same_store(output, references("unsharded"))


# ---- a full disk


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Callable[[str], Path]]:
    """A tmpfs of a given size at ``tmp_path/disk`` (``remount(size)`` resizes it); unmounted at the end.
    Skipped where mounting is not permitted (it needs root)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = False

    def mount(size: str) -> Path:
        nonlocal mounted
        options = f"remount,size={size}" if mounted else f"size={size}"
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(disk)], capture_output=True,
                                text=True)
        if result.returncode != 0:
            if not mounted:
                pytest.skip(f"a small filesystem is needed, and mounting a tmpfs is not permitted here "
                            f"(root only): {result.stderr.strip()}")
            pytest.fail(f"remounting {disk}: {result.stderr}")
        mounted = True
        return disk

    try:
        yield mount
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)], check=True)


@pytest.mark.parametrize("layout, scheduler, size", [
    ("unsharded", "local", "400k"),  # the tasks write, in a worker process: its error comes back to the run
    ("sharded", "threads", "300k"),  # the run's own process writes
])
def test_a_full_disk_says_so_and_the_store_resumes_once_space_is_freed(tmp_path, stacks, references, small_disk,
                                                                      layout, scheduler, size):
    disk = small_disk(size)
    output = disk / "kernels.zarr"
    job_file = write_job(tmp_path, fault_job(tmp_path, stacks, layout, output=output, scheduler=scheduler,
                                             n_workers=1))
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(job_file), "--quiet"],
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 1, result.stderr
    assert result.stderr == (f"kernelmap run: no space left on device writing {output}: free space, then "
                             f"{RESUME}\n")
    assert 0 < blocks_done(output) < BLOCKS[layout]  # stopped mid-way
    small_disk("16m")
    resume(job_file)
    assert_same_store(output, references(layout))


@pytest.mark.parametrize(("argv", "said"), [
    (["apply", "kernels.zarr", "--out", "images.zarr"],
     "kernelmap apply: no space left on device writing images.zarr: free space, then run the same kernelmap apply "
     "again with --resume to finish it"),
    (["ingest", "ref.fits", "t.fits", "--out", "stack.zarr"],
     "kernelmap ingest: disk quota exceeded writing stack.zarr: free space, then run the same kernelmap ingest again "
     "to finish it"),
])
def test_a_full_disk_under_other_errors_is_named_and_other_errors_are_not(monkeypatch, capsys, argv, said):
    """The error of a full disk (or quota) is found where another error arose from it; any other error still
    reaches its caller as it is."""
    import errno

    import pipeline.cli as cli

    def full(args):
        try:
            raise OSError(errno.ENOSPC if argv[0] == "apply" else errno.EDQUOT, "full")
        except OSError as exc:
            raise RuntimeError("writing a chunk failed") from exc

    monkeypatch.setattr(cli, f"_cmd_{argv[0]}", full)
    assert main(argv) == 1
    assert capsys.readouterr().err == said + "\n"

    def other(args):
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(cli, f"_cmd_{argv[0]}", other)
    with pytest.raises(PermissionError):
        main(argv)


def test_the_cluster_s_loggers_are_quiet_only_while_an_interrupted_run_closes_it():
    """:class:`ShutdownHush` silences ``distributed``, ``tornado``, ``asyncio`` (and their loggers with levels
    of their own) after a KeyboardInterrupt, gives back every level after, and changes nothing on other exits."""
    import logging

    from pipeline.job.executors import ShutdownHush

    names = ("distributed", "distributed.client", "distributed.nanny", "tornado", "asyncio")
    before = {name: logging.getLogger(name).level for name in names}
    hush = ShutdownHush()
    hush(RuntimeError, RuntimeError("a task failed"), None)
    assert {name: logging.getLogger(name).level for name in names} == before
    hush(KeyboardInterrupt, KeyboardInterrupt(), None)
    assert not any(logging.getLogger(name).isEnabledFor(logging.CRITICAL) for name in names)
    hush.restore()
    assert {name: logging.getLogger(name).level for name in names} == before


def test_ctrl_c_inside_a_weakref_callback_still_interrupts_the_command(monkeypatch, capsys):
    """Python drops an exception raised in a weakref callback or a finaliser (it prints "Exception ignored"
    and carries on): Ctrl-C falling there would be lost, and where the callback held the import lock, every
    other thread's import would wait for ever.  The command is interrupted all the same, without that print."""
    import weakref

    import pipeline.cli as cli

    def run(args):
        def interrupted(ref):
            raise KeyboardInterrupt

        class Thing:
            pass

        thing = Thing()
        ref = weakref.ref(thing, interrupted)
        del thing  # the callback runs here, its KeyboardInterrupt dropped by Python
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the command goes on: interrupted again at once
            time.sleep(0.01)
        return ref  # never reached

    monkeypatch.setattr(cli, "_cmd_run", run)
    hook = sys.unraisablehook
    started = time.monotonic()
    assert main(["run", "job.yaml"]) == 130
    assert time.monotonic() - started < 5
    assert capsys.readouterr().err == f"interrupted; {RESUME}\n"
    assert sys.unraisablehook is hook


def test_a_full_disk_stops_apply_with_what_to_do_and_resume_finishes_it(tmp_path, references, small_disk):
    """``kernelmap apply`` onto a small tmpfs: stopped with the line that names the output and ``--resume``;
    once the disk is larger, ``--resume`` finishes it, equal to an apply never stopped."""
    kernels = references("unsharded")
    assert main(["apply", str(kernels), "--out", str(tmp_path / "images.zarr"), "--chunk", "128"]) == 0
    disk = small_disk("1m")
    output = disk / "images.zarr"
    argv = [sys.executable, "-m", "pipeline.cli", "apply", str(kernels), "--out", str(output), "--chunk", "128"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=180)
    assert result.returncode == 1, result.stderr
    assert result.stderr == (f"kernelmap apply: no space left on device writing {output}: free space, then run the "
                             "same kernelmap apply again with --resume to finish it\n")
    small_disk("32m")
    assert main(["apply", str(kernels), "--out", str(output), "--chunk", "128", "--resume"]) == 0
    got, want = zarr.open_group(output, mode="r"), zarr.open_group(tmp_path / "images.zarr", mode="r")
    assert dict(got.attrs) == dict(want.attrs)
    got_arrays, want_arrays = dict(arrays(got)), dict(arrays(want))
    assert sorted(got_arrays) == sorted(want_arrays) and "difference" in want_arrays
    for name, array in want_arrays.items():
        assert got_arrays[name].metadata.to_dict() == array.metadata.to_dict(), name
        assert np.asarray(got_arrays[name][...]).tobytes() == np.asarray(array[...]).tobytes(), name
