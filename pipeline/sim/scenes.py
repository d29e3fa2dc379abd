"""Synthetic kernels and image pairs with a known kernel.

Everything here is deterministic given a ``seed`` (an integer or a
:class:`numpy.random.Generator`). Kernels follow the project conventions: odd
stamps, centre at ``(size // 2, size // 2)``, ``y`` rows and ``x`` columns, and
``target == scipy.signal.fftconvolve(source, kernel, mode="same")``.

Shapes are given as a FWHM and a distortion ``(e1, e2)``; the matching
covariance has ``det(C) ** 0.25 = fwhm / FWHM_PER_SIGMA`` and
``e1 = (Cxx - Cyy) / (Cxx + Cyy)``, ``e2 = 2 Cxy / (Cxx + Cyy)``, which is what
:func:`pipeline.core.moments.adaptive_moments` measures.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.fft
import scipy.ndimage
import scipy.signal

from ..core.moments import FWHM_PER_SIGMA
from ..core.validate import check_int, check_odd_size
from ..errors import InputError, OptionError

__all__ = [
    "CATALOG_DTYPE",
    "MoffatPSF",
    "SurveyPair",
    "add_noise",
    "blurred_photo",
    "convolve_varying",
    "gaussian_kernel",
    "moffat_psf",
    "motion_kernel",
    "render_scene",
    "scene_reach",
    "survey_tile_pair",
]

#: Fields of :attr:`SurveyPair.catalog`.
CATALOG_DTYPE = np.dtype([
    ("kind", "U6"),        # "star" or "galaxy"
    ("y", "f8"),           # centre, tile pixel coordinates (may lie off the tile)
    ("x", "f8"),
    ("flux", "f8"),        # total flux in the source image, ADU
    ("hlr", "f8"),         # half-light radius before the PSF, pixels (0 for stars)
    ("sersic_n", "f8"),    # Sersic index (0 for stars)
    ("e1", "f8"),          # distortion before the PSF (0 for stars)
    ("e2", "f8"),
])


# --------------------------------------------------------------------------
# validation helpers


def _float_option(value: object, name: str, *, positive: bool = False,
                  nonnegative: bool = False) -> float:
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise OptionError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise OptionError(f"{name} must be finite, got {value!r}")
    if positive and not v > 0.0:
        raise OptionError(f"{name} must be > 0, got {value!r}")
    if nonnegative and v < 0.0:
        raise OptionError(f"{name} must be >= 0, got {value!r}")
    return v


def _shape_inverse(sigma2: float, e1: float, e2: float) -> tuple[float, float, float]:
    """Inverse ``(iyy, ixy, ixx)`` of the covariance with ``sqrt(det) = sigma2``."""
    e1 = _float_option(e1, "e1")
    e2 = _float_option(e2, "e2")
    e = math.hypot(e1, e2)
    if e >= 1.0:
        raise OptionError(f"the distortion hypot(e1, e2) must be < 1, got {e}")
    half_trace = sigma2 / math.sqrt(1.0 - e * e)
    cyy, cxy, cxx = half_trace * (1.0 - e1), half_trace * e2, half_trace * (1.0 + e1)
    det = cyy * cxx - cxy * cxy
    return cxx / det, -cxy / det, cyy / det


def _offsets(size: int, dy: float, dx: float) -> tuple[np.ndarray, np.ndarray]:
    g = np.arange(size, dtype=np.float64) - size // 2
    return (g - dy)[:, None], (g - dx)[None, :]


def _normalised(stamp: np.ndarray, flux: float, what: str) -> np.ndarray:
    total = stamp.sum()
    if not (total > 0.0 and math.isfinite(total)):
        raise OptionError(f"the {what} has no flux on the stamp; check its size and offset")
    return stamp * (flux / total)


# --------------------------------------------------------------------------
# kernels and PSFs


def gaussian_kernel(
    size: int,
    *,
    fwhm: float,
    e1: float = 0.0,
    e2: float = 0.0,
    dy: float = 0.0,
    dx: float = 0.0,
    flux: float = 1.0,
) -> np.ndarray:
    """Elliptical Gaussian sampled at pixel centres.

    Parameters
    ----------
    size
        Odd stamp size; the stamp is ``(size, size)`` with centre ``size // 2``.
    fwhm
        ``FWHM_PER_SIGMA * det(C) ** 0.25`` of the covariance ``C``.
    e1, e2
        Distortion ``(Cxx - Cyy) / (Cxx + Cyy)`` and ``2 Cxy / (Cxx + Cyy)``.
    dy, dx
        Offset of the Gaussian's centre from the stamp centre, pixels.
    flux
        Sum of the returned stamp.

    Returns
    -------
    numpy.ndarray
        float64 ``(size, size)`` stamp summing to ``flux``.
    """
    size = check_odd_size("size", size)
    fwhm = _float_option(fwhm, "fwhm", positive=True)
    flux = _float_option(flux, "flux")
    sigma = fwhm / FWHM_PER_SIGMA
    iyy, ixy, ixx = _shape_inverse(sigma * sigma, e1, e2)
    y, x = _offsets(size, _float_option(dy, "dy"), _float_option(dx, "dx"))
    rho2 = iyy * y * y + 2.0 * ixy * y * x + ixx * x * x
    return _normalised(np.exp(-0.5 * rho2), flux, "Gaussian")


def _moffat_alpha(fwhm: float, beta: float) -> float:
    return fwhm / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))


def _moffat_profile(y: np.ndarray, x: np.ndarray, *, alpha: float, beta: float,
                    inv: tuple[float, float, float]) -> np.ndarray:
    iyy, ixy, ixx = inv
    rho2 = iyy * y * y + 2.0 * ixy * y * x + ixx * x * x
    return (1.0 + rho2 / (alpha * alpha)) ** (-beta)


def moffat_psf(
    size: int,
    *,
    fwhm: float,
    beta: float = 3.5,
    e1: float = 0.0,
    e2: float = 0.0,
) -> np.ndarray:
    """Moffat PSF ``(1 + r^2 / alpha^2) ** -beta`` sampled at pixel centres.

    Parameters
    ----------
    size
        Odd stamp size; centred at ``size // 2``.
    fwhm
        Full width at half maximum (geometric mean of the axes if elliptical).
    beta
        Moffat index, ``> 1``.
    e1, e2
        Distortion of the elliptical isophotes (same convention as
        :func:`gaussian_kernel`).

    Returns
    -------
    numpy.ndarray
        float64 ``(size, size)`` stamp summing to 1.
    """
    size = check_odd_size("size", size)
    fwhm = _float_option(fwhm, "fwhm", positive=True)
    beta = _float_option(beta, "beta")
    if beta <= 1.0:
        raise OptionError(f"beta must be > 1, got {beta}")
    inv = _shape_inverse(1.0, e1, e2)
    y, x = _offsets(size, 0.0, 0.0)
    prof = _moffat_profile(y, x, alpha=_moffat_alpha(fwhm, beta), beta=beta, inv=inv)
    return _normalised(prof, 1.0, "Moffat PSF")


def motion_kernel(
    size: int,
    *,
    length: float,
    angle_deg: float,
    dy: float = 0.0,
    dx: float = 0.0,
    flux: float = 1.0,
) -> np.ndarray:
    """Anti-aliased straight motion streak.

    The streak is the segment from ``(c + dy, c + dx)``, ``c = size // 2``,
    to that point plus ``length * (sin a, cos a)`` in ``(y, x)``, where ``a``
    is ``angle_deg`` measured from the ``+x`` axis towards ``+y``. It is
    sampled by many equally spaced points that are spread bilinearly onto the
    four nearest pixels, so the stamp's centroid is exactly the segment's
    midpoint.

    Parameters
    ----------
    size
        Odd stamp size.
    length
        Segment length in pixels, ``>= 0`` (0 gives a bilinearly spread point).
    angle_deg
        Direction of the streak, degrees from ``+x`` towards ``+y``.
    dy, dx
        Offset of the streak's start from the stamp centre, pixels.
    flux
        Sum of the returned stamp.

    Returns
    -------
    numpy.ndarray
        float64 ``(size, size)`` stamp summing to ``flux``.

    Raises
    ------
    OptionError
        If the streak does not fit on the stamp.
    """
    size = check_odd_size("size", size)
    length = _float_option(length, "length", nonnegative=True)
    angle = math.radians(_float_option(angle_deg, "angle_deg"))
    dy = _float_option(dy, "dy")
    dx = _float_option(dx, "dx")
    flux = _float_option(flux, "flux")
    n_pts = max(1, int(math.ceil(64.0 * length)))
    t = (np.arange(n_pts) + 0.5) * (length / n_pts)
    c = size // 2
    py = c + dy + t * math.sin(angle)
    px = c + dx + t * math.cos(angle)
    last = size - 1
    if py.min() < 0.0 or px.min() < 0.0 or py.max() > last or px.max() > last:
        raise OptionError("the motion streak does not fit on the stamp; "
                          "increase size or reduce length/offset")
    y0 = np.minimum(np.floor(py).astype(np.intp), last)
    x0 = np.minimum(np.floor(px).astype(np.intp), last)
    fy, fx = py - y0, px - x0
    y1, x1 = np.minimum(y0 + 1, last), np.minimum(x0 + 1, last)
    out = np.zeros((size, size))
    w = flux / n_pts
    np.add.at(out, (y0, x0), w * (1.0 - fy) * (1.0 - fx))
    np.add.at(out, (y0, x1), w * (1.0 - fy) * fx)
    np.add.at(out, (y1, x0), w * fy * (1.0 - fx))
    np.add.at(out, (y1, x1), w * fy * fx)
    return out


# --------------------------------------------------------------------------
# survey-like tile pairs


@dataclass(frozen=True)
class SurveyPair:
    """A simulated source/target tile pair with known truth.

    All images are float64 ``(size, size)`` in ADU. With ``K = kernel`` and
    ``b = background``, exactly (to rounding)::

        target_true == K (*) source_true + b

    over the whole tile, where ``(*)`` is the convolution of the source
    continued beyond the tile: ``source_canvas`` is the noiseless source on a
    canvas padded by ``pad`` pixels on every side, ``source_true ==
    source_canvas[pad:pad + size, pad:pad + size]`` and ``target_true - b ==
    fftconvolve(source_canvas, K, mode="same")[pad:pad + size, pad:pad + size]``.
    Away from the tile edges this is ``fftconvolve(source_true, K, "same")``.

    Attributes
    ----------
    source, target
        Noisy, sky-subtracted images.
    kernel
        The true kernel (float64 copy of the input).
    background
        Constant ``b`` of the target relative to ``K (*) source_true``:
        ``sky_offset - kernel.sum() * source_sky_offset``.
    source_true, target_true
        Noise-free expectations of ``source`` and ``target``.
    source_variance, target_variance
        Per-pixel noise variance of ``source`` and ``target``, ADU^2.
    source_canvas
        Noise-free source on the padded canvas (including its sky offset).
    pad
        Canvas padding, pixels.
    psf
        The source PSF stamp (sum 1).
    catalog
        Every simulated object, a structured array with fields
        ``kind, y, x, flux, hlr, sersic_n, e1, e2`` (tile coordinates; objects
        lying partly or wholly off the tile included).
    """

    source: np.ndarray
    target: np.ndarray
    kernel: np.ndarray
    background: float
    source_true: np.ndarray
    target_true: np.ndarray
    source_variance: np.ndarray
    target_variance: np.ndarray
    source_canvas: np.ndarray
    pad: int
    psf: np.ndarray
    catalog: np.ndarray


def _power_law_fluxes(rng: np.random.Generator, n: int, lo: float, hi: float) -> np.ndarray:
    """Fluxes with ``dN/dF ∝ F^-2`` on ``[lo, hi]``."""
    u = rng.random(n)
    return 1.0 / (1.0 / lo - u * (1.0 / lo - 1.0 / hi))


def _flux_range(value: object, name: str) -> tuple[float, float]:
    try:
        lo, hi = value  # type: ignore[misc]
    except (TypeError, ValueError):
        raise OptionError(f"{name} must be a (min, max) pair, got {value!r}") from None
    lo = _float_option(lo, f"{name}[0]", positive=True)
    hi = _float_option(hi, f"{name}[1]", positive=True)
    if hi < lo:
        raise OptionError(f"{name} must have min <= max, got {value!r}")
    return lo, hi


def _sersic_b(n: float) -> float:
    # Ciotti & Bertin (1999) asymptotic expansion, good to ~1e-4 for n > 0.36.
    return 2.0 * n - 1.0 / 3.0 + 4.0 / (405.0 * n) + 46.0 / (25515.0 * n * n)


def _add_stamp(canvas: np.ndarray, stamp: np.ndarray, y0: int, x0: int) -> None:
    """Add ``stamp`` with its corner at ``(y0, x0)``, clipped to the canvas."""
    ny, nx = canvas.shape
    sy, sx = stamp.shape
    ya, xa = max(y0, 0), max(x0, 0)
    yb, xb = min(y0 + sy, ny), min(x0 + sx, nx)
    if ya < yb and xa < xb:
        canvas[ya:yb, xa:xb] += stamp[ya - y0:yb - y0, xa - x0:xb - x0]


_SUPER = 3  # sub-samples per pixel side for galaxy profiles
_GALAXY_MAX_RADIUS = 40


def _galaxy_stamp(dy: float, dx: float, *, hlr: float, n: float, e1: float, e2: float,
                  flux: float, radius: int) -> np.ndarray:
    """Sersic galaxy, pixel-averaged by sub-sampling, summing to ``flux``.

    ``hlr`` is the circularised half-light radius; ``(dy, dx)`` is the offset of
    the centre from the stamp's centre pixel.
    """
    g = np.arange(-radius, radius + 1, dtype=np.float64)
    sub = (np.arange(_SUPER) + 0.5) / _SUPER - 0.5
    yy = (g[:, None] + sub[None, :]).ravel() - dy
    xx = (g[:, None] + sub[None, :]).ravel() - dx
    iyy, ixy, ixx = _shape_inverse(hlr * hlr, e1, e2)
    y, x = yy[:, None], xx[None, :]
    r = np.sqrt(iyy * y * y + 2.0 * ixy * y * x + ixx * x * x)
    prof = np.exp(-_sersic_b(n) * r ** (1.0 / n))
    m = prof.shape[0] // _SUPER
    prof = prof.reshape(m, _SUPER, m, _SUPER).sum(axis=(1, 3))
    return prof * (flux / prof.sum())


@dataclass(frozen=True)
class MoffatPSF:
    """A round Moffat PSF ``(1 + r^2 / alpha^2) ** -beta``.

    Attributes
    ----------
    fwhm
        Full width at half maximum, pixels.
    beta
        Moffat index, ``> 1``.
    """

    fwhm: float
    beta: float = 3.5

    def __post_init__(self) -> None:
        fwhm = _float_option(self.fwhm, "psf fwhm", positive=True)
        beta = _float_option(self.beta, "psf beta")
        if beta <= 1.0:
            raise OptionError(f"psf beta must be > 1, got {beta}")
        object.__setattr__(self, "fwhm", fwhm)
        object.__setattr__(self, "beta", beta)

    @property
    def half_size(self) -> int:
        """Half-size of the stamp the PSF is rendered on, ``ceil(6 fwhm)``."""
        return int(math.ceil(6.0 * self.fwhm))

    def stamp(self) -> np.ndarray:
        """The PSF on a ``(2 half_size + 1)`` square stamp summing to 1."""
        return moffat_psf(2 * self.half_size + 1, fwhm=self.fwhm, beta=self.beta)


def _as_psf(psf: object) -> MoffatPSF:
    if isinstance(psf, MoffatPSF):
        return psf
    if isinstance(psf, bool) or not isinstance(psf, (int, float, np.integer, np.floating)):
        raise OptionError(f"psf must be a MoffatPSF or a FWHM in pixels, got {psf!r}")
    return MoffatPSF(fwhm=float(psf))


def scene_reach(psf: MoffatPSF | float) -> int:
    """Farthest a simulated object's light reaches from its centre, pixels.

    A canvas padded by this much (plus the half-size of any kernel applied
    later) holds every object whose light lands on the image.

    Parameters
    ----------
    psf
        The PSF, or its FWHM for a Moffat PSF with ``beta = 3.5``.

    Returns
    -------
    int
    """
    return _GALAXY_MAX_RADIUS + _as_psf(psf).half_size + 2


def render_scene(
    rng: int | np.random.Generator,
    shape: tuple[int, int],
    *,
    psf: MoffatPSF | float,
    star_density: float = 2e-3,
    galaxy_density: float = 1e-3,
    star_flux: tuple[float, float] = (1e3, 1e6),
    galaxy_flux: tuple[float, float] = (1e3, 1e6),
    margin: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Render a noiseless sky scene of stars and galaxies seen through a PSF.

    Stars are the Moffat profile evaluated at sub-pixel positions; Sersic
    galaxies (index 0.8-2.5, half-light radius 1-6 px log-uniform, distortion
    up to 0.6, random orientation) are pixel-averaged and convolved with the
    PSF stamp. Fluxes follow ``dN/dF ∝ F^-2``; positions are uniform over the
    canvas, which is the image padded by ``margin`` on every side.

    Parameters
    ----------
    rng
        Generator (advanced in place) or integer seed.
    shape
        ``(ny, nx)`` of the image.
    psf
        The PSF, or its FWHM for a Moffat PSF with ``beta = 3.5``.
    star_density, galaxy_density
        Mean number of objects per canvas pixel.
    star_flux, galaxy_flux
        ``(min, max)`` of the total fluxes, ADU.
    margin
        Canvas padding, pixels; default :func:`scene_reach` of ``psf``, so the
        image part of the canvas misses no light.

    Returns
    -------
    canvas : numpy.ndarray
        float64 ``(ny + 2 margin, nx + 2 margin)``; the image is
        ``canvas[margin:margin + ny, margin:margin + nx]``.
    catalog : numpy.ndarray
        Every object (:data:`CATALOG_DTYPE`), positions in image coordinates
        (canvas index minus ``margin``).
    """
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    try:
        ny, nx = shape
    except (TypeError, ValueError):
        raise OptionError(f"shape must be a (ny, nx) pair, got {shape!r}") from None
    ny = check_int("shape[0]", ny, 1)
    nx = check_int("shape[1]", nx, 1)
    psf = _as_psf(psf)
    star_density = _float_option(star_density, "star_density", nonnegative=True)
    galaxy_density = _float_option(galaxy_density, "galaxy_density", nonnegative=True)
    s_lo, s_hi = _flux_range(star_flux, "star_flux")
    g_lo, g_hi = _flux_range(galaxy_flux, "galaxy_flux")
    pad = scene_reach(psf) if margin is None else check_int("margin", margin, 0)

    psf_half = psf.half_size
    psf_stamp = psf.stamp()
    alpha = _moffat_alpha(psf.fwhm, psf.beta)
    psf_norm = _moffat_profile(*_offsets(2 * psf_half + 1, 0.0, 0.0), alpha=alpha,
                               beta=psf.beta, inv=(1.0, 0.0, 1.0)).sum()

    my, mx = ny + 2 * pad, nx + 2 * pad
    area = float(my) * float(mx)
    n_star = int(rng.poisson(star_density * area))
    n_gal = int(rng.poisson(galaxy_density * area))
    catalog = np.zeros(n_star + n_gal, dtype=CATALOG_DTYPE)
    catalog["kind"][:n_star] = "star"
    catalog["kind"][n_star:] = "galaxy"
    # Canvas pixel coordinates: -0.5 .. n - 0.5.
    cy = rng.uniform(-0.5, my - 0.5, n_star + n_gal)
    cx = rng.uniform(-0.5, mx - 0.5, n_star + n_gal)
    catalog["y"], catalog["x"] = cy - pad, cx - pad
    catalog["flux"][:n_star] = _power_law_fluxes(rng, n_star, s_lo, s_hi)
    catalog["flux"][n_star:] = _power_law_fluxes(rng, n_gal, g_lo, g_hi)
    gal = catalog[n_star:]  # a view: filling it fills the catalog
    gal["hlr"] = np.exp(rng.uniform(math.log(1.0), math.log(6.0), n_gal))
    gal["sersic_n"] = rng.uniform(0.8, 2.5, n_gal)
    e = rng.uniform(0.0, 0.6, n_gal)
    theta = rng.uniform(0.0, math.pi, n_gal)
    gal["e1"], gal["e2"] = e * np.cos(2.0 * theta), e * np.sin(2.0 * theta)

    # Galaxies: rendered before the PSF, then convolved with it.
    galaxies = np.zeros((my, mx))
    for obj, y, x in zip(gal, cy[n_star:], cx[n_star:]):
        iy, ix = int(round(y)), int(round(x))
        radius = min(int(math.ceil(8.0 * obj["hlr"])), _GALAXY_MAX_RADIUS)
        stamp = _galaxy_stamp(y - iy, x - ix, hlr=float(obj["hlr"]),
                              n=float(obj["sersic_n"]), e1=float(obj["e1"]),
                              e2=float(obj["e2"]), flux=float(obj["flux"]), radius=radius)
        _add_stamp(galaxies, stamp, iy - radius, ix - radius)
    scene = scipy.signal.fftconvolve(galaxies, psf_stamp, mode="same")

    # Stars: the PSF evaluated at their sub-pixel positions.
    for flux, y, x in zip(catalog["flux"][:n_star], cy[:n_star], cx[:n_star]):
        iy, ix = int(round(y)), int(round(x))
        yy, xx = _offsets(2 * psf_half + 1, y - iy, x - ix)
        stamp = _moffat_profile(yy, xx, alpha=alpha, beta=psf.beta, inv=(1.0, 0.0, 1.0))
        _add_stamp(scene, stamp * (flux / psf_norm), iy - psf_half, ix - psf_half)
    return scene, catalog


def add_noise(
    rng: int | np.random.Generator,
    image: np.ndarray,
    *,
    sky: float = 1000.0,
    read_noise: float = 5.0,
    gain: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Observe a noiseless image on a sky background, then subtract the sky.

    The expectation ``mu = clip(image + sky, 0)`` (ADU) becomes
    ``(Poisson(gain * mu) + Normal(0, read_noise)) / gain - sky``.

    Parameters
    ----------
    rng
        Generator (advanced in place) or integer seed.
    image
        Noiseless, sky-free image, ADU.
    sky
        Sky level, ADU per pixel.
    read_noise
        Read noise, electrons RMS.
    gain
        Electrons per ADU.

    Returns
    -------
    noisy : numpy.ndarray
        float64, sky subtracted; its expectation is ``image`` where
        ``image + sky >= 0``.
    variance : numpy.ndarray
        ``mu / gain + (read_noise / gain) ** 2``, ADU^2.
    """
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    expect = np.asarray(image, dtype=np.float64)
    sky = _float_option(sky, "sky", nonnegative=True)
    read_noise = _float_option(read_noise, "read_noise", nonnegative=True)
    gain = _float_option(gain, "gain", positive=True)
    mu = np.clip(expect + sky, 0.0, None)
    electrons = rng.poisson(mu * gain).astype(np.float64)
    electrons += rng.normal(0.0, read_noise, mu.shape) if read_noise > 0 else 0.0
    noisy = electrons / gain - sky
    variance = mu / gain + (read_noise / gain) ** 2
    return noisy, variance


def survey_tile_pair(
    *,
    seed: int | np.random.Generator,
    kernel: np.ndarray,
    size: int = 256,
    psf_fwhm: float = 3.0,
    psf_beta: float = 3.5,
    star_density: float = 2e-3,
    galaxy_density: float = 1e-3,
    star_flux: tuple[float, float] = (1e3, 1e6),
    galaxy_flux: tuple[float, float] = (1e3, 1e6),
    sky: float = 1000.0,
    target_sky: float | None = None,
    read_noise: float = 5.0,
    gain: float = 1.0,
    sky_offset: float = 37.5,
    source_sky_offset: float = 0.0,
) -> SurveyPair:
    """Simulate a ground-based survey tile and its image through ``kernel``.

    The scene has stars (Moffat PSF at sub-pixel positions) and Sersic
    galaxies (index 0.8-2.5, half-light radius 1-6 px log-uniform, distortion
    up to 0.6, random orientation) convolved with the PSF, both with fluxes
    drawn from ``dN/dF ∝ F^-2`` and positions uniform over a canvas padded
    beyond the tile. The target is that canvas convolved with ``kernel``, so
    it has no edge effects on the tile.

    Noise model, independently on both images (ADU, ``gain`` e-/ADU): the
    expectation ``mu`` (image + sky, negative values clipped to 0) becomes
    ``(Poisson(gain * mu) + Normal(0, read_noise)) / gain``; the variance is
    ``mu / gain + (read_noise / gain) ** 2``. The sky is then subtracted
    imperfectly: the source keeps ``source_sky_offset`` and the target keeps
    ``sky_offset``.

    Parameters
    ----------
    seed
        Integer seed or generator; the result is a function of it alone.
    kernel
        True kernel, 2-D odd-sized and finite (not normalised: its sum is the
        flux scale).
    size
        Tile size in pixels (square).
    psf_fwhm, psf_beta
        Moffat PSF of the source, pixels.
    star_density, galaxy_density
        Mean number of objects per pixel (per unit canvas area).
    star_flux, galaxy_flux
        ``(min, max)`` of the total source fluxes, ADU.
    sky
        Sky level of the source before subtraction, ADU per pixel.
    target_sky
        Sky level of the target before subtraction; default ``sky``.
    read_noise
        Read noise, electrons RMS.
    gain
        Electrons per ADU.
    sky_offset
        Sky residual left in the target, ADU.
    source_sky_offset
        Sky residual left in the source, ADU.

    Returns
    -------
    SurveyPair
    """
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    kern = np.asarray(kernel)
    if kern.ndim != 2 or kern.shape[0] % 2 == 0 or kern.shape[1] % 2 == 0:
        raise InputError(f"kernel must be a 2-D array of odd shape, got shape {kern.shape}")
    if not (np.issubdtype(kern.dtype, np.integer) or np.issubdtype(kern.dtype, np.floating)):
        raise InputError(f"kernel must be real, got dtype {kern.dtype}")
    kern = kern.astype(np.float64)
    if not np.isfinite(kern).all():
        raise InputError("kernel contains non-finite values")
    size = check_int("size", size, 1)
    psf_fwhm = _float_option(psf_fwhm, "psf_fwhm", positive=True)
    psf_beta = _float_option(psf_beta, "psf_beta")
    star_density = _float_option(star_density, "star_density", nonnegative=True)
    galaxy_density = _float_option(galaxy_density, "galaxy_density", nonnegative=True)
    s_lo, s_hi = _flux_range(star_flux, "star_flux")
    g_lo, g_hi = _flux_range(galaxy_flux, "galaxy_flux")
    sky = _float_option(sky, "sky", nonnegative=True)
    target_sky = sky if target_sky is None else _float_option(
        target_sky, "target_sky", nonnegative=True)
    read_noise = _float_option(read_noise, "read_noise", nonnegative=True)
    gain = _float_option(gain, "gain", positive=True)
    sky_offset = _float_option(sky_offset, "sky_offset")
    source_sky_offset = _float_option(source_sky_offset, "source_sky_offset")

    psf_spec = MoffatPSF(fwhm=psf_fwhm, beta=psf_beta)
    psf = psf_spec.stamp()

    # Objects reach at most ``scene_reach`` pixels from their centre; a canvas
    # padded by the kernel half-size plus that therefore holds every object
    # whose light lands, after the kernel, on the tile.
    pad = max(kern.shape) // 2 + scene_reach(psf_spec)
    scene, catalog = render_scene(
        rng, (size, size), psf=psf_spec, star_density=star_density,
        galaxy_density=galaxy_density, star_flux=(s_lo, s_hi), galaxy_flux=(g_lo, g_hi),
        margin=pad)

    source_canvas = scene + source_sky_offset
    convolved = scipy.signal.fftconvolve(scene, kern, mode="same")
    tile = (slice(pad, pad + size), slice(pad, pad + size))
    scene_tile = scene[tile]
    conv_tile = convolved[tile]

    background = sky_offset - float(kern.sum()) * source_sky_offset
    source_true = scene_tile + source_sky_offset
    target_true = conv_tile + sky_offset

    def observe(expect: np.ndarray, level: float, residual: float) -> tuple[np.ndarray, ...]:
        image, variance = add_noise(rng, expect, sky=level, read_noise=read_noise, gain=gain)
        return image + residual, variance

    source, source_var = observe(scene_tile, sky, source_sky_offset)
    target, target_var = observe(conv_tile, target_sky, sky_offset)

    return SurveyPair(
        source=source, target=target, kernel=kern, background=background,
        source_true=source_true, target_true=target_true,
        source_variance=source_var, target_variance=target_var,
        source_canvas=source_canvas, pad=pad, psf=psf, catalog=catalog,
    )


# --------------------------------------------------------------------------
# spatially varying convolution

_BAND_BYTES = 64 * 2**20  # spectra held at once by convolve_varying


def convolve_varying(
    image: np.ndarray,
    kernel_at: Callable[[float, float], np.ndarray],
    *,
    patch: int = 32,
    kernel_size: int,
) -> np.ndarray:
    """Convolve with a piecewise-constant, spatially varying kernel field.

    The image is cut into ``patch`` x ``patch`` blocks, rows
    ``[i patch, (i + 1) patch)`` and columns likewise (the last block in each
    direction may be smaller). In each block the output equals
    ``scipy.signal.fftconvolve(image, kernel_at(yc, xc), mode="same")``
    restricted to that block, where ``(yc, xc)`` is the block centre,
    ``y0 + (rows - 1) / 2`` (and likewise in ``x``). So light landing in a
    block has gone through that block's kernel wherever it came from, the
    kernel field is constant within a block and jumps at block edges, and
    pixels outside the image count as zero. Each block is convolved with its margin
    of ``kernel_size // 2`` pixels only, all blocks of a band at once by FFT.

    Parameters
    ----------
    image
        2-D real, finite image.
    kernel_at
        ``kernel_at(yc, xc)`` returns the ``(kernel_size, kernel_size)`` kernel
        at a block centre (floats, image pixel coordinates); called once per
        block, row by row.
    patch
        Block size, pixels.
    kernel_size
        Odd size of the kernels.

    Returns
    -------
    numpy.ndarray
        float64, the shape of ``image``.
    """
    img = np.asarray(image)
    if img.ndim != 2 or img.size == 0:
        raise InputError(f"image must be a non-empty 2-D array, got shape {img.shape}")
    if not (np.issubdtype(img.dtype, np.integer) or np.issubdtype(img.dtype, np.floating)):
        raise InputError(f"image must be real, got dtype {img.dtype}")
    img = img.astype(np.float64, copy=False)
    if not np.isfinite(img).all():
        raise InputError("image contains non-finite values")
    if not callable(kernel_at):
        raise OptionError("kernel_at must be callable as kernel_at(yc, xc)")
    patch = check_int("patch", patch, 1)
    k = check_odd_size("kernel_size", kernel_size)
    c = k // 2
    ny, nx = img.shape
    nby, nbx = -(-ny // patch), -(-nx // patch)
    win = patch + 2 * c
    # A circular convolution of length >= win leaves the block's outputs,
    # indices 2c .. 2c + patch - 1 of the full convolution, free of wrap-around.
    n_fft = scipy.fft.next_fast_len(win, real=True)
    padded = np.zeros((nby * patch + 2 * c, nbx * patch + 2 * c))
    padded[c:c + ny, c:c + nx] = img
    windows = np.lib.stride_tricks.sliding_window_view(padded, (win, win))[::patch, ::patch]

    def centre(start: int, n: int) -> float:
        return start + (min(start + patch, n) - start - 1) / 2.0

    def kernel(yc: float, xc: float) -> np.ndarray:
        kern = np.asarray(kernel_at(yc, xc))
        if kern.shape != (k, k):
            raise InputError(f"kernel_at({yc}, {xc}) returned shape {kern.shape}, "
                             f"expected {(k, k)}")
        if not (np.issubdtype(kern.dtype, np.integer)
                or np.issubdtype(kern.dtype, np.floating)):
            raise InputError(f"kernel_at({yc}, {xc}) returned dtype {kern.dtype}")
        if not np.isfinite(kern).all():
            raise InputError(f"kernel_at({yc}, {xc}) returned non-finite values")
        return kern

    out = np.empty((nby * patch, nbx * patch))
    per_row = nbx * n_fft * (n_fft // 2 + 1) * 16 * 2
    band = max(1, _BAND_BYTES // per_row)
    xcs = [centre(j * patch, nx) for j in range(nbx)]
    for i0 in range(0, nby, band):
        i1 = min(i0 + band, nby)
        kerns = np.stack([[kernel(centre(i * patch, ny), xc) for xc in xcs]
                          for i in range(i0, i1)]).astype(np.float64, copy=False)
        spec = scipy.fft.rfft2(windows[i0:i1], s=(n_fft, n_fft))
        spec *= scipy.fft.rfft2(kerns, s=(n_fft, n_fft))
        conv = scipy.fft.irfft2(spec, s=(n_fft, n_fft))[..., 2 * c:2 * c + patch,
                                                      2 * c:2 * c + patch]
        out[i0 * patch:i1 * patch] = conv.transpose(0, 2, 1, 3).reshape(
            (i1 - i0) * patch, nbx * patch)
    return out[:ny, :nx]


# --------------------------------------------------------------------------
# textbook case


def blurred_photo(image: np.ndarray, kernel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Blur an 8-bit grey photograph and quantise it again.

    Parameters
    ----------
    image
        2-D grey image (any real dtype, typically uint8 0-255).
    kernel
        2-D odd-sized real kernel.

    Returns
    -------
    source, target
        ``image`` as float64, and
        ``clip(round(scipy.ndimage.convolve(source, kernel, mode="nearest")), 0, 255)``
        as float64. Away from the edges the unrounded convolution equals
        ``fftconvolve(source, kernel, mode="same")``.
    """
    img = np.asarray(image)
    kern = np.asarray(kernel)
    for name, arr in (("image", img), ("kernel", kern)):
        if arr.ndim != 2:
            raise InputError(f"{name} must be 2-D, got shape {arr.shape}")
        if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
            raise InputError(f"{name} must be real, got dtype {arr.dtype}")
        if arr.size == 0:
            raise InputError(f"{name} must not be empty")
    if kern.shape[0] % 2 == 0 or kern.shape[1] % 2 == 0:
        raise InputError(f"kernel must have odd shape, got {kern.shape}")
    source = img.astype(np.float64)
    kern = kern.astype(np.float64)
    if not (np.isfinite(source).all() and np.isfinite(kern).all()):
        raise InputError("image and kernel must be finite")
    blurred = scipy.ndimage.convolve(source, kern, mode="nearest")
    target = np.clip(np.round(blurred), 0.0, 255.0)
    return source, target
