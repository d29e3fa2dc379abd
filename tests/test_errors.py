"""Bad input gets a clear error naming the problem, before any work."""

import numpy as np
import pytest

import pipeline as km

rng = np.random.default_rng(0)
IMG = rng.normal(size=(64, 64))


@pytest.mark.parametrize(
    ("source", "target", "kwargs", "match"),
    [
        (IMG, IMG[:, :60], {}, r"same shape.*\(64, 64\).*\(64, 60\)"),
        (IMG[None], IMG[None], {}, r"source must be 2-D"),
        (IMG, IMG.ravel(), {}, r"target must be 2-D"),
        (IMG, IMG, {"kernel_size": 8}, r"kernel_size must be odd"),
        (IMG, IMG, {"kernel_size": 0}, r"kernel_size must be odd and positive"),
        (IMG, IMG, {"kernel_size": 3.0}, r"kernel_size must be an odd integer"),
        (IMG, IMG, {"kernel_size": 35}, r"too large for 64x64 tiles: at most 31"),
        (np.full((64, 64), np.nan), IMG, {}, r"source has no finite pixel"),
        (IMG, np.full((64, 64), np.nan), {}, r"target has no finite pixel"),
        (np.full((64, 64), 3.0), IMG, {}, r"source has no power"),
        (IMG.astype(complex), IMG, {}, r"source must hold real numbers"),
        (IMG, IMG, {"method": "fourier"}, r"method='fourier' is not known; choose one of lstsq, ratio, welch"),
        (IMG, IMG, {"segment_size": 32}, r"unknown option\(s\) segment_size for method='lstsq'"),
        (IMG, IMG, {"regularization": -1.0}, r"regularization must be 'auto', a number >= 0"),
        (IMG, IMG, {"regularization": (1.0, 2.0, 3.0)}, r"or 2 numbers >= 0 \(one per term of penalty='compact'\)"),
        (IMG, IMG, {"regularization": "strong"}, r"regularization must be 'auto'"),
        (IMG, IMG, {"penalty": "tv"}, r"penalty='tv' is not known"),
        (IMG, IMG, {"mask": np.zeros((10, 10))}, r"mask must have the images' shape"),
    ],
)
def test_single_pair_errors(source, target, kwargs, match):
    kwargs = {"kernel_size": 7, **kwargs}
    with pytest.raises(km.KernelmapError, match=match):
        km.estimate_kernel(source, target, **kwargs)


def test_errors_are_value_errors():
    with pytest.raises(ValueError):
        km.estimate_kernel(IMG, IMG, kernel_size=4)


@pytest.mark.parametrize(
    ("sources", "targets", "kwargs", "match"),
    [
        (IMG[None], IMG, {}, r"targets must be 3-D"),
        (np.stack([IMG, IMG]), IMG[None], {}, r"same shape"),
        (IMG, np.stack([IMG, IMG]), {"mask": np.zeros((3, 64, 64))}, r"mask must have the targets' shape"),
        (IMG, np.stack([IMG, IMG]), {"workers": 0}, r"workers must be a positive integer"),
        (IMG, np.stack([IMG, IMG]), {"method": "welch", "segment_size": 128}, r"segment_size"),
    ],
)
def test_batch_errors(sources, targets, kwargs, match):
    with pytest.raises(km.KernelmapError, match=match):
        km.estimate_kernels(sources, targets, kernel_size=7, **kwargs)
