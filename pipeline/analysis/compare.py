"""Comparing two kernel maps tile by tile: ``kernelmap compare A.zarr B.zarr``.

E.g. two epochs, or two methods on the same data.  The maps must share the
tile grid; images are paired by position (or every image of ``A`` against
the single image of ``B``).  Differences are ``B - A``.

Directions: an image's kernels run forward (``1``: ``target = kernel * source +
background``) or reverse (``-1``: ``source = kernel * target + background``, the
flux a ratio source/target and the background in the source's units), its
map's ``direction`` variable (a map without one: forward).  A pair of images
whose directions differ (say one run with ``kernel.direction: forward`` and one
with ``auto``) is not differenced: its kernel difference and every measured
difference are NaN, the comparison's ``direction_a``/``direction_b``
coordinates and ``direction_differs`` attribute name it, and the summary lines
and the figure say so.  Images of the same direction compare as before.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import xarray as xr

from ..core.estimate import FORWARD, REVERSE
from ..errors import InputError, OptionError
from ..io.paths import check_writable, path_within
from ..io.store import consolidate
from .maps import image_directions, read_kernel_map

__all__ = ["MEASUREMENTS", "common_tiles", "compare_maps", "compare_figure", "direction_lines",
           "summary_lines", "write_comparison"]

#: How each direction value is called.
_DIRECTION_NAMES = {FORWARD: "forward", REVERSE: "reverse", 0: "undecided"}
#: Why images of different directions are not differenced.
WHY_NOT = ("a forward kernel blurs the source into the target, a reverse one the target into the source, so their "
           "kernels, fluxes and backgrounds are not the same quantities")
_DIRECTION_ATTRS = {"long_name": "direction of the image's kernels in map {which}: 1 forward (target = kernel * "
                                 "source + background), -1 reverse (source = kernel * target + background), 0 "
                                 "undecided", "units": "1"}

#: Per-tile measurements compared (those present in both maps).
MEASUREMENTS = ("flux", "background", "centroid_y", "centroid_x", "fwhm", "size", "e1", "e2", "ellipticity")


def compare_maps(a: xr.Dataset, b: xr.Dataset, *, names: tuple[str, str] = ("A", "B")) -> xr.Dataset:
    """Per-tile differences ``B - A`` of the measurements, and the kernels' relative L2 difference.

    ``names``: how the maps are called in errors (their stores, say).  An
    :class:`~pipeline.errors.InputError` where the maps do not share the tile grid or the kernel size,
    or where no tile is finite in both (nothing to compare: see :func:`common_tiles`).
    """
    for coord in ("y", "x"):
        if a.sizes[coord] != b.sizes[coord] or not np.allclose(a[coord].values, b[coord].values):
            raise InputError(f"the kernel maps have different tile grids along {coord} "
                             f"({a.sizes[coord]} tiles from {a[coord].values[0]:g} vs {b.sizes[coord]} from "
                             f"{b[coord].values[0]:g}): compare maps made with the same tiles on the same images")
    if a.sizes["ky"] != b.sizes["ky"]:
        raise InputError(f"the kernels have different sizes ({a.sizes['ky']} vs {b.sizes['ky']})")
    n_a, n_b = a.sizes["image"], b.sizes["image"]
    if n_b not in (n_a, 1):
        raise InputError(f"A has {n_a} images and B {n_b}: give maps with as many images, or B with one")
    b_aligned = b.isel(image=[0] * n_a if n_b == 1 else slice(None)).assign_coords(image=a["image"].values)
    dir_a, dir_b = image_directions(a), image_directions(b)[[0] * n_a if n_b == 1 else slice(None)]
    differ = (dir_a != 0) & (dir_b != 0) & (dir_a != dir_b)  # an undecided image has no kernels to compare
    out = xr.Dataset(coords={"image": a["image"], "y": a["y"], "x": a["x"]})
    for name in MEASUREMENTS:
        if name in a and name in b:
            diff = b_aligned[name].astype(np.float64) - a[name].astype(np.float64)
            out[name] = diff.assign_attrs(long_name=f"{name} of B minus {name} of A",
                                          units=a[name].attrs.get("units", ""))
    ka = a["kernel"].astype(np.float64)
    kb = b_aligned["kernel"].astype(np.float64)
    out["kernel_difference"] = (np.sqrt(((kb - ka) ** 2).sum(("ky", "kx"), skipna=False)
                                        / (ka**2).sum(("ky", "kx"), skipna=False))
                                ).assign_attrs(long_name="L2 norm of (kernel B - kernel A) over that of A",
                                               units="1")
    if differ.any():  # kernels of opposite directions are not differenced
        keep = xr.DataArray(~differ, dims="image", coords={"image": a["image"]})
        for name in out.data_vars:
            out[name] = out[name].where(keep)
    out = out.assign_coords(
        direction_a=("image", dir_a, {**_DIRECTION_ATTRS, "long_name": _DIRECTION_ATTRS["long_name"].format(
            which="A")}),
        direction_b=("image", dir_b, {**_DIRECTION_ATTRS, "long_name": _DIRECTION_ATTRS["long_name"].format(
            which="B")}))
    out.attrs["b_images"] = [str(v) for v in b["image"].values]
    out.attrs["direction_differs"] = [str(v) for v in np.asarray(a["image"].values)[differ]]
    if differ.any():
        out.attrs["direction_note"] = f"not compared (NaN) where the directions differ: {WHY_NOT}"
    out.attrs.update({key: a.attrs[key] for key in ("tile_size", "tile_step") if key in a.attrs})
    if differ.all():
        raise InputError(f"the kernel maps {names[0]} and {names[1]} have kernels of opposite directions in every "
                         f"image pair ({_pairs(out, differ)}): nothing to compare, since {WHY_NOT}. Compare maps "
                         "run with the same kernel.direction (forward, reverse, or auto on both)")
    if not any(common_tiles(out).values()):
        mixed = (f"; {int(differ.sum())} image pair(s) are not compared because their directions differ "
                 f"({_pairs(out, differ)})" if differ.any() else "")
        raise InputError(f"the kernel maps {names[0]} and {names[1]} have no tile where both are finite "
                         f"({_finite_tiles(a)} finite tile(s) in {names[0]}{_status(a)}, {_finite_tiles(b)} in "
                         f"{names[1]}{_status(b)}; the images are paired by position{mixed}): nothing to compare. "
                         "Check that both runs finished (kernelmap_status complete; resume an interrupted run "
                         "with output.mode=resume), that their tiles are not all unusable (quality_flag), and "
                         "that they were made from the same images")
    return out


def _differing(diff: xr.Dataset) -> np.ndarray:
    """``(image,)`` bool: the pairs of a comparison whose directions differ (none for one without them)."""
    if "direction_a" not in diff.coords or "direction_b" not in diff.coords:
        return np.zeros(diff.sizes["image"], dtype=bool)
    dir_a = np.asarray(diff["direction_a"].values, dtype=np.int64)
    dir_b = np.asarray(diff["direction_b"].values, dtype=np.int64)
    return (dir_a != 0) & (dir_b != 0) & (dir_a != dir_b)


def _pairs(diff: xr.Dataset, which: np.ndarray, most: int = 5) -> str:
    """``label (A forward, B reverse), ...`` for the pairs ``which`` (the first ``most``)."""
    index = np.flatnonzero(which)
    dir_a, dir_b = np.asarray(diff["direction_a"].values), np.asarray(diff["direction_b"].values)
    said = [f"{diff['image'].values[i]} (A {_DIRECTION_NAMES.get(int(dir_a[i]))}, B "
            f"{_DIRECTION_NAMES.get(int(dir_b[i]))})" for i in index[:most]]
    return ", ".join(said) + (f" and {index.size - most} more" if index.size > most else "")


def direction_lines(diff: xr.Dataset) -> list[str]:
    """The lines that say which image pairs of a comparison were not compared because their kernels run in
    opposite directions, and why (none where every pair has the same direction)."""
    differ = _differing(diff)
    if not differ.any():
        return []
    return [f"{'direction':>18}: differs in {int(differ.sum())} of {differ.size} image pair(s), not compared "
            f"(NaN): {_pairs(diff, differ)}",
            f"{'':>18}  ({WHY_NOT})"]


def common_tiles(diff: xr.Dataset) -> dict[str, int]:
    """Per variable of a comparison (:func:`compare_maps`), the number of (image, tile) pairs where both
    maps are finite, i.e. where the difference is."""
    return {str(name): int(np.count_nonzero(np.isfinite(np.asarray(diff[name].values, dtype=np.float64))))
            for name in diff.data_vars}


def _finite_tiles(ds: xr.Dataset) -> int:
    """Tiles (over every image) whose kernel is finite."""
    kernel = np.asarray(ds["kernel"].values, dtype=np.float64)
    return int(np.count_nonzero(np.isfinite(kernel).all(axis=(-2, -1))))


def _status(ds: xr.Dataset) -> str:
    status = ds.attrs.get("kernelmap_status")
    return f", whose store is {status}" if status not in (None, "complete") else ""


def summary_lines(diff: xr.Dataset, names: tuple[str, ...] = ("fwhm", "ellipticity", "flux", "kernel_difference"),
                  ) -> list[str]:
    """One line per variable of a comparison: the median and largest magnitude of the differences over
    the tiles where both maps are finite, or ``no common finite tiles`` where there is none; first the
    lines of :func:`direction_lines` where image pairs differ in direction (left out of the others)."""
    lines = direction_lines(diff)
    for name in names:
        if name not in diff:
            continue
        values = np.asarray(diff[name].values, dtype=np.float64)
        values = values[np.isfinite(values)]
        if not values.size:
            lines.append(f"{name:>18}: no common finite tiles")
            continue
        lines.append(f"{name:>18}: median {np.median(values):+.4g}, max |.| {np.max(np.abs(values)):.4g} "
                     f"({values.size} tile(s))")
    return lines


#: The colour-bar label of each map of :func:`compare_figure`, its unit spelled out.
FIGURE_LABELS = {
    "fwhm": "B - A kernel FWHM (pixel)",
    "ellipticity": "B - A |e| (dimensionless)",
    "flux": "B - A kernel flux (ratio target/source)",
    "kernel_difference": "|K_B - K_A| / |K_A| (ratio of L2 norms)",
}


def compare_figure(diff: xr.Dataset, *, image: int = 0):
    """Maps of the main differences for one image pair, titled with its image label, y up; where image
    pairs differ in direction the title says which (and that the one shown, if it is one, is not compared)."""
    from .report import _cells, _pyplot

    plt = _pyplot()
    names = [n for n in FIGURE_LABELS if n in diff]
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names) + 1, 3.6), constrained_layout=True,
                             squeeze=False)
    title = f"B - A per tile, {diff['image'].values[image]}"
    differ = _differing(diff)
    if differ[image]:
        title += f": not compared, directions differ ({_pairs(diff, np.arange(differ.size) == image)})"
    if differ.any():
        title += (f"\ndirections differ in {int(differ.sum())} of {differ.size} pair(s), left out: "
                  f"{_pairs(diff, differ, most=3)}\n(a forward kernel blurs the source, a reverse one the target)")
    fig.suptitle(title, **({"fontsize": "medium"} if differ.any() else {}))
    for ax, name in zip(axes[0], names):
        values = np.asarray(diff[name].values[image], dtype=np.float64)
        lim = float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 1.0
        cmap, lo = ("magma", 0.0) if name == "kernel_difference" else ("RdBu_r", -lim)
        im = _cells(ax, diff, values, vmin=lo, vmax=lim or 1.0, cmap=cmap)
        ax.set_title(name.replace("_", " "))
        fig.colorbar(im, ax=ax, label=FIGURE_LABELS[name], shrink=0.8)
    return fig


def write_comparison(a_path: str | os.PathLike[str], b_path: str | os.PathLike[str],
                     out: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write ``compare.zarr`` (the differences) and ``compare.png`` into ``out``; nothing is written where
    :func:`compare_maps` refuses the maps."""
    from .report import _pyplot

    folder = Path(out)
    store = folder / "compare.zarr"
    for what, path in (("A", a_path), ("B", b_path)):
        if path_within(folder, path):
            raise OptionError(f"--out {folder} is or lies inside kernel map {what} ({path}), which is never written: "
                              "nothing was changed; give another --out folder")
    if store.exists():
        raise InputError(f"{store} already exists: choose another --out folder or remove it")
    check_writable(folder, f"--out {folder}")
    diff = compare_maps(read_kernel_map(a_path), read_kernel_map(b_path), names=(str(a_path), str(b_path)))
    diff.attrs.update(a=str(a_path), b=str(b_path))
    folder.mkdir(parents=True, exist_ok=True)
    diff.to_zarr(store, mode="w-", zarr_format=3, consolidated=False)
    consolidate(str(store))  # a plain xr.open_zarr then opens it without warnings
    same = np.flatnonzero(~_differing(diff))
    fig = compare_figure(diff, image=int(same[0]) if same.size else 0)  # an image pair that is compared
    fig.savefig(folder / "compare.png", dpi=110)
    _pyplot().close(fig)
    return store, folder / "compare.png"
