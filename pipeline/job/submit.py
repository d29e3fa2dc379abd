"""The whole job as one batch job: write its script, submit it, follow it.

The script runs ``kernelmap run`` inside the allocation with a local cluster
sized from the allocation (one worker per allocated CPU, its memory shared
among them).  The allocation's resources come from ``compute.batch`` (queue,
account, walltime, cores, memory, job_extra_directives, job_script_prologue,
python, log_directory); the batch system from ``compute.scheduler`` when it
names one, else Slurm.  Script, effective job file, log and exit status are
kept beside the output, in ``<output>.batch/``.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import BatchError, OptionError
from .batch import local_batch_dir
from .config import BATCH_SYSTEMS, JobConfig, dump_job
from .systems import BATCH_SYSTEMS_TABLE, BatchSystem, megabytes, submit_systems

__all__ = ["Submission", "submission_script", "submit_job", "wait_for_job"]

#: Seconds a submit command may take before it counts as not answering.
SUBMIT_TIMEOUT = 60


@dataclass(frozen=True)
class Submission:
    """A submitted (or only written) whole-job batch script."""

    system: str
    script: Path
    job_id: str | None = None

    @property
    def folder(self) -> Path:
        return self.script.parent

    def exit_file(self) -> Path:
        return self.folder / f"submit-{self.job_id}.exit"


def _system(job: JobConfig) -> BatchSystem:
    """The batch system of the whole job: ``compute.scheduler`` where it names one, else Slurm."""
    system = BATCH_SYSTEMS_TABLE[job.compute.scheduler if job.compute.scheduler in BATCH_SYSTEMS else "slurm"]
    if not system.can_submit:
        raise OptionError(
            f"kernelmap submit writes scripts for {', '.join(s.name for s in submit_systems())}, not "
            f"{system.name}: set compute.scheduler to one of them (or to local, for Slurm)")
    return system


def _folder(job: JobConfig) -> Path:
    folder = local_batch_dir(job)
    if folder is None:
        raise OptionError(
            f"kernelmap submit keeps its script and log beside the output, which must then be a local "
            f"or shared path, not {job.output.path}")
    return folder


def _job_id_expression() -> str:
    """Shell expression of the job id inside any whole-job system (Slurm's PBS wrappers set Slurm's)."""
    expression = "unknown"
    for system in reversed(submit_systems()):
        expression = f"${{{system.job_id_variable}:-{expression}}}"
    return expression


def submission_script(job: JobConfig) -> str:
    """The batch script that runs the whole job in one allocation (its job file: ``job.yaml`` beside it)."""
    system = _system(job)
    folder = _folder(job)
    job_file = folder / "job.yaml"
    b = job.compute.batch
    python = b.python or sys.executable
    cores = b.cores or 1
    memory = (f'$(( {megabytes(b.memory)} / WORKERS ))MB' if b.memory else "auto")
    lines = [
        "#!/usr/bin/env bash",
        f"# kernelmap: the whole job {job.output.path} as one {system.name} job.",
        *system.directives(job, folder),
        *(b.job_script_prologue or []),
        f"cd {shlex.quote(os.getcwd())}",
        f"WORKERS=${{{system.cpus_variable}:-{cores}}}",
        f"{python} -m pipeline.cli run {shlex.quote(str(job_file))} --set compute.scheduler=local "
        f"--set compute.n_workers=$WORKERS --set compute.threads_per_worker=1 "
        f"--set compute.memory_limit={memory}",
        "status=$?",
        f"job={_job_id_expression()}",
        f'echo "$status" > {shlex.quote(str(folder))}/"submit-${{job%%.*}}.exit"',
        'exit "$status"',
    ]
    return "\n".join(lines) + "\n"


def submit_job(job: JobConfig, *, log: Callable[[str], None] = print) -> Submission:
    """Write the whole-job script and job file beside the output, and submit the script."""
    system = _system(job)
    folder = _folder(job)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "job.yaml").write_text(dump_job(job))
    script = folder / "submit.sh"
    script.write_text(submission_script(job))
    command = [system.submit_command, str(script)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=SUBMIT_TIMEOUT)
    except FileNotFoundError as exc:
        raise BatchError(f"{command[0]} not found: kernelmap submit needs the {system.name} commands on "
                         "PATH") from exc
    except subprocess.TimeoutExpired as exc:
        raise BatchError(f"{command[0]} did not answer within {SUBMIT_TIMEOUT} s: is {system.name} up?") from exc
    if done.returncode != 0:
        raise BatchError(f"{system.name} refused the job: {(done.stderr or done.stdout).strip()[:500]}; "
                         f"check compute.batch (queue, account, walltime, cores, memory); script {script}")
    match = re.search(r"\d+", done.stdout)
    if match is None:
        raise BatchError(f"cannot read a job id from {command[0]}'s answer: {done.stdout.strip()[:200]!r}")
    submission = Submission(system.name, script, match.group(0))
    log(f"submitted {system.name} job {submission.job_id}: script {script}, log in {folder}")
    return submission


def _running(submission: Submission) -> bool:
    """Whether the batch system still lists the job (pending, running or finishing).

    Only a definite "unknown job" (or a listing without it) counts as ended;
    a failing or slow command is asked again.
    """
    system = BATCH_SYSTEMS_TABLE[submission.system]
    cmd = system.status(submission.job_id)
    try:
        answer = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return True  # a busy batch system: ask again
    except FileNotFoundError as exc:
        raise BatchError(f"{cmd[0]} not found: following a {system.name} job needs its commands "
                         "on PATH") from exc
    return system.listed(answer, submission.job_id)


def wait_for_job(submission: Submission, *, poll: float = 2.0, log: Callable[[str], None] = print) -> int:
    """Follow a submitted job to its end; returns its exit status (1 if it left none: killed, out of time)."""
    t0 = last = time.monotonic()
    while _running(submission):
        now = time.monotonic()
        if now - last >= 60:
            last = now
            log(f"job {submission.job_id} still queued or running ({now - t0:.0f} s)")
        time.sleep(poll)
    exit_file = submission.exit_file()
    deadline = time.monotonic() + 10  # a shared file system may show the file late
    while not exit_file.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    if not exit_file.exists():
        log(f"job {submission.job_id} ended without an exit status (cancelled, killed or out of time); "
            f"see its log in {submission.folder}; rerun with --set output.mode=resume to finish it")
        return 1
    status = int(exit_file.read_text().strip() or 1)
    log(f"job {submission.job_id} finished with exit status {status} after {time.monotonic() - t0:.0f} s")
    return status
