"""Adaptive (Gaussian-weighted) second moments of kernel stamps.

The moments are those of the adaptive-moment scheme used for PSF shapes in
weak lensing: an elliptical Gaussian weight ``W = exp(-d^T Mw^-1 d / 2)``,
centred on the current centroid, is iterated to the fixed point where

* the weighted centroid equals the weight centre, and
* ``Mw = 2 * sum(I W d d^T) / sum(I W)`` (``d`` taken about the centroid).

For a stamp that is an elliptical Gaussian of covariance ``C`` the fixed point
is ``Mw = C``, so the reported covariance is exact for Gaussians and close to
the core covariance of anything else, while noise in the wings of the stamp is
suppressed by the weight.

Every stamp of a batch iterates at the same time; a stamp stops updating once
it has converged (or failed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import InputError, OptionError
from .validate import check_positive_int

__all__ = ["FWHM_PER_SIGMA", "Moments", "adaptive_moments"]

#: FWHM of a Gaussian divided by its sigma, ``2 sqrt(2 ln 2)``.
FWHM_PER_SIGMA: float = 2.0 * math.sqrt(2.0 * math.log(2.0))

# Iteration states.
_ACTIVE, _DONE, _FAILED = 0, 1, 2

# Smallest allowed eigenvalue of the weight covariance (pixels squared).
_MIN_EIG = 0.05


@dataclass(frozen=True)
class Moments:
    """Adaptive moments of a batch of stamps.

    Every field is a float64 array of shape ``(n,)`` (shape ``()`` for a
    single stamp), except ``converged`` which is boolean. Where ``converged``
    is False every field except ``flux`` is NaN; a stamp containing a
    non-finite value has ``flux`` NaN as well.

    Attributes
    ----------
    flux
        Plain sum of the stamp.
    y, x
        Adaptive centroid, in pixels, as an offset from the centre index
        ``(ky // 2, kx // 2)``; ``+y`` is towards higher row indices.
    myy, mxx, mxy
        Converged adaptive covariance (for an elliptical Gaussian: its
        covariance), in pixels squared.
    sigma
        ``(myy * mxx - mxy**2) ** 0.25``.
    fwhm
        ``FWHM_PER_SIGMA * sigma``.
    e1, e2
        Distortion ``(mxx - myy) / (mxx + myy)`` and ``2 mxy / (mxx + myy)``.
    ellipticity
        ``hypot(e1, e2)``, i.e. ``(a^2 - b^2) / (a^2 + b^2)``.
    converged
        True where the iteration reached its fixed point.
    """

    flux: np.ndarray
    y: np.ndarray
    x: np.ndarray
    myy: np.ndarray
    mxx: np.ndarray
    mxy: np.ndarray
    sigma: np.ndarray
    fwhm: np.ndarray
    e1: np.ndarray
    e2: np.ndarray
    ellipticity: np.ndarray
    converged: np.ndarray


def _check_options(max_iter: int, tol: float) -> None:
    check_positive_int("max_iter", max_iter)
    try:
        tol_f = float(tol)
    except (TypeError, ValueError):
        raise OptionError(f"tol must be a positive number, got {tol!r}") from None
    if not (math.isfinite(tol_f) and tol_f > 0.0):
        raise OptionError(f"tol must be a positive finite number, got {tol!r}")


def _as_stamps(kernels: np.ndarray) -> np.ndarray:
    arr = np.asarray(kernels)
    if arr.dtype == np.bool_ or not (
        np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
    ):
        raise InputError(f"kernels must be a real numeric array, got dtype {arr.dtype}")
    if arr.ndim not in (2, 3):
        raise InputError(
            f"kernels must have shape (n, ky, kx) or (ky, kx), got shape {arr.shape}"
        )
    if arr.shape[-1] < 1 or arr.shape[-2] < 1:
        raise InputError(f"kernel stamps must not be empty, got shape {arr.shape}")
    stamps = arr.astype(np.float64, copy=False)
    return stamps[None] if stamps.ndim == 2 else stamps


def _inv2(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, ...]:
    """Inverse ``(ia, ib, ic)`` and determinant of ``[[a, b], [b, c]]``."""
    det = a * c - b * b
    return c / det, -b / det, a / det, det


def _min_eig(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Smaller eigenvalue of ``[[a, b], [b, c]]``."""
    return 0.5 * (a + c) - np.hypot(0.5 * (a - c), b)


def _is_pd(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    return (a > 0.0) & (c > 0.0) & (a * c - b * b > 0.0)


def _warm_start(start: Moments, n: int, finite: np.ndarray, cy: np.ndarray, cx: np.ndarray,
                myy: np.ndarray, mxx: np.ndarray, mxy: np.ndarray) -> None:
    """Set the finite stamps' starting centroid and covariance, in place, where ``start`` converged."""
    fields = [np.asarray(getattr(start, name), dtype=np.float64).reshape(-1)
              for name in ("y", "x", "myy", "mxx", "mxy")]
    ok = np.asarray(start.converged, dtype=bool).reshape(-1)
    if ok.size != n or any(f.size != n for f in fields):
        raise OptionError(f"start must hold the moments of {n} stamps, got {ok.size}")
    ok = ok & finite & _is_pd(fields[2], fields[4], fields[3])
    for out, value in zip((cy, cx, myy, mxx, mxy), fields):
        out[ok] = value[ok]


def adaptive_moments(
    kernels: np.ndarray, *, max_iter: int = 200, tol: float = 1e-6, start: Moments | None = None
) -> Moments:
    """Gaussian-weighted adaptive second moments of kernel stamps.

    Parameters
    ----------
    kernels
        Stamps, shape ``(n, ky, kx)`` or ``(ky, kx)``, any real dtype
        (computed in float64).
    max_iter
        Maximum number of iterations; a stamp not converged by then is
        reported with ``converged=False``.
    tol
        Convergence tolerance: on the change of the centroid (pixels) and on
        the change of the weight covariance relative to its mean diagonal.
    start
        Moments of stamps like these (e.g. an earlier iterate of the same
        kernels), one per stamp: where converged, the iteration starts from
        their centroid and covariance instead of a round weight of width
        ``min(ky, kx) / 6`` at the positive part's centroid.

    Returns
    -------
    Moments
        Per-stamp moments; arrays of shape ``(n,)``, or ``()`` for one stamp.

    Raises
    ------
    InputError
        If ``kernels`` is not a non-empty 2-D or 3-D real array.
    OptionError
        If ``max_iter`` or ``tol`` is out of range, or ``start`` does not hold
        one set of moments per stamp.

    Notes
    -----
    A stamp fails (``converged=False``, shape outputs NaN) when its weighted
    flux is not positive, its weighted covariance is not positive definite,
    its centroid leaves the stamp or its width grows beyond the stamp size.
    A stamp whose core is undersampled (a sampled Gaussian narrower than about
    FWHM = 2 px along its minor axis) may have no fixed point off the pixel grid:
    the weight collapses onto a pixel, row or column and the stamp fails.
    Each update combines the plain fixed-point step ``Mw <- 2 Q`` with the
    step that is exact for a Gaussian, ``Mw <- (Q^-1 - Mw^-1)^-1``, and falls
    back towards the plain step where the iteration stops contracting.
    """
    _check_options(max_iter, tol)
    single = np.ndim(kernels) == 2
    stamps = _as_stamps(kernels)
    n, ky, kx = stamps.shape
    tol = float(tol)

    gy = (np.arange(ky, dtype=np.float64) - ky // 2)[None, :, None]
    gx = (np.arange(kx, dtype=np.float64) - kx // 2)[None, None, :]

    flux = stamps.sum(axis=(1, 2))
    finite = np.isfinite(stamps).all(axis=(1, 2))
    flux = np.where(finite, flux, np.nan)

    state = np.where(finite, _ACTIVE, _FAILED).astype(np.int8)
    cy = np.zeros(n)
    cx = np.zeros(n)
    s0 = max(min(ky, kx) / 6.0, 0.5)
    myy = np.full(n, s0 * s0)
    mxx = np.full(n, s0 * s0)
    mxy = np.zeros(n)
    beta = np.ones(n)  # weight of the Gaussian-exact step in each update
    last_change = np.full(n, np.inf)

    # Start the centroid at the centroid of the positive part of the stamp.
    act = np.flatnonzero(finite)
    if act.size:
        pos = np.clip(stamps[act], 0.0, None)
        tot = pos.sum(axis=(1, 2))
        ok = tot > 0.0
        with np.errstate(divide="ignore", invalid="ignore"):
            cy[act] = np.where(ok, (pos * gy).sum(axis=(1, 2)) / tot, 0.0)
            cx[act] = np.where(ok, (pos * gx).sum(axis=(1, 2)) / tot, 0.0)

    if start is not None:
        _warm_start(start, n, finite, cy, cx, myy, mxx, mxy)

    max_sigma2 = float(max(ky, kx)) ** 2
    lim_y, lim_x = ky / 2.0, kx / 2.0

    # Failures show up as non-finite or non-positive values, which the checks
    # in the loop turn into ``converged=False``.
    with np.errstate(all="ignore"):
        for _ in range(max_iter):
            act = np.flatnonzero(state == _ACTIVE)
            if act.size == 0:
                break
            img = stamps[act]
            c_y, c_x = cy[act], cx[act]
            w_yy, w_xy, w_xx = myy[act], mxy[act], mxx[act]
            i_yy, i_xy, i_xx, _ = _inv2(w_yy, w_xy, w_xx)

            # The weight is separable but for its cross term: its sums over the stamp come from the
            # weighted image's row and column sums and one product by the column offsets.
            dy = gy[0, :, 0] - c_y[:, None]  # (active, ky)
            dx = gx[0, 0, :] - c_x[:, None]  # (active, kx)
            iw = (-i_xy[:, None] * dy)[:, :, None] * dx[:, None, :]  # -rho2 / 2
            iw -= (0.5 * i_yy[:, None] * dy * dy)[:, :, None]
            iw -= (0.5 * i_xx[:, None] * dx * dx)[:, None, :]
            np.exp(iw, out=iw)
            iw *= img
            rows = iw.sum(axis=2)
            cols = iw.sum(axis=1)
            row_x = np.matmul(iw, dx[:, :, None])[:, :, 0]  # sum over x of I W dx, each row
            a = rows.sum(axis=1)
            bad = ~(a > 0.0)
            a_safe = np.where(bad, 1.0, a)
            m_y = (rows * dy).sum(axis=1) / a_safe
            m_x = (cols * dx).sum(axis=1) / a_safe
            q_yy = (rows * dy * dy).sum(axis=1) / a_safe - m_y * m_y
            q_xy = (row_x * dy).sum(axis=1) / a_safe - m_y * m_x
            q_xx = (cols * dx * dx).sum(axis=1) / a_safe - m_x * m_x
            bad |= ~_is_pd(q_yy, q_xy, q_xx)

            # Plain fixed-point step.
            n2_yy, n2_xy, n2_xx = 2.0 * q_yy, 2.0 * q_xy, 2.0 * q_xx
            c2_y, c2_x = c_y + m_y, c_x + m_x

            # Step exact for a Gaussian stamp: C = (Q^-1 - Mw^-1)^-1 and
            # centre = c_w + C Q^-1 m.
            iq_yy, iq_xy, iq_xx, _ = _inv2(q_yy, q_xy, q_xx)
            p_yy, p_xy, p_xx = iq_yy - i_yy, iq_xy - i_xy, iq_xx - i_xx
            g_yy, g_xy, g_xx, _ = _inv2(p_yy, p_xy, p_xx)
            t_y = iq_yy * m_y + iq_xy * m_x
            t_x = iq_xy * m_y + iq_xx * m_x
            cg_y = c_y + g_yy * t_y + g_xy * t_x
            cg_x = c_x + g_xy * t_y + g_xx * t_x
            use_g = (_is_pd(p_yy, p_xy, p_xx)
                     & (g_yy + g_xx <= 4.0 * (w_yy + w_xx))
                     & np.isfinite(cg_y) & np.isfinite(cg_x))
            b = np.where(use_g & ~bad, beta[act], 0.0)
            nb = 1.0 - b
            g_yy, g_xy, g_xx = (np.where(use_g, v, 0.0) for v in (g_yy, g_xy, g_xx))
            cg_y, cg_x = np.where(use_g, cg_y, 0.0), np.where(use_g, cg_x, 0.0)
            new_yy = nb * n2_yy + b * g_yy
            new_xy = nb * n2_xy + b * g_xy
            new_xx = nb * n2_xx + b * g_xx
            new_cy = nb * c2_y + b * cg_y
            new_cx = nb * c2_x + b * cg_x

            lam = _min_eig(new_yy, new_xy, new_xx)
            d_m = np.maximum.reduce([np.abs(new_yy - w_yy), np.abs(new_xy - w_xy),
                                     np.abs(new_xx - w_xx)]) / lam
            d_c = np.maximum(np.abs(new_cy - c_y), np.abs(new_cx - c_x))
            # A weight collapsing onto a row, column or pixel: no fixed point
            # exists for such an undersampled stamp.
            bad |= ~(lam >= _MIN_EIG)
            bad |= ~(new_yy + new_xx <= max_sigma2)
            bad |= ~((np.abs(new_cy) <= lim_y) & (np.abs(new_cx) <= lim_x))

            done = ~bad & (d_c < tol) & (d_m < tol)
            change = np.maximum(d_c, d_m)
            slow = ~bad & ~done & (change > 0.9 * last_change[act])
            beta[act] = np.where(slow, 0.5 * beta[act], beta[act])
            last_change[act] = change

            keep = ~bad
            cy[act] = np.where(keep, new_cy, cy[act])
            cx[act] = np.where(keep, new_cx, cx[act])
            myy[act] = np.where(keep, new_yy, myy[act])
            mxy[act] = np.where(keep, new_xy, mxy[act])
            mxx[act] = np.where(keep, new_xx, mxx[act])
            state[act] = np.where(bad, _FAILED, np.where(done, _DONE, _ACTIVE))

    converged = state == _DONE
    nan = np.nan
    cy, cx = np.where(converged, cy, nan), np.where(converged, cx, nan)
    myy, mxx = np.where(converged, myy, nan), np.where(converged, mxx, nan)
    mxy = np.where(converged, mxy, nan)
    det = myy * mxx - mxy * mxy
    sigma = det ** 0.25
    tr = mxx + myy
    e1 = (mxx - myy) / tr
    e2 = 2.0 * mxy / tr

    def out(v: np.ndarray) -> np.ndarray:
        return v.reshape(()) if single else v

    return Moments(
        flux=out(flux), y=out(cy), x=out(cx), myy=out(myy), mxx=out(mxx),
        mxy=out(mxy), sigma=out(sigma), fwhm=out(FWHM_PER_SIGMA * sigma),
        e1=out(e1), e2=out(e2), ellipticity=out(np.hypot(e1, e2)),
        converged=out(converged),
    )
