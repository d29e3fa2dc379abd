#!/usr/bin/env python
"""Tiles dominated by one bright, unsaturated star: in the middle of the tile or at its edge.

Each tile is a sparse simulated field (``pipeline.sim.scenes.render_scene``:
Moffat PSF of FWHM 3 px, a quarter of the survey default's density, fluxes
1e3-1e5 ADU) plus one star of the given flux range: anywhere at least 40 px
inside the tile ("middle"), or centred within 4 px outside to 6 px inside
one of its edges ("edge": part of its light, and of the light the kernel
spreads, lies beyond the tile). The target is the whole canvas convolved
with the kernel; both images get sky (1000 ADU), Poisson and read noise
(``add_noise``). 21x21 kernels: Gaussians of FWHM 3 and 4.7 px, a Moffat of
beta 2.5, an elongated Moffat, a core with an offset wide wing.

Prints per kernel, place and flux range the median and 80th percentile of
the relative L2 error of ``estimate_kernels`` with ``method="welch"`` and
with the default ``lstsq``, ``--tiles`` tiles each.

    python scripts/bench_bright_star.py [--tiles 16] [--kernels gauss3,moffat2.5]
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy.signal import fftconvolve

import pipeline as km
from pipeline.sim.scenes import MoffatPSF, add_noise, gaussian_kernel, moffat_psf, render_scene

K = 21
SIZE = 256
PAD = 60
#: Flux ranges (ADU) of the bright star.
BRIGHT = ((3e4, 1e5), (3e5, 1e6), (3e6, 1e7))


def _unit(kernel: np.ndarray) -> np.ndarray:
    return kernel / kernel.sum()


def _moffat(fwhm: float, beta: float, e1: float = 0.0) -> np.ndarray:
    yy, xx = np.mgrid[:K, :K] - K // 2
    alpha = fwhm / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))
    return _unit((1.0 + ((1.0 + e1) * xx**2 + (1.0 - e1) * yy**2) / alpha**2) ** (-beta))


KERNELS = {
    "gauss3": _unit(gaussian_kernel(K, fwhm=3.0)),
    "gauss4.7": _unit(gaussian_kernel(K, fwhm=4.7)),
    "moffat2.5": _moffat(3.0, 2.5),
    "moffat4-elongated": _moffat(3.5, 4.0, 0.15),
    "core+wing": _unit(0.8 * _unit(gaussian_kernel(K, fwhm=2.5)) + 0.2 * _unit(gaussian_kernel(K, fwhm=6.25, dx=0.8))),
}


def bright_star_pairs(kernel: np.ndarray, n: int, flux: tuple[float, float], place: str,
                      seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``n`` float32 ``(source, target)`` tiles with one bright star (module docstring)."""
    rng = np.random.default_rng(seed)
    psf = MoffatPSF(fwhm=3.0, beta=3.5)
    half = psf.half_size
    star = moffat_psf(2 * half + 1, fwhm=psf.fwhm, beta=psf.beta)
    sources, targets = [], []
    for _ in range(n):
        scene, _ = render_scene(rng, (SIZE, SIZE), psf=psf, star_density=5e-4, galaxy_density=2.5e-4,
                                star_flux=(1e3, 1e5), galaxy_flux=(1e3, 1e5), margin=PAD)
        off, along = rng.uniform(-4.0, 6.0), rng.uniform(30.0, SIZE - 30.0)
        y, x = [(off, along), (SIZE - 1 - off, along), (along, off), (along, SIZE - 1 - off)][rng.integers(4)]
        if place == "middle":
            y, x = rng.uniform(40.0, SIZE - 40.0, 2)
        iy, ix = int(round(y)) + PAD, int(round(x)) + PAD
        scene[iy - half:iy + half + 1, ix - half:ix + half + 1] += rng.uniform(*flux) * star
        tile = (slice(PAD, PAD + SIZE), slice(PAD, PAD + SIZE))
        sources.append(add_noise(rng, scene[tile])[0])
        targets.append(add_noise(rng, fftconvolve(scene, kernel, mode="same")[tile])[0])
    return np.stack(sources).astype(np.float32), np.stack(targets).astype(np.float32)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiles", type=int, default=16, help="tiles per kernel, place and flux range")
    p.add_argument("--kernels", default=",".join(KERNELS), help="comma-separated names of KERNELS")
    args = p.parse_args()
    print(f"relative L2 error, median / 80th percentile over {args.tiles} tiles (256², 21x21 kernels, one thread)")
    print(f"{'kernel':<18} {'place':<7} {'bright star, ADU':<17} {'welch':>13} {'lstsq':>13}")
    for name in args.kernels.split(","):
        truth = KERNELS[name]
        for place in ("middle", "edge"):
            for flux in BRIGHT:
                src, tgt = bright_star_pairs(truth, args.tiles, flux, place)
                cells = []
                for method in ("welch", "lstsq"):
                    est = km.estimate_kernels(src, tgt, kernel_size=K, method=method).kernels
                    err = np.linalg.norm(est - truth, axis=(1, 2)) / np.linalg.norm(truth)
                    cells.append(f"{np.nanmedian(err):.3f} / {np.nanquantile(err, 0.8):.3f}")
                print(f"{name:<18} {place:<7} {flux[0]:.0e}-{flux[1]:.0e}     {cells[0]:>13} {cells[1]:>13}",
                      flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
