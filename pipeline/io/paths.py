"""Whether one place holds another, and whether an output can be written there: output paths are checked
against the inputs and their folders with it.

Local paths are compared as given (made absolute) and where their links
lead, so an alias through a symbolic link is caught; URLs are compared as
text (``file://`` URLs as the local paths they name).  Nothing heavy is
imported: the job's configuration uses it before anything is opened.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import OptionError

__all__ = ["check_writable", "path_within", "same_path", "unwritable_folder"]


def _forms(path: str | os.PathLike[str]) -> tuple[bool, set[str]]:
    """``(is a URL, the forms compared)`` of ``path``."""
    text = os.fspath(path)
    if text.startswith("file://"):
        text = text[len("file://"):]
    if "://" in text:
        return True, {text.rstrip("/")}
    local = os.path.expanduser(text)
    return False, {os.path.abspath(local), os.path.realpath(local)}


def same_path(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Whether ``a`` and ``b`` name the same place (as given or where links lead)."""
    (_, forms_a), (_, forms_b) = _forms(a), _forms(b)
    return bool(forms_a & forms_b)


def path_within(inner: str | os.PathLike[str], outer: str | os.PathLike[str]) -> bool:
    """Whether ``inner`` is ``outer`` or lies inside it (as given or where links lead)."""
    (url_a, forms_a), (url_b, forms_b) = _forms(inner), _forms(outer)
    if url_a != url_b:
        return False
    if url_a:
        return any(a == b or a.startswith(b + "/") for a in forms_a for b in forms_b)
    return any(a == b or Path(b) in Path(a).parents for a in forms_a for b in forms_b)


def unwritable_folder(path: str | os.PathLike[str]) -> tuple[str, str] | None:
    """For a local ``path``: ``(folder, why)`` where the nearest of ``path`` and its parents that exists is a
    folder nothing can be written in (a read-only file system, or no permission), else ``None`` (also for
    URLs, and where that nearest one is a file: what is there is refused elsewhere)."""
    text = os.fspath(path)
    if text.startswith("file://"):
        text = text[len("file://"):]
    if "://" in text:
        return None
    here = Path(os.path.expanduser(text)).absolute()
    for place in (here, *here.parents):
        if not place.exists():
            continue
        if not place.is_dir():
            return None
        if os.statvfs(place).f_flag & os.ST_RDONLY:
            return str(place), "is on a read-only file system"
        if not os.access(place, os.W_OK | os.X_OK):
            return str(place), "is not writable by this user"
        return None
    return None


def check_writable(path: str | os.PathLike[str], what: str) -> None:
    """Refuse (:class:`~pipeline.errors.OptionError`) an output at ``path`` (``what`` names it in the message,
    e.g. ``output.path kernels.zarr``) whose folder cannot be written (:func:`unwritable_folder`); reads
    only."""
    found = unwritable_folder(path)
    if found is not None:
        folder, why = found
        raise OptionError(f"{what}: {folder} {why}, so nothing can be written there: nothing was changed; choose "
                          "another output path (or make that folder writable)")
