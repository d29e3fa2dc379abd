"""One writer at a time per output: a lock file beside it.

A command that writes an output (``kernelmap run``, ``apply``, ``ingest``)
holds ``PATH.kernelmap.lock`` (:func:`lock_path`) while it writes: created
atomically (``O_EXCL``; on an object store a conditional put where the store
supports one), holding JSON with the holder's host, pid, the time it took the
lock, its process's start time, its command line and its batch job (where
it runs in one), and removed when the
command ends, whether it succeeds, fails or is interrupted (Ctrl-C).  Only the
process that runs the command takes it: the workers that write blocks (on this
or other nodes) never touch it.

A second command on the same output is refused before it writes anything
(:class:`~pipeline.errors.OptionError` naming the holder and the fix).  A lock
left by a process that was killed (SIGKILL, a lost node) is stale where it is
known to be: same host, and its pid no longer runs or now belongs to a
process started at another time; or, from another host, it names the batch
job it ran in (``kernelmap submit``'s whole job, a run inside an allocation)
and that batch system, asked from here, no longer lists the job.  A stale
lock is named and taken over (the command says so and goes on); any other
lock from another host cannot be checked and is refused, the message giving
the command that removes it once that run is known to be over.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import sys
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import OptionError
from .swap import is_url

__all__ = ["LOCK_SUFFIX", "LockHolder", "OutputLock", "describe_lock", "held_message", "lock_path", "lock_refusal",
           "read_lock"]

#: The lock of an output at ``PATH`` is ``PATH`` + ``LOCK_SUFFIX``.
LOCK_SUFFIX = ".kernelmap.lock"

#: Seconds two readings of one process's start time may differ by and still be the same process.
_START_TOLERANCE = 1.0


def lock_path(path: str | os.PathLike[str]) -> str:
    """The lock file of the output at ``path`` (a local path, ``file://`` URL or an fsspec URL): beside it."""
    text = os.fspath(path)
    if is_url(text):
        return text.rstrip("/") + LOCK_SUFFIX
    if text.startswith("file://"):
        text = text[len("file://"):]
    return os.path.abspath(text) + LOCK_SUFFIX


def _process_started(pid: int) -> float | None:
    """The start time (seconds since the epoch) of the process ``pid`` on this host; ``None`` where none
    runs."""
    import psutil

    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.Error:
        return float("nan")  # it runs, but its start time cannot be read (another user's): taken as alive


@dataclass(frozen=True)
class LockHolder:
    """What a lock file says of the command that holds it."""

    lock: str  #: the lock file
    host: str
    pid: int
    started: str  #: when it took the lock (UTC, ISO 8601)
    process_started: float  #: its process's start time (seconds since the epoch)
    command: str
    token: str = ""
    #: the batch job the holder runs in, ``system:id`` (e.g. ``slurm:1234``), or empty
    batch: str = ""

    @classmethod
    def mine(cls, lock: str, command: str) -> LockHolder:
        pid = os.getpid()
        return cls(lock, socket.gethostname(), pid, _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                   _process_started(pid) or 0.0, command, uuid.uuid4().hex, _batch_job())

    def to_json(self) -> str:
        return json.dumps({"host": self.host, "pid": self.pid, "started": self.started,
                           "process_started": self.process_started, "command": self.command,
                           "token": self.token, "batch": self.batch}, indent=1) + "\n"

    def describe(self) -> str:
        """``host H, pid P, since T (command C)``, and the batch job it runs in."""
        job = f", {self.batch.replace(':', ' job ', 1)}" if self.batch else ""
        return f"host {self.host}, pid {self.pid}{job}, since {self.started} ({self.command})"

    def stale(self) -> str | None:
        """Why the holder is known to be gone (its host is this one, its pid no longer runs or runs another
        process; or it ran in a batch job that its batch system, asked from here, no longer lists), else
        ``None`` (alive, or not known)."""
        if self.host != socket.gethostname():
            return _batch_job_gone(self.batch)
        now = _process_started(self.pid)
        if now is None:
            return f"pid {self.pid} is no longer running on {self.host}"
        if now == now and abs(now - self.process_started) > _START_TOLERANCE:  # NaN: unreadable, alive
            started = _dt.datetime.fromtimestamp(now, _dt.UTC).isoformat(timespec="seconds")
            return f"pid {self.pid} on {self.host} is now another process (started {started})"
        return None


def _batch_job() -> str:
    """``system:id`` of the batch job this process runs in (its job id variable is set), else empty."""
    from ..job.systems import submit_systems

    for system in submit_systems():
        job_id = os.environ.get(system.job_id_variable or "")
        if job_id:
            return f"{system.name}:{job_id}"
    return ""


def _batch_job_gone(batch: str) -> str | None:
    """Why the batch job ``system:id`` is known to have ended: its batch system, asked from here, definitely
    no longer lists it; ``None`` where it does, or cannot be asked (no such command here, no answer)."""
    import shutil
    import subprocess

    from ..job.systems import BATCH_SYSTEMS_TABLE

    name, _, job_id = batch.partition(":")
    system = BATCH_SYSTEMS_TABLE.get(name)
    if system is None or not job_id or system.status_command is None or system.listed is None:
        return None
    command = system.status(job_id)
    if shutil.which(command[0]) is None:
        return None
    try:
        answer = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if system.listed(answer, job_id):  # listed, or an answer that is no definite "unknown job"
        return None
    return f"its {name} job {job_id} is no longer in the queue ({' '.join(command)})"


def _read_text(lock: str) -> str | None:
    if is_url(lock):
        import fsspec

        fs, root = fsspec.core.url_to_fs(lock)
        try:
            with fs.open(root, "rb") as file:
                return file.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return None
    try:
        with open(lock, encoding="utf-8", errors="replace") as file:
            return file.read()
    except (FileNotFoundError, NotADirectoryError):  # none (or a file where a folder of its path should be)
        return None


def read_lock(path: str | os.PathLike[str]) -> LockHolder | str | None:
    """The holder of the output ``path``'s lock: ``None`` where there is no lock, the lock file's text
    where it cannot be read as one (being written, or damaged)."""
    lock = lock_path(path)
    text = _read_text(lock)
    if text is None:
        return None
    try:
        data: dict[str, Any] = json.loads(text)
        return LockHolder(lock, str(data["host"]), int(data["pid"]), str(data["started"]),
                          float(data["process_started"]), str(data.get("command", "")), str(data.get("token", "")),
                          str(data.get("batch", "")))
    except (ValueError, KeyError, TypeError):
        return text


def _create(lock: str, text: str) -> bool:
    """Create ``lock`` holding ``text`` unless it exists (atomically where the store allows); whether it did."""
    if is_url(lock):
        import fsspec

        fs, root = fsspec.core.url_to_fs(lock)
        try:
            with fs.open(root, "xb") as file:
                file.write(text.encode())
        except FileExistsError:
            return False
        except (ValueError, NotImplementedError):  # no exclusive create on this store: check, then write
            if fs.exists(root):
                return False
            with fs.open(root, "wb") as file:
                file.write(text.encode())
        return True
    os.makedirs(os.path.dirname(os.path.abspath(lock)), exist_ok=True)
    try:
        fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
    except BaseException:  # e.g. a full disk: no empty lock left behind to refuse the next command
        _remove(lock)
        raise
    return True


def _remove(lock: str) -> None:
    if is_url(lock):
        import fsspec

        fs, root = fsspec.core.url_to_fs(lock)
        try:
            fs.rm(root)
        except FileNotFoundError:
            pass
        return
    try:
        os.remove(lock)
    except FileNotFoundError:
        pass


def held_message(what: str, holder: LockHolder | str, lock: str) -> str:
    """The refusal of a command whose output ``what`` (e.g. ``output.path kernels.zarr``) another one
    writes."""
    if isinstance(holder, str):
        return (f"{what} is locked by {lock}, which cannot be read as a kernelmap lock: nothing was changed; "
                f"if no kernelmap command is writing it, remove the lock (rm {lock}) and run again")
    return (f"{what} is being written by another kernelmap command ({holder.describe()}; lock {lock}): nothing was "
            f"changed; wait for it to end or stop it (kill {holder.pid} on {holder.host}); if it is not running "
            f"any more, remove the lock (rm {lock}) and run again")


#: Locks this process holds: lock file -> (thread, depth, holder).
_HELD: dict[str, tuple[int, int, LockHolder]] = {}
_HELD_LOCK = threading.Lock()


class OutputLock:
    """The lock of the output at ``path``, held in a ``with`` block (re-entered by the same thread: a no-op).

    ``what`` names the output in messages (``output.path kernels.zarr``); ``command`` is what the lock file
    says holds it (the command line by default); ``log`` hears of a stale lock taken over.
    """

    def __init__(self, path: str | os.PathLike[str], *, what: str | None = None, command: str | None = None,
                 log: Callable[[str], None] = print) -> None:
        self.path = os.fspath(path)
        self.lock = lock_path(self.path)
        self.what = what or self.path
        self.command = command or (" ".join(["kernelmap", *sys.argv[1:]])
                                   if sys.argv and sys.argv[0] else "python API")
        self.log = log
        self.held = False  #: whether this object holds the lock (:meth:`release` gives back only then)

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock, taking over a stale one (saying so); refused (:class:`OptionError`) where another
        command holds it."""
        thread = threading.get_ident()
        with _HELD_LOCK:
            held = _HELD.get(self.lock)
            if self.held:
                return
            if held is not None and held[0] == thread:
                _HELD[self.lock] = (thread, held[1] + 1, held[2])
                self.held = True
                return
        mine = LockHolder.mine(self.lock, self.command)
        for attempt in range(2):
            if _create(self.lock, mine.to_json()):
                with _HELD_LOCK:
                    _HELD[self.lock] = (thread, 1, mine)
                self.held = True
                return
            holder = read_lock(self.path)
            if holder is None:  # removed meanwhile: try again
                continue
            why = holder.stale() if isinstance(holder, LockHolder) else None
            if why is None or attempt:
                raise OptionError(held_message(self.what, holder, self.lock))
            self.log(f"taking over the stale lock {self.lock} of {holder.describe()}: {why}")
            if read_lock(self.path) == holder:  # not taken over by another command meanwhile
                _remove(self.lock)
        raise OptionError(held_message(self.what, read_lock(self.path) or "", self.lock))

    def release(self) -> None:
        """Give the lock back (the outermost ``with`` removes the file, where it is still this one's)."""
        if not self.held:
            return
        self.held = False
        with _HELD_LOCK:
            held = _HELD.get(self.lock)
            if held is None:
                return
            if held[1] > 1:
                _HELD[self.lock] = (held[0], held[1] - 1, held[2])
                return
            del _HELD[self.lock]
        now = read_lock(self.path)
        if isinstance(now, LockHolder) and now.token == held[2].token:
            _remove(self.lock)


def lock_refusal(path: str | os.PathLike[str], what: str) -> OptionError | None:
    """The refusal of a command about to write the output at ``path`` (``what`` in the message) where another
    command holds its lock (a stale lock, or one this process holds, is none); reads only."""
    holder = read_lock(path)
    if holder is None or (isinstance(holder, LockHolder) and holder.stale() is not None):
        return None
    with _HELD_LOCK:
        held = _HELD.get(lock_path(path))
    if held is not None and isinstance(holder, LockHolder) and holder.token == held[2].token:
        return None
    return OptionError(held_message(what, holder, lock_path(path)))


def describe_lock(path: str | os.PathLike[str]) -> str | None:
    """For a dry run: who holds the lock of the output at ``path`` and what a command would do now (``None``
    where there is no lock)."""
    holder = read_lock(path)
    if holder is None:
        return None
    lock = lock_path(path)
    if isinstance(holder, str):
        return f"{lock} exists but cannot be read as a kernelmap lock: a run now is refused (rm {lock} to clear it)"
    why = holder.stale()
    if why is not None:
        return f"stale lock {lock} of {holder.describe()}: {why}; a run now takes it over"
    return f"held by {holder.describe()} ({lock}): a run now is refused until it ends"
