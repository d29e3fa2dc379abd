"""The task of one block: read its pixels, estimate every tile's kernel, write the block.

A task reads its own pixels (and their variances, when the job names them)
straight from the input store (no input graph moves data around), calls
:func:`pipeline.estimate_kernels` on all the block's tiles at once, in the
direction of the block's image (with the tiles' sharpness measure where the
run measured it first, :class:`SharpnessTask`), writes the
kernels into the block's own chunk of the output store and then the block's
record (its per-tile diagnostics, which mark it done); in a sharded store the
client writes both instead, with the image's diagnostics.  What it returns is
what :class:`pipeline.job.finish.ImageFinisher` takes: with the joint model
(``model.method: joint``) also the tiles' normal equations, which are not
stored; a resumed run computes those of the stored blocks of images without a
model again (``BlockTask.recompute``), identically, without writing them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import flags as fl
from ..core.estimate import FORWARD, estimate_kernels, tile_sharpness
from ..core.joint import pack_statistics
from ..core.sharpness import Sharpness
from ..core.tiles import Block, TileGrid
from ..io.inputs import InputReader
from ..io.store import OutputStore, block_record
from .config import JobConfig

__all__ = ["BlockResult", "BlockTask", "DirectedTask", "SharpnessTask"]


@dataclass(frozen=True)
class BlockResult:
    """What a block's task returns (its record and kernels are also in the store)."""

    block: Block
    record: np.ndarray  #: ``(ny, nx, field)`` block record
    kernels: np.ndarray  #: ``(ny, nx, k, k)`` kernels in the output dtype
    flagged: int  #: tiles flagged unusable
    #: for the joint model (``model.method: joint``): the tiles' ``(packed gc, cc, yy, lam_terms)`` in raster
    #: order (:func:`~pipeline.core.joint.pack_statistics`)
    statistics: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None
    #: ``False``: computed again for its statistics only (a resumed joint run); ``True``: computed for the store
    #: (and written by the task unless the store is sharded)
    written: bool = True

    @property
    def n_tiles(self) -> int:
        return self.block.n_tiles

    def without_statistics(self) -> BlockResult:
        """The result as the client reads it when the statistics stay on the workers."""
        return dataclasses.replace(self, statistics=None)


@dataclass(frozen=True)
class BlockTask:
    """The work of any block of a job; travels to worker processes (inputs and output by reference)."""

    reader: InputReader
    grid: TileGrid
    job: JobConfig
    store: OutputStore
    #: ``(image, by, bx)`` of blocks already in the store whose statistics the joint model needs again:
    #: computed as before, not written
    recompute: frozenset[tuple[int, int, int]] = frozenset()

    def __call__(self, block: Block, direction: int = FORWARD, measure: Sharpness | None = None) -> BlockResult:
        """Read the block's pixels, estimate every tile in the image's ``direction``, write the block's chunks
        and record; ``measure``: the tiles' sharpness if measured already (else measured here)."""
        ys, xs = self.grid.pixel_region(block)
        pixels = self.reader.read(block.image, ys, xs)
        src, tgt, mask, var, src_var = (None if a is None else self.grid.cut(a, block) for a in pixels)
        del pixels
        kernel = self.job.kernel
        joint = self.job.model.method == "joint"
        res = estimate_kernels(
            src, tgt, kernel_size=kernel.size, method=kernel.method, mask=mask, variance=var,
            source_variance=src_var, normalize=kernel.normalize, workers=1, diagnostics=kernel.diagnostics,
            statistics=joint, direction=np.int8(direction), sharpness=measure, **kernel.estimator_options(),
        )
        shape = (block.ty1 - block.ty0, block.tx1 - block.tx0)
        record = block_record({**res.as_dict(), "quality_flag": res.flags}, shape)
        kernels = res.kernels.reshape(*shape, kernel.size, kernel.size).astype(self.job.output.dtype)
        write = (block.image, block.by, block.bx) not in self.recompute
        if write and not self.store.sharded:  # a sharded store's blocks are written by the client
            self.store.write_block(block, kernels, record)
        statistics = pack_statistics(res.statistics) if joint else None
        return BlockResult(block, record, kernels, int(np.count_nonzero(res.flags & fl.BAD)), statistics, write)

    def delayed(self, block: Block, direction: int = FORWARD, measure: Sharpness | None = None) -> Any:
        """The block's Dask task, named after the block."""
        import dask

        name = f"kernelmap-block-{block.image}-{block.by}-{block.bx}"
        return dask.delayed(self, pure=False)(block, direction, measure, dask_key_name=name)


@dataclass(frozen=True)
class SharpnessTask:
    """The sharpness measure of a block's tiles (:func:`~pipeline.core.sharpness.sharpness`): what
    ``kernel.direction: auto`` decides an image's direction from, before its kernels are estimated."""

    reader: InputReader
    grid: TileGrid
    kernel_size: int

    def __call__(self, block: Block) -> tuple[Block, Sharpness | None]:
        ys, xs = self.grid.pixel_region(block)
        pixels = self.reader.read(block.image, ys, xs)
        src, tgt, mask, var, src_var = (None if a is None else self.grid.cut(a, block) for a in pixels)
        del pixels
        return block, tile_sharpness(src, tgt, kernel_size=self.kernel_size, mask=mask, variance=var,
                                     source_variance=src_var)

    def delayed(self, block: Block) -> Any:
        import dask

        name = f"kernelmap-sharpness-{block.image}-{block.by}-{block.bx}"
        return dask.delayed(self, pure=False)(block, dask_key_name=name)


@dataclass(frozen=True)
class DirectedTask:
    """A :class:`BlockTask` given each block's image direction and, where the pre-pass measured them, its
    tiles' sharpness (the client's view: these travel with each block's task)."""

    task: BlockTask
    directions: np.ndarray  #: ``(image,)`` int8, every image with blocks to compute decided
    measures: dict[tuple[int, int, int], Sharpness]

    def _arguments(self, block: Block) -> tuple[int, Sharpness | None]:
        return int(self.directions[block.image]), self.measures.pop((block.image, block.by, block.bx), None)

    def __call__(self, block: Block) -> BlockResult:
        return self.task(block, *self._arguments(block))

    def delayed(self, block: Block) -> Any:
        return self.task.delayed(block, *self._arguments(block))
