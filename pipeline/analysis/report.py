"""Figures of a kernel map: ``kernelmap report STORE --out DIR``.

PNG figures (matplotlib, non-interactive), a per-image table (``images.csv``;
also ``images.parquet`` when pyarrow is installed), the outliers
(``outliers.csv``), a per-tile table over the stack (``tiles.csv``: each
tile's centre, on the sky too where the kernel map has a reference WCS, and
its medians over the images) and an ``index.html`` showing them, in a local
folder or under an fsspec URL prefix (``s3://bucket/report``; the kernel map
may be at a URL too).  Every map of a stack shares one colour scale across its
images.  Maps are drawn in input pixel coordinates; where the kernel map has
a reference WCS (and astropy is installed) on astropy's WCSAxes, with RA/Dec
axes and N/E arrows (:mod:`pipeline.analysis.sky`).  Figures, by file name:

- per image, for ``max_images`` images (:func:`panel_images`: the outliers,
  most deviant first, then the first images):
  ``kernels-<i>.png`` (the kernels across the field of image ``i``);
  ``fwhm.png``, ``ellipticity.png`` (whiskers: length ``|e|``, along the
  major axis), ``flux.png``, ``background.png``, ``residual.png``,
  ``flags.png``: per-tile maps, one panel per image;
  ``model-fwhm.png``, ``model-ellipticity.png``: the kernel-field model's
  FWHM and ellipticity on a fine grid (``fine`` x ``fine`` model kernels);
  ``model-residual.png``: tile minus model, per tile (the kernels' relative
  difference and the FWHM difference);
- over the whole stack (aggregates, whatever the number of images):
  ``trends-<coordinate>.png``: each per-image summary against each image
  coordinate (:mod:`pipeline.analysis.survey`), outliers marked;
  ``stack.png``: maps of the typical model FWHM pattern and ellipticity, the
  median tile-minus-model difference and how often each tile is flagged;
  ``pca.png``, ``pca-amplitudes.png``: the principal components of the model
  kernel fields (:mod:`pipeline.analysis.pca`): eigen-kernels, explained
  variance, spatial patterns and each image's amplitudes.

The HTML page lists the outliers and the first ``rows`` images; with more,
the whole table is in ``images.csv`` and in pages ``images-<page>.html``.
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

from .. import flags as fl
from ..core.moments import adaptive_moments
from ..errors import InputError, OptionError
from .maps import map_extent, model_kernels_at, read_kernel_map
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

__all__ = ["FIGURES", "figures", "incomplete_notice", "write_report", "write_tables"]

#: File stem -> title of every figure but the per-image kernel mosaics and the trends.
FIGURES = {
    "fwhm": "Kernel FWHM",
    "ellipticity": "Kernel ellipticity (whiskers along the major axis)",
    "flux": "Flux scale (kernel sum)",
    "background": "Background offset",
    "residual": "Fit residual / noise",
    "flags": "Quality flags",
    "model-fwhm": "Model FWHM",
    "model-ellipticity": "Model ellipticity (whiskers along the major axis)",
    "model-residual": "Tile minus model, per tile",
    "stack": "Across the stack",
    "pca": "Principal components of the kernel field",
    "pca-amplitudes": "Principal-component amplitude per image",
}

#: Images per page of the HTML table.
PAGE_ROWS = 1000


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
    """A map of per-tile values, each drawn over its tile's cell, y downwards as in an image."""
    ye, xe = _edges(ds)
    im = ax.pcolormesh(xe, ye, values, shading="flat", **style)
    _frame(ax, ds, sky, fontsize)
    return im


def _frame(ax, ds: xr.Dataset, sky: Sky = PIXELS, fontsize: float | None = None) -> None:
    """A map's limits (the tiles' cells, y downwards), aspect and axes: RA/Dec and a compass on WCSAxes."""
    ye, xe = _edges(ds)
    ax.set_xlim(xe[0], xe[-1])
    ax.set_ylim(ye[-1], ye[0])
    ax.set_aspect("equal")
    label_axes(ax, sky, fontsize=fontsize)


def _label(ds: xr.Dataset, i: int) -> str:
    return f"image {ds['image'].values[i]}"


def _map_figure(plt, ds: xr.Dataset, name: str, images: list[int], title: str, cmap: str = "viridis",
                symmetric: bool = False, sky: Sky = PIXELS):
    values = np.asarray(ds[name].values[images], dtype=np.float64)
    finite = values[np.isfinite(values)]
    lo, hi = (np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0))
    if symmetric:
        lim = max(abs(lo), abs(hi)) or 1.0
        lo, hi = -lim, lim
    if hi <= lo:
        hi = lo + 1e-12
    units = ds[name].attrs.get("units", "")
    fig, axes = _panels(plt, len(images), title, sky=sky)
    for ax, i, v in zip(axes, images, values):
        im = _cells(ax, ds, v, sky, vmin=lo, vmax=hi, cmap=cmap)
        ax.set_title(_label(ds, i))
    fig.colorbar(im, ax=list(axes), label=f"{name} ({units})" if units else name, shrink=0.8)
    return fig


def _whisker_figure(plt, ds: xr.Dataset, images: list[int], sky: Sky = PIXELS):
    fig, axes = _panels(plt, len(images), FIGURES["ellipticity"], sky=sky)
    yy, xx = np.meshgrid(ds["y"].values, ds["x"].values, indexing="ij")
    # the tiles' step (the last tiles, set against the image edge, may lie closer)
    spacing = float(ds.attrs.get("tile_step", 0)) or (
        float(np.median(np.diff(ds["x"].values))) if ds.sizes["x"] > 1 else float(ds.attrs.get("tile_size", 1)))
    e_all = np.asarray(ds["ellipticity"].values[images], dtype=np.float64)
    e_max = float(np.nanmax(e_all)) if np.isfinite(e_all).any() else 1.0
    scale = 0.9 * spacing / max(e_max, 1e-6)  # the longest stick spans 90 % of a tile
    for ax, i in zip(axes, images):
        e = np.asarray(ds["ellipticity"].values[i], dtype=np.float64)
        angle = np.radians(np.asarray(ds["position_angle"].values[i], dtype=np.float64))
        u, v = e * np.cos(angle) * scale, e * np.sin(angle) * scale
        ax.quiver(xx, yy, u, v, angles="xy", scale_units="xy", scale=1, headwidth=0, headlength=0,
                  headaxislength=0, pivot="middle", color="k", width=0.006)
        _frame(ax, ds, sky)
        ax.set_title(_label(ds, i))
    fig.suptitle(f"{FIGURES['ellipticity']}; a stick one tile wide is |e| = {spacing / scale:.3g}")
    return fig


def _flag_figure(plt, ds: xr.Dataset, images: list[int], sky: Sky = PIXELS):
    flags = np.asarray(ds["quality_flag"].values[images]).astype(np.int64)
    fig, axes = _panels(plt, len(images) + 1, FIGURES["flags"], sky=sky, maps=len(images))
    n_bits = len(fl.FLAGS)
    for ax, i, f in zip(axes, images, flags):
        count = sum(((f & flag.mask) != 0).astype(int) for flag in fl.FLAGS)
        im = _cells(ax, ds, count, sky, vmin=0, vmax=n_bits, cmap="magma_r")
        unusable = (f & fl.BAD) != 0
        if unusable.any():
            yy, xx = np.meshgrid(ds["y"].values, ds["x"].values, indexing="ij")
            ax.plot(xx[unusable], yy[unusable], "x", color="tab:cyan", ms=8, label="unusable")
            ax.legend(loc="lower right", fontsize=7)
        ax.set_title(_label(ds, i))
    fig.colorbar(im, ax=list(axes[:-1]), label="number of flags set", shrink=0.8)
    bars = axes[-1]
    width = 0.8 / len(images)
    for j, (i, f) in enumerate(zip(images, flags)):
        counts = [np.count_nonzero(f & flag.mask) for flag in fl.FLAGS]
        bars.barh(np.arange(n_bits) + j * width, counts, height=width, label=str(ds["image"].values[i]))
    bars.set_yticks(np.arange(n_bits) + 0.4 - width / 2, [flag.name.replace("_", " ") for flag in fl.FLAGS],
                    fontsize=7)
    bars.invert_yaxis()
    bars.set_xlabel("tiles")
    bars.set_title("tiles with each flag")
    bars.legend(fontsize=6)
    return fig


def _kernel_mosaic(plt, ds: xr.Dataset, i: int, lo: float, hi: float, sky: Sky = PIXELS):
    kern = np.asarray(ds["kernel"][i].values, dtype=np.float64)
    ty, tx, k, _ = kern.shape
    gap = 1
    mosaic = np.full((ty * (k + gap), tx * (k + gap)), np.nan)
    for r in range(ty):
        for c in range(tx):
            mosaic[r * (k + gap): r * (k + gap) + k, c * (k + gap): c * (k + gap) + k] = kern[r, c]
    fig, ax = plt.subplots(figsize=(7, 7 * ty / max(tx, 1) + 0.6), constrained_layout=True)
    im = ax.imshow(mosaic, vmin=lo, vmax=hi, cmap="inferno", interpolation="nearest")
    ax.set_title(f"Kernels across the field, {_label(ds, i)}")
    ax.set_xticks([c * (k + gap) + k // 2 for c in range(tx)], [f"{v:.0f}" for v in ds["x"].values],
                  rotation=90, fontsize=7)
    ax.set_yticks([r * (k + gap) + k // 2 for r in range(ty)], [f"{v:.0f}" for v in ds["y"].values], fontsize=7)
    ax.set_xlabel("tile centre x (pixel)")
    ax.set_ylabel("tile centre y (pixel)")
    if sky.on:  # the mosaic lies as the image does: a compass of the image's middle, stretched as the mosaic is
        y0, y1, x0, x1 = map_extent(ds)
        steps = [float(np.median(np.diff(ds[d].values))) if ds.sizes[d] > 1 else float(k + gap) for d in ("y", "x")]
        draw_compass(ax, sky, at=((y0 + y1) / 2, (x0 + x1) / 2), stretch=tuple((k + gap) / s for s in steps))
        ax.set_title(f"Kernels across the field, {_label(ds, i)} (N, E: the sky's directions)")
    fig.colorbar(im, ax=ax, label="kernel value", shrink=0.8)
    return fig


def _scatter_size(n: int) -> float:
    return 14.0 if n <= 100 else (6.0 if n <= 2000 else 2.0)


#: Colours of up to 10 groups (red marks outliers).
_GROUP_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:gray",
                  "tab:olive", "tab:cyan", "navy")


def _trend_figure(plt, result: Survey, coord: Coordinate):
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
        ax.set_ylabel(TREND_QUANTITIES[name].label, fontsize=8)
    if coord.kind == "categorical":
        axes[-1].set_xticks(np.arange(len(coord.groups)), coord.groups, rotation=45 if len(coord.groups) > 6 else 0,
                            fontsize=7)
    axes[-1].set_xlabel(coord.name + (" (position in the stack)" if coord.name == "index" else ""))
    return fig


def _pca_figure(plt, result: Survey, extent: list[float], sky: Sky = PIXELS):
    pca = result.pca
    m = pca.n_components
    fig, axes = _grid(plt, 2, m + 1, (2.6 * (m + 1) + 0.6, 5.8), sky, spatial=lambda r, c: r == 1 and c > 0)
    k = pca.mean.shape[-1]
    mean_kernel = pca.mean.reshape(-1, k, k).mean(axis=0)
    norm = {"kernel": "each kernel divided by its sum", "image": "each image's kernels divided by their mean sum",
            None: "kernels as stored"}[pca.normalize]
    fig.suptitle(f"{FIGURES['pca']}: {len(result.pca_images)} images with a model, their models' kernels on a "
                 f"{len(result.grid_y)}x{len(result.grid_x)} grid ({norm})")
    axes[0, 0].imshow(mean_kernel, cmap="inferno", interpolation="nearest")
    axes[0, 0].set_title("mean kernel (over the grid)", fontsize=9)
    for j in range(m):
        eig = pca.eigen_kernels[j]
        lim = float(np.abs(eig).max()) or 1.0
        axes[0, j + 1].imshow(eig, cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
        axes[0, j + 1].set_title(f"PC{j + 1}: {100 * pca.explained_fraction[j]:.1f} % of the variance", fontsize=9)
        pattern = pca.patterns[j]
        plim = float(np.abs(pattern).max()) or 1.0
        im = axes[1, j + 1].imshow(pattern, extent=extent, cmap="RdBu_r", vmin=-plim, vmax=plim,
                                   interpolation="nearest")
        axes[1, j + 1].set_title(f"PC{j + 1} spatial pattern ({100 * pca.separability[j]:.0f} % separable)",
                                 fontsize=8)
        label_axes(axes[1, j + 1], sky, fontsize=8)
        fig.colorbar(im, ax=axes[1, j + 1], shrink=0.7)
    for ax in axes[0]:
        ax.set_xticks([])
        ax.set_yticks([])
    scree = axes[1, 0]
    index = np.arange(1, m + 1)
    scree.bar(index, 100 * pca.explained_fraction, color="tab:blue")
    scree.plot(index, 100 * np.cumsum(pca.explained_fraction), "o-", color="k", label="cumulative")
    scree.set_xticks(index)
    scree.set_xlabel("component")
    scree.set_ylabel("% of the variance")
    scree.set_ylim(0, 105)
    scree.legend(fontsize=7)
    return fig


def _primary(result: Survey) -> Coordinate:
    return next(c for c in result.coordinates if c.kind in ("numeric", "time"))


def _amplitude_figure(plt, result: Survey):
    pca = result.pca
    coord = _primary(result)
    m = pca.n_components
    fig, axes = plt.subplots(m, 1, figsize=(8, 1.8 * m + 0.8), sharex=True, constrained_layout=True, squeeze=False)
    fig.suptitle(f"{FIGURES['pca-amplitudes']} against {coord.name} (red: outlier images)")
    x = np.asarray(coord.values)[result.pca_images]
    outlier = result.table["outlier"].to_numpy()[result.pca_images]
    n = len(result.pca_images)
    for j, ax in enumerate(axes.ravel()):
        amp = pca.amplitudes[:, j]
        ax.scatter(x, amp, s=_scatter_size(n), alpha=0.6, linewidths=0, rasterized=True)
        if outlier.any():
            ax.scatter(x[outlier], amp[outlier], s=max(_scatter_size(n) * 3, 20), color="tab:red", marker="x")
        ax.axhline(0.0, color="k", lw=0.6)
        ax.set_ylabel(f"PC{j + 1} ({100 * pca.explained_fraction[j]:.1f} %)", fontsize=8)
    axes[-1, 0].set_xlabel(coord.name)
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
    dy, dx = (gy[1] - gy[0]) if len(gy) > 1 else 1.0, (gx[1] - gx[0]) if len(gx) > 1 else 1.0
    return [gx[0] - dx / 2, gx[-1] + dx / 2, gy[-1] + dy / 2, gy[0] - dy / 2]


def _limits(values: np.ndarray, symmetric: bool = False) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    lo, hi = (np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0))
    if symmetric:
        lim = max(abs(lo), abs(hi)) or 1.0
        lo, hi = -lim, lim
    return float(lo), float(hi if hi > lo else lo + 1e-12)


def _model_map_figure(plt, ds: xr.Dataset, images: list[int], shapes: dict[str, np.ndarray], name: str,
                      sky: Sky = PIXELS):
    fine = shapes["fwhm"].shape[-1]
    title = FIGURES[f"model-{name}"]
    fig, axes = _panels(plt, len(images), f"{title} ({fine}x{fine} positions across the tile centres)", sky=sky)
    values = shapes[name]
    lo, hi = _limits(values)
    extent = _fine_extent(shapes["y"], shapes["x"])
    yy, xx = np.meshgrid(ds["y"].values, ds["x"].values, indexing="ij")
    step = max(fine // 8, 1)
    for ax, i, v, ang in zip(axes, images, values, shapes["angle"]):
        im = ax.imshow(v, extent=extent, vmin=lo, vmax=hi, cmap="viridis" if name == "fwhm" else "plasma",
                       interpolation="nearest")
        if name == "ellipticity" and np.isfinite(v).any():
            sub = (slice(step // 2, None, step),) * 2
            fy, fx = np.meshgrid(shapes["y"], shapes["x"], indexing="ij")
            spacing = (shapes["x"][-1] - shapes["x"][0]) / max(fine - 1, 1) * step
            scale = 0.9 * spacing / max(hi, 1e-6)
            ax.quiver(fx[sub], fy[sub], (v * np.cos(ang) * scale)[sub], (v * np.sin(ang) * scale)[sub],
                      angles="xy", scale_units="xy", scale=1, headwidth=0, headlength=0, headaxislength=0,
                      pivot="middle", color="w", width=0.005)
        ax.plot(xx.ravel(), yy.ravel(), ".", color="k", ms=2)
        ax.set_title(_label(ds, i) + ("" if np.isfinite(v).any() else " (no model)"))
        label_axes(ax, sky)
    units = "pixel" if name == "fwhm" else "1"
    fig.colorbar(im, ax=list(axes), label=f"model {name} ({units}); dots: tile centres", shrink=0.8)
    return fig


def _residual_figure(plt, ds: xr.Dataset, images: list[int], sky: Sky = PIXELS):
    """Tile minus model: the kernels' relative L2 difference and the FWHM difference, per tile."""
    yy, xx = np.meshgrid(ds["y"].values, ds["x"].values, indexing="ij")
    model = model_kernels_at(ds, yy, xx, images)
    model_fwhm = np.asarray(adaptive_moments(model.reshape(-1, *model.shape[-2:])).fwhm).reshape(
        len(images), *yy.shape)
    d_fwhm = np.asarray(ds["fwhm"].values[images], dtype=np.float64) - model_fwhm
    rel = (np.asarray(ds["model_residual"].values[images], dtype=np.float64) if "model_residual" in ds
           else np.full(d_fwhm.shape, np.nan))
    cols = len(images)
    fig, axes = _grid(plt, 2, cols, (3.0 * cols + 1.4, 6.2), sky)
    fig.suptitle(FIGURES["model-residual"])
    for row, (values, label, cmap, symmetric) in enumerate((
            (rel, "|tile - model| / |model|", "magma", False),
            (d_fwhm, "FWHM tile - model (pixel)", "RdBu_r", True))):
        lo, hi = _limits(values, symmetric)
        if not symmetric:
            lo = 0.0
        for ax, i, v in zip(axes[row], images, values):
            im = _cells(ax, ds, v, sky, 8, vmin=lo, vmax=hi, cmap=cmap)
            ax.set_title(_label(ds, i) + ("" if np.isfinite(v).any() else " (no model)"), fontsize=9)
        fig.colorbar(im, ax=list(axes[row]), label=label, shrink=0.8)
    return fig


def _stack_figure(plt, ds: xr.Dataset, result: Survey, sky: Sky = PIXELS):
    """Maps aggregated over every image of the stack."""
    n = ds.sizes["image"]
    fig, axes = _grid(plt, 2, 2, (10, 8.6), sky)
    fig.suptitle(f"{FIGURES['stack']}: {n} images")
    grid_extent = _fine_extent(result.grid_y, result.grid_x)
    fwhm = result.model_fwhm - _quiet(np.nanmedian, result.model_fwhm.reshape(n, -1), axis=1)[:, None, None]
    typical = _quiet(np.nanmedian, fwhm, axis=0)
    lo, hi = _limits(typical, symmetric=True)
    ax = axes[0, 0]
    im = ax.imshow(typical, extent=grid_extent, cmap="RdBu_r", vmin=lo, vmax=hi, interpolation="nearest")
    fig.colorbar(im, ax=ax, label="pixel", shrink=0.8)
    ax.set_title("model FWHM - the image's median, median over images", fontsize=9)
    e1, e2 = _quiet(np.nanmedian, result.model_e1, axis=0), _quiet(np.nanmedian, result.model_e2, axis=0)
    e, angle = np.hypot(e1, e2), 0.5 * np.arctan2(e2, e1)
    ax = axes[0, 1]
    im = ax.imshow(e, extent=grid_extent, cmap="plasma", interpolation="nearest")
    fy, fx = np.meshgrid(result.grid_y, result.grid_x, indexing="ij")
    spacing = (result.grid_x[-1] - result.grid_x[0]) / max(len(result.grid_x) - 1, 1)
    emax = float(np.nanmax(e)) if np.isfinite(e).any() else 1.0
    scale = 0.9 * spacing / max(emax, 1e-6)
    ax.quiver(fx, fy, e * np.cos(angle) * scale, e * np.sin(angle) * scale, angles="xy", scale_units="xy", scale=1,
              headwidth=0, headlength=0, headaxislength=0, pivot="middle", color="w", width=0.008)
    fig.colorbar(im, ax=ax, label="|median e|", shrink=0.8)
    ax.set_title("model ellipticity: median e1, e2 over images (sticks along the major axis)", fontsize=9)
    ax = axes[1, 0]
    if "model_residual" in ds:
        resid = _quiet(np.nanmedian, np.asarray(ds["model_residual"].values, dtype=np.float64), axis=0)
        im = _cells(ax, ds, resid, sky, 8, cmap="magma", vmin=0)
        fig.colorbar(im, ax=ax, label="|tile - model| / |model|", shrink=0.8)
    ax.set_title("tile minus model: median over images", fontsize=9)
    ax = axes[1, 1]
    flags = np.asarray(ds["quality_flag"].values).astype(np.int64)
    flagged = np.mean(flags != 0, axis=0)
    im = _cells(ax, ds, 100 * flagged, sky, 8, cmap="magma_r", vmin=0, vmax=100)
    fig.colorbar(im, ax=ax, label="% of images", shrink=0.8)
    ax.set_title("tiles with any quality flag: % of images", fontsize=9)
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
            sky: Sky | None = None) -> dict[str, Any]:
    """Every figure by file stem (matplotlib Figures, not yet saved); ``result``: the stack's
    :func:`~pipeline.analysis.survey.survey` (computed when not given).  Per-image figures show
    :func:`panel_images`.  ``sky``: the maps' sky (:func:`~pipeline.analysis.sky.sky_of` of ``ds`` when not
    given): with a WCS every map is drawn on astropy's WCSAxes, RA/Dec on its axes and a compass; else
    in pixels."""
    plt = _pyplot()
    result = survey(ds) if result is None else result
    sky = sky_of(ds) if sky is None else sky
    images = panel_images(result.outliers, ds.sizes["image"], max_images)
    kern = np.asarray(ds["kernel"].isel(image=images).values, dtype=np.float64)
    finite = kern[np.isfinite(kern)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    out: dict[str, Any] = {f"kernels-{i}": _kernel_mosaic(plt, ds, i, lo, hi, sky) for i in images}
    out["fwhm"] = _map_figure(plt, ds, "fwhm", images, FIGURES["fwhm"], sky=sky)
    out["ellipticity"] = _whisker_figure(plt, ds, images, sky)
    out["flux"] = _map_figure(plt, ds, "flux", images, FIGURES["flux"], cmap="cividis", sky=sky)
    out["background"] = _map_figure(plt, ds, "background", images, FIGURES["background"], cmap="RdBu_r",
                                    symmetric=True, sky=sky)
    out["residual"] = _map_figure(plt, ds, "residual", images, FIGURES["residual"], cmap="magma", sky=sky)
    out["flags"] = _flag_figure(plt, ds, images, sky)
    if has_model_variables(ds):
        shapes = _model_shapes(ds, images, fine)
        out["model-fwhm"] = _model_map_figure(plt, ds, images, shapes, "fwhm", sky)
        out["model-ellipticity"] = _model_map_figure(plt, ds, images, shapes, "ellipticity", sky)
        out["model-residual"] = _residual_figure(plt, ds, images, sky)
    out["stack"] = _stack_figure(plt, ds, result, sky)
    for coord in result.coordinates:
        out[coordinate_file_stem(coord)] = _trend_figure(plt, result, coord)
    if result.pca is not None:
        out["pca"] = _pca_figure(plt, result, _fine_extent(result.grid_y, result.grid_x), sky)
        out["pca-amplitudes"] = _amplitude_figure(plt, result)
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
    "fwhm_median": "median over the images of the tile's kernel FWHM (pixel)",
    "ellipticity_median": "median over the images of the tile's kernel |e|",
    "flux_median": "median over the images of the tile's flux scale",
    "background_median": "median over the images of the tile's background offset",
    "residual_median": "median over the images of the tile's fit residual / noise",
    "snr_median": "median over the images of the tile's signal-to-noise",
    "model_residual_median": "median over the images of |tile - model| / |model|",
    "flagged_fraction": "fraction of the images in which the tile has any quality flag",
    "unusable_fraction": "fraction of the images in which the tile has no kernel (no data, no signal)",
}


def tile_table(ds: xr.Dataset) -> pd.DataFrame:
    """One row per tile, raster order: its place (``ty``, ``tx``, centre ``y``, ``x`` and, where the kernel
    map has them, ``ra``, ``dec``), the medians over the stack's images of its measurements and how often
    it is flagged (:data:`TILE_COLUMNS`).  Reads no kernels."""
    ny, nx = ds.sizes["y"], ds.sizes["x"]
    ty, tx = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
    yy, xx = np.meshgrid(np.asarray(ds["y"].values, np.float64), np.asarray(ds["x"].values, np.float64),
                         indexing="ij")
    data: dict[str, Any] = {"ty": ty.ravel(), "tx": tx.ravel(), "y": yy.ravel(), "x": xx.ravel()}
    for name in ("ra", "dec"):
        if name in ds.coords and ds[name].dims == ("y", "x"):
            data[name] = np.asarray(ds[name].values, np.float64).ravel()
    data["images"] = np.full(ny * nx, ds.sizes["image"])
    for name in ("fwhm", "ellipticity", "flux", "background", "residual", "snr", "model_residual"):
        if name in ds and ds[name].dims == ("image", "y", "x"):
            values = np.asarray(ds[name].values, np.float64).reshape(ds.sizes["image"], -1)
            data[f"{name}_median"] = _quiet(np.nanmedian, values, axis=0)
    flags = np.asarray(ds["quality_flag"].values).astype(np.int64).reshape(ds.sizes["image"], -1)
    data["flagged_fraction"] = np.mean(flags != 0, axis=0)
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

    def claim(self, overwrite: bool) -> None:
        """Make the folder ready for a new report: refused where something is there, unless ``overwrite``
        and it is a report (its ``index.html`` says so), which is then removed whole (no stale pages)."""
        root = self.root.rstrip("/")
        if not self.fs.exists(root) or (self.fs.isdir(root) and not self.fs.ls(root)):
            return
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
        self.fs.rm(root, recursive=True)

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


def _cell(value: Any) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "<td>yes</td>" if value else "<td></td>"
    if isinstance(value, (float, np.floating)):
        return "<td></td>" if not np.isfinite(value) else f"<td>{value:.4g}</td>"
    return f"<td>{html.escape(str(value))}</td>"


def _html_table(frame: pd.DataFrame) -> str:
    head = "".join(f'<th title="{html.escape(COLUMNS.get(str(c), str(c)))}">{html.escape(str(c))}</th>'
                   for c in frame.columns)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in frame.itertuples(index=False))
    return f"<table><tr>{head}</tr>{body}</table>"


_STYLE = ("<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:85%}"
          "td,th{border:1px solid #999;padding:2px 6px;text-align:right}img{max-width:100%}</style>")


#: In the head of every page of a report: what ``--overwrite`` looks for before it replaces a folder.
GENERATOR = "<meta name='generator' content='kernelmap report'>"


def _page(title: str, body: str) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'>{GENERATOR}<title>{html.escape(title)}</title>"
            f"{_STYLE}</head><body>{body}</body></html>\n")


def _write_pages(table: pd.DataFrame, folder: _Folder) -> list[str]:
    """``images-<page>.html`` of :data:`PAGE_ROWS` rows each, linked to one another; their names."""
    names = [f"images-{p + 1:03d}.html" for p in range(-(-len(table) // PAGE_ROWS))]
    nav = " ".join(f'<a href="{name}">{p + 1}</a>' for p, name in enumerate(names))
    for p, name in enumerate(names):
        part = table.iloc[p * PAGE_ROWS: (p + 1) * PAGE_ROWS]
        folder.write_text(name, _page(
            f"kernelmap images, page {p + 1}",
            f"<p><a href='index.html'>report</a> | pages: {nav} | all: <a href='images.csv'>images.csv</a></p>"
            f"<h1>Images {p * PAGE_ROWS + 1}-{p * PAGE_ROWS + len(part)} of {len(table)}</h1>{_html_table(part)}"))
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


def write_report(store: str | os.PathLike[str], out: str | os.PathLike[str] | None = None,
                 *, max_images: int = 8, rows: int = 100,
                 coordinates: str | os.PathLike[str] | pd.DataFrame | None = None,
                 storage_options: dict[str, Any] | None = None, overwrite: bool = False,
                 notify: Callable[[str], None] | None = None) -> Path | str:
    """Write the figures, tables and ``index.html`` of a kernel-map store into a new folder; returns the
    index's path (a local ``Path``, or its URL where ``out`` is one).  A folder that exists (not empty) is
    refused, or with ``overwrite`` replaced where it holds a report.

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
    which ``notify`` (e.g. ``print``), where given, is called with too.
    """
    path = os.fspath(store)
    if out is None and "://" in path:
        raise InputError(f"{path} is a URL: give --out, a folder or URL prefix for the report")
    if storage_options is not None and not isinstance(storage_options, dict):
        raise OptionError(f"storage_options must be a mapping of fsspec options, not {type(storage_options).__name__}")
    folder = _Folder(out if out is not None else path.rstrip("/") + ".report", storage_options)
    remote = "://" in path and not path.startswith("file://")
    ds = read_kernel_map(path, lazy=("kernel",),  # the kernels of the panel images only are read
                         storage_options=storage_options if remote else None)
    if coordinates is not None:
        if isinstance(coordinates, (str, os.PathLike)) and "://" in os.fspath(coordinates):
            coordinates = _read_csv_url(os.fspath(coordinates), storage_options)
        ds = with_coordinates(ds, coordinates)
    folder.claim(overwrite)
    folder.make()
    plt = _pyplot()
    result = survey(ds)
    notice = incomplete_notice(ds, result)
    if notice is not None and notify is not None:
        notify(f"{path}: {notice}")
    sky = sky_of(ds)
    figs = figures(ds, max_images=max_images, result=result, sky=sky)
    for stem, fig in figs.items():
        with folder.open(f"{stem}.png") as f:
            fig.savefig(f, format="png", dpi=100)
        plt.close(fig)
    tables = write_tables(result, folder, ds)
    table, n = result.table, ds.sizes["image"]
    pages = _write_pages(table, folder) if n > rows else []
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
        out_html += _html_table(outliers.head(rows))
        if len(outliers) > rows:
            out_html += f"<p>The first {rows} by deviation; all in <a href='outliers.csv'>outliers.csv</a>.</p>"
    missing = result.without_model
    model_html = "" if not missing else (
        f"<p>{len(missing)} image(s) without a kernel-field model, left out of the principal components: "
        f"{html.escape(', '.join(missing[:50]))}{' ...' if len(missing) > 50 else ''}</p>")
    table_note = (f"<p>The first {rows} of {n} images; all in {links} and the pages "
                  + " ".join(f'<a href="{name}">{p + 1}</a>' for p, name in enumerate(pages)) + ".</p>"
                  if pages else f"<p>Also as {links}.</p>")
    sections = "".join(f'<h2>{html.escape(_title(stem))}</h2><img src="{stem}.png" alt="{html.escape(stem)}">'
                       for stem in figs)
    folder.write_text("index.html", _page(
        "kernelmap report",
        f"<h1>kernelmap report: {html.escape(str(path))}</h1>"
        f"<p>{n} image(s), {ds.sizes['y']}x{ds.sizes['x']} tiles of "
        f"{html.escape(str(ds.attrs.get('tile_size', '?')))} px, kernels {ds.sizes['ky']}x{ds.sizes['kx']}, "
        f"method {html.escape(str(ds.attrs.get('kernelmap_method', '?')))}, store {html.escape(status)}; "
        f"{shown_html}trends against {html.escape(coords)}{skipped}; {sky_html}.</p>"
        + (f"<p class='notice'><strong>Note:</strong> {html.escape(notice)}.</p>" if notice else "") +
        f"<h2>Outliers</h2>{out_html}{model_html}"
        f"<h2>Images</h2>{table_note}{_html_table(table.head(rows))}{sections}"))
    return folder.path("index.html")


def _read_csv_url(url: str, storage_options: dict[str, Any] | None) -> pd.DataFrame:
    """A CSV table at an fsspec URL."""
    try:
        return pd.read_csv(url, storage_options=storage_options)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read {url} as a CSV table ({exc}): give a CSV file with an 'image' column") from exc


def _title(stem: str) -> str:
    if stem in FIGURES:
        return FIGURES[stem]
    if stem.startswith("trends-"):
        return f"Trends against {stem[len('trends-'):]}"
    return stem.replace("-", " ")
