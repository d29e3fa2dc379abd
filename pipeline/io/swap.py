"""Replacing an output only once its replacement is complete: write beside it, then swap.

An output at ``PATH`` (a folder: a Zarr store, a report; or a file) is
replaced by writing the new one to a sibling, ``PATH.kernelmap-new-<token>``
(:func:`new_sibling`: the same folder, so the same filesystem), and only once
it is complete swapping it into place (:func:`swap_into_place`).  The swap
writes a marker file into the new folder (:data:`MARKER`, naming where the
old result goes), exchanges the two paths in one atomic step (Linux
``renameat2(RENAME_EXCHANGE)``: ``PATH`` holds the new result, the sibling the
old), removes the old and then the marker.  A crash at any moment therefore
leaves either the old or the new result readable at ``PATH``, and perhaps a
sibling (:func:`leftovers` tells what each holds):

- ``new``: a replacement not yet swapped in (complete where it has the
  marker); the caller resumes it or removes it;
- ``old``: the earlier result set aside by a swap (``PATH`` holds the
  marker naming it, or it is named ``PATH.kernelmap-old-<token>``): always
  safe to remove (:func:`discard`);
- ``creating``: a new output whose setting up was cut short
  (:func:`created_in_place`): always safe to remove.

Where the filesystem cannot exchange two paths (not Linux, or a filesystem
without ``RENAME_EXCHANGE``), the old result is renamed aside
(``PATH.kernelmap-old-<token>``) and the new one into place: two renames, between
which ``PATH`` is missing for an instant; :func:`leftovers` then reports the
marked sibling as ``new`` and complete, and resuming it puts it in place.

URLs (object stores, where nothing is renamed atomically) are swapped by
removing the old result and moving the new one (a copy of every object, then
their removal): not atomic, and not used by ``kernelmap run`` (which replaces
a URL output in place, as it always has).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import uuid
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CREATING", "MARKER", "NEW", "OLD", "Leftover", "created_in_place", "discard", "is_url", "leftovers",
           "new_sibling", "swap_into_place", "tidy"]

#: What a replacement's sibling is named: ``PATH`` + ``NEW`` + a token.
NEW = ".kernelmap-new-"
#: What the earlier result set aside is named where paths cannot be exchanged: ``PATH`` + ``OLD`` + a token.
OLD = ".kernelmap-old-"
#: Where a new output is set up before it is renamed into place (:func:`created_in_place`): ``PATH`` +
#: ``CREATING`` + a token; one left by a command stopped while setting up is never needed again.
CREATING = ".kernelmap-creating-"
#: The file a swap writes into the new result just before it goes into place (JSON: ``{"aside": NAME}``,
#: the sibling that then holds the old result), removed once the old result is.
MARKER = ".kernelmap-swap"

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def is_url(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a URL other than ``file://`` (an object store: nothing is renamed atomically)."""
    text = os.fspath(path)
    return "://" in text and not text.startswith("file://")


def _local(path: str | os.PathLike[str]) -> str:
    text = os.fspath(path)
    if text.startswith("file://"):
        text = text[len("file://"):]
    return os.path.abspath(text)


def new_sibling(path: str | os.PathLike[str]) -> str:
    """A fresh sibling of ``path`` to write its replacement into: ``PATH.kernelmap-new-<token>``."""
    text = os.fspath(path)
    return f"{text.rstrip('/') if is_url(text) else _local(text)}{NEW}{uuid.uuid4().hex[:12]}"


@dataclass(frozen=True)
class Leftover:
    """A sibling of an output left by an interrupted replacement or creation.

    ``kind``: ``"new"`` (a replacement not yet in place; ``ready`` where it is complete, its swap begun),
    ``"old"`` (the earlier result, set aside: safe to remove) or ``"creating"`` (a new output not set up
    whole: safe to remove)."""

    path: str
    kind: str
    ready: bool = False

    def describe(self) -> str:
        if self.kind == "old":
            return f"{self.path} (the earlier result, set aside by an interrupted replacement)"
        if self.kind == "creating":
            return f"{self.path} (a new output whose setting up was interrupted)"
        state = "complete, not yet swapped in" if self.ready else "not complete"
        return f"{self.path} (the replacement an interrupted overwrite was writing: {state})"


def _marker(folder: str) -> dict[str, str] | None:
    try:
        with open(os.path.join(folder, MARKER), encoding="utf-8") as file:
            return json.load(file)
    except (OSError, ValueError):
        return None


def leftovers(path: str | os.PathLike[str]) -> list[Leftover]:
    """The siblings of the local output ``path`` that an interrupted replacement left, sorted by name
    (none for a URL); reads only."""
    if is_url(path):
        return []
    where = Path(_local(path))
    parent, name = where.parent, where.name
    try:
        names = sorted(entry for entry in os.listdir(parent) if entry.startswith(name + ".kernelmap-"))
    except OSError:
        return []
    done = _marker(str(where)) if where.is_dir() else None
    aside = done.get("aside") if done else None
    found = []
    for entry in names:
        full = str(parent / entry)
        if entry.startswith(name + OLD) or entry == aside:
            found.append(Leftover(full, "old"))
        elif entry.startswith(name + CREATING):
            found.append(Leftover(full, "creating"))
        elif entry.startswith(name + NEW):
            found.append(Leftover(full, "new", ready=os.path.isdir(full) and _marker(full) is not None))
    return found


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def discard(leftover: Leftover | str) -> None:
    """Remove a leftover sibling (and, for the old result a swap set aside, the marker in the output it
    names)."""
    where = leftover.path if isinstance(leftover, Leftover) else leftover
    _remove(where)
    for entry in (NEW, OLD):
        if entry in os.path.basename(where):
            output = where[: where.rindex(entry)]
            marker = _marker(output)
            if marker is not None and marker.get("aside") == os.path.basename(where):
                with suppress(FileNotFoundError):
                    os.remove(os.path.join(output, MARKER))


def tidy(path: str | os.PathLike[str], log: Callable[[str], None] = print) -> list[Leftover]:
    """Remove what an interrupted replacement of the local output ``path`` left that is never needed again:
    the earlier result set aside (saying so), and a marker whose old result is gone; returns the
    replacements left (``new`` leftovers), for the caller to resume or remove."""
    found = leftovers(path)
    for leftover in found:
        if leftover.kind in ("old", "creating"):
            log(f"removing {leftover.describe()}")
            discard(leftover)
    if not is_url(path):
        output = _local(os.fspath(path))
        marker = _marker(output) if os.path.isdir(output) else None
        if marker is not None and not os.path.lexists(os.path.join(os.path.dirname(output),
                                                                   str(marker.get("aside")))):
            with suppress(FileNotFoundError):
                os.remove(os.path.join(output, MARKER))
    return [leftover for leftover in found if leftover.kind == "new"]


def created_in_place(path: str | os.PathLike[str], create: Callable[[str], None]) -> None:
    """Set up a new local output at ``path`` as a whole: ``create(staging)`` writes it at a sibling
    (``PATH.kernelmap-creating-<token>``), which is then renamed to ``path`` (an empty folder there is
    replaced), so a command stopped while setting up leaves nothing at ``path``; the sibling is removed
    where ``create`` fails.  A URL is created in place."""
    if is_url(path):
        create(os.fspath(path))
        return
    target = _local(path)
    staging = f"{target}{CREATING}{uuid.uuid4().hex[:12]}"
    try:
        create(staging)
        os.rename(staging, target)
    except BaseException:
        with suppress(OSError):
            _remove(staging)
        raise


def _exchange(a: str, b: str) -> bool:
    """Exchange the paths ``a`` and ``b`` atomically; ``False`` where the system or filesystem cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), a, None, b)


def swap_into_place(new: str | os.PathLike[str], old: str | os.PathLike[str]) -> None:
    """Put the complete result ``new`` (a sibling of ``old``, e.g. :func:`new_sibling`) in place of ``old``,
    then remove the old result.

    Local paths: ``old`` holds the old or the new result at every moment (an atomic exchange of the two
    paths; see the module's notes for filesystems without one); where ``old`` does not exist ``new`` is
    renamed to it.  URLs: the old result is removed and the new one moved (not atomic).
    """
    new_text, old_text = os.fspath(new), os.fspath(old)
    if is_url(new_text) or is_url(old_text):
        import fsspec

        fs, old_root = fsspec.core.url_to_fs(old_text)
        new_root = fsspec.core.url_to_fs(new_text)[1]
        if fs.exists(old_root):
            fs.rm(old_root, recursive=True)
        fs.mv(new_root, old_root, recursive=True)
        return
    new_path, old_path = _local(new_text), _local(old_text)
    if not os.path.lexists(old_path):
        os.rename(new_path, old_path)
        return
    name = os.path.basename(new_path)
    token = name.split(NEW, 1)[1] if NEW in name else uuid.uuid4().hex[:12]
    folder = os.path.isdir(new_path) and not os.path.islink(new_path)
    exchange_aside = os.path.basename(new_path)  # after an exchange the sibling holds the old result
    fallback_aside = f"{old_path}{OLD}{token}"
    if folder:
        with open(os.path.join(new_path, MARKER), "w", encoding="utf-8") as file:
            json.dump({"aside": exchange_aside}, file)
    if _exchange(new_path, old_path):
        aside = new_path
    else:
        if folder:
            with open(os.path.join(new_path, MARKER), "w", encoding="utf-8") as file:
                json.dump({"aside": os.path.basename(fallback_aside)}, file)
        os.rename(old_path, fallback_aside)
        os.rename(new_path, old_path)
        aside = fallback_aside
    _remove(aside)
    if folder:
        with suppress(FileNotFoundError):
            os.remove(os.path.join(old_path, MARKER))
