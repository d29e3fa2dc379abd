"""``kernelmap apply``: the matched and difference images of a kernel map's pairs.

For every image of a kernel map with a kernel-field model, the source is
convolved with the model's kernel of each output pixel
(:func:`pipeline.core.apply.matched_image`) chunk by chunk with Dask
(``map_overlap``, the kernel's half-size of overlap, NaN beyond the image: a
chunk's pixels are the whole image's, exactly), and written to a Zarr store
beside the difference ``target - matched - background`` and the background
(each tile's median of ``target - matched``, the kernel map's tiles,
interpolated bilinearly between the tile centres).  The inputs are the ones
the kernel map was made from (its ``kernelmap_config``); masked target pixels
are NaN in the difference.  Three passes: the matched images, the tiles'
medians, then the differences (both from the stored matched images).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ..core.apply import interpolated_background, matched_image, matched_variance, tile_median
from ..core.field import KernelField
from ..errors import InputError, OptionError
from ..io.store import OutputStore
from .config import job_from_dict
from .plan import job_inputs

__all__ = ["ApplySummary", "apply_kernel_map"]

#: what each output array holds
OUTPUTS = {
    "matched": "source convolved with the kernel-field model's kernel of each pixel",
    "difference": "target - matched - background",
    "background": "each tile's median of target - matched, interpolated bilinearly between tile centres",
}
#: ... and, where the inputs give the variances of both images (``input.variance``, ``weight`` or the CCD model)
NORMALISED = ("normalised", "difference / sqrt(target variance + the matched source's variance)")


@dataclass(frozen=True)
class ApplySummary:
    """What :func:`apply_kernel_map` wrote."""

    path: str
    images: list[Any]  #: labels of the images written
    skipped: list[Any]  #: labels of the images without a model (left NaN)


def _overlapped_block(values: np.ndarray, *, apply: Callable[..., np.ndarray], field: KernelField,
                     starts: tuple[np.ndarray, np.ndarray], half: int,
                     block_id: tuple[int, int] | None = None) -> np.ndarray:
    """``apply`` (:func:`matched_image` or :func:`matched_variance`) to one overlapped chunk (``half``
    pixels of its neighbours on every side), the field at the chunk's place in the image."""
    by, bx = block_id if block_id is not None else (0, 0)
    return apply(values, field, origin=(int(starts[0][by]) - half, int(starts[1][bx]) - half))


def _variance_block(pixels: np.ndarray, *, variances, role: str, image: int,
                    block_info: dict | None = None) -> np.ndarray:
    """The ``role`` image's variances over one chunk of its ``pixels`` (:meth:`Variances.read`)."""
    (y0, y1), (x0, x1) = block_info[0]["array-location"][-2:]
    return variances.read(role, image, slice(y0, y1), slice(x0, x1), np.asarray(pixels, dtype=np.float64))


def _background_block(values: np.ndarray, *, medians: np.ndarray, centres: tuple[np.ndarray, np.ndarray],
                      block_info: dict | None = None) -> np.ndarray:
    """The interpolated background over one chunk (``values`` only gives its place and shape)."""
    (y0, y1), (x0, x1) = block_info[0]["array-location"] if block_info else ((0, values.shape[0]),
                                                                             (0, values.shape[1]))
    return interpolated_background(medians, centres, np.arange(y0, y1), np.arange(x0, x1))


def _source(inputs, image: int, chunk: int):
    """The source of ``image`` as float64 Dask chunks of ``chunk``, and each chunk's first row and column."""
    source = (inputs.source if inputs.source.ndim == 2 else inputs.source[image]).astype(np.float64)
    source = source.rechunk((chunk, chunk))
    return source, tuple(np.concatenate([[0], np.cumsum(c)[:-1]]) for c in source.chunks)


def _write_fits(group, folder: str | Path, images: list[int], labels: np.ndarray, wcs: str, log) -> None:
    """Each image's difference (and normalised difference) as ``<label>.diff.fits`` in ``folder``."""
    from astropy.io import fits

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    header = fits.Header.fromstring(wcs, sep="\n") if wcs else fits.Header()
    for i in images:
        hdus = [fits.PrimaryHDU(np.asarray(group["difference"][i], dtype=np.float32), header=header)]
        if "normalised" in group:
            hdus.append(fits.ImageHDU(np.asarray(group["normalised"][i], dtype=np.float32), header=header,
                                      name="NORMALISED"))
        fits.HDUList(hdus).writeto(folder / f"{labels[i]}.diff.fits", overwrite=True)
    log(f"apply: {len(images)} FITS file(s) written to {folder}")


def _masked_target(inputs, image: int, chunk: int):
    """The target of ``image`` as float64 Dask chunks of ``chunk``, masked pixels NaN."""
    import dask.array as da

    target = inputs.target[image].astype(np.float64).rechunk((chunk, chunk))
    if inputs.mask is None:
        return target
    mask = inputs.mask if inputs.mask.ndim == 2 else inputs.mask[image]
    return da.where(mask.rechunk((chunk, chunk)) != 0, np.nan, target)


def apply_kernel_map(kernels: str | Path, output: str | Path, *, mode: str = "create", chunk: int = 1024,
                     scheduler: str = "threads", storage_options: dict[str, Any] | None = None,
                     fits: str | Path | None = None, log=print) -> ApplySummary:
    """Write the matched, difference and background images of every modelled image of the kernel map
    ``kernels`` to a new Zarr store ``output`` (``mode="overwrite"`` replaces one; ``"create"`` refuses).
    ``storage_options``: for the input store where the kernel map's job had some (a store does not keep
    their values); by default none (credentials from the environment).  ``fits``: a new folder that also
    gets each image's difference (and normalised difference) as a FITS file, ``<label>.diff.fits``, with
    the input's reference WCS where it has one."""
    import dask
    import dask.array as da
    import xarray as xr
    import zarr

    from ..analysis.maps import KernelMap

    if mode not in ("create", "overwrite"):
        raise OptionError(f"mode={mode!r}: use 'create' or 'overwrite'")
    km = KernelMap.open(kernels)
    stored = km.ds.attrs.get("kernelmap_config")
    if not stored:
        raise InputError(f"{kernels} holds no kernelmap_config attribute: apply needs a kernel map written by "
                         "kernelmap run")
    data = yaml.safe_load(stored)
    data["input"]["storage_options"] = dict(storage_options or {})  # the store keeps none of their values
    job = job_from_dict(data)
    out = OutputStore(str(output))  # a local path or an fsspec URL (credentials from the environment)

    def same(a: str | Path, b: str | Path) -> bool:
        a, b = str(a), str(b)
        if "://" in a or "://" in b:
            return a.rstrip("/") == b.rstrip("/")
        return Path(a).resolve() == Path(b).resolve()

    if same(job.input.path, output) or same(kernels, output):
        raise OptionError(f"{output} is the kernel map or its input: write the images elsewhere")
    if out.exists() and mode == "create":
        raise OptionError(f"{output} already exists: nothing was changed; pass --overwrite (mode='overwrite') to "
                          "replace it, or another output path")
    if fits is not None and Path(fits).exists() and mode == "create":
        raise OptionError(f"{fits} already exists: nothing was changed; pass --overwrite to replace its files, or "
                          "another folder")
    inputs = job_inputs(job)
    n, ny, nx = inputs.shape
    size, step = job.tiles.size, job.tiles.step or job.tiles.size
    centres = (np.asarray(km.ds["y"].values, dtype=np.float64), np.asarray(km.ds["x"].values, dtype=np.float64))
    y0, x0 = (np.round(c - (size - 1) / 2).astype(np.int64) for c in centres)  # the kernel map's own tiles
    labels = km.ds["image"].values
    fields = [km.field(label) for label in labels]
    if out.exists():
        out.remove()
    noise = inputs.variances
    normalised = noise is not None and noise.given("target") and noise.given("source")
    # the store's layout by xarray (dimension names, the image coordinate), its values written below
    empty = da.full((n, ny, nx), np.nan, dtype=np.float32, chunks=(1, chunk, chunk))
    skeleton = xr.Dataset(
        {name: (("image", "y", "x"), empty, {"long_name": what})
         for name, what in (*OUTPUTS.items(), *([NORMALISED] if normalised else []))},
        coords={"image": ("image", labels.astype(object) if labels.dtype.kind in "US" else labels)},
        attrs={"title": "kernelmap matched and difference images", "kernelmap_kernels": str(kernels),
               "kernelmap_input": job.input.path, "tile_size": size, "tile_step": step})
    skeleton.to_zarr(out.location, mode="w", compute=False, consolidated=False, zarr_format=3,
                     encoding={name: {"chunks": (1, chunk, chunk)} for name in skeleton.data_vars})
    group = zarr.open_group(out.location, mode="r+")
    arrays = {name: group[name] for name in skeleton.data_vars}
    done, skipped = [], []
    with dask.config.set(scheduler=scheduler):
        writes = []
        for i, field in enumerate(fields):
            label = labels[i]
            if field is None:
                skipped.append(label)
                continue
            half = field.coefficients.shape[-1] // 2
            source, starts = _source(inputs, i, chunk)
            matched = source.map_overlap(_overlapped_block, depth=half, boundary=np.nan, dtype=np.float64,
                                         apply=matched_image, field=field, starts=starts, half=half)
            writes.append(da.store(matched.astype(np.float32)[None], arrays["matched"],
                                   regions=(slice(i, i + 1), slice(None), slice(None)), compute=False,
                                   lock=False))
            done.append(label)
        log(f"apply: matching {len(done)} image(s) ...")
        dask.compute(writes)
        written = group["matched"]
        medians_of: dict[int, Any] = {}
        for i in range(n):  # the tiles' medians of target - matched, from the stored matched images
            if fields[i] is None:
                continue
            residual = _masked_target(inputs, i, chunk) - da.from_zarr(written)[i].astype(np.float64)
            medians_of[i] = [[dask.delayed(tile_median)(residual[a : a + size, b : b + size]) for b in x0]
                             for a in y0]
        (medians,) = dask.compute(medians_of)
        stores = []
        for i in medians:
            grid = np.asarray(medians[i], dtype=np.float64)
            target = _masked_target(inputs, i, chunk)
            matched = da.from_zarr(written)[i].astype(np.float64)
            background = target.map_blocks(_background_block, dtype=np.float64, medians=grid, centres=centres)
            difference = target - matched - background
            outputs = [("difference", difference), ("background", background)]
            if normalised:
                source, starts = _source(inputs, i, chunk)
                half = fields[i].coefficients.shape[-1] // 2
                source_variance = source.map_blocks(_variance_block, dtype=np.float64, variances=noise,
                                                    role="source", image=i)
                spread = source_variance.map_overlap(_overlapped_block, depth=half, boundary=np.nan,
                                                     dtype=np.float64, apply=matched_variance, field=fields[i],
                                                     starts=starts, half=half)
                target_variance = target.map_blocks(_variance_block, dtype=np.float64, variances=noise,
                                                    role="target", image=i)
                outputs.append(("normalised", difference / da.sqrt(target_variance + spread)))
            for name, values in outputs:
                stores.append(da.store(values.astype(np.float32)[None], arrays[name],
                                       regions=(slice(i, i + 1), slice(None), slice(None)), compute=False,
                                       lock=False))
        log("apply: differences ...")
        dask.compute(stores)
    if fits is not None:
        _write_fits(group, fits, list(medians), labels, inputs.wcs, log)
    log(f"apply: {len(done)} image(s) written to {output}" + (f"; {len(skipped)} without a model left NaN"
                                                              if skipped else ""))
    return ApplySummary(str(output), done, skipped)
