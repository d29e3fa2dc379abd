"""What a job will do: its inputs, tile grid, blocks and output, and how the output is opened.

:func:`plan_job` opens and checks the inputs, lays out tiles and blocks, and
reads what already exists at ``output.path`` (only reads): a store resumed with
``output.mode: resume`` keeps its own blocks (they are its chunks), whatever
``compute.block_tiles`` says now, and its own tile grid (its ``tile_grid``
attribute: a store written before the last tiles were set against the far
edges keeps its grid without them), and its blocks already recorded are not
computed again.  :meth:`Plan.describe` is the dry run; :meth:`Plan.execute`
runs the plan (:mod:`pipeline.job.run`).
"""

from __future__ import annotations

import datetime as _dt
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from ..core.tiles import EDGE, STEP, Block, TileGrid, block_shape_for_chunks, grown_blocks
from ..errors import OptionError
from ..io.inputs import Inputs, open_inputs
from ..io.lock import describe_lock, lock_refusal
from ..io.store import DIAGNOSTICS, IMAGES_PER_CHUNK, Opening, OutputStore, StoreLayout, json_attr
from .config import JobConfig, dump_job, setting_differences

if TYPE_CHECKING:
    from .run import RunSummary

__all__ = ["Plan", "plan_job"]


@dataclass(frozen=True)
class Plan:
    """What a job will do: inputs, tiles, blocks, the output layout and how the output is opened.

    ``opening`` is what :func:`plan_job` found at ``output.path``: the action
    (``create``, ``overwrite``, ``resume``), the refusal a run raises before it
    starts anything, and for a resumed store its blocks already done.
    """

    job: JobConfig
    inputs: Inputs
    grid: TileGrid
    layout: StoreLayout
    opening: Opening

    @property
    def blocks(self) -> list[Block]:
        return list(self.grid.blocks(self.layout.n_images))

    @property
    def n_tiles(self) -> int:
        ty, tx = self.grid.shape
        return self.layout.n_images * ty * tx

    @property
    def output(self) -> OutputStore:
        """The output store (with its identifier where a resumed one was read)."""
        return self.opening.store

    @property
    def asked_block_tiles(self) -> tuple[int, int]:
        """``(by, bx)`` tiles per block the job asks for (``grid.block_tiles`` may be a resumed store's)."""
        return _job_block_tiles(self.job, self.inputs)

    @property
    def done(self) -> np.ndarray:
        """``(image, block_y, block_x)`` bool: blocks already in a resumed store (none otherwise)."""
        if self.opening.done is not None:
            return self.opening.done
        return np.zeros((self.layout.n_images, *self.grid.blocks_shape), dtype=bool)

    def memory_per_task(self) -> int:
        """Rough peak bytes of one task: its pixel region in float64 plus estimator work space."""
        by, bx = self.grid.block_tiles
        size, step = self.grid.size, self.grid.step
        h, w = (by - 1) * step + size, (bx - 1) * step + size
        k = self.layout.kernel_size
        noise = self.inputs.variances
        given = 0 if noise is None else noise.given("target") + noise.given("source")
        region = h * w * 8 * (4 + 2 * given)  # source, target, bad map, variances and their float copies
        tiles = by * bx * size * size * 8 * 3  # tile stacks and model images
        solver = 4 * (k * k) ** 2 * 8 * 3 + 12 * (size + k) ** 2 * 16  # Grams, FFT spectra
        return region + tiles + solver

    def attributes(self) -> dict[str, Any]:
        """Root attributes of the store this plan creates (provenance, creation time now)."""
        from .. import __version__

        job = self.job
        return {
            "title": "kernelmap kernel maps",
            "kernelmap_version": __version__,
            "kernelmap_config": dump_job(job, secrets=False),
            "kernelmap_fingerprint": job.fingerprint(),
            "kernelmap_input": json_attr(self.inputs.identity),
            "kernelmap_method": job.kernel.method,
            "kernelmap_command": " ".join(sys.argv) if sys.argv and sys.argv[0] else "python API",
            "kernelmap_created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "tile_size": job.tiles.size,
            "tile_step": self.grid.step,
            "tile_grid": self.grid.rule,
            "input_shape": [self.grid.ny, self.grid.nx],
            "Conventions": "CF-1.10",
        }

    def _describe_model(self) -> str:
        model = self.job.model
        degree = f"degree {model.degree}" if model.degree is not None else f"degree up to {model.max_degree}"
        if model.method != "joint":
            return f"fitted to the tile kernels, {degree}"
        k2 = self.job.kernel.size ** 2
        per_tile = k2 * (k2 + 1) // 2 * 4 + (k2 + 8) * 8  # packed Gram (float32), right-hand side, sums
        ty, tx = self.grid.shape
        terms = (model.max_degree + 1) * (model.max_degree + 2) // 2 if model.degree is None else \
            (model.degree + 1) * (model.degree + 2) // 2
        # at most: the pooled system and its factor (every pixel of every term), each pair of terms' summed
        # Grams, a band of every tile's Grams (at most 16 MiB), the 32 scored tiles' matrices in single precision
        packed = k2 * (k2 + 1) // 2 * 8
        fit = (2 * (terms * k2) ** 2 * 8 + terms * (terms + 1) // 2 * packed + min(2**24, ty * tx * packed)
               + 3 * 32 * k2**2 * 4)
        return (f"joint fit to all tiles' pixels, {degree}; each block returns its tiles' normal equations "
                f"({per_tile / 2**20:.2f} MiB a tile, {ty * tx * per_tile / 2**20:.1f} MiB an image, kept where "
                f"the blocks ran until the image's fit, which takes up to about {fit / 2**20:.0f} MiB more)")

    def images_per_shard(self) -> int:
        """Images to a shard of the output's arrays along ``image``: a resumed store's own, else the layout's."""
        opening = self.opening
        if opening.action == "resume" and opening.refusal is None:
            return opening.store.images_per_shard
        return self.layout.images_per_shard

    def _describe_shards(self) -> str:
        shard = self.images_per_shard()
        if shard == 1:
            return "no shards (each block's task writes its own chunks)"
        n = self.layout.n_images
        return (f"shards of {shard} images ({-(-n // shard)} file(s) an array; the client writes each finished "
                "image's kernels and records)")

    def describe(self) -> str:
        """The dry-run text."""
        job, grid, inp = self.job, self.grid, self.inputs
        n, ny, nx = inp.shape
        ty, tx = grid.shape
        nby, nbx = grid.blocks_shape
        by, bx = grid.block_tiles
        k = self.layout.kernel_size
        lines = [
            f"input      {job.input.path}: {n} image(s) of {ny}x{nx} px, chunks {inp.chunks[0]}x{inp.chunks[1]}, "
            f"source {'shared 2-D reference' if inp.shared_source else 'one per image'}, "
            f"mask {job.input.mask or 'none (NaN pixels are bad)'}",
            f"saturation {_describe_saturation(inp)}",
            f"variance   {_describe_variances(job, inp)}",
            f"images     {', '.join(map(str, inp.images[:6]))}{' ...' if n > 6 else ''}",
            f"tiles      {grid.size} px every {grid.step} px: {ty}x{tx} per image, {self.n_tiles} in all",
            f"coverage   {_describe_coverage(grid)}",
            f"blocks     {by}x{bx} tiles each: {nby}x{nbx} per image, {n * nby * nbx} tasks",
            f"memory     about {self.memory_per_task() / 2**20:.0f} MiB per task",
            f"kernel     {k}x{k}, method {job.kernel.method}, options {job.kernel.estimator_options()}",
            f"direction  {_describe_direction(job.kernel.direction)}",
            f"model      {self._describe_model()}",
            f"output     {job.output.path} (mode {job.output.mode}): kernel(image={n}, y={ty}, x={tx}, "
            f"ky={k}, kx={k}) {job.output.dtype}, chunks (1, {by}, {bx}, {k}, {k}); "
            f"{len(DIAGNOSTICS)} per-tile diagnostics and the kernel-field model, chunks of "
            f"{min(n, IMAGES_PER_CHUNK)} images; block records in status/records; {self._describe_shards()}",
        ]
        opening = self.opening
        lock = describe_lock(job.output.path)
        if lock is not None:
            lines.append(f"lock       {lock}")
        if opening.refusal is not None:
            lines.append(f"refused    {opening.refusal}")
            return "\n".join([*lines, f"compute    {_describe_compute(job)}"])
        for leftover in opening.leftovers:
            lines.append(f"leftover   {leftover.describe()}: removed first")
        if opening.replacing and opening.action == "overwrite":
            lines.append(f"replace    the new result is written beside it ({opening.output}.kernelmap-new-<token>) "
                         f"and swapped in once complete; {opening.output} keeps the earlier result until then")
        elif opening.replacing:
            lines.append(f"replace    resuming {opening.store.path}, the replacement an interrupted overwrite "
                         f"left; swapped in once complete ({opening.output} keeps the earlier result until then)")
        if opening.action == "resume":
            done = self.done
            asked = self.asked_block_tiles
            lines.append(
                f"resume     {int(done.sum())} of {done.size} blocks already done, skipped; the store's own "
                f"blocks of {by}x{bx} tiles are kept"
                + (f" (compute.block_tiles asks for {asked[0]}x{asked[1]})" if asked != (by, bx) else "")
                + (f"; so is its tile grid ({_RULE_NAMES[grid.rule]}, written by an earlier version: "
                   "output.mode=overwrite covers every pixel)" if grid.rule != EDGE else "")
            )
        lines.append(f"compute    {_describe_compute(job)}")
        return "\n".join(lines)

    def execute(self, *, client: Any = None, progress: bool = True, performance_report: str | None = None,
                log: Callable[[str], None] = print) -> RunSummary:
        """Run the plan: open the output, compute the blocks not done, finish every image.

        ``client``: a ``distributed.Client`` to use instead of what
        ``compute.scheduler`` says (e.g. a cluster kept running between jobs).
        ``performance_report``: the file of a Dask performance report (with a
        client).  What exists at ``output.path`` is read again first (a plan
        may be executed long after it was made, or twice), and a refusal of
        ``output.mode`` is raised before anything is started or written.
        """
        from .run import execute_plan

        return execute_plan(plan_job(self.job), client=client, progress=progress,
                            performance_report=performance_report, log=log)


_RULE_NAMES = {EDGE: "the last tiles end at the far edges", STEP: "tiles every step from 0 only"}


def _describe_coverage(grid: TileGrid) -> str:
    """Pixels covered, pixels in more than one tile, how the edge tiles overlap, what is left out."""
    covered, shared = grid.coverage()
    text = f"{100 * covered:.4g} % of each image's pixels in a tile, {100 * shared:.3g} % in more than one"
    uy, ux = grid.uncovered
    if uy or ux:
        return text + f"; {uy} rows and {ux} columns at the far edges not covered ({_RULE_NAMES[grid.rule]})"
    regular = max(grid.size - grid.step, 0)
    edges = [f"the last {name} overlaps its neighbour by {overlap} {unit}"
             for name, unit, n, overlap in (("row", "rows", grid.shape[0], grid.edge_overlap[0]),
                                            ("column", "columns", grid.shape[1], grid.edge_overlap[1]))
             if n > 1 and overlap != regular]
    if edges:
        text += (f"; the last tiles end at the image edges: {' and '.join(edges)} "
                 f"(tiles a step apart overlap by {regular})")
    return text


def _describe_direction(direction: str) -> str:
    if direction == "auto":
        return ("auto: each image fitted in the direction of the majority of its tiles, by which image is sharper: "
                "forward, target = kernel * source + background, or reverse, source = kernel * target + "
                "background (a block goes its own tiles' way until its image is complete; blocks that went the "
                "other way are fitted again)")
    if direction == "forward":
        return "forward for every image: target = kernel * source + background (tiles whose target is sharper "\
               "are flagged target_sharper)"
    return "reverse for every image: source = kernel * target + background (tiles whose source is sharper are "\
           "flagged target_sharper)"


def _describe_saturation(inputs: Inputs) -> str:
    sat = inputs.saturation
    if sat is None:
        return "none (input.saturation not set: no pixel is bad for its value)"
    return sat.describe()


def _describe_variances(job: JobConfig, inputs: Inputs) -> str:
    noise = inputs.variances
    method = job.kernel.method
    if noise is None:
        fitted = "; lstsq's robust pass fits a noise model per tile" if method == "lstsq" else ""
        return f"none (input.variance/input.weight/input.gain not set{fitted})"
    text = noise.describe()
    if noise.kind == "weight":
        text += " (variance = 1/weight; a weight of 0 is a bad pixel)"
    if method != "lstsq":
        return text + f"; method {method} does not use variances, only the bad pixels they mark"
    if not getattr(job.kernel, "robust", True):
        return text + "; kernel.robust is false, so only the bad pixels they mark are used"
    return text + "; lstsq's robust pass judges residuals against them"


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


def _job_block_tiles(job: JobConfig, inputs: Inputs) -> tuple[int, int]:
    """``(by, bx)`` tiles per block the job asks for: ``compute.block_tiles``, or the input's chunks; for
    ``welch`` run on this machine, whole multiples of those of up to 64 tiles, while every worker still
    gets 8 blocks or more (:func:`~pipeline.core.tiles.grown_blocks`: Welch's fixed costs a batch are about
    a tenth of a 16-tile block's time)."""
    c = job.compute
    if c.block_tiles:
        return (c.block_tiles, c.block_tiles)
    step = job.tiles.step or job.tiles.size
    block = block_shape_for_chunks(inputs.chunks, job.tiles.size, step)
    workers = {"local": c.n_workers * c.threads_per_worker, "threads": c.n_workers * c.threads_per_worker,
               "synchronous": 1}.get(c.scheduler_kind)
    if job.kernel.method != "welch" or workers is None:
        return block
    n, ny, nx = inputs.shape
    return grown_blocks(block, TileGrid(ny, nx, job.tiles.size, step, block).shape, n, workers=workers)


def _keep_store_grid(opening: Opening, grid: TileGrid) -> Opening:
    """The opening of a resumed store, refused where its tile-grid rule is unknown or its tiles per image
    are not what that rule gives on these inputs."""
    rule = opening.tile_grid
    if rule not in (EDGE, STEP):
        return replace(opening, refusal=OptionError(
            f"output.mode=resume: {opening.store.path} has tile_grid {rule!r}, which this version of "
            f"kernelmap does not know ({EDGE}, {STEP}); use output.mode=overwrite or another output.path"))
    ty, tx = replace(grid, rule=rule).shape
    if opening.tiles is not None and opening.tiles != (ty, tx):
        return replace(opening, refusal=OptionError(
            f"output.mode=resume: {opening.store.path} holds {opening.tiles[0]}x{opening.tiles[1]} tiles per "
            f"image, but its tile grid ({rule}) gives {ty}x{tx} on these inputs; use output.mode=overwrite or "
            "another output.path"))
    return opening


def job_inputs(job: JobConfig) -> Inputs:
    """The job's input stack, opened and checked (lazily; nothing is read but metadata)."""
    return open_inputs(
        job.input.path, source=job.input.source, target=job.input.target, mask=job.input.mask,
        group=job.input.group, storage_options=job.input.storage_options, min_size=job.tiles.size,
        saturation=None if job.input.saturation is None else job.input.saturation.model_dump(),
        variance=None if job.input.variance is None else job.input.variance.arrays(),
        weight=None if job.input.weight is None else job.input.weight.arrays(),
        gain=None if job.input.gain is None else job.input.gain.settings(),
        read_noise=None if job.input.read_noise is None else job.input.read_noise.settings(),
    )


def plan_job(job: JobConfig) -> Plan:
    """Open and check the inputs, lay out tiles, blocks and the output, and read what exists at
    ``output.path`` (a resumed store's own blocks and its blocks done); writes nothing."""
    inputs = job_inputs(job)
    _, ny, nx = inputs.shape
    step = job.tiles.step or job.tiles.size
    grid = TileGrid(ny, nx, job.tiles.size, step, _job_block_tiles(job, inputs))
    opening = OutputStore(job.output.path).opening(
        job.output.mode, fingerprint=job.fingerprint(), input_identity=json_attr(inputs.identity),
        differences=lambda stored: setting_differences(stored, job))
    held = lock_refusal(job.output.path, f"output.path {job.output.path}")
    if held is not None:  # another run writes it: that, before what output.mode says of what it finds
        opening = replace(opening, refusal=held)
    if opening.block_tiles is not None:
        grid = replace(grid, block_tiles=opening.block_tiles)
    if opening.tile_grid is not None and opening.refusal is None:
        opening = _keep_store_grid(opening, grid)
        if opening.refusal is None:
            grid = replace(grid, rule=opening.tile_grid)
    model_degree = job.model.degree if job.model.degree is not None else job.model.max_degree
    layout = StoreLayout(grid, np.asarray(inputs.images), dict(inputs.image_attrs), job.kernel.size,
                         job.output.dtype, model_degree, inputs.wcs, dict(inputs.image_coords),
                         job.output.images_per_shard)
    return Plan(job, inputs, grid, layout, opening)
