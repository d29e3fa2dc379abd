"""Finishing images: once all blocks of an image are in, fit its kernel-field model and write its
diagnostics and model with those of other finished images.

Block results come through one door, :meth:`ImageFinisher.add`: those computed
by this run and, on a resumed run, those of the blocks already in the store
(:meth:`ImageFinisher.add_stored`, read back as the tasks returned them).  An
image none of whose tiles has a usable kernel is noted
(:attr:`ImageFinisher.unusable`) with the number of tiles of each flag that made
them unusable.

Directions (``kernel.direction``): an image whose direction is not decided
(``auto``; the store's ``direction`` is written with the image's model) has
each block fitted in the direction of the majority of the block's own tiles
(:class:`~pipeline.job.blocks.BlockTask`).  Once all its blocks are in, the
image takes the direction of the majority of all its tiles
(:func:`~pipeline.core.sharpness.image_direction`, from the tiles' measures in
the records), and the blocks fitted the other way are fitted again in it
(:meth:`ImageFinisher.take_refits`: only where the field crosses over, or a
block's tiles are nearly equal) before the image is finished.  Every tile of
a finished image is thus fitted in its image's direction, as if that had been
known from the start, whatever the order of the blocks or any interruption.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import flags as fl
from ..core.blas import one_blas_thread
from ..core.estimate import FORWARD
from ..core.field import KernelField, fit_tiles, tile_weights
from ..core.joint import PackedGrams, core_radius_for, fit_joint_tiles, variation_for
from ..core.sharpness import image_direction
from ..core.tiles import Block, TileGrid
from ..io.store import IMAGES_PER_CHUNK, RECORD_FIELDS, ImageResults, OutputStore
from .blocks import BlockResult
from .config import ModelConfig

__all__ = ["ImageFinisher", "ImageFit", "JointFit", "fit_image", "gathered_statistics", "unusable_flag_counts"]


def unusable_flag_counts(flags: np.ndarray) -> dict[str, int] | None:
    """Tiles per :data:`~pipeline.flags.BAD` flag when every tile of an image is unusable, else ``None``.

    ``flags``: the quality flags of all the image's tiles.  A tile may count
    under more than one flag.
    """
    flags = np.asarray(flags, dtype=np.int64).ravel()
    if flags.size == 0 or not np.all(flags & fl.BAD):
        return None
    return {f.name: int(np.count_nonzero(flags & f.mask)) for f in fl.FLAGS
            if f.mask & fl.BAD and np.any(flags & f.mask)}


@dataclass(frozen=True)
class ImageFit:
    """An image's kernel-field model, as :meth:`ImageFinisher.fitted` takes it."""

    image: int
    model: KernelField | None
    residual: np.ndarray  #: ``(y, x)`` each tile's relative difference from the model
    rejected: np.ndarray  #: ``(y, x)`` tiles left out as outliers


def gathered_statistics(shape: tuple[int, int], parts: Iterable[tuple[Block, tuple[np.ndarray, ...]]]
                        ) -> tuple[PackedGrams, np.ndarray, np.ndarray, np.ndarray]:
    """The tiles' ``(packed Grams, cc, yy, lam_terms)`` of a ``shape`` grid in raster order from each block's
    (raster order within the block, see :class:`~pipeline.job.blocks.BlockResult`); the blocks' Grams are
    kept as they came (:class:`~pipeline.core.joint.PackedGrams` in chunks: never copied into one array).
    Tiles of no block are NaN."""
    parts = list(parts)
    if not parts:
        raise ValueError("no block statistics to gather")
    width = shape[1]
    order = np.concatenate([(np.arange(b.ty0, b.ty1)[:, None] * width + np.arange(b.tx0, b.tx1)).ravel()
                            for b, _ in parts])  # each stored row's tile
    small = []
    for i in range(1, 4):  # cc, yy, lam_terms: small, into raster order
        first = parts[0][1][i]
        whole = np.full((shape[0] * width, *first.shape[1:]), np.nan, dtype=first.dtype)
        whole[order] = np.concatenate([p[i] for _, p in parts])
        small.append(whole)
    chunks = [p[0] for _, p in parts]
    missing = np.setdiff1d(np.arange(shape[0] * width), order)
    if len(missing):  # tiles of no block: NaN Grams
        chunks.append(np.full((len(missing), chunks[0].shape[1]), np.nan))
        order = np.concatenate([order, missing])
    m = small[0].shape[1]
    return (PackedGrams(chunks, m, order), *small)


@dataclass(frozen=True, eq=False)
class JointFit:
    """The joint model fit of one image (:func:`~pipeline.core.joint.fit_joint_tiles`): run here with its
    ``statistics``, or on a worker (:func:`fit_image`) from the results of the image's blocks, which
    stay on the workers, while other blocks are computed."""

    image: int
    y: np.ndarray
    x: np.ndarray
    kernels: np.ndarray
    usable: np.ndarray
    weights: np.ndarray
    count: np.ndarray
    options: dict
    #: the tiles' ``(packed Grams, cc, yy, lam_terms)`` in raster order (:func:`gathered_statistics`)
    statistics: tuple[PackedGrams, np.ndarray, np.ndarray, np.ndarray] | None = None

    def __call__(self) -> ImageFit:
        if self.statistics is None:
            raise ValueError(f"image {self.image}: the joint fit has no tile statistics")
        with one_blas_thread():  # the same sums here and on any worker
            model, residual, rejected = fit_joint_tiles(self.y, self.x, self.kernels, self.usable, self.weights,
                                                        self.statistics, self.count, **self.options)
        return ImageFit(self.image, model, residual, rejected)


def fit_image(fit: JointFit, *results: BlockResult) -> ImageFit:
    """Run ``fit`` (a task function for a worker), its statistics taken from the image's block ``results``
    where given."""
    if results:
        parts = ((r.block, r.statistics) for r in results)
        fit = dataclasses.replace(fit, statistics=gathered_statistics(fit.kernels.shape[:2], parts))
    return fit()


class ImageFinisher:
    """Gathers the block results of each image; once all its blocks are in, fits the image's
    kernel-field model.  Diagnostics and models are written in batches (:meth:`flush`): every
    ``FLUSH_IMAGES`` images (a shard's images where the store is sharded: then with their kernels and
    records), ``FLUSH_SECONDS`` after the last write, and at the end.

    Parameters
    ----------
    store
        The output store the results are written to.
    grid
        The tile grid, with the store's blocks.
    n_images
        Images in the store.
    model
        The kernel-field model settings (``model`` section of the job).
    """

    FLUSH_IMAGES = IMAGES_PER_CHUNK
    FLUSH_SECONDS = 10.0

    def __init__(self, store: OutputStore, grid: TileGrid, n_images: int, model: ModelConfig,
                 directions: np.ndarray | None = None):
        self.store, self.grid, self.model = store, grid, model
        #: each image's direction; 0 (undecided) until its blocks are all in
        self.directions = (np.full(n_images, FORWARD, dtype=np.int8) if directions is None
                           else np.array(directions, dtype=np.int8))
        #: blocks to fit again in their image's direction (:attr:`directions`), decided since they were fitted:
        #: see take_refits
        self.refits: list[Block] = []
        #: images written together: a shard's worth where the store is sharded (each write of part of a shard
        #: rewrites it whole)
        self.flush_images = max(self.FLUSH_IMAGES, store.images_per_shard)
        nby, nbx = grid.blocks_shape
        self.missing = np.full(n_images, nby * nbx)
        self.records: dict[int, np.ndarray] = {}
        self.kernels: dict[int, np.ndarray] = {}
        #: the joint model's tile statistics of each image, block by block (those the blocks returned here)
        self.statistics: dict[int, list[tuple[Block, tuple[np.ndarray, ...]]]] = {}
        self.pending: list[ImageResults] = []
        self.last_flush = time.monotonic()
        #: images every tile of which is unusable: tiles per flag that made them so
        self.unusable: dict[int, dict[str, int]] = {}
        #: images with a usable tile but no kernel-field model (its fit had too little to go on)
        self.unmodelled: set[int] = set()
        #: tiles of the images finished here with a problem flag (:data:`~pipeline.flags.PROBLEMS`: the
        #: informational masked and outliers_clipped do not count), the model's outliers included
        self.tiles_with_problems = 0
        #: tiles of the images finished here whose kernel sharpens (``target_sharper``), or whose pair is
        #: ``nearly_equal``
        self.tiles_target_sharper = 0
        self.tiles_nearly_equal = 0
        #: where set, joint fits are handed to it (it returns a future of their :class:`ImageFit`, which the
        #: caller gives to :meth:`fitted`) instead of being run here; see :meth:`take_submitted`
        self.offload: Callable[[JointFit], Any] | None = None
        self.submitted: list[Any] = []
        #: records and kernels of images whose model is being fitted elsewhere
        self.unfitted: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def add(self, block: Block, record: np.ndarray, kernels: np.ndarray,
            statistics: tuple[np.ndarray, ...] | None = None) -> None:
        """Take one block's ``(ny, nx, field)`` record and ``(ny, nx, k, k)`` kernels (and, for the joint
        model, its tiles' statistics in raster order, see :class:`~pipeline.job.blocks.BlockResult`)."""
        image = block.image
        ty, tx = self.grid.shape
        if image not in self.records:
            self.records[image] = np.full((ty, tx, record.shape[-1]), np.nan)
            self.kernels[image] = np.full((ty, tx, *kernels.shape[-2:]), np.nan, dtype=kernels.dtype)
        self.records[image][block.ty0:block.ty1, block.tx0:block.tx1] = record
        self.kernels[image][block.ty0:block.ty1, block.tx0:block.tx1] = kernels
        if statistics is not None:
            self.statistics.setdefault(image, []).append((block, statistics))
        self.missing[image] -= 1
        if self.missing[image] == 0:
            self._finish(image)

    def add_stored(self, blocks: Iterable[Block]) -> None:
        """Take the results of blocks already written to the store (a resumed run)."""
        for block, record, kernels in self.store.read_blocks(blocks):
            self.add(block, record, kernels)

    def _directed(self, image: int) -> bool:
        """Decide ``image``'s direction where it is not, and queue its blocks fitted the other way to be
        fitted again (:meth:`take_refits`); whether every tile of it is fitted in its direction."""
        records = self.records[image]
        if self.directions[image] == 0:
            field = {name: records[..., RECORD_FIELDS.index(name)] for name in ("width_difference",
                                                                            "width_difference_error")}
            self.directions[image] = image_direction(field["width_difference"], field["width_difference_error"])
        direction = int(self.directions[image])
        fitted = records[..., RECORD_FIELDS.index("direction")]
        wrong = [block for block in self.grid.blocks(1)
                 if np.any(fitted[block.ty0:block.ty1, block.tx0:block.tx1] != direction)]
        if not wrong:
            return True
        self.missing[image] = len(wrong)
        keys = {(b.by, b.bx) for b in wrong}
        if image in self.statistics:  # the refits bring their own
            self.statistics[image] = [(b, st) for b, st in self.statistics[image] if (b.by, b.bx) not in keys]
        self.refits += [dataclasses.replace(b, image=image) for b in wrong]
        return False

    def take_refits(self) -> list[Block]:
        """The blocks to fit again in their image's direction (:attr:`directions`), queued since the last
        call; their results come back through :meth:`add` as any block's."""
        refits, self.refits = self.refits, []
        return refits

    def _finish(self, image: int) -> None:
        if not self._directed(image):
            return
        records, kernels = self.records.pop(image), self.kernels.pop(image)
        field = {name: records[..., i] for i, name in enumerate(RECORD_FIELDS)}
        flags = field["quality_flag"].astype(np.int64)
        counts = unusable_flag_counts(flags)
        if counts is not None:
            self.unusable[image] = counts
        usable = fl.modelled(kernels, flags)
        weights = tile_weights(field["snr"], field["flux"])
        if self.model.method == "joint":
            if not usable.any():  # nothing to fit (and no statistics needed)
                self.statistics.pop(image, None)
                self._store(records, kernels, ImageFit(image, None, np.full(usable.shape, np.nan),
                                                       np.zeros(usable.shape, dtype=bool)))
                return
            fit = self._joint_fit(image, kernels, usable, weights, field)
            if self.offload is not None:
                self.unfitted[image] = records, kernels
                self.submitted.append(self.offload(fit))
                return
            self._store(records, kernels, fit())
            return
        with one_blas_thread():  # small products: threads only contend with workers
            model, residual, rejected = fit_tiles(
                self.grid.centres_y, self.grid.centres_x, kernels, usable, weights,
                degree=self.model.degree, max_degree=self.model.max_degree, clip=self.model.clip,
            )
        self._store(records, kernels, ImageFit(image, model, residual, rejected))

    def fitted(self, fit: ImageFit) -> None:
        """Take the model of an image whose fit was handed to :attr:`offload`."""
        self._store(*self.unfitted.pop(fit.image), fit)

    def take_submitted(self) -> list[Any]:
        """The futures handed out by :attr:`offload` since the last call."""
        submitted, self.submitted = self.submitted, []
        return submitted

    def _store(self, records: np.ndarray, kernels: np.ndarray, fit: ImageFit) -> None:
        if fit.model is None and fit.image not in self.unusable:
            self.unmodelled.add(fit.image)
        extra = fl.model_outliers(fit.rejected)
        flags = np.nan_to_num(records[..., RECORD_FIELDS.index("quality_flag")]).astype(np.int64) | extra
        self.tiles_with_problems += int(np.count_nonzero(fl.problems(flags)))
        self.tiles_target_sharper += int(np.count_nonzero(flags & fl.TARGET_SHARPER))
        self.tiles_nearly_equal += int(np.count_nonzero(flags & fl.NEARLY_EQUAL))
        self.pending.append(ImageResults(fit.image, records, extra, fit.model, fit.residual,
                                         kernels if self.store.sharded else None,
                                         direction=int(self.directions[fit.image])))
        if len(self.pending) >= self.flush_images or time.monotonic() - self.last_flush > self.FLUSH_SECONDS:
            self.flush()

    def _joint_fit(self, image: int, kernels: np.ndarray, usable: np.ndarray, weights: np.ndarray,
                   field: dict[str, np.ndarray]) -> JointFit:
        """The joint model fit of one image, with its tiles' statistics where they came here (the Grams
        stay packed)."""
        parts = self.statistics.pop(image, None)
        good = usable & np.isfinite(field["fwhm"])
        fwhm = float(np.median(field["fwhm"][good])) if good.any() else np.nan
        degrees = None if self.model.degree is None else [self.model.degree]
        return JointFit(image, self.grid.centres_y, self.grid.centres_x, kernels, usable, weights,
                        np.nan_to_num(field["n_valid"]).astype(np.int64),
                        {"degrees": degrees, "max_degree": self.model.max_degree,
                         "core_radius": core_radius_for(fwhm, kernels.shape[-1]),
                         "variation": variation_for(int(usable.sum()))},
                        None if parts is None else gathered_statistics(self.grid.shape, parts))

    def flush(self) -> None:
        """Write the diagnostics and models of the images finished since the last write."""
        self.store.write_images(self.pending)
        self.pending = []
        self.last_flush = time.monotonic()
