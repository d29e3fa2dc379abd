"""Shared helpers of the hostile-input cases: the "nothing changed" check, small stacks and job files, a
read-only mount, and the run of a command that must be refused."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import job_dict
from stacks import make_stack

from pipeline.cli import main

#: The stacks of these cases: 2 images of 64x64 px, tiles of 32 px, a 7x7 kernel, chunks of 32 px.
SIZE, TILE, KERNEL, CHUNK = 64, 32, 7, 32


def small_stack(path: Path, **kwargs: Any) -> dict:
    """A valid two-image stack at ``path`` (``tests/stacks.make_stack``), small enough for a quick run."""
    options = {"n_images": 2, "size": SIZE, "tile": TILE, "chunk": CHUNK, "k": KERNEL, **kwargs}
    return make_stack(path, **options)


def job_file(folder: Path, text: str | None = None, **sections: dict[str, Any]) -> Path:
    """``folder/job.yaml``: ``text`` as given, else the small synchronous job on ``folder/stack.zarr`` with
    ``sections`` on top (``tests/conftest.job_dict``)."""
    path = folder / "job.yaml"
    if text is None:
        base = job_dict(folder, tiles={"size": TILE})
        base["kernel"] = {"size": KERNEL}
        text = yaml.safe_dump(job_dict(folder, base=base, **sections))
    path.write_text(text)
    return path


def snapshot(*roots: Path) -> dict[str, tuple]:
    """Every file and folder under ``roots`` (not following links): a file's kind, size, modification time
    and SHA-256 of its bytes; a folder's entries and modification time; a link's target; other things
    (pipes) their kind.  Two snapshots are equal only where nothing was created, removed or written."""
    found: dict[str, tuple] = {}

    def visit(path: Path) -> None:
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode):
            found[str(path)] = ("link", os.readlink(path))
        elif stat.S_ISDIR(info.st_mode):
            entries = sorted(os.listdir(path))
            found[str(path)] = ("folder", tuple(entries), info.st_mtime_ns)
            for entry in entries:
                visit(path / entry)
        elif stat.S_ISREG(info.st_mode):
            found[str(path)] = ("file", info.st_size, info.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
        else:
            found[str(path)] = ("other", stat.S_IFMT(info.st_mode))

    for root in roots:
        if os.path.lexists(root):
            visit(root)
        else:
            found[str(root)] = ("absent",)
    return found


def assert_unchanged(before: dict[str, tuple], after: dict[str, tuple]) -> None:
    """Fail naming what was created, removed or changed between two :func:`snapshot` s."""
    created = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(p for p in set(before) & set(after) if before[p] != after[p])
    assert not (created or removed or changed), f"created {created}, removed {removed}, changed {changed}"


@dataclass
class Refusal:
    """What a refused command said: its exit status, stdout and stderr."""

    status: int
    out: str
    err: str


def refused(capsys: pytest.CaptureFixture[str], argv: Sequence[str], *, watch: Sequence[Path],
            status: int = 2) -> Refusal:
    """Run ``kernelmap ARGV`` in this process; assert its exit status (2: refused), no traceback, and that
    nothing under ``watch`` (the inputs and where the output would go) was created, removed or written."""
    capsys.readouterr()
    before = snapshot(*watch)
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert code == status, f"exit status {code}, expected {status}; stderr: {err}"
    assert "Traceback" not in err and "Traceback" not in out
    assert_unchanged(before, snapshot(*watch))
    return Refusal(code, out, err)


def raises_exactly(cls: type[BaseException], call: Callable[[], Any], *, watch: Sequence[Path]) -> BaseException:
    """Call the API; assert it raises ``cls`` itself (not a subclass, not another class) and changes nothing
    under ``watch``; return the exception."""
    before = snapshot(*watch)
    with pytest.raises(BaseException) as info:
        call()
    assert type(info.value) is cls, f"{type(info.value).__name__}: {info.value}"
    assert_unchanged(before, snapshot(*watch))
    return info.value


@contextmanager
def read_only(folder: Path) -> Iterator[Path]:
    """``folder`` made read-only by a read-only bind mount of itself (chmod would not stop root), unmounted
    after; the test is skipped, saying why, where mounting is not permitted."""
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"a read-only folder needs a bind mount, which is not permitted here: {done.stderr.strip()}")
    try:
        done = subprocess.run(["mount", "-o", "remount,ro,bind", str(folder)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"remounting a bind mount read-only is not permitted here: {done.stderr.strip()}")
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


@dataclass(frozen=True)
class Case:
    """One hostile case: ``build(tmp_path)`` writes the hostile input and returns the command line; the
    refusal's stderr must hold every one of ``names`` (the problem: the array, key, path or value) and of
    ``fixes`` (the remedy), and the API call ``api(tmp_path)`` must raise ``error`` itself."""

    id: str
    build: Callable[[Path], list[str]]
    error: type[BaseException]
    names: tuple[str, ...]
    fixes: tuple[str, ...]
    api: Callable[[Path], Any] | None = None
    marks: tuple[Any, ...] = field(default=())

    def param(self) -> Any:
        return pytest.param(self, id=self.id, marks=self.marks)


def check_case(case: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Refusal:
    """Build the case, run its command (refused, nothing changed), then its API call (the exact class)."""
    argv = case.build(tmp_path)
    result = refused(capsys, argv, watch=[tmp_path])
    text = result.err.replace(str(tmp_path) + os.sep, "")
    for name in case.names:
        assert name in result.err or name in text, f"{name!r} not in: {result.err}"
    for fix in case.fixes:
        assert fix in result.err, f"the fix {fix!r} not in: {result.err}"
    if case.api is not None:
        error = raises_exactly(case.error, lambda: case.api(tmp_path), watch=[tmp_path])
        assert all(name in str(error) or name in str(error).replace(str(tmp_path) + os.sep, "")
                   for name in case.names), str(error)
    return result


@pytest.fixture(scope="session")
def made_map(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the small stack (``stack.zarr``), its job (``job.yaml``) and the kernel map a run of
    it wrote (``kernels.zarr``); copy it, never write into it."""
    from pipeline.job.run import run_job

    folder = tmp_path_factory.mktemp("made")
    small_stack(folder / "stack.zarr")
    run_job(job_file(folder), progress=False)
    return folder


@pytest.fixture
def with_map(made_map: Path, tmp_path: Path) -> Path:
    """``tmp_path`` holding a copy of :func:`made_map` (stack, job and kernel map)."""
    for name in ("stack.zarr", "kernels.zarr"):
        shutil.copytree(made_map / name, tmp_path / name)
    job_file(tmp_path)  # the same job, on the copy
    return tmp_path
