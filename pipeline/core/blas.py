"""BLAS held to one thread while the package runs its own threads (or alongside worker processes).

``threadpoolctl.threadpool_limits`` takes stock of the process's libraries
each time it is entered (it reads ``/proc/self/maps``: about 1 ms a call,
several times a batch of tiles).  :func:`one_blas_thread` takes stock once, at
its first call, and then only sets and restores the thread counts (about
10 µs).  The libraries whose BLAS the package calls (NumPy's and SciPy's) are
loaded by then: this module imports both.
"""

from __future__ import annotations

import threading
from contextlib import AbstractContextManager
from typing import Any

import numpy  # noqa: F401  (its BLAS: loaded before stock is taken)
import scipy.linalg  # noqa: F401  (SciPy's own BLAS, likewise)
from threadpoolctl import ThreadpoolController

__all__ = ["one_blas_thread"]

_controller: ThreadpoolController | None = None
_lock = threading.Lock()


def one_blas_thread() -> AbstractContextManager[Any]:
    """A context in which every BLAS library of the process runs one thread (restored on exit)."""
    global _controller
    if _controller is None:
        with _lock:
            if _controller is None:
                _controller = ThreadpoolController()
    return _controller.limit(limits=1, user_api="blas")
