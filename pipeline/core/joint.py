"""Joint fit of a kernel field to the pixels of all tiles of an image.

Part of the per-tile kernels' error can be shared by all tiles of an image
(the shrinkage of each tile's regularisation), and a model fitted to the
kernels keeps it.  Here the field ``K(y, x) = sum_p phi_p(y, x) K_p``
(Legendre terms ``phi_p`` of the normalised tile position, as in
:mod:`pipeline.core.field`) is fitted to the pixels themselves, from each
tile's background-free normal equations (:class:`TileStatistics`: ``Gc_t``,
``c_t``, ``yy_t``; every tile keeps its own background, profiled out
exactly)::

    A = sum_t w_t (phi_t phi_t^T) kron (Gc_t + s_t Q_t),    r = sum_t w_t phi_t kron c_t,

with ``s_t = tr(Gc_t)``, ``Q_t = f sum_i lam_ti D_i^T D_i / tr(D_i^T D_i)``
the tile's own penalty (:mod:`pipeline.core.penalties`) at ``f`` times its
own evidence strengths ``lam_ti`` (the image's median where a tile has none),
and ``w_t`` the tile's inverse residual variance under its own kernel (tiles
are not equally noisy; the per-tile fits do not care, the pooled fit does).
The penalty is the sum of the tiles' own, so with as many terms as tiles and
``f = 1`` the joint fit is the independent tile fits.  Phi is taken at each
tile's centre.

The degree and the strength factor ``f`` are chosen without the truth by
exact leave-one-tile-out cross-validation: with ``H_t = U_t^T A^{-1} U_t``,
``U_t = phi_t kron I`` and ``B_t = w_t (Gc_t + s_t Q_t)``, the fit without
tile ``t`` predicts ``K_-t = (I - H_t B_t)^{-1} (K_t - H_t w_t c_t)`` at that
tile (Woodbury).  Scores of these predictions (the smallest total wins):

``"kernels"`` (default)
    ``sum_t v_t |K_-t - Khat_t|^2`` against the tile's own kernel estimate
    ``Khat_t``, with the tile weights ``v_t`` of the model fitted to the
    kernels (:func:`pipeline.core.field.tile_weights`): every kernel pixel
    counts.  On the 16 simulated images of ``scripts/bench_model.py
    --oracle`` (four field shapes, 16 and 36 tiles) it chose the ``(degree,
    f)`` closest to the truth on 13 and was within 0.06 of it (as a fraction
    of the tiles' error) on the others.
``"resolved"``
    ``sum_t v_t |B_t^-1 (w_t Gc_t K_-t - w_t c_t)|^2``: each prediction as
    the tile's own regularised fit would see it (which removes the tile's
    shrinkage from the comparison, and the modes the tile cannot resolve).
    On the same images it chose strengths up to 10 times weaker than the
    best: 0.34-0.88 of the tiles' error against 0.34-0.74 for ``"kernels"``.
``"pixels"``
    the tiles' residual sums of squares ``RSS_t(K_-t) = yy_t - 2 K.c_t +
    K.Gc_t.K``: how well the held-out pixels are predicted.  It weighs the
    kernel's error by the source's power, so it barely sees the poorly
    constrained (high-frequency) kernel modes: there 0.51-1.47 of the
    tiles' error.

Pure NumPy/SciPy.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import scipy.linalg.blas
import scipy.linalg.lapack
import scipy.sparse

from ..errors import OptionError
from .field import KernelField, field_frame, grid_outcome, legendre_design, resolvable_terms, tile_weights
from .penalties import penalty_terms

__all__ = ["CRITERIA", "JointField", "PackedGrams", "TileStatistics", "core_radius_for", "fit_joint_field",
           "fit_joint_tiles", "pack_gram", "RUN_VARIATION", "RUN_VARIATION_TILES", "spread_rows", "STRENGTHS",
           "unpack_gram", "variation_basis", "variation_for"]

#: The leave-one-tile-out scores :func:`fit_joint_field` can choose by.
CRITERIA: tuple[str, ...] = ("kernels", "resolved", "pixels")

#: The ladder of strength factors ``f`` (times each tile's own evidence strengths) searched.
#: It stops at 1, each tile's own strength: the pooled fit has more data than any tile, and above 1 the
#: penalty only traded flux for kernel-space error (wide kernels in ``scripts/bench_model.py``: ``f = 3`` gave
#: 0.45-0.57 of the tiles' error with flux errors 1.1-1.75 times theirs; ``f <= 1`` 0.42-0.67, flux errors
#: 0.42-0.75 times theirs).
STRENGTHS: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0)


#: The precision a run's tiles' Grams are kept in from their block to their image's fit (:func:`pack_statistics`):
#: half the bytes of double precision, and every sum the fit takes of them is in double precision (what it
#: changes in the fields: docs/benchmarks.md).
GRAM_DTYPE = np.float32


def pack_gram(gc: np.ndarray, dtype: type | None = None) -> np.ndarray:
    """``(n, m*(m+1)/2)``, C-contiguous: the upper triangles (row by row) of ``(n, m, m)`` symmetric matrices
    (half the bytes, e.g. to send the tiles' Grams from a worker), in ``dtype`` (default: theirs, exact)."""
    m = gc.shape[-1]
    upper = np.triu_indices(m)
    # ``take`` keeps each matrix's values together (C order); indexing would give them in Fortran order,
    # every row strided
    packed = np.take(gc.reshape(len(gc), m * m), upper[0] * m + upper[1], axis=1)
    return packed if dtype is None else packed.astype(dtype, copy=False)


def pack_statistics(statistics: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
    """A run's form of the tiles' ``(gc, cc, yy, lam_terms)`` (:attr:`~pipeline.KernelEstimates.statistics`):
    the Grams packed in :data:`GRAM_DTYPE` (``k**4 / 2`` floats a tile), the rest as they are."""
    gc, *rest = statistics
    return (pack_gram(gc, GRAM_DTYPE), *rest)


@functools.lru_cache(maxsize=4)
def _unpacked_positions(m: int) -> np.ndarray:
    """``(m*m,)``: where each entry of an ``m``-square symmetric matrix lies in its :func:`pack_gram` row."""
    r, c = np.meshgrid(np.arange(m), np.arange(m), indexing="ij")
    low, high = np.minimum(r, c), np.maximum(r, c)
    return (low * m - low * (low - 1) // 2 + high - low).ravel()


def unpack_gram(packed: np.ndarray, m: int) -> np.ndarray:
    """The ``(n, m, m)`` symmetric matrices of :func:`pack_gram` (in double precision at least)."""
    out = np.take(packed, _unpacked_positions(m), axis=-1).reshape(len(packed), m, m)
    return out.astype(np.result_type(packed.dtype, np.float64), copy=False)


class PackedGrams:
    """``(n, m, m)`` symmetric matrices kept as their upper triangles (:func:`pack_gram`: half the memory
    of the matrices), in one array or in several ``chunks`` (e.g. each block's, as the blocks returned
    them: never copied into one), the stored rows being the matrices ``order`` (default: in turn).
    The packed values may be single precision (:data:`GRAM_DTYPE`): the matrices and every sum taken of
    them are in double precision.
    Indexing (a tile, a slice or an index array) gives the matrices themselves; :meth:`rows`,
    :meth:`traces` and :meth:`quadratic` work on the packed values."""

    def __init__(self, packed: np.ndarray | Sequence[np.ndarray], m: int, order: np.ndarray | None = None):
        chunks = [packed] if isinstance(packed, np.ndarray) else list(packed)
        for chunk in chunks:
            if chunk.ndim != 2 or chunk.shape[1] != m * (m + 1) // 2:
                raise ValueError(f"packed Grams of {m}x{m} matrices need {m * (m + 1) // 2} values a row, "
                                 f"got shape {chunk.shape}")
        self.chunks, self.m = chunks, m
        self.starts = np.concatenate([[0], np.cumsum([len(c) for c in chunks])]).astype(np.int64)
        n = int(self.starts[-1])
        #: ``(n,)`` the stored row (chunks in turn) of each matrix
        self.stored = np.arange(n) if order is None else np.argsort(np.asarray(order, dtype=np.int64), kind="stable")
        if order is not None and not np.array_equal(np.sort(order), np.arange(n)):
            raise ValueError(f"order must give each of the {n} matrices once")

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self), self.m, self.m)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, key) -> np.ndarray:
        if np.ndim(key) == 0 and not isinstance(key, slice):
            return unpack_gram(self.rows(np.array([key])), self.m)[0]
        return unpack_gram(self.rows(key), self.m)

    def rows(self, key: slice | np.ndarray) -> np.ndarray:
        """``(R, m*(m+1)/2)`` the packed rows of the matrices ``key`` as stored: a view where they lie in
        turn in one chunk, else a copy."""
        stored = self.stored[key]
        chunk = np.searchsorted(self.starts, stored, side="right") - 1
        if len(stored) and chunk[0] == chunk[-1] and np.all(np.diff(stored) == 1):
            lo = stored[0] - self.starts[chunk[0]]
            return self.chunks[chunk[0]][lo : lo + len(stored)]
        out = np.empty((len(stored), self.m * (self.m + 1) // 2), dtype=np.result_type(*self.chunks))
        for row, (c, at) in enumerate(zip(chunk, stored)):
            out[row] = self.chunks[c][at - self.starts[c]]
        return out

    def weighted_sums(self, key: np.ndarray, weights: np.ndarray, budget: int = 2**24) -> np.ndarray:
        """``(W, m*(m+1)/2)`` in double precision: ``sum_r weights[r, w] * packed row of matrix key[r]`` for
        each column ``w`` of the ``(R, W)`` ``weights``.  Taken over a band of the packed values at a time
        (``budget`` bytes of all the rows' values in double precision): one product over every row for each
        band, each value read once; the same sums whatever the chunks (the operands in aligned memory)."""
        stored = self.stored[np.asarray(key)]
        chunk = np.searchsorted(self.starts, stored, side="right") - 1
        groups = [(c, np.flatnonzero(chunk == c), stored[chunk == c] - self.starts[c]) for c in np.unique(chunk)]
        width = self.m * (self.m + 1) // 2
        band = max(64, min(width, budget // (8 * max(len(stored), 1))))
        memory = _aligned_empty(len(stored) * band)
        weights = np.asarray(weights, dtype=np.float64)
        weights_t = _aligned_empty(weights.size).reshape(weights.shape[::-1])
        weights_t[:] = weights.T
        out = np.empty((weights_t.shape[0], width))
        for lo in range(0, width, band):
            hi = min(lo + band, width)
            values = memory[: len(stored) * (hi - lo)].reshape(len(stored), hi - lo)  # contiguous, aligned
            for c, at, rows in groups:
                values[at] = self.chunks[c][rows, lo:hi]
            out[:, lo:hi] = weights_t @ values
        return out

    def traces(self) -> np.ndarray:
        """``(n,)`` each matrix's trace."""
        i = np.arange(self.m)
        diagonal = i * self.m - i * (i - 1) // 2
        # summed in one array, whatever the chunks (NumPy's sums depend on the shape summed over)
        return np.concatenate([c[:, diagonal] for c in self.chunks]).astype(np.float64)[self.stored].sum(axis=1)

    def quadratic(self, vectors: np.ndarray, rows: slice | np.ndarray) -> np.ndarray:
        """``(R,)`` the quadratic forms ``v_r . G_r . v_r`` of the matrices ``rows`` with ``(R, m)`` ``vectors``,
        on the packed values (BLAS ``spmv``: the upper triangles row by row are the lower ones column by
        column, LAPACK's packed storage)."""
        packed = self.rows(rows)
        (spmv,) = scipy.linalg.blas.get_blas_funcs(("spmv",), (packed, vectors))
        # every row and vector through the same aligned memory: BLAS's sums depend on where their operands
        # lie, and the rows lie wherever their chunks do
        row_at, vector_at = _aligned_empty(packed.shape[1]), _aligned_empty(self.m)
        out = np.empty(len(packed))
        for r, (row, v) in enumerate(zip(packed, vectors)):
            row_at[:], vector_at[:] = row, v
            out[r] = vector_at @ spmv(self.m, 1.0, row_at, vector_at, lower=1)
        return out


def _aligned_empty(n: int, alignment: int = 64) -> np.ndarray:
    """``(n,)`` float64 starting at a multiple of ``alignment`` bytes."""
    raw = np.empty(n + alignment // 8)
    start = (-raw.ctypes.data % alignment) // 8
    return raw[start : start + n]


def _tile_rows(index: np.ndarray) -> slice | np.ndarray:
    """The tiles ``index`` (ascending) as a slice where they are a run (a view, not a copy)."""
    if len(index) and np.all(np.diff(index) == 1):
        return slice(int(index[0]), int(index[-1]) + 1)
    return index


def _traces(gc: np.ndarray | PackedGrams) -> np.ndarray:
    return gc.traces() if isinstance(gc, PackedGrams) else np.trace(gc, axis1=1, axis2=2)


@dataclass(frozen=True)
class TileStatistics:
    """Background-free normal equations of the tiles of one image (see :mod:`pipeline.core.lstsq`).

    ``RSS_t(K) = yy_t - 2 K.cc_t + K.gc_t.K`` is tile ``t``'s residual sum of
    squares of kernel ``K`` (raster order) with its best constant background.
    """

    #: ``(n, k*k, k*k)`` Gram with the background column profiled out (an array, or :class:`PackedGrams`)
    gc: np.ndarray | PackedGrams
    cc: np.ndarray  #: ``(n, k*k)`` right-hand side, likewise
    yy: np.ndarray  #: ``(n,)`` centred sum of squares of the target
    count: np.ndarray  #: ``(n,)`` target pixels fitted (0: no statistics)
    y: np.ndarray  #: ``(n,)`` tile centres, input pixel coordinates
    x: np.ndarray  #: ``(n,)``
    lam: np.ndarray  #: ``(n, m)`` each tile's evidence strengths ``lam_i`` (NaN: unknown)
    #: ``(n, k*k)`` each tile's own kernel estimate (NaN: none), for the ``"kernels"`` score
    kernels: np.ndarray | None = None
    #: ``(n,)`` the tiles' weights in that score (default: equal)
    weights: np.ndarray | None = None

    @classmethod
    def from_lstsq(cls, result, y: np.ndarray, x: np.ndarray) -> TileStatistics:
        """From an :class:`~pipeline.core.lstsq.LstsqResult` computed with ``statistics=True``
        and the tiles' centres."""
        if result.statistics is None:
            raise OptionError("the per-tile fit kept no statistics: call lstsq_kernels(..., statistics=True)")
        gc, cc, yy = result.statistics
        count = np.where(np.isfinite(yy), result.n_valid, 0)
        kernels = np.asarray(result.kernels, dtype=np.float64)
        weights = tile_weights(result.snr, kernels.sum(axis=(1, 2)))
        return cls(gc, cc, yy, count, np.asarray(y, dtype=np.float64).ravel(),
                   np.asarray(x, dtype=np.float64).ravel(), np.asarray(result.lam_terms, dtype=np.float64),
                   kernels.reshape(len(kernels), -1), weights)

    @property
    def kernel_size(self) -> int:
        return int(round(np.sqrt(self.cc.shape[1])))

    def usable(self) -> np.ndarray:
        """``(n,)`` bool: tiles with finite statistics and pixels."""
        return (self.count > 0) & np.isfinite(self.yy) & np.all(np.isfinite(self.cc), axis=1)

    def rss(self, kernels: np.ndarray, tiles: np.ndarray | None = None, batch: int = 64) -> np.ndarray:
        """Residual sums of squares of ``(m, k*k)`` kernels, one for each of the ``tiles`` (indices;
        default all ``n``), ``batch`` tiles at a time (no copy of every tile's Gram)."""
        index = np.arange(len(self.yy)) if tiles is None else np.asarray(tiles)
        kernels = np.asarray(kernels, dtype=np.float64).reshape(len(index), -1)
        out = np.empty(len(index))
        for start in range(0, len(index), batch):
            part = _tile_rows(index[start : start + batch])
            k = kernels[start : start + batch]
            quad = (self.gc.quadratic(k, part) if isinstance(self.gc, PackedGrams)
                    else np.einsum("ti,ti->t", k, np.matmul(self.gc[part], k[..., None])[..., 0]))
            out[start : start + len(k)] = self.yy[part] - 2.0 * np.einsum("ti,ti->t", k, self.cc[part]) + quad
        return out


@dataclass(frozen=True)
class JointField:
    """The field chosen by cross-validation, and the scores of every candidate."""

    #: coefficients, frame and tiles used; its ``cv_error`` is the criterion's RMS leave-one-out error
    #: (per kernel, relative to the tiles' kernels, or per pixel)
    field: KernelField
    strength: float  #: the chosen ``f``
    #: ``(m,)`` ``f`` times the median per-tile ``lam_i`` (each tile's penalty is ``f`` times its own, by default)
    lam: np.ndarray
    criterion: str  #: the score that chose (one of :data:`CRITERIA`)
    scores: dict[tuple[int, float], float]  #: the criterion's total for each ``(degree, f)`` evaluated
    #: ``(n,)`` each tile's residual sum of squares under the fit without it, at the choice (NaN: not
    #: used or not scored)
    tile_cv_rss: np.ndarray


def _penalty_units(kernel_size: int, penalty: str, centre: tuple[float, float]) -> np.ndarray:
    """``(m, k*k, k*k)``: the penalty's terms ``D_i^T D_i / tr(D_i^T D_i)`` as dense matrices."""
    terms = penalty_terms(kernel_size, penalty, 1, centre)
    return np.stack([gram.toarray() / trace for gram, trace in zip(terms.grams, terms.traces)])


def _penalty_matrix(kernel_size: int, penalty: str, lam: np.ndarray,
                    centre: tuple[float, float]) -> np.ndarray:
    """``sum_i lam_i D_i^T D_i / tr(D_i^T D_i)`` as a dense ``(k*k, k*k)`` matrix."""
    return np.tensordot(np.asarray(lam, dtype=np.float64), _penalty_units(kernel_size, penalty, centre), axes=1)


@dataclass(frozen=True)
class _TilePenalty:
    """Each used tile's penalty ``Q_t = sum_i lam[t, i] units[i]`` (``s_t Q_t`` enters its equations)."""

    units: np.ndarray  #: ``(m, k*k, k*k)``, from :func:`_penalty_units`
    lam: np.ndarray  #: ``(T, m)`` the strengths of the used tiles

    def of(self, rows: slice | np.ndarray) -> np.ndarray:
        """``(R, k*k, k*k)``: the penalty matrices of the used tiles ``rows``."""
        return np.einsum("rm,mij->rij", self.lam[rows], self.units)


class _Space:
    """The unknowns of one term of the field: some of the stamp's pixels, or the coefficients of a basis of
    kernels (``(k*k, m)`` columns).  ``rows``/``cols`` restrict a ``(..., k*k, k*k)`` matrix's last two axes
    to it (``B^T M``, ``M B``); ``expand`` maps its unknowns back to a kernel (``B x``)."""

    def __init__(self, k2: int, pixels: np.ndarray | None = None, basis: np.ndarray | None = None):
        self.k2, self.pixels, self.basis = k2, pixels, basis
        self.size = len(pixels) if basis is None else basis.shape[1]
        self.every = basis is None and len(pixels) == k2  #: every pixel, in order (restrictions are views)

    def rows(self, m: np.ndarray) -> np.ndarray:
        if self.every:
            return m
        return m[..., self.pixels, :] if self.basis is None else self.basis.T @ m

    def cols(self, m: np.ndarray) -> np.ndarray:
        if self.every:
            return m
        return m[..., self.pixels] if self.basis is None else m @ self.basis

    def expand(self, x: np.ndarray) -> np.ndarray:
        """``(k*k,)`` (or ``(k*k, n)``) from ``(size,)`` (or ``(size, n)``) unknowns."""
        if self.basis is not None:
            return self.basis @ x
        out = np.zeros((self.k2, *x.shape[1:]), dtype=x.dtype)
        out[self.pixels] = x
        return out


class _Pooled:
    """Pooled normal equations over the coefficients fitted, assembled once for the highest degree (a
    lower degree's system is a leading block: :meth:`solve` with ``n_terms``).

    ``keep`` (``(P*k*k,)`` bool, default all): the coefficients fitted; the
    others are held at zero (e.g. the variation terms outside the kernel's
    core).  Each pair of terms' weighted sum of the tiles' Grams is taken
    in one product over the stored values (packed: a band of them at a
    time, :meth:`PackedGrams.weighted_sums`; matrices: ``batch`` tiles at a
    time); the system's block of that pair is cut from it at the two terms'
    pixels (the full ``(P*k*k)^2`` matrix is never formed).
    """

    def __init__(self, stats: TileStatistics, used: np.ndarray, phi: np.ndarray, keep: np.ndarray | None = None,
                 scale: np.ndarray | None = None, batch: int = 32, basis: np.ndarray | None = None):
        self.phi = phi  #: ``(T, P)`` of the tiles used
        #: ``(T,)`` each used tile's weight (its equations and penalty multiplied by it)
        self.scale = np.ones(len(phi)) if scale is None else np.asarray(scale, dtype=np.float64)
        p = phi.shape[1]
        k2 = stats.cc.shape[1]
        self.k2 = k2
        if basis is not None:  # every pixel of the first term, the basis for the others
            first = _Space(k2, np.arange(k2))
            rest = _Space(k2, basis=np.asarray(basis, dtype=np.float64))
            self.spaces = [first] + [rest] * (p - 1)  #: each term's unknowns
        else:
            keep = np.ones(p * k2, dtype=bool) if keep is None else np.asarray(keep, dtype=bool)
            shared: dict[bytes, _Space] = {}
            self.spaces = [shared.setdefault(j.tobytes(), _Space(k2, j))
                           for j in (np.flatnonzero(keep[i * k2 : (i + 1) * k2]) for i in range(p))]
        self.offsets = np.concatenate([[0], np.cumsum([sp.size for sp in self.spaces])])
        self.weights = np.einsum("tp,tq,t->tpq", phi, phi, self.scale)  #: ``(T, P, P)``
        n = int(self.offsets[-1])
        self.data = np.empty((n, n))
        # every pair of terms' weighted sum of the whole Grams (as stored: packed or not) in one product,
        # ``batch`` tiles at a time; each block of the system is then cut from its pair's sum
        upper = np.triu_indices(p)
        pair_weights = self.weights[:, upper[0], upper[1]]  # (T, pairs)
        index = np.flatnonzero(used)
        packed = isinstance(stats.gc, PackedGrams)
        if packed:
            summed = stats.gc.weighted_sums(index, pair_weights)
        else:
            summed = np.zeros((len(pair_weights.T), k2 * k2))
            for start in range(0, len(index), batch):
                part = index[start : start + batch]
                summed += pair_weights[start : start + batch].T @ stats.gc[_tile_rows(part)].reshape(-1, k2 * k2)
        for i, j, row in zip(*upper, summed):
            whole = unpack_gram(row[None], k2)[0] if isinstance(stats.gc, PackedGrams) else row.reshape(k2, k2)
            block = self.spaces[i].rows(self.spaces[j].cols(whole))
            self.data[self._block(i, j)] = block
            if i != j:
                self.data[self._block(j, i)] = block.T
        self.traces = _traces(stats.gc)[used]  #: ``(T,)`` ``s_t``
        cc = stats.cc[used]
        self.rhs = np.concatenate([self.spaces[i].cols((phi[:, i] * self.scale) @ cc) for i in range(p)])

    def _block(self, i: int, j: int) -> tuple[slice, slice]:
        return slice(self.offsets[i], self.offsets[i + 1]), slice(self.offsets[j], self.offsets[j + 1])

    def size(self, n_terms: int | None = None) -> int:
        """Unknowns of the system of the first ``n_terms`` terms (default all)."""
        return int(self.offsets[len(self.spaces) if n_terms is None else n_terms])

    def solve(self, penalty: _TilePenalty, n_terms: int | None = None) -> tuple[np.ndarray, np.ndarray] | None:
        """Coefficients ``(P, k*k)`` and the Cholesky factor with the tiles' ``penalty``, over the first
        ``n_terms`` terms (default all: the terms are ordered by degree, so a lower degree's system is a
        leading block of a higher one's); ``None`` if singular."""
        p = len(self.spaces) if n_terms is None else n_terms
        n = self.size(p)
        a = self.data[:n, :n].copy()
        weights = np.einsum("tpq,t,tm->mpq", self.weights[:, :p, :p], self.traces, penalty.lam)  # (m, P, P)
        units: dict[tuple[int, int], np.ndarray] = {}
        for i in range(p):
            for j in range(p):
                key = (id(self.spaces[i]), id(self.spaces[j]))
                if key not in units:
                    units[key] = self.spaces[i].rows(self.spaces[j].cols(penalty.units))
                a[self._block(i, j)] += np.tensordot(weights[:, i, j], units[key], axes=1)
        try:
            factor = scipy.linalg.cho_factor(a, lower=True, overwrite_a=True, check_finite=False)
        except np.linalg.LinAlgError:
            return None
        solution = scipy.linalg.cho_solve(factor, self.rhs[:n], check_finite=False)
        coef = np.stack([self.spaces[i].expand(solution[self.offsets[i] : self.offsets[i + 1]]) for i in range(p)])
        return coef, factor

    def hat_terms(self, lower: np.ndarray, dtype: type = np.float64) -> np.ndarray:
        """``(pairs, k*k, k*k)``: for each pair of terms ``i <= j`` of the system whose ``A^{-1}`` has the
        lower triangle ``lower``, the blocks ``A^{-1}_ij + A^{-1}_ji`` (one ``A^{-1}_ii``) placed at their
        pixels, so that ``H_t = sum_{i <= j} phi_ti phi_tj`` of them (:meth:`hats`)."""
        p = int(np.searchsorted(self.offsets, len(lower)))
        pairs = [(i, j) for i in range(p) for j in range(i, p)]
        out = np.zeros((len(pairs), self.k2, self.k2), dtype=dtype)
        for row, (i, j) in enumerate(pairs):
            si, sj = self.spaces[i], self.spaces[j]
            if i == j:
                diagonal = np.tril(lower[self._block(i, i)])
                out[row] = si.expand(si.expand(diagonal + np.tril(diagonal, -1).T).T)
            else:
                below = si.expand(sj.expand(lower[self._block(j, i)]).T)  # B_i A^{-1}_ij B_j^T (j > i: lower)
                out[row] = below + below.T
        return out

    def hats(self, terms: np.ndarray, rows: slice | np.ndarray) -> np.ndarray:
        """``H_t = U_t^T A^{-1} U_t`` (``(R, k*k, k*k)``, in ``terms``' precision) of the used tiles ``rows``,
        from :meth:`hat_terms`."""
        p = int(round((np.sqrt(8 * len(terms) + 1) - 1) / 2))
        phi = self.phi[rows][:, :p]
        upper = np.triu_indices(p)
        weights = (phi[:, upper[0]] * phi[:, upper[1]]).astype(terms.dtype)
        return (weights @ terms.reshape(len(terms), -1)).reshape(len(phi), self.k2, self.k2)


class _HeldOut:
    """The terms of the tiles whose held-out predictions are scored, taken once for every candidate:
    ``w_t Gc_t`` in the precision of the leave-one-out products and solves, and each tile's penalty at
    ``f = 1`` as ``w_t s_t lam_t`` on the penalty's ``units`` (``B_t = w_t (Gc_t + f s_t Q_t)``), and
    ``w_t c_t``."""

    def __init__(self, stats: TileStatistics, used: np.ndarray, pooled: _Pooled, penalty: _TilePenalty,
                 rows: np.ndarray | None = None, dtype: type = np.float64):
        self.rows = np.arange(len(pooled.phi)) if rows is None else np.asarray(rows)
        tiles = np.flatnonzero(used)[self.rows]
        scale = pooled.scale[self.rows]
        k2 = stats.cc.shape[1]
        self.gram = np.empty((len(tiles), k2, k2), dtype=dtype)
        for start in range(0, len(tiles), 8):  # a few tiles at a time: no full-precision copy of them all
            part = slice(start, start + 8)
            self.gram[part] = scale[part, None, None] * stats.gc[tiles[part]]
        self.units = penalty.units  #: ``(m, k*k, k*k)``
        self._sparse_units = [scipy.sparse.csr_matrix(unit) for unit in penalty.units]  # a few per row
        #: ``(R, m)`` each tile's penalty ``w_t s_t lam_t`` on the units
        self.penalty = (scale * _traces(stats.gc)[tiles])[:, None] * penalty.lam[self.rows]
        self.rhs = scale[:, None] * stats.cc[tiles]
        self.dtype = dtype

    def times(self, rows: np.ndarray, vectors: np.ndarray, strength: float) -> np.ndarray:
        """``(R, k*k)``: ``B_t v_t`` of the scored tiles ``rows`` (indices into :attr:`rows`), the Grams'
        products in :attr:`dtype`."""
        single = vectors.astype(self.dtype)
        out = np.empty(vectors.shape)
        for row, (tile, vector) in enumerate(zip(rows, single)):  # no copy of the Grams of ``rows``
            out[row] = self.gram[tile] @ vector
        for unit, strengths in zip(self._sparse_units, self.penalty[rows].T):
            out += (strength * strengths)[:, None] * (unit @ vectors.T).T
        return out

    def matrices(self, rows: np.ndarray, strength: float) -> np.ndarray:
        """``(R, k*k, k*k)``: ``B_t`` of the scored tiles ``rows`` in :attr:`dtype`."""
        penalty = np.tensordot(strength * self.penalty[rows], self.units, axes=1)
        return (self.gram[rows] + penalty.astype(self.dtype)).astype(self.dtype, copy=False)


def _core_mask(kernel_size: int, n_terms: int, radius: float | None) -> np.ndarray | None:
    """``(n_terms * k*k,)`` bool: every pixel of the first term, the core's of the others (``None``: all)."""
    if radius is None:
        return None
    h = kernel_size // 2
    yy, xx = np.mgrid[-h : h + 1, -h : h + 1]
    core = (yy**2 + xx**2 <= radius**2).ravel()
    return np.concatenate([np.ones(kernel_size**2, dtype=bool), np.tile(core, n_terms - 1)])


def _lower_inverse(factor) -> np.ndarray:
    """The lower triangle of ``A^{-1}`` (the upper one is not set) from ``cho_factor``'s lower factor,
    computed in the factor's memory (the factor is used up)."""
    chol, _ = factor
    inverse, info = scipy.linalg.lapack.dpotri(chol, lower=1, overwrite_c=1)
    if info != 0:
        raise np.linalg.LinAlgError(f"dpotri failed (info {info})")
    return inverse


def _leave_one_out(pooled: _Pooled, factor, coef: np.ndarray, held: _HeldOut, strength: float = 1.0,
                   iterations: int = 60, tolerance: float | None = None, batch: int = 16) -> np.ndarray:
    """``(R, k*k)``: the kernels of the ``held`` tiles as the fit without each of them predicts it (exact, by
    Woodbury), with ``coef`` and ``factor`` from :meth:`_Pooled.solve` (over as many terms as ``coef`` has)
    at ``strength`` times the ``held`` tiles' penalties.

    A tile's prediction solves ``(I - H_t B_t) k = U_t^T x - H_t r_t`` (``H_t = U_t^T A^-1 U_t``).  The
    eigenvalues of ``H_t B_t`` are the tile's leverages, in ``[0, 1)``, small where many tiles share the
    field, so it is first solved by conjugate gradients (:func:`_held_out_iterations`: ``H_t`` applied
    through ``factor``, no ``k*k``-square matrix formed), at most ``iterations`` steps, until a step
    changes no pixel by more than ``tolerance`` of the largest (default: 1e-6 where ``held``'s precision
    is single, the products ``B_t k`` being taken in it; 1e-12 in double); the tiles it does not settle
    are solved directly (``H_t`` formed: ``A^-1`` in ``factor``'s memory, which is used up; the
    ``k*k``-square products and solves in ``held``'s precision).  Where many tiles share the field
    (leverages small) every tile settles in a few steps, far cheaper than the direct solves
    (docs/benchmarks.md).
    """
    p = len(coef)
    if tolerance is None:
        tolerance = 1e-6 if np.dtype(held.dtype) == np.float32 else 1e-12
    predicted, settled = _held_out_iterations(pooled, factor, coef, held, strength, iterations, tolerance)
    direct = np.flatnonzero(~settled)
    if not len(direct):
        return predicted
    terms = pooled.hat_terms(_lower_inverse(factor), held.dtype)
    identity = np.eye(coef.shape[1], dtype=held.dtype)
    for start in range(0, len(direct), batch):
        part = direct[start : start + batch]
        hats = pooled.hats(terms, held.rows[part])
        b = held.matrices(part, strength)
        rhs = pooled.phi[held.rows[part], :p] @ coef - np.matmul(hats, held.rhs[part][..., None])[..., 0]
        predicted[part] = _batched_solve(identity - hats @ b, rhs.astype(held.dtype, copy=False))
    return predicted


def _held_out_iterations(pooled: _Pooled, factor, coef: np.ndarray, held: _HeldOut, strength: float,
                         iterations: int, tolerance: float) -> tuple[np.ndarray, np.ndarray]:
    """The held-out predictions of :func:`_leave_one_out` by conjugate gradients, and which tiles they
    settled: their last step changed no pixel by more than ``tolerance`` of the largest.  A tile is left
    (for the direct solve) as soon as its steps shrink too slowly (at their mean rate so far) to settle
    within ``iterations``, or its operator shows no positive curvature (rounding)."""
    p = len(coef)
    phi = pooled.phi[held.rows, :p]
    spaces = pooled.spaces[:p]
    offsets = pooled.offsets[: p + 1]

    distinct = list({id(space): space for space in spaces}.values())  # the variation terms share one
    which = [next(n for n, d in enumerate(distinct) if d is space) for space in spaces]

    def hat(rows: np.ndarray, vectors: np.ndarray) -> np.ndarray:
        """``H_t v_t`` of the tiles ``rows``: ``U_t^T A^-1 U_t v_t`` through the factor, all at once."""
        restricted = [space.rows(vectors.T) for space in distinct]
        blocks = [restricted[which[i]] * phi[rows, i] for i in range(p)]
        solved = scipy.linalg.cho_solve(factor, np.concatenate(blocks), check_finite=False)
        combined: list = [0.0] * len(distinct)  # the terms of one space summed before it is expanded
        for i in range(p):
            combined[which[i]] = combined[which[i]] + solved[offsets[i] : offsets[i + 1]] * phi[rows, i]
        return sum(space.expand(part) for space, part in zip(distinct, combined)).T

    # conjugate gradients on (I - H_t B_t) k = b, a self-adjoint positive definite operator in the inner
    # product <u, w> = u . B_t w (its eigenvalues 1 - leverages in (0, 1]), from k = b; per step one product
    # with B_t and one with H_t (the factor's solve) for all the tiles still moving
    every = np.arange(len(held.rows))
    b = phi @ coef - hat(every, held.rhs)
    predicted = b.copy()
    residual = hat(every, held.times(every, b, strength))  # b - (I - H B) b
    on_residual = held.times(every, residual, strength)
    direction, on_direction = residual.copy(), on_residual.copy()
    norm = np.einsum("ri,ri->r", residual, on_residual)
    settled = np.zeros(len(every), dtype=bool)
    first = np.full(len(every), np.nan)
    active = every
    for step in range(iterations):
        if not len(active):
            break
        moved = direction[active] - hat(active, on_direction[active])  # (I - H B) p
        curvature = np.einsum("ri,ri->r", on_direction[active], moved)
        with np.errstate(divide="ignore", invalid="ignore"):
            alpha = np.where(curvature > 0, norm[active] / curvature, 0.0)
        update = alpha[:, None] * direction[active]
        predicted[active] += update
        residual[active] -= alpha[:, None] * moved
        on_residual[active] = held.times(active, residual[active], strength)
        new_norm = np.einsum("ri,ri->r", residual[active], on_residual[active])
        with np.errstate(divide="ignore", invalid="ignore"):
            beta = np.where(norm[active] > 0, new_norm / norm[active], 0.0)
        norm[active] = new_norm
        direction[active] = residual[active] + beta[:, None] * direction[active]
        on_direction[active] = on_residual[active] + beta[:, None] * on_direction[active]
        change = np.abs(update).max(axis=1) / np.maximum(np.abs(predicted[active]).max(axis=1), 1e-300)
        done = (change <= tolerance) & (curvature > 0)
        settled[active[done]] = True
        first[active] = np.where(np.isnan(first[active]), change, first[active])
        with np.errstate(divide="ignore", invalid="ignore"):
            rate = (change / first[active]) ** (1.0 / step) if step else np.zeros(len(active))
            needed = np.log(tolerance / change) / np.log(rate)  # steps still to take at that rate
        give_up = ~done & ((curvature <= 0) | (step >= 2) & ((rate >= 1) | (step + 1 + needed > iterations)))
        active = active[~done & ~give_up]
    return predicted, settled


def _far_tiles(stats: TileStatistics, kept: np.ndarray, coef: np.ndarray, design: np.ndarray,
               clip: float) -> np.ndarray:
    """Kept tiles whose pixels the field fits far worse than their own kernel does.

    The excess ``RSS_t(K(x_t)) / RSS_t(Khat_t) - 1`` of each tile (pixel
    residuals, as the joint fit weighs them) above the median by ``clip``
    robust standard deviations.  (A weighted kernel-space residual would
    flag the brightest tiles, whose weight is largest, not the wrong ones.)
    """
    own = stats.kernels
    judged = kept & np.all(np.isfinite(own), axis=1)
    far = np.zeros(len(own), dtype=bool)
    if judged.sum() < 3:
        return far
    index = np.flatnonzero(judged)
    own_rss = stats.rss(own[index], index)
    excess = stats.rss(design[index] @ coef, index) / np.where(own_rss > 0, own_rss, np.inf) - 1.0
    median = np.median(excess)
    spread = 1.4826 * np.median(np.abs(excess - median))
    far[index] = (excess > median + clip * spread) & (excess > 1e-9)
    return far


def _own_systems(stats: TileStatistics, tiles: np.ndarray, base: np.ndarray, penalty: str,
                 centre: tuple[float, float]) -> np.ndarray:
    """``(len(tiles), k*k, k*k)``: each tile's own regularised normal matrix ``B_t = Gc_t + s_t Q(lam_t)``
    at its own evidence strengths (``base`` where unknown)."""
    k = stats.kernel_size
    out = np.empty((len(tiles), k * k, k * k))
    for row, t in enumerate(tiles):
        lam = np.where(np.isfinite(stats.lam[t]), stats.lam[t], base)
        out[row] = stats.gc[t] + np.trace(stats.gc[t]) * _penalty_matrix(k, penalty, lam, centre)
    return out


def _inverse_noise(stats: TileStatistics, used: np.ndarray, base: np.ndarray, penalty: str,
                   centre: tuple[float, float]) -> np.ndarray:
    """``(n,)``: each used tile's inverse residual variance under its own kernel (the tile's kernel where
    given, else its own fit at its evidence strengths), divided by their median; 1 elsewhere."""
    index = np.flatnonzero(used)
    own = (np.full((len(index), stats.cc.shape[1]), np.nan) if stats.kernels is None
           else np.asarray(stats.kernels, dtype=np.float64)[index])
    missing = ~np.all(np.isfinite(own), axis=1)
    if missing.any():
        own[missing] = _batched_solve(_own_systems(stats, index[missing], base, penalty, centre),
                                      stats.cc[index[missing]])
    variance = stats.rss(own, index) / stats.count[index]
    good = np.isfinite(variance) & (variance > 0)
    scale = np.ones(len(used))
    if good.any():
        inverse = np.where(good, 1.0 / np.where(good, variance, 1.0), np.nan)
        scale[index] = np.where(good, inverse / np.nanmedian(inverse), 1.0)
    return scale


def _batched_solve(matrices: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """``matrices[t]^-1 rhs[t]`` for every ``t`` (a singular system gives ``inf``), by LAPACK's ``gesv``
    one matrix at a time (twice as fast as NumPy's stacked solve in single precision)."""
    (gesv,) = scipy.linalg.lapack.get_lapack_funcs(("gesv",), (matrices, rhs))
    out = np.empty_like(rhs)
    for t, (matrix, vector) in enumerate(zip(matrices, rhs)):
        _, _, solution, info = gesv(matrix, vector)
        out[t] = solution if info == 0 else np.inf
    return out


def spread_rows(n: int, most: int | None) -> np.ndarray:
    """At most ``most`` of ``n`` positions, evenly spread (all of them when ``most`` is ``None`` or ``>= n``)."""
    if most is None or most >= n:
        return np.arange(n)
    return np.unique(np.round(np.linspace(0, n - 1, max(int(most), 1))).astype(np.int64))


def fit_joint_field(
    stats: TileStatistics,
    *,
    degrees: Sequence[int] | None = None,
    max_degree: int = 3,
    strengths: Sequence[float] = STRENGTHS,
    start: float = 1.0,
    criterion: str = "kernels",
    weighting: str = "noise",
    tile_strengths: bool = True,
    core_radius: float | None = None,
    variation: int | None = None,
    scored: int | None = 32,
    clip: float = np.inf,
    max_rejections: int = 3,
    penalty: str = "compact",
    centre: tuple[float, float] = (0.0, 0.0),
) -> JointField:
    """Fit the kernel field of one image jointly to its tiles' pixels.

    Parameters
    ----------
    stats
        The tiles' normal equations (:class:`TileStatistics`; with the tiles'
        own kernels for the ``"kernels"`` criterion).
    degrees
        Total polynomial degrees to try, each with its own search of ``f``.
        Default: ``0 .. max_degree`` (only degrees with at most half as many
        terms as usable tiles), searched in two steps: the degrees in turn at
        ``f = start`` (stopping at the first above 1 that does not score
        better than every degree below it), then ``f`` at the best degree.
    strengths
        The ladder of factors ``f`` (of each tile's own evidence strengths).
        A search of ``f`` starts at the value nearest ``start`` and steps to
        the better neighbour on the ladder while the score falls (it is
        smooth in ``f``, with one minimum).
    criterion
        One of :data:`CRITERIA`: the leave-one-tile-out score (module docstring).
    weighting
        ``"noise"``: each tile's equations weighted by its inverse residual
        variance under its own kernel (relative to the median tile);
        ``"equal"``: unweighted.
    tile_strengths
        Each tile's penalty at ``f`` times its own evidence strengths (the
        default), or at ``f`` times the image's median for every tile.  On
        the simulated images of ``scripts/bench_model.py`` the tiles' own
        strengths brought the joint field's median error from 0.29-1.01 of
        the tiles' (median 0.60) to 0.34-0.74 (median 0.49) and made
        ``"kernels"`` choose as the truth would: a field whose kernels widen
        across the image needs a weaker penalty where they are narrow.
    core_radius
        Where given, the terms above the constant vary only within this many
        pixels of the stamp centre (the constant term keeps every pixel): far
        fewer unknowns, so a much cheaper fit.
    variation
        Where given, the terms above the constant are combinations of this
        many kernels (:func:`variation_basis`: the mean of the tiles' own
        kernels and their leading principal components) instead of pixels
        (``core_radius`` is then not used): a system of ``k*k + (P - 1) *
        variation`` unknowns instead of up to ``P * k*k``.  The basis is
        learned from every used tile's kernel, the held-out tiles' too (the
        leave-one-out scores do not refit it).
    scored
        The held-out score is summed over at most this many of the used
        tiles, evenly spread in raster order (``None``: all).  Every tile
        is in every fit; only the held-out predictions, one 441² solve each
        per candidate, are limited: they are a large part of the fit's cost,
        and each scored tile's two ``k*k``-square matrices are kept in single
        precision for the whole search (``8 k**4`` bytes: 1.5 MB at k = 21).
        On the 36- and 64-tile images of ``scripts/bench_model.py`` 32 chose
        as all the tiles did (16 chose degree 3 instead of 2 on one 64-tile
        image: 0.61 instead of 0.52 of the tiles' error).
    clip, max_rejections
        Tiles whose pixels the chosen field fits worse than their own kernel
        does by more than the others (the excess of the residual sum of
        squares, ``clip`` robust standard deviations above the median) are
        left out and the field is fitted again at the chosen degree and
        strength, at most ``max_rejections`` times (the default ``clip=inf``:
        never); they are the field's ``rejected`` tiles.  Needs the tiles'
        kernels.  Off by default: on the demo stacks, whose kernels vary
        inside each tile, ``clip=4`` left out well-measured tiles (the field at
        a tile's centre fits a bright off-centre star worse) and changed the
        field's error by 0.97-1.28 times.
    penalty, centre
        The penalty (as in the per-tile fits) and its centre on the stamp.

    Returns
    -------
    JointField
        The ``(degree, f)`` with the smallest score.  Raises ``ValueError``
        without usable tiles or per-tile strengths, and
        :class:`~pipeline.errors.OptionError` for bad options or
        (``"kernels"``) statistics without the tiles' kernels.
    """
    used = stats.usable()
    if not used.any():
        raise ValueError("no usable tile to fit a kernel field to")
    lam_tiles = stats.lam[used]
    if not np.all(np.isfinite(lam_tiles).any(axis=0)):
        raise ValueError("no per-tile regularisation strength to scale the joint penalty from")
    ladder = np.sort(np.asarray(strengths, dtype=np.float64))
    if not ladder.size or np.any(ladder <= 0) or not np.all(np.isfinite(ladder)):
        raise OptionError(f"strengths must be positive and finite, got {list(strengths)}")
    if criterion not in CRITERIA:
        raise OptionError(f"criterion={criterion!r}: use one of {', '.join(map(repr, CRITERIA))}")
    if weighting not in ("noise", "equal"):
        raise OptionError(f"weighting={weighting!r}: use 'noise' or 'equal'")
    rows = spread_rows(int(used.sum()), scored)  # the used tiles whose held-out predictions are scored
    scored_tiles = np.flatnonzero(used)[rows]
    weights = (np.ones(len(scored_tiles)) if stats.weights is None
               else np.asarray(stats.weights, dtype=np.float64)[scored_tiles])
    weights = np.where(np.isfinite(weights), weights, 0.0)  # the scored tiles' weights in the kernel scores
    if criterion == "kernels":
        if stats.kernels is None:
            raise OptionError("criterion='kernels' needs the tiles' own kernels (TileStatistics.kernels): "
                             "build the statistics with TileStatistics.from_lstsq, or use criterion='pixels'")
        own = stats.kernels[scored_tiles]
        weights = np.where(np.all(np.isfinite(own), axis=1), weights, 0.0)
        own = np.where(weights[:, None] > 0, own, 0.0)
        if not np.any(weights > 0):
            raise ValueError("no tile with a kernel and a positive weight to score the fit against")
        norm = float(np.sum(weights * np.sum(own**2, axis=1)))
    base = np.nanmedian(lam_tiles, axis=0)
    k = stats.kernel_size
    if criterion == "resolved":
        own_systems = _own_systems(stats, scored_tiles, base, penalty, centre)
        norm = float(np.sum(weights * np.sum(_batched_solve(own_systems, stats.cc[scored_tiles]) ** 2, axis=1)))
    units = _penalty_units(k, penalty, centre)
    # each tile's evidence strengths (the median where unknown), or the median for every tile
    tile_lam = np.where(np.isfinite(stats.lam), stats.lam, base) if tile_strengths else np.tile(base, (len(used), 1))
    tile_scale = (_inverse_noise(stats, used, base, penalty, centre) if weighting == "noise"
                  else np.ones(len(used)))
    frame = field_frame(stats.y, stats.x, used)
    u, v = frame.normalised(stats.y, stats.x)
    n_used = int(used.sum())
    pixels = float(stats.count[scored_tiles].sum())
    explicit = degrees is not None
    if degrees is None:
        degrees = [d for d in range(max_degree + 1)
                   if 2 * resolvable_terms(u[used], v[used], d).sum() <= n_used] or [0]
    scores: dict[tuple[int, float], float] = {}
    fits: dict[tuple[int, int], tuple[float, np.ndarray, np.ndarray]] = {}

    def score(predicted: np.ndarray) -> float:
        """The criterion's total over the scored tiles."""
        if criterion == "pixels":
            return float(stats.rss(predicted, scored_tiles).sum())
        if criterion == "resolved":
            seen = np.einsum("tij,tj->ti", stats.gc[scored_tiles], predicted) - stats.cc[scored_tiles]
            return float(np.sum(weights * np.sum(_batched_solve(own_systems, seen) ** 2, axis=1)))
        return float(np.sum(weights * np.sum((predicted - own) ** 2, axis=1)))

    # one pooled system for the highest degree: each lower degree's is a leading block of it
    top = max(int(d) for d in degrees)
    top_mask = resolvable_terms(u[used], v[used], top)
    if variation is not None and stats.kernels is None:
        raise OptionError("variation needs the tiles' own kernels (TileStatistics.kernels)")
    basis = None if variation is None else variation_basis(stats.kernels[used], variation)
    keep = None if basis is not None else _core_mask(k, int(top_mask.sum()), core_radius)
    pooled = _Pooled(stats, used, legendre_design(u[used], v[used], top)[:, top_mask], keep, tile_scale[used],
                     basis=basis)
    held = _HeldOut(stats, used, pooled, _TilePenalty(units, tile_lam[used]), rows, np.float32)

    def evaluate(degree: int, i: int) -> float:
        """Leave-one-out score of ``degree`` at ladder position ``i`` (each computed once)."""
        if (degree, i) not in fits:
            mask = top_mask[: (degree + 1) * (degree + 2) // 2]
            solved = pooled.solve(_TilePenalty(units, ladder[i] * tile_lam[used]), int(mask.sum()))
            if solved is None:
                fits[(degree, i)] = (np.inf, np.empty(0), np.empty(0))
            else:
                coef, factor = solved
                full = np.zeros((len(mask), k * k))
                full[mask] = coef
                predicted = _leave_one_out(pooled, factor, coef, held, float(ladder[i]))
                fits[(degree, i)] = (score(predicted), full, predicted)
                scores[(degree, float(ladder[i]))] = fits[(degree, i)][0]
        return fits[(degree, i)][0]

    def downhill(degree: int, i: int) -> int:
        """Step along the ladder to the better neighbour while the score falls."""
        while True:
            near = [j for j in (i - 1, i + 1) if 0 <= j < len(ladder)]
            j = min(near, key=lambda j: evaluate(degree, j)) if near else i
            if not evaluate(degree, j) < evaluate(degree, i):
                return i
            i = j

    position = int(np.argmin(np.abs(np.log(ladder / start))))
    if explicit:
        for degree in degrees:
            downhill(int(degree), position)
    else:
        # the degree at the starting strength (stopping at the first degree above 1 that does not improve
        # on the best score so far), then the strength at the chosen degree
        first = min(1, max(degrees))
        best = np.inf
        for degree in degrees:
            total = evaluate(degree, position)
            if degree > first and not total < best:
                break  # this degree fits the noise: higher ones would too
            best = min(best, total)
        chosen = min((d for d in degrees if (d, position) in fits), key=lambda d: evaluate(d, position))
        downhill(chosen, position)
    (degree, i), (total, coef, predicted) = min(fits.items(), key=lambda item: item[1][0])
    if not np.isfinite(total):
        raise ValueError("the joint normal equations are singular at every strength tried")
    per_tile = np.full(len(used), np.nan)
    per_tile[scored_tiles] = stats.rss(predicted, scored_tiles)
    scale = pixels if criterion == "pixels" else norm
    kept = used.copy()
    if np.isfinite(clip) and stats.kernels is not None:
        mask = top_mask[: (degree + 1) * (degree + 2) // 2]
        for _ in range(max_rejections):
            far = _far_tiles(stats, kept, coef, legendre_design(u, v, degree), clip)
            if not far.any() or 2 * int(mask.sum()) > int((kept & ~far).sum()):
                break
            kept &= ~far  # refit without them at the chosen degree and strength
            refit = _Pooled(stats, kept, legendre_design(u[kept], v[kept], degree)[:, mask],
                            None if basis is not None else _core_mask(k, int(mask.sum()), core_radius),
                            tile_scale[kept], basis=basis).solve(
                _TilePenalty(units, ladder[i] * tile_lam[kept]))
            if refit is None:
                kept |= far
                break
            coef = np.zeros_like(coef)
            coef[mask] = refit[0]
    field = KernelField(
        degree=degree, coefficients=coef.reshape(-1, k, k), centre=frame.centre, scale=frame.scale,
        used=kept, rejected=used & ~kept, cv_error=float(np.sqrt(total / scale)),
        cv_errors={d: float(np.sqrt(min(s for (dd, _), s in scores.items() if dd == d) / scale))
                   for d in sorted({d for d, _ in scores})},
    )
    return JointField(field, float(ladder[i]), ladder[i] * base, criterion, scores, per_tile)


def variation_basis(kernels: np.ndarray, size: int) -> np.ndarray:
    """``(k*k, size)`` orthonormal columns spanning the mean of the ``(n, k*k)`` ``kernels`` (those finite)
    and their ``size - 1`` leading principal components: where a field's kernels vary, as the tiles see it."""
    kernels = np.asarray(kernels, dtype=np.float64)
    kernels = kernels[np.all(np.isfinite(kernels), axis=1)]
    if size < 1 or not len(kernels):
        raise OptionError(f"variation={size}: needs at least 1 and tiles with kernels")
    mean = kernels.mean(axis=0)
    _, _, components = np.linalg.svd(kernels - mean, full_matrices=False)
    columns = np.concatenate([mean[:, None], components[: size - 1].T], axis=1)
    q, _ = np.linalg.qr(columns)
    return q


#: A run's joint fit puts the variation terms in a basis of this many kernels (:func:`variation_basis`) ...
RUN_VARIATION = 30
#: ... on images of at least this many usable tiles (fewer: pixels within :func:`core_radius_for`; the
#: basis is learned from the tiles' kernels, and such systems are small anyway)
RUN_VARIATION_TILES = 16


def variation_for(n_usable: int) -> int | None:
    """The ``variation`` a run's joint fit uses on an image of ``n_usable`` usable tiles: far cheaper fits
    than with pixels, as accurate on the simulated images of ``scripts/bench_model.py`` (errors and times
    in docs/benchmarks.md)."""
    return RUN_VARIATION if n_usable >= RUN_VARIATION_TILES else None


def core_radius_for(fwhm: float, kernel_size: int) -> float | None:
    """The ``core_radius`` a run's joint fit uses: twice the tiles' median kernel FWHM (at least 3 px),
    or ``None`` (every pixel) where that reaches the stamp's edge or the FWHM is unknown.  At 5 px for
    kernels of FWHM about 3 px (``scripts/bench_model.py --core-radius 5``) the fit's error moved by at
    most 0.0002 and its time halved."""
    if not np.isfinite(fwhm):
        return None
    radius = max(3.0, 2.0 * float(fwhm))
    return None if radius >= kernel_size // 2 else radius


def fit_joint_tiles(
    y: np.ndarray,
    x: np.ndarray,
    kernels: np.ndarray,
    usable: np.ndarray,
    weights: np.ndarray,
    statistics: tuple[np.ndarray | PackedGrams, np.ndarray, np.ndarray, np.ndarray],
    count: np.ndarray,
    **options,
) -> tuple[KernelField | None, np.ndarray, np.ndarray]:
    """:func:`fit_joint_field` on a grid of tiles, as :func:`pipeline.core.field.fit_tiles` fits the
    model of the kernels: ``(field or None, residual, rejected)``.

    ``y``, ``x``: the grid's tile centres (1-D); ``kernels`` ``(ny, nx, k, k)``;
    ``usable``, ``weights``, ``count`` ``(ny, nx)``; ``statistics``: the
    tiles' ``(gc, cc, yy, lam_terms)`` in raster order (``gc`` as matrices,
    packed rows or :class:`PackedGrams`).  Tiles not ``usable``
    are left out; ``residual`` is each tile's relative L2 difference from the
    field; no field (``None``) where it cannot be fitted.
    """
    k = kernels.shape[-1]
    yy, xx = np.meshgrid(np.asarray(y, dtype=np.float64), np.asarray(x, dtype=np.float64), indexing="ij")
    flat = kernels.reshape(-1, k, k).astype(np.float64)
    gc, cc, yy_stat, lam = statistics
    if isinstance(gc, np.ndarray) and gc.ndim == 2:  # packed (:func:`pack_statistics`)
        gc = PackedGrams(gc, k * k)
    keep = np.asarray(usable, dtype=bool).ravel()
    stats = TileStatistics(gc, cc, yy_stat, np.where(keep, np.asarray(count).ravel(), 0), yy.ravel(), xx.ravel(),
                           lam, flat.reshape(len(flat), -1), np.asarray(weights, dtype=np.float64).ravel())
    try:
        field = fit_joint_field(stats, **options).field
    except (ValueError, np.linalg.LinAlgError):
        field = None
    return grid_outcome(field, yy, xx, flat)
