"""Small kernels and convolutions shared by the estimator tests."""

from __future__ import annotations

import numpy as np


def circular_convolve(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Periodic ``kernel (*) image`` with the kernel centre at its middle pixel."""
    ky, kx = kernel.shape
    full = np.zeros(image.shape[-2:])
    full[:ky, :kx] = kernel
    full = np.roll(full, (-(ky // 2), -(kx // 2)), axis=(0, 1))
    return np.fft.irfft2(np.fft.rfft2(image) * np.fft.rfft2(full), s=image.shape[-2:])


def delta(k: int, dy: int = 0, dx: int = 0) -> np.ndarray:
    """The kernel of an integer shift by ``(dy, dx)``."""
    out = np.zeros((k, k))
    out[k // 2 + dy, k // 2 + dx] = 1.0
    return out


def l_kernel(k: int) -> np.ndarray:
    """An asymmetric, L-shaped kernel: a flip or transpose changes it."""
    h = k // 2
    out = np.zeros((k, k))
    out[h, h] = 1.0
    out[h + 1, h] = 0.6
    out[h + 2, h] = 0.3
    out[h, h + 1] = 0.45
    out[h - 1, h - 2] = 0.2
    return out


def rel_l2(est: np.ndarray, true: np.ndarray) -> float:
    """Relative L2 error."""
    return float(np.linalg.norm(est - true) / np.linalg.norm(true))
