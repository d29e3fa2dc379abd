#!/usr/bin/env python
"""Which image is sharper: how often :func:`pipeline.core.sharpness.sharpness` is right, and its cost.

Simulated survey tiles (``pipeline.sim.scenes.survey_tile_pair``, 256x256,
Moffat PSF of FWHM 3 px for the sharper image, Poisson and read noise) at
FWHM ratios ``FWHM_T / FWHM_S`` from 0.7 to 1.4: the blurrier image is the
sharper one through a Gaussian kernel (widths adding in quadrature), and for
ratios below 1 the two are swapped, so the target is the sharper. Fields:
sparse (the simulator's default density), crowded (ten times that) and very
sparse (a quarter of it).

Prints per field and ratio: the fraction of tiles with the direction right
(a tile not measured counts as wrong), the ``target_sharper`` and
``nearly_equal`` rates, the median measure against the Gaussian-equivalent
truth, and the same direction rate for the alternative measure
(:func:`autocorrelation_width_difference`), and the same for the measure
``estimate_kernels(method="welch")`` takes from its segments' spectra
(:func:`pipeline.core.sharpness.spectra_sharpness`, through
``tile_sharpness(..., method="welch")``); then the summary rates over tiles
whose FWHMs differ by more than 10 %, the same with unflagged defects (hot and
dead pixels, cosmic rays), for both measures, and the time per tile of the measure next to
``pipeline.estimate_kernels`` (default exact solver and ``welch``, 21x21
kernels) on the same tiles, whole batches, one thread, best of 2.

    python scripts/bench_direction.py [--tiles 8] [--timing-tiles 16]
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
from threadpoolctl import threadpool_limits

import pipeline as km
from pipeline.core.estimate import tile_sharpness
from pipeline.core.sharpness import autocorrelation_width_difference, sharpness
from pipeline.sim.defects import add_defects
from pipeline.sim.scenes import gaussian_kernel, survey_tile_pair

SIZE = 256
PSF = 3.0
K = 21
RATIOS = (0.7, 0.8, 0.9, 0.95, 1.0, 1.05, 1.1, 1.2, 1.3, 1.4)
FIELDS = {
    "very sparse": {"star_density": 5e-4, "galaxy_density": 2.5e-4},
    "sparse": {"star_density": 2e-3, "galaxy_density": 1e-3},
    "crowded": {"star_density": 2e-2, "galaxy_density": 1e-2},
}


def pair(seed: int, ratio: float, density: dict) -> tuple[np.ndarray, np.ndarray]:
    wide = max(ratio, 1.0 / ratio)
    if wide - 1.0 < 1e-9:
        kernel = np.zeros((K, K))
        kernel[K // 2, K // 2] = 1.0
    else:
        kernel = gaussian_kernel(K, fwhm=PSF * math.sqrt(wide * wide - 1.0))
    p = survey_tile_pair(seed=seed, kernel=kernel, size=SIZE, psf_fwhm=PSF, **density)
    return (p.source, p.target) if ratio >= 1.0 else (p.target, p.source)


def truth(ratio: float) -> float:
    """Gaussian-equivalent ``FWHM_T^2 - FWHM_S^2``."""
    return PSF**2 * (ratio * ratio - 1.0) / min(1.0, ratio * ratio)


def timed(func, repeat: int = 2) -> float:
    best = math.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        func()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiles", type=int, default=8, help="tiles per field and ratio")
    ap.add_argument("--timing-tiles", type=int, default=16, help="tiles in the timed batch")
    args = ap.parse_args()

    summary = []
    welch_rows: dict[str, list] = {}
    timing_src = timing_tgt = None
    for f, (field, density) in enumerate(FIELDS.items()):
        print(f"\n{field} field ({density['star_density']:g} stars, {density['galaxy_density']:g} "
              f"galaxies per pixel), {args.tiles} tiles of {SIZE}^2 per ratio")
        print(f"{'ratio':>6} {'truth':>7} {'median':>7} {'right':>6} {'sharper':>8} {'equal':>6} "
              f"{'unmeas':>7} {'acf median':>10} {'acf right':>9} {'welch median':>12} {'welch right':>11} "
              f"{'welch sharper':>13} {'welch equal':>11}")
        rows = []
        for i, ratio in enumerate(RATIOS):
            pairs = [pair(10_000 * f + 100 * i + t, ratio, density) for t in range(args.tiles)]
            src = np.stack([p[0] for p in pairs])
            tgt = np.stack([p[1] for p in pairs])
            if field == "sparse" and ratio == 1.2:
                timing_src, timing_tgt = src, tgt
            r = sharpness(src, tgt)
            w = tile_sharpness(src, tgt, kernel_size=K, method="welch")
            alt = autocorrelation_width_difference(src, tgt)
            want = 1 if ratio > 1.0 else -1 if ratio < 1.0 else 0
            right = (r.direction == want).mean() if want else math.nan
            alt_right = (np.sign(np.nan_to_num(alt)) == want).mean() if want else math.nan
            # defects nobody flagged: 0.1 % hot or dead pixels in each image, 10 cosmic rays
            defects = [add_defects(s, t, seed=t_i, bad_source=0.001, bad_target=0.001,
                                   flag_bad=False, cosmic_rays=10)
                       for t_i, (s, t) in enumerate(zip(src, tgt))]
            d_src, d_tgt = np.stack([d.source for d in defects]), np.stack([d.target for d in defects])
            rd = sharpness(d_src, d_tgt)
            wd = tile_sharpness(d_src, d_tgt, kernel_size=K, method="welch")
            rows.append((ratio, r, alt, rd))
            welch_rows.setdefault(field, []).append((ratio, w, None, wd))
            w_right = (w.direction == want).mean() if want else math.nan
            print(f"{ratio:6.2f} {truth(ratio):7.2f} {np.nanmedian(r.width_difference):7.2f} "
                  f"{right:6.2f} {r.target_sharper.mean():8.2f} {r.nearly_equal.mean():6.2f} "
                  f"{(r.direction == 0).mean():7.2f} {np.nanmedian(alt):10.2f} {alt_right:9.2f} "
                  f"{np.nanmedian(w.width_difference):12.2f} {w_right:11.2f} {w.target_sharper.mean():13.2f} "
                  f"{w.nearly_equal.mean():11.2f}")
        summary.append((field, rows))

    print("\nover tiles whose FWHMs differ by more than 10 % (|ratio - 1| > 0.1; 'right >=10%' "
          "adds the ratios 0.9 and 1.1):")
    print(f"{'field':>12} {'right':>6} {'right >=10%':>11} {'acf right':>9} {'flag if S sharper':>18} "
          f"{'flag if T sharper':>18} {'equal at |r-1|<=.05':>20} {'right, defects':>15} "
          f"{'flag if S sharper, defects':>27}")
    for field, rows in summary:
        clear = [(ra, r, a, d) for ra, r, a, d in rows if abs(ra - 1.0) > 0.1 + 1e-9]
        right = np.concatenate([r.direction == np.sign(ra - 1.0) for ra, r, _, _ in clear])
        right10 = np.concatenate([r.direction == np.sign(ra - 1.0) for ra, r, _, _ in rows
                                  if abs(ra - 1.0) > 0.1 - 1e-9])
        alt_right = np.concatenate([np.sign(np.nan_to_num(a)) == np.sign(ra - 1.0) for ra, _, a, _ in clear])
        right_d = np.concatenate([d.direction == np.sign(ra - 1.0) for ra, _, _, d in clear])
        fp = np.concatenate([r.target_sharper for ra, r, _, _ in rows if ra >= 1.0])
        fp_d = np.concatenate([d.target_sharper for ra, _, _, d in rows if ra >= 1.0])
        tp = np.concatenate([r.target_sharper for ra, r, _, _ in clear if ra < 1.0])
        eq = np.concatenate([r.nearly_equal for ra, r, _, _ in rows if abs(ra - 1.0) <= 0.05 + 1e-9])
        print(f"{field:>12} {right.mean():6.3f} {right10.mean():11.3f} {alt_right.mean():9.3f} {fp.mean():18.3f} "
              f"{tp.mean():18.3f} {eq.mean():20.3f} {right_d.mean():15.3f} {fp_d.mean():27.3f}")

    print("\nthe same, measured from the Welch segments' spectra (estimate_kernels(method='welch'): "
          "tile_sharpness(..., method='welch'); 'acf right' not measured):")
    for field, rows in welch_rows.items():
        clear = [(ra, r, d) for ra, r, _, d in rows if abs(ra - 1.0) > 0.1 + 1e-9]
        right = np.concatenate([r.direction == np.sign(ra - 1.0) for ra, r, _ in clear])
        right10 = np.concatenate([r.direction == np.sign(ra - 1.0) for ra, r, _, _ in rows
                                  if abs(ra - 1.0) > 0.1 - 1e-9])
        right_d = np.concatenate([d.direction == np.sign(ra - 1.0) for ra, _, d in clear])
        fp = np.concatenate([r.target_sharper for ra, r, _, _ in rows if ra >= 1.0])
        fp_d = np.concatenate([d.target_sharper for ra, _, _, d in rows if ra >= 1.0])
        tp = np.concatenate([r.target_sharper for ra, r, _ in clear if ra < 1.0])
        eq = np.concatenate([r.nearly_equal for ra, r, _, _ in rows if abs(ra - 1.0) <= 0.05 + 1e-9])
        print(f"{field:>12} {right.mean():6.3f} {right10.mean():11.3f} {'':>9} {fp.mean():18.3f} "
              f"{tp.mean():18.3f} {eq.mean():20.3f} {right_d.mean():15.3f} {fp_d.mean():27.3f}")

    n = min(args.timing_tiles, len(timing_src))
    src, tgt = timing_src[:n], timing_tgt[:n]
    measure = sharpness(src, tgt)
    print(f"\ntime per {SIZE}^2 tile, a batch of {n} (sparse field, ratio 1.2), one thread, best of 2 "
          "(estimate_kernels measures which image is sharper unless given the measure):")
    with threadpool_limits(1):
        cases = {
            "sharpness": lambda: sharpness(src, tgt),
            "sharpness, despike=False": lambda: sharpness(src, tgt, despike=False),
            "autocorrelation moments": lambda: autocorrelation_width_difference(src, tgt),
            "estimate_kernels lstsq (default)": lambda: km.estimate_kernels(src, tgt, kernel_size=K),
            "  lstsq, the measure given": lambda: km.estimate_kernels(src, tgt, kernel_size=K, sharpness=measure),
            "estimate_kernels welch": lambda: km.estimate_kernels(src, tgt, kernel_size=K, method="welch"),
            "  welch, the measure given": lambda: km.estimate_kernels(src, tgt, kernel_size=K, method="welch",
                                                                     sharpness=measure),
            "  welch, forward given, no diagnostics": lambda: km.estimate_kernels(
                src, tgt, kernel_size=K, method="welch", diagnostics=False),
        }
        for name, func in cases.items():
            print(f"  {name:34s} {1e3 * timed(func) / n:8.2f} ms")


if __name__ == "__main__":
    main()
