"""Small input stacks with a known kernel in every tile, written as real Zarr stores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr
import zarr
from scipy.ndimage import gaussian_filter
from scipy.signal import fftconvolve

from pipeline.sim.scenes import gaussian_kernel


def tile_kernel(image: int, ty: int, tx: int, k: int) -> np.ndarray:
    """The true kernel of tile (ty, tx) of an image: width and shape vary smoothly."""
    return gaussian_kernel(k, fwhm=2.2 + 0.25 * tx + 0.1 * ty + 0.15 * image,
                           e1=0.04 * (ty - 1), e2=0.03 * (tx - 1), dx=0.3 * image, flux=1.0 + 0.05 * image)


def make_stack(
    path: Path,
    *,
    n_images: int = 2,
    size: int = 192,
    tile: int = 64,
    chunk: int = 64,
    k: int = 9,
    shared_source: bool = True,
    zarr_format: int = 3,
    writer: str = "xarray",
    mask: bool = False,
    noise: float = 0.0,
    seed: int = 0,
) -> dict:
    """Write a stack whose target is, tile by tile, the source convolved with ``tile_kernel``.

    Returns the truth: ``kernels[image, ty, tx]`` and the background offsets.
    """
    rng = np.random.default_rng(seed)
    margin = 2 * k
    n_src = 1 if shared_source else n_images
    canvases = [gaussian_filter(rng.normal(size=(size + 2 * margin,) * 2), 0.7) * 100.0 for _ in range(n_src)]
    inner = slice(margin, margin + size)
    nt = size // tile
    target = np.zeros((n_images, size, size), dtype=np.float32)
    kernels = np.zeros((n_images, nt, nt, k, k))
    background = 10.0 * np.arange(1, n_images + 1)
    for i in range(n_images):
        canvas = canvases[0 if shared_source else i]
        for ty in range(nt):
            for tx in range(nt):
                kern = tile_kernel(i, ty, tx, k)
                kernels[i, ty, tx] = kern
                ys = slice(margin + ty * tile - k, margin + (ty + 1) * tile + k)
                xs = slice(margin + tx * tile - k, margin + (tx + 1) * tile + k)
                conv = fftconvolve(canvas[ys, xs], kern, mode="same")[k:-k, k:-k]
                target[i, ty * tile : (ty + 1) * tile, tx * tile : (tx + 1) * tile] = conv
        target[i] += background[i] + noise * rng.normal(size=(size, size))
    source = np.stack([c[inner, inner] for c in canvases]).astype(np.float32)
    if shared_source:
        source = source[0]
    bad = None
    if mask:
        bad = np.zeros((n_images, size, size), dtype=np.uint8)
        bad[:, 5:9, 20:60] = 1
        target[:, 5:9, 20:60] = 1e6  # garbage under the mask
    labels = np.array([f"epoch-{i}" for i in range(n_images)], dtype=object)
    if writer == "xarray":
        data = {"target": (("image", "y", "x"), target)}
        data["source"] = (("y", "x"), source) if shared_source else (("image", "y", "x"), source)
        if bad is not None:
            data["mask"] = (("image", "y", "x"), bad)
        ds = xr.Dataset(data, coords={"image": labels})
        enc = {"target": {"chunks": (1, chunk, chunk)},
               "source": {"chunks": (chunk, chunk) if shared_source else (1, chunk, chunk)}}
        if bad is not None:
            enc["mask"] = {"chunks": (1, chunk, chunk)}
        ds.to_zarr(path, mode="w-", zarr_format=zarr_format, encoding=enc, consolidated=zarr_format == 2)
    else:
        group = zarr.open_group(path, mode="w-", zarr_format=zarr_format)
        group.create_array("target", data=target, chunks=(1, chunk, chunk))
        group.create_array("source", data=source, chunks=(chunk, chunk) if shared_source else (1, chunk, chunk))
        if bad is not None:
            group.create_array("mask", data=bad, chunks=(1, chunk, chunk))
    return {"kernels": kernels, "background": background, "tile": tile, "k": k, "labels": labels}


def make_edge_stack(
    path: Path,
    *,
    shape: tuple[int, int] = (150, 200),
    tile: int = 64,
    step: int | None = None,
    chunk: int = 64,
    k: int = 9,
    n_images: int = 1,
    seed: int = 0,
) -> dict:
    """A stack of ``shape`` (not a multiple of the tile) whose target is painted tile by tile on the grid
    that covers every pixel (tiles every ``step`` from 0 and a last row and column ending at the far edges):
    each tile's pixels are the source convolved with ``tile_kernel`` of that tile, later tiles (in raster
    order) painted over earlier ones where they overlap, so the last row and column are wholly their own.

    Returns the truth: ``kernels[image, ty, tx]``, the tile origins ``y0``/``x0``, ``intact[ty, tx]`` (the
    tiles no later tile painted over: their kernel is exact) and the background offsets.
    """
    from pipeline.core.tiles import tile_origins

    step = step or tile
    ny, nx = shape
    y0, x0 = tile_origins(ny, tile, step), tile_origins(nx, tile, step)
    rng = np.random.default_rng(seed)
    margin = 2 * k
    canvas = gaussian_filter(rng.normal(size=(ny + 2 * margin, nx + 2 * margin)), 0.7) * 100.0
    target = np.zeros((n_images, ny, nx), dtype=np.float32)
    kernels = np.zeros((n_images, len(y0), len(x0), k, k))
    owner = np.full(shape, -1)
    background = 10.0 * np.arange(1, n_images + 1)
    for i in range(n_images):
        for ty, ys in enumerate(y0):
            for tx, xs in enumerate(x0):
                kern = tile_kernel(i, ty, tx, k)
                kernels[i, ty, tx] = kern
                window = canvas[margin + ys - k: margin + ys + tile + k, margin + xs - k: margin + xs + tile + k]
                target[i, ys: ys + tile, xs: xs + tile] = fftconvolve(window, kern, mode="same")[k:-k, k:-k]
                owner[ys: ys + tile, xs: xs + tile] = ty * len(x0) + tx
        target[i] += background[i]
    intact = np.array([[np.all(owner[ys: ys + tile, xs: xs + tile] == ty * len(x0) + tx)
                        for tx, xs in enumerate(x0)] for ty, ys in enumerate(y0)])
    source = canvas[margin: margin + ny, margin: margin + nx].astype(np.float32)
    labels = np.array([f"epoch-{i}" for i in range(n_images)], dtype=object)
    ds = xr.Dataset({"target": (("image", "y", "x"), target), "source": (("y", "x"), source)},
                    coords={"image": labels})
    ds.to_zarr(path, mode="w-", zarr_format=3, consolidated=False,
               encoding={"target": {"chunks": (1, chunk, chunk)}, "source": {"chunks": (chunk, chunk)}})
    return {"kernels": kernels, "y0": y0, "x0": x0, "intact": intact, "background": background, "tile": tile,
            "k": k, "labels": labels}


#: The images of :func:`make_direction_stack`: label -> (source, target) FWHM of the blurring Gaussian at the
#: left and right edges (pixels; a Moffat PSF of FWHM 2 px shared).
DIRECTION_IMAGES: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "blurrier": ((2.0, 2.0), (3.5, 3.5)),   # the target blurrier everywhere: forward
    "sharper": ((3.5, 3.5), (1.5, 1.5)),    # the target sharper everywhere: reverse
    "crossing": ((2.5, 2.5), (1.0, 4.5)),   # sharper on the left, blurrier on the right (majority forward)
}


def make_direction_stack(path: Path, *, shape: tuple[int, int] = (256, 1024), tile: int = 128, k: int = 15,
                         seed: int = 0, images: tuple[str, ...] = tuple(DIRECTION_IMAGES)) -> dict:
    """Write a stack whose images are the :data:`DIRECTION_IMAGES` (seeing constant in each tile, changing
    along x; :func:`pipeline.sim.seeing.seeing_pair`), one source per image, with their variances.

    Returns the truth per image and tile column (every tile row alike): ``direction[i, tx]`` (1 forward,
    -1 reverse), ``kernels[i, tx]`` (in that direction), ``width_difference[i, tx]`` and ``fwhm_ratio[i, tx]``
    (target over source), and the pairs themselves.
    """
    from pipeline.sim.seeing import seeing_pair

    pairs = [seeing_pair(seed + i, shape, source_fwhm=DIRECTION_IMAGES[name][0],
                         target_fwhm=DIRECTION_IMAGES[name][1], patch=tile) for i, name in enumerate(images)]
    nt = shape[1] // tile
    centres = [tx * tile + (tile - 1) / 2.0 for tx in range(nt)]
    truth = [[p.truth(x, k) for x in centres] for p in pairs]
    labels = np.array(list(images), dtype=object)
    data = {
        "source": (("image", "y", "x"), np.stack([p.source for p in pairs]).astype(np.float32)),
        "target": (("image", "y", "x"), np.stack([p.target for p in pairs]).astype(np.float32)),
        "source_variance": (("image", "y", "x"), np.stack([p.source_variance for p in pairs]).astype(np.float32)),
        "target_variance": (("image", "y", "x"), np.stack([p.target_variance for p in pairs]).astype(np.float32)),
    }
    chunks = {name: {"chunks": (1, tile, tile)} for name in data}
    xr.Dataset(data, coords={"image": labels}).to_zarr(path, mode="w-", zarr_format=3, encoding=chunks,
                                                       consolidated=False)
    return {
        "labels": labels, "tile": tile, "k": k, "pairs": pairs,
        "direction": np.array([[d for d, _ in row] for row in truth]),
        "kernels": np.array([[kern for _, kern in row] for row in truth]),
        "width_difference": np.array([[p.width_difference(x) for x in centres] for p in pairs]),
        "fwhm_ratio": np.array([[p.fwhm_ratio(x) for x in centres] for p in pairs]),
    }
