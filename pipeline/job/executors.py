"""Where a job's tasks run: a local cluster, a running scheduler, or worker jobs on a batch system.

``compute.scheduler`` picks one: ``local`` (a ``distributed.LocalCluster``
from the ``compute`` settings), the address of a running scheduler, a batch
system (``slurm``, ``sge``, ``pbs``, ``lsf``, ``htcondor``: Dask workers as
batch jobs through dask-jobqueue, imported only then), or ``threads`` /
``synchronous`` (no cluster; :mod:`pipeline.job.run` runs blocks in threads).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from typing import Any

import dask

from .config import JobConfig

__all__ = ["WORKER_ENV", "connect"]

#: Environment of worker processes: one thread per FFT/BLAS call inside tasks.  It replaces
#: dask's default, whose ``MALLOC_TRIM_THRESHOLD_`` slows these tasks by a fifth to a half.
WORKER_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _start_local_cluster(job: JobConfig, stack: ExitStack) -> Callable[[], Any]:
    """Start a LocalCluster from ``compute`` in the background; returns a function giving its client.

    Its worker processes take a second or two to start: the output store is
    prepared meanwhile.  The cluster is closed when ``stack`` exits.
    """
    from distributed import Client, LocalCluster

    c = job.compute

    def start() -> LocalCluster:
        with dask.config.set({"distributed.nanny.pre-spawn-environ": WORKER_ENV}):
            return LocalCluster(
                n_workers=c.n_workers, threads_per_worker=c.threads_per_worker, processes=c.processes,
                memory_limit=c.memory_limit, dashboard_address=c.dashboard_address,
            )

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kernelmap-cluster-start")
    future = pool.submit(start)
    pool.shutdown(wait=False)

    def close() -> None:
        if future.exception() is None:
            future.result().close()

    stack.callback(close)
    return lambda: stack.enter_context(Client(future.result()))


def connect(job: JobConfig, stack: ExitStack, log: Callable[[str], None]) -> Callable[[], Any]:
    """Begin connecting to where ``compute.scheduler`` says; returns a function giving the client.

    A local cluster starts in the background at once; batch worker jobs are
    submitted now (a refusal raises here, before the output is touched) and
    the client waits for the first of them to start.  The function
    returns ``None`` for ``threads`` and ``synchronous`` (no cluster).
    Everything started is closed when ``stack`` exits.
    """
    kind = job.compute.scheduler_kind
    if kind == "local":
        return _start_local_cluster(job, stack)
    if kind == "batch":
        from .batch import submit_workers

        return submit_workers(job, stack, log)
    if kind == "address":
        def client() -> Any:
            from distributed import Client

            return stack.enter_context(Client(job.compute.scheduler))

        return client
    return lambda: None
