"""Whether one place holds another: output paths are checked against the inputs with it.

Local paths are compared as given (made absolute) and where their links
lead, so an alias through a symbolic link is caught; URLs are compared as
text (``file://`` URLs as the local paths they name).  Nothing heavy is
imported: the job's configuration uses it before anything is opened.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["path_within", "same_path"]


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
