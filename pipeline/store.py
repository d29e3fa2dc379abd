"""The output store: a kernel-map Dataset in Zarr, written block by block.

Layout (see DESIGN.md): ``kernel(image, y, x, ky, kx)`` and per-tile
diagnostics on ``(image, y, x)``, coordinates ``image``, ``y``, ``x`` (tile
centres), ``ky``, ``kx`` (kernel offsets).  Every block of tiles owns exactly
one chunk of every variable, so blocks are written independently and a
region never straddles chunks.  The group ``status`` holds ``blocks(image,
block_y, block_x)``, 1 once a block's results are all written: the explicit
completion record that resume reads (chunk presence is no such record).  The
root attribute ``kernelmap_status`` is ``"incomplete"`` until every block is
done, then ``"complete"``.
"""

from __future__ import annotations

import json
import shutil
import uuid
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import dask.array as da
import fsspec
import numpy as np
import xarray as xr
import zarr

from . import flags as fl
from .errors import OptionError
from .tiles import Block, TileGrid

__all__ = ["DIAGNOSTICS", "StoreLayout", "create_store", "completed_blocks", "write_block",
           "mark_complete", "store_exists", "remove_store"]

STATUS_GROUP = "status"
BLOCKS_ARRAY = "blocks"

#: Per-tile diagnostics written beside the kernel: name -> (dtype, attributes).
DIAGNOSTICS: dict[str, tuple[str, dict[str, str]]] = {
    "flux": ("float", {"long_name": "kernel sum: flux scale of the target relative to the source",
                       "units": "1"}),
    "background": ("float", {"long_name": "constant offset of the target relative to kernel * source",
                             "units": "target units"}),
    "residual": ("float", {"long_name": "RMS of the fit residual over its robust standard deviation "
                                        "(about 1 for a fit down to the noise)", "units": "1"}),
    "noise": ("float", {"long_name": "robust standard deviation of the fit residual",
                        "units": "target units"}),
    "snr": ("float", {"long_name": "RMS of the model kernel * source over the noise", "units": "1"}),
    "centroid_y": ("float", {"long_name": "kernel centroid offset from the kernel centre along y "
                                          "(adaptive moments)", "units": "pixel"}),
    "centroid_x": ("float", {"long_name": "kernel centroid offset from the kernel centre along x "
                                          "(adaptive moments)", "units": "pixel"}),
    "fwhm": ("float", {"long_name": "kernel FWHM from Gaussian-weighted adaptive second moments, "
                                    "2 sqrt(2 ln 2) det(M)^(1/4)", "units": "pixel"}),
    "e1": ("float", {"long_name": "kernel ellipticity (Mxx - Myy) / (Mxx + Myy)", "units": "1"}),
    "e2": ("float", {"long_name": "kernel ellipticity 2 Mxy / (Mxx + Myy)", "units": "1"}),
    "ellipticity": ("float", {"long_name": "kernel ellipticity |e| = (a^2 - b^2) / (a^2 + b^2)",
                              "units": "1"}),
    "regularization": ("float", {"long_name": "dimensionless regularisation strength used "
                                              "(geometric mean over penalty terms; NaN if none)",
                                 "units": "1"}),
    "n_valid": ("int32", {"long_name": "target pixels fitted (lstsq) or segments used (welch)"}),
    "quality_flag": ("uint16", {"long_name": "quality flags of the tile",
                                "flag_descriptions": fl.cf_flag_attrs()["flag_descriptions"]}),
}


@dataclass(frozen=True)
class StoreLayout:
    """What the output holds: the grid, images, kernel size and storage precision."""

    grid: TileGrid
    images: np.ndarray
    image_attrs: dict[str, Any]
    kernel_size: int
    dtype: str  # float32 or float64

    @property
    def n_images(self) -> int:
        return len(self.images)


def _template(layout: StoreLayout, attrs: dict[str, Any]) -> xr.Dataset:
    grid, k = layout.grid, layout.kernel_size
    ty, tx = grid.shape
    by, bx = grid.block_tiles
    n = layout.n_images
    h = k // 2
    chunks3 = (1, by, bx)
    variables: dict[str, Any] = {
        "kernel": (
            ("image", "y", "x", "ky", "kx"),
            da.full((n, ty, tx, k, k), np.nan, dtype=layout.dtype, chunks=(1, by, bx, k, k)),
            {"long_name": "convolution kernel: target = kernel * source + background",
             "convention": "true convolution (scipy.signal.fftconvolve, mode 'same'); "
                           "kernel centre at (ky, kx) = (0, 0)"},
        )
    }
    for name, (kind, var_attrs) in DIAGNOSTICS.items():
        dtype = layout.dtype if kind == "float" else kind
        fill = np.nan if kind == "float" else 0
        extra = fl.cf_flag_attrs() if name == "quality_flag" else {}
        extra = {key: value for key, value in extra.items() if key != "flag_descriptions"}
        variables[name] = (("image", "y", "x"), da.full((n, ty, tx), fill, dtype=dtype, chunks=chunks3),
                           {**var_attrs, **extra})
    images = layout.images
    if images.dtype.kind in "US":
        images = images.astype(object)
    coords = {
        "image": ("image", images, dict(layout.image_attrs)),
        "y": ("y", grid.centres_y.astype(np.float64),
              {"long_name": "tile centre row in input pixel coordinates", "units": "pixel"}),
        "x": ("x", grid.centres_x.astype(np.float64),
              {"long_name": "tile centre column in input pixel coordinates", "units": "pixel"}),
        "ky": ("ky", np.arange(-h, h + 1), {"long_name": "kernel row offset", "units": "pixel"}),
        "kx": ("kx", np.arange(-h, h + 1), {"long_name": "kernel column offset", "units": "pixel"}),
    }
    return xr.Dataset(variables, coords=coords, attrs=attrs)


def _consolidate(path: str) -> None:
    with warnings.catch_warnings():
        # consolidated metadata is not yet part of the Zarr v3 specification;
        # xarray reads it, and without it every plain open_zarr warns
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(path)


def _location(path: str) -> str:
    """``file://`` URLs as plain paths (local folders are created as needed); other URLs as given."""
    text = str(path)
    if text.startswith("file://"):
        return fsspec.core.url_to_fs(text)[1]
    return text


def store_exists(path: str) -> bool:
    """Whether anything already exists at ``path`` (a local path or an fsspec URL)."""
    path = _location(path)
    if "://" not in str(path):
        return Path(path).exists()
    fs, root = fsspec.core.url_to_fs(str(path))
    return bool(fs.exists(root))


def remove_store(path: str) -> None:
    """Delete an existing output store (a local path or an fsspec URL)."""
    path = _location(path)
    if "://" in str(path):
        fs, root = fsspec.core.url_to_fs(str(path))
        fs.rm(root, recursive=True)
        return
    p = Path(path)
    if p.is_dir():
        shutil.rmtree(p)
    elif p.exists():
        p.unlink()


def create_store(path: str, layout: StoreLayout, attrs: dict[str, Any]) -> None:
    """Write the empty template (metadata and coordinates, no data) and the status array."""
    path = _location(path)
    ds = _template(layout, {**attrs, "kernelmap_status": "incomplete",
                            "kernelmap_store_id": uuid.uuid4().hex})
    ds.to_zarr(path, mode="w-", compute=False, consolidated=False, zarr_format=3)
    group = zarr.open_group(path, mode="r+")
    nby, nbx = layout.grid.blocks_shape
    status = group.create_group(STATUS_GROUP)
    status.create_array(BLOCKS_ARRAY, shape=(layout.n_images, nby, nbx), chunks=(1, 1, 1),
                        dtype="uint8", fill_value=0,
                        attributes={"long_name": "1 where the block of tiles has been written"})
    _consolidate(path)


def read_attrs(path: str) -> dict[str, Any]:
    """Root attributes of an existing output store."""
    path = _location(path)
    return dict(zarr.open_group(path, mode="r").attrs)


def completed_blocks(path: str) -> np.ndarray:
    """``(image, block_y, block_x)`` bool: blocks already written."""
    path = _location(path)
    group = zarr.open_group(path, mode="r")
    try:
        return np.asarray(group[f"{STATUS_GROUP}/{BLOCKS_ARRAY}"][...]) != 0
    except KeyError as exc:
        raise OptionError(
            f"output.mode=resume: {path} has no block status record, so it was not written by "
            "kernelmap run; use output.mode=overwrite or another output.path"
        ) from exc


@lru_cache(maxsize=4)
def _arrays(path: str, store_id: str) -> dict[str, zarr.Array]:
    """The output arrays, opened once per process and store: their metadata is read once.

    ``store_id`` (set when the store is created) keys the cache, so a store
    replaced at the same path is opened afresh.
    """
    group = zarr.open_group(path, mode="r+")
    names = ["kernel", *DIAGNOSTICS, f"{STATUS_GROUP}/{BLOCKS_ARRAY}"]
    return {name: group[name] for name in names}


def store_id(path: str) -> str:
    """The identifier given to the store when it was created."""
    return str(read_attrs(path).get("kernelmap_store_id", ""))


def write_block(path: str, block: Block, results: dict[str, np.ndarray], kernel_size: int,
                store: str = "") -> None:
    """Write one block's results into its chunks, then record the block as done.

    ``store`` is the store's identifier (:func:`store_id`), for reusing opened arrays.
    """
    path = _location(path)
    arrays = _arrays(path, store) if store else _arrays.__wrapped__(path, store)
    ny, nx = block.ty1 - block.ty0, block.tx1 - block.tx0
    region = (block.image, slice(block.ty0, block.ty1), slice(block.tx0, block.tx1))
    kern = arrays["kernel"]
    kern[region] = results["kernels"].reshape(ny, nx, kernel_size, kernel_size).astype(kern.dtype)
    for name in DIAGNOSTICS:
        values = results[name]
        if values.dtype.kind == "f" and np.isnan(values).all():
            continue  # the template's fill value already reads as NaN (e.g. diagnostics off)
        arr = arrays[name]
        arr[region] = values.reshape(ny, nx).astype(arr.dtype)
    arrays[f"{STATUS_GROUP}/{BLOCKS_ARRAY}"][block.image, block.by, block.bx] = 1


def mark_complete(path: str, attrs: dict[str, Any] | None = None) -> None:
    """Set ``kernelmap_status`` to complete (with extra attributes) and consolidate."""
    path = _location(path)
    group = zarr.open_group(path, mode="r+")
    group.attrs.update({**(attrs or {}), "kernelmap_status": "complete"})
    _consolidate(path)


def json_attr(value: Any) -> str:
    """A JSON string for attributes that hold structures."""
    return json.dumps(value, sort_keys=True, default=str)
