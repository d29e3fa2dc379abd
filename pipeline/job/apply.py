"""``kernelmap apply``: the matched and difference images of a kernel map's pairs.

For every image of a kernel map with a kernel-field model, the sharper
image of the pair is convolved with the model's kernel of each output pixel
(:func:`pipeline.core.apply.matched_image`) chunk by chunk with Dask
(``map_overlap``, the kernel's half-size of overlap, NaN beyond the image: a
chunk's pixels are the whole image's, exactly), and written to a Zarr store
beside the difference and the background.  Which image is convolved is the
image's ``direction`` in the kernel map (a map without one: forward):

* ``1`` (forward, ``target = K * source + b``): ``matched = K * source``,
  ``difference = target - matched - background``;
* ``-1`` (reverse, ``source = K * target + b``): ``matched = K * target``,
  ``difference = matched - source - background``.

Either way the difference is ``target - source`` at the blurrier PSF (what is
new in the target is positive), and the background is each tile's median of
it before the background is taken off (the kernel map's tiles, interpolated
bilinearly between the tile centres), so that it is sky-free; the normalised
difference divides by ``sqrt(V_target + K^2 * V_source)`` forward and
``sqrt(K^2 * V_target + V_source)`` reverse.  The output's ``direction``
coordinate ``(image,)`` (and the ``DIRECTN``/``CONVOLVD`` keywords of the
FITS files) says which image each was convolved: ``1`` the source, ``-1``
the target, ``0`` none (an image without a model, left NaN).  The inputs are
the ones the kernel map was made from (its ``kernelmap_config``); masked
target pixels are NaN in the difference (reverse: wherever the kernel's stamp
reaches one).  Three passes: the matched images, the tiles' medians, then the
differences (both from the stored matched images).

Images small enough to share files (two or more in ``SHARD_BYTES``, see
:func:`~pipeline.io.store.whole_image_shards`) are stored as Zarr 3 shards of whole images, each
written by one task with its images' records; larger ones chunk by chunk.

Each image's progress is recorded in ``status/applied`` ``(image, stage)``
(``stage``: ``matched``, ``complete``; a subgroup, which xarray does not
show), one chunk per image, written after the image's pixels of that stage:
after its matched image, then after its difference, background (and
normalised difference).  The root attributes stamp what the output is made
from (``kernelmap_apply``: the kernel map's ``kernelmap_store_id``, the chunk
side, whether it has the normalised difference) and ``kernelmap_status``
(``incomplete`` until every modelled image is complete).  ``mode="resume"``
finishes an interrupted apply: only the stages not recorded are computed (an
image whose matched image is recorded is not matched again), and the result
equals an uninterrupted apply's; an output made from another kernel map or
with other settings is refused, naming what differs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field as _field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ..core.apply import FORWARD, REVERSE, interpolated_background, matched_image, matched_variance, tile_median
from ..core.field import KernelField
from ..core.validate import check_positive_int
from ..errors import InputError, OptionError
from ..io.lock import OutputLock, lock_refusal
from ..io.paths import check_writable, path_within
from ..io.store import (
    OutputStore,
    consecutive_runs,
    file_in_the_way,
    image_encoding,
    whole_image_shards,
)
from ..io.swap import discard, is_url, leftovers, new_sibling, swap_into_place, tidy
from .config import job_from_dict
from .plan import job_inputs

__all__ = ["STAGES", "STATUS", "ApplySummary", "apply_kernel_map"]

#: the per-image completion records (a subgroup, ignored by xarray) and their fields
STATUS = "status/applied"
STAGES = ("matched", "complete")

#: what each output array holds
OUTPUTS = {
    "matched": "the sharper image convolved with the kernel-field model's kernel of each pixel: the source where "
               "direction is 1, the target where it is -1",
    "difference": "target - source at the blurrier PSF: target - matched - background where direction is 1, "
                  "matched - source - background where it is -1",
    "background": "each tile's median of the difference before the background is taken off (target - matched, or "
                  "matched - source), interpolated bilinearly between tile centres",
}
#: ... and, where the inputs give the variances of both images (``input.variance``, ``weight`` or the CCD model)
NORMALISED = ("normalised", "difference / sqrt(variance of the image not convolved + the matched image's variance)")
#: the output's per-image ``direction`` coordinate
DIRECTION = {
    "long_name": "image convolved: 1 the source (forward, difference = target - kernel * source - background); "
                 "-1 the target (reverse, its kernels map the target onto the source: difference = kernel * "
                 "target - source - background); 0 none (no model, left NaN)",
    "flag_values": [REVERSE, 0, FORWARD],
    "flag_meanings": "target_convolved no_model source_convolved",
}
#: the root attribute that states the convention
CONVENTION = ("difference = target - source with both at the blurrier image's PSF, the sharper one convolved with "
              "the kernel-field model (direction 1: target - kernel * source - background; -1: kernel * target - "
              "source - background): what is new in the target is positive")


@dataclass(frozen=True)
class ApplySummary:
    """What :func:`apply_kernel_map` wrote."""

    path: str
    images: list[Any]  #: labels of the images written
    skipped: list[Any]  #: labels of the images without a model (left NaN)
    kept: list[Any] = _field(default_factory=list)  #: labels of the images a resumed output already had complete
    #: labels of the modelled images whose kernels are reversed (their target convolved), written or kept
    reversed: list[Any] = _field(default_factory=list)


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
    return source, _starts(source)


def _starts(values) -> tuple[np.ndarray, np.ndarray]:
    """Each chunk's first row and column of a 2-D Dask array."""
    return tuple(np.concatenate([[0], np.cumsum(c)[:-1]]) for c in values.chunks)


def _convolved(inputs, image: int, chunk: int, direction: int):
    """The image that is convolved (the source forward, the masked target reverse) as float64 Dask chunks of
    ``chunk``, and each chunk's first row and column."""
    if direction == REVERSE:
        target = _masked_target(inputs, image, chunk)
        return target, _starts(target)
    return _source(inputs, image, chunk)


def _map_directions(ds: Any, fields: list[KernelField | None]) -> np.ndarray:
    """``(image,)`` int8: each modelled image's direction in the kernel map ``ds`` (``REVERSE`` where its
    ``direction`` says so, else ``FORWARD``: a map without the variable is forward), 0 for the images without
    a model."""
    from ..analysis.maps import image_directions

    stored = image_directions(ds)
    return np.array([0 if f is None else REVERSE if d == REVERSE else FORWARD for f, d in zip(fields, stored)],
                    dtype=np.int8)


def _write_fits(group, folder: str | Path, images: list[int], labels: np.ndarray, wcs: str, log,
                directions: np.ndarray) -> None:
    """Each image's difference (and normalised difference) as ``<label>.diff.fits`` in ``folder``, its
    direction in the headers (``DIRECTN``, ``CONVOLVD``)."""
    from astropy.io import fits

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    common = fits.Header.fromstring(wcs, sep="\n") if wcs else fits.Header()
    for i in images:
        header = common.copy()
        reverse = int(directions[i]) == REVERSE
        header["DIRECTN"] = (REVERSE if reverse else FORWARD, "1 source convolved, -1 target convolved")
        header["CONVOLVD"] = ("TARGET" if reverse else "SOURCE", "image convolved with the kernel field")
        header["COMMENT"] = ("difference = kernel * target - source - background" if reverse else
                             "difference = target - kernel * source - background")
        header["COMMENT"] = "target - source at the blurrier PSF: what is new in the target is positive"
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


def _mark(done: Any, records: Any, image: int, value: tuple[int, int]) -> None:
    """Record ``image``'s stages (``value`` per :data:`STAGES`) once ``done`` (its pixels' stores) is."""
    records[image] = np.asarray(value, dtype=np.uint8)


def _stores(arrays: dict[str, Any], records: Any, shard: int, outputs: dict[int, dict[str, Any]],
            value: tuple[int, int]) -> list[Any]:
    """The tasks that write each image's ``outputs`` (``{name: Dask array}``) and then record its stages
    (``value``): chunk by chunk (``da.store``) where the output has no shards, else one task for the images
    of each shard (:func:`_write_images`)."""
    import dask
    import dask.array as da

    if shard == 1:
        return [dask.delayed(_mark)([da.store(values.astype(np.float32)[None], arrays[name],
                                              regions=(slice(i, i + 1), slice(None), slice(None)), compute=False,
                                              lock=False) for name, values in named.items()], records, i, value)
                for i, named in outputs.items()]
    groups: dict[int, list[int]] = {}
    for i in sorted(outputs):
        groups.setdefault(i // shard, []).append(i)
    return [dask.delayed(_write_images)(arrays, records, images, value,
                                        {name: [outputs[i][name].astype(np.float32) for i in images]
                                         for name in outputs[images[0]]})
            for images in groups.values()]


def _write_images(arrays: dict[str, Any], records: Any, images: list[int], value: tuple[int, int],
                  values: dict[str, list[np.ndarray]]) -> None:
    """One task's writes of ``images`` (sorted) of one shard: each array's images (a run of consecutive
    ones at once), then their records (``value`` per :data:`STAGES`).  A shard is rewritten whole, so only
    one task writes it."""
    for name, per_image in values.items():
        array = arrays[name]
        for start, stop in consecutive_runs(images):
            array[images[start]: images[stop - 1] + 1] = np.stack(per_image[start:stop]).astype(array.dtype)
    first, last = images[0], images[-1] + 1
    recorded = np.asarray(records[first:last])
    recorded[np.asarray(images) - first] = value
    records[first:last] = recorded


def _stamp(kernel_map: dict[str, Any], chunk: int, normalised: bool) -> dict[str, Any]:
    """What an output is made from: compared before it is resumed."""
    return {"kernelmap_store_id": str(kernel_map.get("kernelmap_store_id", "")),
            "kernelmap_fingerprint": str(kernel_map.get("kernelmap_fingerprint", "")),
            "chunk": int(chunk), "normalised": bool(normalised)}


#: stamp key -> what it is, and the option that sets it
_STAMPED = {"kernelmap_store_id": ("the kernel map (its kernelmap_store_id)", "the kernel map it was made from"),
            "kernelmap_fingerprint": ("the kernel map's job (its kernelmap_fingerprint)",
                                      "the kernel map it was made from"),
            "chunk": ("the chunk side", "--chunk {old} (chunk={old})"),
            "normalised": ("whether the inputs give both images' variances (the normalised difference)",
                           "the kernel map it was made from")}


def _resumable(output: str | Path, group: Any, stamp: dict[str, Any]) -> np.ndarray:
    """``(image, stage)`` records of an existing output that may be resumed with ``stamp``; refused otherwise,
    naming what differs."""
    attrs = dict(group.attrs)
    try:
        old = json.loads(attrs["kernelmap_apply"])
    except (KeyError, TypeError, ValueError):
        raise OptionError(f"--resume: {output} was not made by kernelmap apply (no kernelmap_apply attribute): "
                          "nothing was changed; give another --out, or --overwrite to replace it") from None
    if not stamp["kernelmap_store_id"]:
        raise OptionError("--resume: the kernel map has no kernelmap_store_id (an older kernelmap wrote it), so an "
                          "output made from it cannot be told from one of another such map: nothing was changed; "
                          "pass --overwrite to write the images again")
    differ = [key for key in stamp if old.get(key) != stamp[key]]
    if differ:
        said = "; ".join(f"{_STAMPED[key][0]}: {old.get(key)!r} there, {stamp[key]!r} here" for key in differ)
        fix = " and ".join(dict.fromkeys(_STAMPED[key][1].format(old=old.get(key)) for key in differ))
        raise OptionError(f"--resume: {output} was made from another kernel map or with other settings ({said}): "
                          f"nothing was changed; resume it with {fix}, or pass --overwrite to replace it")
    try:
        records = group[STATUS]
    except KeyError:
        records = None
    if records is None or records.attrs.get("fields") != list(STAGES):
        raise OptionError(f"--resume: {output} has no per-image records ({STATUS}): its creation was interrupted; "
                          "pass --overwrite to replace it")
    return np.asarray(records[:]) == 1


def _same_directions(output: str | Path, group: Any, directions: np.ndarray, labels: np.ndarray) -> None:
    """Refuse to resume an output whose images' directions are not the kernel map's (``directions``)."""
    if "direction" not in group:  # written before directions were recorded: forward throughout
        turned = [str(labels[i]) for i in np.flatnonzero(directions == REVERSE)]
        if turned:
            raise OptionError(f"--resume: {output} records no direction (every image's source convolved), but the "
                              f"kernel map's kernels of {', '.join(turned[:5])}{' ...' if len(turned) > 5 else ''} "
                              "are reversed (their target is convolved): nothing was changed; pass --overwrite to "
                              "replace it")
        return
    theirs = np.asarray(group["direction"][:], dtype=np.int64)
    differ = [str(labels[i]) for i in np.flatnonzero(theirs != directions)]
    if differ:
        raise OptionError(f"--resume: {output} convolved other images than the kernel map's directions say (the "
                          f"direction of {', '.join(differ[:5])}{' ...' if len(differ) > 5 else ''} differs): "
                          "nothing was changed; pass --overwrite to replace it")


def apply_kernel_map(kernels: str | Path, output: str | Path, *, mode: str = "create", chunk: int = 1024,
                     scheduler: str = "threads", storage_options: dict[str, Any] | None = None,
                     fits: str | Path | None = None, log=print) -> ApplySummary:
    """Write the matched, difference and background images of every modelled image of the kernel map
    ``kernels`` to a new Zarr store ``output`` (``mode="overwrite"`` replaces one; ``"create"`` refuses one;
    ``"resume"`` finishes one an interrupted apply of the same kernel map with the same settings left, or
    starts one where there is none).
    ``storage_options``: for the input store where the kernel map's job had some (a store does not keep
    their values); by default none (credentials from the environment).  ``fits``: a new folder that also
    gets each image's difference (and normalised difference) as a FITS file, ``<label>.diff.fits``, with
    the input's reference WCS where the stack has one.

    ``output`` is locked while it is written (``OUTPUT.kernelmap.lock``, :mod:`pipeline.io.lock`): another
    apply to it is refused.  A local output is overwritten by writing the new images beside it
    (``OUTPUT.kernelmap-new-<token>``) and swapping them in once complete (:mod:`pipeline.io.swap`), so
    that an interrupted overwrite leaves the earlier images readable; ``mode="resume"`` then finishes that
    replacement (and swaps it in).  An output at a URL is removed first, then written."""
    lock = OutputLock(str(output), what=f"--out {output}", log=log)
    try:
        return _apply(kernels, output, mode=mode, chunk=chunk, scheduler=scheduler,
                      storage_options=storage_options, fits=fits, log=log, lock=lock)
    finally:
        lock.release()  # where it was taken: on success, on an error and on Ctrl-C


def _apply(kernels: str | Path, output: str | Path, *, mode: str, chunk: int, scheduler: str,
           storage_options: dict[str, Any] | None, fits: str | Path | None, log, lock: OutputLock) -> ApplySummary:
    """:func:`apply_kernel_map`; ``lock`` (of ``output``) is taken once every check has passed."""
    import dask
    import dask.array as da
    import xarray as xr
    import zarr

    from ..analysis.maps import KernelMap

    if mode not in ("create", "overwrite", "resume"):
        raise OptionError(f"mode={mode!r}: use 'create', 'overwrite' or 'resume'")
    check_positive_int("chunk (--chunk)", chunk)
    km = KernelMap.open(kernels)
    stored = km.ds.attrs.get("kernelmap_config")
    if not stored:
        raise InputError(f"{kernels} holds no kernelmap_config attribute: apply needs a kernel map written by "
                         "kernelmap run")
    data = yaml.safe_load(stored)
    data["input"]["storage_options"] = dict(storage_options or {})  # the store keeps none of their values
    job = job_from_dict(data)
    out = OutputStore(str(output))  # a local path or an fsspec URL (credentials from the environment)

    for what, path in (("the kernel map", kernels), ("its input stack", job.input.path)):
        if path_within(path, output) or path_within(output, path):
            raise OptionError(f"{output} is, holds or lies inside {what} ({path}), which is never written: "
                              "nothing was changed; write the images elsewhere")
        if fits is not None and path_within(fits, path):
            raise OptionError(f"--fits {fits} is or lies inside {what} ({path}), which is never written: nothing "
                              "was changed; write the FITS files elsewhere")
    if fits is not None and path_within(fits, output):
        raise OptionError(f"--fits {fits} is or lies inside --out {output}, a Zarr store: nothing was changed; write "
                          "the FITS files elsewhere")
    blocked = file_in_the_way(out.location)
    if blocked is not None:
        raise OptionError(f"{output}: {blocked} is a file, not a folder, so nothing can be written under it: nothing "
                          "was changed; give another output path")
    check_writable(out.location, f"--out {output}")
    held = lock_refusal(out.path, f"--out {output}")
    if held is not None:
        raise held
    found = tuple(x for x in leftovers(out.location) if x.kind == "new")  # replacements left unfinished
    if found and mode != "overwrite" and (mode == "create" or len(found) > 1):
        raise OptionError(f"{output}: an interrupted --overwrite left {'; '.join(x.describe() for x in found)}: "
                          "nothing was changed; pass --resume to finish it (one at most), or --overwrite to start "
                          "again")
    exists = out.exists()
    if exists and mode == "create":
        raise OptionError(f"{output} already exists: nothing was changed; pass --resume (mode='resume') to finish "
                          "an interrupted apply of this kernel map, --overwrite (mode='overwrite') to replace it, "
                          "or another output path")
    if exists and mode == "overwrite" and not out.replaceable("kernelmap_apply"):
        raise OptionError(f"{output} exists and is not an output of kernelmap apply: nothing was changed; "
                          "--overwrite replaces only those. Remove it yourself, or give another output path")
    final = out  # where the images end up; ``out`` is now what is written
    if mode == "resume" and found:  # the replacement an interrupted overwrite left: finished, then swapped in
        out, exists = OutputStore(found[0].path), True
    elif mode == "overwrite" and exists and not is_url(out.location) and any(Path(out.location).iterdir()):
        out, exists = OutputStore(new_sibling(final.path)), False
    if fits is not None and Path(fits).exists() and mode != "overwrite" and not (mode == "resume" and exists):
        raise OptionError(f"{fits} already exists: nothing was changed; pass --overwrite to replace its files, or "
                          "another folder")
    inputs = job_inputs(job)
    n, ny, nx = inputs.shape
    size, step = job.tiles.size, job.tiles.step or job.tiles.size
    centres = (np.asarray(km.ds["y"].values, dtype=np.float64), np.asarray(km.ds["x"].values, dtype=np.float64))
    y0, x0 = (np.round(c - (size - 1) / 2).astype(np.int64) for c in centres)  # the kernel map's own tiles
    labels = km.ds["image"].values
    fields = [km.field(label) for label in labels]
    directions = _map_directions(km.ds, fields)
    noise = inputs.variances
    normalised = noise is not None and noise.given("target") and noise.given("source")
    stamp = _stamp(km.ds.attrs, chunk, normalised)
    resume = mode == "resume" and exists
    if resume:  # an output that cannot be resumed is refused before even the lock is taken (checked again below)
        try:
            readable = zarr.open_group(out.location, mode="r")
        except (OSError, ValueError, LookupError):
            readable = None  # refused below, saying why
        if readable is not None:
            _resumable(output, readable, stamp)
            _same_directions(output, readable, directions, labels)
    lock.acquire()  # every check passed: from here on this apply writes the output
    if not is_url(final.location):
        tidy(final.location, log)  # the earlier images an interrupted swap set aside
    for leftover in found if mode == "overwrite" else ():
        log(f"apply: removing {leftover.describe()}")
        discard(leftover)
    if out is not final:
        log(f"apply: {'resuming' if resume else 'writing'} the replacement of {output} in {out.path}; it is swapped "
            f"in once complete ({output} keeps the earlier images until then)")
    if resume:  # checked before anything is written
        try:
            group = zarr.open_group(out.location, mode="r+")
        except (OSError, ValueError, LookupError) as exc:
            raise OptionError(f"--resume: {output} cannot be opened as a Zarr group ({exc}): nothing was changed; "
                              "pass --overwrite to replace it") from exc
        recorded = _resumable(output, group, stamp)
        if recorded.shape[0] != n:
            raise OptionError(f"--resume: {output} has {recorded.shape[0]} images, the kernel map {n}: pass "
                              "--overwrite to replace it")
        _same_directions(output, group, directions, labels)
        shards = group["matched"].shards  # the output's own
        shard = int(shards[0]) if shards else 1
    else:
        shard = whole_image_shards(n, ny, nx)
        if exists:
            out.remove()
    cy, cx = min(chunk, ny), min(chunk, nx)
    encoding = image_encoding(shard, (cy, cx), (ny, nx))
    # the store's layout by xarray (dimension names, the image coordinate), its values written below
    empty = da.full((n, ny, nx), np.nan, dtype=np.float32, chunks=(shard, ny, nx) if shard > 1 else (1, cy, cx))
    skeleton = xr.Dataset(
        {name: (("image", "y", "x"), empty, {"long_name": what})
         for name, what in (*OUTPUTS.items(), *([NORMALISED] if normalised else []))},
        coords={"image": ("image", labels.astype(object) if labels.dtype.kind in "US" else labels),
                "direction": ("image", directions, DIRECTION)},
        attrs={"title": "kernelmap matched and difference images", "kernelmap_difference": CONVENTION,
               "kernelmap_kernels": str(kernels),
               "kernelmap_input": job.input.path, "tile_size": size, "tile_step": step,
               "kernelmap_apply": json.dumps(stamp, sort_keys=True), "kernelmap_status": "incomplete"})
    if not resume:
        skeleton.to_zarr(out.location, mode="w", compute=False, consolidated=False, zarr_format=3,
                         encoding={name: dict(encoding) for name in skeleton.data_vars})
        group = zarr.open_group(out.location, mode="r+")
        records = group.create_array(STATUS, shape=(n, len(STAGES)), chunks=(1, len(STAGES)),
                                     shards=(shard, len(STAGES)) if shard > 1 else None, dtype="uint8",
                                     fill_value=0, attributes={"fields": list(STAGES), "long_name": (
                                         "1 where the image's stage is written: its matched image, then the rest")})
        recorded = np.zeros((n, len(STAGES)), dtype=bool)
    else:
        records = group[STATUS]
        group.attrs["kernelmap_status"] = "incomplete"
    arrays = {name: group[name] for name in skeleton.data_vars}
    matched_done, complete = recorded[:, 0], recorded[:, 1]
    done, skipped, kept = [], [], []
    with dask.config.set(scheduler=scheduler):
        matching: dict[int, dict[str, Any]] = {}
        for i, field in enumerate(fields):
            label = labels[i]
            if field is None:
                skipped.append(label)
                continue
            if complete[i]:
                kept.append(label)
                continue
            done.append(label)
            if matched_done[i]:
                continue
            half = field.coefficients.shape[-1] // 2
            convolved, starts = _convolved(inputs, i, chunk, directions[i])
            matching[i] = {"matched": convolved.map_overlap(
                _overlapped_block, depth=half, boundary=np.nan, dtype=np.float64, apply=matched_image, field=field,
                starts=starts, half=half)}
        if kept:
            log(f"apply: {len(kept)} image(s) already complete in {output}")
        log(f"apply: matching {len(matching)} image(s) ...")
        dask.compute(_stores(arrays, records, shard, matching, (1, 0)))
        written = group["matched"]
        medians_of: dict[int, Any] = {}
        for i in range(n):  # the tiles' medians of target - matched (matched - source reversed), from the stored
            # matched images
            if fields[i] is None or complete[i]:
                continue
            matched = da.from_zarr(written)[i].astype(np.float64)
            if directions[i] == REVERSE:
                residual = matched - _source(inputs, i, chunk)[0]
            else:
                residual = _masked_target(inputs, i, chunk) - matched
            medians_of[i] = [[dask.delayed(tile_median)(residual[a : a + size, b : b + size]) for b in x0]
                             for a in y0]
        (medians,) = dask.compute(medians_of)
        differences: dict[int, dict[str, Any]] = {}
        for i in medians:
            grid = np.asarray(medians[i], dtype=np.float64)
            target = _masked_target(inputs, i, chunk)
            matched = da.from_zarr(written)[i].astype(np.float64)
            background = target.map_blocks(_background_block, dtype=np.float64, medians=grid, centres=centres)
            reverse = directions[i] == REVERSE
            if reverse:  # the target convolved: target - source at the source's (the blurrier) PSF
                source = _source(inputs, i, chunk)[0]
                difference = matched - source - background
            else:
                difference = target - matched - background
            outputs = {"difference": difference, "background": background}
            if normalised:  # the convolved image's variance through each pixel's kernel squared, the other's as is
                source, starts = _source(inputs, i, chunk)
                half = fields[i].coefficients.shape[-1] // 2
                source_variance = source.map_blocks(_variance_block, dtype=np.float64, variances=noise,
                                                    role="source", image=i)
                target_variance = target.map_blocks(_variance_block, dtype=np.float64, variances=noise,
                                                    role="target", image=i)
                convolved, kept_as_is = (target_variance, source_variance) if reverse else \
                    (source_variance, target_variance)
                spread = convolved.map_overlap(_overlapped_block, depth=half, boundary=np.nan,
                                               dtype=np.float64, apply=matched_variance, field=fields[i],
                                               starts=_starts(convolved) if reverse else starts, half=half)
                outputs["normalised"] = difference / da.sqrt(kept_as_is + spread)
            differences[i] = outputs
        log("apply: differences ...")
        dask.compute(_stores(arrays, records, shard, differences, (1, 1)))
    group.attrs["kernelmap_status"] = "complete"
    if out is not final:
        swap_into_place(out.location, final.location)
        group = zarr.open_group(final.location, mode="r")
    if fits is not None:
        _write_fits(group, fits, [i for i in range(n) if fields[i] is not None], labels, inputs.wcs, log,
                    directions)
    turned = [labels[i] for i in range(n) if directions[i] == REVERSE]
    log(f"apply: {len(done)} image(s) written to {output}" + (f"; {len(kept)} already complete" if kept else "")
        + (f"; {len(skipped)} without a model left NaN" if skipped else "")
        + (f"; {len(turned)} reversed (their target convolved: difference = kernel * target - source - "
           "background)" if turned else ""))
    return ApplySummary(str(output), done, skipped, kept, turned)
