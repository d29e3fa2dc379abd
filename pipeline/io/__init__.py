"""Reading input stacks and writing kernel-map stores (Zarr; CF decoding and encoding).

``inputs`` the input stack and each task's reader; ``store`` the output store.
"""
