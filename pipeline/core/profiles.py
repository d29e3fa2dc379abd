"""Elliptical Gaussian and Moffat profiles on kernel stamps, fitted by Levenberg-Marquardt.

A profile of flux ``F`` centred ``(y, x)`` pixels from the stamp's centre,
with inverse covariance ``P = [[pyy, pxy], [pxy, pxx]]``, is

    g(d) = (1 + nu q) ** (-1 / nu),    q = d' P d / 2,

(``nu = 1 / beta``: a Moffat profile; ``nu -> 0``: the Gaussian ``exp(-q)``),
scaled to sum to ``F`` on the stamp, times fixed ``gains`` (what the data's
kernel is multiplied by, e.g. a taper's).  :func:`fit_profiles` minimises a
quadratic form ``H' M H - 2 b' H`` in that stamp ``H``, each tile's ``M``
given as a product: weighted least squares in the Fourier domain is one.
Parameters are ``(n, 7)`` arrays: ``F, y, x, pyy, pxx, pxy, nu``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["draw", "fit_profiles", "moffat_gain", "profile_stamps", "start_parameters"]
#: The least ``nu`` of a Moffat profile (``beta`` at most 1000: a Gaussian to 1e-3) and the most (``beta`` 1).
NU_RANGE = (1e-3, 1.0)

#: ``normal(x, rows)``: the ``(m, p, k, k)`` stamps ``x`` of tiles ``rows`` through those tiles' ``M``.
Normal = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _shape(params: np.ndarray, k: int, moffat: bool, *,
           derivatives: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Unnormalised profiles ``(n, k, k)`` and their derivatives ``(n, 5 or 6, k, k)`` by ``y, x, pyy, pxx,
    pxy`` (and ``nu``)."""
    lag = np.arange(k, dtype=np.float64) - k // 2
    y, x, pyy, pxx, pxy = (params[:, i, None, None] for i in range(1, 6))
    dy = lag[None, :, None] - y
    dx = lag[None, None, :] - x
    q = 0.5 * (pyy * dy**2 + 2.0 * pxy * dy * dx + pxx * dx**2)
    if moffat:
        nu = params[:, 6, None, None]
        base = 1.0 + nu * q
        g = base ** (-1.0 / nu)
    else:
        g = np.exp(-q)
    if not derivatives:
        return g, None
    slope = g / base if moffat else g  # -dg/dq
    basis = np.stack(np.broadcast_arrays(pyy * dy + pxy * dx, pxy * dy + pxx * dx, -0.5 * dy**2, -0.5 * dx**2,
                                         -dy * dx), axis=1)
    derivs = basis * slope[:, None]
    if moffat:
        by_nu = g * (np.log(base) / nu**2 - q / (nu * base))
        derivs = np.concatenate([derivs, by_nu[:, None]], axis=1)
    return g, derivs


def profile_stamps(params: np.ndarray, k: int, *, moffat: bool) -> np.ndarray:
    """The ``(n, k, k)`` profiles of ``params`` (each summing to its flux), without gains."""
    g, _ = _shape(params, k, moffat, derivatives=False)
    return g * (params[:, 0] / g.sum(axis=(1, 2)))[:, None, None]


def draw(params: np.ndarray, k: int) -> np.ndarray:
    """:func:`profile_stamps` of profiles of either kind: a Moffat profile where ``nu > 0``, else the Gaussian."""
    out = np.empty((len(params), k, k))
    moffat = params[:, 6] > 0
    for kind in (False, True):
        out[moffat == kind] = profile_stamps(params[moffat == kind], k, moffat=kind)
    return out


def _stamps(params: np.ndarray, gains: np.ndarray, moffat: bool) -> np.ndarray:
    """The stamps ``H`` ``(n, k, k)``: the profiles times the gains."""
    return profile_stamps(params, gains.shape[-1], moffat=moffat) * gains


def _jacobian(params: np.ndarray, gains: np.ndarray, moffat: bool) -> tuple[np.ndarray, np.ndarray]:
    """The stamps ``H`` ``(n, k, k)`` and their derivatives ``(n, p, k, k)`` by the free parameters."""
    g, derivs = _shape(params, gains.shape[-1], moffat)
    total = g.sum(axis=(1, 2))[:, None, None]
    flux = params[:, 0, None, None]
    unit = g / total
    jac = np.empty((len(g), 1 + derivs.shape[1], *g.shape[1:]))
    jac[:, 0] = unit * gains
    jac[:, 1:] = derivs - unit[:, None] * derivs.sum(axis=(2, 3), keepdims=True)
    jac[:, 1:] *= (flux / total * gains)[:, None]
    return flux * jac[:, 0], jac


def _valid(params: np.ndarray, k: int, moffat: bool) -> np.ndarray:
    pyy, pxx, pxy = params[:, 3], params[:, 4], params[:, 5]
    ok = np.isfinite(params).all(axis=1) & (pyy > 0) & (pxx > 0) & (pyy * pxx > pxy**2) & (params[:, 0] > 0)
    ok &= (np.abs(params[:, 1]) <= k // 2) & (np.abs(params[:, 2]) <= k // 2)
    if moffat:
        ok &= (params[:, 6] >= NU_RANGE[0]) & (params[:, 6] <= NU_RANGE[1])
    return ok


def start_parameters(flux: np.ndarray, y: np.ndarray, x: np.ndarray, myy: np.ndarray, mxx: np.ndarray,
                     mxy: np.ndarray) -> np.ndarray:
    """Gaussian parameters (``nu`` 0) from a flux, a centre and second moments (a covariance)."""
    det = myy * mxx - mxy**2
    return np.stack([flux, y, x, mxx / det, myy / det, -mxy / det, np.zeros_like(flux)], axis=1)


def fit_profiles(normal: Normal, rhs: np.ndarray, gains: np.ndarray, start: np.ndarray, *, moffat: bool,
                 iterations: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Levenberg-Marquardt steps minimising ``H' M H - 2 b' H`` over each tile's profile parameters.

    Parameters
    ----------
    normal : callable
        ``normal(x, rows)``: each tile's own ``M`` times its stamps, ``(len(rows), p, k, k)`` for the tiles
        ``rows`` (indices into the batch).
    rhs : numpy.ndarray
        ``b``, ``(n, k, k)``.
    gains : numpy.ndarray
        ``(n, k, k)``: ``H`` is the profile times these.
    start : numpy.ndarray
        ``(n, 7)`` starting parameters (valid ones: :func:`start_parameters`); with ``moffat``,
        ``nu`` within :data:`NU_RANGE`.
    moffat : bool
        Fit ``nu`` too (else the Gaussian, ``nu`` stays as it is).
    iterations : int
        Jacobians evaluated; each step is tried with up to three dampings.

    Returns
    -------
    params, stamps, value
        ``(n, 7)``, the stamps ``H`` ``(n, k, k)`` and the quadratic form's value ``(n,)``: at the start
        where no step lowered it.
    """
    n, k = len(start), gains.shape[-1]
    free = 7 if moffat else 6
    params = np.array(start, dtype=np.float64)
    everyone = np.arange(n)
    stamps, jac = _jacobian(params, gains, moffat)
    m_h = normal(stamps[:, None], everyone)[:, 0]
    value = _value(stamps, m_h, rhs)
    damping = np.full(n, 1e-3)
    eye = np.eye(free)
    for it in range(iterations):
        if it:
            jac = _jacobian(params, gains, moffat)[1]
        curvature = np.einsum("naij,nbij->nab", jac, normal(jac, everyone))
        gradient = np.einsum("naij,nij->na", jac, m_h - rhs)
        diag = np.diagonal(curvature, axis1=1, axis2=2)
        pending = np.arange(n)
        for _ in range(3):
            system = curvature[pending] + damping[pending, None, None] * (eye * diag[pending, :, None] + 1e-12 * eye)
            try:
                step = -np.linalg.solve(system, gradient[pending, :, None])[:, :, 0]
            except np.linalg.LinAlgError:  # a degenerate tile: least-norm steps for all (rare)
                step = -(np.linalg.pinv(system) @ gradient[pending, :, None])[:, :, 0]
            trial = params[pending].copy()
            trial[:, :free] += step
            ok = _valid(trial, k, moffat)
            trial[~ok] = params[pending][~ok]
            t_stamps = _stamps(trial, gains[pending], moffat)
            t_mh = normal(t_stamps[:, None], pending)[:, 0]
            t_value = _value(t_stamps, t_mh, rhs[pending])
            better = ok & (t_value < value[pending])
            took = pending[better]
            params[took], stamps[took], m_h[took], value[took] = trial[better], t_stamps[better], t_mh[better], \
                t_value[better]
            damping[pending] = np.where(better, damping[pending] / 3.0, damping[pending] * 10.0)
            pending = pending[~better]
            if not pending.size:
                break
    return params, stamps, value


def moffat_gain(normal: Normal, rhs: np.ndarray, gains: np.ndarray, params: np.ndarray) -> np.ndarray:
    """What freeing ``nu`` would lower the quadratic form by, as one Gauss-Newton step predicts it.

    From Gaussian parameters (``nu`` taken at its least, :data:`NU_RANGE`),
    ``g**2 / S``: ``g`` the form's half-gradient along ``nu`` and ``S`` its
    half-curvature there, both with the other parameters' optimal response
    taken out (a score test); 0 where the form rises with ``nu``.  One
    iteration's cost, to skip the Moffat fit where it cannot pay.
    """
    at = np.array(params, dtype=np.float64)
    at[:, 6] = NU_RANGE[0]
    everyone = np.arange(len(at))
    stamps, jac = _jacobian(at, gains, True)
    m_all = normal(np.concatenate([stamps[:, None], jac], axis=1), everyone)
    curvature = np.einsum("naij,nbij->nab", jac, m_all[:, 1:])
    gradient = np.einsum("naij,nij->na", jac, m_all[:, 0] - rhs)
    rest, cross = curvature[:, :6, :6], curvature[:, :6, 6]
    try:
        response = np.linalg.solve(rest, np.stack([cross, gradient[:, :6]], axis=2))
    except np.linalg.LinAlgError:
        return np.full(len(at), np.inf)  # undecided: fit
    schur = curvature[:, 6, 6] - np.einsum("na,na->n", cross, response[:, :, 0])
    score = gradient[:, 6] - np.einsum("na,na->n", cross, response[:, :, 1])
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where((score < 0) & (schur > 0), score**2 / schur, 0.0)


def _value(stamps: np.ndarray, m_stamps: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    return np.einsum("nij,nij->n", stamps, m_stamps - 2.0 * rhs)
