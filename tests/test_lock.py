"""One writer per output: the lock beside it refuses a second command, names its holder, is taken over
where stale, and is given back however the command ends."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import xarray as xr
import yaml
from conftest import job_dict
from stacks import make_stack

from pipeline.cli import main
from pipeline.errors import OptionError
from pipeline.io.lock import LockHolder, OutputLock, describe_lock, lock_path, read_lock
from pipeline.io.store import OutputStore
from pipeline.job.config import job_from_dict
from pipeline.job.run import plan_job, run_job


def _write_lock(output: Path, *, host: str | None = None, pid: int | None = None,
                process_started: float | None = None, batch: str = "") -> Path:
    """A lock file as another command would leave it (this process, alive, by default)."""
    pid = os.getpid() if pid is None else pid
    if process_started is None:
        process_started = psutil.Process(os.getpid()).create_time() if pid == os.getpid() else 1.0
    lock = Path(lock_path(output))
    lock.write_text(json.dumps({"host": host or socket.gethostname(), "pid": pid,
                                "started": "2026-01-02T03:04:05+00:00", "process_started": process_started,
                                "command": "kernelmap run other.yaml", "token": "t", "batch": batch}))
    return lock


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _start_run(job_file: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(job_file), "--quiet", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for_blocks(proc: subprocess.Popen, output: Path, blocks: int, timeout: float = 120) -> None:
    """Wait until the run ``proc`` holds its lock and ``output`` records at least ``blocks`` blocks."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if Path(lock_path(output)).exists() and OutputStore(str(output)).completed_blocks().sum() >= blocks:
                return
        except Exception:  # not created yet, or a chunk caught mid-write: look again
            pass
        time.sleep(0.02)
    raise AssertionError(f"the run ended ({proc.poll()}) or took too long before it could be watched")


def _slow_job(tmp_path: Path, n_images: int = 3) -> Path:
    make_stack(tmp_path / "stack.zarr", n_images=n_images, size=256, chunk=64)
    data = job_dict(tmp_path, compute={"scheduler": "threads", "n_workers": 1, "block_tiles": 1},
                    output={"images_per_shard": 1})
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(data))
    return job_file


def test_a_second_run_on_the_same_output_is_refused_naming_the_holder_and_the_first_goes_on(tmp_path):
    job_file = _slow_job(tmp_path, n_images=10)  # long enough for the second to start while it runs
    out = tmp_path / "kernels.zarr"
    first = _start_run(job_file)
    _wait_for_blocks(first, out, 1)
    holder = read_lock(out)
    assert isinstance(holder, LockHolder)
    assert (holder.host, holder.pid) == (socket.gethostname(), first.pid)
    assert holder.command == f"kernelmap run {job_file} --quiet"
    seconds = [_start_run(job_file, "--set", f"output.mode={mode}") for mode in ("resume", "overwrite")]
    for second in seconds:
        err = second.communicate(timeout=120)[1]
        assert second.returncode == 2, err
        assert (f"kernelmap run: output.path {out} is being written by another kernelmap command (host "
                f"{holder.host}, pid {first.pid}, since {holder.started} (kernelmap run {job_file} --quiet); "
                f"lock {lock_path(out)}): nothing was changed; wait for it to end or stop it (kill {first.pid} on "
                f"{holder.host}); if it is not running any more, remove the lock (rm {lock_path(out)})") in err
    assert read_lock(out) == holder  # the first run's lock, untouched
    err = first.communicate(timeout=300)[1]
    assert first.returncode == 0, err
    assert not Path(lock_path(out)).exists()  # given back at the end
    done = xr.open_zarr(out).load()
    assert done.attrs["kernelmap_status"] == "complete"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("kernels.zarr")) == ["kernels.zarr"]
    run_job(job_from_dict(job_dict(tmp_path, output={"path": str(tmp_path / "reference.zarr")})), progress=False)
    xr.testing.assert_identical(done.drop_attrs(), xr.open_zarr(tmp_path / "reference.zarr").load().drop_attrs())


def test_ctrl_c_gives_the_lock_back_and_the_run_resumes(tmp_path):
    job_file = _slow_job(tmp_path)
    out = tmp_path / "kernels.zarr"
    run = _start_run(job_file)
    _wait_for_blocks(run, out, 2)
    run.send_signal(signal.SIGINT)
    err = run.communicate(timeout=120)[1]
    assert run.returncode == 130
    assert "interrupted; run the job again with output.mode=resume" in err
    assert not Path(lock_path(out)).exists()
    assert main(["run", str(job_file), "--quiet", "--set", "output.mode=resume"]) == 0
    assert xr.open_zarr(out).attrs["kernelmap_status"] == "complete" and not Path(lock_path(out)).exists()


def test_a_stale_lock_is_named_and_taken_over(tmp_path):
    make_stack(tmp_path / "stack.zarr", n_images=1, size=128)
    out = tmp_path / "kernels.zarr"
    job = job_from_dict(job_dict(tmp_path))
    dead = _dead_pid()
    lock = _write_lock(out, pid=dead)
    assert describe_lock(out) == (f"stale lock {lock} of host {socket.gethostname()}, pid {dead}, since "
                                  "2026-01-02T03:04:05+00:00 (kernelmap run other.yaml): pid "
                                  f"{dead} is no longer running on {socket.gethostname()}; a run now takes it over")
    assert f"lock       stale lock {lock}" in plan_job(job).describe()
    assert lock.exists()  # the dry run takes nothing
    said: list[str] = []
    run_job(job, progress=False, log=said.append)
    assert said[0] == (f"taking over the stale lock {lock} of host {socket.gethostname()}, pid {dead}, since "
                       f"2026-01-02T03:04:05+00:00 (kernelmap run other.yaml): pid {dead} is no longer running on "
                       f"{socket.gethostname()}")
    assert not lock.exists() and xr.open_zarr(out).attrs["kernelmap_status"] == "complete"
    # a pid that runs again, another process: stale too
    lock = _write_lock(out, pid=os.getpid(), process_started=psutil.Process().create_time() - 3600)
    said.clear()
    run_job(job_from_dict(job_dict(tmp_path, output={"mode": "resume"})), progress=False, log=said.append)
    assert f"pid {os.getpid()} on {socket.gethostname()} is now another process" in said[0]
    assert not lock.exists()


def test_a_live_or_unknown_holder_is_refused_before_anything_is_written(tmp_path, capsys):
    make_stack(tmp_path / "stack.zarr", n_images=1, size=128)
    out = tmp_path / "kernels.zarr"
    data = job_dict(tmp_path)
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(data))
    lock = _write_lock(out, host="node-7.example.org", pid=4242)  # another host: cannot be checked
    plan = plan_job(job_from_dict(data))
    assert "held by host node-7.example.org, pid 4242" in plan.describe()
    assert main(["run", str(job_file), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert (f"output.path {out} is being written by another kernelmap command (host node-7.example.org, pid 4242, "
            "since 2026-01-02T03:04:05+00:00 (kernelmap run other.yaml)") in err
    assert f"remove the lock (rm {lock})" in err
    assert not out.exists() and lock.exists()
    # a lock that is not one: refused too, saying how to clear it
    lock.write_text("{")
    with pytest.raises(OptionError, match=rf"cannot be read as a kernelmap lock.*rm {lock}"):
        run_job(job_from_dict(data), progress=False)
    lock.unlink()
    run_job(job_from_dict(data), progress=False)
    # apply and ingest: the same lock beside their outputs
    from pipeline.job.apply import apply_kernel_map

    images = tmp_path / "images.zarr"
    _write_lock(images)  # this process, alive, but not this apply's
    with pytest.raises(OptionError, match=rf"--out {images} is being written by another kernelmap command \(host "
                                          rf"{socket.gethostname()}, pid {os.getpid()}"):
        apply_kernel_map(out, images, log=lambda _: None)
    assert not images.exists()
    Path(lock_path(images)).unlink()
    apply_kernel_map(out, images, log=lambda _: None)
    assert not Path(lock_path(images)).exists() and xr.open_zarr(images, consolidated=False).attrs[
        "kernelmap_status"] == "complete"


def test_ingest_takes_the_lock_of_its_stack(tmp_path):
    pytest.importorskip("astropy")
    import numpy as np
    from astropy.io import fits

    from pipeline.job.ingest import ingest_fits

    rng = np.random.default_rng(4)
    for name in ("ref", "t1"):
        fits.PrimaryHDU(rng.normal(size=(16, 20)).astype(np.float32)).writeto(tmp_path / f"{name}.fits")
    out = tmp_path / "stack.zarr"
    _write_lock(out)
    with pytest.raises(OptionError, match=rf"{out} is being written by another kernelmap command"):
        ingest_fits(tmp_path / "ref.fits", [tmp_path / "t1.fits"], out, log=lambda _: None)
    assert not out.exists()
    _write_lock(out, pid=_dead_pid())
    said: list[str] = []
    ingest_fits(tmp_path / "ref.fits", [tmp_path / "t1.fits"], out, log=said.append)
    assert said[0].startswith(f"ingest: taking over the stale lock {lock_path(out)}")
    assert not Path(lock_path(out)).exists() and out.exists()


def test_the_lock_is_given_back_on_error_and_re_entered_by_its_thread(tmp_path):
    out = tmp_path / "out.zarr"
    with pytest.raises(RuntimeError), OutputLock(out, command="test") as lock:
        holder = read_lock(out)
        assert isinstance(holder, LockHolder) and holder.command == "test" and holder.pid == os.getpid()
        with OutputLock(out):  # the same thread: re-entered, the file kept
            pass
        assert Path(lock.lock).exists()
        raise RuntimeError
    assert not Path(lock_path(out)).exists()
    assert lock_path("s3://bucket/kernels.zarr/") == "s3://bucket/kernels.zarr.kernelmap.lock"
    assert lock_path(out) == f"{out}.kernelmap.lock"


def test_a_run_to_an_object_store_holds_a_lock_object_beside_its_output(tmp_path, monkeypatch):
    pytest.importorskip("moto.server")
    s3fs = pytest.importorskip("s3fs")
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "kernelmap-test-secret",
                           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}"}.items():
            monkeypatch.setenv(key, value)
        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem()
        fs.mkdir("locks")
        make_stack(tmp_path / "stack.zarr", n_images=1, size=128)
        url = "s3://locks/kernels.zarr"
        data = job_dict(tmp_path, output={"path": url})
        with OutputLock(url, command="kernelmap run elsewhere.yaml"):  # held (by this thread, another command)
            assert fs.cat("locks/kernels.zarr.kernelmap.lock").startswith(b"{")
            with pytest.raises(OptionError, match=rf"output.path {url} is being written by another kernelmap "
                                                  r"command \(.*kernelmap run elsewhere.yaml\)"):
                failure: list[BaseException] = []

                def second() -> None:  # another thread: not this lock's holder
                    try:
                        run_job(job_from_dict(data), progress=False)
                    except BaseException as exc:  # handed to the test's thread
                        failure.append(exc)

                thread = threading.Thread(target=second)
                thread.start()
                thread.join()
                raise failure[0]
        assert not fs.exists("locks/kernels.zarr")
        run_job(job_from_dict(data), progress=False)
        run_job(job_from_dict(job_dict(tmp_path, output={"path": url, "mode": "overwrite"})), progress=False)
        assert not fs.exists("locks/kernels.zarr.kernelmap.lock")
        assert sorted(fs.ls("locks", refresh=True)) == ["locks/kernels.zarr"]  # replaced in place at a URL
        assert xr.open_zarr(url).attrs["kernelmap_status"] == "complete"
    finally:
        server.stop()
        s3fs.S3FileSystem.clear_instance_cache()


def test_a_lock_names_the_batch_job_it_was_taken_in_and_another_hosts_job_is_asked_about(tmp_path, monkeypatch):
    from pipeline.io.lock import LockHolder, read_lock

    monkeypatch.setenv("SLURM_JOB_ID", "7731")
    mine = LockHolder.mine(str(tmp_path / "x.lock"), "kernelmap run job.yaml")
    assert mine.batch == "slurm:7731" and "slurm job 7731" in mine.describe()
    for variable in ("SLURM_JOB_ID", "PBS_JOBID", "JOB_ID"):
        monkeypatch.delenv(variable, raising=False)
    assert LockHolder.mine(str(tmp_path / "x.lock"), "kernelmap run job.yaml").batch == ""
    # another host's lock in a batch job whose system cannot be asked from here (no squeue): not known, refused
    out = tmp_path / "kernels.zarr"
    _write_lock(out, host="node-7.example.org", pid=4242, batch="slurm:7731")
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    holder = read_lock(out)
    assert holder.batch == "slurm:7731" and holder.stale() is None
    assert "pid 4242, slurm job 7731, since" in holder.describe()
