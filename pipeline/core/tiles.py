"""Tile and block geometry: where the tiles of an image lie and how they group into tasks.

Pure NumPy; nothing here reads or writes data.

A tile of side ``size`` starting at row ``y0`` covers rows ``[y0, y0 + size)``
and has its centre at ``y0 + (size - 1) / 2`` (pixel centres at integers).
Tiles start every ``step`` pixels from 0, and where those stop short of the
far edge a last row (column) of tiles starts at ``ny - size`` (``nx - size``),
so that it ends exactly at the edge: every pixel is covered.  That last row
overlaps its neighbour by more than ``size - step`` rows when ``ny - size`` is
not a multiple of ``step`` (rule :data:`EDGE`, recorded in a store's
``tile_grid`` attribute).  Stores written before this rule existed used
:data:`STEP`: tiles every ``step`` pixels only, the remainder narrower than
``step`` at the far edges not covered; a resumed store keeps its rule.
Blocks are rectangles of ``by x bx`` tiles of one image (the edge tiles belong
to the last block like any other): one task each, and one chunk of ``kernel``
and of the block records.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ..errors import OptionError
from .validate import check_positive_int

__all__ = ["EDGE", "RULES", "STEP", "TileGrid", "Block", "block_shape_for_chunks", "grown_blocks", "tile_origins"]

#: Tiles every ``step`` from 0 plus a last row and column ending at the far edges: every pixel covered.
EDGE = "edge"
#: Tiles every ``step`` from 0 only; a remainder narrower than ``step`` at the far edges is not covered
#: (the rule of stores written before :data:`EDGE`).
STEP = "step"
#: The tile-grid rules, by the name a store records in its ``tile_grid`` attribute.
RULES = (EDGE, STEP)


def tile_origins(n: int, size: int, step: int, rule: str = EDGE) -> np.ndarray:
    """First row (column) of every tile along an axis of ``n`` pixels under ``rule``."""
    starts = np.arange(0, n - size + 1, step)
    if rule == EDGE and starts[-1] + size < n:
        starts = np.append(starts, n - size)
    return starts


def _coverage_counts(n: int, starts: np.ndarray, size: int) -> np.ndarray:
    """``(n,)`` number of tiles covering each row (column)."""
    counts = np.zeros(n + 1, dtype=np.int64)
    np.add.at(counts, starts, 1)
    np.add.at(counts, starts + size, -1)
    return np.cumsum(counts)[:n]


@dataclass(frozen=True)
class Block:
    """Tiles ``[ty0, ty1) x [tx0, tx1)`` of image ``image``; ``index`` is its block position."""

    image: int
    by: int
    bx: int
    ty0: int
    ty1: int
    tx0: int
    tx1: int

    @property
    def n_tiles(self) -> int:
        return (self.ty1 - self.ty0) * (self.tx1 - self.tx0)


@dataclass(frozen=True)
class TileGrid:
    """Grid of square tiles over ``(ny, nx)`` images, grouped into blocks.

    ``rule`` (:data:`RULES`): :data:`EDGE` (the default) adds a last row and
    column of tiles ending at the far edges; :data:`STEP` is the grid of stores
    written before it.
    """

    ny: int
    nx: int
    size: int
    step: int
    block_tiles: tuple[int, int]
    rule: str = EDGE

    def __post_init__(self) -> None:
        check_positive_int("tile size", self.size)
        check_positive_int("tile step", self.step)
        if self.size > min(self.ny, self.nx):
            raise OptionError(
                f"tiles of {self.size} px do not fit {self.ny}x{self.nx} images: use a smaller tiles.size"
            )
        for side in self.block_tiles:
            check_positive_int("tiles per block side", side)
        if self.rule not in RULES:
            raise OptionError(f"tile-grid rule {self.rule!r} is not one of {', '.join(RULES)}")

    @property
    def y0(self) -> np.ndarray:
        """First row of every tile row."""
        return tile_origins(self.ny, self.size, self.step, self.rule)

    @property
    def x0(self) -> np.ndarray:
        """First column of every tile column."""
        return tile_origins(self.nx, self.size, self.step, self.rule)

    @property
    def centres_y(self) -> np.ndarray:
        return self.y0 + (self.size - 1) / 2.0

    @property
    def centres_x(self) -> np.ndarray:
        return self.x0 + (self.size - 1) / 2.0

    @property
    def shape(self) -> tuple[int, int]:
        """Tiles per image along ``(y, x)``."""
        return len(self.y0), len(self.x0)

    @property
    def blocks_shape(self) -> tuple[int, int]:
        """Blocks per image along ``(y, x)``."""
        ty, tx = self.shape
        by, bx = self.block_tiles
        return -(-ty // by), -(-tx // bx)

    @property
    def uncovered(self) -> tuple[int, int]:
        """Rows and columns at the far edges that no tile covers (0, 0 under :data:`EDGE`)."""
        return (self.ny - (int(self.y0[-1]) + self.size), self.nx - (int(self.x0[-1]) + self.size))

    @property
    def edge_overlap(self) -> tuple[int, int]:
        """Rows and columns by which the last tile row and column overlap their neighbours
        (``size - step`` like any other where the image fits the step; 0 with a single tile)."""
        out = []
        for starts in (self.y0, self.x0):
            out.append(max(int(starts[-2]) + self.size - int(starts[-1]), 0) if len(starts) > 1 else 0)
        return out[0], out[1]

    def coverage(self) -> tuple[float, float]:
        """Fractions of an image's pixels in at least one tile, and in more than one."""
        cy = _coverage_counts(self.ny, self.y0, self.size)
        cx = _coverage_counts(self.nx, self.x0, self.size)
        covered = float(np.mean(cy > 0) * np.mean(cx > 0))
        once = float(np.mean(cy == 1) * np.mean(cx == 1))
        return covered, covered - once

    def blocks(self, n_images: int) -> Iterator[Block]:
        """Every block of every image, image by image, in raster order."""
        ty, tx = self.shape
        by, bx = self.block_tiles
        for image in range(n_images):
            for iy, t0 in enumerate(range(0, ty, by)):
                for ix, s0 in enumerate(range(0, tx, bx)):
                    yield Block(image, iy, ix, t0, min(t0 + by, ty), s0, min(s0 + bx, tx))

    def pixel_region(self, block: Block) -> tuple[slice, slice]:
        """The pixels a block's tiles read."""
        y0, x0 = self.y0, self.x0
        return (
            slice(int(y0[block.ty0]), int(y0[block.ty1 - 1]) + self.size),
            slice(int(x0[block.tx0]), int(x0[block.tx1 - 1]) + self.size),
        )

    def cut(self, region: np.ndarray, block: Block) -> np.ndarray:
        """Tiles ``(n, size, size)`` of a block from its pixel region (a view where possible).

        ``region`` is ``(..., h, w)`` as returned for :meth:`pixel_region`; tiles
        come in raster order over the block.
        """
        from numpy.lib.stride_tricks import sliding_window_view

        windows = sliding_window_view(region, (self.size, self.size), axis=(-2, -1))
        oy = self.y0[block.ty0:block.ty1] - self.y0[block.ty0]
        ox = self.x0[block.tx0:block.tx1] - self.x0[block.tx0]
        ny, nx = len(oy), len(ox)
        if np.array_equal(oy, np.arange(ny) * self.step) and np.array_equal(ox, np.arange(nx) * self.step):
            tiles = windows[..., :: self.step, :: self.step, :, :][..., :ny, :nx, :, :]
        else:  # the block holds an edge tile, off the step
            tiles = windows[..., oy[:, None], ox[None, :], :, :]
        return tiles.reshape(*region.shape[:-2], ny * nx, self.size, self.size)


def block_shape_for_chunks(chunks: tuple[int, int], size: int, step: int, *, target_tiles: int = 16) -> tuple[int, int]:
    """Tiles per block side so that a block reads about one input chunk.

    With tiles aligned to chunks (``step`` divides the chunk) a block's tiles
    lie in one chunk plus the overlap; chunks smaller than a tile give blocks
    of about ``target_tiles`` tiles.
    """
    out = []
    for c in chunks:
        n = max(1, c // step)
        if n == 1 and c < size:
            n = max(1, int(round(np.sqrt(target_tiles))))
        out.append(n)
    return out[0], out[1]


def grown_blocks(block: tuple[int, int], tiles: tuple[int, int], n_images: int, *, workers: int,
                 max_tiles: int = 64, per_worker: int = 8) -> tuple[int, int]:
    """``block`` (tiles per block side) times the largest whole factor that keeps a block within
    ``max_tiles`` tiles and inside an image of ``tiles`` (tiles per side), and leaves ``n_images`` images at
    least ``per_worker`` blocks for each of ``workers``; ``block`` itself where no factor over 1 does.

    A whole multiple of a block that reads one input chunk reads whole chunks.  Bigger blocks share a
    batch's fixed costs among more tiles (Welch's, mostly: its iterations run a batch at once).
    """
    by, bx = block
    best, factor = 1, 2
    while by * factor * bx * factor <= max_tiles and by * factor <= tiles[0] and bx * factor <= tiles[1]:
        blocks = n_images * -(-tiles[0] // (by * factor)) * -(-tiles[1] // (bx * factor))
        if blocks < per_worker * workers:
            break
        best, factor = factor, factor + 1
    return by * best, bx * best
