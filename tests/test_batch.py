"""Jobs on a batch system: worker jobs through dask-jobqueue on a real Slurm, and their faults.

The Slurm tests need a Slurm that answers (``sudo scripts/start-slurm``
starts a single-node one); they skip without one, and fail instead where
``KERNELMAP_REQUIRE_SLURM=1`` (CI).  All traffic stays on loopback, every
wait is bounded, logs go to each test's own folder.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import psutil
import pytest
import xarray as xr
import yaml
from conftest import job_dict as build_job
from stacks import make_stack

from pipeline.cli import main
from pipeline.errors import BatchError, OptionError
from pipeline.io.store import OutputStore
from pipeline.job.batch import worker_job_script
from pipeline.job.config import job_from_dict
from pipeline.job.run import plan_job, run_job
from pipeline.job.submit import Submission, wait_for_job

REQUIRE_SLURM = os.environ.get("KERNELMAP_REQUIRE_SLURM") == "1"


def _slurm_problem() -> str | None:
    """Why no Slurm can run jobs here, or None when one answers with a usable node."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return "no sbatch/sinfo on PATH"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 10 s"
    if out.returncode != 0:
        return f"sinfo failed: {out.stderr.strip()[:200]}"
    if not any(state.startswith(("idle", "mix", "alloc")) for state in out.stdout.split()):
        return f"no usable node (states: {out.stdout.split()})"
    return None


@pytest.fixture(scope="session")
def slurm() -> None:
    problem = _slurm_problem()
    if problem is not None:
        message = f"no Slurm answers here ({problem}); start one with `sudo scripts/start-slurm`"
        if REQUIRE_SLURM:
            pytest.fail(message + " (KERNELMAP_REQUIRE_SLURM=1: these tests must run)")
        pytest.skip(message)


def job_dict(tmp_path: Path, **sections) -> dict:
    """A Welch job on two Slurm worker jobs (``compute.batch``), ``sections`` on top."""
    name = f"km-test-{uuid.uuid4().hex[:8]}"
    base = {
        "input": {"path": str(tmp_path / "stack.zarr")},
        "tiles": {"size": 64},
        "kernel": {"size": 9, "method": "welch", "segment_size": 32},
        "output": {"path": str(tmp_path / "kernels.zarr")},
        "compute": {
            "scheduler": "slurm",
            "batch": {"queue": "debug", "cores": 1, "memory": "1GB", "walltime": "00:10:00",
                      "interface": "lo", "jobs": 2, "job_extra_directives": ["--no-requeue"],
                      "log_directory": str(tmp_path / "logs"), "options": {"job_name": name}},
        },
    }
    return build_job(tmp_path, base=base, **sections)


def reference(tmp_path: Path, data: dict) -> xr.Dataset:
    """The same job computed in this process, without a cluster."""
    local = {**data, "output": {"path": str(tmp_path / "reference.zarr")},
             "compute": {"scheduler": "synchronous"}}
    run_job(job_from_dict(local), progress=False)
    return xr.open_zarr(tmp_path / "reference.zarr").load()


def our_jobs(data: dict) -> list[str]:
    name = data["compute"]["batch"]["options"]["job_name"]
    out = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i %T"], capture_output=True, text=True,
                         timeout=10, check=True)
    return [line.split()[0] for line in out.stdout.splitlines() if line.split()[1:] == ["RUNNING"]]


def wait_until(predicate, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {seconds} s waiting for {what}")


def assert_same_result(path: Path, expected: xr.Dataset) -> None:
    got = xr.open_zarr(path).load()
    assert got.attrs["kernelmap_status"] == "complete"
    xr.testing.assert_identical(got.drop_attrs(), expected.drop_attrs())


# --------------------------------------------------------------------------- without a batch system


def test_dry_run_shows_the_worker_job_script(tmp_path):
    make_stack(tmp_path / "stack.zarr")
    data = job_dict(tmp_path, compute={"batch": {"account": "survey42", "worker_lifetime": "50m",
                                                 "worker_lifetime_stagger": "4m"}})
    text = plan_job(job_from_dict(data)).describe()
    assert "slurm worker jobs through dask-jobqueue, 2 job(s)" in text
    for line in ("#SBATCH -p debug", "#SBATCH -A survey42", "#SBATCH --mem=954M", "#SBATCH -t 00:10:00",
                 "#SBATCH --no-requeue", "export OMP_NUM_THREADS=1", "--lifetime 50m --lifetime-stagger 4m",
                 f"#SBATCH -e {tmp_path / 'logs'}", "--interface lo"):
        assert line in text, line
    sge = job_dict(tmp_path, compute={"scheduler": "sge", "batch": {"account": "survey42", "options": {}}})
    assert "#$ -P survey42" in worker_job_script(job_from_dict(sge))  # SGE calls the account a project


def test_unset_batch_settings_come_from_the_dask_jobqueue_configuration(tmp_path):
    import dask

    from pipeline.job.batch import _jobqueue

    _jobqueue()  # its defaults must exist before the override (which is undone after)

    make_stack(tmp_path / "stack.zarr")
    data = job_dict(tmp_path, compute={"batch": {"queue": None, "cores": None, "memory": None,
                                                 "walltime": None}})
    user = {"jobqueue.slurm.queue": "from-config", "jobqueue.slurm.cores": 3,
            "jobqueue.slurm.memory": "3GB", "jobqueue.slurm.walltime": "01:23:00"}
    with dask.config.set(user):
        script = worker_job_script(job_from_dict(data))
        assert "#SBATCH -p from-config" in script and "#SBATCH --cpus-per-task=3" in script
        assert "#SBATCH -t 01:23:00" in script
        # what the job file sets beats the user's configuration
        data["compute"]["batch"]["queue"] = "debug"
        assert "#SBATCH -p debug" in worker_job_script(job_from_dict(data))


def test_batch_text_settings_are_not_taken_for_yaml_numbers(tmp_path):
    from pipeline.job.config import ConfigError

    with pytest.raises(ConfigError, match=r"compute.batch.walltime: 7200 is a number.*quote it"):
        job_from_dict(job_dict(tmp_path), ["compute.batch.walltime=2:00:00"])  # YAML 1.1 reads seconds
    assert job_from_dict(job_dict(tmp_path), ["compute.batch.walltime='2:00:00'"]).compute.batch.walltime \
        == "2:00:00"
    with pytest.raises(ConfigError, match="compute.batch.adapt.minimum_jobs: 0 is too small: at least 1"):
        job_from_dict(job_dict(tmp_path, compute={"batch": {"adapt": {"minimum_jobs": 0}}}))


def test_batch_settings_are_checked_before_anything_runs(tmp_path):
    make_stack(tmp_path / "stack.zarr")
    data = job_dict(tmp_path, compute={"batch": {"cores": None, "memory": None}})
    with pytest.raises(OptionError, match="compute.batch.cores and compute.batch.memory"):
        run_job(job_from_dict(data), progress=False)
    data = job_dict(tmp_path, compute={"batch": {"options": {"no_such_setting": 1}}})
    with pytest.raises(OptionError, match="no_such_setting"):
        run_job(job_from_dict(data), progress=False)
    assert not (tmp_path / "kernels.zarr").exists()


# --------------------------------------------------------------------------- the table of batch systems


def test_every_batch_system_has_one_table_entry_used_by_worker_jobs():
    import inspect

    from pipeline.job.batch import _jobqueue
    from pipeline.job.config import BATCH_SYSTEMS
    from pipeline.job.systems import BATCH_SYSTEMS_TABLE

    assert set(BATCH_SYSTEMS_TABLE) == set(BATCH_SYSTEMS)
    jobqueue = _jobqueue()
    for name, system in BATCH_SYSTEMS_TABLE.items():
        assert system.name == name
        job_cls = getattr(jobqueue, system.cluster_class).job_cls
        if name != "htcondor":  # HTCondorJob takes no account at all
            assert system.account_keyword in inspect.signature(job_cls.__init__).parameters, name
        whole_job = (system.submit_command, system.directive_prefix, system.header, system.cpus_variable,
                     system.job_id_variable, system.status_command, system.listed)
        assert all(entry is not None for entry in whole_job) == system.can_submit, name
        assert all(entry is None for entry in whole_job) != system.can_submit, name
    assert [s.name for s in BATCH_SYSTEMS_TABLE.values() if s.can_submit] == ["slurm", "pbs", "sge"]


def test_the_submit_script_comes_from_the_table(tmp_path, monkeypatch):
    import dataclasses

    from pipeline.job import systems
    from pipeline.job.submit import submission_script

    data = job_dict(tmp_path, compute={"batch": {"account": "survey42", "cores": 3}})
    for name in ("slurm", "pbs", "sge"):
        system = systems.BATCH_SYSTEMS_TABLE[name]
        job = job_from_dict({**data, "compute": {**data["compute"], "scheduler": name}})
        lines = submission_script(job).splitlines()
        folder = tmp_path / "kernels.zarr.batch"
        directives = [line for line in lines if line.startswith(system.directive_prefix + " ")]
        assert directives == system.directives(job, folder) and directives[-1].endswith("--no-requeue")
        assert f"WORKERS=${{{system.cpus_variable}:-3}}" in lines
        assert "job=${SLURM_JOB_ID:-${PBS_JOBID:-${JOB_ID:-unknown}}}" in lines  # whichever system runs it
    # an entry changed in the table changes the script
    slurm = systems.BATCH_SYSTEMS_TABLE["slurm"]
    monkeypatch.setitem(systems.BATCH_SYSTEMS_TABLE, "slurm", dataclasses.replace(
        slurm, directive_prefix="#TEST", header=lambda job, folder: ["-x 1"], cpus_variable="TEST_CPUS"))
    text = submission_script(job_from_dict(data))
    assert "#TEST -x 1\n#TEST --no-requeue\n" in text and "WORKERS=${TEST_CPUS:-3}" in text
    assert "#SBATCH" not in text


@pytest.mark.parametrize("system", ["lsf", "htcondor"])
def test_systems_without_whole_job_scripts_say_so(tmp_path, system):
    from pipeline.job.submit import submission_script

    data = job_dict(tmp_path, compute={"scheduler": system})
    with pytest.raises(OptionError, match=f"kernelmap submit writes scripts for slurm, pbs, sge, not {system}"):
        submission_script(job_from_dict(data))


def test_status_answers_are_read_per_system():
    from subprocess import CompletedProcess

    from pipeline.job.systems import BATCH_SYSTEMS_TABLE as table

    def answer(returncode=0, stdout="", stderr=""):
        return CompletedProcess([], returncode, stdout, stderr)

    assert table["slurm"].status("42") == ["squeue", "-h", "-j", "42", "-o", "%T"]
    assert table["pbs"].status("42") == ["qstat", "42"] and table["sge"].status("42") == ["qstat", "-j", "42"]
    assert table["slurm"].listed(answer(stdout="RUNNING\n"), "42")
    assert not table["slurm"].listed(answer(stdout=""), "42")
    assert not table["slurm"].listed(answer(1, stderr="slurm_load_jobs error: Invalid job id specified"), "42")
    assert table["slurm"].listed(answer(1, stderr="Socket timed out"), "42")  # asked again
    assert not table["pbs"].listed(answer(153), "42")
    listing = "Job id  Name  User  Time Use S Queue\n42.server  km  me  00:00:01 R debug\n"
    assert table["pbs"].listed(answer(stdout=listing), "42")
    assert not table["pbs"].listed(answer(stdout=listing.replace(" R ", " C ")), "42")
    assert not table["pbs"].listed(answer(stdout=listing), "43")
    assert table["sge"].listed(answer(), "42")
    assert not table["sge"].listed(answer(1, stderr="Following jobs do not exist: 42"), "42")


def _fake_sbatch(tmp_path: Path, monkeypatch) -> Path:
    """An ``sbatch`` first on PATH that refuses every job the way Slurm does."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sbatch = bin_dir / "sbatch"
    sbatch.write_text("#!/bin/sh\necho 'sbatch: error: Batch job submission failed: Invalid account' >&2\n"
                      "exit 1\n")
    sbatch.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return sbatch


def test_a_refused_worker_job_stops_the_run_and_the_cluster_closes(tmp_path, monkeypatch, caplog):
    _fake_sbatch(tmp_path, monkeypatch)
    make_stack(tmp_path / "stack.zarr")
    data = job_dict(tmp_path)
    t0 = time.monotonic()
    with pytest.raises(BatchError, match="slurm refused the worker job: sbatch: error: Batch job submission "
                                         "failed: Invalid account. Check compute.batch"):
        run_job(job_from_dict(data), progress=False)
    assert time.monotonic() - t0 < 30
    assert not (tmp_path / "kernels.zarr").exists()
    assert not [r for r in caplog.records if r.levelno >= 40], [r.getMessage() for r in caplog.records]


def test_a_refused_replacement_job_is_a_warning(tmp_path, monkeypatch, caplog):
    """Once the run has workers, a refusal is logged; the job starts without an id and closes as a no-op."""
    import asyncio

    from pipeline.job.batch import _jobqueue, _recording, _Refusal

    sbatch = _fake_sbatch(tmp_path, monkeypatch)
    outcomes: list = []
    job_cls = _recording(_jobqueue().SLURMCluster.job_cls, outcomes, [True])
    job = job_cls(scheduler="tcp://127.0.0.1:8786", name="w", cores=1, memory="1GB")
    assert job.submit_command.split()[0] == "sbatch" and Path(sbatch).exists()

    async def start_and_close():
        await job  # ProcessInterface's own start protocol: asserts the job is running afterwards
        await job.close()

    with caplog.at_level("WARNING", logger="pipeline.job.batch"):
        asyncio.run(start_and_close())
    assert outcomes == [_Refusal("sbatch: error: Batch job submission failed: Invalid account")]
    assert job.job_id is None
    assert "the batch system refused a new worker job: sbatch: error" in caplog.text


# --------------------------------------------------------------------------- on Slurm


def test_welch_job_on_slurm_workers_equals_a_local_run(slurm, tmp_path):
    make_stack(tmp_path / "stack.zarr", n_images=2)
    data = job_dict(tmp_path)
    expected = reference(tmp_path, data)
    lines: list[str] = []
    t0 = time.monotonic()
    summary = run_job(job_from_dict(data), log=lines.append)
    assert summary.tiles_computed == 18 and time.monotonic() - t0 < 120
    assert_same_result(tmp_path / "kernels.zarr", expected)
    script = (tmp_path / "kernels.zarr.batch" / "worker-job.sh").read_text()
    assert "#SBATCH -p debug" in script and "distributed.cli.dask_worker" in script
    assert any("first worker up" in line for line in lines)
    # closing the cluster cancels the worker jobs
    wait_until(lambda: not our_jobs(data), 30, "the worker jobs to end")


@pytest.fixture(scope="session")
def pbs(slurm) -> None:
    """PBS commands (qsub, qstat, qdel): here Slurm's PBS wrappers (SLURM_PBS_WRAPPERS=1 scripts/start-slurm)."""
    if shutil.which("qsub") is None or shutil.which("qdel") is None:
        message = "no qsub/qdel on PATH; start Slurm with SLURM_PBS_WRAPPERS=1 scripts/start-slurm"
        if REQUIRE_SLURM:
            pytest.fail(message + " (KERNELMAP_REQUIRE_SLURM=1: these tests must run)")
        pytest.skip(message)


def test_the_same_job_through_pbs_commands(pbs, tmp_path, monkeypatch):
    """The seam is general: PBSCluster's job scripts and qsub/qdel drive the same run."""
    monkeypatch.chdir(tmp_path)  # qsub (Slurm's wrapper) leaves the job logs in the working directory
    make_stack(tmp_path / "stack.zarr", n_images=2)
    data = job_dict(tmp_path, compute={"scheduler": "pbs", "batch": {"job_extra_directives": None}})
    expected = reference(tmp_path, data)
    run_job(job_from_dict(data), progress=False)
    assert_same_result(tmp_path / "kernels.zarr", expected)
    script = (tmp_path / "kernels.zarr.batch" / "worker-job.sh").read_text()
    assert "#PBS -q debug" in script and "#PBS -l walltime=00:10:00" in script
    wait_until(lambda: not our_jobs(data), 30, "the worker jobs to end")


@pytest.mark.parametrize(("setting", "message"), [
    ({"queue": "no-such-queue"}, "invalid partition"),
    ({"cores": 64}, "More processors requested than permitted"),
])
def test_refused_submission_is_a_clear_error_at_once(slurm, tmp_path, setting, message):
    make_stack(tmp_path / "stack.zarr")
    data = job_dict(tmp_path, compute={"batch": setting})
    t0 = time.monotonic()
    with pytest.raises(BatchError, match=f"slurm refused the worker job: .*{message}.*compute.batch"):
        run_job(job_from_dict(data), progress=False)
    assert time.monotonic() - t0 < 30
    assert not (tmp_path / "kernels.zarr").exists()  # refused before the output was touched


def _slow_stack_job(tmp_path: Path, n_images: int = 4) -> dict:
    """Enough one-tile blocks (16 an image) of the exact solver for a fault to land mid-run, each written by
    its task (no shards: the blocks done show in the store as the run goes)."""
    make_stack(tmp_path / "stack.zarr", n_images=n_images, size=256)
    return job_dict(tmp_path, kernel={"method": "lstsq"}, compute={"block_tiles": 1},
                    output={"images_per_shard": 1})


def _run_in_thread(data: dict) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def target():
        try:
            outcome["summary"] = run_job(job_from_dict(data), progress=False)
        except BaseException as exc:  # reported by the test
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


def _blocks_done(path: Path) -> int:
    try:
        return int(OutputStore(str(path)).completed_blocks().sum())
    except Exception:  # store not there yet, or a chunk caught mid-write
        return 0


def test_a_cancelled_worker_job_does_not_change_the_result(slurm, tmp_path):
    data = _slow_stack_job(tmp_path)
    expected = reference(tmp_path, data)
    thread, outcome = _run_in_thread(data)
    jobs = wait_until(lambda: len(our_jobs(data)) == 2 and our_jobs(data), 60, "two running worker jobs")
    wait_until(lambda: _blocks_done(tmp_path / "kernels.zarr") >= 4, 60, "the first blocks")
    assert thread.is_alive()
    subprocess.run(["scancel", jobs[0]], check=True, timeout=10)
    done_at_cancel = _blocks_done(tmp_path / "kernels.zarr")
    thread.join(180)
    assert not thread.is_alive() and "error" not in outcome, outcome.get("error")
    assert done_at_cancel < 64
    assert_same_result(tmp_path / "kernels.zarr", expected)


def test_a_killed_worker_process_does_not_change_the_result(slurm, tmp_path):
    data = _slow_stack_job(tmp_path)
    expected = reference(tmp_path, data)
    thread, outcome = _run_in_thread(data)
    wait_until(lambda: _blocks_done(tmp_path / "kernels.zarr") >= 4, 90, "the first blocks")
    workers = [p for p in psutil.process_iter(["cmdline"])
               if any("spawn_main" in part for part in (p.info["cmdline"] or []))
               and any("dask_worker" in " ".join(parent.cmdline()) for parent in p.parents()[:1])]
    assert workers, "no worker process found"
    assert thread.is_alive()
    os.kill(workers[0].pid, signal.SIGKILL)
    thread.join(180)
    assert not thread.is_alive() and "error" not in outcome, outcome.get("error")
    assert_same_result(tmp_path / "kernels.zarr", expected)
    np.testing.assert_array_equal(OutputStore(str(tmp_path / "kernels.zarr")).completed_blocks(), True)


# --------------------------------------------------------------------------- the whole job as one batch job


def _submit_job_file(tmp_path: Path, data: dict, **batch) -> Path:
    data = {**data, "compute": {"batch": {"queue": "debug", "cores": 2, "memory": "2GB",
                                          "walltime": "00:10:00", **batch}}}
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(data))
    return job_file


def test_submit_prints_a_script_and_writes_nothing(tmp_path, capsys):
    make_stack(tmp_path / "stack.zarr")
    job_file = _submit_job_file(tmp_path, job_dict(tmp_path), account="survey42")
    assert main(["submit", str(job_file), "--print", "--cores", "4", "--system", "slurm",
                 "--walltime", "2:00:00", "--account", "0123"]) == 0
    script = capsys.readouterr().out
    assert "#SBATCH -t 2:00:00" in script and "#SBATCH -A 0123" in script  # flags are text, not YAML numbers
    for line in ("#SBATCH -c 4", "#SBATCH -p debug", "#SBATCH --mem=2000M", "WORKERS=${SLURM_CPUS_PER_TASK:-4}",
                 "-m pipeline.cli run",
                 "--set compute.scheduler=local", "--set compute.n_workers=$WORKERS"):
        assert line in script, line
    assert not (tmp_path / "kernels.zarr.batch").exists() and not (tmp_path / "kernels.zarr").exists()
    assert main(["submit", str(job_file), "--print", "--system", "pbs"]) == 0
    assert "#PBS -l select=1:ncpus=2:mem=2000MB" in capsys.readouterr().out


def test_submit_wait_runs_the_whole_job_in_one_allocation(slurm, tmp_path, capsys):
    make_stack(tmp_path / "stack.zarr", n_images=2)
    data = job_dict(tmp_path)
    expected = reference(tmp_path, data)
    job_file = _submit_job_file(tmp_path, data)
    assert main(["submit", str(job_file), "--wait"]) == 0
    job_id = capsys.readouterr().out.strip()  # the job id alone on stdout
    assert_same_result(tmp_path / "kernels.zarr", expected)
    folder = tmp_path / "kernels.zarr.batch"
    assert (folder / "submit.sh").read_text().startswith("#!/usr/bin/env bash")
    assert (folder / f"submit-{job_id}.exit").read_text().strip() == "0"
    assert "18 tiles computed" in (folder / f"submit-{job_id}.log").read_text()
    # the job's own exit status comes back: the output now exists and mode is create
    assert main(["submit", str(job_file), "--wait"]) == 2


def test_submit_through_pbs_commands(pbs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # qsub (Slurm's wrapper) leaves the job log in the working directory
    make_stack(tmp_path / "stack.zarr")
    data = job_dict(tmp_path)
    expected = reference(tmp_path, data)
    job_file = _submit_job_file(tmp_path, data)
    assert main(["submit", str(job_file), "--system", "pbs", "--wait"]) == 0
    job_id = capsys.readouterr().out.strip()
    assert "#PBS -l select=1:ncpus=2:mem=2000MB" in (tmp_path / "kernels.zarr.batch" / "submit.sh").read_text()
    assert (tmp_path / "kernels.zarr.batch" / f"submit-{job_id}.exit").read_text().strip() == "0"
    assert_same_result(tmp_path / "kernels.zarr", expected)


def test_a_cancelled_whole_job_is_finished_by_resume(slurm, tmp_path, capsys):
    data = _slow_stack_job(tmp_path)
    expected = reference(tmp_path, data)
    job_file = _submit_job_file(tmp_path, data)
    assert main(["submit", str(job_file)]) == 0
    job_id = capsys.readouterr().out.strip()
    wait_until(lambda: _blocks_done(tmp_path / "kernels.zarr") >= 4, 90, "the first blocks")
    subprocess.run(["scancel", job_id], check=True, timeout=10)
    done = _blocks_done(tmp_path / "kernels.zarr")
    assert 0 < done < 64
    assert wait_for_job(Submission("slurm", tmp_path / "kernels.zarr.batch" / "submit.sh", job_id),
                        poll=0.5, log=lambda _m: None) == 1  # killed: no exit status
    assert xr.open_zarr(tmp_path / "kernels.zarr").attrs["kernelmap_status"] == "incomplete"
    assert main(["submit", str(job_file), "--wait", "--set", "output.mode=resume"]) == 0
    log = tmp_path / "kernels.zarr.batch" / f"submit-{capsys.readouterr().out.strip()}.log"
    skipped = int(re.search(r"(\d+) of 64 blocks already done", log.read_text()).group(1))
    assert skipped >= done
    assert_same_result(tmp_path / "kernels.zarr", expected)


def test_workers_that_reach_their_lifetime_are_replaced(slurm, tmp_path):
    """Worker jobs shorter than the run (lifetime well under walltime): adapt submits new ones."""
    # a lifetime that outlasts a new worker's first task (its imports: 2 s on a slow machine), and a run
    # longer than it on a fast one
    data = _slow_stack_job(tmp_path, n_images=16)
    data["compute"]["batch"].update({"worker_lifetime": "5s",
                                     "adapt": {"minimum_jobs": 2, "maximum_jobs": 2}})
    expected = reference(tmp_path, data)
    lines: list[str] = []
    run_job(job_from_dict(data), log=lines.append)
    assert_same_result(tmp_path / "kernels.zarr", expected)
    jobs = {p.stem for p in (tmp_path / "logs").glob("*.err")}
    assert len(jobs) > 2, f"no worker job was replaced: {sorted(jobs)}"
    wait_until(lambda: not our_jobs(data), 30, "the worker jobs to end")


def test_a_killed_run_with_worker_jobs_is_finished_by_resume(slurm, tmp_path):
    """SIGKILL the client of a run on worker jobs; cancel its orphans; resume gives the same result."""
    data = _slow_stack_job(tmp_path)
    expected = reference(tmp_path, data)
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(data))
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(job_file), "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: _blocks_done(tmp_path / "kernels.zarr") >= 4, 90, "the first blocks")
        assert proc.poll() is None
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    name = data["compute"]["batch"]["options"]["job_name"]
    subprocess.run(["scancel", "-n", name], check=True, timeout=10)  # its orphaned worker jobs
    done = _blocks_done(tmp_path / "kernels.zarr")
    assert 0 < done < 64
    data["output"]["mode"] = "resume"
    summary = run_job(job_from_dict(data), progress=False)
    assert summary.blocks_skipped >= done and summary.tiles_computed == 64 - summary.blocks_skipped
    assert_same_result(tmp_path / "kernels.zarr", expected)


def test_a_run_whose_worker_jobs_all_end_stops_with_advice(slurm, tmp_path, monkeypatch):
    """Fixed jobs (no adapt) are not replaced: once none is left the run says so instead of hanging."""
    import pipeline.job.run

    monkeypatch.setattr(pipeline.job.run, "NO_WORKERS_GRACE", 3.0)
    data = _slow_stack_job(tmp_path)
    data["compute"]["batch"]["jobs"] = 1
    thread, outcome = _run_in_thread(data)
    jobs = wait_until(lambda: our_jobs(data), 60, "a running worker job")
    wait_until(lambda: _blocks_done(tmp_path / "kernels.zarr") >= 2, 60, "the first blocks")
    assert thread.is_alive()
    subprocess.run(["scancel", jobs[0]], check=True, timeout=10)
    thread.join(60)
    assert not thread.is_alive(), "the run still waits for workers that will not come"
    assert isinstance(outcome.get("error"), BatchError), outcome
    assert "set compute.batch.adapt" in str(outcome["error"]) and "output.mode=resume" in str(outcome["error"])
    assert 0 < _blocks_done(tmp_path / "kernels.zarr") < 64


def test_batch_support_loads_off_the_main_thread_and_keeps_ctrl_c():
    """dask-jobqueue installs a SIGINT handler on import; kernelmap's import keeps Python's own."""
    code = (
        "import signal, threading\n"
        "from pipeline.job.batch import _jobqueue\n"
        "before = signal.getsignal(signal.SIGINT)\n"
        "t = threading.Thread(target=_jobqueue); t.start(); t.join()\n"
        "import sys; assert 'dask_jobqueue' in sys.modules\n"
        "assert signal.getsignal(signal.SIGINT) is before is signal.default_int_handler\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_a_lock_from_another_host_is_stale_once_its_batch_job_has_left_the_queue(slurm, tmp_path):
    """A whole job (kernelmap submit) on a compute node holds the output's lock; once the batch system no
    longer lists that job (cancelled, node lost), a run from another host takes the lock over, naming why."""
    import json
    import socket

    from pipeline.io.lock import lock_path

    make_stack(tmp_path / "stack.zarr", n_images=1, size=128)
    data = job_dict(tmp_path, compute={"scheduler": "synchronous"})
    answer = subprocess.run(["sbatch", "--parsable", "--wrap", "sleep 300", "-o", str(tmp_path / "sleep.log")],
                            capture_output=True, text=True, check=True, timeout=30)
    job_id = answer.stdout.strip().split(";")[0]
    lock = Path(lock_path(tmp_path / "kernels.zarr"))
    lock.write_text(json.dumps({"host": f"not-{socket.gethostname()}", "pid": 4242,
                                "started": "2026-01-02T03:04:05+00:00", "process_started": 1.0,
                                "command": "kernelmap run job.yaml", "token": "t", "batch": f"slurm:{job_id}"}))
    try:
        with pytest.raises(OptionError, match=rf"being written by another kernelmap command .*slurm job {job_id}"):
            run_job(job_from_dict(data), progress=False)
        assert not (tmp_path / "kernels.zarr").exists()
    finally:
        subprocess.run(["scancel", job_id], check=True, timeout=10)
    wait_until(lambda: not subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True,
                                          timeout=10).stdout.strip(), 60, "the cancelled job to leave the queue")
    said: list[str] = []
    run_job(job_from_dict(data), progress=False, log=said.append)
    assert any(f"its slurm job {job_id} is no longer in the queue" in line for line in said), said
    assert not lock.exists() and xr.open_zarr(tmp_path / "kernels.zarr").attrs["kernelmap_status"] == "complete"
