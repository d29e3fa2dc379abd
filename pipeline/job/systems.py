"""The batch systems kernelmap knows, in one table: how each takes worker jobs and whole jobs.

Worker jobs (``compute.scheduler`` naming a batch system) go through
dask-jobqueue: a system needs its cluster class and the keyword that class
gives the account.  The whole job as one batch job (``kernelmap submit``) is
written and followed by kernelmap itself: a system that has those entries
(``submit_command`` and the rest) can be used there; the others say so.

Nothing here imports dask or dask-jobqueue.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import OptionError

if TYPE_CHECKING:
    from .config import JobConfig

__all__ = ["BATCH_SYSTEMS_TABLE", "BatchSystem", "megabytes", "submit_systems"]

#: What the batch systems answer for a job they no longer know (finished and forgotten).
_UNKNOWN_JOB = ("invalid job id", "unknown job", "do not exist", "does not exist")


@dataclass(frozen=True)
class BatchSystem:
    """One batch system: its worker jobs through dask-jobqueue, its whole-job scripts through kernelmap.

    The whole-job entries are ``None`` for a system ``kernelmap submit``
    cannot write scripts for.
    """

    name: str
    #: dask-jobqueue cluster class (a name in ``dask_jobqueue``).
    cluster_class: str
    #: keyword of that class for ``compute.batch.account``.
    account_keyword: str = "account"
    #: command that submits a script and answers with the job id.
    submit_command: str | None = None
    #: what starts a directive line of a script (``#SBATCH``).
    directive_prefix: str | None = None
    #: the directives (without prefix) of the whole-job script, before ``job_extra_directives``.
    header: Callable[[JobConfig, Path], list[str]] | None = None
    #: environment variable holding the allocated CPU count inside the job.
    cpus_variable: str | None = None
    #: environment variable holding the job id inside the job.
    job_id_variable: str | None = None
    #: command that asks about one job (``{job_id}`` stands for its id).
    status_command: tuple[str, ...] | None = None
    #: whether the status command's answer still lists the job (pending, running or finishing).
    listed: Callable[[subprocess.CompletedProcess[str], str], bool] | None = None

    @property
    def can_submit(self) -> bool:
        """Whether ``kernelmap submit`` can write, submit and follow whole-job scripts for it."""
        return self.submit_command is not None

    def directives(self, job: JobConfig, folder: Path) -> list[str]:
        """Every directive line of the whole-job script (with its prefix)."""
        if self.header is None:
            raise OptionError(f"kernelmap submit writes no scripts for {self.name}")
        lines = [*self.header(job, folder), *(job.compute.batch.job_extra_directives or [])]
        return [f"{self.directive_prefix} {line}" for line in lines]

    def status(self, job_id: str) -> list[str]:
        """The command that asks the batch system about ``job_id``."""
        if self.status_command is None:
            raise OptionError(f"kernelmap cannot follow {self.name} jobs")
        return [part.format(job_id=job_id) for part in self.status_command]


def megabytes(memory: str) -> int:
    """``"4GB"``, ``"2GiB"``, ``"500MB"`` ... in megabytes (10^6 bytes)."""
    from dask.utils import parse_bytes

    try:
        return max(1, int(parse_bytes(memory) // 10**6))
    except ValueError as exc:
        raise OptionError(f"compute.batch.memory: {memory!r} is not an amount of memory "
                          "(e.g. 4GB, 2GiB, 500MB)") from exc


def _job_name(job: JobConfig) -> str:
    return "kernelmap-" + Path(str(job.output.path)).name.removesuffix(".zarr")


# --------------------------------------------------------------------------- whole-job script headers


def _slurm_header(job: JobConfig, folder: Path) -> list[str]:
    b = job.compute.batch
    lines = [f"-J {_job_name(job)}", f"-o {folder}/submit-%j.log", f"-e {folder}/submit-%j.log",
             "-N 1", "-n 1", f"-c {b.cores or 1}"]
    lines += [f"-p {b.queue}"] if b.queue else []
    lines += [f"-A {b.account}"] if b.account else []
    lines += [f"-t {b.walltime}"] if b.walltime else []
    lines += [f"--mem={megabytes(b.memory)}M"] if b.memory else []
    return lines


def _pbs_header(job: JobConfig, folder: Path) -> list[str]:
    b = job.compute.batch
    lines = [f"-N {_job_name(job)}", f"-o {folder}/", f"-e {folder}/"]
    lines += [f"-q {b.queue}"] if b.queue else []
    lines += [f"-A {b.account}"] if b.account else []
    resources = f"select=1:ncpus={b.cores or 1}" + (f":mem={megabytes(b.memory)}MB" if b.memory else "")
    lines += [f"-l {resources}"]
    lines += [f"-l walltime={b.walltime}"] if b.walltime else []
    return lines


def _sge_header(job: JobConfig, folder: Path) -> list[str]:
    b = job.compute.batch
    cores = b.cores or 1
    lines = [f"-N {_job_name(job)}", f"-o {folder}/", f"-e {folder}/"]
    lines += [f"-q {b.queue}"] if b.queue else []
    lines += [f"-P {b.account}"] if b.account else []
    lines += [f"-pe smp {cores}"] if cores > 1 else []
    lines += [f"-l h_vmem={megabytes(b.memory) // cores}M"] if b.memory else []  # SGE limits memory per slot
    lines += [f"-l h_rt={b.walltime}"] if b.walltime else []
    lines += ["-cwd", "-V"]
    return lines


# --------------------------------------------------------------------------- reading status answers


def _unknown(answer: subprocess.CompletedProcess[str]) -> bool:
    return any(text in (answer.stderr + answer.stdout).lower() for text in _UNKNOWN_JOB)


def _slurm_listed(answer: subprocess.CompletedProcess[str], job_id: str) -> bool:
    if answer.returncode != 0:
        return not _unknown(answer)
    return bool(answer.stdout.strip())  # squeue -h -o %T: the state, or nothing once it left the queue


def _sge_listed(answer: subprocess.CompletedProcess[str], job_id: str) -> bool:
    return not _unknown(answer) if answer.returncode != 0 else True


def _pbs_listed(answer: subprocess.CompletedProcess[str], job_id: str) -> bool:
    if answer.returncode != 0:
        return answer.returncode != 153 and not _unknown(answer)  # 153: PBS's exit status for an unknown job
    rows = [line.split() for line in answer.stdout.splitlines() if line.split()[:1] and
            line.split()[0].split(".")[0] == job_id]
    return any(row[-2] not in ("C", "E", "F") for row in rows if len(row) >= 2) if rows else False


#: Every batch system of ``compute.scheduler``, by name.  The whole-job systems come first, in the
#: order in which a whole-job script looks for its job id (``job_id_variable``).
BATCH_SYSTEMS_TABLE: dict[str, BatchSystem] = {
    system.name: system
    for system in (
        BatchSystem("slurm", "SLURMCluster", submit_command="sbatch", directive_prefix="#SBATCH",
                    header=_slurm_header, cpus_variable="SLURM_CPUS_PER_TASK", job_id_variable="SLURM_JOB_ID",
                    status_command=("squeue", "-h", "-j", "{job_id}", "-o", "%T"), listed=_slurm_listed),
        BatchSystem("pbs", "PBSCluster", submit_command="qsub", directive_prefix="#PBS",
                    header=_pbs_header, cpus_variable="NCPUS", job_id_variable="PBS_JOBID",
                    status_command=("qstat", "{job_id}"), listed=_pbs_listed),
        BatchSystem("sge", "SGECluster", account_keyword="project", submit_command="qsub", directive_prefix="#$",
                    header=_sge_header, cpus_variable="NSLOTS", job_id_variable="JOB_ID",
                    status_command=("qstat", "-j", "{job_id}"), listed=_sge_listed),
        BatchSystem("lsf", "LSFCluster", account_keyword="project"),
        BatchSystem("htcondor", "HTCondorCluster"),
    )
}


def submit_systems() -> list[BatchSystem]:
    """The systems ``kernelmap submit`` can write scripts for, in table order."""
    return [system for system in BATCH_SYSTEMS_TABLE.values() if system.can_submit]
