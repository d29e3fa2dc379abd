"""Running a job: plan it (:mod:`~pipeline.job.plan`), then execute the plan.

Executing a plan opens the output store as the plan says (create, overwrite or
resume), runs the task of every block not yet done (:mod:`~pipeline.job.blocks`;
with ``kernel.direction: auto`` a block of an image whose direction is not
decided goes its own tiles' majority way, and the finisher fits again the
blocks of an image that went the other way, :mod:`~pipeline.job.finish`)
where ``compute.scheduler`` says (:mod:`~pipeline.job.executors`), gives each
block result to the image finisher (:mod:`~pipeline.job.finish`), which writes
an image's diagnostics and kernel-field model once all its blocks are in, and
marks the store complete.  A killed run is resumed by running the same job with
``output.mode: resume``: only blocks without a record are computed, the others
are read back from the store and finished the same way, and every tile's result
does not depend on which other tiles ran with it, so the result equals an
uninterrupted run's.  The run holds the output's lock (:mod:`pipeline.io.lock`)
from the moment it starts writing to its end, however it ends; an overwrite
writes beside the output and swaps the complete result in
(:mod:`pipeline.io.swap`).

A run in which every tile of some image is unusable (flagged ``no_data`` or
``no_signal``, its kernels NaN) still writes everything and marks the store
complete; its summary lists those images (:attr:`RunSummary.unusable_images`),
says why and what to change (:meth:`RunSummary.unusable_report`), and the
``kernelmap run`` command exits with :data:`EXIT_UNUSABLE`.
"""

from __future__ import annotations

import datetime as _dt
import os
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack, suppress
from dataclasses import dataclass
from operator import methodcaller
from typing import Any

import numpy as np

from .. import flags as fl
from ..core.tiles import EDGE, Block
from ..errors import OptionError
from ..io.lock import OutputLock
from ..io.paths import path_within
from ..io.store import FORWARD, RECORD_FIELDS, REVERSE, OutputStore
from .blocks import UNDECIDED, BlockResult, BlockTask, DirectedTask
from .config import JobConfig, load_job
from .executors import WORKER_ENV, connect, run_in_threads, run_on_client
from .finish import ImageFinisher, ImageFit, JointFit, fit_image
from .ingest import ingested_input
from .plan import Plan, plan_job
from .progress import Progress

__all__ = ["EXIT_UNUSABLE", "WORKER_ENV", "Plan", "RunSummary", "UnusableImage", "execute_plan", "plan_job",
           "run_job", "unusable_hint"]

#: Seconds without any worker after which a batch run that cannot get new workers (fixed
#: ``compute.batch.jobs``, no ``adapt``) stops instead of waiting forever.
NO_WORKERS_GRACE = 30.0

#: Exit status of ``kernelmap run`` when every tile of some image is unusable (the output is
#: written and complete all the same).  2 is a refused job or bad input, 130 an interrupted run.
EXIT_UNUSABLE = 3

#: What makes a tile unusable and what to change, by flag and method (``None``: any method).
_HINTS: dict[tuple[str, str | None], str] = {
    ("no_data", "welch"): (
        "every segment of these tiles touches bad pixels too clustered to fill (NaN/inf in the source or "
        "target, or input.mask; an image entirely bad gives this): check the image's bad pixels, "
        "set kernel.segment_size smaller, or use kernel.method: lstsq"),
    ("no_data", "lstsq"): (
        "too few valid pixels for the kernel's unknowns (NaN/inf in the source or target, or input.mask; "
        "an image entirely bad gives this): set kernel.size smaller or tiles.size larger, or mask fewer "
        "pixels"),
    ("no_data", None): (
        "too few valid pixels (NaN/inf in the source or target, or input.mask): check the image's bad pixels"),
    ("no_signal", None): (
        "the source has no usable power: check that input.source and input.target are not swapped and that "
        "neither image is blank or constant"),
}


def unusable_hint(flag: str, method: str) -> str:
    """Why tiles get ``flag`` (``no_data``, ``no_signal``) with ``method``, and which option to change."""
    return _HINTS.get((flag, method)) or _HINTS.get((flag, None)) or f"tiles flagged {flag}"


@dataclass(frozen=True)
class UnusableImage:
    """An image none of whose tiles has a usable kernel."""

    index: int  #: position along the output's ``image`` dimension
    label: str  #: its ``image`` coordinate, as text
    n_tiles: int  #: tiles of the image (all unusable)
    flags: dict[str, int]  #: tiles per flag that made them unusable (a tile may have several)

    def describe(self) -> str:
        """``image 1 ('epoch-1'): 9 of 9 tiles unusable: no_data 9``."""
        name = f"image {self.index}" + ("" if self.label == str(self.index) else f" ({self.label!r})")
        counts = ", ".join(f"{flag} {count}" for flag, count in self.flags.items())
        return f"{name}: {self.n_tiles} of {self.n_tiles} tiles unusable: {counts}"


@dataclass(frozen=True)
class RunSummary:
    """What a run did.

    ``unusable_images``: the images none of whose tiles has a usable kernel
    (the output holds them, with NaN kernels); ``method``: the job's
    estimator, which the advice of :meth:`unusable_report` depends on.
    """

    path: str
    n_tiles: int
    tiles_computed: int
    tiles_skipped: int
    tiles_flagged: int
    blocks_computed: int
    blocks_skipped: int
    seconds: float
    unusable_images: tuple[UnusableImage, ...] = ()
    method: str = ""
    n_images: int = 0
    #: labels of the images with usable tiles but no kernel-field model (``model_degree`` -1: the fit had too
    #: little to go on), among those finished by this run
    unmodelled_images: tuple[str, ...] = ()
    #: tiles of the images finished by this run with a problem flag (the informational ``masked`` and
    #: ``outliers_clipped`` do not count; the model's outliers do): what "flagged" means
    tiles_with_problems: int = 0
    #: images (of all the output's) whose kernels are reversed: source = kernel * target + background
    images_reversed: int = 0
    #: of the images finished by this run: tiles whose kernel sharpens (flagged ``target_sharper``: the
    #: minority of an image whose field crosses over, or any tile against a direction forced by the job), and
    #: tiles whose two images are ``nearly_equal``
    tiles_target_sharper: int = 0
    tiles_nearly_equal: int = 0
    #: tiles fitted a second time: their block went its own tiles' majority way before its image's direction was
    #: decided, and the image went the other way (``kernel.direction: auto``, fields that cross over)
    tiles_refitted: int = 0

    @property
    def tiles_per_second(self) -> float:
        return self.tiles_computed / self.seconds if self.seconds > 0 else float("nan")

    def open_dataset(self):
        """The result as an :class:`xarray.Dataset` (lazy)."""
        import xarray as xr

        return xr.open_zarr(self.path)

    @property
    def all_images_usable(self) -> bool:
        """Whether every image has at least one usable kernel."""
        return not self.unusable_images

    def describe(self) -> str:
        text = (
            f"done: {self.tiles_computed} tiles computed, {self.tiles_skipped} skipped (already done), "
            f"{self.tiles_with_problems} with a problem flag ({self.tiles_flagged} unusable), in {self.seconds:.1f} s "
            f"({self.tiles_per_second:.1f} tiles/s); result: {self.path}"
        )
        if self.images_reversed:
            n, per = self.images_reversed, self.n_tiles // max(1, self.n_images)
            text += (f"; {n} of {self.n_images} image{'s' if self.n_images != 1 else ''} reversed (target sharper "
                     f"than source: source = kernel * target + background, {n * per} tiles)")
        if self.tiles_target_sharper:
            text += (f"; {self.tiles_target_sharper} tiles flagged target_sharper (the kernel would sharpen: "
                     "against their image's direction)")
        if self.tiles_nearly_equal:
            text += f"; {self.tiles_nearly_equal} tiles nearly_equal (kernel close to a delta)"
        if self.tiles_refitted:
            text += f"; {self.tiles_refitted} tiles fitted again in their image's direction"
        if self.unusable_images:
            text += f"; every tile unusable in {len(self.unusable_images)} image(s)"
        if self.unmodelled_images:
            shown = ", ".join(self.unmodelled_images[:5]) + (" ..." if len(self.unmodelled_images) > 5 else "")
            text += (f"; no kernel-field model could be fitted for {len(self.unmodelled_images)} image(s) ({shown}: "
                     "model_degree -1; their tiles' kernels are kept)")
        return text

    def unusable_report(self) -> str:
        """Which images have no usable kernel, by which flags, and what to change ("" when none).

        The first line says how many images and where the (complete) output
        is; one line per image gives its tiles per flag; one line per flag
        says what it means for the job's method and which option to change.
        """
        if not self.unusable_images:
            return ""
        n, total = len(self.unusable_images), self.n_images or len(self.unusable_images)
        lines = [f"every tile of {n} of {total} image{'s' if total != 1 else ''} is unusable (kernels NaN); "
                 f"the output is complete: {self.path}"]
        lines += [f"  {image.describe()}" for image in self.unusable_images]
        seen = dict.fromkeys(flag for image in self.unusable_images for flag in image.flags)
        lines += [f"  {flag}: {unusable_hint(flag, self.method)}" for flag in seen]
        return "\n".join(lines)


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
    with ExitStack() as stack:  # a cluster started to ingest the FITS files runs the job too
        client = ingested_input(job, log, client=client, stack=stack, progress=progress)
        return execute_plan(plan_job(job), client=client, progress=progress,
                            performance_report=performance_report, log=log, started=started)


def _joint_resume(store: OutputStore, stored: list[Block], pending: list[Block]
                  ) -> tuple[list[Block], list[tuple[Block, np.ndarray, np.ndarray]]]:
    """For a resumed run with the joint model: ``(blocks to compute again for their statistics, the stored
    results (block, record, kernels) to finish images from)``.  Images with a model are in neither; images
    wholly stored none of whose tiles can enter a model are finished from the store (no model, as before;
    their blocks read once); the others are computed again."""
    modelled = store.modelled_images()
    unfinished = {b.image for b in pending}
    whole = list(store.read_blocks([b for b in stored if not modelled[b.image] and b.image not in unfinished]))
    hopeful = {block.image for block, record, kernels in whole
               if fl.modelled(kernels, record[..., RECORD_FIELDS.index("quality_flag")]).any()}
    recompute = [b for b in stored if not modelled[b.image] and (b.image in unfinished or b.image in hopeful)]
    return recompute, [result for result in whole if result[0].image not in hopeful]


def execute_plan(plan: Plan, *, client: Any = None, progress: bool = True, performance_report: str | None = None,
                 log: Callable[[str], None] = print, started: float | None = None) -> RunSummary:
    """Execute a plan just made by :func:`plan_job` (:meth:`Plan.execute` makes it again, so that what exists
    at ``output.path`` is read at once before); ``started``: the ``time.monotonic()`` its run's time counts
    from (now by default)."""
    t0 = time.monotonic() if started is None else started
    job, opening = plan.job, plan.opening
    if opening.refusal is not None:  # before anything is started or written
        raise opening.refusal
    if performance_report is not None:
        _check_report_path(performance_report, job)
    # one run per output: released on success, on an error and on Ctrl-C; the workers never touch it
    with OutputLock(opening.output, what=f"output.path {job.output.path}", log=log):
        return _execute(plan, client=client, progress=progress, performance_report=performance_report,
                        log=log, t0=t0)


def _run_blocks(job: JobConfig, client: Any, task: Any, blocks: list[Block], on_result: Callable[[Any], Any], *,
                log: Callable[[str], None], performance_report: str | None = None,
                held: dict[tuple[int, int, int], Any] | None = None) -> None:
    """Run ``task`` on ``blocks`` on the client, or in this process's threads as ``compute.scheduler`` says."""
    if client is not None:
        give_up = job.compute.scheduler_kind == "batch" and job.compute.batch.adapt is None
        run_on_client(client, task, blocks, on_result, give_up_after=NO_WORKERS_GRACE if give_up else None,
                      log=log, performance_report=performance_report, held=held)
    else:
        c = job.compute
        run_in_threads(task, blocks, on_result,
                       workers=1 if c.scheduler == "synchronous" else c.n_workers * c.threads_per_worker)


def _directions(job: JobConfig, store: OutputStore) -> np.ndarray:
    """Each image's direction as the run starts: as stored for the images finished already, the job's
    ``kernel.direction`` for the others, or ``UNDECIDED`` with ``auto`` (decided by the finisher once all
    the image's blocks are in, :mod:`~pipeline.job.finish`)."""
    directions = store.read_directions()
    if job.kernel.direction != "auto":
        directions[directions == UNDECIDED] = FORWARD if job.kernel.direction == "forward" else REVERSE
    return directions


def _check_report_path(report: str, job: JobConfig) -> None:
    """Refuse a performance report that would be written into the input store or the output store."""
    for key, store in (("input.path", job.input.path), ("output.path", job.output.path)):
        if path_within(report, store):
            raise OptionError(f"--performance-report {report} lies inside the store {key} {store}, which it "
                              "would write into: nothing was changed; give a file outside it")


def _execute(plan: Plan, *, client: Any, progress: bool, performance_report: str | None,
             log: Callable[[str], None], t0: float) -> RunSummary:
    """:func:`execute_plan` under the output's lock."""
    job, opening = plan.job, plan.opening
    attrs = plan.attributes()
    blocks, done = plan.blocks, plan.done
    pending = [b for b in blocks if not done[b.image, b.by, b.bx]]
    stored = [b for b in blocks if done[b.image, b.by, b.bx]]
    flagged: dict[tuple[int, int, int], int] = {}  # unusable tiles of each block computed, as last computed
    with ExitStack() as stack:
        get_client = connect(job, stack, log) if client is None else None
        if plan.grid.block_tiles != plan.asked_block_tiles:
            log("resuming with the store's blocks of {}x{} tiles".format(*plan.grid.block_tiles))
        if opening.action == "resume" and plan.grid.rule != EDGE:
            uy, ux = plan.grid.uncovered
            log(f"resuming with the store's tile grid of an earlier version: {uy} rows and {ux} columns at the "
                "far edges stay uncovered (output.mode=overwrite covers them)")
        store = opening.open(plan.layout, attrs, log=log)
        recompute, without_model = [], []
        if job.model.method == "joint" and stored:
            # the joint model needs the tiles' statistics, which are not stored: the stored blocks of images
            # without a model are computed again (identically, not written); images with one are left as they
            # are, and so are images wholly stored none of whose tiles can enter a model (no statistics needed)
            recompute, without_model = _joint_resume(store, stored, pending)
            if recompute:
                n = len({b.image for b in recompute})
                log(f"computing {len(recompute)} stored blocks again for the joint model's statistics "
                    f"({n} image{'s' if n > 1 else ''} without a model yet)")
        directions = _directions(job, store)
        finisher = ImageFinisher(store, plan.grid, plan.layout.n_images, job.model, directions)
        if job.model.method == "joint":
            for block, record, kernels in without_model:
                finisher.add(block, record, kernels)
        else:
            finisher.add_stored(stored)

        held: dict[tuple[int, int, int], Any] | None = None  # blocks' results kept on the workers (joint model)
        nby, nbx = plan.grid.blocks_shape

        task = BlockTask(plan.inputs.reader, plan.grid, job, store,
                         frozenset((b.image, b.by, b.bx) for b in recompute))
        directed = DirectedTask(task, finisher.directions, set())
        refitted: list[int] = []  # tiles of each block fitted again

        def mark_refit(block: Block) -> None:
            """Count ``block`` as fitted again in its image's direction (written even if stored before)."""
            directed.refits.add((block.image, block.by, block.bx))
            bar.total += block.n_tiles
            refitted.append(block.n_tiles)

        def refit(block: Block) -> Any:
            """Fit ``block`` again in its image's direction: a future of its result (a client), else the result."""
            mark_refit(block)
            if client is None:
                return directed(block)
            future = client.compute(directed.delayed(block))
            if held is None:
                return future
            held[block.image, block.by, block.bx] = future
            return client.submit(methodcaller("without_statistics"), future, key=f"{future.key}-read", pure=False)

        def finished(result: BlockResult | ImageFit) -> list[Any]:
            if isinstance(result, ImageFit):  # a model fitted on a worker
                finisher.fitted(result)
                return []
            if result.written:
                flagged[result.block.image, result.block.by, result.block.bx] = result.flagged
            image = result.block.image
            finisher.add(result.block, result.record, result.kernels, result.statistics)
            bar.update(result.n_tiles)
            if held is not None and finisher.missing[image] == 0:
                # an image finished without a fit (no usable tile) leaves its blocks' results on the workers
                for key in [(image, by, bx) for by in range(nby) for bx in range(nbx)]:
                    held.pop(key, None)
            more = finisher.take_submitted()
            for block in finisher.take_refits():  # blocks fitted the other way from their image
                again = refit(block)
                if client is None:
                    more += finished(again) or []
                else:
                    more.append(again)
            return more

        if get_client is not None:
            client = get_client()
        if client is not None and progress:
            log(f"dashboard: {client.dashboard_link}")
        bar = Progress(sum(b.n_tiles for b in pending + recompute), log, progress)
        # blocks read back from the store whose image, now complete, went the other way: fitted again first
        early = finisher.take_refits()
        for block in early:
            mark_refit(block)
        if client is not None and job.model.method == "joint":
            # each image's joint fit runs on a worker, beside the blocks of other images and before them, from
            # its blocks' results, which stay on the workers: the client reads only their kernels and records
            held = {}

            def offload(fit: JointFit, client=client) -> Any:
                results = [held.pop((fit.image, by, bx)) for by in range(nby) for bx in range(nbx)]
                return client.submit(fit_image, fit, *results, pure=False, key=f"kernelmap-model-{fit.image}",
                                     priority=1)

            finisher.offload = offload
        work = early + pending + recompute
        try:
            _run_blocks(job, client, directed, work, finished, log=log, performance_report=performance_report,
                        held=held)
        except BaseException:  # interrupted, or a task failed: the images finished so far are kept (a sharded
            with suppress(Exception):  # store has their kernels only here), the cause raised as it was
                finisher.flush()
            raise
    finisher.flush()
    seconds = time.monotonic() - t0
    skipped_tiles = sum(b.n_tiles for b in stored)
    labels = plan.layout.images
    tiles_per_image = plan.n_tiles // max(1, plan.layout.n_images)
    unusable = tuple(UnusableImage(int(i), str(labels[i]), tiles_per_image, counts)
                     for i, counts in sorted(finisher.unusable.items()))
    summary = RunSummary(opening.output, plan.n_tiles, plan.n_tiles - skipped_tiles, skipped_tiles,
                         sum(flagged.values()), len(pending), len(blocks) - len(pending), seconds,
                         unusable_images=unusable, method=job.kernel.method, n_images=plan.layout.n_images,
                         unmodelled_images=tuple(str(labels[i]) for i in sorted(finisher.unmodelled)),
                         tiles_with_problems=finisher.tiles_with_problems,
                         images_reversed=int(np.count_nonzero(store.read_directions() == REVERSE)),
                         tiles_target_sharper=finisher.tiles_target_sharper,
                         tiles_nearly_equal=finisher.tiles_nearly_equal, tiles_refitted=sum(refitted))
    store.mark_complete({"kernelmap_finished": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")})
    opening.finish(store, log=log)  # a replacement written beside the output swapped into place
    if progress:
        log(summary.describe())
    return summary

