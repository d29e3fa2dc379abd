"""Tile and block geometry: where the tiles of an image lie and how they group into tasks.

Pure NumPy; nothing here reads or writes data.

A tile of side ``size`` starting at row ``y0`` covers rows ``[y0, y0 + size)``
and has its centre at ``y0 + (size - 1) / 2`` (pixel centres at integers).
Tiles start every ``step`` pixels from 0; a remainder narrower than ``step``
at the far edges is not covered.  Blocks are rectangles of ``by x bx`` tiles
of one image: one task each, and one chunk of ``kernel`` and of the block records.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ..errors import OptionError
from .validate import check_positive_int

__all__ = ["TileGrid", "Block", "block_shape_for_chunks"]


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
    """Regular grid of square tiles over ``(ny, nx)`` images, grouped into blocks."""

    ny: int
    nx: int
    size: int
    step: int
    block_tiles: tuple[int, int]

    def __post_init__(self) -> None:
        check_positive_int("tile size", self.size)
        check_positive_int("tile step", self.step)
        if self.size > min(self.ny, self.nx):
            raise OptionError(
                f"tiles of {self.size} px do not fit {self.ny}x{self.nx} images: use a smaller tiles.size"
            )
        for side in self.block_tiles:
            check_positive_int("tiles per block side", side)

    @property
    def y0(self) -> np.ndarray:
        """First row of every tile row."""
        return np.arange(0, self.ny - self.size + 1, self.step)

    @property
    def x0(self) -> np.ndarray:
        """First column of every tile column."""
        return np.arange(0, self.nx - self.size + 1, self.step)

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
        """Rows and columns at the far edges that no tile covers."""
        return (self.ny - (self.y0[-1] + self.size), self.nx - (self.x0[-1] + self.size))

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
        tiles = windows[..., :: self.step, :: self.step, :, :]
        ny, nx = block.ty1 - block.ty0, block.tx1 - block.tx0
        tiles = tiles[..., :ny, :nx, :, :]
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
