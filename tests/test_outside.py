"""The kernel-field model refuses positions outside the image (or gives NaN kernels there, with a
warning), and is evaluated anywhere inside it, beyond the outermost tile centres too."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import xarray as xr
import zarr

import pipeline
from pipeline.core.field import KernelField, image_extent
from pipeline.errors import OptionError, OutsideImageError, OutsideImageWarning

SHAPE = (150, 200)
K = 9


# edge_run (conftest): the default job on a 150x200 stack, kernel 9, 64-px tiles


def test_kernel_at_outside_the_image_raises_or_gives_nan_with_a_warning(edge_run):
    folder, _ = edge_run
    km = pipeline.KernelMap.open(folder / "kernels.zarr")
    ds = km.ds
    assert km.extent == (-0.5, 149.5, -0.5, 199.5)
    # inside the image but beyond the outermost tile centres (31.5 .. 117.5): covered pixels, evaluated
    corners = km.kernel_at("epoch-0", [-0.5, 0.0, 149.0, 149.5], [-0.5, 199.0, 0.0, 199.5])
    assert np.isfinite(corners).all()
    for reader in (km, ds.kernelmap):
        with pytest.raises(OutsideImageError) as info:
            reader.kernel_at("epoch-0", y=-5000.0, x=3.0)
        message = str(info.value)
        assert "position (y=-5000, x=3) is outside the image" in message
        assert "y -0.5 .. 149.5 and x -0.5 .. 199.5" in message and "outside='nan'" in message
        with pytest.raises(OutsideImageError, match=r"1 of 3 positions, the first \(y=10, x=199.6\), are outside"):
            reader.kernel_at("epoch-0", y=[10.0, 10.0, 10.0], x=[0.0, 199.6, 100.0])
        with pytest.warns(OutsideImageWarning, match="2 of 3 positions.* their kernels are NaN") as caught:
            kernels = reader.kernel_at("epoch-0", y=[10.0, 150.0, -1.0], x=[5.0, 5.0, 5.0], outside="nan")
        assert caught[0].filename == __file__  # the warning points at the caller
        assert kernels.shape == (3, K, K)
        assert np.isfinite(kernels[0]).all() and np.isnan(kernels[1:]).all()
        np.testing.assert_allclose(kernels[0], km.kernel_at("epoch-0", 10.0, 5.0), rtol=1e-12, atol=1e-15)
        with pytest.raises(OptionError, match="outside='clip': use one of 'raise', 'nan'"):
            reader.kernel_at("epoch-0", 10.0, 5.0, outside="clip")
    # the model itself knows the extent too
    field = km.field("epoch-0")
    assert field.extent == km.extent
    with pytest.raises(OutsideImageError):
        field.kernel_at(200.0, 5.0)
    # what used to come back silently far outside: nothing like any kernel of the image
    far, near = replace(field, extent=None).kernel_at(-5000.0, 3.0), field.kernel_at(0.0, 3.0)
    assert np.linalg.norm(far - near) > 2 * np.linalg.norm(near)


def test_a_kernel_field_checks_positions_only_with_an_extent():
    field = KernelField(degree=1, coefficients=np.stack([np.ones((3, 3)), np.zeros((3, 3)), np.ones((3, 3))]),
                        centre=(50.0, 50.0), scale=(40.0, 40.0), used=np.ones(4, bool),
                        rejected=np.zeros(4, bool), cv_error=0.0, cv_errors={})
    np.testing.assert_allclose(field.kernel_at(-1000.0, 50.0), np.full((3, 3), 1 - 1050 / 40))  # unchecked
    bounded = replace(field, extent=image_extent(100, 120))
    assert bounded.extent == (-0.5, 99.5, -0.5, 119.5)
    np.testing.assert_array_equal(bounded.outside([-0.5, -0.51, 99.5, 99.51, 50.0], [0, 0, 0, 0, 119.6]),
                                  [False, True, False, True, True])
    with pytest.raises(OutsideImageError, match=r"position \(y=-0.51, x=0\) is outside the image"):
        bounded.kernel_at(-0.51, 0.0)
    with pytest.warns(OutsideImageWarning) as caught:
        values = bounded.kernel_at(np.array([[0.0, 200.0]]), 10.0, outside="nan")
    assert caught[0].filename == __file__
    assert values.shape == (1, 2, 3, 3) and np.isnan(values[0, 1]).all() and np.isfinite(values[0, 0]).all()
    assert np.isnan(bounded.kernel_at(np.nan, 10.0)).all()  # not a position: NaN, no error


def test_the_extent_of_a_map_without_the_input_shape(edge_run, tmp_path):
    from pipeline.analysis.maps import map_extent

    folder, _ = edge_run
    ds = xr.open_zarr(folder / "kernels.zarr")
    assert map_extent(ds) == (-0.5, 149.5, -0.5, 199.5)
    older = ds.drop_attrs().assign_attrs(kernelmap_input=ds.attrs["kernelmap_input"])
    assert map_extent(older) == (-0.5, 149.5, -0.5, 199.5)  # the target's shape in the input identity
    identity = json.loads(ds.attrs["kernelmap_input"])
    assert identity["arrays"]["target"]["dimension_names"] == ["image", "y", "x"]
    bare = ds.drop_attrs().assign_attrs(tile_size=64)  # what the tiles cover
    assert map_extent(bare) == (-0.5, 149.5, -0.5, 199.5)
    assert map_extent(ds.drop_attrs()) == (31.5, 117.5, 31.5, 167.5)  # nothing known: the tile centres
    # a store written before input_shape: its extent from the input's identity, the whole image
    old = tmp_path / "old.zarr"
    xr.open_zarr(folder / "kernels.zarr").load().to_zarr(old, zarr_format=3, consolidated=False)
    group = zarr.open_group(str(old), mode="r+")
    del group.attrs["input_shape"]
    km = pipeline.KernelMap.open(old, consolidated=False)
    assert "input_shape" not in km.ds.attrs and km.extent == (-0.5, 149.5, -0.5, 199.5)
    assert np.isfinite(km.kernel_at(0, 149.0, 199.0)).all()
    with pytest.raises(OutsideImageError):
        km.kernel_at(0, 150.0, 0.0)
