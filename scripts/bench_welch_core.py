"""Time :func:`pipeline.core.welch.welch_kernels` and measure its accuracy.

Synthetic data: white-noise sources convolved with an elliptical, off-centre
Gaussian kernel (on a padded canvas, so tiles have no edge effects), with and
without target noise. Prints tiles per second for ``workers=1`` and ``2`` (best
of several repeats of the whole run, since shared machines are noisy) and the
mean relative L2 error of the kernels.

Usage: ``python scripts/bench_welch_core.py [--tiles 256] [--batch 64]``
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from scipy.signal import fftconvolve

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.core.welch import welch_kernels


def gaussian_kernel(size: int, *, sy: float = 2.0, sx: float = 2.6, dy: float = 0.7, dx: float = -0.4) -> np.ndarray:
    """Elliptical Gaussian of flux 1.3, slightly off-centre."""
    h = size // 2
    yy, xx = np.mgrid[-h : h + 1, -h : h + 1]
    k = np.exp(-((yy - dy) ** 2 / (2 * sy**2) + (xx - dx) ** 2 / (2 * sx**2)))
    return 1.3 * k / k.sum()


def make_tiles(n: int, size: int, kernel: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` white-noise source tiles and their noise-free convolved targets."""
    rng = np.random.default_rng(seed)
    pad = kernel.shape[0]
    src = rng.standard_normal((n, size + 2 * pad, size + 2 * pad))
    tgt = fftconvolve(src, kernel[None], mode="same", axes=(1, 2))
    return src[:, pad:-pad, pad:-pad].copy(), tgt[:, pad:-pad, pad:-pad].copy()


def rel_l2(est: np.ndarray, true: np.ndarray) -> float:
    """Mean over tiles of ``||est - true|| / ||true||``."""
    return float(np.mean(np.linalg.norm(est - true, axis=(1, 2)) / np.linalg.norm(true)))


def main() -> None:
    """Run the benchmark and print its results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=256)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--kernel", type=int, default=21)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    kernel = gaussian_kernel(args.kernel)
    src, tgt = make_tiles(args.tiles, args.size, kernel)
    src32, tgt32 = src.astype(np.float32), tgt.astype(np.float32)

    for workers in (1, 2):
        welch_kernels(src32[: args.batch], tgt32[: args.batch], kernel_size=args.kernel, workers=workers)
        best = np.inf
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            for a in range(0, args.tiles, args.batch):
                welch_kernels(src32[a : a + args.batch], tgt32[a : a + args.batch], kernel_size=args.kernel,
                              workers=workers)
            best = min(best, time.perf_counter() - t0)
        print(f"workers={workers}: {args.tiles / best:7.1f} tiles/s  ({args.tiles} tiles {args.size}x{args.size}, "
              f"k={args.kernel}, batches of {args.batch}, float32)")

    rng = np.random.default_rng(1)
    noisy = tgt + 0.1 * tgt.std() * rng.standard_normal(tgt.shape)
    for label, t in (("noise-free", tgt), ("noisy (target SNR 10 per pixel)", noisy)):
        res = welch_kernels(src, t, kernel_size=args.kernel)
        print(f"relative L2 error, {label}: {rel_l2(res.kernels, kernel):.4f}")


if __name__ == "__main__":
    main()
