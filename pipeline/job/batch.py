"""Dask workers as jobs of a batch system (Slurm, PBS, SGE, LSF, HTCondor) through dask-jobqueue.

Imported only when ``compute.scheduler`` names a batch system.  The worker
jobs are submitted before the output is touched: a refusal stops the run at
once with the batch system's own message.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask

from ..errors import BatchError, OptionError
from .config import JobConfig
from .executors import WORKER_ENV
from .systems import BATCH_SYSTEMS_TABLE

__all__ = ["batch_dir", "batch_options", "local_batch_dir", "submit_workers", "worker_job_script"]

logger = logging.getLogger(__name__)

#: Keywords of the cluster classes that are not job settings.
_CLUSTER_ONLY = ("scheduler_options", "silence_logs", "shared_temp_directory", "n_workers", "name")
#: Seconds a batch system has to accept or refuse the worker jobs.
SUBMIT_TIMEOUT = 60.0
#: Seconds of one wait for the first worker, between looks at refusals and compute.batch.start_timeout.
_WAIT_STEP = 1.0
#: Seconds between the log lines that say the run still waits for its first worker.
_WAIT_NOTE_EVERY = 30.0
#: The scheduler address written into a job script shown before any scheduler exists.
_PLACEHOLDER_ADDRESS = "tcp://<scheduler-address>:8786"


def _jobqueue() -> Any:
    """dask_jobqueue, imported without the SIGINT handler its ``runner`` module installs on import.

    That handler turns Ctrl-C into ``sys.exit()`` for the whole process (so an
    interrupted run could not say how to resume it), and installing it fails
    outside the main thread, e.g. when a run is started from a thread.
    dask-jobqueue offers no switch for it, and restoring the handler after the
    import would not help off the main thread (the import itself fails there),
    so ``signal.signal`` is stood in for during the import alone.
    """
    if "dask_jobqueue" in sys.modules:
        return sys.modules["dask_jobqueue"]
    install = signal.signal
    signal.signal = lambda signum, handler: signal.getsignal(signum)  # type: ignore[assignment]
    try:
        return importlib.import_module("dask_jobqueue")
    finally:
        signal.signal = install


def batch_dir(output_path: str) -> str:
    """Folder beside the output store for batch job scripts and logs (``<output>.batch``)."""
    return str(output_path).rstrip("/") + ".batch"


def local_batch_dir(job: JobConfig) -> Path | None:
    """The job's ``<output>.batch`` folder as an absolute local path; ``None`` for a URL output."""
    path = str(job.output.path)
    if path.startswith("file://"):
        path = path[len("file://"):]
    if "://" in path:
        return None
    return Path(os.path.abspath(os.path.expanduser(batch_dir(path))))


def batch_options(job: JobConfig) -> dict[str, Any]:
    """Keyword arguments for the dask-jobqueue cluster class of ``compute.scheduler``.

    Only settings given in ``compute.batch`` are passed (dask-jobqueue's own
    configuration supplies the rest), plus the worker environment, a worker
    lifetime when asked, logs beside the output and a free dashboard port.
    """
    system = job.compute.scheduler
    b = job.compute.batch
    _jobqueue()  # its defaults join the dask configuration read below
    opts: dict[str, Any] = {}
    for key in ("queue", "walltime", "cores", "memory", "processes", "job_extra_directives",
                "interface", "python", "local_directory", "log_directory"):
        value = getattr(b, key)
        if value is not None:
            opts[key] = list(value) if isinstance(value, list) else value
    if b.account is not None:
        opts[BATCH_SYSTEMS_TABLE[system].account_keyword] = b.account
    section = f"jobqueue.{system}"
    prologue = b.job_script_prologue
    if prologue is None:
        prologue = dask.config.get(f"{section}.job-script-prologue", None) or []
    env = ", ".join(f"'{k}': '{v}'" for k, v in WORKER_ENV.items())
    opts["job_script_prologue"] = [
        "export " + " ".join(f"{k}={v}" for k, v in WORKER_ENV.items()),
        f'export DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON="{{{env}}}"',
        *prologue,
    ]
    if b.worker_lifetime is not None:
        extra = dask.config.get(f"{section}.worker-extra-args", None) or []
        extra = [*extra, "--lifetime", b.worker_lifetime]
        if b.worker_lifetime_stagger is not None:
            extra += ["--lifetime-stagger", b.worker_lifetime_stagger]
        opts["worker_extra_args"] = extra
    if "log_directory" not in opts and dask.config.get(f"{section}.log-directory", None) is None:
        logs = local_batch_dir(job)
        if logs is not None:
            opts["log_directory"] = str(logs / "logs")
    opts.update(b.options)
    scheduler_options = {"dashboard_address": job.compute.dashboard_address or ":0",
                         **dict(dask.config.get(f"{section}.scheduler-options", None) or {}),
                         **dict(opts.pop("scheduler_options", None) or {})}
    opts["scheduler_options"] = scheduler_options
    return opts


def _cluster_class(system: str) -> Any:
    """dask-jobqueue's cluster class of ``system``."""
    return getattr(_jobqueue(), BATCH_SYSTEMS_TABLE[system].cluster_class)


def _explain(exc: Exception, system: str) -> OptionError:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "cores and memory" in text:
        return OptionError(
            f"compute.batch: {system} worker jobs need cores and memory per job: set compute.batch.cores "
            "and compute.batch.memory (e.g. --set compute.batch.cores=1 --set compute.batch.memory=2GB), "
            "or jobqueue.%s.cores/memory in your dask-jobqueue configuration" % system)
    return OptionError(f"compute.batch: {system} worker jobs cannot be set up with these settings: {text}; "
                       "check compute.batch (and compute.batch.options)")


def worker_job_script(job: JobConfig, address: str = _PLACEHOLDER_ADDRESS) -> str:
    """The batch script of one worker job, as dask-jobqueue writes it (nothing is started)."""
    system = job.compute.scheduler
    opts = {k: v for k, v in batch_options(job).items() if k not in _CLUSTER_ONLY}
    try:
        return _cluster_class(system).job_cls(scheduler=address, name="kernelmap-worker", **opts).job_script()
    except (ValueError, TypeError) as exc:
        raise _explain(exc, system) from exc


@dataclass(frozen=True)
class _Refusal:
    """A worker job the batch system did not accept, in its own words."""

    message: str


def _recording(job_cls: type, outcomes: list[Any], running: list[bool]) -> type:
    """``job_cls`` whose submissions are kept in ``outcomes``: a job id, or a :class:`_Refusal`.

    dask-jobqueue submits from a callback: a failure would only be logged
    while the run waits for a worker that never comes; kept here, the run
    stops at once with the batch system's message.  Once the run has workers (``running``
    holds ``True``), a refused replacement job is a warning instead.

    Only the submission step is wrapped (``_submit_job`` and
    ``_job_id_from_submit_output``, the two steps of dask-jobqueue's
    ``Job.start``, private to it: tests/test_batch.py exercises them without
    a batch system): a refused job then starts without a job id, like a job
    with nothing to cancel, so ``Job.start`` and ``Job.close`` run unchanged,
    the cluster keeps its own bookkeeping of job states, and closing it
    cancels the accepted jobs and skips the refused ones.  Raising from
    ``start`` instead would leave the job neither running nor closed, which
    the cluster's ``close`` does not accept.  Refusals are kept as text: an
    exception's traceback would keep the job object alive past the close.
    """

    class RecordingJob(job_cls):  # type: ignore[misc, valid-type]
        _refused = False

        async def _submit_job(self, script_filename):
            try:
                return await super()._submit_job(script_filename)
            except Exception as exc:  # the batch system's refusal, reported by the run
                self._refuse(exc)
                return ""

        def _job_id_from_submit_output(self, out):
            if self._refused:
                return None  # no job: nothing to cancel on close
            try:
                job_id = super()._job_id_from_submit_output(out)
            except ValueError as exc:  # an answer without a job id
                self._refuse(exc)
                return None
            outcomes.append(job_id)
            return job_id

        def _refuse(self, exc: Exception) -> None:
            self._refused = True
            message = _submission_error(exc)
            outcomes.append(_Refusal(message))
            if running:
                logger.warning("the batch system refused a new worker job: %s", message)

    RecordingJob.__name__ = RecordingJob.__qualname__ = job_cls.__name__
    return RecordingJob


def _submission_error(exc: BaseException) -> str:
    """The batch system's own words from a failed submission."""
    text = str(exc)
    if "stderr:" in text:
        text = text.split("stderr:", 1)[1]
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " ".join(lines)[:500] or type(exc).__name__


def submit_workers(job: JobConfig, stack: ExitStack, log: Callable[[str], None]) -> Callable[[], Any]:
    """Submit the worker jobs and wait until the batch system has accepted (or refused) them.

    Returns a function that gives a client once the first worker is up.  A
    refused submission raises :class:`BatchError` with the batch system's
    message, here or while waiting for workers; so does a batch system that
    does not answer within ``SUBMIT_TIMEOUT`` seconds.
    """
    from distributed import Client

    system, b = job.compute.scheduler, job.compute.batch
    # settings checked on a bare job first: a cluster object failing its own check is left half-made
    script = worker_job_script(job)
    cluster_cls = _cluster_class(system)
    outcomes: list[Any] = []
    running: list[bool] = []
    opts = batch_options(job)
    if "log_directory" in opts:
        Path(opts["log_directory"]).mkdir(parents=True, exist_ok=True)
    try:
        cluster = cluster_cls(job_cls=_recording(cluster_cls.job_cls, outcomes, running), **opts)
    except (ValueError, TypeError) as exc:
        raise _explain(exc, system) from exc
    stack.callback(_close_quietly, cluster)
    here = local_batch_dir(job)
    where = f"{here / 'worker-job.sh'}" if here is not None else "shown by --dry-run"
    if here is not None:
        here.mkdir(parents=True, exist_ok=True)
        (here / "worker-job.sh").write_text(cluster.job_script())
        log(f"{system} worker job script: {where}")
    else:
        log(f"{system} worker job script:\n{script}")

    def refused() -> BatchError | None:
        for outcome in outcomes:
            if isinstance(outcome, _Refusal):
                return BatchError(
                    f"{system} refused the worker job: {outcome.message}. Check compute.batch "
                    "(queue, account, walltime, cores, memory, job_extra_directives) against what the "
                    f"cluster allows; the job script is {where}"
                )
        return None

    if b.adapt is not None:
        cluster.adapt(minimum_jobs=b.adapt.minimum_jobs, maximum_jobs=b.adapt.maximum_jobs)
        expected = b.adapt.minimum_jobs
        log(f"{system}: adaptive, {b.adapt.minimum_jobs} to {b.adapt.maximum_jobs} worker jobs")
    else:
        cluster.scale(jobs=b.jobs)
        expected = b.jobs
    deadline = time.monotonic() + SUBMIT_TIMEOUT
    while len(outcomes) < expected:
        if (error := refused()) is not None:
            raise error
        if time.monotonic() > deadline:
            raise BatchError(
                f"{system} did not answer the submission of {expected} worker job(s) within "
                f"{SUBMIT_TIMEOUT:.0f} s: is the batch system up (e.g. sinfo, qstat)?")
        time.sleep(0.05)
    if (error := refused()) is not None:
        raise error
    if expected:
        log(f"{system}: worker job(s) {', '.join(str(o) for o in outcomes)} submitted")

    def client() -> Any:
        c = stack.enter_context(Client(cluster))
        t0 = last = time.monotonic()
        limit = b.start_timeout
        while True:
            if (error := refused()) is not None:
                raise error
            now = time.monotonic()
            if limit is not None and now - t0 > limit:
                raise BatchError(
                    f"no {system} worker came up within compute.batch.start_timeout ({limit:g} s): see the "
                    f"worker job logs ({opts.get('log_directory', 'the log directory')}) and the queue")
            if now - last >= _WAIT_NOTE_EVERY:
                last = now
                log(f"{system}: waiting for the first worker job to start ({now - t0:.0f} s)")
            step = _WAIT_STEP if limit is None else min(_WAIT_STEP, max(limit - (now - t0), 0.0) + 0.05)
            try:
                c.wait_for_workers(1, timeout=step)
                break
            except TimeoutError:  # distributed's WorkerStartTimeoutError: look at refusals and limits again
                continue
        log(f"{system}: first worker up after {time.monotonic() - t0:.1f} s")
        running.append(True)
        return c

    return client


def _close_quietly(cluster: Any) -> None:
    """Close a batch cluster; one whose jobs never started can fail to close (and has nothing to stop)."""
    try:
        cluster.close()
    except Exception as exc:  # nothing left to clean up
        logger.debug("closing the batch cluster: %r", exc)


