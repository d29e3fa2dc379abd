"""Figures of a kernel map: ``kernelmap report STORE --out DIR``.

PNG figures (matplotlib, non-interactive) and an ``index.html`` showing them
with a summary table.  Every map of a stack shares one colour scale across
its images.  Figures, by file name:

- ``kernels-<i>.png``  the kernels across the field of image ``i``
  (thumbnails at their tile positions, one colour scale);
- ``fwhm.png``, ``ellipticity.png`` (whiskers: length ``|e|``, along the
  major axis), ``flux.png``, ``background.png``, ``residual.png``,
  ``flags.png``: per-tile maps, one panel per image;
- ``trends.png``  median FWHM, ellipticity and flux scale against image.

At most ``max_images`` images get panels (the first ones; the table lists all).
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from .. import flags as fl
from ..errors import InputError
from .maps import read_kernel_map

__all__ = ["FIGURES", "figures", "summary_table", "write_report"]

#: File stem -> title of every figure but the per-image kernel mosaics.
FIGURES = {
    "fwhm": "Kernel FWHM",
    "ellipticity": "Kernel ellipticity (whiskers along the major axis)",
    "flux": "Flux scale (kernel sum)",
    "background": "Background offset",
    "residual": "Fit residual / noise",
    "flags": "Quality flags",
    "trends": "Trends across the stack",
}


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
    kern = np.asarray(ds["kernel"].values[i], dtype=np.float64)
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


def _trend_figure(plt, ds: xr.Dataset):
    fig, axes = plt.subplots(3, 1, figsize=(7, 7), sharex=True, constrained_layout=True)
    fig.suptitle(FIGURES["trends"])
    index = np.arange(ds.sizes["image"])
    for ax, (name, label) in zip(axes, (("fwhm", "median FWHM (pixel)"), ("ellipticity", "median |e|"),
                                        ("flux", "median flux scale"))):
        values = np.asarray(ds[name].values, dtype=np.float64).reshape(len(index), -1)
        med = np.nanmedian(values, axis=1) if values.size else np.full(len(index), np.nan)
        q1, q3 = np.nanpercentile(values, [25, 75], axis=1)
        ax.errorbar(index, med, yerr=[med - q1, q3 - med], fmt="o-", capsize=3)
        ax.set_ylabel(label)
        ax.set_title(f"{label} per image (bars: quartiles over tiles)", fontsize=9)
    axes[-1].set_xticks(index, [str(v) for v in ds["image"].values], rotation=45, fontsize=7)
    axes[-1].set_xlabel("image")
    return fig


def figures(ds: xr.Dataset, *, max_images: int = 8) -> dict[str, Any]:
    """Every figure by file stem (matplotlib Figures, not yet saved)."""
    plt = _pyplot()
    images = list(range(min(ds.sizes["image"], max_images)))
    kern = np.asarray(ds["kernel"].values[images], dtype=np.float64)
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
    out["trends"] = _trend_figure(plt, ds)
    return out


def summary_table(ds: xr.Dataset) -> list[dict[str, Any]]:
    """One row per image: medians of the measurements, model degree and error, tiles flagged."""
    rows = []
    for i, label in enumerate(ds["image"].values):
        def med(name: str) -> float:
            v = np.asarray(ds[name].values[i], dtype=np.float64)  # noqa: B023 - called in this iteration
            return float(np.nanmedian(v)) if np.isfinite(v).any() else float("nan")

        flags = np.asarray(ds["quality_flag"].values[i]).astype(np.int64)
        rows.append({
            "image": str(label), "median FWHM (px)": med("fwhm"), "median |e|": med("ellipticity"),
            "median flux scale": med("flux"), "median background": med("background"),
            "model degree": int(ds["model_degree"].values[i]) if "model_degree" in ds else -1,
            "model CV error": float(ds["model_cv_error"].values[i]) if "model_cv_error" in ds else float("nan"),
            "tiles unusable": int(np.count_nonzero(flags & fl.BAD)), "tiles flagged": int(np.count_nonzero(flags)),
        })
    return rows


def write_report(store: str | os.PathLike[str], out: str | os.PathLike[str] | None = None,
                 *, max_images: int = 8) -> Path:
    """Write the figures and ``index.html`` of a kernel-map store; returns the index path.

    ``out`` defaults to ``STORE.report`` beside a local store (give it for a URL).
    """
    path = os.fspath(store)
    if out is None and "://" in path:
        raise InputError(f"{path} is a URL: give --out, a local folder for the figures")
    folder = Path(out) if out is not None else Path(path.rstrip("/") + ".report")
    ds = read_kernel_map(path)
    folder.mkdir(parents=True, exist_ok=True)
    plt = _pyplot()
    figs = figures(ds, max_images=max_images)
    for stem, fig in figs.items():
        fig.savefig(folder / f"{stem}.png", dpi=110)
        plt.close(fig)
    rows = summary_table(ds)
    head = "".join(f"<th>{html.escape(k)}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{v:.4g}</td>" if isinstance(v, float) else f"<td>{html.escape(str(v))}</td>"
                                    for v in row.values()) + "</tr>" for row in rows)
    status = ds.attrs.get("kernelmap_status", "unknown")
    shown = min(ds.sizes["image"], max_images)
    sections = "".join(f'<h2>{html.escape(FIGURES.get(stem, stem.replace("-", " ")))}</h2>'
                       f'<img src="{stem}.png" alt="{html.escape(stem)}">' for stem in figs)
    (folder / "index.html").write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>kernelmap report</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #999;padding:3px 8px;text-align:right}img{max-width:100%}</style></head><body>"
        f"<h1>kernelmap report: {html.escape(str(path))}</h1>"
        f"<p>{ds.sizes['image']} image(s), {ds.sizes['y']}x{ds.sizes['x']} tiles of "
        f"{html.escape(str(ds.attrs.get('tile_size', '?')))} px, kernels {ds.sizes['ky']}x{ds.sizes['kx']}, "
        f"method {html.escape(str(ds.attrs.get('kernelmap_method', '?')))}, store {html.escape(status)}; "
        f"figures show the first {shown}.</p>"
        f"<table><tr>{head}</tr>{body}</table>{sections}</body></html>\n"
    )
    return folder / "index.html"
