"""Running a job: plan the tiles and blocks, prepare the output store, compute, record.

The orchestration stays thin: each task reads one block of input pixels
straight from the store, calls :func:`pipeline.estimate_kernels` on all the
block's tiles at once, writes the kernels into the block's own chunk of the
output store and then the block's record (its per-tile diagnostics, which
mark it done).  The client copies an image's diagnostics into the Dataset's
variables once all its blocks are in.  A killed run is resumed by running the same job
with ``output.mode: resume``: only blocks without a record are computed, and
every tile's result does not depend on which other tiles ran with it, so the
result equals an uninterrupted run's.
"""

from __future__ import annotations

import datetime as _dt
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, replace
from typing import Any

import dask
import numpy as np
from threadpoolctl import threadpool_limits

from .. import flags as fl
from .executors import WORKER_ENV, connect
from .config import JobConfig, ModelConfig, dump_job, load_job
from ..errors import BatchError, OptionError
from ..core.estimate import estimate_kernels
from ..io.inputs import InputReader, Inputs, open_inputs
from ..io.store import (
    DIAGNOSTICS,
    IMAGES_PER_CHUNK,
    RECORD_FIELDS,
    ImageResults,
    StoreLayout,
    block_record,
    completed_blocks,
    create_store,
    json_attr,
    mark_complete,
    read_attrs,
    read_kernels,
    read_records,
    remove_store,
    store_exists,
    store_id,
    stored_block_tiles,
    write_block,
    write_images,
)
from ..core.field import fit_tiles, tile_weights
from ..core.tiles import Block, TileGrid, block_shape_for_chunks

__all__ = ["WORKER_ENV", "Plan", "RunSummary", "plan_job", "run_job"]



@dataclass(frozen=True)
class Plan:
    """What a job will do: inputs, tiles, blocks and the output layout."""

    job: JobConfig
    inputs: Inputs
    grid: TileGrid
    layout: StoreLayout

    @property
    def blocks(self) -> list[Block]:
        return list(self.grid.blocks(self.layout.n_images))

    @property
    def n_tiles(self) -> int:
        ty, tx = self.grid.shape
        return self.layout.n_images * ty * tx

    def memory_per_task(self) -> int:
        """Rough peak bytes of one task: its pixel region in float64 plus estimator work space."""
        by, bx = self.grid.block_tiles
        size, step = self.grid.size, self.grid.step
        h, w = (by - 1) * step + size, (bx - 1) * step + size
        k = self.layout.kernel_size
        region = h * w * 8 * 4  # source, target, bad map and their float copies
        tiles = by * bx * size * size * 8 * 3  # tile stacks and model images
        solver = 4 * (k * k) ** 2 * 8 * 3 + 12 * (size + k) ** 2 * 16  # Grams, FFT spectra
        return region + tiles + solver

    def describe(self) -> str:
        """The dry-run text."""
        job, grid, inp = self.job, self.grid, self.inputs
        n, ny, nx = inp.shape
        ty, tx = grid.shape
        nby, nbx = grid.blocks_shape
        by, bx = grid.block_tiles
        uy, ux = grid.uncovered
        k = self.layout.kernel_size
        lines = [
            f"input      {job.input.path}: {n} image(s) of {ny}x{nx} px, chunks {inp.chunks[0]}x{inp.chunks[1]}, "
            f"source {'shared 2-D reference' if inp.shared_source else 'one per image'}, "
            f"mask {job.input.mask or 'none (NaN pixels are bad)'}",
            f"images     {', '.join(map(str, inp.images[:6]))}{' ...' if n > 6 else ''}",
            f"tiles      {grid.size} px every {grid.step} px: {ty}x{tx} per image, {self.n_tiles} in all"
            + (f"; {uy} rows and {ux} columns at the far edges not covered" if uy or ux else ""),
            f"blocks     {by}x{bx} tiles each: {nby}x{nbx} per image, {n * nby * nbx} tasks",
            f"memory     about {self.memory_per_task() / 2**20:.0f} MiB per task",
            f"kernel     {k}x{k}, method {job.kernel.method}, options {job.kernel.estimator_options()}",
            f"output     {job.output.path} (mode {job.output.mode}): kernel(image={n}, y={ty}, x={tx}, "
            f"ky={k}, kx={k}) {job.output.dtype}, chunks (1, {by}, {bx}, {k}, {k}); "
            f"{len(DIAGNOSTICS)} per-tile diagnostics and the kernel-field model, chunks of "
            f"{min(n, IMAGES_PER_CHUNK)} images; block records in status/records",
            f"compute    {_describe_compute(job)}",
        ]
        return "\n".join(lines)


def _describe_compute(job: JobConfig) -> str:
    c = job.compute
    if c.scheduler == "local":
        kind = "processes" if c.processes else "threads"
        return (f"local cluster: {c.n_workers} worker {kind} x {c.threads_per_worker} thread(s), "
                f"memory limit {c.memory_limit}")
    if c.scheduler in ("threads", "synchronous"):
        return f"dask {c.scheduler} scheduler in this process"
    if c.scheduler_kind == "batch":
        from .batch import worker_job_script

        b = c.batch
        size = (f"adaptive, {b.adapt.minimum_jobs} to {b.adapt.maximum_jobs} jobs" if b.adapt
                else f"{b.jobs} job(s)")
        script = worker_job_script(job).rstrip().replace("\n", "\n    ")
        return f"{c.scheduler} worker jobs through dask-jobqueue, {size}; each job runs:\n    {script}"
    return f"running scheduler at {c.scheduler}"


def plan_job(job: JobConfig) -> Plan:
    """Open and check the inputs and lay out tiles, blocks and the output."""
    inputs = open_inputs(
        job.input.path, source=job.input.source, target=job.input.target, mask=job.input.mask,
        group=job.input.group, storage_options=job.input.storage_options, min_size=job.tiles.size,
    )
    n, ny, nx = inputs.shape
    step = job.tiles.step or job.tiles.size
    if job.compute.block_tiles:
        block = (job.compute.block_tiles, job.compute.block_tiles)
    else:
        block = block_shape_for_chunks(inputs.chunks, job.tiles.size, step)
    grid = TileGrid(ny, nx, job.tiles.size, step, block)
    model_degree = job.model.degree if job.model.degree is not None else job.model.max_degree
    layout = StoreLayout(grid, np.asarray(inputs.images), dict(inputs.image_attrs), job.kernel.size,
                         job.output.dtype, model_degree)
    return Plan(job, inputs, grid, layout)


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


def _process_block(reader: InputReader, block: Block, grid: TileGrid, job: JobConfig,
                   store: str) -> dict[str, Any]:
    """One task: read the block's pixels, estimate every tile, write the block's chunks and record."""
    ys, xs = grid.pixel_region(block)
    src, tgt, mask = reader.read(block.image, ys, xs)
    src_tiles, tgt_tiles = grid.cut(src, block), grid.cut(tgt, block)
    mask_tiles = None if mask is None else grid.cut(mask, block)
    del src, tgt, mask
    kernel = job.kernel
    res = estimate_kernels(
        src_tiles, tgt_tiles, kernel_size=kernel.size, method=kernel.method, mask=mask_tiles,
        normalize=kernel.normalize, workers=1, diagnostics=kernel.diagnostics,
        **kernel.estimator_options(),
    )
    shape = (block.ty1 - block.ty0, block.tx1 - block.tx0)
    results = {**res.as_dict(), "quality_flag": res.flags}
    record = block_record(results, shape)
    kernels = res.kernels.reshape(*shape, kernel.size, kernel.size).astype(job.output.dtype)
    write_block(job.output.path, block, kernels, record, store)
    return {"tiles": block.n_tiles, "flagged": int(np.count_nonzero(res.flags & fl.BAD)), "record": record,
            "kernels": kernels}


def _block_task(plan: Plan, block: Block, store: str):
    """The delayed task of a block; it reads its own pixels (no input graph to move data around)."""
    name = f"kernelmap-block-{block.image}-{block.by}-{block.bx}"
    return dask.delayed(_process_block, pure=False)(plan.inputs.reader, block, plan.grid, plan.job, store,
                                                     dask_key_name=name)


class _ImageFinisher:
    """Gathers the block results of each image; once all its blocks are in, fits the image's
    kernel-field model.  Diagnostics and models are written in batches (:meth:`flush`): every
    ``FLUSH_IMAGES`` images, ``FLUSH_SECONDS`` after the last write, and at the end."""

    FLUSH_IMAGES = IMAGES_PER_CHUNK
    FLUSH_SECONDS = 10.0

    def __init__(self, path: str, grid: TileGrid, done: np.ndarray, model: ModelConfig):
        self.path, self.grid, self.model = path, grid, model
        self.missing = (~done).sum(axis=(1, 2))
        self.records: dict[int, np.ndarray] = {}
        self.kernels: dict[int, np.ndarray] = {}
        self.pending: list[ImageResults] = []
        self.last_flush = time.monotonic()
        for image in map(int, np.flatnonzero(done.any(axis=(1, 2)))):  # resumed: results on disk
            self.records[image] = read_records(path, image)
            self.kernels[image] = read_kernels(path, image)
            self._finish_if_complete(image)

    def add(self, block: Block, record: np.ndarray, kernels: np.ndarray) -> None:
        image = block.image
        if image not in self.records:
            ty, tx = self.grid.shape
            self.records[image] = np.full((ty, tx, record.shape[-1]), np.nan)
            self.kernels[image] = np.full((ty, tx, *kernels.shape[-2:]), np.nan, dtype=kernels.dtype)
        self.records[image][block.ty0:block.ty1, block.tx0:block.tx1] = record
        self.kernels[image][block.ty0:block.ty1, block.tx0:block.tx1] = kernels
        self.missing[image] -= 1
        self._finish_if_complete(image)

    def _finish_if_complete(self, image: int) -> None:
        if self.missing[image] != 0:
            return
        records, kernels = self.records.pop(image), self.kernels.pop(image)
        field = {name: records[..., i] for i, name in enumerate(RECORD_FIELDS)}
        flags = field["quality_flag"].astype(np.int64)
        usable = fl.modelled(kernels, flags)
        with threadpool_limits(limits=1, user_api="blas"):  # small products: threads only contend with workers
            model, residual, rejected = fit_tiles(
                self.grid.centres_y, self.grid.centres_x, kernels, usable,
                tile_weights(field["snr"], field["flux"]),
                degree=self.model.degree, max_degree=self.model.max_degree, clip=self.model.clip,
            )
        extra = fl.model_outliers(rejected)
        self.pending.append(ImageResults(image, records, extra, model, residual))
        if len(self.pending) >= self.FLUSH_IMAGES or time.monotonic() - self.last_flush > self.FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Write the diagnostics and models of the images finished since the last write."""
        write_images(self.path, self.pending)
        self.pending = []
        self.last_flush = time.monotonic()


#: Seconds without any worker after which a batch run that cannot get new workers (fixed
#: ``compute.batch.jobs``, no ``adapt``) stops instead of waiting forever.
NO_WORKERS_GRACE = 30.0


class _WorkerWatch(threading.Thread):
    """Watches that the run still has workers; says so when none are left, and stops a run whose
    workers cannot come back (``give_up``) by cancelling what is left of it."""

    def __init__(self, client: Any, waiting: dict[Any, Any], give_up: bool, log: Callable[[str], None]):
        super().__init__(name="kernelmap-worker-watch", daemon=True)
        self.client, self.waiting, self.give_up, self.log = client, waiting, give_up, log
        self.error: BatchError | None = None
        self._stop_event = threading.Event()

    def __enter__(self) -> _WorkerWatch:
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
            except Exception:  # noqa: BLE001 - the scheduler is busy or closing: look again
                continue
            now = time.monotonic()
            if workers:
                since = None
                continue
            since = since or now
            if last is None or now - last >= 30:
                last = now
                self.log(f"no workers connected for {now - since:.0f} s; waiting for them")
            if self.give_up and now - since > NO_WORKERS_GRACE:
                self.error = BatchError(
                    f"every worker job has ended and none replaces them ({len(self.waiting)} blocks left): "
                    "set compute.batch.adapt (with worker_lifetime under the walltime) so that lost or "
                    "expired worker jobs are replaced, then run the job again with output.mode=resume"
                )
                for _ in range(10):  # the run's thread may be removing a finished one meanwhile
                    try:
                        left = list(self.waiting.values())
                        break
                    except RuntimeError:
                        continue
                else:
                    left = []
                self.client.cancel(left)
                return


def _check_output(plan: Plan, attrs: dict[str, Any]) -> str:
    """Refuse what ``output.mode`` forbids, reading only; returns ``create``, ``overwrite`` or ``resume``."""
    out = plan.job.output
    if not store_exists(out.path):
        return "create"
    if out.mode == "create":
        raise OptionError(
            f"output.path {out.path} already exists and output.mode is 'create': nothing was changed. "
            "Use output.mode=resume to finish an interrupted run of this job, or output.mode=overwrite "
            "to replace it (e.g. --set output.mode=resume)"
        )
    if out.mode == "resume":
        old = read_attrs(out.path)
        if old.get("kernelmap_fingerprint") != attrs["kernelmap_fingerprint"]:
            raise OptionError(
                f"output.mode=resume: {out.path} was made by a different configuration "
                "(tiles, kernel, input or output dtype differ); run the same job again, or use "
                "output.mode=overwrite or another output.path"
            )
        if old.get("kernelmap_input") != attrs["kernelmap_input"]:
            raise OptionError(
                f"output.mode=resume: {out.path} was made from different input data "
                f"({json_attr(old.get('kernelmap_input'))[:200]}); use output.mode=overwrite or another output.path"
            )
        stored_block_tiles(out.path)  # refuses a store without readable block records
    return out.mode


def _prepare_output(plan: Plan, attrs: dict[str, Any], action: str,
                    log: Callable[[str], None]) -> tuple[Plan, np.ndarray]:
    """Create, replace or reopen the output store; returns the plan to run and the done-block map.

    A resumed store keeps its own blocks (they are its chunks), whatever
    ``compute.block_tiles`` says now: results do not depend on them.
    """
    path = plan.job.output.path
    if action == "resume":
        block = stored_block_tiles(path)
        if block != plan.grid.block_tiles:
            log(f"resuming with the store's blocks of {block[0]}x{block[1]} tiles")
            grid = replace(plan.grid, block_tiles=block)
            plan = replace(plan, grid=grid, layout=replace(plan.layout, grid=grid))
        done = completed_blocks(path)
        log(f"resuming {path}: {int(done.sum())} of {done.size} blocks already done, skipped")
        return plan, done
    if action == "overwrite":
        log(f"overwriting {path}")
        remove_store(path)
    create_store(path, plan.layout, attrs)
    nby, nbx = plan.grid.blocks_shape
    return plan, np.zeros((plan.layout.n_images, nby, nbx), dtype=bool)


def _attributes(plan: Plan) -> dict[str, Any]:
    from .. import __version__

    job = plan.job
    return {
        "title": "kernelmap kernel maps",
        "kernelmap_version": __version__,
        "kernelmap_config": dump_job(job),
        "kernelmap_fingerprint": job.fingerprint(),
        "kernelmap_input": json_attr(plan.inputs.identity),
        "kernelmap_method": job.kernel.method,
        "kernelmap_command": " ".join(sys.argv) if sys.argv and sys.argv[0] else "python API",
        "kernelmap_created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "tile_size": job.tiles.size,
        "tile_step": plan.grid.step,
        "Conventions": "CF-1.10",
    }


class _Progress:
    """A bar on a terminal; plain periodic lines otherwise (batch logs)."""

    def __init__(self, total: int, log: Callable[[str], None], enabled: bool, interval: float = 10.0):
        self.total, self.log, self.enabled, self.interval = total, log, enabled, interval
        self.done = 0
        self.tty = enabled and sys.stderr.isatty()
        self.start = self.last = time.monotonic()

    def update(self, tiles: int) -> None:
        self.done += tiles
        if not self.enabled:
            return
        now = time.monotonic()
        frac = self.done / self.total if self.total else 1.0
        rate = self.done / max(now - self.start, 1e-9)
        if self.tty:
            bar = "#" * int(30 * frac)
            sys.stderr.write(f"\r[{bar:<30}] {self.done}/{self.total} tiles {rate:6.1f}/s")
            sys.stderr.flush()
            if self.done >= self.total:
                sys.stderr.write("\n")
        elif now - self.last >= self.interval or self.done >= self.total:
            self.last = now
            self.log(f"progress: {self.done}/{self.total} tiles ({100 * frac:.0f} %), {rate:.1f} tiles/s")


def run_job(
    job: JobConfig | str | os.PathLike,
    *,
    overrides: Sequence[str] = (),
    progress: bool = True,
    client: Any = None,
    performance_report: str | None = None,
    log: Callable[[str], None] = print,
) -> RunSummary:
    """Run a job (a :class:`JobConfig` or a YAML path) and return its summary.

    ``client``: a ``distributed.Client`` to use instead of what
    ``compute.scheduler`` says (e.g. a cluster kept running between jobs).
    """
    if not isinstance(job, JobConfig):
        job = load_job(job, overrides)
    elif overrides:
        raise OptionError("overrides apply to job files; pass a JobConfig already overridden")
    t0 = time.monotonic()
    plan = plan_job(job)
    attrs = _attributes(plan)
    action = _check_output(plan, attrs)
    flagged = 0
    with ExitStack() as stack:
        scheduler = job.compute.scheduler
        get_client = connect(job, stack, log) if client is None else None
        plan, done = _prepare_output(plan, attrs, action, log)
        blocks = plan.blocks
        pending = [b for b in blocks if not done[b.image, b.by, b.bx]]
        skipped_tiles = sum(b.n_tiles for b in blocks if done[b.image, b.by, b.bx])
        bar = _Progress(sum(b.n_tiles for b in pending), log, progress)
        finisher = _ImageFinisher(job.output.path, plan.grid, done, job.model)

        def finished(block: Block, result: dict[str, Any]) -> None:
            nonlocal flagged
            flagged += result["flagged"]
            finisher.add(block, result["record"], result["kernels"])
            bar.update(result["tiles"])

        if get_client is not None:
            client = get_client()
        if client is not None and progress:
            log(f"dashboard: {client.dashboard_link}")
        store = store_id(job.output.path)
        tasks = [_block_task(plan, b, store) for b in pending]
        if client is not None:
            from distributed import as_completed as dist_completed
            from distributed import performance_report as perf

            with client.as_current(), (perf(filename=performance_report) if performance_report
                                       else nullcontext()):
                futures = client.compute(tasks)
                block_of = {future.key: block for future, block in zip(futures, pending)}
                waiting = {future.key: future for future in futures}
                completed = dist_completed(futures)
                del futures, tasks  # each result is released once read: memory does not grow with the stack
                give_up = job.compute.scheduler_kind == "batch" and job.compute.batch.adapt is None
                watch = stack.enter_context(_WorkerWatch(client, waiting, give_up, log))
                for future in completed:
                    try:
                        if watch.error is not None:
                            raise watch.error
                        result = future.result()  # may wait for a recomputation, then be cancelled
                    except Exception:
                        if watch.error is not None:
                            raise watch.error from None
                        raise
                    finished(block_of[future.key], result)
                    del waiting[future.key]
        else:
            workers = 1 if scheduler == "synchronous" else job.compute.n_workers * job.compute.threads_per_worker
            with ThreadPoolExecutor(max_workers=workers) as pool:
                futures = {pool.submit(dask.compute, t, scheduler="synchronous"): b
                           for t, b in zip(tasks, pending)}
                for future in as_completed(futures):
                    finished(futures[future], future.result()[0])
    finisher.flush()
    seconds = time.monotonic() - t0
    summary = RunSummary(job.output.path, plan.n_tiles, plan.n_tiles - skipped_tiles, skipped_tiles,
                         flagged, len(pending), len(blocks) - len(pending), seconds)
    mark_complete(job.output.path, {"kernelmap_finished": _dt.datetime.now(_dt.timezone.utc)
                                    .isoformat(timespec="seconds")})
    if progress:
        log(summary.describe())
    return summary
