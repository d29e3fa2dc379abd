"""Exact valid-region normal equations of the kernel least-squares problem.

The model is ``R(p) = sum_j K[j] S(p - a_j) + b`` for target pixels ``p`` in
the valid box ``V`` (pixels whose whole kernel footprint lies inside the
tile), with kernel offsets ``a_j = j - h``.  The Gram matrix is

    G[j, l] = sum_{p in V} S(p - a_j) S(p - a_l)
            = sum_{q in V - a_j} S(q) S(q + j - l).

``V - a_j`` is the box of rows ``[2h - j_y, ny - j_y)`` and columns
``[2h - j_x, nx - j_x)``.  By inclusion-exclusion the box sum is the full
autocorrelation of the tile (one FFT; only the lags ``|j - l| <= 2h`` are
transformed back) minus the rows outside the box, minus the columns outside
it, plus the pixels outside both.

The rows outside the box are the top rows above it and the bottom rows below
it.  Numbering the rows of each ``2h``-row edge band outward from the tile's
interior (``u = 0`` next to the interior for the top band, ``u = 0`` the last
row for the bottom band), they are the top rows ``u >= j_y`` and the bottom
rows ``u < j_y``: the whole top band plus a prefix ``u < j_y`` of (bottom
minus top).  Pairs of rows ``(u, u + l_y - j_y)`` make that prefix a
cumulative sum along a diagonal of ``(j_y, l_y)``, the whole band a function
of ``j_y - l_y`` alone (Toeplitz).  Columns likewise.  So

    G = T(j - l) + Y[j_y, l_y, j_x - l_x] + X[j_x, l_x, j_y - l_y] + C[j, l]

with ``T`` the autocorrelation minus the band autocorrelations,
``Y``/``X`` diagonal prefix sums of row/column correlations of the edge bands
(matrix products over the band, ``O(N h^3)``), and ``C`` the diagonal prefix
sums, in both directions, of one signed sum of outer products of the four
``2h x 2h`` corner blocks.  ``G`` is built by two diagonal scans (first over
``(j_x, l_x)``, then over ``(j_y, l_y)``) whose boundary values carry the
Toeplitz parts, so it is written once.  No design matrix is formed: the cost
is one FFT autocorrelation plus ``O(N h^3 + h^4)`` border work per tile,
against ``O(N^2 h^4)`` for the dense product.
"""

from __future__ import annotations

import numpy as np
import scipy.fft as sfft
from numpy.lib.stride_tricks import as_strided, sliding_window_view
from scipy.ndimage import maximum_filter

__all__ = ["fft_shape", "fit_region", "valid_gram", "dense_gram", "design_rows"]

#: Signs of the corner blocks (bottom-right, bottom-left, top-right, top-left) in the corner term.
_CORNER_SIGNS = np.array([1.0, -1.0, -1.0, 1.0])


def fft_shape(tile_shape: tuple[int, int], half: int) -> tuple[int, int]:
    """FFT size that holds every correlation lag up to ``2 * half`` without wrap."""
    return tuple(sfft.next_fast_len(n + 2 * half, real=True) for n in tile_shape)  # type: ignore[return-value]


def fit_region(bad: np.ndarray, kernel_size: int) -> np.ndarray:
    """Target pixels whose whole kernel footprint is inside the tile and good."""
    n, ny, nx = bad.shape
    h = kernel_size // 2
    region = np.zeros(bad.shape, dtype=bool)
    region[:, h : ny - h, h : nx - h] = True
    for i in range(n):
        if bad[i].any():
            region[i] &= ~maximum_filter(bad[i].view(np.uint8), size=kernel_size, mode="constant").astype(bool)
    return region


def valid_gram(
    sources: np.ndarray, half: int, spectra: np.ndarray | None = None
) -> np.ndarray:
    """Exact Gram matrices over the valid box of each tile.

    Parameters
    ----------
    sources
        ``(n, ny, nx)`` float64 tiles (bad pixels already set to zero).
    half
        Kernel half-size ``h``; the kernel is ``(2h+1, 2h+1)``.
    spectra
        Optional ``rfft2(sources, s=fft_shape(...))``, to reuse a transform.

    Returns
    -------
    numpy.ndarray
        ``(n, k*k, k*k)`` with ``k = 2h + 1``, rows and columns in kernel
        raster order.
    """
    sources = np.asarray(sources, dtype=np.float64)
    n, ny, nx = sources.shape
    k = 2 * half + 1
    shape = fft_shape((ny, nx), half)
    if half == 0:  # a 1x1 kernel: the valid box is the whole tile, the Gram its sum of squares
        return np.einsum("nyx,nyx->n", sources, sources)[:, None, None]
    grams = np.empty((n, k * k, k * k))
    # one tile at a time: its transforms and border arrays stay in cache
    for i in range(n):
        spectrum = sfft.rfft2(sources[i], s=shape) if spectra is None else spectra[i]
        auto = _autocorrelation_lags(spectrum, shape, 2 * half)
        _tile_gram(sources[i], auto, half, grams[i].reshape(k, k, k, k))
    return grams


def _autocorrelation_lags(spectrum: np.ndarray, shape: tuple[int, int], max_lag: int) -> np.ndarray:
    """Autocorrelation ``A[max_lag + dy, max_lag + dx]`` for ``|dy|, |dx| <= max_lag``.

    ``spectrum`` is the ``rfft2`` of the tile padded to ``shape``.  Only the
    rows ``0 <= dy <= max_lag`` are transformed back (the power spectrum is
    real, so the first inverse is a half-length ``ihfft``); the other half
    follows from ``A[-d] = A[d]``.
    """
    power = spectrum.real**2 + spectrum.imag**2
    rows = sfft.irfft(sfft.ihfft(power, axis=0)[: max_lag + 1], n=shape[1], axis=1)
    auto = np.empty((2 * max_lag + 1, 2 * max_lag + 1))
    auto[max_lag:, max_lag:] = rows[:, : max_lag + 1]
    auto[max_lag:, :max_lag] = rows[:, -max_lag:]
    auto[:max_lag] = auto[: max_lag : -1, ::-1]
    return auto


def _band_correlations(bands: np.ndarray, max_lag: int) -> np.ndarray:
    """Correlations of every pair of rows of each band, at lags up to ``max_lag``.

    ``bands`` is ``(n, r, L)``.  Returns ``P`` of shape ``(n, r, r, 2 * max_lag + 1)``
    with ``P[i, a, b, max_lag + d] = sum_x bands[i, a, x] * bands[i, b, x + d]``
    (zero past the band's ends).  The lags ``d >= 0`` are one matrix product
    with shifted copies of the band; ``d < 0`` follow by symmetry,
    ``P[a, b, -d] = P[b, a, d]``.
    """
    n, r, length = bands.shape
    padded = np.zeros((n, r, length + max_lag))
    padded[:, :, :length] = bands
    # shifted[i, b, d, x] = bands[i, b, x + d]
    shifted = np.ascontiguousarray(sliding_window_view(padded, length, axis=2))
    forward = np.matmul(bands, shifted.reshape(n, r * (max_lag + 1), length).transpose(0, 2, 1))
    forward = forward.reshape(n, r, r, max_lag + 1)
    pairs = np.empty((n, r, r, 2 * max_lag + 1))
    pairs[..., max_lag:] = forward
    pairs[..., :max_lag] = forward.transpose(0, 2, 1, 3)[..., :0:-1]
    return pairs


def _diag_prefix(x: np.ndarray) -> np.ndarray:
    """``y[m, f] = sum_{t >= 1} x[m - t, f - t]`` over the first two axes.

    ``x`` has length ``w`` on both, ``y`` has ``w + 1``; entries with ``m - t``
    or ``f - t`` below zero contribute nothing.
    """
    w = x.shape[0]
    y = np.empty((w + 1, w + 1, *x.shape[2:]))
    y[0] = 0.0
    y[:, 0] = 0.0
    for m in range(1, w + 1):
        np.add(y[m - 1, :-1], x[m - 1], out=y[m, 1:])
    return y


def _diag_totals(prefix: np.ndarray) -> np.ndarray:
    """Whole-diagonal sums from a ``_diag_prefix`` result, indexed by ``f - m + w``.

    ``prefix`` is ``(w + 1, w + 1, ...)``; the sum of a whole diagonal is its
    last entry, on the row ``m = w`` or the column ``f = w``.
    """
    w = prefix.shape[0] - 1
    totals = np.empty((2 * w + 1, *prefix.shape[2:]))
    totals[: w + 1] = prefix[w, :]
    totals[w:] = prefix[w::-1, w]
    return totals


def _tile_gram(src: np.ndarray, auto: np.ndarray, half: int, gram: np.ndarray) -> None:
    """Write the Gram of one ``(ny, nx)`` tile into ``gram``, ``(k, k, k, k)`` as ``[jy, jx, ly, lx]``.

    ``auto`` holds the tile's autocorrelation lags ``(4h+1, 4h+1)``.  Lags are
    stored with an offset ``2h``: ``[..., 2h + d]`` is lag ``d``.
    """
    ny, nx = src.shape
    w = 2 * half
    k = w + 1
    # Edge bands, rows numbered outward from the interior; columns keep their order.
    top = src[w - 1 :: -1]  # top[u] = row w-1-u
    bottom = src[: ny - w - 1 : -1]  # bottom[u] = row ny-1-u
    left = src.T[w - 1 :: -1]  # left[v] = column w-1-v
    right = src.T[: nx - w - 1 : -1]  # right[v] = column nx-1-v
    if ny == nx:
        top_pairs, bottom_pairs, left_pairs, right_pairs = _band_correlations(
            np.stack([top, bottom, left, right]), w
        )
    else:
        top_pairs, bottom_pairs = _band_correlations(np.stack([top, bottom]), w)
        left_pairs, right_pairs = _band_correlations(np.stack([left, right]), w)
    # The same correlations within the first 2h columns (rows) only: the corner blocks.
    tl_rows, bl_rows, tl_cols, tr_cols = _band_correlations(
        np.stack([top[:, :w], bottom[:, :w], left[:, :w], right[:, :w]]), w
    )

    # Row pairs [u, u', w + lag_x]: minus (bottom band - top band) of the row
    # correlations, their part inside the left 2h columns added back (counted
    # outside both ranges); the y scan sums it along (jy, ly) diagonals.
    rows_step = (bl_rows - tl_rows) - (bottom_pairs - top_pairs)
    # Column pairs [v, v', w + lag_y] likewise, summed here along (jx, lx)
    # diagonals; whole diagonals give the band autocorrelations (Toeplitz part).
    prefixes = _diag_prefix(np.stack([(tr_cols - tl_cols) - (right_pairs - left_pairs), top_pairs - tl_rows,
                                      left_pairs], axis=2))
    cols_prefix = prefixes[:, :, 0]  # [jx, lx, lag_y]
    top_band_auto = _diag_totals(prefixes[:, :, 1])  # [w + ly - jy, lag_x]
    left_band_auto = _diag_totals(prefixes[:, :, 2])  # [w + lx - jx, lag_y]
    toeplitz = auto - top_band_auto[::-1] - left_band_auto[::-1].T  # [w + jy - ly, w + jx - lx]
    st = toeplitz.strides
    # y_edge[jx, lx, w + lag_y]: every term of G that is Toeplitz in y
    y_edge = cols_prefix + as_strided(toeplitz[:, w:], shape=(k, k, 2 * w + 1), strides=(st[1], -st[1], st[0]))

    # Corner term: one signed sum of outer products of the corner blocks, rows
    # and columns numbered outward; its x index padded to k so that a diagonal
    # step is a shift by one in the flattened (b, v') axes.
    corners = np.zeros((4, w, k))
    corners[0, :, :w] = bottom[:, : nx - w - 1 : -1]
    corners[1, :, :w] = bottom[:, w - 1 :: -1]
    corners[2, :, :w] = top[:, : nx - w - 1 : -1]
    corners[3, :, :w] = top[:, w - 1 :: -1]
    signed = (corners[:, :, :w] * _CORNER_SIGNS[:, None, None]).reshape(4, w * w)
    outer = (signed.T @ corners.reshape(4, w * k)).reshape(w, w, w * k)  # [a, v, (b, v')]

    # x scan: x_sums[a, jx, b, lx] = rows_step[a, b, jx - lx] + sum_{t >= 1} outer[a, jx - t, b, lx - t].
    # Each step adds a whole (b, lx) plane shifted by one; the lx = 0 column it
    # spoils is the scan's boundary, set afterwards.
    x_sums = np.empty((w, k, w, k))
    x_sums[:, 0] = rows_step[:, :, w::-1]
    x_boundary = rows_step[:, :, w:].transpose(0, 2, 1)  # [a, jx, b]
    x_planes = x_sums.reshape(w, k, w * k)
    for m in range(1, k):
        np.add(x_planes[:, m - 1, :-1], outer[:, m - 1, :-1], out=x_planes[:, m, 1:])
        x_sums[:, m, :, 0] = x_boundary[:, m]

    # y scan into G: G[jy, jx, ly, lx] = y_edge[jx, lx, jy - ly] + sum_{t >= 1} x_sums[jy - t, jx, ly - t, lx].
    gram[0] = y_edge[:, :, w::-1].transpose(0, 2, 1)
    gram[:, :, 0] = y_edge[:, :, w:].transpose(2, 0, 1)
    for m in range(1, k):
        np.add(gram[m - 1, :, :-1], x_sums[m - 1], out=gram[m, :, 1:])


def design_rows(source: np.ndarray, half: int, pixels: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Rows ``x_p[j] = S(p - a_j)`` of the design matrix for target pixels ``p``.

    ``pixels`` are (row, column) index arrays of pixels inside the valid box.
    """
    k = 2 * half + 1
    windows = sliding_window_view(source, (k, k))  # [py - h, px - h] -> S[py-h : py+h+1, ...]
    rows = windows[pixels[0] - half, pixels[1] - half][:, ::-1, ::-1]
    return rows.reshape(len(pixels[0]), k * k)


def dense_gram(source: np.ndarray, half: int) -> np.ndarray:
    """Reference Gram from the explicit design matrix (slow; for tests)."""
    ny, nx = source.shape
    yy, xx = np.mgrid[half : ny - half, half : nx - half]
    rows = design_rows(source, half, (yy.ravel(), xx.ravel()))
    return rows.T @ rows
