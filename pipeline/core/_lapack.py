"""Cholesky factorisation and solves that release the GIL.

SciPy's ``scipy.linalg.lapack`` wrappers hold the GIL while LAPACK runs, so
tiles estimated in parallel threads queue behind each other.  The same LAPACK
routines are reachable through ``scipy.linalg.cython_lapack``; calling them
with :mod:`ctypes` releases the GIL for the duration of the call.

Arrays are C-contiguous.  For a symmetric matrix the Fortran routines see the
same matrix; the Cholesky factor they return as upper triangle ``U`` (column
major) is, in C order, the lower triangle ``L`` with ``A = L L^T``.
"""

from __future__ import annotations

import ctypes

import numpy as np
from scipy.linalg import cython_lapack

__all__ = ["cholesky", "cho_solve", "lower_solve"]

_int_p = ctypes.POINTER(ctypes.c_int)
_get_name = ctypes.pythonapi.PyCapsule_GetName
_get_name.restype = ctypes.c_char_p
_get_name.argtypes = [ctypes.py_object]
_get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_get_pointer.restype = ctypes.c_void_p
_get_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]

_SIGNATURES = {
    "potrf": [ctypes.c_char_p, _int_p, ctypes.c_void_p, _int_p, _int_p],
    "potrs": [ctypes.c_char_p, _int_p, _int_p, ctypes.c_void_p, _int_p, ctypes.c_void_p, _int_p, _int_p],
    "trtrs": [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, _int_p, _int_p,
              ctypes.c_void_p, _int_p, ctypes.c_void_p, _int_p, _int_p],
}


def _routine(name: str):
    capsule = cython_lapack.__pyx_capi__[name]
    pointer = _get_pointer(capsule, _get_name(capsule))
    return ctypes.CFUNCTYPE(None, *_SIGNATURES[name[1:]])(pointer)


_ROUTINES = {
    (np.dtype(np.float32), kind): _routine("s" + kind) for kind in _SIGNATURES
} | {(np.dtype(np.float64), kind): _routine("d" + kind) for kind in _SIGNATURES}


def _i(value: int) -> ctypes.c_int:
    return ctypes.c_int(value)


def cholesky(a: np.ndarray) -> tuple[np.ndarray, int]:
    """Lower Cholesky factor of symmetric ``a`` (float32 or float64) and LAPACK's ``info``.

    Only the lower triangle of the returned factor is meaningful.
    """
    factor = np.array(a, order="C", copy=True)
    n, info = _i(factor.shape[0]), _i(0)
    _ROUTINES[factor.dtype, "potrf"](b"U", ctypes.byref(n), factor.ctypes.data, ctypes.byref(n),
                                     ctypes.byref(info))
    return factor, info.value


def cho_solve(factor: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Solve ``A x = rhs`` from :func:`cholesky`'s factor; ``rhs`` is ``(n,)`` or ``(m, n)`` rows."""
    x = np.array(rhs, dtype=factor.dtype, order="C", copy=True)
    n = _i(factor.shape[0])
    nrhs = _i(1 if x.ndim == 1 else x.shape[0])
    info = _i(0)
    _ROUTINES[factor.dtype, "potrs"](b"U", ctypes.byref(n), ctypes.byref(nrhs), factor.ctypes.data,
                                     ctypes.byref(n), x.ctypes.data, ctypes.byref(n), ctypes.byref(info))
    return x


def lower_solve(factor: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``L^{-1} z`` for every row ``z`` of ``rows`` (``(m, n)``), ``L`` from :func:`cholesky`."""
    x = np.array(rows, dtype=factor.dtype, order="C", copy=True)
    n, nrhs, info = _i(factor.shape[0]), _i(x.shape[0]), _i(0)
    # the factor's memory holds U = L^T in column-major order: L^{-1} = U^{-T}
    _ROUTINES[factor.dtype, "trtrs"](b"U", b"T", b"N", ctypes.byref(n), ctypes.byref(nrhs),
                                     factor.ctypes.data, ctypes.byref(n), x.ctypes.data,
                                     ctypes.byref(n), ctypes.byref(info))
    return x
