#!/usr/bin/env python
"""Which image is sharper, in whole jobs: directions found, flags, reversed kernels, added time.

Stacks of simulated pairs whose seeing changes along x
(:func:`pipeline.sim.seeing.seeing_pair`; a Moffat PSF of FWHM 2 px shared,
each image blurred by a round Gaussian whose FWHM changes linearly across the
field, constant in each 256-px tile; sky, Poisson and read noise; per-pixel
variances given), 1024x2048 px, tiles 256 (the default), kernel 21, three
images per seed:

- ``everywhere``: the target sharper everywhere (Gaussians FWHM 3.5 px on the
  source, 1.5 px on the target): the image should be reversed;
- ``nowhere``: the target blurrier everywhere (2.0 and 3.5 px): forward;
- ``crossing``: a seeing gradient that crosses over (source 2.5 px, target
  1.0 px at the left edge to 4.5 px at the right): the majority forward, the
  left tiles the minority;

in three fields (very sparse, sparse, crowded: 0.001, 0.004, 0.02 stars and
half as many galaxies per pixel). Each stack is run with the default job
(``kernel.direction: auto``), with source and target exchanged (auto), and with
``kernel.direction: forward``.  Printed per field, over tiles whose FWHMs differ
by more than 10 %: the fraction whose measured direction (the sign of
``width_difference``) is right; the images' directions; ``target_sharper``
flags on tiles whose fitted image is truly the blurrier (must be 0) and on the
crossing images' minority; the median relative L2 error of the kernels against
the truth for the reversed images and the forward ones, the same images fitted
the other way round (exchanged input: identical kernels expected), and the
reversed images forced forward (the deconvolution the issue is about).

Then the time: a stack of six forward images (sparse field) run with threads
(2 workers) with ``auto``, ``forward`` and ``forward`` without the sharpness
measure (the measure switched off in-process: the job as it was before), best
of ``--repeats``,
in milliseconds of worker time per tile, and the core per-tile cost of the
measure next to ``estimate_kernels``.

    python scripts/bench_direction_jobs.py [--seeds 2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import xarray as xr
from threadpoolctl import threadpool_limits

import pipeline as km
import pipeline.core.estimate as estimate_module
from pipeline import flags as fl
from pipeline.job.config import job_from_dict
from pipeline.job.run import run_job
from pipeline.sim.seeing import seeing_pair

SHAPE = (1024, 2048)
TILE = 256
K = 21
IMAGES = {
    "everywhere": ((3.5, 3.5), (1.5, 1.5)),
    "nowhere": ((2.0, 2.0), (3.5, 3.5)),
    "crossing": ((2.5, 2.5), (1.0, 4.5)),
}
FIELDS = {"very sparse": 1e-3, "sparse": 4e-3, "crowded": 2e-2}


def make_stack(path: Path, density: float, seeds: int, kinds: tuple[str, ...] = tuple(IMAGES)) -> dict:
    pairs, labels = [], []
    for seed in range(seeds):
        for i, (name, (src, tgt)) in enumerate((kind, IMAGES[kind]) for kind in kinds):
            pairs.append(seeing_pair(1000 * seed + i, SHAPE, source_fwhm=src, target_fwhm=tgt, patch=TILE,
                                     star_density=density, galaxy_density=density / 2))
            labels.append(f"{name}-{seed}")
    centres = [tx * TILE + (TILE - 1) / 2.0 for tx in range(SHAPE[1] // TILE)]
    data = {
        "source": np.stack([p.source for p in pairs]), "target": np.stack([p.target for p in pairs]),
        "source_variance": np.stack([p.source_variance for p in pairs]),
        "target_variance": np.stack([p.target_variance for p in pairs]),
    }
    ds = xr.Dataset({k: (("image", "y", "x"), v.astype(np.float32)) for k, v in data.items()},
                    coords={"image": np.array(labels, dtype=object)})
    ds.to_zarr(path, mode="w-", zarr_format=3, consolidated=False,
               encoding={k: {"chunks": (1, 512, 512)} for k in data})
    truth = [[p.truth(x, K) for x in centres] for p in pairs]
    return {
        "labels": labels,
        "direction": np.array([[d for d, _ in row] for row in truth]),
        "kernels": np.array([[k for _, k in row] for row in truth]),
        "width_difference": np.array([[p.width_difference(x) for x in centres] for p in pairs]),
        "ratio": np.array([[p.fwhm_ratio(x) for x in centres] for p in pairs]),
    }


def job(folder: Path, name: str, *, swap: bool = False, direction: str = "auto") -> dict:
    s, t = ("target", "source") if swap else ("source", "target")
    return {"input": {"path": str(folder / "stack.zarr"), "source": s, "target": t,
                      "variance": {"source": f"{s}_variance", "target": f"{t}_variance"}},
            "tiles": {"size": TILE}, "kernel": {"size": K, "direction": direction},
            "output": {"path": str(folder / f"{name}.zarr"), "mode": "overwrite"},
            "compute": {"scheduler": "threads", "n_workers": 2}}


def rel_errors(kernels: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """``(image, y, x)`` relative L2 errors against the truth of each tile column."""
    t = truth[:, None]
    return np.linalg.norm((kernels - t).reshape(*kernels.shape[:3], -1), axis=-1) / np.linalg.norm(
        np.broadcast_to(t, kernels.shape).reshape(*kernels.shape[:3], -1), axis=-1)


def rates(folder: Path, truth: dict) -> None:
    auto, swapped, forward = (xr.open_zarr(folder / f"{n}.zarr").load() for n in ("auto", "swapped", "forward"))
    shape = auto["width_difference"].shape
    wd = np.broadcast_to(truth["width_difference"][:, None, :], shape)
    ratio = np.broadcast_to(truth["ratio"][:, None, :], shape)
    clear = np.abs(ratio - 1.0) > 0.10
    right = np.sign(auto["width_difference"].values) == np.sign(wd)
    kinds = np.array([label.rsplit("-", 1)[0] for label in truth["labels"]])
    d = auto["direction"].values
    expected = np.array([-1 if k == "everywhere" else 1 for k in kinds])
    flags = auto["quality_flag"].values.astype(np.int64)
    sharpens = (flags & fl.TARGET_SHARPER) != 0
    fitted_blurrier = d[:, None, None] * wd > 0
    minority = (kinds == "crossing")[:, None, None] & (d[:, None, None] * wd < 0)
    beyond = minority & (np.abs(wd) > 1.0) & clear
    err = rel_errors(auto["kernel"].values, truth["kernels"])
    exact = d[:, None, None] == np.broadcast_to(truth["direction"][:, None, :], shape)
    rev = (d == -1)[:, None, None] & exact
    fwd = (d == 1)[:, None, None] & exact & (kinds != "crossing")[:, None, None]
    same = all(np.array_equal(swapped[n].values, auto[n].values, equal_nan=True) for n in ("kernel", "flux"))
    fwd_flags = forward["quality_flag"].values.astype(np.int64)
    wrong_way = (kinds == "everywhere")
    forced_fwhm = forward["fwhm"].values[wrong_way]
    forced_flux = forward["flux"].values[wrong_way]
    print(f"  tiles {clear.size}, FWHMs differ by > 10 %: {int(clear.sum())}; direction right there: "
          f"{right[clear].mean() * 100:.1f} % ({int((~right[clear]).sum())} wrong)")
    print(f"  images' directions right: {int((d == expected).sum())} of {len(d)} "
          f"(reversed: {int((d == -1).sum())}); reversed with source and target exchanged: "
          f"{int((swapped['direction'].values == -expected).sum())} of {len(d)} right")
    print(f"  target_sharper on tiles whose fitted image is the blurrier: {int((sharpens & fitted_blurrier).sum())} "
          f"of {int(fitted_blurrier.sum())}; on the crossing images' minority beyond 1 px^2 and 10 %: "
          f"{int((sharpens & beyond).sum())} of {int(beyond.sum())}; nearly_equal tiles: "
          f"{int(((flags & fl.NEARLY_EQUAL) != 0).sum())}")
    print(f"  kernels vs truth, median relative L2: reversed images {np.median(err[rev]):.4f} "
          f"({int(rev.sum())} tiles), forward images {np.median(err[fwd]):.4f} ({int(fwd.sum())} tiles); "
          f"exchanged input gives identical kernels: {same}")
    measured = np.isfinite(forced_fwhm)
    fwhm = f"{np.median(forced_fwhm[measured]):.2f} px" if measured.any() else "not measured (moments failed)"
    print(f"  the reversed images forced forward: {(fwd_flags[wrong_way] & fl.TARGET_SHARPER != 0).mean() * 100:.0f} % "
          f"flagged target_sharper; their kernels' FWHM {fwhm}, flux {np.nanmedian(forced_flux):.3f} (median)")


def timing(folder: Path, repeats: int) -> None:
    """The three runs on a stack of forward images (the target blurrier everywhere), so that every run fits
    the same well-posed problem."""
    folder.mkdir(parents=True, exist_ok=True)
    truth = make_stack(folder / "stack.zarr", FIELDS["sparse"], 6, kinds=("nowhere",))
    n_tiles = len(truth["labels"]) * (SHAPE[0] // TILE) * (SHAPE[1] // TILE)
    original = estimate_module._sharpness
    cases = {"auto (default)": dict(direction="auto"), "forward": dict(direction="forward"),
             "forward, no sharpness measure (as before)": dict(direction="forward", off=True)}
    best = {}
    for _ in range(repeats):
        for name, case in cases.items():
            if case.get("off"):
                estimate_module._sharpness = lambda *a, **k: None
            try:
                t0 = time.perf_counter()
                run_job(job_from_dict(job(folder, "timing", direction=case["direction"])), progress=False,
                        log=lambda _: None)
                best[name] = min(best.get(name, np.inf), time.perf_counter() - t0)
            finally:
                estimate_module._sharpness = original
    base = best["forward, no sharpness measure (as before)"]
    print(f"\nwhole job on {len(truth['labels'])} forward images (threads, 2 workers; {n_tiles} tiles of {TILE}^2, "
          f"kernel {K}), best of {repeats}:")
    for name, seconds in best.items():
        print(f"  {name:44s} {seconds:7.2f} s  {2e3 * seconds / n_tiles:6.2f} ms/tile of worker time  "
              f"(+{2e3 * (seconds - base) / n_tiles:5.2f})")


def core_timing(folder: Path) -> None:
    ds = xr.open_zarr(folder / "stack.zarr", consolidated=False)
    src = ds["source"].values[1, :TILE, : 8 * TILE].reshape(TILE, 8, TILE).transpose(1, 0, 2).copy()
    tgt = ds["target"].values[1, :TILE, : 8 * TILE].reshape(TILE, 8, TILE).transpose(1, 0, 2).copy()
    measure = estimate_module.tile_sharpness(src, tgt, kernel_size=K)

    def best(func) -> float:
        out = np.inf
        for _ in range(2):
            t0 = time.perf_counter()
            func()
            out = min(out, time.perf_counter() - t0)
        return 1e3 * out / len(src)

    print(f"\none thread, a batch of {len(src)} tiles of {TILE}^2, ms per tile:")
    with threadpool_limits(1):
        for method in ("lstsq", "welch"):
            with_measure = best(lambda m=method: km.estimate_kernels(src, tgt, kernel_size=K, method=m))
            without = best(lambda m=method: km.estimate_kernels(src, tgt, kernel_size=K, method=m, sharpness=measure))
            print(f"  estimate_kernels {method:6s} {with_measure:7.2f} with the measure, {without:7.2f} given it: "
                  f"+{with_measure - without:.2f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=2, help="stacks' images per kind and field")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dir", default=None, help="work folder (default: a temporary one, removed)")
    args = ap.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="kernelmap-direction-"))
    try:
        for field, density in FIELDS.items():
            folder = root / field.replace(" ", "-")
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            truth = make_stack(folder / "stack.zarr", density, args.seeds)
            for name, options in (("auto", {}), ("swapped", {"swap": True}), ("forward", {"direction": "forward"})):
                run_job(job_from_dict(job(folder, name, **options)), progress=False)
            print(f"\n{field} field ({density:g} stars, {density / 2:g} galaxies per pixel), "
                  f"{len(truth['labels'])} images of {SHAPE[0]}x{SHAPE[1]}:")
            rates(folder, truth)
        timing(root / "timing", args.repeats)
        core_timing(root / "timing")
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
