"""Figures of a kernel map: ``kernelmap report STORE --out DIR``.

PNG figures (matplotlib, non-interactive), a per-image table (``images.csv``;
also ``images.parquet`` when pyarrow is installed), the outliers
(``outliers.csv``) and an ``index.html`` showing them.  Every map of a stack
shares one colour scale across its images.  Figures, by file name:

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
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from .. import flags as fl
from ..core.moments import adaptive_moments
from ..errors import InputError
from .maps import model_kernels_at, read_kernel_map
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

__all__ = ["FIGURES", "figures", "write_report", "write_tables"]

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


def _panels(plt, n: int, title: str, size: float = 3.2):
    cols = min(n, 4)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols + 1.2, size * rows + 0.8), squeeze=False,
                             constrained_layout=True)
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


def _cells(ax, ds: xr.Dataset, values: np.ndarray, **style):
    """A map of per-tile values, each drawn over its tile's cell, y downwards as in an image."""
    ye, xe = _edges(ds)
    im = ax.pcolormesh(xe, ye, values, shading="flat", **style)
    _frame(ax, ds)
    return im


def _frame(ax, ds: xr.Dataset) -> None:
    ye, xe = _edges(ds)
    ax.set_xlim(xe[0], xe[-1])
    ax.set_ylim(ye[-1], ye[0])
    ax.set_aspect("equal")
    ax.set_xlabel("x (pixel)")
    ax.set_ylabel("y (pixel)")


def _label(ds: xr.Dataset, i: int) -> str:
    return f"image {ds['image'].values[i]}"


def _map_figure(plt, ds: xr.Dataset, name: str, images: list[int], title: str, cmap: str = "viridis",
                symmetric: bool = False):
    values = np.asarray(ds[name].values[images], dtype=np.float64)
    finite = values[np.isfinite(values)]
    lo, hi = (np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0))
    if symmetric:
        lim = max(abs(lo), abs(hi)) or 1.0
        lo, hi = -lim, lim
    if hi <= lo:
        hi = lo + 1e-12
    units = ds[name].attrs.get("units", "")
    fig, axes = _panels(plt, len(images), title)
    for ax, i, v in zip(axes, images, values):
        im = _cells(ax, ds, v, vmin=lo, vmax=hi, cmap=cmap)
        ax.set_title(_label(ds, i))
    fig.colorbar(im, ax=list(axes), label=f"{name} ({units})" if units else name, shrink=0.8)
    return fig


def _whisker_figure(plt, ds: xr.Dataset, images: list[int]):
    fig, axes = _panels(plt, len(images), FIGURES["ellipticity"])
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
        _frame(ax, ds)
        ax.set_title(_label(ds, i))
    fig.suptitle(f"{FIGURES['ellipticity']}; a stick one tile wide is |e| = {spacing / scale:.3g}")
    return fig


def _flag_figure(plt, ds: xr.Dataset, images: list[int]):
    flags = np.asarray(ds["quality_flag"].values[images]).astype(np.int64)
    fig, axes = _panels(plt, len(images) + 1, FIGURES["flags"])
    n_bits = len(fl.FLAGS)
    for ax, i, f in zip(axes, images, flags):
        count = sum(((f & flag.mask) != 0).astype(int) for flag in fl.FLAGS)
        im = _cells(ax, ds, count, vmin=0, vmax=n_bits, cmap="magma_r")
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


def _kernel_mosaic(plt, ds: xr.Dataset, i: int, lo: float, hi: float):
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


def _pca_figure(plt, result: Survey, extent: list[float]):
    pca = result.pca
    m = pca.n_components
    fig, axes = plt.subplots(2, m + 1, figsize=(2.6 * (m + 1) + 0.6, 5.8), constrained_layout=True, squeeze=False)
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
        axes[1, j + 1].set_xlabel("x (pixel)", fontsize=8)
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


def _model_map_figure(plt, ds: xr.Dataset, images: list[int], shapes: dict[str, np.ndarray], name: str):
    fine = shapes["fwhm"].shape[-1]
    title = FIGURES[f"model-{name}"]
    fig, axes = _panels(plt, len(images), f"{title} ({fine}x{fine} positions across the tile centres)")
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
        ax.set_xlabel("x (pixel)")
        ax.set_ylabel("y (pixel)")
    units = "pixel" if name == "fwhm" else "1"
    fig.colorbar(im, ax=list(axes), label=f"model {name} ({units}); dots: tile centres", shrink=0.8)
    return fig


def _residual_figure(plt, ds: xr.Dataset, images: list[int]):
    """Tile minus model: the kernels' relative L2 difference and the FWHM difference, per tile."""
    yy, xx = np.meshgrid(ds["y"].values, ds["x"].values, indexing="ij")
    model = model_kernels_at(ds, yy, xx, images)
    model_fwhm = np.asarray(adaptive_moments(model.reshape(-1, *model.shape[-2:])).fwhm).reshape(
        len(images), *yy.shape)
    d_fwhm = np.asarray(ds["fwhm"].values[images], dtype=np.float64) - model_fwhm
    rel = (np.asarray(ds["model_residual"].values[images], dtype=np.float64) if "model_residual" in ds
           else np.full(d_fwhm.shape, np.nan))
    cols = len(images)
    fig, axes = plt.subplots(2, cols, figsize=(3.0 * cols + 1.4, 6.2), squeeze=False, constrained_layout=True)
    fig.suptitle(FIGURES["model-residual"])
    for row, (values, label, cmap, symmetric) in enumerate((
            (rel, "|tile - model| / |model|", "magma", False),
            (d_fwhm, "FWHM tile - model (pixel)", "RdBu_r", True))):
        lo, hi = _limits(values, symmetric)
        if not symmetric:
            lo = 0.0
        for ax, i, v in zip(axes[row], images, values):
            im = _cells(ax, ds, v, vmin=lo, vmax=hi, cmap=cmap)
            ax.set_title(_label(ds, i) + ("" if np.isfinite(v).any() else " (no model)"), fontsize=9)
            ax.set_xlabel("x (pixel)", fontsize=8)
        fig.colorbar(im, ax=list(axes[row]), label=label, shrink=0.8)
    return fig


def _stack_figure(plt, ds: xr.Dataset, result: Survey):
    """Maps aggregated over every image of the stack."""
    n = ds.sizes["image"]
    fig, axes = plt.subplots(2, 2, figsize=(10, 8.6), constrained_layout=True)
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
        im = _cells(ax, ds, resid, cmap="magma", vmin=0)
        fig.colorbar(im, ax=ax, label="|tile - model| / |model|", shrink=0.8)
    ax.set_title("tile minus model: median over images", fontsize=9)
    ax = axes[1, 1]
    flags = np.asarray(ds["quality_flag"].values).astype(np.int64)
    flagged = np.mean(flags != 0, axis=0)
    im = _cells(ax, ds, 100 * flagged, cmap="magma_r", vmin=0, vmax=100)
    fig.colorbar(im, ax=ax, label="% of images", shrink=0.8)
    ax.set_title("tiles with any quality flag: % of images", fontsize=9)
    for ax in axes.ravel():
        ax.set_xlabel("x (pixel)", fontsize=8)
        ax.set_ylabel("y (pixel)", fontsize=8)
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


def figures(ds: xr.Dataset, *, max_images: int = 8, result: Survey | None = None, fine: int = 32) -> dict[str, Any]:
    """Every figure by file stem (matplotlib Figures, not yet saved); ``result``: the stack's
    :func:`~pipeline.analysis.survey.survey` (computed when not given).  Per-image figures show
    :func:`panel_images`."""
    plt = _pyplot()
    result = survey(ds) if result is None else result
    images = panel_images(result.outliers, ds.sizes["image"], max_images)
    kern = np.asarray(ds["kernel"].isel(image=images).values, dtype=np.float64)
    finite = kern[np.isfinite(kern)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    out: dict[str, Any] = {f"kernels-{i}": _kernel_mosaic(plt, ds, i, lo, hi) for i in images}
    out["fwhm"] = _map_figure(plt, ds, "fwhm", images, FIGURES["fwhm"])
    out["ellipticity"] = _whisker_figure(plt, ds, images)
    out["flux"] = _map_figure(plt, ds, "flux", images, FIGURES["flux"], cmap="cividis")
    out["background"] = _map_figure(plt, ds, "background", images, FIGURES["background"], cmap="RdBu_r",
                                    symmetric=True)
    out["residual"] = _map_figure(plt, ds, "residual", images, FIGURES["residual"], cmap="magma")
    out["flags"] = _flag_figure(plt, ds, images)
    if has_model_variables(ds):
        shapes = _model_shapes(ds, images, fine)
        out["model-fwhm"] = _model_map_figure(plt, ds, images, shapes, "fwhm")
        out["model-ellipticity"] = _model_map_figure(plt, ds, images, shapes, "ellipticity")
        out["model-residual"] = _residual_figure(plt, ds, images)
    out["stack"] = _stack_figure(plt, ds, result)
    for coord in result.coordinates:
        out[coordinate_file_stem(coord)] = _trend_figure(plt, result, coord)
    if result.pca is not None:
        out["pca"] = _pca_figure(plt, result, _fine_extent(result.grid_y, result.grid_x))
        out["pca-amplitudes"] = _amplitude_figure(plt, result)
    return out


def write_tables(result: Survey, folder: Path) -> dict[str, Path]:
    """``images.csv`` (and ``images.parquet`` where pyarrow is installed) and ``outliers.csv``."""
    written = {"images.csv": folder / "images.csv", "outliers.csv": folder / "outliers.csv"}
    result.table.to_csv(written["images.csv"], index=False)
    result.outliers.to_csv(written["outliers.csv"], index=False)
    if importlib.util.find_spec("pyarrow") is not None:
        written["images.parquet"] = folder / "images.parquet"
        result.table.to_parquet(written["images.parquet"], index=False)
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


def _page(title: str, body: str) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>{_STYLE}"
            f"</head><body>{body}</body></html>\n")


def _write_pages(table: pd.DataFrame, folder: Path) -> list[str]:
    """``images-<page>.html`` of :data:`PAGE_ROWS` rows each, linked to one another; their names."""
    names = [f"images-{p + 1:03d}.html" for p in range(-(-len(table) // PAGE_ROWS))]
    nav = " ".join(f'<a href="{name}">{p + 1}</a>' for p, name in enumerate(names))
    for p, name in enumerate(names):
        part = table.iloc[p * PAGE_ROWS: (p + 1) * PAGE_ROWS]
        (folder / name).write_text(_page(
            f"kernelmap images, page {p + 1}",
            f"<p><a href='index.html'>report</a> | pages: {nav} | all: <a href='images.csv'>images.csv</a></p>"
            f"<h1>Images {p * PAGE_ROWS + 1}-{p * PAGE_ROWS + len(part)} of {len(table)}</h1>{_html_table(part)}"))
    return names


def write_report(store: str | os.PathLike[str], out: str | os.PathLike[str] | None = None,
                 *, max_images: int = 8, rows: int = 100,
                 coordinates: str | os.PathLike[str] | pd.DataFrame | None = None) -> Path:
    """Write the figures, tables and ``index.html`` of a kernel-map store; returns the index path.

    ``out`` defaults to ``STORE.report`` beside a local store (give it for a URL).  ``max_images``
    images get per-image panels (:func:`panel_images`: the outliers first); the page shows ``rows``
    rows of the image table and every outlier up to ``rows`` (the rest in ``images.csv``,
    ``outliers.csv`` and the pages).  ``coordinates``: a
    table (CSV file or DataFrame) of per-image values with an ``image`` column of labels, added as
    coordinates along ``image`` to trend against (:func:`~pipeline.analysis.survey.with_coordinates`).
    """
    path = os.fspath(store)
    if out is None and "://" in path:
        raise InputError(f"{path} is a URL: give --out, a local folder for the figures")
    folder = Path(out) if out is not None else Path(path.rstrip("/") + ".report")
    ds = read_kernel_map(path, lazy=("kernel",))  # the kernels of the panel images only are read
    if coordinates is not None:
        ds = with_coordinates(ds, coordinates)
    folder.mkdir(parents=True, exist_ok=True)
    plt = _pyplot()
    result = survey(ds)
    figs = figures(ds, max_images=max_images, result=result)
    for stem, fig in figs.items():
        fig.savefig(folder / f"{stem}.png", dpi=100)
        plt.close(fig)
    tables = write_tables(result, folder)
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
    links = ", ".join(f'<a href="{name}">{name}</a>' for name in tables)
    coords = ", ".join(f"{c.name} ({c.kind})" for c in result.coordinates)
    skipped = "".join(f"; not {html.escape(k)}: {html.escape(v)}" for k, v in result.skipped.items())
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
    (folder / "index.html").write_text(_page(
        "kernelmap report",
        f"<h1>kernelmap report: {html.escape(str(path))}</h1>"
        f"<p>{n} image(s), {ds.sizes['y']}x{ds.sizes['x']} tiles of "
        f"{html.escape(str(ds.attrs.get('tile_size', '?')))} px, kernels {ds.sizes['ky']}x{ds.sizes['kx']}, "
        f"method {html.escape(str(ds.attrs.get('kernelmap_method', '?')))}, store {html.escape(status)}; "
        f"{shown_html}trends against {html.escape(coords)}{skipped}.</p>"
        f"<h2>Outliers</h2>{out_html}{model_html}"
        f"<h2>Images</h2>{table_note}{_html_table(table.head(rows))}{sections}"))
    return folder / "index.html"


def _title(stem: str) -> str:
    if stem in FIGURES:
        return FIGURES[stem]
    if stem.startswith("trends-"):
        return f"Trends against {stem[len('trends-'):]}"
    return stem.replace("-", " ")
