"""The numerical core: NumPy/SciPy in, NumPy out; no I/O, no Dask, Zarr, xarray, YAML or pydantic.

``estimate`` the public estimators and the method registry; ``options`` each
method's options (typed, validated, defaults written once); ``lstsq``, ``gram``,
``_lapack``, ``penalties``, ``welch``, ``ratio`` the estimators; ``moments`` and
``diagnostics`` per-tile measurements; ``noise`` the CCD noise model; ``tiles``
tile geometry; ``validate`` input and size checks; ``field`` the smooth
kernel-field model.
"""
