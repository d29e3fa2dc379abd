"""Estimators run concurrently in threads (as inside threaded Dask workers) agree."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from scipy.signal import fftconvolve

import pipeline as km
from pipeline.sim.scenes import gaussian_kernel, survey_tile_pair


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


def test_the_sharpness_measure_in_worker_threads_is_the_single_thread_one():
    # each tile's measure is its own: split over threads it agrees to rounding (the transforms of a batch
    # of one or of several may differ in the last bit)
    made = [survey_tile_pair(seed=i, kernel=gaussian_kernel(9, fwhm=2.0 + 0.2 * i), size=64) for i in range(5)]
    src = np.stack([p.source for p in made])
    tgt = np.stack([p.target for p in made])
    tgt[3, 10:14, 20] = np.nan
    one = km.estimate_kernels(src, tgt, kernel_size=7, method="welch", workers=1)
    three = km.estimate_kernels(src, tgt, kernel_size=7, method="welch", workers=3)
    assert np.isfinite(one.width_difference).all()
    for name in ("width_difference", "width_difference_error"):
        np.testing.assert_allclose(getattr(three, name), getattr(one, name), rtol=1e-9)
    np.testing.assert_array_equal(three.flags, one.flags)


def test_one_blas_thread_holds_every_blas_library_to_one_thread_and_restores_them():
    import os

    from threadpoolctl import threadpool_info, threadpool_limits

    from pipeline.core.blas import one_blas_thread

    def blas_threads() -> list[tuple[str, int]]:
        return [(i["filepath"], i["num_threads"]) for i in threadpool_info() if i["user_api"] == "blas"]

    with threadpool_limits(limits=2, user_api="blas"):
        before = blas_threads()
        assert before  # NumPy's BLAS at least
        if (os.cpu_count() or 1) > 1:
            assert any(n > 1 for _, n in before)
        for _ in range(2):  # the stock taken at the first call serves the next
            with one_blas_thread():
                assert [n for _, n in blas_threads()] == [1] * len(before)
            assert blas_threads() == before
