"""Where a job's tasks run: a local cluster, a running scheduler, or worker jobs on a batch system.

``compute.scheduler`` picks one: ``local`` (a ``distributed.LocalCluster``
from the ``compute`` settings), the address of a running scheduler, a batch
system (``slurm``, ``sge``, ``pbs``, ``lsf``, ``htcondor``: Dask workers as
batch jobs through dask-jobqueue, imported only then), or ``threads`` /
``synchronous`` (no cluster: blocks run in a pool of threads of this process).

:func:`connect` reaches the cluster; :func:`run_on_client` and
:func:`run_in_threads` run a block task over blocks and hand each result, as
it comes, to the caller.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from contextlib import ExitStack, nullcontext
from operator import methodcaller
from typing import TYPE_CHECKING, Any

import dask

from ..core.blas import one_blas_thread
from ..errors import BatchError
from .config import JobConfig

if TYPE_CHECKING:
    from ..core.tiles import Block
    from .blocks import BlockResult, BlockTask

__all__ = ["SHUTDOWN_LOGGERS", "WORKER_ENV", "ShutdownHush", "WaitingFutures", "WorkerWatch", "connect", "dask_setup",
           "run_in_threads", "run_on_client"]

#: Environment of worker processes: one thread per FFT/BLAS call inside tasks, and glibc's allocator
#: keeping the memory of the tasks' arrays (up to 32 MiB each, 64 MiB freed at the heap's top) for the
#: next ones instead of handing it back to the system and faulting it in again, zeroed, at every
#: transform (both thresholds are needed; ``docs/benchmarks.md`` has the figures).  It replaces dask's
#: default, whose ``MALLOC_TRIM_THRESHOLD_`` of 64 KiB slows these tasks (``scripts/bench_pipeline.py
#: --details`` compares them).
WORKER_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
              "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(64 * 2**20)}


#: Seconds a run that stops while its local cluster starts waits for the start, to close the cluster: after
#: an error, and after Ctrl-C (then it is left to end with the process: Ctrl-C caught by Python inside an
#: import may leave the import lock taken, and the start waiting for it for ever).
CLUSTER_START_WAIT = 60.0
INTERRUPTED_START_WAIT = 10.0


def _start_local_cluster(job: JobConfig, stack: ExitStack) -> Callable[[], Any]:
    """Start a LocalCluster from ``compute`` in the background; returns a function giving its client.

    Its worker processes take a second or two to start: the output store is
    prepared meanwhile.  The cluster is closed when ``stack`` exits.
    """
    from distributed import Client, LocalCluster

    c = job.compute

    def start() -> LocalCluster:
        if c.processes and hasattr(signal, "pthread_sigmask"):
            # Ctrl-C at a terminal signals the whole process group: the worker processes are started with
            # SIGINT blocked (as multiprocessing starts its resource tracker), so that it never reaches them,
            # even while they start.  The mask passes from this thread to the cluster's threads, which start
            # them, and on to the processes; the resource tracker, started first, would unblock it.
            from multiprocessing import resource_tracker

            resource_tracker.ensure_running()
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        settings: dict[str, Any] = {"distributed.nanny.pre-spawn-environ": WORKER_ENV}
        if c.processes:  # Ctrl-C stops the run through this process alone (see dask_setup)
            settings["distributed.worker.preload"] = [*dask.config.get("distributed.worker.preload", []), __name__]
        with dask.config.set(settings):
            return LocalCluster(
                n_workers=c.n_workers, threads_per_worker=c.threads_per_worker, processes=c.processes,
                memory_limit=c.memory_limit, dashboard_address=c.dashboard_address,
            )

    future: Future[LocalCluster] = Future()

    def starting() -> None:
        try:
            future.set_result(start())
        except BaseException as exc:
            future.set_exception(exc)

    # a daemon thread: a start that never ends (e.g. Ctrl-C caught inside an import in another thread) does not
    # keep the process from exiting
    threading.Thread(target=starting, name="kernelmap-cluster-start", daemon=True).start()

    def close(exc_type: type[BaseException] | None, *exc: object) -> bool:
        interrupted = exc_type is not None and issubclass(exc_type, KeyboardInterrupt)
        try:  # a cluster still starting is closed once started, unless that takes longer than it should
            cluster = future.result(timeout=INTERRUPTED_START_WAIT if interrupted else CLUSTER_START_WAIT)
        except Exception:
            return False
        cluster.close()
        return False

    stack.push(close)
    return lambda: stack.enter_context(Client(future.result()))


#: Loggers of the cluster quieted while it closes after Ctrl-C: it reports every task it stops.
SHUTDOWN_LOGGERS = ("distributed", "tornado", "asyncio")


class ShutdownHush:
    """Exit callback of a run's ``ExitStack``: after a :class:`KeyboardInterrupt`, the cluster's loggers
    (:data:`SHUTDOWN_LOGGERS` and those under them) are silenced while the client and the cluster close,
    and given back their levels once the stack has closed them.  Other exits change nothing (errors of a
    run, and of its cluster, are reported as ever)."""

    def __init__(self) -> None:
        self._levels: dict[str, int] | None = None

    def __call__(self, exc_type: type[BaseException] | None, *exc: object) -> bool:
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt) and self._levels is None:
            own = [name for name, logger in list(logging.root.manager.loggerDict.items())  # levels of their own
                   if isinstance(logger, logging.Logger) and logger.level != logging.NOTSET
                   and name.partition(".")[0] in SHUTDOWN_LOGGERS]
            self._levels = {name: logging.getLogger(name).level for name in (*SHUTDOWN_LOGGERS, *own)}
            for name in self._levels:
                logging.getLogger(name).setLevel(logging.CRITICAL + 1)
        return False

    def restore(self) -> None:
        """Give the loggers back their levels."""
        for name, level in (self._levels or {}).items():
            logging.getLogger(name).setLevel(level)
        self._levels = None


def dask_setup(worker: Any) -> None:
    """Preload of the local cluster's worker processes (``distributed.worker.preload``): they leave stopping
    a run to the run's own process, and say nothing of it.

    Ctrl-C at a terminal sends SIGINT to every process of the foreground
    group; the workers are started with it blocked (:func:`_start_local_cluster`),
    and where it reaches one all the same it only stops its logging: the run's
    process stops the run and closes them.  Once closing (the run ended or
    stopped), a worker's logs are dropped (the tasks it cancels, the
    scheduler it loses).  And a task's error is not logged by the worker: the
    run reads every task's result and raises the error, with the task's
    traceback, itself (a clear message where it is the package's or a full
    disk's).
    """
    if threading.current_thread() is not threading.main_thread():
        return  # a worker in the client's process: SIGINT is the run's own
    signal.signal(signal.SIGINT, lambda signum, frame: logging.disable(logging.CRITICAL))
    closing = {"closing", "closing_gracefully", "closed", "failed"}

    def reported_elsewhere(record: logging.LogRecord) -> bool:
        return getattr(worker.status, "name", "") not in closing and not str(record.msg).startswith(
            "Compute Failed")

    for name in ("distributed.worker", "distributed.worker.state_machine"):
        logging.getLogger(name).addFilter(reported_elsewhere)


def connect(job: JobConfig, stack: ExitStack, log: Callable[[str], None]) -> Callable[[], Any]:
    """Begin connecting to where ``compute.scheduler`` says; returns a function giving the client.

    A local cluster starts in the background at once; batch worker jobs are
    submitted now (a refusal raises here, before the output is touched) and
    the client waits for the first of them to start.  The function
    returns ``None`` for ``threads`` and ``synchronous`` (no cluster).
    Everything started is closed when ``stack`` exits: quietly after Ctrl-C
    (:class:`ShutdownHush`).
    """
    kind = job.compute.scheduler_kind
    if kind not in ("local", "batch", "address"):
        return lambda: None
    hush = ShutdownHush()
    stack.callback(hush.restore)  # once all that was started is closed
    if kind == "local":
        started = _start_local_cluster(job, stack)
    elif kind == "batch":
        from .batch import submit_workers

        started = submit_workers(job, stack, log)
    else:
        def started() -> Any:
            from distributed import Client

            return stack.enter_context(Client(job.compute.scheduler))
    stack.push(hush)  # before the cluster closes

    def client() -> Any:
        made = started()
        stack.push(hush)  # before the client closes
        return made

    return client


def run_in_threads(task: BlockTask, blocks: Sequence[Block], on_result: Callable[[BlockResult], None], *,
                   workers: int) -> None:
    """Run ``task`` on every block in a pool of ``workers`` threads of this process; each result goes to
    ``on_result`` in this thread as soon as it is in.

    BLAS is held to one thread for the whole pool: the tasks' own (process-wide)
    limits overlap in time, and one ending would otherwise lift the limit under
    another, whose sums would then depend on the timing in their last bits.
    """
    with one_blas_thread(), ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(task, block) for block in blocks]
        for future in as_completed(futures):
            on_result(future.result())


def run_on_client(client: Any, task: BlockTask, blocks: Sequence[Block],
                  on_result: Callable[[Any], Iterable[Any] | None], *, give_up_after: float | None,
                  log: Callable[[str], None], performance_report: str | None = None,
                  held: dict[tuple[int, int, int], Any] | None = None) -> None:
    """Run ``task`` on every block through a ``distributed.Client``; each result goes to ``on_result``
    in this thread as soon as it is in, and is released once read (memory does not grow with the stack).
    ``on_result`` may return more futures (e.g. an image's model fit, submitted once its blocks are in):
    the run waits for them too and hands their results to ``on_result`` in the same way.

    A :class:`WorkerWatch` says when no worker is left; with ``give_up_after``
    (seconds), it stops the run that long after the last worker left by
    cancelling what is left, and the run raises its :class:`~pipeline.errors.BatchError`.
    ``performance_report``: the file of a Dask performance report of the run.

    ``held``: where given, the blocks' results stay on the workers, in this
    dict's futures by ``(image, by, bx)`` (for tasks that take them, such as an
    image's joint model fit), and ``on_result`` gets them without their
    statistics (:meth:`~pipeline.job.blocks.BlockResult.without_statistics`).
    """
    from distributed import as_completed as completed_in_turn
    from distributed import performance_report as dask_performance_report

    report = dask_performance_report(filename=performance_report) if performance_report else nullcontext()
    with client.as_current(), report:
        tasks = []
        for order, block in enumerate(blocks):
            with dask.annotate(priority=-order):  # in the given order: images finish one after another
                tasks.append(task.delayed(block))
        futures = client.compute(tasks)
        if held is not None:
            held.update(((b.image, b.by, b.bx), f) for b, f in zip(blocks, futures))
            futures = [client.submit(methodcaller("without_statistics"), f, key=f"{f.key}-read", pure=False)
                       for f in futures]
        waiting = WaitingFutures(futures)
        completed = completed_in_turn(futures)
        del futures
        with WorkerWatch(client, waiting, give_up_after, log) as watch:
            for future in completed:
                try:
                    if watch.error is not None:
                        raise watch.error
                    result = future.result()  # may wait for a recomputation, then be cancelled
                except Exception:
                    if watch.error is not None:
                        raise watch.error from None
                    raise
                more = on_result(result)
                waiting.remove(future.key)
                for follow_up in more or ():
                    waiting.add(follow_up)
                    completed.add(follow_up)


class WaitingFutures:
    """The futures of a run not yet read, by key; the run's thread removes them as it reads them while
    the :class:`WorkerWatch` may take what is left, hence the lock."""

    def __init__(self, futures: Iterable[Any]):
        self._lock = threading.Lock()
        self._futures = {future.key: future for future in futures}

    def add(self, future: Any) -> None:
        with self._lock:
            self._futures[future.key] = future

    def remove(self, key: Any) -> None:
        with self._lock:
            del self._futures[key]

    def left(self) -> list[Any]:
        """The futures not read yet."""
        with self._lock:
            return list(self._futures.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._futures)


class WorkerWatch(threading.Thread):
    """Watches that the run still has workers; says so when none are left, and stops a run whose
    workers cannot come back (``give_up_after`` seconds without any) by cancelling what is left of it."""

    def __init__(self, client: Any, waiting: WaitingFutures, give_up_after: float | None,
                 log: Callable[[str], None]):
        super().__init__(name="kernelmap-worker-watch", daemon=True)
        self.client, self.waiting, self.give_up_after, self.log = client, waiting, give_up_after, log
        self.error: BatchError | None = None
        self._stop_event = threading.Event()

    def __enter__(self) -> WorkerWatch:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop_event.set()
        self.join(5)

    def run(self) -> None:
        since = last = None
        while not self._stop_event.wait(2.0):
            try:
                workers = self.client.scheduler_info(n_workers=-1)["workers"]
            except Exception:  # the scheduler is busy or closing: look again
                continue
            now = time.monotonic()
            if workers:
                since = None
                continue
            since = since or now
            if last is None or now - last >= 30:
                last = now
                self.log(f"no workers connected for {now - since:.0f} s; waiting for them")
            if self.give_up_after is not None and now - since > self.give_up_after:
                left = self.waiting.left()
                self.error = BatchError(
                    f"every worker job has ended and none replaces them ({len(left)} blocks left): "
                    "set compute.batch.adapt (with worker_lifetime under the walltime) so that lost or "
                    "expired worker jobs are replaced, then run the job again with output.mode=resume"
                )
                self.client.cancel(left)
                return
