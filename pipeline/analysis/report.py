"""Figures of a kernel map: ``kernelmap report STORE --out DIR``.

PNG figures (matplotlib, non-interactive), a per-image table (``images.csv``;
also ``images.parquet`` when pyarrow is installed), the outliers
(``outliers.csv``), a per-tile table over the stack (``tiles.csv``: each
tile's centre, on the sky too where the kernel map has a reference WCS, and
its medians over the images), the job configuration of the run
(``job.yaml``, from the store's ``kernelmap_config``) and an ``index.html``
showing them, each figure with a caption, in a local folder or under an
fsspec URL prefix (``s3://bucket/report``; the kernel map may be at a URL
too).

The figures follow the conventions of astronomical images: every map and
every kernel stamp is drawn y up (origin lower, as ds9 and FITS viewers show
an image: row 0 at the bottom; a kernel's ``ky`` runs up its stamp as ``y``
runs up the image, so a kernel shifting the target by ``+dy`` has its peak
above the stamp's centre); panels are titled with the image's label (its
``image`` coordinate); every axis and colour bar names its unit (pixel,
kernel flux as the ratio target/source, the target's units (ADU), %,
dimensionless).  Kernel mosaics use a ``stretch`` (:data:`STRETCHES`: ``asinh``
by default, so that the wings and the ringing show beside the core;
``linear``; ``log``), named on their colour bar.  The maps of a stack share
one colour scale across its images (``scale="shared"``), or each image has
its own (``scale="per-image"``, :data:`SCALES`) where a shared scale hides the
variation within an image.  "Flagged" counts problem flags only
(:data:`pipeline.flags.PROBLEMS`, ``target_sharper`` among them); the
informational flags (``masked``, ``outliers_clipped``: pixels left out;
``nearly_equal``: the two PSFs nearly equal) are shown apart.

Directions (:func:`pipeline.analysis.maps.image_directions`): a reverse image's
kernels blur its target (the sharper image) into its source, its flux scale is
source/target and its background in source units.  Its panels are titled
``label (reverse)``, its kernel mosaic says so, colour bars shared with forward
images name both units, and the table has each image's ``direction``.  What is
computed over the stack (the principal components, the model maps of
``stack.png``, the medians of ``tiles.csv``) takes the images of one direction,
the majority's (:attr:`pipeline.analysis.survey.Survey.direction`), and says so;
the trends and outliers are found within each direction.  Maps are drawn in
input pixel coordinates; where the kernel map has a reference WCS (and
astropy is installed) on astropy's WCSAxes, with RA/Dec axes and N/E arrows
(:mod:`pipeline.analysis.sky`).  Figures, by file name:

- per image, for ``max_images`` images (:func:`panel_images`: the outliers,
  most deviant first, then the first images):
  ``kernels-<i>.png`` (the kernels across the field of image ``i``);
  ``fwhm.png``, ``ellipticity.png`` (whiskers: length ``|e|``, along the
  major axis, a reference stick in a corner), ``flux.png``,
  ``background.png``, ``residual.png``: per-tile maps, one panel per image;
  ``flags.png``: each tile coloured by its most severe problem flag
  (:func:`flag_categories`), and the tiles with each flag;
  ``width-difference.png``: which image of each pair is the sharper, per tile:
  FWHM(target)² - FWHM(source)² (pixel²; red: the target blurrier, the
  forward direction; blue: the target sharper), on a scale symmetric about 0,
  the tiles flagged ``target_sharper`` crossed and ``nearly_equal`` ringed,
  panels titled ``label (direction)`` (not drawn for a kernel map without the
  ``width_difference`` diagnostic);
  ``model-fwhm.png``, ``model-ellipticity.png``: the kernel-field model's
  FWHM and ellipticity on a fine grid (``fine`` x ``fine`` model kernels);
  ``model-residual.png``: tile minus model, per tile (the kernels' relative
  difference and the FWHM difference);
- over the whole stack (aggregates, whatever the number of images):
  ``trends-<coordinate>.png``: each per-image summary against each image
  coordinate (:mod:`pipeline.analysis.survey`), outliers marked;
  ``stack.png``: maps of the typical model FWHM pattern and ellipticity, the
  median tile-minus-model difference and how often each tile has a problem
  flag; ``pca.png``, ``pca-amplitudes.png``: the principal components of the
  model kernel fields (:mod:`pipeline.analysis.pca`): eigen-kernels,
  explained variance, spatial patterns and each image's amplitudes.

The HTML page lists the outliers and the first ``rows`` images (every
measurement to 4 significant figures, counts as integers, the images'
coordinates as given); with more, the whole table is in ``images.csv`` and in
pages ``images-<page>.html``.
"""

from __future__ import annotations

import html
import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr
import yaml

from .. import flags as fl
from ..core.moments import adaptive_moments
from ..core.validate import check_int
from ..errors import InputError, OptionError
from ..io.paths import check_writable, path_within
from ..io.swap import discard, leftovers, new_sibling, swap_into_place
from .maps import DIRECTION_NAMES, FORWARD, REVERSE, image_directions, map_extent, model_kernels_at, read_kernel_map
from .sky import PIXELS, Sky, draw_compass, label_axes, sky_of
from .survey import (
    COLUMNS,
    TREND_QUANTITIES,
    Coordinate,
    Survey,
    _quiet,
    coordinate_file_stem,
    has_model_variables,
    survey,
    with_coordinates,
)

__all__ = ["FIGURES", "LABELS", "SCALES", "SEVERITY", "STRETCHES", "caption", "coordinate_label", "figures",
           "flag_categories", "incomplete_notice", "job_yaml", "write_report", "write_tables"]

#: File stem -> title of every figure but the per-image kernel mosaics and the trends.
FIGURES = {
    "fwhm": "Kernel FWHM",
    "ellipticity": "Kernel ellipticity (whiskers along the major axis)",
    "flux": "Flux scale (kernel sum)",
    "background": "Background offset",
    "residual": "Fit residual / noise",
    "flags": "Quality flags",
    "width-difference": "Which image is sharper: FWHM(target)² \u2212 FWHM(source)² per tile",
    "model-fwhm": "Model FWHM",
    "model-ellipticity": "Model ellipticity (whiskers along the major axis)",
    "model-residual": "Tile minus model, per tile",
    "stack": "Across the stack",
    "pca": "Principal components of the kernel field",
    "pca-amplitudes": "Principal-component amplitude per image",
}

#: Images per page of the HTML table.
PAGE_ROWS = 1000

#: Stretches of the kernel mosaics (``--stretch``): ``asinh`` (the default) is linear near zero and
#: logarithmic above :data:`ASINH_WIDTH` of the peak, so the wings and the (negative) ringing show beside
#: the core; ``log`` spans :data:`LOG_DECADES` decades below the peak (values at or below zero at its foot).
STRETCHES = ("linear", "asinh", "log")
#: Colour scales of the per-image maps (``--scale``): ``shared`` across the images shown (the default:
#: panels compare directly), or ``per-image`` (each panel its own limits and colour bar: the variation
#: within each image shows even where the images differ much more).
SCALES = ("shared", "per-image")
#: Fraction of the peak |kernel value| where the asinh stretch turns from linear to logarithmic.
ASINH_WIDTH = 0.01
#: Decades below the peak a log-stretched mosaic shows.
LOG_DECADES = 4

#: Unit of the kernels' values and the flux scale: the kernel's sum is the target's flux over the source's.
KERNEL_UNIT = "ratio target/source"
#: The same for a reverse image, whose kernel blurs the target: its sum is the source's flux over the target's.
REVERSE_KERNEL_UNIT = "ratio source/target"
#: Unit of the background offset: the target image's own (counts, ADU, for raw images).
TARGET_UNIT = "ADU, target units"

#: Axis and colour-bar label of each per-tile quantity, its unit spelled out.
LABELS = {
    "fwhm": "kernel FWHM (pixel)",
    "flux": f"kernel flux ({KERNEL_UNIT})",
    "background": f"background offset ({TARGET_UNIT})",
    "residual": "fit residual RMS / noise (ratio)",
    "ellipticity": "|e| (dimensionless)",
    "model_residual": "|tile - model| / |model| (%)",
    "d_fwhm": "FWHM tile - model (pixel)",
    "width_difference": "FWHM(target)² \u2212 FWHM(source)² (pixel²)",
}

#: What the flux and background colour bars add where reverse images share them with forward ones.
REVERSE_UNITS = {"flux": "; source/target where reverse", "background": "; source units where reverse"}

#: Problem flags from the most to the least severe: the flag map colours a tile by the first it has.
SEVERITY = ("no_data", "no_signal", "non_positive_flux", "target_sharper", "kernel_truncated", "high_residual",
            "model_outlier", "moments_failed", "regularization_at_bound")

#: Colours of the flag map's categories: no flag, information only, then the problems by :data:`SEVERITY`
#: (target_sharper deep blue), then spares for problems not in it.
_CATEGORY_COLOURS = ("#eeeeee", "#a6cee3", "#000000", "#636363", "#d62728", "#08519c", "#ff7f0e", "#9467bd",
                     "#e377c2", "#8c564b", "#bcbd22", "#17becf", "#2ca02c")

#: What the informational flags say, for the page and the captions.
_INFORMATION_WORDS = "pixels left out, or the two PSFs nearly equal"


def _problem_flags() -> list[fl.Flag]:
    """The problem flags, the most severe first (:data:`SEVERITY`; any other after them, in bit order)."""
    problems = {f.name: f for f in fl.FLAGS if f.kind == fl.PROBLEM}
    return [problems.pop(name) for name in SEVERITY if name in problems] + list(problems.values())


def _category_names() -> list[str]:
    info = ", ".join(f.name for f in fl.FLAGS if f.kind == fl.INFORMATION)
    return ["no flag", f"information only ({info})"] + [f.name for f in _problem_flags()]


def flag_categories(flags: np.ndarray) -> np.ndarray:
    """Each tile's category on the flag map: 0 no flag, 1 informational flags only (:data:`pipeline.flags.
    INFORMATIONAL`), ``2 + j`` where its most severe problem flag is the ``j``-th of :data:`SEVERITY`."""
    f = np.asarray(flags).astype(np.int64)
    out = np.where((f & fl.INFORMATIONAL) != 0, 1, 0)
    for j, flag in reversed(list(enumerate(_problem_flags()))):
        out = np.where((f & flag.mask) != 0, 2 + j, out)
    return out


def _check_options(stretch: str, scale: str) -> None:
    if stretch not in STRETCHES:
        raise OptionError(f"stretch={stretch!r} is not a stretch of the kernel mosaics: use one of "
                          f"{', '.join(STRETCHES)} (--stretch)")
    if scale not in SCALES:
        raise OptionError(f"scale={scale!r} is not a colour scale of the maps: use one of {', '.join(SCALES)} "
                          "(--scale)")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _grid(plt, rows: int, cols: int, figsize: tuple[float, float], sky: Sky, spatial=lambda r, c: True):
    """A figure of ``rows x cols`` axes, ``(rows, cols)`` array; those where ``spatial(r, c)`` are maps in input
    pixels, WCSAxes (RA/Dec) where ``sky`` has a WCS."""
    fig = plt.figure(figsize=figsize, constrained_layout=True)
    axes = np.empty((rows, cols), dtype=object)
    for r in range(rows):
        for c in range(cols):
            projection = sky.wcs if sky.on and spatial(r, c) else None
            axes[r, c] = fig.add_subplot(rows, cols, r * cols + c + 1, projection=projection)
    return fig, axes


def _panels(plt, n: int, title: str, size: float = 3.2, sky: Sky = PIXELS, maps: int | None = None):
    """``n`` panels, four to a row; the first ``maps`` (default: all) are maps."""
    cols = min(n, 4)
    rows = -(-n // cols)
    maps = n if maps is None else maps
    fig, axes = _grid(plt, rows, cols, (size * cols + 1.2, size * rows + 0.8), sky,
                      spatial=lambda r, c: r * cols + c < maps)
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    fig.suptitle(title)
    return fig, axes.ravel()[:n]


def _cell_edges(centres: np.ndarray, size: float) -> np.ndarray:
    """Edges of the map cells around tile centres: midway between neighbours (the last tiles, set against
    the image edge, may lie closer than the step) and the outer tiles' own edges."""
    c = np.asarray(centres, dtype=np.float64)
    return np.concatenate([[c[0] - size / 2], (c[1:] + c[:-1]) / 2, [c[-1] + size / 2]])


def _edges(ds: xr.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """``(y, x)`` cell edges of a kernel map's tiles, in input pixel coordinates."""
    y, x = ds["y"].values, ds["x"].values
    steps = np.concatenate([np.diff(y), np.diff(x)])
    size = float(ds.attrs.get("tile_size", np.median(steps) if steps.size else 1.0))
    return _cell_edges(y, size), _cell_edges(x, size)


def _cells(ax, ds: xr.Dataset, values: np.ndarray, sky: Sky = PIXELS, fontsize: float | None = None, **style):
    """A map of per-tile values, each drawn over its tile's cell, y up as an astronomical image is shown."""
    ye, xe = _edges(ds)
    im = ax.pcolormesh(xe, ye, values, shading="flat", **style)
    _frame(ax, ds, sky, fontsize)
    return im


def _image(ax, values: np.ndarray, **style):
    """``values`` drawn as an image, row 0 at the bottom (origin lower: y up, as ds9 shows a FITS image)."""
    return ax.imshow(values, origin="lower", interpolation="nearest", **style)


def _frame(ax, ds: xr.Dataset, sky: Sky = PIXELS, fontsize: float | None = None) -> None:
    """A map's limits (the tiles' cells, y up), aspect and axes: RA/Dec and a compass on WCSAxes."""
    ye, xe = _edges(ds)
    ax.set_xlim(xe[0], xe[-1])
    ax.set_ylim(ye[0], ye[-1])
    ax.set_aspect("equal")
    label_axes(ax, sky, fontsize=fontsize)


def _label(ds: xr.Dataset, i: int) -> str:
    """Image ``i``'s label (its ``image`` coordinate), what its panels are titled with."""
    return str(ds["image"].values[i])


def _panel_title(ds: xr.Dataset, i: int, always: bool = False) -> str:
    """Image ``i``'s panel title: its label, with ``(reverse)`` where its kernels blur the target (with
    ``always``, its direction whatever it is: ``blurrier (forward)``)."""
    direction = int(image_directions(ds)[i])
    if always or direction == REVERSE:
        return f"{_label(ds, i)} ({DIRECTION_NAMES.get(direction, 'undecided')})"
    return _label(ds, i)


def _with_reverse_units(label: str, unit: str | None, directions: np.ndarray | None) -> str:
    """``label`` (its unit in parentheses) naming the reverse images' units too (:data:`REVERSE_UNITS`
    ``unit``: ``flux`` or ``background``) where ``directions`` hold a reverse image."""
    if unit in REVERSE_UNITS and directions is not None and (np.asarray(directions) == REVERSE).any():
        return label[:-1] + REVERSE_UNITS[unit] + ")"
    return label


def _unit_label(ds: xr.Dataset, name: str, images: list[int]) -> str:
    """The colour-bar label of ``name``, naming the reverse images' units too where some of ``images`` are."""
    return _with_reverse_units(LABELS[name], name, image_directions(ds)[images])


def _limits(values: np.ndarray, symmetric: bool = False) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    lo, hi = (np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0))
    if symmetric:
        lim = max(abs(lo), abs(hi)) or 1.0
        lo, hi = -lim, lim
    return float(lo), float(hi if hi > lo else lo + 1e-12)


def _panel_limits(values: np.ndarray, scale: str, symmetric: bool = False,
                  floor: float | None = None) -> list[tuple[float, float]]:
    """Colour limits of each panel of ``values`` ``(panels, ...)``: one pair for all (``shared``) or each its
    own (``per-image``); ``floor``: the lower limit where given."""
    pairs = ([_limits(values, symmetric)] * len(values) if scale == "shared"
             else [_limits(v, symmetric) for v in values])
    return pairs if floor is None else [(floor, max(hi, floor + 1e-12)) for _, hi in pairs]


def _colour_bars(fig, ims: list, axes: list, label: str, scale: str, **style) -> None:
    """One colour bar for the panels (``shared``), or one beside each (``per-image``), labelled ``label``."""
    if scale == "shared":
        fig.colorbar(ims[-1], ax=list(axes), label=label, shrink=0.8, **style)
    else:
        for im, ax in zip(ims, axes):
            fig.colorbar(im, ax=ax, label=label, shrink=0.8, **style)


def _scale_note(scale: str) -> str:
    return "" if scale == "shared" else " (colour scale per image)"


def _map_figure(plt, ds: xr.Dataset, name: str, images: list[int], title: str, cmap: str = "viridis",
                symmetric: bool = False, sky: Sky = PIXELS, scale: str = "shared"):
    values = np.asarray(ds[name].values[images], dtype=np.float64)
    fig, axes = _panels(plt, len(images), title + _scale_note(scale), sky=sky)
    ims = []
    for ax, i, v, (lo, hi) in zip(axes, images, values, _panel_limits(values, scale, symmetric)):
        ims.append(_cells(ax, ds, v, sky, vmin=lo, vmax=hi, cmap=cmap))
        ax.set_title(_panel_title(ds, i))
    _colour_bars(fig, ims, list(axes), _unit_label(ds, name, images), scale)
    return fig


def _width_figure(plt, ds: xr.Dataset, images: list[int], sky: Sky = PIXELS, scale: str = "shared"):
    """The sharpness measure per tile, FWHM(target)² - FWHM(source)² (red: the target blurrier), on a diverging
    scale symmetric about 0; tiles flagged target_sharper crossed, nearly_equal ringed; titled with the image's
    label and direction."""
    values = np.asarray(ds["width_difference"].values[images], dtype=np.float64)
    flags = np.asarray(ds["quality_flag"].values[images]).astype(np.int64)
    fig, axes = _panels(plt, len(images), FIGURES["width-difference"] + _scale_note(scale), sky=sky)
    yy, xx = np.meshgrid(ds["y"].values, ds["x"].values, indexing="ij")
    ims = []
    for ax, i, v, f, (lo, hi) in zip(axes, images, values, flags, _panel_limits(values, scale, symmetric=True)):
        ims.append(_cells(ax, ds, v, sky, vmin=lo, vmax=hi, cmap="RdBu_r"))
        for mask, marker, name in ((fl.TARGET_SHARPER, "x", "target_sharper"), (fl.NEARLY_EQUAL, "o", "nearly_equal")):
            on = (f & mask) != 0
            if on.any():
                ax.plot(xx[on], yy[on], marker, color="k", mfc="none", ms=6, ls="none", label=name)
        ax.set_title(_panel_title(ds, i, always=True))
    _colour_bars(fig, ims, list(axes), LABELS["width_difference"], scale)
    return fig


def _nice(value: float) -> float:
    """The largest of 1, 2, 5 times a power of ten not above ``value`` (> 0)."""
    power = 10.0 ** np.floor(np.log10(value))
    return float(max(m * power for m in (1.0, 2.0, 5.0) if m * power <= value * (1 + 1e-9)))


def _reference_stick(ax, quiver, e_max: float, scale: float) -> None:
    """A reference stick with its value (``|e| = 0.05``) in the lower right corner of ``ax``, on a white
    ground: the whiskers of ``quiver`` are ``scale`` data units (along x) per unit of ``|e|``."""
    from matplotlib.patches import Rectangle

    ref = _nice(e_max) if np.isfinite(e_max) and e_max > 0 else 0.1
    x0, x1 = ax.get_xlim()
    frac = min(ref * scale / (abs(x1 - x0) or 1.0), 0.9)  # the stick's length in axes fractions
    width = max(frac + 0.06, 0.3)  # room for the label too
    ax.add_patch(Rectangle((0.985 - width, 0.015), width, 0.14, transform=ax.transAxes,
                           facecolor="w", edgecolor="0.6", lw=0.5, alpha=0.9, zorder=4))
    ax.quiverkey(quiver, 0.985 - width / 2, 0.05, ref * scale, f"|e| = {ref:g}", labelpos="N", coordinates="axes",
                 color="k", labelcolor="k", fontproperties={"size": 7}, labelsep=0.05, zorder=5)


def _whisker_figure(plt, ds: xr.Dataset, images: list[int], sky: Sky = PIXELS, scale: str = "shared"):
    fig, axes = _panels(plt, len(images), FIGURES["ellipticity"] + _scale_note(scale).replace("colour", "stick"),
                        sky=sky)
    yy, xx = np.meshgrid(ds["y"].values, ds["x"].values, indexing="ij")
    # the tiles' step (the last tiles, set against the image edge, may lie closer)
    spacing = float(ds.attrs.get("tile_step", 0)) or (
        float(np.median(np.diff(ds["x"].values))) if ds.sizes["x"] > 1 else float(ds.attrs.get("tile_size", 1)))
    e_all = np.asarray(ds["ellipticity"].values[images], dtype=np.float64)

    def largest(e: np.ndarray) -> float:
        return float(np.nanmax(e)) if np.isfinite(e).any() else 1.0

    for ax, i, e in zip(axes, images, e_all):
        e_max = largest(e_all if scale == "shared" else e)
        length = 0.9 * spacing / max(e_max, 1e-6)  # the longest stick spans 90 % of a tile
        angle = np.radians(np.asarray(ds["position_angle"].values[i], dtype=np.float64))
        u, v = e * np.cos(angle) * length, e * np.sin(angle) * length
        q = ax.quiver(xx, yy, u, v, angles="xy", scale_units="xy", scale=1, headwidth=0, headlength=0,
                      headaxislength=0, pivot="middle", color="k", width=0.006)
        _frame(ax, ds, sky)
        _reference_stick(ax, q, e_max, length)
        ax.set_title(_panel_title(ds, i))
    return fig


def _flag_figure(plt, ds: xr.Dataset, images: list[int], sky: Sky = PIXELS):
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.patches import Patch

    flags = np.asarray(ds["quality_flag"].values[images]).astype(np.int64)
    fig, axes = _panels(plt, len(images) + 1, FIGURES["flags"] + ": each tile by its most severe problem flag",
                        sky=sky, maps=len(images))
    names = _category_names()
    colours = list(_CATEGORY_COLOURS[:len(names)])
    cmap, norm = ListedColormap(colours), BoundaryNorm(np.arange(len(names) + 1) - 0.5, len(names))
    for ax, i, f in zip(axes, images, flags):
        _cells(ax, ds, flag_categories(f), sky, cmap=cmap, norm=norm, edgecolors="w", linewidth=0.3)
        problem = fl.problems(f)
        ax.set_title(f"{_panel_title(ds, i)}: {_percent(problem.mean())} % flagged")
    fig.legend([Patch(facecolor=c, edgecolor="0.5") for c in colours], names, loc="outside lower center",
               ncols=min(len(names), 4), fontsize=7, title="tile colour: no flag, information only, or the most "
                                                           "severe problem flag (listed by severity)",
               title_fontsize=7)
    bars = axes[-1]
    n_bits = len(fl.FLAGS)
    width = 0.8 / len(images)
    row = n_bits - 1 - np.arange(n_bits)  # the first flag at the top, y still up
    for j, (i, f) in enumerate(zip(images, flags)):
        counts = [np.count_nonzero(f & flag.mask) for flag in fl.FLAGS]
        bars.barh(row + 0.4 - (j + 1) * width, counts, height=width, label=_label(ds, i), align="edge")
    bars.set_yticks(row,
                    [flag.name.replace("_", " ") + (" (info)" if flag.kind == fl.INFORMATION else "")
                     for flag in fl.FLAGS], fontsize=7)
    for tick, flag in zip(bars.get_yticklabels(), fl.FLAGS):
        if flag.kind == fl.INFORMATION:
            tick.set_color("0.45")
    bars.set_xlabel("tiles (count)")
    bars.set_title("tiles with each flag\n(info): information, not a problem", fontsize=8)
    bars.legend(fontsize=6)
    return fig


def _percent(fraction: float) -> str:
    """A percentage for a title: ``0`` exactly where nothing is counted, else 3 significant figures."""
    return "0" if fraction == 0 else f"{100 * fraction:.3g}"


def _stretch_norm(stretch: str, lo: float, hi: float):
    """The colour normalisation of a kernel mosaic with limits ``lo``, ``hi`` under ``stretch``."""
    from matplotlib import colors

    peak = max(abs(lo), abs(hi)) or 1.0
    if stretch == "asinh":
        return colors.AsinhNorm(linear_width=ASINH_WIDTH * peak, vmin=lo, vmax=hi)
    if stretch == "log":
        top = hi if hi > 0 else peak
        return colors.LogNorm(vmin=top * 10.0 ** -LOG_DECADES, vmax=top)
    return colors.Normalize(vmin=lo, vmax=hi)


def _kernel_limits(kernels: np.ndarray) -> tuple[float, float]:
    finite = kernels[np.isfinite(kernels)]
    return (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)


def _kernel_mosaic(plt, ds: xr.Dataset, i: int, lo: float, hi: float, sky: Sky = PIXELS, stretch: str = "asinh",
                   scale: str = "shared"):
    """The kernels of image ``i`` at their tiles' places, y up (tile row 0 and each stamp's ``ky = -h`` at the
    bottom), coloured under ``stretch`` between ``lo`` and ``hi``."""
    kern = np.asarray(ds["kernel"][i].values, dtype=np.float64)
    ty, tx, k, _ = kern.shape
    gap = 1
    mosaic = np.full((ty * (k + gap), tx * (k + gap)), np.nan)
    for r in range(ty):
        for c in range(tx):
            mosaic[r * (k + gap): r * (k + gap) + k, c * (k + gap): c * (k + gap) + k] = kern[r, c]
    norm = _stretch_norm(stretch, lo, hi)
    if stretch == "log":  # at or below zero: the foot of the scale, as below its lower limit
        mosaic = np.where(np.isfinite(mosaic) & (mosaic < norm.vmin), norm.vmin / 10, mosaic)
    fig, ax = plt.subplots(figsize=(7, 7 * ty / max(tx, 1) + 0.6), constrained_layout=True)
    im = _image(ax, mosaic, norm=norm, cmap="inferno")
    reverse = int(image_directions(ds)[i]) == REVERSE
    title = f"Kernels across the field, {_label(ds, i)}" + (" (reverse: they blur the target)" if reverse else "")
    ax.set_xticks([c * (k + gap) + k // 2 for c in range(tx)], [f"{v:.0f}" for v in ds["x"].values],
                  rotation=90, fontsize=7)
    ax.set_yticks([r * (k + gap) + k // 2 for r in range(ty)], [f"{v:.0f}" for v in ds["y"].values], fontsize=7)
    ax.set_xlabel("tile centre x (pixel)")
    ax.set_ylabel("tile centre y (pixel)")
    if sky.on:  # the mosaic lies as the image does: a compass of the image's middle, stretched as the mosaic is
        y0, y1, x0, x1 = map_extent(ds)
        steps = [float(np.median(np.diff(ds[d].values))) if ds.sizes[d] > 1 else float(k + gap) for d in ("y", "x")]
        draw_compass(ax, sky, at=((y0 + y1) / 2, (x0 + x1) / 2), stretch=tuple((k + gap) / s for s in steps))
        title += " (N, E: the sky's directions)"
    ax.set_title(title)
    foot = f"; black: below {norm.vmin:.2g}" if stretch == "log" else ""
    fig.colorbar(im, ax=ax, shrink=0.8, extend="min" if stretch == "log" else "neither",
                 label=f"kernel flux per kernel pixel ({REVERSE_KERNEL_UNIT if reverse else KERNEL_UNIT})\n"
                       f"{stretch} stretch, "
                       f"{'scale of this image' if scale == 'per-image' else 'scale shared by the images'}{foot}")
    return fig


def _scatter_size(n: int) -> float:
    return 14.0 if n <= 100 else (6.0 if n <= 2000 else 2.0)


#: Colours of up to 10 groups (red marks outliers).
_GROUP_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:gray",
                  "tab:olive", "tab:cyan", "navy")

#: Units of common per-image coordinates that carry no ``units`` attribute.
_COORDINATE_UNITS = {"airmass": "dimensionless", "mjd": "day", "jd": "day", "exptime": "s", "exposure_time": "s"}


def coordinate_label(coord: Coordinate, ds: xr.Dataset | None = None) -> str:
    """An axis label of a per-image coordinate with its unit: its ``units`` attribute, the position in the
    stack, a date, a category, a known unit (:data:`_COORDINATE_UNITS`) or "no units stored"."""
    if coord.name == "index" and (ds is None or "index" not in ds.coords):
        return "index (position in the stack)"
    stored = ds[coord.name].attrs.get("units") if ds is not None and coord.name in ds.coords else None
    if stored:
        return f"{coord.name} ({stored})"
    unit = {"time": "date", "categorical": "category"}.get(coord.kind) or \
        _COORDINATE_UNITS.get(coord.name.lower(), "no units stored")
    return f"{coord.name} ({unit})"


def _trend_figure(plt, result: Survey, coord: Coordinate, ds: xr.Dataset | None = None):
    names = [name for name in TREND_QUANTITIES if (name, coord.name) in result.trends]
    fig, axes = plt.subplots(len(names), 1, figsize=(8, 1.9 * len(names) + 0.8), sharex=True,
                             constrained_layout=True, squeeze=False)
    axes = axes.ravel()
    n = len(result.table)
    n_out = int(np.any([result.trends[(name, coord.name)].outlier for name in names], axis=0).sum())
    within = f" (per {'/'.join(result.groups.by)})" if result.groups is not None and \
        coord.kind != "categorical" else ""
    fig.suptitle(f"Trends against {coord.name}{within}: {n} images, {n_out} outlier(s)\n"
                 f"(red: more than {result.threshold:g} robust sigma from the trend; grey: that band)", fontsize=10)
    if coord.kind == "categorical":
        jitter = np.random.default_rng(0).uniform(-0.3, 0.3, n)
        x = coord.position + jitter
        order = None
    else:
        x = coord.values
        order = np.argsort(coord.position, kind="stable")
    groups = result.groups if coord.kind != "categorical" else None
    codes = groups.codes if groups is not None else np.zeros(n, dtype=np.int64)
    colours = len(np.unique(codes)) <= 10
    for ax, name in zip(axes, names):
        t = result.trends[(name, coord.name)]
        values = result.table[name].to_numpy(dtype=np.float64)
        if order is not None:
            for code in np.unique(codes):
                members = order[codes[order] == code]
                colour = _GROUP_COLOURS[code] if colours else "tab:blue"
                label = groups.names[code] if groups is not None and colours else None
                ax.scatter(np.asarray(x)[members], values[members], s=_scatter_size(n), color=colour, alpha=0.6,
                           linewidths=0, rasterized=True, label=label)
                keep = members[np.isfinite(t.trend[members])]
                xs = np.asarray(x)[keep]
                ax.plot(xs, t.trend[keep], color="k" if not colours or groups is None else colour, lw=1.2)
                ax.fill_between(xs, t.trend[keep] - result.threshold * t.scale[keep],
                                t.trend[keep] + result.threshold * t.scale[keep], color="k", alpha=0.05, lw=0)
        else:
            ax.scatter(x, values, s=_scatter_size(n), color="tab:blue", alpha=0.6, linewidths=0, rasterized=True)
            for code in range(len(coord.groups)):
                members = np.flatnonzero(coord.position == code)
                if members.size and np.isfinite(t.trend[members[0]]):
                    centre, spread = t.trend[members[0]], result.threshold * t.scale[members[0]]
                    ax.hlines(centre, code - 0.4, code + 0.4, color="k", lw=1.2)
                    ax.fill_between([code - 0.4, code + 0.4], centre - spread, centre + spread, color="k",
                                    alpha=0.1, lw=0)
        if t.outlier.any():
            ax.scatter(np.asarray(x)[t.outlier], values[t.outlier], s=max(_scatter_size(n) * 3, 20),
                       color="tab:red", marker="x", label=f"{int(t.outlier.sum())} outlier(s)")
        if t.outlier.any() or (groups is not None and colours):
            ax.legend(fontsize=6, loc="upper right", ncol=2)  # "best" scans every point: slow
        ax.set_ylabel(_trend_label(result, name), fontsize=8)
    if coord.kind == "categorical":
        axes[-1].set_xticks(np.arange(len(coord.groups)), coord.groups, rotation=45 if len(coord.groups) > 6 else 0,
                            fontsize=7)
    axes[-1].set_xlabel(coordinate_label(coord, ds))
    return fig


def _trend_label(result: Survey, name: str) -> str:
    """The axis label of a trended quantity, naming the reverse images' units too where the stack has any."""
    unit = {"flux_median": "flux", "background_median": "background"}.get(name)
    return _with_reverse_units(TREND_QUANTITIES[name].label, unit, result.directions)


def _pca_unit(result: Survey) -> str:
    """Unit of the kernels the components were found in (their amplitudes and the mean kernel's values)."""
    return KERNEL_UNIT if result.pca.normalize is None else "fraction of the kernel flux"


def _mixed(result: Survey) -> bool:
    """Whether the stack holds images of both directions."""
    d = result.directions
    return d is not None and bool((d == REVERSE).any() and (d == FORWARD).any())


def _direction_words(result: Survey) -> str:
    """``images``, or where the stack holds both directions, which of them a stack-wide statistic is of and
    how many of the others were left out: ``forward images (1 reverse left out)``."""
    if not _mixed(result):
        return "images"
    name, other = DIRECTION_NAMES[result.direction], DIRECTION_NAMES[-result.direction]
    left = int(np.count_nonzero(result.directions == -result.direction))
    return f"{name} images ({left} {other} left out)"


def _pca_figure(plt, result: Survey, extent: list[float], sky: Sky = PIXELS):
    pca = result.pca
    m = pca.n_components
    fig, axes = _grid(plt, 2, m + 1, (2.6 * (m + 1) + 0.6, 5.8), sky, spatial=lambda r, c: r == 1 and c > 0)
    k = pca.mean.shape[-1]
    mean_kernel = pca.mean.reshape(-1, k, k).mean(axis=0)
    norm = {"kernel": "each kernel divided by its sum", "image": "each image's kernels divided by their mean sum",
            None: "kernels as stored"}[pca.normalize]
    fig.suptitle(f"{FIGURES['pca']}: {len(result.pca_images)} {_direction_words(result)} with a model,\n"
                 f"their models' kernels on a {len(result.grid_y)}x{len(result.grid_x)} grid ({norm}); kernels "
                 "drawn y up")
    _image(axes[0, 0], mean_kernel, cmap="inferno")
    axes[0, 0].set_title("mean kernel (over the grid)", fontsize=9)
    for j in range(m):
        eig = pca.eigen_kernels[j]
        lim = float(np.abs(eig).max()) or 1.0
        _image(axes[0, j + 1], eig, cmap="RdBu_r", vmin=-lim, vmax=lim)
        axes[0, j + 1].set_title(f"PC{j + 1}: {100 * pca.explained_fraction[j]:.1f} % of the variance", fontsize=9)
        pattern = pca.patterns[j]
        plim = float(np.abs(pattern).max()) or 1.0
        im = _image(axes[1, j + 1], pattern, extent=extent, cmap="RdBu_r", vmin=-plim, vmax=plim)
        axes[1, j + 1].set_title(f"PC{j + 1} spatial pattern ({100 * pca.separability[j]:.0f} % separable)",
                                 fontsize=8)
        label_axes(axes[1, j + 1], sky, fontsize=8)
        fig.colorbar(im, ax=axes[1, j + 1], shrink=0.7).set_label("weight (dimensionless)", fontsize=8)
    for ax in axes[0]:
        ax.set_xticks([])
        ax.set_yticks([])
    scree = axes[1, 0]
    index = np.arange(1, m + 1)
    scree.bar(index, 100 * pca.explained_fraction, color="tab:blue")
    scree.plot(index, 100 * np.cumsum(pca.explained_fraction), "o-", color="k", label="cumulative")
    scree.set_xticks(index)
    scree.set_xlabel("component (number)")
    scree.set_ylabel("variance explained (%)")
    scree.set_ylim(0, 105)
    scree.legend(fontsize=7)
    return fig


def _primary(result: Survey) -> Coordinate:
    return next(c for c in result.coordinates if c.kind in ("numeric", "time"))


def _amplitude_figure(plt, result: Survey, ds: xr.Dataset | None = None):
    pca = result.pca
    coord = _primary(result)
    m = pca.n_components
    fig, axes = plt.subplots(m, 1, figsize=(8, 1.8 * m + 0.8), sharex=True, constrained_layout=True, squeeze=False)
    fig.suptitle(f"{FIGURES['pca-amplitudes']} against {coord.name} (red: outlier images)")
    x = np.asarray(coord.values)[result.pca_images]
    outlier = result.table["outlier"].to_numpy()[result.pca_images]
    n = len(result.pca_images)
    unit = _pca_unit(result)
    for j, ax in enumerate(axes.ravel()):
        amp = pca.amplitudes[:, j]
        ax.scatter(x, amp, s=_scatter_size(n), alpha=0.6, linewidths=0, rasterized=True)
        if outlier.any():
            ax.scatter(x[outlier], amp[outlier], s=max(_scatter_size(n) * 3, 20), color="tab:red", marker="x")
        ax.axhline(0.0, color="k", lw=0.6)
        ax.set_ylabel(f"PC{j + 1} amplitude\n({unit})", fontsize=8)
        ax.set_title(f"PC{j + 1}: {100 * pca.explained_fraction[j]:.1f} % of the variance", fontsize=8, loc="left")
    axes[-1, 0].set_xlabel(coordinate_label(coord, ds))
    return fig


def _fine_grid(ds: xr.Dataset, n: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.asarray(ds["y"].values, dtype=np.float64), np.asarray(ds["x"].values, dtype=np.float64)
    return np.linspace(y.min(), y.max(), n), np.linspace(x.min(), x.max(), n)


def _model_shapes(ds: xr.Dataset, images: list[int], fine: int) -> dict[str, np.ndarray]:
    """FWHM, |e| and position angle of the models of ``images`` on a ``fine x fine`` grid."""
    gy, gx = _fine_grid(ds, fine)
    yy, xx = np.meshgrid(gy, gx, indexing="ij")
    kernels = model_kernels_at(ds, yy, xx, images)
    mom = adaptive_moments(kernels.reshape(-1, *kernels.shape[-2:]))
    shape = (len(images), fine, fine)
    e1, e2 = np.asarray(mom.e1).reshape(shape), np.asarray(mom.e2).reshape(shape)
    return {"fwhm": np.asarray(mom.fwhm).reshape(shape), "ellipticity": np.hypot(e1, e2),
            "angle": 0.5 * np.arctan2(e2, e1), "y": gy, "x": gx}


def _fine_extent(gy: np.ndarray, gx: np.ndarray) -> list[float]:
    """``imshow``'s extent (left, right, bottom, top) of a grid drawn origin lower: row 0 at ``gy[0]``."""
    dy, dx = (gy[1] - gy[0]) if len(gy) > 1 else 1.0, (gx[1] - gx[0]) if len(gx) > 1 else 1.0
    return [gx[0] - dx / 2, gx[-1] + dx / 2, gy[0] - dy / 2, gy[-1] + dy / 2]


def _model_map_figure(plt, ds: xr.Dataset, images: list[int], shapes: dict[str, np.ndarray], name: str,
                      sky: Sky = PIXELS, scale: str = "shared"):
    fine = shapes["fwhm"].shape[-1]
    title = FIGURES[f"model-{name}"]
    fig, axes = _panels(plt, len(images), f"{title} ({fine}x{fine} positions across the tile centres; dots: tile "
                        f"centres){_scale_note(scale)}", sky=sky)
    values = shapes[name]
    extent = _fine_extent(shapes["y"], shapes["x"])
    yy, xx = np.meshgrid(ds["y"].values, ds["x"].values, indexing="ij")
    step = max(fine // 8, 1)
    ims = []
    for ax, i, v, ang, (lo, hi) in zip(axes, images, values, shapes["angle"], _panel_limits(values, scale)):
        ims.append(_image(ax, v, extent=extent, vmin=lo, vmax=hi, cmap="viridis" if name == "fwhm" else "plasma"))
        if name == "ellipticity" and np.isfinite(v).any():
            sub = (slice(step // 2, None, step),) * 2
            fy, fx = np.meshgrid(shapes["y"], shapes["x"], indexing="ij")
            spacing = (shapes["x"][-1] - shapes["x"][0]) / max(fine - 1, 1) * step
            length = 0.9 * spacing / max(hi, 1e-6)
            q = ax.quiver(fx[sub], fy[sub], (v * np.cos(ang) * length)[sub], (v * np.sin(ang) * length)[sub],
                          angles="xy", scale_units="xy", scale=1, headwidth=0, headlength=0, headaxislength=0,
                          pivot="middle", color="w", width=0.005)
            _reference_stick(ax, q, hi, length)
        ax.plot(xx.ravel(), yy.ravel(), ".", color="k", ms=2)
        ax.set_title(_panel_title(ds, i) + ("" if np.isfinite(v).any() else " (no model)"))
        label_axes(ax, sky)
    _colour_bars(fig, ims, list(axes), f"model {LABELS[name]}", scale)
    return fig


def _residual_figure(plt, ds: xr.Dataset, images: list[int], sky: Sky = PIXELS, scale: str = "shared"):
    """Tile minus model: the kernels' relative L2 difference (%) and the FWHM difference, per tile."""
    yy, xx = np.meshgrid(ds["y"].values, ds["x"].values, indexing="ij")
    model = model_kernels_at(ds, yy, xx, images)
    model_fwhm = np.asarray(adaptive_moments(model.reshape(-1, *model.shape[-2:])).fwhm).reshape(
        len(images), *yy.shape)
    d_fwhm = np.asarray(ds["fwhm"].values[images], dtype=np.float64) - model_fwhm
    rel = (100 * np.asarray(ds["model_residual"].values[images], dtype=np.float64) if "model_residual" in ds
           else np.full(d_fwhm.shape, np.nan))
    cols = len(images)
    fig, axes = _grid(plt, 2, cols, (3.0 * cols + 1.4, 6.2), sky)
    fig.suptitle(FIGURES["model-residual"] + _scale_note(scale))
    for row, (values, label, cmap, symmetric) in enumerate((
            (rel, LABELS["model_residual"], "magma", False),
            (d_fwhm, LABELS["d_fwhm"], "RdBu_r", True))):
        ims = []
        limits = _panel_limits(values, scale, symmetric, floor=None if symmetric else 0.0)
        for ax, i, v, (lo, hi) in zip(axes[row], images, values, limits):
            ims.append(_cells(ax, ds, v, sky, 8, vmin=lo, vmax=hi, cmap=cmap))
            ax.set_title(_panel_title(ds, i) + ("" if np.isfinite(v).any() else " (no model)"), fontsize=9)
        _colour_bars(fig, ims, list(axes[row]), label, scale)
    return fig


def _stack_figure(plt, ds: xr.Dataset, result: Survey, sky: Sky = PIXELS):
    """Maps aggregated over every image of the stack."""
    n = ds.sizes["image"]
    fig, axes = _grid(plt, 2, 2, (10, 8.6), sky)
    # the model's shape and its residual over one direction's images (a reverse kernel blurs the other image)
    one = (np.flatnonzero(result.directions == result.direction) if _mixed(result) else np.arange(n))
    m = len(one)
    fig.suptitle(f"{FIGURES['stack']}: {n} images" + (f"; model maps and tile minus model over the "
                                                       f"{m} {_direction_words(result)}" if m < n else ""))
    grid_extent = _fine_extent(result.grid_y, result.grid_x)
    fwhm = result.model_fwhm[one] - _quiet(np.nanmedian, result.model_fwhm[one].reshape(m, -1), axis=1)[:, None,
                                                                                                          None]
    typical = _quiet(np.nanmedian, fwhm, axis=0)
    lo, hi = _limits(typical, symmetric=True)
    ax = axes[0, 0]
    im = _image(ax, typical, extent=grid_extent, cmap="RdBu_r", vmin=lo, vmax=hi)
    fig.colorbar(im, ax=ax, label="model FWHM - image median (pixel)", shrink=0.8)
    ax.set_title("model FWHM - the image's median, median over images", fontsize=9)
    e1, e2 = _quiet(np.nanmedian, result.model_e1[one], axis=0), _quiet(np.nanmedian, result.model_e2[one], axis=0)
    e, angle = np.hypot(e1, e2), 0.5 * np.arctan2(e2, e1)
    ax = axes[0, 1]
    im = _image(ax, e, extent=grid_extent, cmap="plasma")
    fy, fx = np.meshgrid(result.grid_y, result.grid_x, indexing="ij")
    spacing = (result.grid_x[-1] - result.grid_x[0]) / max(len(result.grid_x) - 1, 1)
    emax = float(np.nanmax(e)) if np.isfinite(e).any() else 1.0
    length = 0.9 * spacing / max(emax, 1e-6)
    q = ax.quiver(fx, fy, e * np.cos(angle) * length, e * np.sin(angle) * length, angles="xy", scale_units="xy",
                  scale=1, headwidth=0, headlength=0, headaxislength=0, pivot="middle", color="w", width=0.008)
    _reference_stick(ax, q, emax, length)
    fig.colorbar(im, ax=ax, label="|median e| (dimensionless)", shrink=0.8)
    ax.set_title("model ellipticity: median e1, e2 over images (sticks along the major axis)", fontsize=9)
    ax = axes[1, 0]
    if "model_residual" in ds:
        resid = _quiet(np.nanmedian, 100 * np.asarray(ds["model_residual"].values[one], dtype=np.float64), axis=0)
        im = _cells(ax, ds, resid, sky, 8, cmap="magma", vmin=0)
        fig.colorbar(im, ax=ax, label=LABELS["model_residual"], shrink=0.8)
    ax.set_title("tile minus model: median over images", fontsize=9)
    ax = axes[1, 1]
    flagged = np.mean(fl.problems(np.asarray(ds["quality_flag"].values)), axis=0)
    im = _cells(ax, ds, 100 * flagged, sky, 8, cmap="magma_r", vmin=0, vmax=100)
    fig.colorbar(im, ax=ax, label="tiles with a problem flag (% of images)", shrink=0.8)
    ax.set_title("tiles with a problem flag: % of images", fontsize=9)
    for ax in axes[0]:
        label_axes(ax, sky, fontsize=8)
    if "model_residual" not in ds:
        _frame(axes[1, 0], ds, sky, 8)
    return fig


def panel_images(outliers: pd.DataFrame, n_images: int, most: int) -> list[int]:
    """The images given per-image panels, in image order: the outliers' (``outliers["index"]``, most
    deviant first) up to ``most``, then the first images until there are ``most`` (or every image)."""
    chosen = list(dict.fromkeys(int(i) for i in outliers["index"]))[: max(most, 0)]
    for i in range(n_images):
        if len(chosen) >= most:
            break
        if i not in chosen:
            chosen.append(i)
    return sorted(chosen)


def figures(ds: xr.Dataset, *, max_images: int = 8, result: Survey | None = None, fine: int = 32,
            sky: Sky | None = None, stretch: str = "asinh", scale: str = "shared") -> dict[str, Any]:
    """Every figure by file stem (matplotlib Figures, not yet saved); ``result``: the stack's
    :func:`~pipeline.analysis.survey.survey` (computed when not given).  Per-image figures show
    :func:`panel_images`.  ``sky``: the maps' sky (:func:`~pipeline.analysis.sky.sky_of` of ``ds`` when not
    given): with a WCS every map is drawn on astropy's WCSAxes, RA/Dec on its axes and a compass; else
    in pixels.  ``stretch``: of the kernel mosaics (:data:`STRETCHES`); ``scale``: one colour scale
    across the images' panels, or one per image (:data:`SCALES`)."""
    _check_options(stretch, scale)
    plt = _pyplot()
    result = survey(ds) if result is None else result
    sky = sky_of(ds) if sky is None else sky
    images = panel_images(result.outliers, ds.sizes["image"], max_images)
    kern = np.asarray(ds["kernel"].isel(image=images).values, dtype=np.float64)
    shared = _kernel_limits(kern)
    out: dict[str, Any] = {
        f"kernels-{i}": _kernel_mosaic(plt, ds, i, *(shared if scale == "shared" else _kernel_limits(k)), sky,
                                       stretch, scale) for i, k in zip(images, kern)}
    out["fwhm"] = _map_figure(plt, ds, "fwhm", images, FIGURES["fwhm"], sky=sky, scale=scale)
    out["ellipticity"] = _whisker_figure(plt, ds, images, sky, scale)
    out["flux"] = _map_figure(plt, ds, "flux", images, FIGURES["flux"], cmap="cividis", sky=sky, scale=scale)
    out["background"] = _map_figure(plt, ds, "background", images, FIGURES["background"], cmap="RdBu_r",
                                    symmetric=True, sky=sky, scale=scale)
    out["residual"] = _map_figure(plt, ds, "residual", images, FIGURES["residual"], cmap="magma", sky=sky,
                                  scale=scale)
    out["flags"] = _flag_figure(plt, ds, images, sky)
    if "width_difference" in ds:  # a kernel map written before the sharpness measure: no map of it
        out["width-difference"] = _width_figure(plt, ds, images, sky, scale)
    if has_model_variables(ds):
        shapes = _model_shapes(ds, images, fine)
        out["model-fwhm"] = _model_map_figure(plt, ds, images, shapes, "fwhm", sky, scale)
        out["model-ellipticity"] = _model_map_figure(plt, ds, images, shapes, "ellipticity", sky, scale)
        out["model-residual"] = _residual_figure(plt, ds, images, sky, scale)
    out["stack"] = _stack_figure(plt, ds, result, sky)
    for coord in result.coordinates:
        out[coordinate_file_stem(coord)] = _trend_figure(plt, result, coord, ds)
    if result.pca is not None:
        out["pca"] = _pca_figure(plt, result, _fine_extent(result.grid_y, result.grid_x), sky)
        out["pca-amplitudes"] = _amplitude_figure(plt, result, ds)
    return out


#: What each column of ``tiles.csv`` (:func:`tile_table`) holds.
TILE_COLUMNS: dict[str, str] = {
    "ty": "tile row (position along y)",
    "tx": "tile column (position along x)",
    "y": "tile centre row in input pixel coordinates",
    "x": "tile centre column in input pixel coordinates",
    "ra": "right ascension of the tile centre (deg; where the kernel map has a reference WCS)",
    "dec": "declination of the tile centre (deg; where the kernel map has a reference WCS)",
    "images": "images in the stack",
    "medians_direction": "direction of the images the medians are over (forward, reverse): where the stack holds "
                         "both, the majority's (a reverse kernel blurs the target; its flux is source/target)",
    "medians_images": "images the medians are over (those of medians_direction)",
    "fwhm_median": "median over the images of the tile's kernel FWHM (pixel)",
    "ellipticity_median": "median over the images of the tile's kernel |e| (dimensionless)",
    "flux_median": "median over the images of the tile's flux scale (kernel sum, ratio target/source; "
                   "source/target where the images are reverse)",
    "background_median": "median over the images of the tile's background offset (target units, ADU; source "
                         "units where the images are reverse)",
    "residual_median": "median over the images of the tile's fit residual / noise",
    "snr_median": "median over the images of the tile's signal-to-noise",
    "model_residual_median": "median over the images of |tile - model| / |model|",
    "width_difference_median": "median over all the images of FWHM(target)^2 - FWHM(source)^2 (pixel^2; positive: "
                               "the target blurrier)",
    "flagged_fraction": "fraction of the images in which the tile has a problem flag (the informational flags, "
                        f"{', '.join(f.name for f in fl.FLAGS if f.kind == fl.INFORMATION)}, do not count)",
    "target_sharper_fraction": "fraction of the images in which the tile's kernel sharpens (target_sharper)",
    "unusable_fraction": "fraction of the images in which the tile has no kernel (no data, no signal)",
}


def tile_table(ds: xr.Dataset) -> pd.DataFrame:
    """One row per tile, raster order: its place (``ty``, ``tx``, centre ``y``, ``x`` and, where the kernel
    map has them, ``ra``, ``dec``), the medians over the stack's images of its measurements and how often
    it has a problem flag (:data:`TILE_COLUMNS`).  Reads no kernels.

    The measurements' medians are over the images of one direction (``medians_direction``): all of them,
    or where the stack holds both directions, those of the majority (forward on a tie), since a reverse
    image's kernel, flux and background are of the other image of its pair; the sharpness measure and
    the flags are counted over every image."""
    ny, nx = ds.sizes["y"], ds.sizes["x"]
    ty, tx = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
    yy, xx = np.meshgrid(np.asarray(ds["y"].values, np.float64), np.asarray(ds["x"].values, np.float64),
                         indexing="ij")
    data: dict[str, Any] = {"ty": ty.ravel(), "tx": tx.ravel(), "y": yy.ravel(), "x": xx.ravel()}
    for name in ("ra", "dec"):
        if name in ds.coords and ds[name].dims == ("y", "x"):
            data[name] = np.asarray(ds[name].values, np.float64).ravel()
    data["images"] = np.full(ny * nx, ds.sizes["image"])
    directions = image_directions(ds)
    primary = REVERSE if np.count_nonzero(directions == REVERSE) > np.count_nonzero(directions == FORWARD) \
        else FORWARD
    one = directions == primary if (directions == -primary).any() else np.ones(len(directions), dtype=bool)
    data["medians_direction"] = np.full(ny * nx, DIRECTION_NAMES[primary], dtype=object)
    data["medians_images"] = np.full(ny * nx, int(one.sum()))
    for name in ("fwhm", "ellipticity", "flux", "background", "residual", "snr", "model_residual"):
        if name in ds and ds[name].dims == ("image", "y", "x"):
            values = np.asarray(ds[name].values, np.float64)[one].reshape(int(one.sum()), -1)
            data[f"{name}_median"] = _quiet(np.nanmedian, values, axis=0)
    if "width_difference" in ds:
        values = np.asarray(ds["width_difference"].values, np.float64).reshape(ds.sizes["image"], -1)
        data["width_difference_median"] = _quiet(np.nanmedian, values, axis=0)
    flags = np.asarray(ds["quality_flag"].values).astype(np.int64).reshape(ds.sizes["image"], -1)
    data["flagged_fraction"] = np.mean(fl.problems(flags), axis=0)
    data["target_sharper_fraction"] = np.mean((flags & fl.TARGET_SHARPER) != 0, axis=0)
    data["unusable_fraction"] = np.mean((flags & fl.BAD) != 0, axis=0)
    return pd.DataFrame(data)


class _Folder:
    """Where a report's files go: a local folder, or a prefix under an fsspec URL (``s3://bucket/report``)
    opened with ``storage_options`` (default: credentials from the environment)."""

    def __init__(self, out: str | os.PathLike[str], storage_options: dict[str, Any] | None = None):
        import fsspec

        self.out = os.fspath(out)
        self.remote = "://" in self.out and not self.out.startswith("file://")
        if self.remote:
            self.fs, self.root = fsspec.core.url_to_fs(self.out, **(storage_options or {}))
        else:
            self.fs, self.root = fsspec.filesystem("file"), str(Path(fsspec.core.url_to_fs(self.out)[1]))

    def make(self) -> None:
        self.fs.makedirs(self.root, exist_ok=True)

    def claim(self, overwrite: bool) -> bool:
        """Make the folder ready for a new report: refused where something is there, unless ``overwrite``
        and it is a report (its ``index.html`` says so).  Returns whether the report there is to be replaced
        by one written beside it (a local folder: swapped in once complete, so the earlier report stays
        whole until then); at a URL it is removed now (nothing is renamed atomically there)."""
        if not self.remote:
            check_writable(self.root, f"--out {self.out}")
            for leftover in leftovers(self.root):  # what an interrupted replacement left: never needed again
                discard(leftover)
        root = self.root.rstrip("/")
        if not self.fs.exists(root) or (self.fs.isdir(root) and not self.fs.ls(root)):
            return False
        if not overwrite:
            raise OptionError(f"{self.out} exists: nothing was changed; pass --overwrite (overwrite=True) to replace "
                              "the report there, or give another --out")
        index = f"{root}/index.html"
        try:
            with self.fs.open(index, "rb") as f:
                ours = GENERATOR.encode() in f.read(4096)
        except (OSError, IsADirectoryError):
            ours = False
        if not ours:
            raise OptionError(f"{self.out} is not a report written by kernelmap report: nothing was changed; "
                              "--overwrite replaces only those. Remove it yourself, or give another --out")
        if self.remote:
            self.fs.rm(root, recursive=True)
            return False
        return True

    def path(self, name: str) -> Path | str:
        """A file's path (local) or URL."""
        return f"{self.out.rstrip('/')}/{name}" if self.remote else Path(self.root) / name

    def open(self, name: str, mode: str = "wb"):
        return self.fs.open(f"{self.root.rstrip('/')}/{name}", mode)

    def write_text(self, name: str, text: str) -> None:
        with self.open(name, "wb") as f:
            f.write(text.encode("utf-8"))


def write_tables(result: Survey, folder: str | os.PathLike[str] | _Folder, ds: xr.Dataset | None = None, *,
                 storage_options: dict[str, Any] | None = None) -> dict[str, Path | str]:
    """``images.csv`` (and ``images.parquet`` where pyarrow is installed) and ``outliers.csv`` in ``folder``
    (a local folder or an fsspec URL, with ``storage_options``), and given the kernel map ``ds``, the
    per-tile ``tiles.csv`` (:func:`tile_table`, with the tile centres' ``ra``, ``dec`` where it has
    them; the images all lie on the reference's grid, so the per-image tables have no sky position)."""
    where = folder if isinstance(folder, _Folder) else _Folder(folder, storage_options)
    tables = {"images.csv": result.table, "outliers.csv": result.outliers}
    if ds is not None:
        tables["tiles.csv"] = tile_table(ds)
    for name, frame in tables.items():
        where.write_text(name, frame.to_csv(index=False))
    written = {name: where.path(name) for name in tables}
    if importlib.util.find_spec("pyarrow") is not None:
        with where.open("images.parquet") as f:
            result.table.to_parquet(f, index=False)
        written["images.parquet"] = where.path("images.parquet")
    return written


#: Significant figures of the numbers in the page's tables.
FIGURES_SIGNIFICANT = 4


def significant_figures(value: float, significant: int = FIGURES_SIGNIFICANT) -> str:
    """``value`` to ``significant`` figures, trailing zeros kept (``2.550``, ``0.04250``, ``1235``);
    scientific notation below 1e-4 or from 1e6 (``-7.200e-07``); ``0`` for zero."""
    if value == 0:
        return "0"
    rounded = float(f"{value:.{significant - 1}e}")  # the exponent after rounding (9.9996 -> 10.00)
    exponent = int(np.floor(np.log10(abs(rounded))))
    if exponent < -4 or exponent >= 6:
        return f"{value:.{significant - 1}e}"
    return f"{rounded:.{max(significant - 1 - exponent, 0)}f}"


def _exact_decimals(values: np.ndarray) -> int:
    """The decimals that write every value of ``values`` as its shortest round-trip form (at most 10
    significant figures): a coordinate's values as given."""
    texts = [np.format_float_positional(v, precision=10, unique=True, fractional=False, trim="-") for v in values]
    return max((len(t.split(".")[1]) for t in texts if "." in t), default=0)


def column_format(values: pd.Series, significant: int = FIGURES_SIGNIFICANT,
                  exact: bool = False) -> Callable[[Any], str]:
    """How a table column's values are written on the page: integers (and columns of floats that are all
    whole numbers) as integers; other numbers each to ``significant`` figures
    (:func:`significant_figures`), or, ``exact`` (the images' coordinates: times, airmasses), as given
    with the same decimals down the column; booleans as ``yes`` or blank; missing values blank; text as
    it is."""
    kind = values.dtype.kind
    if kind == "b":
        return lambda v: "yes" if v else ""
    if kind in "iu":
        return lambda v: f"{int(v)}"
    if kind != "f":
        return lambda v: "" if v is None or (isinstance(v, float) and not np.isfinite(v)) else str(v)
    finite = values.to_numpy(dtype=np.float64)
    finite = finite[np.isfinite(finite)]

    def blank(text: Callable[[float], str]) -> Callable[[Any], str]:
        return lambda v: "" if v is None or not np.isfinite(v) else text(float(v))

    if finite.size and np.all(finite == np.round(finite)) and np.abs(finite).max() < 1e15:
        return blank(lambda v: f"{int(round(v))}")
    if exact:
        decimals = _exact_decimals(finite)
        return blank(lambda v: f"{v:.{decimals}f}")
    return blank(lambda v: significant_figures(v, significant))


def _table_formats(frame: pd.DataFrame, ds: xr.Dataset | None = None) -> dict[str, Callable[[Any], str]]:
    """Each column's :func:`column_format`; the kernel map's coordinates along ``image`` exact."""
    exact = set() if ds is None else {str(name) for name, c in ds.coords.items() if c.dims == ("image",)}
    return {str(c): column_format(frame[c], exact=str(c) in exact) for c in frame.columns}


def _html_table(frame: pd.DataFrame, formats: dict[str, Callable[[Any], str]] | None = None) -> str:
    """``frame`` as an HTML table, each column written by its :func:`column_format` (or ``formats``)."""
    formats = {**_table_formats(frame), **(formats or {})}
    head = "".join(f'<th title="{html.escape(COLUMNS.get(str(c), str(c)))}">{html.escape(str(c))}</th>'
                   for c in frame.columns)
    writers = [formats[str(c)] for c in frame.columns]
    body = "".join("<tr>" + "".join(f"<td>{html.escape(w(v))}</td>" for w, v in zip(writers, row)) + "</tr>"
                   for row in frame.itertuples(index=False))
    return f"<table><tr>{head}</tr>{body}</table>"


_STYLE = ("<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:85%}"
          "td,th{border:1px solid #999;padding:2px 6px;text-align:right}img{max-width:100%}"
          "figure{margin:1em 0 2em 0}figcaption{max-width:60em;font-size:90%;color:#333}</style>")


#: In the head of every page of a report: what ``--overwrite`` looks for before it replaces a folder.
GENERATOR = "<meta name='generator' content='kernelmap report'>"


def _page(title: str, body: str) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'>{GENERATOR}<title>{html.escape(title)}</title>"
            f"{_STYLE}</head><body>{body}</body></html>\n")


def _write_pages(table: pd.DataFrame, folder: _Folder, ds: xr.Dataset | None = None) -> list[str]:
    """``images-<page>.html`` of :data:`PAGE_ROWS` rows each, linked to one another, every page's columns
    written as the whole table's (:func:`column_format`); their names."""
    names = [f"images-{p + 1:03d}.html" for p in range(-(-len(table) // PAGE_ROWS))]
    formats = _table_formats(table, ds)
    nav = " ".join(f'<a href="{name}">{p + 1}</a>' for p, name in enumerate(names))
    for p, name in enumerate(names):
        part = table.iloc[p * PAGE_ROWS: (p + 1) * PAGE_ROWS]
        folder.write_text(name, _page(
            f"kernelmap images, page {p + 1}",
            f"<p><a href='index.html'>report</a> | pages: {nav} | all: <a href='images.csv'>images.csv</a></p>"
            f"<h1>Images {p * PAGE_ROWS + 1}-{p * PAGE_ROWS + len(part)} of {len(table)}</h1>"
            f"{_html_table(part, formats)}"))
    return names


def incomplete_notice(ds: xr.Dataset, result: Survey) -> str | None:
    """What a report says of a store whose run has not finished (``kernelmap_status`` incomplete): how
    many images have no diagnostics yet, and that the figures show what is there; ``None`` for a
    finished store."""
    if ds.attrs.get("kernelmap_status") != "incomplete":
        return None
    missing, n = result.without_diagnostics, ds.sizes["image"]
    which = (f"{len(missing)} of {n} image(s) have no diagnostics yet "
             f"({', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}) and are left out of the trends"
             if missing else f"every one of the {n} image(s) has diagnostics, but some tiles may not yet")
    return (f"the store is incomplete (kernelmap_status: incomplete: its run was interrupted or is still "
            f"running): {which}; the figures and tables show what is there. Finish the run with "
            "output.mode=resume (--set output.mode=resume) and report again for the whole stack")


_STRETCH_WORDS = {
    "asinh": f"linear near zero and logarithmic above {ASINH_WIDTH * 100:g} % of the peak, so the wings and the "
             "negative ringing show beside the core",
    "log": f"logarithmic over {LOG_DECADES} decades below the peak; black: below that, or at or below zero",
    "linear": "linear between the smallest and the largest value",
}


def caption(stem: str, ds: xr.Dataset, result: Survey | None = None, *, stretch: str = "asinh",
            scale: str = "shared", sky: Sky = PIXELS, fine: int = 32) -> str:
    """The caption under figure ``stem`` on the page: what it shows, in which units, how to read it."""
    axes = "RA/Dec axes (the reference WCS; N, E arrows)" if sky.on else "input pixels"
    panels = ("one colour scale shared by the images' panels" if scale == "shared"
              else "each image's panel with its own colour scale")
    info = ", ".join(f.name for f in fl.FLAGS if f.kind == fl.INFORMATION)
    directions = image_directions(ds)
    any_reverse = bool((directions == REVERSE).any())
    mixed = result is not None and _mixed(result)
    if stem.startswith("kernels-"):
        i = int(stem.split("-", 1)[1])
        label = _label(ds, i)
        reverse = int(directions[i]) == REVERSE
        return (f"The kernel of every tile of image {label} at its tile's place (tile centres in pixel on the "
                "axes), y up: each stamp's row offset ky runs up as the image's y does, so a kernel that moves the "
                + ("source" if reverse else "target") + " up has its peak above the stamp's centre. "
                + (f"Image {label} is reverse (its target is the sharper image): each kernel blurs the target "
                   "into the source, source = kernel * target + background. " if reverse else "")
                + "Colour: kernel flux per kernel pixel "
                f"({REVERSE_KERNEL_UNIT if reverse else KERNEL_UNIT}), {stretch} stretch ({_STRETCH_WORDS[stretch]}); "
                + ("one scale for every image shown." if scale == "shared" else "this image's own scale."))
    if stem.startswith("trends-"):
        coord = next((c for c in (result.coordinates if result is not None else ())
                      if coordinate_file_stem(c) == stem), None)
        against = coordinate_label(coord, ds) if coord is not None else stem[len("trends-"):]
        band = f"{result.threshold:g}" if result is not None else "5"
        return ("Per-image summaries (median FWHM in pixel, median |e|, median flux scale as the ratio "
                "target/source, median background in target units, the model's degree, tiles with a problem flag) "
                f"against {against}: each dot an image, the line the trend and grey its band of {band} robust "
                "standard deviations; red crosses: outliers, listed above."
                + (" The stack holds images of both directions: each direction's images are trended apart (as "
                   "if each were a stack of its own; colours by direction), a reverse image's FWHM, flux "
                   "(source/target) and background (source units) being those of the kernel that blurs its "
                   "target." if mixed else ""))
    pca_unit = _pca_unit(result) if result is not None and result.pca is not None else KERNEL_UNIT
    reverse_note = " Panels titled '(reverse)': images whose kernels blur the target into the source"
    left_out = ""
    if mixed:
        name, other = DIRECTION_NAMES[result.direction], DIRECTION_NAMES[-result.direction]
        left_out = (f" Only the {name} images (the stack's majority) are in it; the {other} ones are left out, "
                    "their kernels blurring the other image of the pair"
                    + (f" ({', '.join(result.other_direction[:10])}"
                       f"{' ...' if len(result.other_direction) > 10 else ''})" if result.other_direction else "")
                    + ".")
    text = {
        "fwhm": f"Kernel FWHM (pixel; Gaussian-weighted adaptive second moments) of each tile, one panel per "
                f"image, y up in {axes}, {panels}. Blank cells: no kernel. A smooth gradient is the PSF "
                "difference changing across the field; a cell unlike its neighbours is a local problem.",
        "ellipticity": "Kernel ellipticity per tile: a stick along the kernel's major axis, its length "
                       "|e| = (a^2 - b^2) / (a^2 + b^2) (dimensionless), the stick in each panel's lower right "
                       "corner giving the scale; y up. Sticks aligned across the field: a coherent shape "
                       "difference (guiding, focus, astigmatism).",
        "flux": f"Flux scale of each tile: the kernel's sum, the target's flux over the source's ({KERNEL_UNIT}); "
                f"1 where both share a photometric scale; {panels}. A pattern within an image: a flat-field or "
                "colour difference." + (reverse_note + ": their flux scale is the source's over the target's "
                                        f"({REVERSE_KERNEL_UNIT})." if any_reverse else ""),
        "background": f"Background offset of the target relative to the convolved source, per tile "
                      f"({TARGET_UNIT}): red above, blue below zero, on a scale symmetric about zero; {panels}."
                      + (reverse_note + ": theirs is the source's offset relative to the convolved target, in the "
                         "source's units." if any_reverse else ""),
        "residual": "RMS of each tile's fit residual over its robust standard deviation (ratio): about 1 where the "
                    "fit reaches the noise; above 3 the residual has heavy tails (the high_residual flag: "
                    f"outliers, or a kernel that does not fit); {panels}.",
        "flags": "Each tile coloured by its most severe problem flag (legend, most severe first); light blue: "
                 f"informational flags only ({info}: {_INFORMATION_WORDS}; not a problem); grey: no flag. "
                 "target_sharper (deep blue): the image the kernel is fitted to is the sharper of the pair, "
                 "against the image's direction (the kernel would sharpen; left out of the model). The % "
                 "in each title counts tiles with a problem flag. Right: how many tiles have each flag, per image; "
                 "(info) marks the informational flags.",
        "width-difference": "Which image of each pair is the sharper, per tile: FWHM(target)^2 - FWHM(source)^2 "
                            "(pixel^2, Gaussian-equivalent widths of the input pair, from the ratio of their power "
                            "spectra), on a diverging scale symmetric about 0: red, the target blurrier (the "
                            "forward direction, target = kernel * source + background); blue, the target sharper "
                            "(the reverse direction, source = kernel * target + background); white, nearly equal "
                            f"PSFs. Each panel is titled with the image's label and direction; {panels}; y up. "
                            "Crosses: tiles flagged target_sharper (sharper against the image's direction, left "
                            "out of its model); rings: nearly_equal (the kernel close to a delta). An image whose "
                            "field crosses 0 takes the direction of most of its tiles.",
        "model-fwhm": f"FWHM (pixel) of each image's kernel-field model (the smooth polynomial fitted to its "
                      f"tiles' kernels) on a {fine}x{fine} grid across the tile centres (dots), y up; {panels}. "
                      "Compare with the per-tile FWHM map: the model should follow it without its noise.",
        "model-ellipticity": f"Ellipticity |e| (dimensionless) of each image's kernel-field model on the "
                             f"{fine}x{fine} grid: colour, and sticks along the major axis with a reference "
                             f"stick in the lower right corner; {panels}.",
        "model-residual": "Tile minus model, per tile: top, the kernels' relative difference |tile - model| / "
                          "|model| (%); bottom, the FWHM of each tile's kernel minus the model's at its centre "
                          f"(pixel; red: the tile wider); {panels}. Large values: tiles the smooth model does not "
                          "describe (outliers, or a field needing a higher degree).",
        "stack": "Over every image of the stack: the model FWHM minus each image's median, median over the images "
                 "(pixel: the FWHM pattern that persists); the median model ellipticity (dimensionless, sticks "
                 "along the major axis, reference stick in the corner); the median tile-minus-model difference "
                 f"(%); the % of images in which each tile has a problem flag ({info} not counted)."
                 + (left_out.replace("in it", "in the model maps and the tile-minus-model median")
                    + " The flags count every image." if mixed else ""),
        "pca": "Principal components of the model kernel fields across the stack. Top: the mean kernel (per "
               f"kernel pixel, {pca_unit}) and each component's eigen-kernel (a unit-norm shape, red positive, "
               "blue negative), kernels y up. Bottom: the variance each component explains (%) and each "
               "component's spatial pattern (its weight across the field, dimensionless)." + left_out,
        "pca-amplitudes": f"Each image's amplitude on each principal component ({pca_unit}) against the first "
                          "numeric or time coordinate; red crosses: outlier images. A trend: the kernel field "
                          "changing with that coordinate." + left_out,
    }
    return text.get(stem, "")


def job_yaml(ds: xr.Dataset) -> str | None:
    """The job configuration of the run that made the kernel map (its ``kernelmap_config`` attribute, YAML
    or JSON) as YAML, to be read back with :func:`pipeline.job.config.job_from_dict` (storage option values
    are never stored: their keys hold a placeholder); ``None`` where the store has none."""
    stored = ds.attrs.get("kernelmap_config")
    if not stored:
        return None
    try:
        data = yaml.safe_load(stored) if isinstance(stored, str) else stored
    except yaml.YAMLError:
        data = None
    if not isinstance(data, dict):  # not a mapping: kept as it is
        text = str(stored)
        return text if text.endswith("\n") else text + "\n"
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)


def write_report(store: str | os.PathLike[str], out: str | os.PathLike[str] | None = None,
                 *, max_images: int = 8, rows: int = 100,
                 coordinates: str | os.PathLike[str] | pd.DataFrame | None = None,
                 storage_options: dict[str, Any] | None = None, overwrite: bool = False,
                 notify: Callable[[str], None] | None = None, stretch: str = "asinh",
                 scale: str = "shared") -> Path | str:
    """Write the figures, tables and ``index.html`` of a kernel-map store into a new folder; returns the
    index's path (a local ``Path``, or its URL where ``out`` is one).  A folder that exists (not empty) is
    refused, or with ``overwrite`` replaced where it holds a report (locally: the new report is written
    beside it and swapped in once complete, so an interrupted report leaves the earlier one whole).

    ``store`` and ``out`` are local paths or fsspec URLs (``s3://bucket/kernels.zarr``); ``out`` defaults
    to ``STORE.report`` beside a local store (give it for a URL).  ``storage_options``: the fsspec options
    of every URL among ``store``, ``out`` and ``coordinates`` (default: none, credentials from the
    environment); nothing of them is written.  ``max_images``
    images get per-image panels (:func:`panel_images`: the outliers first); the page shows ``rows``
    rows of the image table and every outlier up to ``rows`` (the rest in ``images.csv``,
    ``outliers.csv`` and the pages).  ``coordinates``: a
    table (CSV file or DataFrame) of per-image values with an ``image`` column of labels, added as
    coordinates along ``image`` to trend against (:func:`~pipeline.analysis.survey.with_coordinates`).
    Maps of a kernel map with a reference WCS have RA/Dec axes and a compass (astropy; without it pixel
    axes and a note on the page); ``tiles.csv`` gives each tile's place, on the sky too.  A store whose
    run has not finished is reported all the same, with a notice on the page (:func:`incomplete_notice`),
    which ``notify`` (e.g. ``print``), where given, is called with too.  ``stretch``: of the kernel mosaics
    (:data:`STRETCHES`, default ``asinh``); ``scale``: one colour scale across the images' panels
    (``shared``, the default) or one per image (``per-image``; :data:`SCALES`).  The job configuration of
    the run (the store's ``kernelmap_config``) is written as ``job.yaml`` and linked from the page; each
    figure has a caption (:func:`caption`).
    """
    _check_options(stretch, scale)
    check_int("max_images (--max-images)", max_images, 1)
    path = os.fspath(store)
    if out is None and "://" in path:
        raise InputError(f"{path} is a URL: give --out, a folder or URL prefix for the report")
    if storage_options is not None and not isinstance(storage_options, dict):
        raise OptionError(f"storage_options must be a mapping of fsspec options, not {type(storage_options).__name__}")
    folder = _Folder(out if out is not None else path.rstrip("/") + ".report", storage_options)
    if not folder.remote and (path_within(folder.root, path) or path_within(path, folder.root)):
        raise OptionError(f"--out {folder.out} is, holds or lies inside the kernel map ({path}), which is never "
                          "written: nothing was changed; give another --out")
    remote = "://" in path and not path.startswith("file://")
    ds = read_kernel_map(path, lazy=("kernel",),  # the kernels of the panel images only are read
                         storage_options=storage_options if remote else None)
    if coordinates is not None:
        if isinstance(coordinates, (str, os.PathLike)) and "://" in os.fspath(coordinates):
            coordinates = _read_csv_url(os.fspath(coordinates), storage_options)
        ds = with_coordinates(ds, coordinates)
    if folder.claim(overwrite):  # the earlier report is kept whole until the new one is complete
        final, folder = folder, _Folder(new_sibling(folder.root))
        try:
            _write(folder, ds, path, max_images=max_images, rows=rows, notify=notify, stretch=stretch, scale=scale)
        except BaseException:
            discard(folder.root)
            raise
        swap_into_place(folder.root, final.root)
        return final.path("index.html")
    _write(folder, ds, path, max_images=max_images, rows=rows, notify=notify, stretch=stretch, scale=scale)
    return folder.path("index.html")


def _write(folder: _Folder, ds: xr.Dataset, path: str, *, max_images: int, rows: int,
           notify: Callable[[str], None] | None, stretch: str, scale: str) -> None:
    """Write the report of the kernel map ``ds`` (read from ``path``) into ``folder``."""
    folder.make()
    plt = _pyplot()
    result = survey(ds)
    notice = incomplete_notice(ds, result)
    if notice is not None and notify is not None:
        notify(f"{path}: {notice}")
    sky = sky_of(ds)
    with plt.rc_context({"figure.max_open_warning": 0}):  # the report's figures are made, then saved and closed
        figs = figures(ds, max_images=max_images, result=result, sky=sky, stretch=stretch, scale=scale)
        for stem, fig in figs.items():
            with folder.open(f"{stem}.png") as f:
                fig.savefig(f, format="png", dpi=100)
            plt.close(fig)
    tables = write_tables(result, folder, ds)
    job = job_yaml(ds)
    if job is not None:
        folder.write_text("job.yaml", job)
    table, n = result.table, ds.sizes["image"]
    pages = _write_pages(table, folder, ds) if n > rows else []
    status = ds.attrs.get("kernelmap_status", "unknown")
    outliers = result.outliers
    shown = panel_images(outliers, n, max_images)
    flagged = sorted(set(shown) & set(int(i) for i in outliers["index"]))
    labels = [str(v) for v in ds["image"].values]
    shown_html = (f"per-image figures show {len(shown)} of {n} images"
                  + (f", the outliers among them ({html.escape(', '.join(labels[i] for i in flagged))})"
                     if flagged else "") + "; ")
    links = ", ".join(f'<a href="{name}">{name}</a>' for name in tables if name != "tiles.csv")
    coords = ", ".join(f"{c.name} ({c.kind})" for c in result.coordinates)
    skipped = "".join(f"; not {html.escape(k)}: {html.escape(v)}" for k, v in result.skipped.items())
    sky_html = ("maps in RA/Dec (the reference WCS; N, E arrows: the sky's directions)" if sky.on else
                f"maps in input pixels ({html.escape(sky.note)})" if sky.note else "maps in input pixels")
    sky_html += ("; each tile's place" + (", on the sky too," if "ra" in ds.coords else "") +
                 " and its medians over the images in <a href='tiles.csv'>tiles.csv</a>")
    out_html = (f"<p>{len(outliers)} outlier finding(s) in {int(table['outlier'].sum())} image(s): more than "
                f"{result.threshold:g} robust standard deviations from the trend of "
                f"{', '.join(TREND_QUANTITIES)} against {html.escape(coords)} (see "
                "<code>pipeline.analysis.survey</code> for the rule).</p>")
    if len(outliers):
        out_html += _html_table(outliers.head(rows), _table_formats(outliers))
        if len(outliers) > rows:
            out_html += f"<p>The first {rows} by deviation; all in <a href='outliers.csv'>outliers.csv</a>.</p>"
    missing = result.without_model
    model_html = "" if not missing else (
        f"<p>{len(missing)} image(s) without a kernel-field model, left out of the principal components: "
        f"{html.escape(', '.join(missing[:50]))}{' ...' if len(missing) > 50 else ''}</p>")
    other = result.other_direction
    if other:
        model_html += (f"<p>{len(other)} {DIRECTION_NAMES[-result.direction]} image(s) left out of the principal "
                       f"components, which are of the {DIRECTION_NAMES[result.direction]} images (their kernels "
                       f"blur the other image of the pair): {html.escape(', '.join(other[:50]))}"
                       f"{' ...' if len(other) > 50 else ''}</p>")
    table_note = (f"<p>The first {rows} of {n} images; all in {links} and the pages "
                  + " ".join(f'<a href="{name}">{p + 1}</a>' for p, name in enumerate(pages)) + ".</p>"
                  if pages else f"<p>Also as {links}.</p>")
    sections = "".join(
        f'<h2>{html.escape(_title(stem, ds))}</h2><figure><img src="{stem}.png" alt="{html.escape(stem)}">'
        f"<figcaption>{html.escape(caption(stem, ds, result, stretch=stretch, scale=scale, sky=sky))}"
        "</figcaption></figure>" for stem in figs)
    problem = fl.problems(np.asarray(ds["quality_flag"].values))
    info = ", ".join(f.name for f in fl.FLAGS if f.kind == fl.INFORMATION)
    flag_html = (f"<p>Tiles flagged: {int(problem.sum())} of {problem.size} ({_percent(problem.mean())} %) have a "
                 f"problem flag; the informational flags ({html.escape(info)}: {_INFORMATION_WORDS}) are not "
                 "counted as flagged.</p>")
    flag_html += _direction_html(ds, result)
    job_html = ("<p>Job configuration: <a href='job.yaml'>job.yaml</a> (every setting of the run that made this "
                "kernel map; storage option values are not kept).</p>" if job is not None else
                "<p>Job configuration: none in the store (no kernelmap_config attribute).</p>")
    figure_note = (f"Figures: maps and kernels drawn y up; kernel mosaics: {html.escape(stretch)} stretch; "
                   + ("one colour scale shared by the images' panels." if scale == "shared"
                      else "a colour scale per image."))
    folder.write_text("index.html", _page(
        "kernelmap report",
        f"<h1>kernelmap report: {html.escape(str(path))}</h1>"
        f"<p>{n} image(s), {ds.sizes['y']}x{ds.sizes['x']} tiles of "
        f"{html.escape(str(ds.attrs.get('tile_size', '?')))} px, kernels {ds.sizes['ky']}x{ds.sizes['kx']}, "
        f"method {html.escape(str(ds.attrs.get('kernelmap_method', '?')))}, store {html.escape(status)}; "
        f"{shown_html}trends against {html.escape(coords)}{skipped}; {sky_html}.</p>"
        f"{job_html}{flag_html}<p>{figure_note}</p>"
        + (f"<p class='notice'><strong>Note:</strong> {html.escape(notice)}.</p>" if notice else "") +
        f"<h2>Outliers</h2>{out_html}{model_html}"
        f"<h2>Images</h2>{table_note}"
        f"{_html_table(table.head(rows), _table_formats(table, ds))}{sections}"))


def _direction_html(ds: xr.Dataset, result: Survey) -> str:
    """The page's paragraph on the images' directions: how many of each, which are reverse, the tiles whose
    kernel sharpens or whose PSFs are nearly equal, and what the stack-wide figures are over."""
    directions = image_directions(ds)
    counts = {name: int(np.count_nonzero(directions == value)) for value, name in DIRECTION_NAMES.items()}
    flags = np.asarray(ds["quality_flag"].values).astype(np.int64)
    reverse = [_label(ds, int(i)) for i in np.flatnonzero(directions == REVERSE)]
    text = (f"<p>Directions: {counts['forward']} forward image(s) (target = kernel * source + background), "
            f"{counts['reverse']} reverse (the target the sharper: source = kernel * target + background, flux "
            "source/target, background in source units)"
            + (f": {html.escape(', '.join(reverse[:50]))}{' ...' if len(reverse) > 50 else ''}" if reverse else "")
            + (f"; {counts['undecided']} not decided yet" if counts["undecided"] else "")
            + f". Tiles target_sharper (the kernel would sharpen; a problem): "
            f"{int(np.count_nonzero(flags & fl.TARGET_SHARPER))}; nearly_equal (information): "
            f"{int(np.count_nonzero(flags & fl.NEARLY_EQUAL))}.")
    if _mixed(result):
        text += (f" The principal components, the model maps over the stack and the medians of tiles.csv are of "
                 f"the {DIRECTION_NAMES[result.direction]} images, the majority; trends and outliers are found "
                 "within each direction.")
    return text + "</p>"


def _read_csv_url(url: str, storage_options: dict[str, Any] | None) -> pd.DataFrame:
    """A CSV table at an fsspec URL."""
    try:
        return pd.read_csv(url, storage_options=storage_options)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read {url} as a CSV table ({exc}): give a CSV file with an 'image' column") from exc


def _title(stem: str, ds: xr.Dataset | None = None) -> str:
    """A figure's heading on the page; the kernel mosaics' name their image by its label."""
    if stem in FIGURES:
        return FIGURES[stem]
    if stem.startswith("kernels-") and ds is not None:
        return f"Kernels across the field, {_panel_title(ds, int(stem.split('-', 1)[1]))}"
    if stem.startswith("trends-"):
        return f"Trends against {stem[len('trends-'):]}"
    return stem.replace("-", " ")
