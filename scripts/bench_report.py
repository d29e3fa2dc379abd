"""Time ``kernelmap report`` on a survey-sized kernel map: 1000 images of 8x8 tiles by default.

The store is written with the package's own writer (``OutputStore``: the layout,
chunks and attributes of a run) from synthetic results instead of 64,000 tile
fits: every image has a smooth kernel field (elliptical Gaussians whose width
and shape drift across the field and with airmass, filter and time), tile
kernels = field + noise, per-tile diagnostics from their adaptive moments,
and the kernel-field model fitted to the tiles as a run fits it (``fit_tiles``).
A few images are planted as outliers (bad seeing) and a few have no usable tile
(no model).  The store carries ``mjd``, ``airmass`` and ``filter`` coordinates
along ``image``.  Then ``kernelmap report`` runs as a separate process and its
wall time is printed.

    .venv/bin/python scripts/bench_report.py                  # 1000 images, 8x8 tiles, 21x21 kernels
    .venv/bin/python scripts/bench_report.py --images 200 --keep --workdir /tmp/bench
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import xarray as xr

from pipeline import flags as fl
from pipeline.core.field import fit_tiles, tile_weights
from pipeline.core.moments import adaptive_moments
from pipeline.core.tiles import Block, TileGrid
from pipeline.io.store import DIAGNOSTICS, IMAGES_PER_CHUNK, ImageResults, OutputStore, StoreLayout, block_record
from pipeline.sim.scenes import gaussian_kernel

PLANTED_OUTLIERS = (17, 123, 456, 789)  # images with 1.6x the seeing (those below --images)
NO_MODEL = (5, 500)  # images without a usable tile


def _truth(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    mjd = 60000.0 + np.sort(rng.uniform(0, 365, n))
    airmass = rng.uniform(1.0, 2.0, n)
    filters = rng.choice(np.array(["g", "r", "i"], dtype=object), n)
    band = {"g": 1.08, "r": 1.0, "i": 0.93}
    seeing = 3.0 * airmass**0.6 * np.array([band[f] for f in filters]) * (1 + 0.05 * np.sin(mjd / 30.0))
    seeing *= rng.normal(1.0, 0.03, n)
    for i in PLANTED_OUTLIERS:
        if i < n:
            seeing[i] *= 1.6
    return {"mjd": mjd, "airmass": airmass, "filter": filters, "seeing": seeing,
            "flux": rng.normal(1.0, 0.02, n), "background": rng.normal(5.0, 1.0, n)}


def build_store(path: Path, *, n_images: int = 1000, tiles: int = 8, tile_size: int = 256, k: int = 21,
                seed: int = 0) -> None:
    """Write the synthetic kernel map (see the module)."""
    rng = np.random.default_rng(seed)
    truth = _truth(n_images, rng)
    size = tiles * tile_size
    grid = TileGrid(size, size, tile_size, tile_size, (tiles, tiles))
    labels = np.array([f"exp-{i:05d}" for i in range(n_images)], dtype=object)
    layout = StoreLayout(grid, labels, {}, k, "float32")
    store = OutputStore(str(path)).create(layout, {"tile_size": tile_size, "kernelmap_method": "lstsq (synthetic)"})
    yy, xx = np.meshgrid(grid.centres_y, grid.centres_x, indexing="ij")
    u, v = (xx - size / 2) / (size / 2), (yy - size / 2) / (size / 2)
    pending = []
    for i in range(n_images):
        fwhm = truth["seeing"][i] * (1 + 0.08 * u + 0.05 * v**2)
        e1, e2 = 0.05 * u + 0.02 * (truth["airmass"][i] - 1.5), 0.04 * v
        kernels = np.stack([gaussian_kernel(k, fwhm=f, e1=a, e2=b, flux=truth["flux"][i])
                            for f, a, b in zip(fwhm.ravel(), e1.ravel(), e2.ravel())])
        kernels += rng.normal(0, 2e-4, kernels.shape)
        flags = np.zeros(kernels.shape[0], dtype=np.int64)
        flags[rng.random(len(flags)) < 0.05] |= fl.MASKED
        if i in NO_MODEL:
            kernels[:] = np.nan
            flags[:] = fl.NO_DATA
        mom = adaptive_moments(kernels)
        snr = rng.uniform(50, 200, len(flags))
        results = {"flux": mom.flux, "background": truth["background"][i] + rng.normal(0, 0.1, len(flags)),
                   "residual": rng.normal(1.0, 0.05, len(flags)), "noise": np.full(len(flags), 3.0), "snr": snr,
                   "centroid_y": mom.y, "centroid_x": mom.x, "fwhm": mom.fwhm, "size": mom.sigma, "e1": mom.e1,
                   "e2": mom.e2, "ellipticity": mom.ellipticity,
                   "position_angle": np.degrees(0.5 * np.arctan2(mom.e2, mom.e1)),
                   "regularization": np.full(len(flags), 1e-3), "n_valid": np.full(len(flags), 55000),
                   "quality_flag": flags}
        assert set(results) == set(DIAGNOSTICS)
        grid_kernels = kernels.reshape(tiles, tiles, k, k)
        record = block_record(results, (tiles, tiles))
        store.write_block(Block(i, 0, 0, 0, tiles, 0, tiles), grid_kernels, record)
        usable = np.isfinite(grid_kernels).all(axis=(-2, -1))
        field, residual, rejected = fit_tiles(grid.centres_y, grid.centres_x, grid_kernels, usable,
                                              tile_weights(snr, mom.flux))
        extra = np.where(rejected, fl.MODEL_OUTLIER, 0)
        pending.append(ImageResults(i, record, extra, field, residual))
        if len(pending) == IMAGES_PER_CHUNK or i == n_images - 1:
            store.write_images(pending)
            pending = []
    # per-image coordinates beside the image labels (appending replaces the root attributes: keep them)
    xr.Dataset(coords={"mjd": ("image", truth["mjd"], {"units": "day", "long_name": "modified Julian date"}),
                       "airmass": ("image", truth["airmass"]),
                       "filter": ("image", truth["filter"])}, attrs=store.attrs()).to_zarr(
        store.location, mode="a", consolidated=False, zarr_format=3)
    store.mark_complete()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--tiles", type=int, default=8, help="tiles per side (default 8: 64 tiles)")
    parser.add_argument("--kernel", type=int, default=21, help="kernel side (pixels)")
    parser.add_argument("--workdir", type=Path, help="where to build the store (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the store and the report")
    args = parser.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-report-"))
    work.mkdir(parents=True, exist_ok=True)
    store = work / "kernels.zarr"
    try:
        if not store.exists():
            t0 = time.perf_counter()
            build_store(store, n_images=args.images, tiles=args.tiles, k=args.kernel)
            print(f"built {store}: {args.images} images x {args.tiles}x{args.tiles} tiles, "
                  f"{args.kernel}x{args.kernel} kernels, in {time.perf_counter() - t0:.1f} s", flush=True)
        out = work / "report"
        shutil.rmtree(out, ignore_errors=True)
        exe = Path(sys.executable).with_name("kernelmap")
        command = [str(exe), "report", str(store), "--out", str(out)] if exe.exists() else \
            [sys.executable, "-m", "pipeline.cli", "report", str(store), "--out", str(out)]
        t0 = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if done.returncode:
            print(done.stdout, done.stderr, sep="\n", file=sys.stderr)
            return done.returncode
        files = sorted(p.name for p in out.iterdir())
        print(f"kernelmap report: {wall:.1f} s wall for {args.images} images of {args.tiles ** 2} tiles "
              f"({len(files)} files: {', '.join(files)})")
        outliers = (out / "outliers.csv").read_text().splitlines()[1:]
        print(f"outlier findings: {len(outliers)}; images planted: "
              f"{[i for i in PLANTED_OUTLIERS if i < args.images]}; first: {outliers[:4]}")
        panels = sorted(int(p.stem.split("-")[1]) for p in out.glob("kernels-*.png"))
        print(f"images given per-image panels: {panels}")
        return 0
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
