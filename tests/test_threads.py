"""Estimators run concurrently in threads (as inside threaded Dask workers) agree."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from scipy.signal import fftconvolve

import pipeline as km


def pairs(n, size=64):
    rng = np.random.default_rng(11)
    kernel = np.outer([1, 3, 4, 3, 1], [1, 2, 4, 2, 1]) / 144.0
    canvas = rng.normal(size=(n, size + 16, size + 16)) * 10.0
    tgt = np.stack([fftconvolve(c, kernel, mode="same") for c in canvas])[:, 8:-8, 8:-8]
    return canvas[:, 8:-8, 8:-8], tgt + rng.normal(size=tgt.shape)


@pytest.mark.parametrize("method", ["lstsq", "welch", "ratio"])
def test_concurrent_calls_give_identical_results(method):
    src, tgt = pairs(6)
    serial = [km.estimate_kernels(src[i : i + 1], tgt[i : i + 1], kernel_size=7, method=method)
              for i in range(6)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = [pool.submit(km.estimate_kernels, src[i : i + 1], tgt[i : i + 1], kernel_size=7,
                               method=method) for i in range(6) for _ in range(2)]
        results = [f.result() for f in futures]
    for j, res in enumerate(results):
        np.testing.assert_array_equal(res.kernels, serial[j // 2].kernels)


@pytest.mark.parametrize("method", ["lstsq", "welch"])
def test_worker_threads_match_a_single_thread(method):
    src, tgt = pairs(8)
    one = km.estimate_kernels(src, tgt, kernel_size=7, method=method, workers=1)
    two = km.estimate_kernels(src, tgt, kernel_size=7, method=method, workers=3)
    np.testing.assert_allclose(two.kernels, one.kernels, rtol=1e-6, atol=1e-9)
