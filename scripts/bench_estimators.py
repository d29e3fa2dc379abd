#!/usr/bin/env python
"""Speed and accuracy of the kernel estimators, measured side by side in one run.

Survey tiles: 256x256, 21x21 kernels, simulated stars and galaxies with
Poisson and read noise (``pipeline.sim.scenes.survey_tile_pair``).  Prints tiles
per second (single process, 1 and 2 threads) and the median relative L2 error
of each method, plus photutils' Fourier ratio (``make_kernel``) on the same
tiles when photutils is installed, and the accuracy on the 8-bit photo case.

    python scripts/bench_estimators.py [--tiles 64] [--unique 16]
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import numpy as np
from threadpoolctl import threadpool_limits

import pipeline as km
from pipeline.core.lstsq import lstsq_kernels
from pipeline.core.moments import adaptive_moments
from pipeline.core.welch import welch_kernels
from pipeline.sim.scenes import blurred_photo, gaussian_kernel, motion_kernel, survey_tile_pair

K = 21
SIZE = 256


def survey(unique: int, seed: int = 7):
    rng = np.random.default_rng(seed)
    src, tgt, kern = [], [], []
    for _ in range(unique):
        kernel = gaussian_kernel(K, fwhm=rng.uniform(2.5, 3.5), e1=rng.uniform(-0.08, 0.08),
                                 e2=rng.uniform(-0.08, 0.08), dy=rng.uniform(-0.3, 0.3),
                                 dx=rng.uniform(-0.3, 0.3), flux=rng.uniform(0.9, 1.1))
        pair = survey_tile_pair(seed=rng, kernel=kernel, size=SIZE)
        src.append(pair.source)
        tgt.append(pair.target)
        kern.append(kernel)
    return np.stack(src), np.stack(tgt), np.stack(kern)


def rel_l2(est, truth, normalise=False):
    if normalise:
        est = est / est.sum(axis=(1, 2), keepdims=True)
        truth = truth / truth.sum(axis=(1, 2), keepdims=True)
    return float(np.median(np.sqrt(((est - truth) ** 2).sum(axis=(1, 2)) / (truth**2).sum(axis=(1, 2)))))


def timed(func, repeat: int = 2):
    best, out = np.inf, None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = func()
        best = min(best, time.perf_counter() - t0)
    return best, out


def photutils_kernels(src, tgt):
    try:
        from photutils.psf_matching import make_kernel
    except ImportError:
        try:
            from photutils.psf_matching import create_matching_kernel as make_kernel
        except ImportError:
            return None
    from photutils.psf_matching import TopHatWindow

    h = K // 2
    c = (SIZE - 1) // 2  # photutils wants odd, centred arrays: drop the last row and column
    out = []
    for s, t in zip(src[:, :-1, :-1], tgt[:, :-1, :-1]):
        full = make_kernel(s - np.median(s), t - np.median(t), window=TopHatWindow(0.35))
        out.append(full[c - h : c + h + 1, c - h : c + h + 1])
    return np.stack(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=64, help="tiles per timed batch")
    parser.add_argument("--unique", type=int, default=16, help="distinct simulated tiles")
    args = parser.parse_args()

    src_u, tgt_u, truth_u = survey(args.unique)
    reps = -(-args.tiles // args.unique)
    src = np.tile(src_u, (reps, 1, 1))[: args.tiles]
    tgt = np.tile(tgt_u, (reps, 1, 1))[: args.tiles]
    truth = np.tile(truth_u, (reps, 1, 1))[: args.tiles]
    print(f"survey tiles {SIZE}x{SIZE}, kernel {K}x{K}, batch of {args.tiles} "
          f"({args.unique} distinct), single process")
    print(f"{'method':34s} {'threads':>7s} {'tiles/s':>9s} {'median rel L2':>14s}")

    src32, tgt32 = src.astype(np.float32), tgt.astype(np.float32)
    auto = km.estimate_kernels(src_u, tgt_u, kernel_size=K)
    # a fixed regularisation: the median of what the evidence chose, per penalty term
    lam_fixed = tuple(float(v) for v in np.median(lstsq_kernels(src_u, tgt_u, kernel_size=K).lam_terms, axis=0))
    lam_text = "/".join(f"{v:.3g}" for v in lam_fixed)
    configs = [
        ("lstsq (default: auto lam, robust)", "lstsq", {}),
        (f"lstsq fixed lam={lam_text}", "lstsq", {"regularization": lam_fixed, "robust": False}),
        ("welch", "welch", {}),
        ("welch float32, diagnostics=False", "welch32", {"diagnostics": False}),
        ("ratio", "ratio", {}),
    ]
    for label, method, options in configs:
        for threads in (1, 2):
            s_in, t_in = (src32, tgt32) if method == "welch32" else (src, tgt)
            dt, res = timed(partial(km.estimate_kernels, s_in, t_in, kernel_size=K, method=method.rstrip("32"),
                                    workers=threads, **options))
            print(f"{label:34s} {threads:7d} {args.tiles / dt:9.1f} {rel_l2(res.kernels, truth):14.4f}")

    # the bare estimators, without the validation and diagnostics the public API adds
    cores = [
        ("core: lstsq default", lambda: lstsq_kernels(src, tgt, kernel_size=K)),
        ("core: lstsq fixed lam", lambda: lstsq_kernels(src, tgt, kernel_size=K, regularization=lam_fixed,
                                                        robust=False)),
        ("core: welch float64", lambda: welch_kernels(src, tgt, kernel_size=K)),
        ("core: welch float32", lambda: welch_kernels(src32, tgt32, kernel_size=K)),
        ("core: welch float32, workers=2", lambda: welch_kernels(src32, tgt32, kernel_size=K, workers=2)),
    ]
    for label, func in cores:
        threads = 2 if "workers=2" in label else 1
        with threadpool_limits(1, "blas"):
            dt, res = timed(func)
        print(f"{label:34s} {threads:7d} {args.tiles / dt:9.1f} {rel_l2(res.kernels, truth):14.4f}")

    n_ph = min(args.tiles, 16)
    dt, ph = timed(lambda: photutils_kernels(src[:n_ph], tgt[:n_ph]), repeat=1)
    if ph is None:
        print("photutils: not installed (pip install kernelmap[bench])")
    else:
        print(f"{'photutils make_kernel (normalised)':34s} {1:7d} {n_ph / dt:9.1f} "
              f"{rel_l2(ph, truth[:n_ph], normalise=True):14.4f}")
        print(f"{'  lstsq default, normalised, same':34s} {'':7s} {'':9s} "
              f"{rel_l2(auto.kernels[:n_ph], truth_u[:n_ph], normalise=True):14.4f}")

    tru = adaptive_moments(truth_u)
    print("\nlstsq default on the distinct tiles: median |FWHM/true - 1| "
          f"{np.median(np.abs(auto.fwhm / tru.fwhm - 1)):.4f}, |e - e_true| "
          f"{np.median(np.hypot(auto.e1 - tru.e1, auto.e2 - tru.e2)):.4f}, |flux/true - 1| "
          f"{np.median(np.abs(auto.flux / truth_u.sum(axis=(1, 2)) - 1)):.4f}, centroid "
          f"{np.median(np.hypot(auto.centroid_y - tru.y, auto.centroid_x - tru.x)):.4f} px")

    try:
        from skimage import data
    except ImportError:
        print("photo case: scikit-image not installed")
        return
    photo = data.camera().astype(float)
    print("\n8-bit photo (512x512 camera, edge-extended blur, 15x15 kernel): relative L2 error")
    for name, kernel in [("gaussian", gaussian_kernel(15, fwhm=3.0, e1=0.1, dy=0.3)),
                         ("motion streak", motion_kernel(15, length=5.0, angle_deg=30.0, dy=1.0, dx=-2.0))]:
        s, t = blurred_photo(photo, kernel)
        errs = {m: np.linalg.norm(km.estimate_kernel(s, t, kernel_size=15, method=m) - kernel)
                / np.linalg.norm(kernel) for m in ("lstsq", "welch", "ratio")}
        print(f"  {name:14s} " + "  ".join(f"{m} {e:.4f}" for m, e in errs.items()))


if __name__ == "__main__":
    main()
