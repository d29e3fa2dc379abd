"""``kernelmap ingest``: FITS files to an input stack, as a job of one task per image (or shard).

The images: one reference (the source shared by every target) and targets,
or pairs, a source per target (``sources``, matched to the targets in order).
A plan (:func:`plan_ingest`) reads every file's headers and checks them
before anything is written: the HDUs exist and hold 2-D images, each mask,
weight or variance plane is shaped like its image, every image lies on the
stack's pixel grid (the reference's, or the first source's: its WCS within
``tolerance`` pixels of the grid's) or, with ``reproject``, overlaps it, and
the header keys asked for are there.  Executing it
(:meth:`IngestPlan.execute`) creates the stack's arrays (metadata only),
then runs one task per image, or per shard's images (:func:`write_images`:
read, check the values, resample where needed, write the images' own chunks
or shard) in a pool of threads or on a Dask cluster, with progress shown.

The stack (Zarr 3, local): ``source (y, x)`` (pairs: ``source (image, y,
x)``), ``target (image, y, x)`` float32 (NaN where a source's own mask marks
a pixel bad), ``mask (image, y, x)`` uint8, 1 where the target's mask marks a
pixel bad (any of ``mask_bits`` set; any bit where none) else 0,
``target_variance (image, y, x)`` and ``source_variance`` (shaped like
``source``) float32 with weights or variances (inf or NaN: no data), the
header keys (of the targets) as coordinates along ``image``, chunks of one
image by ``chunk`` x ``chunk`` pixels; images small enough to share files
(see :func:`~pipeline.io.store.whole_image_shards`) stored as Zarr 3 shards
of whole images, each written by one task (with the sources of the shard's
pairs).  Root attributes: the grid's WCS (``reference_wcs``), the files
(``reference`` or ``sources``, ``targets``, as typed), the files resampled
(``resampled_targets``; pairs: ``resampled_sources``), and the settings
(``kernelmap_ingest``), written last: while the stack is being created it
carries ``kernelmap_ingest_creating`` (the settings) instead.  Image labels:
the target file names without their FITS suffixes, distinct.

Resuming: the group ``ingest`` of the stack records which images are written
(``target_written (image,)``, ``source_written (1,)``, pairs ``source_written
(image,)``, one chunk each, sharded as the images), each set by its task
after the image's pixels, and, in its attribute ``files``, the identity of
every file read (the absolute real path, size and modification time of each
image and plane file: kept off the root attributes, which every reader of
the stack loads).  Running the same ingest again (same settings, same
files) writes only the images not recorded, and the stack equals an
uninterrupted ingest's; a complete one is left as it is, one whose creation
was interrupted is created anew.  The files are compared with those the
stack was ingested from (``ingest`` attribute ``files``; a stack without it, from
an earlier version, is taken as before): another file under the same name
(from another folder, say) or a file changed since is refused before
anything is written, except a file changed in place whose images are not
written yet (a bad file fixed), read now if the stack's grid, header keys
and resampling stay as the stack has them.  A stack from other settings or
files (or an unfinished creation of one) is refused unless
``mode="overwrite"``; anything at the output that kernelmap ingest did not
write is never removed, nor an output that is or holds a file the ingest
reads.  An empty folder (``--out .``) is kept, the stack created in it.

While it writes, an ingest holds the stack's lock (:mod:`pipeline.io.lock`):
another ingest to it is refused.  ``mode="overwrite"`` writes the new stack
beside the old one and swaps it in once complete (:mod:`pipeline.io.swap`;
an empty folder, or the working folder or one holding it, is written in
place), so an interrupted overwrite leaves the old stack readable and its
replacement is named by the next ingest (refused unless ``--overwrite``, which
removes it and starts again).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import InputError, OptionError
from ..io.fits import (
    ImageSpec,
    Plane,
    celestial_wcs,
    check_mask_bits,
    check_plane_shape,
    expand_files,
    file_stem,
    footprint_overlaps,
    grid_offset,
    inspect_plane,
    plane_exists,
    plane_file,
    read_image,
    wcs_text,
)
from ..io.lock import OutputLock, lock_refusal
from ..io.paths import check_writable, path_within, same_path
from ..io.store import consecutive_runs, image_encoding, whole_image_shards
from ..io.swap import discard, leftovers, new_sibling, swap_into_place, tidy
from .config import INGEST_MASK, INGEST_VARIANCES, IngestConfig, JobConfig
from .progress import Progress

__all__ = ["IngestPlan", "IngestSummary", "ImageTask", "ImageWritten", "file_identity", "files_read", "ingest_fits",
           "ingested_input", "job_ingest_plan", "plan_ingest", "stack_kind", "stack_state", "write_images"]

#: The stack's group recording which images are written, and its arrays.
RECORD = "ingest"
WRITTEN = {"target": "target_written", "source": "source_written"}
#: The root attribute holding the settings a stack was ingested from (:meth:`IngestConfig.stamp`).
STAMP = "kernelmap_ingest"
#: The attribute of the :data:`RECORD` group holding the identity of every file an ingest reads
#: (:func:`file_identity`), in the order of :func:`files_read`: written at creation, compared whenever the
#: stack is resumed or found complete.
FILES = "files"
#: The root attribute of a stack being created (the settings), replaced by :data:`STAMP` once it is.
CREATING = "kernelmap_ingest_creating"
#: The root attribute ``title`` of a stack.
TITLE = "kernelmap input stack from FITS files"


@dataclass(frozen=True)
class Resampling:
    """Onto the stack's grid (the reference's, or the first source's): the image's and the grid's celestial
    WCS, the grid's shape."""

    wcs: Any
    reference_wcs: Any
    shape: tuple[int, int]


@dataclass(frozen=True)
class ImageTask:
    """One image to read and write into the stack at ``output``: the reference (``index`` ``None``, role
    ``"source"``), or the target (role ``"target"``) or the source (role ``"source"``, pairs) of image
    ``index``."""

    output: str
    index: int | None
    spec: ImageSpec
    mask_bits: int | None = None
    mask: bool = False  #: the stack holds ``mask`` (targets; a source's bad pixels become NaN)
    variance: bool = False  #: the stack holds this image's variances
    resample: Resampling | None = None
    role: str = "target"  #: ``"target"`` or ``"source"``

    @property
    def name(self) -> str:
        return "reference" if self.index is None else f"{self.role}-{self.index}"


@dataclass(frozen=True)
class ImageWritten:
    """What a task wrote: which image (and whether its source or its target), and how many of its pixels are
    bad in the stack (NaN, masked, or without data in its variances)."""

    index: int | None
    bad: int
    pixels: int
    role: str = "target"


def write_images(tasks: Sequence[ImageTask]) -> list[ImageWritten]:
    """Read the images of ``tasks`` (the reference alone, or the targets, and the sources of pairs, of one
    shard of the stack), check their values, resample them where asked, and write them (a run of consecutive
    images at once: a shard is rewritten whole, so only one task writes it); then record them written.

    Raises
    ------
    InputError
        A plane cannot be read or holds negative weights or variances: that image is not recorded (the task's
        others are written and recorded first; the same ingest, once the file is fixed, writes it).
    """

    from ..io.resample import resample_onto

    read, failed = [], None
    for task in tasks:
        try:
            pixels = read_image(task.spec, mask_bits=task.mask_bits)
        except InputError as exc:
            failed = failed or exc
            continue
        data, bad, variance = pixels.data, pixels.bad, pixels.variance
        if task.resample is not None:
            r = task.resample
            data, bad, variance = resample_onto(data, bad, variance, r.wcs, r.reference_wcs, r.shape)
        read.append((task, (data, bad, variance)))
    if read:
        _write_read(read)
    if failed is not None:
        raise failed
    return [ImageWritten(task.index, int(np.count_nonzero(_bad_pixels(d, b, v))), int(d.size), task.role)
            for task, (d, b, v) in read]


def _bad_pixels(data: np.ndarray, bad: np.ndarray | None, variance: np.ndarray | None) -> np.ndarray:
    """Where an image read is bad in the stack: NaN or inf, masked, or without data in its variances."""
    out = ~np.isfinite(data)
    if bad is not None:
        out |= bad
    if variance is not None:
        out |= ~np.isfinite(variance)
    return out


Read = tuple[np.ndarray, np.ndarray | None, np.ndarray | None]


def _source_planes(data: np.ndarray, bad: np.ndarray | None, variance: np.ndarray | None) -> Read:
    """A source's pixels as the stack holds them: its mask's bad pixels NaN (a bad pixel of the source, as
    the run reads it), their variances inf."""
    if bad is not None:
        data = np.where(bad, np.float32(np.nan), data)
        variance = None if variance is None else np.where(bad, np.float32(np.inf), variance)
    return data, bad, variance


def _write_read(read: list[tuple[ImageTask, Read]]) -> None:
    """Write the images read (the reference alone, or the targets and sources of one shard), then record
    them written."""
    import zarr

    group = zarr.open_group(read[0][0].output, mode="r+")
    for role in ("source", "target"):
        mine = [(task, _source_planes(*planes) if role == "source" else planes)
                for task, planes in read if task.role == role]
        if not mine:
            continue
        tasks, planes_read = [task for task, _ in mine], [planes for _, planes in mine]
        first = tasks[0]
        if first.index is None:  # the reference, (y, x)
            data, _, variance = planes_read[0]
            group["source"][...] = data
            if first.variance:
                group[INGEST_VARIANCES["source"]][...] = variance
            group[f"{RECORD}/{WRITTEN['source']}"][0] = 1
            continue
        indices = [t.index for t in tasks]
        planes = {role: [d for d, _, _ in planes_read]}
        if first.mask:
            planes[INGEST_MASK] = [np.zeros(d.shape, np.uint8) if b is None else b.astype(np.uint8)
                                   for d, b, _ in planes_read]
        if first.variance:
            planes[INGEST_VARIANCES[role]] = [v for _, _, v in planes_read]
        for name, values in planes.items():
            for start, stop in consecutive_runs(indices):
                group[name][indices[start]: indices[stop - 1] + 1] = np.stack(values[start:stop])
        written = group[f"{RECORD}/{WRITTEN[role]}"]
        lo, hi = indices[0], indices[-1] + 1
        recorded = np.asarray(written[lo:hi])
        recorded[np.asarray(indices) - lo] = 1
        written[lo:hi] = recorded


@dataclass(frozen=True)
class IngestSummary:
    """What an ingest did."""

    path: str
    n_images: int  #: target images in the stack
    written: int  #: target images written now
    resampled: tuple[str, ...] = ()  #: files resampled onto the stack's grid (targets, and sources of pairs)
    seconds: float = 0.0
    reference_written: bool = True
    bad: int = 0  #: bad pixels of the targets written now (NaN, masked, no data, not covered once resampled)
    pixels: int = 0  #: pixels of the targets written now
    pairs: bool = False  #: one source per target (no reference)
    sources_written: int = 0  #: sources of pairs written now

    def describe(self) -> str:
        n = self.n_images
        if self.pairs:
            if self.written == n and self.sources_written == n:
                text = f"ingest: {n} pair(s) of a source and a target written to {self.path}"
            elif self.written == 0 and self.sources_written == 0:
                text = f"ingest: the stack at {self.path} was written from these FITS files already"
            else:
                text = (f"ingest: finished {self.path}: {self.sources_written} of {n} source(s) and "
                        f"{self.written} of {n} target(s) written now, the others were already")
        elif self.written == n and self.reference_written:
            text = f"ingest: {n} target(s) and the reference written to {self.path}"
        elif self.written == 0 and not self.reference_written:
            text = f"ingest: the stack at {self.path} was written from these FITS files already"
        else:
            text = (f"ingest: finished {self.path}: {self.written} of {n} target(s)"
                    + (" and the reference" if self.reference_written else "") + " written now, the others were "
                    "already")
        if self.resampled:
            text += (f"; {len(self.resampled)} file(s) resampled onto the first source's grid" if self.pairs else
                     f"; {len(self.resampled)} target(s) resampled onto the reference's grid")
        if self.pixels:
            text += (f"; {self.bad} of the {self.pixels} target pixels written are bad "
                     f"({100.0 * self.bad / self.pixels:.2g} %)")
        return text + (f" in {self.seconds:.1f} s" if self.seconds else "")


def stack_state(path: str | os.PathLike[str], stamp: str) -> str:
    """What is at ``path``: ``"absent"`` (nothing, or an empty folder), a stack ingested with settings
    ``stamp`` (``"complete"``, or ``"partial"`` where some image is not recorded written), ``"unfinished"``
    (the creation of a stack with these settings that did not finish), or ``"other"`` (anything else:
    :func:`stack_kind` says what)."""
    import zarr

    kind, group = _stack_kind(path)
    if kind in ("absent", "empty"):
        return "absent"
    if kind == "foreign" or (kind == "unfinished" and group.attrs.get(CREATING) != stamp):
        return "other"
    if kind == "unfinished":
        return "unfinished"
    if group.attrs.get(STAMP) != stamp:
        return "other"
    try:
        record = group[RECORD]
    except KeyError:
        return "complete"  # ingested in one go, before the record was kept
    if not isinstance(record, zarr.Group):
        return "other"
    done = all(np.asarray(record[name][...]).all() for name in WRITTEN.values())
    return "complete" if done else "partial"


def _recorded_files(path: str | os.PathLike[str]) -> list[dict[str, Any]] | None:
    """The identities of the files a stack was ingested from (``None``: not recorded, an earlier version's)."""
    group = _group(path)
    record = None if group is None or RECORD not in group else group[RECORD]
    return None if record is None else record.attrs.get(FILES)


def stack_kind(path: str | os.PathLike[str]) -> str:
    """Who wrote what is at ``path``: ``"absent"``; ``"stack"`` (a stack stamped by kernelmap ingest, with
    any settings); ``"unfinished"`` (a stack whose creation by kernelmap ingest did not finish: marked as
    being created, or holding the ``ingest`` record or the stack's title, not stamped); ``"empty"`` (an empty
    folder); ``"foreign"`` (anything else: never removed by an ingest)."""
    return _stack_kind(path)[0]


def _stack_kind(path: str | os.PathLike[str]) -> tuple[str, Any]:
    """:func:`stack_kind` and the Zarr group opened to tell it (``None`` where there is none)."""
    if not os.path.lexists(path):
        return "absent", None
    if os.path.isdir(path) and not os.path.islink(path) and not os.listdir(path):
        return "empty", None
    group = _group(path)
    if group is None:
        return "foreign", None
    if STAMP in group.attrs:
        return "stack", group
    if CREATING in group.attrs or group.attrs.get("title") == TITLE or RECORD in group:
        return "unfinished", group
    return "foreign", group


def _group(path: str | os.PathLike[str]) -> Any:
    """The Zarr group at ``path`` (read-only), or ``None`` where it is none."""
    import zarr

    try:
        return zarr.open_group(str(path), mode="r")
    except (OSError, ValueError, LookupError):  # not a Zarr group (Zarr's errors are ValueErrors)
        return None


@dataclass
class IngestPlan:
    """What an ingest will do, every file's headers checked: :meth:`execute` does it."""

    settings: IngestConfig
    output: str
    state: str  #: of the output before: ``absent``, ``complete``, ``partial``, ``unfinished`` or ``other``
    mode: str
    files: list[str]  #: the targets
    tasks: list[ImageTask] = field(default_factory=list)  #: the reference's first
    coords: dict[str, Any] = field(default_factory=dict)
    shape: tuple[int, int] = (0, 0)
    resampled: list[str] = field(default_factory=list)  #: targets resampled onto the stack's grid
    sources: list[str] = field(default_factory=list)  #: the sources of pairs, one per target (none: a reference)
    resampled_sources: list[str] = field(default_factory=list)
    attrs: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  #: said when the stack is written (e.g. no reference mask)
    identities: list[dict[str, Any]] = field(default_factory=list)  #: of the files read (:data:`FILES`)
    refresh_files: bool = False  #: resuming: files of images not yet written changed in place, recorded anew

    @property
    def complete(self) -> bool:
        """Whether the output holds this ingest already (nothing to do)."""
        return self.state == "complete" and self.mode == "create"

    def describe(self) -> str:
        """One line: what will be written where."""
        if self.complete:
            return f"ingest     {self.output}: written from these FITS files already"
        what = "finish" if self.state == "partial" and self.mode == "create" else "write"
        what = "write anew (its creation did not finish)" if self.state == "unfinished" else what
        if self.sources:
            moved = len(self.resampled) + len(self.resampled_sources)
            return (f"ingest     {self.output}: {what} the stack of {len(self.files)} pair(s) of a source and a "
                    f"target, {self.shape[0]}x{self.shape[1]} px (the grid of the first source, {self.sources[0]})"
                    + (f", {moved} file(s) resampled onto it" if moved else ""))
        return (f"ingest     {self.output}: {what} the stack of {self.settings.reference} and {len(self.files)} "
                f"target(s), {self.shape[0]}x{self.shape[1]} px"
                + (f", {len(self.resampled)} resampled onto the reference's grid" if self.resampled else ""))

    def execute(self, *, client: Any = None, workers: int = 1, progress: bool = False,
                log: Callable[[str], None] = print) -> IngestSummary:
        """Write the stack: create it (or replace it, ``mode="overwrite"``), then run the task of every image
        not recorded written, on ``client`` (a ``distributed.Client``) or in ``workers`` threads."""

        started = time.monotonic()
        n = len(self.files)
        pairs = bool(self.sources)
        resampled = tuple(self.resampled_sources) + tuple(self.resampled)
        if self.complete:
            summary = IngestSummary(self.output, n, 0, resampled, reference_written=False, pairs=pairs)
            log(summary.describe())
            return summary
        for note in self.notes:
            log(f"ingest: {note}")
        # one ingest per stack: released on success, on an error and on Ctrl-C
        with OutputLock(self.output, log=lambda text: log(f"ingest: {text}")):
            tidy(self.output, lambda text: log(f"ingest: {text}"))  # what an interrupted swap set aside
            if self.mode == "overwrite":
                for leftover in leftovers(self.output):
                    log(f"ingest: removing {leftover.describe()}")
                    discard(leftover)
            if self.mode == "overwrite" and self.state != "absent" and _swappable(self.output):
                # written beside the stack, swapped in once complete: an interrupted overwrite leaves it readable
                sibling = new_sibling(self.output)
                log(f"ingest: the new stack is written to {sibling} and replaces {self.output} once complete")
                work = dataclasses.replace(self, output=sibling, state="absent",
                                           tasks=[dataclasses.replace(t, output=sibling) for t in self.tasks])
                summary = work._write(log=log, started=started, client=client, workers=workers, progress=progress,
                                      replacing=self.output)
                swap_into_place(sibling, self.output)
                summary = dataclasses.replace(summary, path=self.output)
            else:
                summary = self._write(log=log, started=started, client=client, workers=workers, progress=progress)
        log(summary.describe())
        return summary

    def _write(self, *, log: Callable[[str], None], started: float, client: Any, workers: int,
               progress: bool, replacing: str | None = None) -> IngestSummary:
        """Create the stack (or replace it in place) where asked, then run the task of every image not recorded
        written; ``replacing``: the stack this one (written beside it) replaces once complete."""
        import zarr

        n = len(self.files)
        pairs = bool(self.sources)
        resampled = tuple(self.resampled_sources) + tuple(self.resampled)
        if self.state in ("absent", "unfinished") or self.mode == "overwrite":
            self._create()
            pending = list(self.tasks)
        else:
            if self.refresh_files:
                zarr.open_group(self.output, mode="r+")[RECORD].attrs[FILES] = self.identities
            done = _written(self.output)
            pending = [t for t in self.tasks if not done[t.role][0 if t.index is None else t.index]]
        try:
            written = [w for w in _run(self._groups(pending), client=client, workers=workers, progress=progress,
                                       log=log) if w.role == "target"]
        except InputError as exc:  # a value found while reading an image's pixels (e.g. a negative variance)
            if replacing is not None:
                raise InputError(f"{exc}; {replacing} keeps the stack written before: once the file is fixed, run "
                                 "the same ingest with --overwrite again") from exc
            raise InputError(f"{exc}; the images written before are recorded in {self.output}: once the file is "
                             "fixed, the same ingest again writes the rest") from exc
        summary = IngestSummary(self.output, n, sum(t.role == "target" for t in pending), resampled,
                                time.monotonic() - started,
                                reference_written=any(t.index is None for t in pending),
                                bad=sum(w.bad for w in written), pixels=sum(w.pixels for w in written),
                                pairs=pairs, sources_written=sum(t.role == "source" and t.index is not None
                                                                 for t in pending))
        return summary

    @property
    def images_per_shard(self) -> int:
        """Targets to a file (Zarr shard) of the stack's arrays along ``image`` (1: no shards)."""
        return whole_image_shards(len(self.files), *self.shape)

    def _groups(self, tasks: Sequence[ImageTask]) -> list[list[ImageTask]]:
        """The tasks as the groups one task writes: the reference alone, the targets (and the sources of
        pairs) of each shard together (each image's alone where the stack has no shards)."""
        import zarr

        shard = 1
        if os.path.lexists(self.output):  # the stack's own (an ingest made before shards has none)
            shards = zarr.open_group(self.output, mode="r")["target"].shards
            shard = int(shards[0]) if shards else 1
        groups: dict[Any, list[ImageTask]] = {}
        for task in tasks:
            groups.setdefault("reference" if task.index is None else task.index // shard, []).append(task)
        return list(groups.values())

    def _create(self) -> None:
        """The stack's arrays (metadata), coordinates and record, the group marked as being created first
        (:data:`CREATING`) and stamped with the settings last; what was at the output before is removed
        only where kernelmap ingest wrote it (:func:`stack_kind`), checked again here."""
        import dask.array as da
        import xarray as xr
        import zarr

        kind = stack_kind(self.output)
        if kind == "foreign":
            raise OptionError(_not_ours(self.output, self.mode == "create"))
        if kind not in ("absent", "empty"):  # an empty folder is kept, the stack created in it
            if os.path.isdir(self.output) and not os.path.islink(self.output):
                _clear_folder(self.output)  # the folder itself kept: it may be the working folder (--out .)
            else:
                os.remove(self.output)
        s, n, (ny, nx) = self.settings, len(self.files), self.shape
        plane = (min(s.chunk, ny), min(s.chunk, nx))

        shard = self.images_per_shard

        def images(dtype) -> tuple[tuple[str, ...], Any]:
            return ("image", "y", "x"), da.zeros((n, ny, nx), dtype=dtype,
                                                 chunks=(shard, ny, nx) if shard > 1 else (1, *plane))

        reference = (("y", "x"), da.zeros((ny, nx), np.float32, chunks=plane))
        source = images(np.float32) if s.pairs else reference
        data: dict[str, Any] = {"source": source, "target": images(np.float32)}
        if s.has_mask:
            data[INGEST_MASK] = (*images(np.uint8), {"long_name": "bad pixels of the target (nonzero = bad)"})
        for role, name in s.variance_arrays().items():
            dims, values = images(np.float32) if role == "target" else source
            data[name] = (dims, values, {"long_name": f"per-pixel variance of the {role} (inf or NaN: no data)"})
        stamp = self.settings.stamp()
        zarr.open_group(self.output, mode="w-", zarr_format=3, attributes={CREATING: stamp})
        files = ({"sources": list(self.sources), "targets": list(self.files),
                  "resampled_sources": list(self.resampled_sources)} if s.pairs else
                 {"reference": s.reference, "targets": list(self.files)})
        ds = xr.Dataset(data, coords=self.coords, attrs={
            "title": TITLE, **files, "resampled_targets": list(self.resampled), **self.attrs,
            CREATING: stamp})
        encoding = {name: {"chunks": plane} if ds[name].ndim == 2 else image_encoding(shard, plane, (ny, nx))
                    for name in data}
        ds.to_zarr(self.output, mode="a", consolidated=False, zarr_format=3, encoding=encoding, compute=False)
        group = zarr.open_group(self.output, mode="r+")
        record = group.create_group(RECORD, attributes={
            "description": "which images of the stack are written (1), each set after the image's pixels; "
                           "files: the identity of every file read", FILES: list(self.identities)})
        record.create_array(WRITTEN["target"], shape=(n,), chunks=(1,), shards=(shard,) if shard > 1 else None,
                            dtype="uint8", fill_value=0)
        if s.pairs:  # one source per image, sharded as the images
            record.create_array(WRITTEN["source"], shape=(n,), chunks=(1,), shards=(shard,) if shard > 1 else None,
                                dtype="uint8", fill_value=0)
        else:
            record.create_array(WRITTEN["source"], shape=(1,), chunks=(1,), dtype="uint8", fill_value=0)
        group.attrs[STAMP] = stamp
        del group.attrs[CREATING]


def _swappable(path: str) -> bool:
    """Whether the stack at ``path`` can be replaced by swapping a new one into its place: anything but an
    empty folder and the working folder or a folder holding it (those are cleared and written in place)."""
    if os.path.isdir(path) and not os.path.islink(path) and not os.listdir(path):
        return False
    here, there = os.path.realpath(os.getcwd()), os.path.realpath(path)
    return not (here == there or here.startswith(there.rstrip(os.sep) + os.sep))


def _clear_folder(path: str) -> None:
    """Remove what the folder at ``path`` holds, keeping the folder."""
    with os.scandir(path) as entries:
        for entry in list(entries):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.remove(entry.path)


def _written(output: str) -> dict[str, np.ndarray]:
    """``{role: bool per image}``: which images of the stack at ``output`` are recorded written (the reference:
    ``source`` of length 1)."""
    import zarr

    record = zarr.open_group(output, mode="r")[RECORD]
    return {role: np.asarray(record[name][...], bool) for role, name in WRITTEN.items()}


def _run(groups: Sequence[Sequence[ImageTask]], *, client: Any, workers: int, progress: bool,
         log: Callable[[str], None]) -> list[ImageWritten]:
    """Run a task for each group of images (:func:`write_images`) on ``client`` or in ``workers`` threads,
    counting the images as they are written; the first failure cancels what has not started and is raised."""
    bar = Progress(sum(len(g) for g in groups), log, progress, unit="images")
    results: list[ImageWritten] = []
    if not groups:
        return results
    if client is not None:
        from dask.base import tokenize
        from distributed import as_completed as completed_in_turn

        token = tokenize(groups[0][0].output, time.time_ns())
        futures = [client.submit(write_images, list(group), key=f"kernelmap-ingest-{group[0].name}-{token}",
                                 pure=False) for group in groups]
        try:
            for future in completed_in_turn(futures):
                written = future.result()
                results += written
                bar.update(len(written))
        except BaseException:
            client.cancel(futures)
            raise
        return results
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="kernelmap-ingest")
    try:
        futures = [pool.submit(write_images, list(group)) for group in groups]
        for future in as_completed(futures):
            written = future.result()
            results += written
            bar.update(len(written))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return results


def _spec(settings: IngestConfig, path: str, *, source: bool) -> ImageSpec:
    """The planes of the image in ``path``: its HDU, its mask and its noise planes (a source's (the
    reference's, or one of pairs) noise where ``reference_noise``; its mask is kept or dropped by
    :func:`_check`, as its file has it)."""
    mask = noise = None
    if settings.has_mask:
        where = plane_file(settings.mask_file, path) if settings.mask_file else path
        mask = Plane(where, 0 if settings.mask_hdu is None else settings.mask_hdu, "mask")
    kind = settings.noise_kind
    if kind is not None and (settings.reference_noise or not source):
        hdu, template = getattr(settings, f"{kind}_hdu"), getattr(settings, f"{kind}_file")
        noise = Plane(plane_file(template, path) if template else path, 0 if hdu is None else hdu, kind)
    return ImageSpec(Plane(path, settings.hdu, "image"), mask, noise)


def files_read(settings: IngestConfig, files: Sequence[str], sources: Sequence[str] = ()) -> list[str]:
    """Every file an ingest of the target ``files`` (and the ``sources`` of pairs) may read: the reference or
    the sources, the targets, and every plane's file (masks, weights, variances; a source's mask file whether
    it exists or not)."""
    return list(_readers(settings, files, sources))


def _readers(settings: IngestConfig, files: Sequence[str], sources: Sequence[str]
             ) -> dict[str, list[tuple[str, int]]]:
    """:func:`files_read`, each with the images that read it: ``(role, index)`` as the record keeps them
    (the reference ``("source", 0)``)."""
    readers: dict[str, list[tuple[str, int]]] = {}
    first = [settings.reference] if settings.reference is not None else list(sources)
    for role, paths in (("source", first), ("target", files)):
        for i, path in enumerate(paths):
            spec = _spec(settings, path, source=role == "source")
            for plane in (spec.image, spec.mask, spec.noise):
                if plane is not None:
                    readers.setdefault(plane.path, []).append((role, i))
    return readers


def file_identity(path: str) -> dict[str, Any]:
    """What identifies a file read, as typed (``file``): its absolute real path (links followed), its size
    and modification time in ns (both ``None`` where there is no such file)."""
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except OSError:
        return {"file": path, "path": real, "size": None, "mtime_ns": None}
    return {"file": path, "path": real, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _difference(old: dict[str, Any], new: dict[str, Any]) -> tuple[str, str] | None:
    """How a file differs from when the stack was ingested: ``(kind, words)``, kind ``moved``, ``appeared``,
    ``gone``, ``size`` or ``modified``; ``None``: it does not."""
    name = new["file"]
    if old.get("path") != new["path"]:
        return "moved", (f"{name} is now the file {new['path']}, the stack was ingested from {old.get('path')} "
                         "(moved, or another folder)")
    if old.get("size") is None and new["size"] is not None:
        return "appeared", f"{name} exists now, and did not when the stack was ingested"
    if new["size"] is None and old.get("size") is not None:
        return "gone", f"{name} is gone since the stack was ingested"
    if old.get("size") != new["size"]:
        return "size", (f"{name} has another size: {new['size']} bytes, {old.get('size')} when the stack was "
                        "ingested")
    if old.get("mtime_ns") != new["mtime_ns"]:
        return "modified", f"{name} was modified since the stack was ingested"
    return None


def _compare_files(plan: IngestPlan, stored: Any, job: bool) -> list[str]:
    """Refuse a stack (complete or partial) ingested from other files than ``plan`` reads now (by
    :data:`FILES`, ``stored``), naming the first that differs and how.  A file changed in place (another size,
    modified) whose images are none of them recorded written yet is let through: returns those files."""
    now = plan.identities
    readers = _readers(plan.settings, plan.files, plan.sources)
    where, fix = _where_and_fix(plan.output, job)
    if len(stored) != len(now):
        raise OptionError(f"{where} was ingested from {len(stored)} file(s), this ingest reads {len(now)}: "
                          f"nothing was changed; {fix}")
    written = _written(plan.output) if plan.state == "partial" else None
    changed = []
    for old, new in zip(stored, now):
        found = _difference(old, new)
        if found is None:
            continue
        kind, words = found
        if (kind in ("size", "modified") and written is not None
                and not any(written[role][i] for role, i in readers[new["file"]])):
            changed.append(new["file"])  # its images not written yet: read now
            continue
        raise OptionError(f"{where} was ingested from other files than these: {words}: nothing was changed; {fix}")
    return changed


def _where_and_fix(out: str, job: bool) -> tuple[str, str]:
    """The output and the fix, in the refusal of a stack ingested from other files."""
    if job:
        return f"input.path {out}", "remove it to write it again from these files, or point input.path elsewhere"
    return out, "use --overwrite (mode='overwrite') to write it again from these files, or another output path"


def _check_changed(plan: IngestPlan, changed: Sequence[str], job: bool) -> None:
    """Refuse resuming a stack where a file changed in place (of images not written yet) now gives the stack
    another grid, header keys or resampling than it was created with."""
    import zarr

    group = zarr.open_group(plan.output, mode="r")
    attrs = group.attrs
    differs = None
    if plan.attrs.get("reference_wcs") != attrs.get("reference_wcs"):
        differs = "WCS of the stack's grid"
    elif tuple(group["target"].shape[-2:]) != tuple(plan.shape):
        differs = "size of the stack's grid"
    elif list(attrs.get("resampled_targets", [])) != plan.resampled or (
            plan.sources and list(attrs.get("resampled_sources", [])) != plan.resampled_sources):
        differs = "set of files resampled onto the grid"
    else:
        for key, (_, values) in plan.coords.items():
            if np.asarray(group[key][...]).tolist() != np.asarray(values).tolist():
                differs = f"value of the header key {key}" if key != "image" else "labels"
                break
    if differs is not None:
        where, fix = _where_and_fix(plan.output, job)
        raise OptionError(f"{where}: {changed[0]} was changed since the stack was created (before its image was "
                          f"written), and the files now give another {differs}: nothing was changed; {fix}")


def _check_output_apart(out: str, inputs: Sequence[str], job: bool) -> None:
    """Refuse an output that is one of the ``inputs`` or a folder holding one (writing the stack would
    remove it), by their absolute paths and by where their links lead."""
    where = f"input.path {out}" if job else out
    fix = "point input.path elsewhere" if job else "give another output path (--out)"
    for path in inputs:
        if same_path(path, out):
            raise OptionError(f"{where} is one of the input files: nothing was changed; {fix}")
        if path_within(path, out):
            raise OptionError(f"{where} holds the input file {path}: writing the stack there would "
                              f"remove it: nothing was changed; {fix}")


def _pair_sources(settings: IngestConfig, files: Sequence[str]) -> list[str]:
    """The source files of pairs, one per target of ``files``, in order (none without pairs).

    Raises
    ------
    InputError
        The sources match another number of files than the targets.
    """
    if not settings.pairs:
        return []
    sources = expand_files(settings.sources or [])
    n, m = len(sources), len(files)
    if n != m:
        unmatched = (f"the first target without a source is {files[n]}" if n < m else
                     f"the first source without a target is {sources[m]}")
        raise InputError(f"the sources match {n} file(s), the targets {m}: pairs need one source per target, "
                         f"matched in order; {unmatched}: give as many sources as targets")
    return sources


def _check_labels(files: Sequence[str]) -> None:
    """Refuse targets whose labels (file names without their FITS suffixes) are not distinct."""
    seen: dict[str, str] = {}
    for path in files:
        label = file_stem(path)
        if label in seen:
            same = os.path.abspath(seen[label]) == os.path.abspath(path)
            raise InputError(f"targets {seen[label]} and {path} " + ("are the same file" if same else
                             f"both get the image label {label!r} (the file name without its FITS suffixes)")
                             + ": the stack's images need distinct labels: "
                             + ("give each file once" if same else "rename one of them, or leave one out"))
        seen[label] = path


def _not_ours(out: str, create: bool, job: bool = False) -> str:
    """The refusal of an output that kernelmap ingest did not write."""
    if job:
        return (f"input.path {out} exists and is not a stack written by kernelmap ingest: nothing was changed; "
                "remove it yourself or point input.path elsewhere")
    return (f"{out} {'already exists and ' if create else ''}is not a stack written by kernelmap ingest: nothing "
            "was changed; remove it yourself or choose another --out")


def _refuse_other(out: str, mode: str, job: bool) -> None:
    """Refuse what is at ``out`` (state ``other``) unless ``mode="overwrite"`` and kernelmap ingest wrote it."""
    kind = stack_kind(out)
    if kind == "foreign":
        raise OptionError(_not_ours(out, mode == "create", job))
    if mode == "overwrite":
        return
    if job:
        if kind == "unfinished":
            raise OptionError(f"input.path {out} is a stack whose creation by kernelmap ingest did not finish "
                              "(it may have been interrupted), with another ingest section: nothing was changed; "
                              "remove it, or point input.path elsewhere")
        raise OptionError(f"input.path {out} exists but was not written from this ingest section: nothing was "
                          "changed; remove it, or point input.path elsewhere")
    if kind == "unfinished":
        raise OptionError(f"{out} is a stack whose creation by kernelmap ingest did not finish (it may have been "
                          "interrupted), begun with other settings or by an earlier version: nothing was changed; "
                          "use --overwrite (mode='overwrite') to write it anew, or another output path")
    raise OptionError(f"{out} already exists: nothing was changed; it is not a stack ingested with these "
                      "settings: use --overwrite (mode='overwrite') to replace it, or another output path")


def plan_ingest(settings: IngestConfig, output: str | os.PathLike[str], *, mode: str = "create",
                attrs: dict[str, Any] | None = None, job: bool = False) -> IngestPlan:
    """Check an ingest from every file's headers; nothing is written.

    ``job``: for a job's ``ingest`` section (``input.path``), whose messages say so.

    Raises
    ------
    OptionError
        The output is a URL, one of the files the ingest reads or a folder holding one; it exists and is not
        a stack of this ingest (``mode="create"``), or was ingested from other files than the targets (or
        sources) match now, or from files that differ from these (by real path, size or modification time:
        :data:`FILES`); it exists and kernelmap ingest did not write it (any mode: it is never removed).
    InputError
        A file, an HDU or a header key is missing; two targets get one label; the sources of pairs match
        another number of files than the targets; a plane is not 2-D or not shaped like its image; a float
        mask with ``mask_bits``; an image is off the grid of the reference (or of the first source of pairs)
        (without ``reproject``: saying how far) or, with it, has no celestial WCS or does not overlap it;
        the grid's file has a celestial WCS and an image on its grid none, or the other way round.
    """
    if mode not in ("create", "overwrite"):
        raise OptionError(f"mode={mode!r}: use 'create' or 'overwrite'")
    out = os.fspath(output)
    if "://" in out:
        raise OptionError(f"{out}: ingest writes a local stack; write it to a local path, then copy it")
    files = expand_files(settings.targets)
    sources = _pair_sources(settings, files)
    _check_output_apart(out, files_read(settings, files, sources), job)
    check_writable(out, f"{'input.path' if job else '--out'} {out}")
    _check_labels(files)
    held = lock_refusal(out, f"{'input.path ' if job else ''}{out}")
    if held is not None:
        raise held
    found = [x for x in leftovers(out) if x.kind == "new"]
    if found and mode != "overwrite":
        raise OptionError(f"{'input.path ' if job else ''}{out}: an interrupted overwrite left "
                          f"{found[0].describe()}: nothing was changed; "
                          + ("remove it" if job else "use --overwrite (mode='overwrite') to write the stack anew")
                          + f" ({out} keeps the stack written before)")
    state = stack_state(out, settings.stamp())
    if state == "other":
        _refuse_other(out, mode, job)
    plan = IngestPlan(settings, out, state, mode, files, attrs=dict(attrs or {}), sources=sources,
                      identities=[file_identity(path) for path in files_read(settings, files, sources)])
    changed: list[str] = []
    if state in ("complete", "partial") and mode == "create":
        import zarr

        stack_attrs = zarr.open_group(out, mode="r").attrs
        for role, now in (("target", files), ("source", sources)):
            stored = list(stack_attrs.get(f"{role}s", now))
            if stored != now:
                raise OptionError(f"{'input.path ' if job else ''}{out} was ingested from {len(stored)} {role} "
                                  f"file(s); the {role}s now match {len(now)}, not the same: nothing was changed; "
                                  "replace it " + ("(remove it)" if job else "(--overwrite, mode='overwrite')")
                                  + " or write the stack elsewhere")
        stored = _recorded_files(out)
        if stored is not None:  # (a stack ingested before the files were identified is taken as before)
            changed = _compare_files(plan, stored, job)
            plan.refresh_files = bool(changed)
        if state == "complete":
            return plan
    _check(plan)
    if changed:
        _check_changed(plan, changed, job)
    return plan


@dataclass(frozen=True)
class _Grid:
    """The stack's pixel grid: the file it is of (the reference, or the first source of pairs), its header
    and celestial WCS, its shape, and what the messages call it."""

    path: str
    header: Any
    wcs: Any
    shape: tuple[int, int]
    name: str  #: ``"reference"`` or ``"first source"``
    images: str  #: what must be on it, in messages

    @property
    def called(self) -> str:
        return f"the {self.name} {self.path}"


def _check_planes(s: IngestConfig, spec: ImageSpec, shape: tuple[int, int]) -> None:
    """Refuse a mask or noise plane not shaped like its image, or a float mask with ``mask_bits``."""
    for extra in (spec.mask, spec.noise):
        if extra is not None:
            header = check_plane_shape(extra, spec.image, shape)
            if extra is spec.mask:
                check_mask_bits(extra, header, s.mask_bits)


def _without_mask(spec: ImageSpec) -> str | None:
    """Why a source has no mask plane (``None``: it has one): no such file, or no such HDU in it."""
    m = spec.mask
    if m is None or plane_exists(m):
        return None
    return f"no file {m.path}" if not os.path.exists(m.path) else f"no HDU {m.hdu!r} in {m.path}"


def _place(s: IngestConfig, grid: _Grid, path: str, own: tuple[int, int], header: Any, role: str
           ) -> Resampling | None:
    """How the image of ``path`` (``own`` shape, ``header``; a ``role``, ``"source"`` or ``"target"``)
    comes onto the stack's grid: as it is (``None``) or resampled (``reproject``); else refused."""
    wcs = celestial_wcs(header)
    if own == grid.shape and (grid.wcs is None) != (wcs is None) and not s.reproject:
        raise InputError(_one_wcs(grid, path, role, grid.wcs is None))
    offset = grid_offset(grid.header, header, own) if own == grid.shape else float("inf")
    if offset > s.tolerance and s.reproject:
        if grid.wcs is None or wcs is None:
            which = grid.path if grid.wcs is None else path
            raise InputError(f"{which} has no celestial WCS: reproject resamples {grid.images} off the "
                             f"{grid.name}'s grid ({path} is one) onto it by their WCS; give files with one")
        if not footprint_overlaps(grid.header, grid.shape, header, own):
            raise InputError(f"{path} does not overlap {grid.called} on the sky: leave it out "
                             + ("of the targets" if grid.name == "reference" else "(and its pair)"))
        return Resampling(wcs, grid.wcs, grid.shape)
    if own != grid.shape:
        raise InputError(f"{path} is {own[0]}x{own[1]} px, {grid.called} {grid.shape[0]}x{grid.shape[1]}: "
                         f"{grid.images} must be on the {grid.name}'s pixel grid (resample them onto it: "
                         "reproject: true, or --reproject)")
    if offset > s.tolerance:
        raise InputError(f"{path} is not on the {grid.name}'s pixel grid: its WCS puts the image's corners and "
                         f"centre up to {offset:.3g} px from the {grid.name}'s (tolerance {s.tolerance:g} px); "
                         f"resample it onto the {grid.name}'s grid (reproject: true, or --reproject), or raise "
                         "the tolerance")
    return None


def _check(plan: IngestPlan) -> None:
    """Read every file's headers; fill the plan's tasks, coordinates, shape and attributes.  Every image goes
    onto one pixel grid: the reference's, or for pairs the first source's."""
    s, out = plan.settings, plan.output
    variances = s.variance_arrays()
    pairs = s.pairs
    first = plan.sources[0] if pairs else s.reference
    first_spec = _spec(s, first, source=True)
    shape, first_header = inspect_plane(first_spec.image)
    grid = _Grid(first, first_header, celestial_wcs(first_header), shape,
                 "first source" if pairs else "reference", "every source and target" if pairs else "the targets")
    plan.shape = shape
    unmasked: list[tuple[str, str]] = []  # sources without a mask plane, and why

    def source_spec(path: str) -> ImageSpec:
        spec = _spec(s, path, source=True)
        why = _without_mask(spec)
        if why is None:
            return spec
        # a source (often a coadd) made otherwise than the targets: its NaNs are its only bad pixels
        unmasked.append((path, why))
        return ImageSpec(spec.image, None, spec.noise)

    if not pairs:
        spec = source_spec(first)
        _check_planes(s, spec, shape)
        plan.tasks = [ImageTask(out, None, spec, s.mask_bits, variance="source" in variances, role="source")]
    headers = []
    for i, path in enumerate(plan.files):
        if pairs:
            source = plan.sources[i]
            spec = source_spec(source)
            own, header = (shape, first_header) if i == 0 else inspect_plane(spec.image)
            _check_planes(s, spec, own)
            resample = None if i == 0 else _place(s, grid, source, own, header, "source")
            if resample is not None:
                plan.resampled_sources.append(source)
            plan.tasks.append(ImageTask(out, i, spec, s.mask_bits, variance="source" in variances,
                                        resample=resample, role="source"))
        spec = _spec(s, path, source=False)
        own, header = inspect_plane(spec.image)
        _check_planes(s, spec, own)
        resample = _place(s, grid, path, own, header, "target")
        if resample is not None:
            plan.resampled.append(path)
        headers.append(header)
        plan.tasks.append(ImageTask(out, i, spec, s.mask_bits, mask=s.has_mask, variance="target" in variances,
                                    resample=resample))
    if unmasked:
        path, why = unmasked[0]
        if not pairs:
            plan.notes.append(f"the reference {path} has no mask ({why}): its bad pixels are its NaN pixels only")
        else:
            plan.notes.append(f"{len(unmasked)} of the {len(plan.sources)} source(s) have no mask (the first: "
                              f"{path}, {why}): their bad pixels are their NaN pixels only")
    plan.coords = _coordinates(plan.files, headers, s.keys)
    plan.attrs["reference_wcs"] = wcs_text(first_header)


def _one_wcs(grid: _Grid, path: str, role: str, image_has: bool) -> str:
    """The refusal of an image shaped like the grid's where only one of the two has a celestial WCS."""
    theirs = "the targets" if grid.name == "reference" else "the images"
    grid_words = f"the {grid.name}'s"
    if image_has:
        return (f"{grid.called} has no celestial WCS, the {role} {path} has one: whether the {role} is "
                f"on {grid_words} pixel grid cannot be told; give {grid.called} its WCS (an image off its grid "
                "is then found, and resampled with reproject: true, or --reproject), or give no file a WCS ("
                f"{theirs} are then taken to be on {grid_words} grid)")
    return (f"the {role} {path} has no celestial WCS, {grid.called} has one: where its pixels lie on "
            f"{grid_words} grid cannot be told; give it the WCS of its own pixel grid (it is then checked, and "
            "resampled with reproject: true, or --reproject, where it is off the grid), or, if it is on "
            f"{grid_words} grid, {grid_words} WCS")


def _coordinates(files: Sequence[str], headers: Sequence[Any], keys: Sequence[str]) -> dict[str, Any]:
    """The labels (file names without their FITS suffixes, distinct: :func:`_check_labels`) and the header
    keys along ``image``; text as variable-length strings."""
    coords: dict[str, Any] = {"image": ("image", np.array([file_stem(p) for p in files], dtype=object))}
    for key in keys:
        values = [header.get(key) for header in headers]
        missing = [path for path, v in zip(files, values) if v is None]
        if missing:
            raise InputError(f"header key {key!r} is missing in {missing[0]}"
                             + (f" and {len(missing) - 1} other file(s)" if len(missing) > 1 else "")
                             + ": give only keys every target has")
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        coords[key] = ("image", np.asarray(values, dtype=np.float64) if numeric
                       else np.array([str(v) for v in values], dtype=object))
    return coords


def ingest_fits(reference: str | os.PathLike[str] | None, targets: Sequence[str | os.PathLike[str]],
                output: str | os.PathLike[str], *, mode: str = "create", workers: int = 1, client: Any = None,
                progress: bool = False, attrs: dict[str, Any] | None = None, log: Callable[[str], None] = print,
                **options: Any) -> IngestSummary:
    """Write the FITS ``reference`` and ``targets`` (paths or glob patterns) to a Zarr input stack at ``output``;
    or pairs: ``reference`` ``None`` and ``sources=[...]`` (paths or glob patterns, one file per target, in
    order), the stack's ``source`` then ``(image, y, x)``.

    ``options`` are the settings of the job file's ``ingest`` section (:class:`~pipeline.job.config.IngestConfig`:
    ``sources``, ``hdu``, ``mask_hdu``, ``mask_file``, ``mask_bits``, ``weight_hdu``, ``weight_file``, ``variance_hdu``,
    ``variance_file``, ``reference_noise``, ``keys``, ``tolerance``, ``reproject``, ``chunk``).  Every file's
    headers are read and checked before anything is written; the images are then written by one task per image
    (or per Zarr shard of small images), on ``client`` or in ``workers`` threads.  ``mode="create"`` refuses an
    existing output unless it is a stack of this same ingest from the same files (:func:`file_identity`), which
    is finished (or left as it is, complete; created anew where its creation was interrupted); an empty folder
    is kept and the stack created in it; ``"overwrite"`` replaces it, only if kernelmap ingest wrote it
    (:func:`stack_kind`).  An output that is one of the files read, or a folder holding one, is refused in
    either mode.
    ``attrs``: more root attributes.

    Raises
    ------
    ConfigError
        An option is invalid.
    OptionError, InputError
        See :func:`plan_ingest` and :func:`write_images`.
    """
    options = {k: list(v) if isinstance(v, (tuple, list)) else v for k, v in options.items()}
    if "sources" in options and options["sources"] is not None:
        options["sources"] = [os.fspath(p) for p in options["sources"]]
    settings = IngestConfig.from_options(None if reference is None else os.fspath(reference),
                                         [os.fspath(t) for t in targets], **options)
    plan = plan_ingest(settings, output, mode=mode, attrs=attrs)
    return plan.execute(client=client, workers=workers, progress=progress, log=log)


def job_ingest_plan(job: JobConfig) -> IngestPlan:
    """The plan of a job's ``ingest`` section (:func:`plan_ingest` to ``input.path``).

    Raises
    ------
    OptionError
        ``input.path`` holds something else than a stack of this ingest section (and its files), or is (or
        holds) one of the files the section reads.
    """
    try:
        return plan_ingest(job.ingest, job.input.path, job=True)
    except OptionError as exc:
        raise OptionError(f"ingest: {exc}") from None


def ingested_input(job: JobConfig, log: Callable[[str], None] = print, *, client: Any = None,
                   stack: ExitStack | None = None, progress: bool = False) -> Any:
    """Write the job's ``ingest`` FITS files to ``input.path`` unless a stack ingested from the same settings
    and files is there; finish one left unfinished.  A stack made otherwise at ``input.path`` is refused.

    The images are written where the job's tasks run: on ``client`` if given, else on the cluster of
    ``compute.scheduler`` (:func:`~pipeline.job.executors.connect`, started on ``stack`` once every file is
    checked, so that the run can go on with it), or in threads.  Returns the client for the run: ``client``,
    the one started, or ``None``.
    """
    from .executors import connect

    if job.ingest is None:
        return client
    path = job.input.path
    plan = job_ingest_plan(job)
    if plan.complete:
        log(f"ingest: the stack at {path} was written from these FITS files already")
        return client
    c = job.compute
    if client is None and stack is not None:
        client = connect(job, stack, log)()
    workers = 1 if c.scheduler == "synchronous" else c.n_workers * c.threads_per_worker
    plan.execute(client=client, workers=workers, progress=progress, log=log)
    return client
