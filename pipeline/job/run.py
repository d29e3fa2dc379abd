"""Running a job: plan it (:mod:`~pipeline.job.plan`), then execute the plan.

Executing a plan opens the output store as the plan says (create, overwrite or
resume), runs the task of every block not yet done (:mod:`~pipeline.job.blocks`)
where ``compute.scheduler`` says (:mod:`~pipeline.job.executors`), gives each
block result to the image finisher (:mod:`~pipeline.job.finish`), which writes
an image's diagnostics and kernel-field model once all its blocks are in, and
marks the store complete.  A killed run is resumed by running the same job with
``output.mode: resume``: only blocks without a record are computed, the others
are read back from the store and finished the same way, and every tile's result
does not depend on which other tiles ran with it, so the result equals an
uninterrupted run's.
"""

from __future__ import annotations

import datetime as _dt
import os
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

from ..errors import OptionError
from .blocks import BlockResult, BlockTask
from .config import JobConfig, load_job
from .executors import WORKER_ENV, connect, run_in_threads, run_on_client
from .finish import ImageFinisher
from .plan import Plan, plan_job
from .progress import Progress

__all__ = ["WORKER_ENV", "Plan", "RunSummary", "execute_plan", "plan_job", "run_job"]

#: Seconds without any worker after which a batch run that cannot get new workers (fixed
#: ``compute.batch.jobs``, no ``adapt``) stops instead of waiting forever.
NO_WORKERS_GRACE = 30.0


@dataclass(frozen=True)
class RunSummary:
    """What a run did."""

    path: str
    n_tiles: int
    tiles_computed: int
    tiles_skipped: int
    tiles_flagged: int
    blocks_computed: int
    blocks_skipped: int
    seconds: float

    @property
    def tiles_per_second(self) -> float:
        return self.tiles_computed / self.seconds if self.seconds > 0 else float("nan")

    def open_dataset(self):
        """The result as an :class:`xarray.Dataset` (lazy)."""
        import xarray as xr

        return xr.open_zarr(self.path)

    def describe(self) -> str:
        return (
            f"done: {self.tiles_computed} tiles computed, {self.tiles_skipped} skipped (already done), "
            f"{self.tiles_flagged} flagged unusable, in {self.seconds:.1f} s "
            f"({self.tiles_per_second:.1f} tiles/s); result: {self.path}"
        )


def run_job(
    job: JobConfig | str | os.PathLike,
    *,
    overrides: Sequence[str] = (),
    progress: bool = True,
    client: Any = None,
    performance_report: str | None = None,
    log: Callable[[str], None] = print,
) -> RunSummary:
    """Run a job (a :class:`JobConfig` or a YAML path) and return its summary: load, plan, execute.

    ``client``: a ``distributed.Client`` to use instead of what
    ``compute.scheduler`` says (e.g. a cluster kept running between jobs).
    """
    if not isinstance(job, JobConfig):
        job = load_job(job, overrides)
    elif overrides:
        raise OptionError("overrides apply to job files; pass a JobConfig already overridden")
    started = time.monotonic()
    return execute_plan(plan_job(job), client=client, progress=progress, performance_report=performance_report,
                        log=log, started=started)


def execute_plan(plan: Plan, *, client: Any = None, progress: bool = True, performance_report: str | None = None,
                 log: Callable[[str], None] = print, started: float | None = None) -> RunSummary:
    """Execute a plan just made by :func:`plan_job` (:meth:`Plan.execute` makes it again, so that what exists
    at ``output.path`` is read at once before); ``started``: the ``time.monotonic()`` its run's time counts
    from (now by default)."""
    t0 = time.monotonic() if started is None else started
    job, opening = plan.job, plan.opening
    if opening.refusal is not None:  # before anything is started or written
        raise opening.refusal
    attrs = plan.attributes()
    blocks, done = plan.blocks, plan.done
    pending = [b for b in blocks if not done[b.image, b.by, b.bx]]
    stored = [b for b in blocks if done[b.image, b.by, b.bx]]
    flagged = 0
    with ExitStack() as stack:
        get_client = connect(job, stack, log) if client is None else None
        if plan.grid.block_tiles != plan.asked_block_tiles:
            log("resuming with the store's blocks of {}x{} tiles".format(*plan.grid.block_tiles))
        store = opening.open(plan.layout, attrs, log=log)
        bar = Progress(sum(b.n_tiles for b in pending), log, progress)
        finisher = ImageFinisher(store, plan.grid, plan.layout.n_images, job.model)
        finisher.add_stored(stored)

        def finished(result: BlockResult) -> None:
            nonlocal flagged
            flagged += result.flagged
            finisher.add(result.block, result.record, result.kernels)
            bar.update(result.n_tiles)

        if get_client is not None:
            client = get_client()
        if client is not None and progress:
            log(f"dashboard: {client.dashboard_link}")
        task = BlockTask(plan.inputs.reader, plan.grid, job, store)
        if client is not None:
            give_up = job.compute.scheduler_kind == "batch" and job.compute.batch.adapt is None
            run_on_client(client, task, pending, finished, give_up_after=NO_WORKERS_GRACE if give_up else None,
                          log=log, performance_report=performance_report)
        else:
            c = job.compute
            run_in_threads(task, pending, finished,
                           workers=1 if c.scheduler == "synchronous" else c.n_workers * c.threads_per_worker)
    finisher.flush()
    seconds = time.monotonic() - t0
    skipped_tiles = sum(b.n_tiles for b in stored)
    summary = RunSummary(store.path, plan.n_tiles, plan.n_tiles - skipped_tiles, skipped_tiles,
                         flagged, len(pending), len(blocks) - len(pending), seconds)
    store.mark_complete({"kernelmap_finished": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")})
    if progress:
        log(summary.describe())
    return summary

