"""The numerical core: NumPy/SciPy in, NumPy out; no I/O, no Dask, Zarr, xarray, YAML or pydantic.

``estimate`` the public estimators and the method registry; ``lstsq``, ``gram``,
``_lapack``, ``penalties``, ``welch``, ``ratio`` the estimators; ``moments`` and
``diagnostics`` per-tile measurements; ``tiles`` tile geometry; ``validate``
input and size checks; ``field`` the smooth kernel-field model.
"""
