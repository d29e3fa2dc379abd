"""Reading input stacks and writing kernel-map stores (Zarr; CF decoding and encoding).

``inputs`` the input stack and each task's reader; ``arrays`` stored arrays
(lookup, axes, CF decoding); ``levels`` per-image numbers (numbers,
coordinates, attributes); ``saturation`` saturation levels; ``noise``
per-pixel variances (arrays or the CCD model); ``store`` the output store.
"""
