"""Penalty operators of the least-squares estimator: ``sum_i mu_i ||D_i K||^2``.

``"compact"`` (default)
    Two terms that describe a PSF-matching kernel: smoothness (the 5-point
    Laplacian) weighted by ``(r/h)^2``, so the core may be as sharp as the
    data say while the noise-dominated wings are kept smooth; and an
    amplitude term weighted by ``(r/h)^4`` that keeps power out of the outer
    stamp.  ``r`` is the distance from the kernel's core: the stamp centre,
    or, when a first fit finds the core off the centre (a shift between the
    images), that core (see :mod:`pipeline.core.lstsq`).  It removes most of
    the plain Laplacian's peak-flattening bias.
``"wings"``
    ``"compact"`` without the amplitude penalty on smooth radial profiles in
    the outer stamp.  For kernels with extended wings (Moffat-like, or a
    faint broad component), whose light ``"compact"`` partly loses (it then
    underestimates the kernel sum), at some cost in pixel-wise error for
    compact kernels.
``"laplacian"``
    Plain smoothness ``||Laplacian K||^2`` (zero outside the stamp).
``"identity"``
    Tikhonov ``||K||^2``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import sparse

from ..errors import OptionError

__all__ = ["PENALTIES", "PENALTY_TERMS", "check_penalty", "PenaltyTerms", "penalty_operators", "penalty_terms"]

#: Penalty name -> number of its terms (the length of a per-term ``regularization``).
PENALTY_TERMS: dict[str, int] = {"compact": 2, "wings": 2, "laplacian": 1, "identity": 1}
#: Penalty names, the default first.
PENALTIES: tuple[str, ...] = tuple(PENALTY_TERMS)
#: Smoothing weight kept at the core by the compact penalties' ``(r/h)^2`` weighting.
_CORE_SMOOTHING = 0.01


def check_penalty(penalty: object) -> str:
    """``penalty`` if it names a known penalty, else an :class:`~pipeline.errors.OptionError`."""
    if not isinstance(penalty, str) or penalty not in PENALTY_TERMS:
        raise OptionError(f"penalty={penalty!r} is not known; choose one of {', '.join(PENALTIES)}")
    return penalty


def _laplacian(k: int) -> sparse.csr_matrix:
    """5-point Laplacian on the ``k x k`` stamp, zero outside it."""
    second = sparse.diags([1.0, -2.0, 1.0], [-1, 0, 1], shape=(k, k))
    eye = sparse.identity(k)
    return sparse.csr_matrix(sparse.kron(eye, second) + sparse.kron(second, eye))


def _radius2(kernel_size: int, centre: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """Squared distance from ``centre`` (an offset from the stamp centre) over ``h^2``.

    One value per stamp pixel, raster order.
    """
    h = max(kernel_size // 2, 1)
    yy, xx = np.mgrid[-(kernel_size // 2) : kernel_size // 2 + 1, -(kernel_size // 2) : kernel_size // 2 + 1]
    return (((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) / h**2).ravel()


def _operators(kernel_size: int, penalty: str, centre: tuple[float, float] = (0.0, 0.0)) -> tuple:
    """Penalty operators as sparse matrices."""
    k = kernel_size
    if penalty == "identity":
        return (sparse.identity(k * k, format="csr"),)
    lap = _laplacian(k)
    if penalty == "laplacian":
        return (lap,)
    rho2 = _radius2(k, centre)
    wall = sparse.diags(rho2**2 + 1e-4)
    if penalty == "wings" and k > 1:  # (a 1x1 stamp has no wings)
        # leave smooth radial wing profiles out of the amplitude term, so the
        # light in extended wings (and with it the kernel sum) is kept
        rho = np.sqrt(rho2)
        centres = np.linspace(0.3, 1.0, 4)
        width = centres[1] - centres[0]
        rings = np.clip(1.0 - np.abs(rho[:, None] - centres[None, :]) / width, 0.0, None)
        q, _ = np.linalg.qr(rings)
        wall = sparse.csr_matrix(wall.toarray() - (wall @ q) @ q.T)
    return (sparse.diags(rho2 + _CORE_SMOOTHING) @ lap, wall)


def penalty_operators(kernel_size: int, penalty: str) -> tuple[np.ndarray, ...]:
    """Operators ``D_i`` (``k*k`` columns) of the penalty terms ``||D_i K||^2``."""
    check_penalty(penalty)
    return tuple(op.toarray() for op in _operators(kernel_size, penalty))


@dataclass(frozen=True)
class PenaltyTerms:
    """Penalty Grams ``D_i^T D_i`` (sparse) and trace probes ``D_i^T z``."""

    grams: tuple[sparse.csr_matrix, ...]
    flat_index: tuple[np.ndarray, ...]  #: raster positions of each Gram's nonzeros
    traces: np.ndarray  #: ``tr(D_i^T D_i)``
    probes64: np.ndarray  #: all terms' probes as rows, ``(m * n_probes, k*k)``
    probes32: np.ndarray
    n_probes: int


def _terms(ops: tuple, n_probes: int) -> PenaltyTerms:
    rng = np.random.default_rng(20261126)
    grams, flat, probes = [], [], []
    for op in ops:
        op = sparse.csr_matrix(op)
        z = rng.choice([-1.0, 1.0], size=(op.shape[0], n_probes))
        gram = sparse.csr_matrix(op.T @ op)
        gram.sum_duplicates()
        rows = np.repeat(np.arange(gram.shape[0]), np.diff(gram.indptr))
        grams.append(gram)
        flat.append(rows * gram.shape[1] + gram.indices)
        probes.append(np.asarray(op.T @ z).T)
    probes64 = np.ascontiguousarray(np.vstack(probes))
    return PenaltyTerms(tuple(grams), tuple(flat), np.array([g.diagonal().sum() for g in grams]),
                    probes64, probes64.astype(np.float32), n_probes)


@lru_cache(maxsize=16)
def penalty_terms(
    kernel_size: int, penalty: str, n_probes: int, centre: tuple[float, float] = (0.0, 0.0)
) -> PenaltyTerms:
    """Penalty Grams and trace probes of ``penalty`` centred at ``centre`` (cached)."""
    check_penalty(penalty)
    return _terms(_operators(kernel_size, penalty, centre), n_probes)
