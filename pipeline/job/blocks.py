"""The task of one block: read its pixels, estimate every tile's kernel, write the block.

A task reads its own pixels (and their variances, when the job names them)
straight from the input store (no input graph moves data around), calls
:func:`pipeline.estimate_kernels` on all the block's tiles at once, in the
direction of the block's image (where that is not decided yet, in the
direction of the majority of the block's own tiles; :mod:`~pipeline.job.finish`
fits again the blocks that turn out to go the other way), writes the
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
from ..core.estimate import estimate_kernels
from ..core.joint import pack_statistics
from ..core.tiles import Block, TileGrid
from ..io.inputs import InputReader
from ..io.store import OutputStore, block_record
from .config import JobConfig

__all__ = ["UNDECIDED", "BlockResult", "BlockTask", "DirectedTask"]

#: The direction of a block whose image's direction is not decided yet: its own tiles' majority is taken.
UNDECIDED = 0


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

    def __call__(self, block: Block, direction: int = UNDECIDED) -> BlockResult:
        """Read the block's pixels, estimate every tile in ``direction`` (its image's; ``UNDECIDED``: the
        majority of the block's own tiles, by which image is sharper), write the block's chunks and record."""
        ys, xs = self.grid.pixel_region(block)
        pixels = self.reader.read(block.image, ys, xs)
        src, tgt, mask, var, src_var = (None if a is None else self.grid.cut(a, block) for a in pixels)
        del pixels
        kernel = self.job.kernel
        joint = self.job.model.method == "joint"
        res = estimate_kernels(
            src, tgt, kernel_size=kernel.size, method=kernel.method, mask=mask, variance=var,
            source_variance=src_var, normalize=kernel.normalize, workers=1, diagnostics=kernel.diagnostics,
            statistics=joint, direction="majority" if direction == UNDECIDED else np.int8(direction),
            **kernel.estimator_options(),
        )
        shape = (block.ty1 - block.ty0, block.tx1 - block.tx0)
        record = block_record({**res.as_dict(), "quality_flag": res.flags}, shape)  # and res.direction
        kernels = res.kernels.reshape(*shape, kernel.size, kernel.size).astype(self.job.output.dtype)
        write = (block.image, block.by, block.bx) not in self.recompute
        if write and not self.store.sharded:  # a sharded store's blocks are written by the client
            self.store.write_block(block, kernels, record)
        statistics = pack_statistics(res.statistics) if joint else None
        return BlockResult(block, record, kernels, int(np.count_nonzero(res.flags & fl.BAD)), statistics, write)

    def delayed(self, block: Block, direction: int = UNDECIDED, name: str | None = None) -> Any:
        """The block's Dask task, named after the block (or ``name``)."""
        import dask

        name = name or f"kernelmap-block-{block.image}-{block.by}-{block.bx}"
        return dask.delayed(self, pure=False)(block, direction, dask_key_name=name)


@dataclass(frozen=True)
class DirectedTask:
    """A :class:`BlockTask` given each block's image direction (the client's view: it travels with each
    block's task); the blocks in ``refits`` are fitted again in a direction decided since, and written even
    where the task leaves stored blocks as they are (``BlockTask.recompute``)."""

    task: BlockTask
    directions: np.ndarray  #: ``(image,)`` int8: ``FORWARD``, ``REVERSE`` or ``UNDECIDED``
    refits: set[tuple[int, int, int]] = dataclasses.field(default_factory=set)

    def _task(self, block: Block) -> BlockTask:
        if (block.image, block.by, block.bx) in self.refits:
            return dataclasses.replace(self.task, recompute=frozenset())
        return self.task

    def __call__(self, block: Block) -> BlockResult:
        return self._task(block)(block, int(self.directions[block.image]))

    def delayed(self, block: Block) -> Any:
        key = (block.image, block.by, block.bx)
        name = f"kernelmap-refit-{block.image}-{block.by}-{block.bx}" if key in self.refits else None
        return self._task(block).delayed(block, int(self.directions[block.image]), name=name)
