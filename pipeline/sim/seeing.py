"""Pairs whose seeing varies across the field, so that either image may be the sharper one.

One sharp scene (:func:`~pipeline.sim.scenes.render_scene`, Moffat PSF of
``base_fwhm``) is blurred twice by round Gaussians whose FWHM changes linearly
along ``x`` (piecewise constant in patches, :func:`~pipeline.sim.scenes.convolve_varying`):
``source_fwhm`` from the left edge to the right, and ``target_fwhm`` likewise.
Where the target's Gaussian is the wider, ``target = K (*) source`` with a
Gaussian ``K`` of ``FWHM_K^2 = FWHM_T^2 - FWHM_S^2`` (forward); where it is the
narrower, ``source = K (*) target`` (reverse); where the two lines cross, the
field crosses over. Then sky, Poisson and read noise (:func:`~pipeline.sim.scenes.add_noise`).

:meth:`SeeingPair.truth` gives, for a position, the direction, the kernel
in that direction (the ratio of the two sampled Gaussians' transforms, exact
for the simulation) and the Gaussian-equivalent ``FWHM_T^2 - FWHM_S^2``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import OptionError
from .scenes import add_noise, convolve_varying, gaussian_kernel, render_scene, scene_reach

__all__ = ["SeeingPair", "gaussian_ratio", "seeing_pair"]

#: Side of the stamps the blurring Gaussians are drawn on (odd; wide enough for FWHM 6 px).
_STAMP = 41


@dataclass(frozen=True)
class SeeingPair:
    """A simulated pair and its truth.

    Attributes
    ----------
    source, target
        float64 images, sky subtracted.
    source_variance, target_variance
        Their per-pixel noise variances, ADU^2.
    source_fwhm, target_fwhm
        ``(left, right)`` FWHM of each image's blurring Gaussian, pixels.
    base_fwhm
        FWHM of the Moffat PSF both share, pixels.
    patch
        Side of the patches in which the blur is constant, pixels.
    """

    source: np.ndarray
    target: np.ndarray
    source_variance: np.ndarray
    target_variance: np.ndarray
    source_fwhm: tuple[float, float]
    target_fwhm: tuple[float, float]
    base_fwhm: float
    patch: int

    def _fwhm(self, ends: tuple[float, float], x: float) -> float:
        # the blur of the patch holding x, as the simulation drew it (at the patch's centre)
        x0 = (int(x) // self.patch) * self.patch
        return _linear(ends, x0 + (self.patch - 1) / 2.0, self.target.shape[1])

    def widths(self, x: float) -> tuple[float, float]:
        """FWHM of the source's and the target's blurring Gaussians at column ``x``, pixels."""
        return self._fwhm(self.source_fwhm, x), self._fwhm(self.target_fwhm, x)

    def width_difference(self, x: float) -> float:
        """``FWHM_T^2 - FWHM_S^2`` at column ``x`` (pixels squared; the shared PSF cancels)."""
        s, t = self.widths(x)
        return t * t - s * s

    def fwhm_ratio(self, x: float) -> float:
        """``FWHM_T / FWHM_S`` at column ``x``, the shared PSF counted as a Gaussian of ``base_fwhm``."""
        s, t = self.widths(x)
        b2 = self.base_fwhm**2
        return math.sqrt((b2 + t * t) / (b2 + s * s))

    def truth(self, x: float, kernel_size: int) -> tuple[int, np.ndarray]:
        """``(direction, kernel)`` at column ``x``: ``1`` and ``K`` with ``target = K * source``, or ``-1`` and
        ``K`` with ``source = K * target`` (the blurrier image's Gaussian over the sharper one's)."""
        s, t = self.widths(x)
        direction = 1 if t >= s else -1
        wide, narrow = (t, s) if direction == 1 else (s, t)
        return direction, gaussian_ratio(wide, narrow, kernel_size)


def _linear(ends: tuple[float, float], x: float, nx: int) -> float:
    left, right = ends
    return left + (right - left) * x / max(nx - 1, 1)


def _blur(fwhm: float) -> np.ndarray:
    if fwhm <= 0.0:
        stamp = np.zeros((_STAMP, _STAMP))
        stamp[_STAMP // 2, _STAMP // 2] = 1.0
        return stamp
    return gaussian_kernel(_STAMP, fwhm=fwhm)


def gaussian_ratio(wide: float, narrow: float, kernel_size: int) -> np.ndarray:
    """The kernel ``K`` with ``blur(wide) = K * blur(narrow)`` for the sampled Gaussians the simulation uses
    (the ratio of their transforms on a padded grid, cut to ``kernel_size``)."""
    pad = 2 * _STAMP  # an odd grid of 5 stamps a side, centred
    n = _STAMP + 2 * pad
    fw = np.fft.rfft2(np.fft.ifftshift(np.pad(_blur(wide), pad)))
    fn = np.fft.rfft2(np.fft.ifftshift(np.pad(_blur(narrow), pad)))
    kernel = np.fft.fftshift(np.fft.irfft2(fw / fn, s=(n, n)))
    c, h = n // 2, kernel_size // 2
    return kernel[c - h:c + h + 1, c - h:c + h + 1]


def seeing_pair(
    seed: int | np.random.Generator,
    shape: tuple[int, int] = (256, 512),
    *,
    source_fwhm: tuple[float, float] = (2.5, 2.5),
    target_fwhm: tuple[float, float] = (1.0, 4.0),
    base_fwhm: float = 2.0,
    patch: int = 32,
    star_density: float = 4e-3,
    galaxy_density: float = 2e-3,
    sky: float = 1000.0,
    read_noise: float = 5.0,
) -> SeeingPair:
    """Simulate a pair whose blur changes along ``x`` (see the module notes).

    Parameters
    ----------
    seed
        Generator or integer seed.
    shape
        ``(ny, nx)``.
    source_fwhm, target_fwhm
        FWHM of each image's blurring Gaussian at the left and right edges,
        pixels (0 is no blur).
    base_fwhm
        The shared Moffat PSF's FWHM, pixels.
    patch
        Blur constant in ``patch`` x ``patch`` squares.
    star_density, galaxy_density
        Objects per pixel.
    sky, read_noise
        ADU per pixel, electrons (gain 1).
    """
    if shape[0] % patch or shape[1] % patch:
        raise OptionError(f"shape {tuple(shape)} must be a multiple of patch {patch} along both axes")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    margin = -(-(scene_reach(base_fwhm) + _STAMP) // patch) * patch  # whole patches: they align with the image's
    canvas, _ = render_scene(rng, shape, psf=base_fwhm, star_density=star_density, galaxy_density=galaxy_density,
                             margin=margin)
    nx = shape[1]
    images, variances = [], []
    for ends in (source_fwhm, target_fwhm):
        def blur_at(yc: float, xc: float, ends: tuple[float, float] = ends) -> np.ndarray:
            return _blur(_linear(ends, xc - margin, nx))

        blurred = convolve_varying(canvas, blur_at, patch=patch, kernel_size=_STAMP)
        noisy, variance = add_noise(rng, blurred[margin:margin + shape[0], margin:margin + nx], sky=sky,
                                    read_noise=read_noise)
        images.append(noisy)
        variances.append(variance)
    return SeeingPair(images[0], images[1], variances[0], variances[1], (float(source_fwhm[0]), float(source_fwhm[1])),
                      (float(target_fwhm[0]), float(target_fwhm[1])), float(base_fwhm), int(patch))
