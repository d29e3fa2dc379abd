"""Elliptical Gaussian, Moffat and two-Gaussian profiles on kernel stamps, fitted by Levenberg-Marquardt.

A profile of flux ``F`` centred ``(y, x)`` pixels from the stamp's centre,
with inverse covariance ``P = [[pyy, pxy], [pxy, pxx]]``, is

    g(d) = (1 + nu q) ** (-1 / nu),    q = d' P d / 2,

(``nu = 1 / beta``: a Moffat profile; ``nu -> 0``: the Gaussian ``exp(-q)``),
or a core and a wing about the same centre, the wing's covariance ``s**2``
times the core's and ``phi`` of the light (a kernel whose wide wing neither
of the others describes),

    g(d) = (1 - phi) exp(-q) + (phi / s**2) exp(-q / s**2),

scaled to sum to ``F`` on the stamp, times fixed ``gains`` (what the data's
kernel is multiplied by, e.g. a taper's).  :func:`fit_profiles` minimises a
quadratic form ``H' M H - 2 b' H`` in that stamp ``H``, each tile's ``M``
given as a product: weighted least squares in the Fourier domain is one.
Parameters are ``(n, 9)`` arrays: ``F, y, x, pyy, pxx, pxy, nu, phi, s``;
a profile is a Moffat one where ``nu > 0``, two Gaussians where ``phi > 0``,
else the Gaussian (:func:`kinds`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["KINDS", "draw", "extension_gains", "fit_profiles", "kinds", "parameter_counts", "profile_stamps",
           "start_parameters"]
#: The least ``nu`` of a Moffat profile (``beta`` at most 1000: a Gaussian to 1e-3) and the most (``beta`` 1).
NU_RANGE = (1e-3, 1.0)
#: The wing's share of two Gaussians' light (above 0: else the Gaussian) and its width over the core's.
PHI_RANGE = (1e-4, 0.9)
SCALE_RANGE = (1.2, 6.0)
#: The wing's width over the core's at which :func:`extension_gains` tests for one.
WING_TEST_SCALE = 2.0

#: The profiles' kinds, in the order of :func:`kinds`' codes.
KINDS = ("gaussian", "moffat", "two_gaussians")
#: Each kind's free parameters (columns of the parameter arrays).
_FREE = {"gaussian": np.arange(6), "moffat": np.arange(7), "two_gaussians": np.array([0, 1, 2, 3, 4, 5, 7, 8])}

#: ``normal(x, rows)``: the ``(m, p, k, k)`` stamps ``x`` of tiles ``rows`` through those tiles' ``M``.
Normal = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _quadratic(params: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The offsets ``dy``, ``dx`` of the stamp's pixels from each profile's centre and ``q = d' P d / 2``."""
    lag = np.arange(k, dtype=np.float64) - k // 2
    y, x, pyy, pxx, pxy = (params[:, i, None, None] for i in range(1, 6))
    dy = lag[None, :, None] - y
    dx = lag[None, None, :] - x
    return dy, dx, 0.5 * (pyy * dy**2 + 2.0 * pxy * dy * dx + pxx * dx**2)


def _shape(params: np.ndarray, k: int, kind: str, *,
           derivatives: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Unnormalised profiles ``(n, k, k)`` of one ``kind`` and their derivatives ``(n, p - 1, k, k)`` by its free
    parameters but the flux (``y, x, pyy, pxx, pxy``, then ``nu``, or ``phi, s``)."""
    dy, dx, q = _quadratic(params, k)
    if kind == "moffat":
        nu = params[:, 6, None, None]
        base = 1.0 + nu * q
        g = base ** (-1.0 / nu)
        slope = g / base if derivatives else None  # -dg/dq
    elif kind == "two_gaussians":
        phi, s2 = params[:, 7, None, None], params[:, 8, None, None] ** 2
        core, wing = np.exp(-q), np.exp(-q / s2)
        g = (1.0 - phi) * core + (phi / s2) * wing
        slope = (1.0 - phi) * core + (phi / s2**2) * wing if derivatives else None
    else:
        g = np.exp(-q)
        slope = g
    if not derivatives:
        return g, None
    derivs = _by_shape(params, dy, dx) * slope[:, None]
    if kind == "moffat":
        by_nu = g * (np.log(base) / nu**2 - q / (nu * base))
        derivs = np.concatenate([derivs, by_nu[:, None]], axis=1)
    elif kind == "two_gaussians":
        s = params[:, 8, None, None]
        by_phi = wing / s2 - core
        by_s = phi * wing * (2.0 * q / s2 - 2.0) / s**3
        derivs = np.concatenate([derivs, by_phi[:, None], by_s[:, None]], axis=1)
    return g, derivs


def parameter_counts(params: np.ndarray) -> np.ndarray:
    """How many parameters each profile's kind fits (:func:`kinds`): 6, 7 or 8."""
    return np.array([_FREE[kind].size for kind in KINDS])[kinds(params)]


def _by_shape(params: np.ndarray, dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
    """``-dq`` by ``y, x, pyy, pxx, pxy``, ``(n, 5, k, k)``."""
    pyy, pxx, pxy = (params[:, i, None, None] for i in range(3, 6))
    return np.stack(np.broadcast_arrays(pyy * dy + pxy * dx, pxy * dy + pxx * dx, -0.5 * dy**2, -0.5 * dx**2,
                                        -dy * dx), axis=1)


def kinds(params: np.ndarray) -> np.ndarray:
    """Each profile's kind, as its index in :data:`KINDS`: two Gaussians where ``phi > 0``, a Moffat profile
    where ``nu > 0``, else the Gaussian."""
    return np.where(params[:, 7] > 0, 2, np.where(params[:, 6] > 0, 1, 0))


def profile_stamps(params: np.ndarray, k: int, *, kind: str) -> np.ndarray:
    """The ``(n, k, k)`` profiles of ``params`` of one ``kind`` (each summing to its flux), without gains."""
    g, _ = _shape(params, k, kind, derivatives=False)
    return g * (params[:, 0] / g.sum(axis=(1, 2)))[:, None, None]


def draw(params: np.ndarray, k: int) -> np.ndarray:
    """:func:`profile_stamps` of profiles of any kind, each as its own (:func:`kinds`)."""
    out = np.empty((len(params), k, k))
    code = kinds(params)
    for i, kind in enumerate(KINDS):
        if (code == i).any():
            out[code == i] = profile_stamps(params[code == i], k, kind=kind)
    return out


def _stamps(params: np.ndarray, gains: np.ndarray, kind: str) -> np.ndarray:
    """The stamps ``H`` ``(n, k, k)``: the profiles times the gains."""
    return profile_stamps(params, gains.shape[-1], kind=kind) * gains


def _jacobian(params: np.ndarray, gains: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """The stamps ``H`` ``(n, k, k)`` and their derivatives ``(n, p, k, k)`` by the free parameters."""
    return _normalised(params, *_shape(params, gains.shape[-1], kind), gains)


def _normalised(params: np.ndarray, g: np.ndarray, derivs: np.ndarray,
                gains: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The stamps ``H`` of unnormalised profiles ``g`` and their derivatives ``derivs`` by the parameters
    but the flux, and ``H``'s by the flux and those parameters."""
    total = g.sum(axis=(1, 2))[:, None, None]
    flux = params[:, 0, None, None]
    unit = g / total
    jac = np.empty((len(g), 1 + derivs.shape[1], *g.shape[1:]))
    jac[:, 0] = unit * gains
    jac[:, 1:] = derivs - unit[:, None] * derivs.sum(axis=(2, 3), keepdims=True)
    jac[:, 1:] *= (flux / total * gains)[:, None]
    return flux * jac[:, 0], jac


def _valid(params: np.ndarray, k: int, kind: str) -> np.ndarray:
    pyy, pxx, pxy = params[:, 3], params[:, 4], params[:, 5]
    ok = np.isfinite(params).all(axis=1) & (pyy > 0) & (pxx > 0) & (pyy * pxx > pxy**2) & (params[:, 0] > 0)
    ok &= (np.abs(params[:, 1]) <= k // 2) & (np.abs(params[:, 2]) <= k // 2)
    if kind == "moffat":
        ok &= (params[:, 6] >= NU_RANGE[0]) & (params[:, 6] <= NU_RANGE[1])
    elif kind == "two_gaussians":
        ok &= (params[:, 7] >= PHI_RANGE[0]) & (params[:, 7] <= PHI_RANGE[1])
        ok &= (params[:, 8] >= SCALE_RANGE[0]) & (params[:, 8] <= SCALE_RANGE[1])
    return ok


def start_parameters(flux: np.ndarray, y: np.ndarray, x: np.ndarray, myy: np.ndarray, mxx: np.ndarray,
                     mxy: np.ndarray) -> np.ndarray:
    """Gaussian parameters (``nu`` and ``phi`` 0, ``s`` 1) from a flux, a centre and second moments (a
    covariance)."""
    det = myy * mxx - mxy**2
    zero = np.zeros_like(flux)
    return np.stack([flux, y, x, mxx / det, myy / det, -mxy / det, zero, zero, zero + 1.0], axis=1)


def fit_profiles(normal: Normal, rhs: np.ndarray, gains: np.ndarray, start: np.ndarray, *, kind: str,
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
        ``(n, 9)`` starting parameters, valid ones of the ``kind`` (:func:`start_parameters`; a Moffat
        profile's ``nu`` within :data:`NU_RANGE`, two Gaussians' ``phi`` and ``s`` within
        :data:`PHI_RANGE` and :data:`SCALE_RANGE`).
    kind : str
        One of :data:`KINDS`: which parameters are free (the others stay as they are).
    iterations : int
        Jacobians evaluated; each step is tried with up to three dampings.

    Returns
    -------
    params, stamps, value
        ``(n, 9)``, the stamps ``H`` ``(n, k, k)`` and the quadratic form's value ``(n,)``: at the start
        where no step lowered it.
    """
    n, k = len(start), gains.shape[-1]
    free = _FREE[kind]
    params = np.array(start, dtype=np.float64)
    everyone = np.arange(n)
    stamps, jac = _jacobian(params, gains, kind)
    m_h = normal(stamps[:, None], everyone)[:, 0]
    value = _value(stamps, m_h, rhs)
    damping = np.full(n, 1e-3)
    eye = np.eye(free.size)
    for it in range(iterations):
        if it:
            jac = _jacobian(params, gains, kind)[1]
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
            trial[:, free] += step
            ok = _valid(trial, k, kind)
            trial[~ok] = params[pending][~ok]
            t_stamps = _stamps(trial, gains[pending], kind)
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


def extension_gains(normal: Normal, rhs: np.ndarray, gains: np.ndarray, params: np.ndarray) -> np.ndarray:
    """What freeing a Moffat profile's ``nu`` and, apart, two Gaussians' wing would lower the quadratic form
    by from Gaussian ``params``, as one Gauss-Newton step predicts it: ``(n, 2)``, in the order of
    :data:`KINDS`' extensions.

    At the Gaussian the profile's derivative by ``nu`` is ``exp(-q) q**2 / 2``
    and by the share ``phi`` of a wing of width :data:`WING_TEST_SCALE`
    ``exp(-q / s**2) / s**2 - exp(-q)``.  Each gain is ``g**2 / S``: ``g`` the
    form's half-gradient along that derivative and ``S`` its half-curvature,
    both with the Gaussian's parameters' optimal response taken out (a score
    test); 0 where the form rises along it.  One iteration's cost for both,
    to skip a fit where it cannot pay.
    """
    at = np.array(params, dtype=np.float64)
    at[:, 6:] = (0.0, 0.0, 1.0)
    k = gains.shape[-1]
    dy, dx, q = _quadratic(at, k)
    g = np.exp(-q)
    s2 = WING_TEST_SCALE**2
    extra = np.stack([0.5 * g * q**2, np.exp(-q / s2) / s2 - g], axis=1)
    derivs = np.concatenate([_by_shape(at, dy, dx) * g[:, None], extra], axis=1)
    stamps, jac = _normalised(at, g, derivs, gains)
    m_all = normal(np.concatenate([stamps[:, None], jac], axis=1), np.arange(len(at)))
    curvature = np.einsum("naij,nbij->nab", jac, m_all[:, 1:])
    gradient = np.einsum("naij,nij->na", jac, m_all[:, 0] - rhs)
    rest, cross = curvature[:, :6, :6], curvature[:, :6, 6:]
    try:
        response = np.linalg.solve(rest, np.concatenate([cross, gradient[:, :6, None]], axis=2))
    except np.linalg.LinAlgError:
        return np.full((len(at), 2), np.inf)  # undecided: fit
    schur = np.diagonal(curvature[:, 6:, 6:], axis1=1, axis2=2) - np.einsum("nae,nae->ne", cross,
                                                                             response[:, :, :2])
    score = gradient[:, 6:] - np.einsum("nae,na->ne", cross, response[:, :, 2])
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where((score < 0) & (schur > 0), score**2 / schur, 0.0)


def _value(stamps: np.ndarray, m_stamps: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    return np.einsum("nij,nij->n", stamps, m_stamps - 2.0 * rhs)
