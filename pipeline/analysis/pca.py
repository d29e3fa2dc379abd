"""Principal components of a kernel field across a stack of images.

The standard decomposition of PSF-variation studies: each image contributes
one vector, its kernels at a common grid of positions (``G`` positions of
``k x k`` pixels) flattened to ``G k^2`` numbers; the stack's mean vector is
subtracted and the leading principal components of what is left are found.
Each component is itself a kernel field over the grid: the part of the stack's
variation that moves together.  For display it is factored into an
*eigen-kernel* (``k x k``) times a *spatial pattern* (its weight at each grid
position), the best such product (the leading singular pair of the component
arranged as a ``G x k^2`` matrix); ``separability`` says how much of the
component that product holds (1: the component is one kernel shape whose
strength varies over the field).

>>> pca = kernel_pca(kernels, n_components=4)      # kernels: (n_images, gy, gx, k, k)
>>> pca.explained_fraction                          # of the total variance, per component
>>> pca.amplitudes[:, 0]                            # each image's weight on the first component

Directions: a reverse image's kernels (its target the sharper image) blur the
target into the source, a forward image's the source into the target; they are
not vectors of one space (roughly, one is the other's inverse), so a
decomposition of both together would describe the difference between the two
kinds, not the variation of either.  Give each image's direction
(``directions=``, e.g. :func:`pipeline.analysis.maps.image_directions`) and a
stack of both is refused, naming the fix: decompose each direction's images
apart (the survey, :func:`pipeline.analysis.survey.survey`, decomposes the
images of the stack's majority direction and lists the others).

Pure NumPy.  Up to 2000 images (or vector length) the decomposition is exact
(an eigendecomposition of the smaller Gram matrix); above, a randomised range
finder with power iterations gives the leading components (to about 1e-6 of
their variance for the well-separated leading components of kernel stacks).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError, OptionError

__all__ = ["KernelPCA", "kernel_pca", "NORMALIZE"]

#: Accepted ``normalize`` values of :func:`kernel_pca`.
NORMALIZE = (None, "kernel", "image")

#: Largest side of the data matrix decomposed exactly; above it, the randomised solver.
EXACT_LIMIT = 2000


@dataclass(frozen=True)
class KernelPCA:
    """The principal components of a stack's kernel fields (:func:`kernel_pca`).

    ``grid`` below is the shape of the positions (e.g. ``(5, 5)``), ``k`` the
    kernel side, ``n`` the number of images and ``m`` of components.
    """

    mean: np.ndarray  #: ``(*grid, k, k)`` the stack's mean kernel field
    components: np.ndarray  #: ``(m, *grid, k, k)`` unit vectors (over all grid and kernel pixels)
    explained_variance: np.ndarray  #: ``(m,)`` variance along each component (sum of squares / (n - 1))
    explained_fraction: np.ndarray  #: ``(m,)`` its fraction of the total variance
    total_variance: float  #: sum of the variances of every grid-and-kernel pixel
    amplitudes: np.ndarray  #: ``(n, m)`` each image's projection on each component (mean removed)
    eigen_kernels: np.ndarray  #: ``(m, k, k)`` unit-norm kernel shape of each component
    patterns: np.ndarray  #: ``(m, *grid)`` its weight at each position: component ~ pattern x eigen-kernel
    separability: np.ndarray  #: ``(m,)`` fraction of each component's norm in pattern x eigen-kernel
    normalize: str | None  #: how the kernels were normalised before the decomposition

    @property
    def n_components(self) -> int:
        return len(self.explained_fraction)

    def reconstruct(self, amplitudes: np.ndarray | None = None) -> np.ndarray:
        """Kernel fields ``(n, *grid, k, k)`` from the mean and the components with ``amplitudes``
        (default: the images' own): the stack as the leading components see it."""
        amp = self.amplitudes if amplitudes is None else np.atleast_2d(np.asarray(amplitudes, dtype=np.float64))
        flat = self.components.reshape(self.n_components, -1)
        return (self.mean.reshape(1, -1) + amp @ flat).reshape(len(amp), *self.mean.shape)


def _normalised(x: np.ndarray, normalize: str | None) -> np.ndarray:
    """``x`` ``(n, g, k, k)`` divided by each kernel's sum, or by each image's mean kernel sum."""
    if normalize is None:
        return x
    sums = x.sum(axis=(-2, -1), keepdims=True)
    if normalize == "image":
        sums = sums.mean(axis=1, keepdims=True)
    if not np.all(np.abs(sums) > 0):
        raise InputError(f"normalize={normalize!r}: some kernels sum to zero; use normalize=None")
    return x / sums


def _leading(x: np.ndarray, m: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Leading ``m`` singular values and right singular vectors ``(m, d)`` of ``x`` ``(n, d)``."""
    n, d = x.shape
    if min(n, d) <= EXACT_LIMIT:
        if n <= d:  # eigenvectors of x x^T give the right singular vectors through x^T
            w, u = np.linalg.eigh(x @ x.T)
            order = np.argsort(w)[::-1][:m]
            s = np.sqrt(np.clip(w[order], 0.0, None))
            with np.errstate(invalid="ignore", divide="ignore"):
                vt = (u[:, order].T @ x) / s[:, None]
        else:
            w, v = np.linalg.eigh(x.T @ x)
            order = np.argsort(w)[::-1][:m]
            s = np.sqrt(np.clip(w[order], 0.0, None))
            vt = v[:, order].T
        vt = np.where(s[:, None] > s[0] * 1e-12 if s.size and s[0] > 0 else False, vt, 0.0)
        return s, vt
    # randomised range finder (Halko, Martinsson & Tropp 2011), power iterations re-orthonormalised
    rng = np.random.default_rng(seed)
    p = min(m + 10, min(n, d))
    q, _ = np.linalg.qr(x @ rng.standard_normal((d, p)))
    for _ in range(4):
        z, _ = np.linalg.qr(x.T @ q)
        q, _ = np.linalg.qr(x @ z)
    _, s, vt = np.linalg.svd(q.T @ x, full_matrices=False)
    return s[:m], vt[:m]


def _one_direction(directions: np.ndarray, n: int) -> None:
    """Refuse ``directions`` that are not ``(n,)`` or that hold both 1 (forward) and -1 (reverse)."""
    if directions.shape != (n,):
        raise InputError(f"directions must give each of the {n} images its direction, got shape {directions.shape}")
    kinds = {int(d) for d in np.unique(directions)}
    if not kinds <= {1, -1}:
        raise InputError(f"directions must be 1 (forward) or -1 (reverse), got {sorted(kinds - {1, -1})}: leave "
                         "images without a decided direction out")
    if kinds == {1, -1}:
        reverse = np.flatnonzero(directions == -1)
        raise InputError(f"the kernels are of both directions ({n - reverse.size} forward, {reverse.size} reverse: "
                         f"images {reverse[:10].tolist()}{' ...' if reverse.size > 10 else ''}); a reverse kernel "
                         "blurs the target, a forward one the source, and one decomposition of both would mix them: "
                         "decompose each direction's images apart (kernels[directions == 1], then "
                         "kernels[directions == -1])")


def kernel_pca(kernels: np.ndarray, n_components: int = 4, *, normalize: str | None = None,
               seed: int = 0, directions: np.ndarray | None = None) -> KernelPCA:
    """Principal components of a stack of kernel fields.

    Parameters
    ----------
    kernels
        ``(n_images, *grid, k, k)``: each image's kernels at a common grid of
        positions (e.g. its model's kernels at 5 x 5 positions,
        :func:`pipeline.analysis.maps.model_kernels_at`); all finite.
    n_components
        How many components to return (at most ``n_images``; fewer where the
        stack spans fewer dimensions, the rest then have zero variance).
    normalize
        ``None`` (the kernels as given), ``"kernel"`` (each kernel divided by its
        sum: shapes only, the flux scale left out) or ``"image"`` (each image's
        kernels divided by their mean sum: the flux scale's variation across the
        field kept, its overall level left out).
    seed
        Of the randomised solver used above :data:`EXACT_LIMIT` images and vector length.
    directions
        ``(n_images,)``: each image's direction (``1`` forward, ``-1`` reverse, as a kernel map's
        ``direction`` variable); images of both are refused with an
        :class:`~pipeline.errors.InputError` (see the module: decompose each direction apart).
        ``None``: the kernels are taken to be of one direction.

    Returns
    -------
    KernelPCA
        Components in order of decreasing variance.  Signs are fixed so that
        each eigen-kernel's strongest pixel is positive and each spatial
        pattern sums to a positive number (a component that is a pure gradient
        across the field, summing to about zero, keeps an arbitrary sign).
    """
    x = np.asarray(kernels, dtype=np.float64)
    if x.ndim < 4 or x.shape[-1] != x.shape[-2]:
        raise InputError(f"kernels must be (n_images, *grid, k, k) with square kernels, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        bad = np.flatnonzero(~np.all(np.isfinite(x.reshape(len(x), -1)), axis=1))
        raise InputError(f"kernels of images {bad[:10].tolist()} are not finite: leave images without a "
                         "model out")
    if normalize not in NORMALIZE:
        raise OptionError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
    if isinstance(n_components, bool) or not isinstance(n_components, (int, np.integer)) or n_components < 1:
        raise OptionError(f"n_components must be a positive integer, got {n_components!r}")
    n, grid, k = x.shape[0], x.shape[1:-2], x.shape[-1]
    if directions is not None:
        _one_direction(np.asarray(directions), n)
    if n < 2:
        raise InputError(f"a principal-component analysis needs at least 2 images, got {n}")
    g = int(np.prod(grid))
    x = _normalised(x.reshape(n, g, k, k), normalize)
    flat = x.reshape(n, -1)
    mean = flat.mean(axis=0)
    centred = flat - mean
    m = int(min(n_components, n))
    s, vt = _leading(centred, m, seed)
    if len(s) < m:  # a vector shorter than the number of components asked for
        s = np.concatenate([s, np.zeros(m - len(s))])
        vt = np.concatenate([vt, np.zeros((m - len(vt), vt.shape[1]))])
    total = float(np.sum(centred**2))
    variance = s**2 / (n - 1)
    # factor each component (g x k^2) into pattern x eigen-kernel; fix the sign by the pattern's sum
    eigen = np.zeros((m, k * k))
    patterns = np.zeros((m, g))
    separability = np.zeros(m)
    for j in range(m):
        u, sv, wt = np.linalg.svd(vt[j].reshape(g, k * k), full_matrices=False)
        pattern, shape = u[:, 0] * sv[0], wt[0]
        if shape[np.argmax(np.abs(shape))] < 0:  # the eigen-kernel's strongest pixel positive
            pattern, shape = -pattern, -shape
        if pattern.sum() < 0:  # the component's sign: its pattern sums to a positive number
            pattern, vt[j] = -pattern, -vt[j]
        eigen[j], patterns[j] = shape, pattern
        separability[j] = sv[0] ** 2 / np.sum(sv**2) if np.sum(sv**2) > 0 else 0.0
    amplitudes = centred @ vt.T
    return KernelPCA(
        mean=mean.reshape(*grid, k, k),
        components=vt.reshape(m, *grid, k, k),
        explained_variance=variance,
        explained_fraction=(s**2 / total) if total > 0 else np.zeros(m),
        total_variance=total / (n - 1),
        amplitudes=amplitudes,
        eigen_kernels=eigen.reshape(m, k, k),
        patterns=patterns.reshape(m, *grid),
        separability=separability,
        normalize=normalize,
    )
