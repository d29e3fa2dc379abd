"""A survey's view of a kernel map: one row per image, trends against the image coordinates, outliers.

:func:`image_table` summarises every image in one row (medians of the per-tile
measurements, flags, the model's degree and error, the model's FWHM and
ellipticity over a grid, the principal-component amplitudes), vectorised over
the stack.  :func:`trend_coordinates` finds what the images can be ordered or
grouped by: every 1-D coordinate along ``image`` (the labels themselves
included) that is numeric or a time (an x axis), or that takes fewer distinct
values than there are images, at most :data:`MAX_GROUPS` (groups, e.g. a
filter); where none is numeric the position in the stack (``index``) is one.

Outliers (:func:`find_outliers`), for each quantity of :data:`TREND_QUANTITIES`
and each coordinate:

* numeric coordinate: the trend is Tukey's resistant line (the slope between
  the medians of the lower and upper thirds of the images by the coordinate)
  plus the running median of the quantity about it over the ``window`` images
  nearest in the coordinate (by rank; ``window`` = a tenth of the images, odd,
  from 5 to 201; the window is shifted, not shrunk, at the ends, where the
  line keeps a slope from being flattened), within each group of images that the categorical coordinates make (every
  combination of their values, e.g. each filter) with at least 10 images
  (the other images: against the running median of all);
* categorical coordinate: the trend is the median of the image's group;
* the scale is ``1.4826 * median(|quantity - trend|)`` over all images (per
  group where a group has at least 10 images), at least the quantity's
  resolution (0.5 for the counts ``model_degree`` and ``tiles_flagged``, so that
  they need a difference above 2.5 at the default threshold);
* an image is an outlier when ``|quantity - trend| > threshold * scale``
  (``threshold`` = 5 by default: for Gaussian scatter about one image in
  three million).  With fewer than 5 images no outlier is called.

Directions (:func:`pipeline.analysis.maps.image_directions`): a reverse image's
kernels blur its target (the sharper image) into its source, so its FWHM, flux
scale (source/target) and background (source units) are not those of a forward
image.  Nothing mixes the two: the table gives each image's ``direction``;
where the stack holds both, ``direction`` is a categorical coordinate (its
trend figure shows each direction's medians), and the trends and outliers are
found within each direction apart, as if each were its own stack (a direction
with fewer than 5 images then calls no outlier); the principal components are
those of one direction's images, the majority's by default
(:func:`survey`'s ``pca_direction``), the others listed in
:attr:`Survey.other_direction`.

Pure NumPy and pandas (which xarray requires).
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from .. import flags as fl
from ..core.moments import adaptive_moments
from ..errors import InputError, OptionError
from .maps import DIRECTION_NAMES, FORWARD, REVERSE, direction_names, image_directions, model_kernels_at
from .pca import KernelPCA, kernel_pca

__all__ = ["COLUMNS", "PCA_DIRECTIONS", "TREND_QUANTITIES", "MAX_GROUPS", "THRESHOLD", "Coordinate", "Groups",
           "Quantity", "Survey", "Trend", "coordinate_file_stem", "find_outliers", "grid_positions",
           "has_model_variables", "image_groups", "image_table", "images_without_diagnostics", "resistant_slope",
           "robust_trend", "running_median", "survey", "trend_coordinates", "with_coordinates"]


@dataclass(frozen=True)
class Quantity:
    label: str  #: axis label, its unit in parentheses
    resolution: float = 0.0  #: smallest scale of its scatter (counts: 0.5)


#: Per-image summaries trended against every coordinate and tested for outliers: column -> label, resolution.
TREND_QUANTITIES: dict[str, Quantity] = {
    "fwhm_median": Quantity("median FWHM (pixel)"),
    "ellipticity_median": Quantity("median |e| (dimensionless)"),
    "flux_median": Quantity("median flux scale (ratio target/source)"),
    "background_median": Quantity("median background (target units, ADU)"),
    "model_degree": Quantity("model polynomial degree (integer)", 0.5),
    "tiles_flagged": Quantity("tiles flagged (problem flags, count)", 0.5),
}

_INFORMATIONAL_NAMES = ", ".join(f.name for f in fl.FLAGS if f.kind == fl.INFORMATION)

#: What each column of :func:`image_table` and :func:`survey` holds (the HTML table's header tips, the docs).
COLUMNS: dict[str, str] = {
    "image": "image label",
    "index": "position in the stack",
    "direction": "direction of the image's kernels: forward (target = kernel * source + background) or reverse "
                 "(the target the sharper: source = kernel * target + background, flux source/target, background "
                 "in source units)",
    "tiles": "tiles per image",
    "tiles_unusable": "tiles without a kernel (no data, no signal)",
    "tiles_flagged": f"tiles with a problem flag, target_sharper among them (the informational flags, "
                     f"{_INFORMATIONAL_NAMES}, do not count)",
    "tiles_model_outlier": "tiles left out of the model as outliers",
    "tiles_target_sharper": "tiles whose kernel sharpens (target_sharper: the image it is fitted to is the sharper "
                            "of the pair, against the image's direction; left out of the model)",
    "tiles_nearly_equal": "tiles whose two PSFs are nearly equal (nearly_equal, information: the kernel is close "
                          "to a delta)",
    "fwhm_median": "median over tiles of the kernel FWHM (pixel)",
    "fwhm_iqr": "interquartile range over tiles of the FWHM (pixel)",
    "ellipticity_median": "median over tiles of |e|",
    "e1_median": "median over tiles of e1",
    "e2_median": "median over tiles of e2",
    "flux_median": "median over tiles of the flux scale (kernel sum)",
    "background_median": "median over tiles of the background offset",
    "residual_median": "median over tiles of the fit residual / noise",
    "snr_median": "median over tiles of the signal-to-noise",
    "model_degree": "degree of the kernel-field model (-1: none)",
    "model_cv_error": "cross-validated error of the model",
    "model_residual_median": "median over tiles of |tile - model| / |model|",
    "model_fwhm_median": "median FWHM of the model over the grid (pixel)",
    "model_fwhm_range": "max - min FWHM of the model over the grid (pixel)",
    "model_ellipticity_median": "median |e| of the model over the grid",
    "outlier": "far from the stack's trend in some quantity against some coordinate",
    "outlier_reasons": "quantity vs coordinate (deviation in robust standard deviations)",
}

#: Most distinct values of a non-numeric coordinate used as groups (more: identifiers, not groups).
MAX_GROUPS = 50
#: Default outlier threshold, in robust standard deviations from the trend.
THRESHOLD = 5.0
#: Fewest images with a value for which outliers are called.
MIN_IMAGES = 5
#: Fewest images of a group with its own trend and scale.
MIN_GROUP = 10
#: Accepted ``pca_direction`` values of :func:`survey`: the direction of the images decomposed.
PCA_DIRECTIONS = ("majority", "forward", "reverse")


@dataclass(frozen=True)
class Coordinate:
    """A per-image coordinate to trend against."""

    name: str
    kind: str  #: ``numeric``, ``time`` or ``categorical``
    values: np.ndarray  #: ``(n,)`` as stored (datetimes as datetime64), for axes and the table
    position: np.ndarray  #: ``(n,)`` float: the value (times in days since the first), or the group's code
    groups: tuple[str, ...] = ()  #: group names of a categorical coordinate, by code


def _quiet(func, *args, **kwargs):
    """A NumPy nan-reduction without its warnings about all-NaN slices (their result is NaN)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return func(*args, **kwargs)


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)) or "coordinate"


def trend_coordinates(ds: xr.Dataset) -> tuple[list[Coordinate], dict[str, str]]:
    """The coordinates to trend against, and those left out with the reason (see the module)."""
    n = ds.sizes["image"]
    found: list[Coordinate] = []
    skipped: dict[str, str] = {}
    for name, coord in ds.coords.items():
        if coord.dims != ("image",):
            continue
        values = np.asarray(coord.values)
        if values.dtype.kind in "Mm":
            ref = values[~np.isnat(values)].min() if (~np.isnat(values)).any() else values[0]
            days = (values - ref) / np.timedelta64(1, "D") if values.dtype.kind == "M" else \
                values / np.timedelta64(1, "D")
            found.append(Coordinate(str(name), "time", values, np.asarray(days, dtype=np.float64)))
        elif values.dtype.kind in "iuf":
            found.append(Coordinate(str(name), "numeric", values, values.astype(np.float64)))
        else:
            text = np.array([str(v) for v in values], dtype=object)
            groups, codes = np.unique(text, return_inverse=True)
            if len(groups) < n and len(groups) <= MAX_GROUPS:
                found.append(Coordinate(str(name), "categorical", text, codes.astype(np.float64),
                                        tuple(str(g) for g in groups)))
            else:
                skipped[str(name)] = (f"{len(groups)} distinct values for {n} images: labels, not groups"
                                      if len(groups) > 1 or n == 1 else "one value")
    if not any(c.kind in ("numeric", "time") for c in found):
        index = np.arange(n)
        found.insert(0, Coordinate("index", "numeric", index, index.astype(np.float64)))
    return found, skipped


def resistant_slope(x: np.ndarray, values: np.ndarray) -> float:
    """Tukey's resistant line slope: between the medians of the lower and upper thirds (by ``x``)
    of the points; 0 with fewer than 3 points or no spread in ``x``."""
    order = np.argsort(x, kind="stable")
    third = len(order) // 3
    if third < 1:
        return 0.0
    lo, hi = order[:third], order[-third:]
    dx = float(np.median(x[hi]) - np.median(x[lo]))
    return float((np.median(values[hi]) - np.median(values[lo])) / dx) if dx > 0 else 0.0


def with_coordinates(ds: xr.Dataset, table: pd.DataFrame | str | os.PathLike[str]) -> xr.Dataset:
    """``ds`` with every column of ``table`` (a DataFrame, or a CSV file) but ``image`` as a coordinate
    along ``image``, matched by label (``table["image"]`` against the ``image`` coordinate, as text);
    images the table lacks get NaN (or an empty text); ISO 8601 texts become times.  Survey metadata
    (time, airmass, filter) kept beside the images, given to the report without rewriting the store."""
    if not isinstance(table, pd.DataFrame):
        where = os.fspath(table)
        try:
            table = pd.read_csv(where)
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read {where} as a CSV table ({exc}): give a CSV file with an 'image' "
                             "column") from exc
    if "image" not in table:
        raise InputError(f"the coordinates table has no 'image' column (it has {', '.join(map(str, table.columns))})"
                         ": name the column of image labels 'image'")
    keys = table["image"].astype(str)
    if keys.duplicated().any():
        twice = sorted(set(keys[keys.duplicated()]))[:5]
        raise InputError(f"the coordinates table lists images more than once: {twice}")
    labels = pd.Index([str(v) for v in ds["image"].values])
    if not labels.isin(keys).any():
        raise InputError(f"no image of the store ({', '.join(labels[:3])} ...) is in the coordinates table "
                         f"({', '.join(keys[:3])} ...): its 'image' column must hold the store's image labels")
    aligned = table.assign(image=keys).set_index("image").reindex(labels)
    coords = {}
    for name in aligned.columns:
        column = aligned[name]
        values = column.to_numpy()
        if column.dtype.kind not in "iufMmb":
            try:  # ISO 8601 times (2026-01-31T03:04:05) become times
                values = pd.to_datetime(column, format="ISO8601").to_numpy()
            except (ValueError, TypeError):
                values = np.array(["" if pd.isna(v) else str(v) for v in values], dtype=object)
        coords[str(name)] = ("image", values)
    return ds.assign_coords(coords)


def running_median(x: np.ndarray, values: np.ndarray, window: int | None = None) -> np.ndarray:
    """Robust trend of ``values`` against ``x``: a resistant line plus the running median of the
    values about it over the ``window`` points nearest in ``x`` (by rank; the window shifted, not
    shrunk, at the ends, where the line keeps a slope from being flattened); NaN where ``x`` or
    the value is.  ``window`` default: a tenth of the points, odd, from 5 to 201."""
    x, values = np.asarray(x, dtype=np.float64), np.asarray(values, dtype=np.float64)
    ok = np.flatnonzero(np.isfinite(x) & np.isfinite(values))
    trend = np.full(len(values), np.nan)
    m = len(ok)
    if m == 0:
        return trend
    if window is None:
        window = int(np.clip(m // 10, 5, 201)) | 1
    w = int(min(max(window, 1), m))
    order = ok[np.argsort(x[ok], kind="stable")]
    slope = resistant_slope(x[order], values[order])
    line = slope * (x[order] - x[order][0])
    about = values[order] - line
    start = np.clip(np.arange(m) - w // 2, 0, m - w)
    trend[order] = line + np.median(about[start[:, None] + np.arange(w)[None, :]], axis=1)
    return trend


@dataclass(frozen=True)
class Trend:
    """One quantity against one coordinate: the trend per image and the robust scale about it."""

    quantity: str
    coordinate: str
    trend: np.ndarray  #: ``(n,)``
    scale: np.ndarray  #: ``(n,)`` robust standard deviation about the trend (per group where groups are)
    deviation: np.ndarray  #: ``(n,)`` ``(value - trend) / scale``
    outlier: np.ndarray  #: ``(n,)`` bool


@dataclass(frozen=True)
class Groups:
    """The images' groups: every combination of the categorical coordinates' values."""

    codes: np.ndarray  #: ``(n,)`` int
    names: tuple[str, ...]  #: by code, e.g. ``"r"`` or ``"r/ccd-3"``
    by: tuple[str, ...]  #: the coordinates grouped by


def image_groups(coordinates: list[Coordinate]) -> Groups | None:
    """The groups the categorical ``coordinates`` make (``None`` without any)."""
    cats = [c for c in coordinates if c.kind == "categorical"]
    if not cats:
        return None
    keys = np.stack([c.position for c in cats], axis=1).astype(np.int64)
    unique, codes = np.unique(keys, axis=0, return_inverse=True)
    names = tuple("/".join(c.groups[int(code)] for c, code in zip(cats, row)) for row in unique)
    return Groups(codes.ravel(), names, tuple(c.name for c in cats))


def robust_trend(coord: Coordinate, values: np.ndarray, *, groups: Groups | None = None, resolution: float = 0.0,
                 threshold: float = THRESHOLD, window: int | None = None, quantity: str = "") -> Trend:
    """The trend of ``values`` against ``coord``, the scale about it and the outliers (see the module).

    A categorical ``coord`` is its own groups; a numeric one is trended within each of ``groups``
    that has at least :data:`MIN_GROUP` values (the other images against the trend of all).
    """
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    finite = np.isfinite(values)
    if coord.kind == "categorical":
        codes = coord.position.astype(np.int64)
        trend = np.full(n, np.nan)
        for code in np.unique(codes):
            members = (codes == code) & finite
            if members.any():
                trend[members] = np.median(values[members])
    else:
        codes = groups.codes if groups is not None else np.zeros(n, dtype=np.int64)
        trend = running_median(coord.position, values, window)
        for code in np.unique(codes):
            members = np.flatnonzero(codes == code)
            if len(np.unique(codes)) > 1 and np.count_nonzero(finite[members]) >= MIN_GROUP:
                trend[members] = running_median(coord.position[members], values[members], window)
    resid = values - trend
    ok = np.isfinite(resid)
    pooled = 1.4826 * float(np.median(np.abs(resid[ok]))) if ok.any() else np.nan
    scale = np.full(n, pooled)
    for code in np.unique(codes):
        members = (codes == code) & ok
        if members.sum() >= MIN_GROUP and members.sum() < ok.sum():
            scale[members] = 1.4826 * np.median(np.abs(resid[members]))
    scale = np.maximum(scale, resolution)
    with np.errstate(divide="ignore", invalid="ignore"):
        deviation = np.where(scale > 0, resid / scale, np.where(resid == 0, 0.0, np.inf * np.sign(resid)))
    outlier = ok & (np.abs(deviation) > threshold) if ok.sum() >= MIN_IMAGES else np.zeros(n, dtype=bool)
    return Trend(quantity, coord.name, trend, scale, deviation, outlier)


def find_outliers(table: pd.DataFrame, coordinates: list[Coordinate], *,
                  quantities: dict[str, Quantity] | None = None, threshold: float = THRESHOLD,
                  window: int | None = None) -> tuple[pd.DataFrame, dict[tuple[str, str], Trend]]:
    """Images far from the stack's trend: one row per (image, quantity, coordinate) flagged, with the
    value, the trend and the deviation in robust standard deviations; and every trend computed.
    Numeric coordinates are trended within the groups of the categorical ones (:func:`image_groups`)."""
    if not (np.isfinite(threshold) and threshold > 0):
        raise OptionError(f"the outlier threshold must be a positive number, got {threshold!r}")
    quantities = TREND_QUANTITIES if quantities is None else quantities
    groups = image_groups(coordinates)
    trends: dict[tuple[str, str], Trend] = {}
    rows = []
    for name, quantity in quantities.items():
        if name not in table:
            continue
        values = table[name].to_numpy(dtype=np.float64)
        for coord in coordinates:
            t = robust_trend(coord, values, groups=groups, resolution=quantity.resolution, threshold=threshold,
                             window=window, quantity=name)
            trends[(name, coord.name)] = t
            for i in np.flatnonzero(t.outlier):
                rows.append({"image": table["image"].iloc[i], "index": int(i), "quantity": name,
                             "coordinate": coord.name, "value": values[i], "trend": t.trend[i],
                             "deviation": float(t.deviation[i])})
    columns = ["image", "index", "quantity", "coordinate", "value", "trend", "deviation"]
    outliers = pd.DataFrame(rows, columns=columns)
    if len(outliers):
        outliers = outliers.sort_values("deviation", key=np.abs, ascending=False, kind="stable").reset_index(
            drop=True)
    return outliers, trends


def grid_positions(ds: xr.Dataset, n: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """``n`` rows and ``n`` columns evenly spanning the tile centres (where the model is constrained)."""
    y, x = np.asarray(ds["y"].values, dtype=np.float64), np.asarray(ds["x"].values, dtype=np.float64)
    return np.linspace(y.min(), y.max(), n), np.linspace(x.min(), x.max(), n)


def images_without_diagnostics(ds: xr.Dataset) -> np.ndarray:
    """``(n,)`` bool: the images none of whose tiles has a diagnostic (FWHM, flux) or a quality flag, i.e.
    that hold only the fill values (NaN, no flag) a run leaves in images it has not reached yet.  An
    image a run did reach has, in every tile, either a measurement or a flag saying why there is none."""
    n = ds.sizes["image"]
    empty = np.asarray(ds["quality_flag"].values).astype(np.int64).reshape(n, -1) == 0
    for name in ("fwhm", "flux"):
        if name in ds:
            empty &= ~np.isfinite(_per_image(ds, name))
    return np.all(empty, axis=1)


def _per_image(ds: xr.Dataset, name: str) -> np.ndarray:
    values = np.asarray(ds[name].values, dtype=np.float64)
    return values.reshape(len(values), -1)


def image_table(ds: xr.Dataset, extra: dict[str, np.ndarray] | None = None) -> pd.DataFrame:
    """One row per image: its label, position and direction (``forward``, ``reverse``), every other
    coordinate along ``image``, medians of the per-tile measurements (each in its image's direction),
    tile counts, the model's degree and errors; ``extra`` columns appended."""
    n = ds.sizes["image"]
    data: dict[str, Any] = {"image": [str(v) for v in ds["image"].values], "index": np.arange(n),
                            "direction": direction_names(image_directions(ds))}
    for name, coord in ds.coords.items():
        if coord.dims == ("image",) and name != "image":
            data[str(name)] = np.asarray(coord.values)
    flags = np.asarray(ds["quality_flag"].values).astype(np.int64).reshape(n, -1)
    data["tiles"] = np.full(n, flags.shape[1])
    data["tiles_unusable"] = np.count_nonzero(flags & fl.BAD, axis=1)
    data["tiles_flagged"] = np.count_nonzero(fl.problems(flags), axis=1)
    data["tiles_model_outlier"] = np.count_nonzero(flags & fl.MODEL_OUTLIER, axis=1)
    data["tiles_target_sharper"] = np.count_nonzero(flags & fl.TARGET_SHARPER, axis=1)
    data["tiles_nearly_equal"] = np.count_nonzero(flags & fl.NEARLY_EQUAL, axis=1)
    for name in ("fwhm", "ellipticity", "e1", "e2", "flux", "background", "residual", "snr"):
        if name in ds:
            data[f"{name}_median"] = _quiet(np.nanmedian, _per_image(ds, name), axis=1)
    if "fwhm" in ds:
        q1, q3 = _quiet(np.nanpercentile, _per_image(ds, "fwhm"), [25, 75], axis=1)
        data["fwhm_iqr"] = q3 - q1
    data["model_degree"] = (np.asarray(ds["model_degree"].values).astype(np.int64) if "model_degree" in ds
                            else np.full(n, -1))
    data["model_cv_error"] = (np.asarray(ds["model_cv_error"].values, dtype=np.float64)
                              if "model_cv_error" in ds else np.full(n, np.nan))
    if "model_residual" in ds:
        data["model_residual_median"] = _quiet(np.nanmedian, _per_image(ds, "model_residual"), axis=1)
    data.update(extra or {})
    return pd.DataFrame(data)


@dataclass
class Survey:
    """Everything :func:`survey` found about a stack."""

    table: pd.DataFrame  #: one row per image (:func:`image_table` and the model and PCA columns)
    outliers: pd.DataFrame  #: one row per (image, quantity, coordinate) flagged
    coordinates: list[Coordinate]
    skipped: dict[str, str]  #: coordinates not used, with the reason
    trends: dict[tuple[str, str], Trend]
    grid_y: np.ndarray  #: rows of the common grid of positions
    grid_x: np.ndarray
    model_fwhm: np.ndarray  #: ``(n, gy, gx)`` FWHM of each image's model on the grid (NaN: no model)
    model_e1: np.ndarray
    model_e2: np.ndarray
    pca: KernelPCA | None  #: of the images of :attr:`direction` with a model (None with fewer than 2)
    pca_images: np.ndarray  #: positions of the images in the PCA
    without_model: list[str] = field(default_factory=list)  #: labels of the images left out of the PCA
    #: each image's direction (``(n,)``, 1 forward, -1 reverse, 0 undecided: :func:`~.maps.image_directions`)
    directions: np.ndarray | None = None
    #: the direction of the images the principal components (and the report's maps over the stack) are of
    direction: int = FORWARD
    #: labels of the images with a model left out of the PCA for being of the other direction
    other_direction: list[str] = field(default_factory=list)
    #: labels of the images with no diagnostics yet (:func:`images_without_diagnostics`), left out of the trends
    without_diagnostics: list[str] = field(default_factory=list)
    threshold: float = THRESHOLD
    groups: Groups | None = None  #: the groups numeric coordinates are trended within


def has_model_variables(ds: xr.Dataset) -> bool:
    """Whether ``ds`` holds the kernel-field model (``model_*`` variables)."""
    return all(name in ds for name in ("model_coefficient", "model_degree", "model_centre_y", "model_centre_x",
                                       "model_scale_y", "model_scale_x"))


def _pca_direction(directions: np.ndarray, candidates: np.ndarray, pca_direction: str) -> int:
    """The direction decomposed: the one asked for, or that of most ``candidates`` (forward on a tie)."""
    if pca_direction not in PCA_DIRECTIONS:
        raise OptionError(f"pca_direction={pca_direction!r} is not known: use one of {', '.join(PCA_DIRECTIONS)}")
    if pca_direction != "majority":
        return FORWARD if pca_direction == "forward" else REVERSE
    chosen = directions[candidates]
    return REVERSE if np.count_nonzero(chosen == REVERSE) > np.count_nonzero(chosen == FORWARD) else FORWARD


def _outliers_by_direction(table: pd.DataFrame, coordinates: list[Coordinate], directions: np.ndarray,
                           threshold: float) -> tuple[pd.DataFrame, dict[tuple[str, str], Trend]]:
    """:func:`find_outliers` within each direction's images apart, their trends put back together."""
    kinds = np.unique(directions)
    if len(kinds) < 2:
        return find_outliers(table, coordinates, threshold=threshold)
    n = len(table)
    parts, trends = [], {}
    for kind in kinds:
        rows = np.flatnonzero(directions == kind)
        sub = [replace(c, values=np.asarray(c.values)[rows], position=c.position[rows]) for c in coordinates]
        found, sub_trends = find_outliers(table.iloc[rows].reset_index(drop=True), sub, threshold=threshold)
        parts.append(found.assign(index=rows[found["index"].to_numpy(dtype=np.int64)]))
        for key, t in sub_trends.items():
            whole = trends.get(key) or Trend(t.quantity, t.coordinate, np.full(n, np.nan), np.full(n, np.nan),
                                             np.full(n, np.nan), np.zeros(n, dtype=bool))
            for name in ("trend", "scale", "deviation", "outlier"):
                getattr(whole, name)[rows] = getattr(t, name)
            trends[key] = whole
    outliers = pd.concat([p for p in parts if len(p)] or parts[:1], ignore_index=True)
    if len(outliers):
        outliers = outliers.sort_values("deviation", key=np.abs, ascending=False, kind="stable").reset_index(
            drop=True)
    return outliers, trends


def survey(ds: xr.Dataset, *, grid: int = 5, n_components: int = 4, normalize: str | None = "kernel",
           threshold: float = THRESHOLD, pca_direction: str = "majority") -> Survey:
    """The survey view of a loaded kernel map (``kernel`` may stay lazy: it is not read).

    Each image's model is evaluated on a ``grid x grid`` set of positions spanning the tile centres;
    its adaptive moments give the model FWHM and ellipticity columns and the kernels go into the
    principal-component analysis (:func:`~pipeline.analysis.pca.kernel_pca`, kernels normalised by
    ``normalize``); images without a model are left out of it and listed.  Images with no diagnostics
    (an incomplete store: :func:`images_without_diagnostics`) are listed and left out of the trends and
    outliers (their fill values, model degree -1 and no flags, are no measurements).

    A stack of both directions (see the module) is not decomposed as one: the components are those of
    the images of ``pca_direction`` (``"majority"``, the default: the direction of most images with a
    model, forward on a tie; or ``"forward"``, ``"reverse"``), the others with a model are listed in
    :attr:`Survey.other_direction`; its trends and outliers are found within each direction.
    """
    if pca_direction not in PCA_DIRECTIONS:
        raise OptionError(f"pca_direction={pca_direction!r} is not known: use one of {', '.join(PCA_DIRECTIONS)}")
    n = ds.sizes["image"]
    directions = image_directions(ds)
    gy, gx = grid_positions(ds, grid)
    yy, xx = np.meshgrid(gy, gx, indexing="ij")
    k = ds.sizes["ky"]
    if has_model_variables(ds):
        kernels = model_kernels_at(ds, yy, xx)  # (n, grid, grid, k, k)
        has_model = np.asarray(ds["model_degree"].values).astype(np.int64) >= 0
        has_model &= np.all(np.isfinite(kernels.reshape(n, -1)), axis=1)
    else:  # a map written without the kernel-field model
        kernels, has_model = np.full((n, grid, grid, k, k), np.nan), np.zeros(n, dtype=bool)
    moments = adaptive_moments(kernels[has_model].reshape(-1, *kernels.shape[-2:]))
    shapes = {}
    for name in ("fwhm", "e1", "e2"):
        values = np.full((n, grid, grid), np.nan)
        values[has_model] = np.asarray(getattr(moments, name)).reshape(-1, grid, grid)
        shapes[name] = values
    flat_fwhm = shapes["fwhm"].reshape(n, -1)
    ellipticity = np.hypot(shapes["e1"], shapes["e2"]).reshape(n, -1)
    extra = {"model_fwhm_median": _quiet(np.nanmedian, flat_fwhm, axis=1),
             "model_fwhm_range": _quiet(np.nanmax, flat_fwhm, axis=1) - _quiet(np.nanmin, flat_fwhm, axis=1),
             "model_ellipticity_median": _quiet(np.nanmedian, ellipticity, axis=1)}
    direction = _pca_direction(directions, has_model, pca_direction)
    pca_images = np.flatnonzero(has_model & (directions == direction))
    other = has_model & (directions != direction)
    pca = None
    if len(pca_images) >= 2:
        pca = kernel_pca(kernels[pca_images], n_components=n_components, normalize=normalize,
                         directions=directions[pca_images])
        for j in range(pca.n_components):
            column = np.full(n, np.nan)
            column[pca_images] = pca.amplitudes[:, j]
            extra[f"pc{j + 1}"] = column
    table = image_table(ds, extra)
    coordinates, skipped = trend_coordinates(ds)
    decided = np.unique(directions[directions != 0])
    if len(decided) > 1 and all(c.name != "direction" for c in coordinates):  # both: a coordinate of its own
        names = tuple(DIRECTION_NAMES[int(d)] for d in (FORWARD, REVERSE))
        text = direction_names(directions)
        coordinates.append(Coordinate("direction", "categorical", text,
                                      np.array([names.index(t) if t in names else len(names) for t in text],
                                               dtype=np.float64),
                                      names + (("undecided",) if (directions == 0).any() else ())))
    empty = images_without_diagnostics(ds)
    trended = table.assign(**{name: table[name].astype(np.float64).where(~empty)
                              for name in TREND_QUANTITIES if name in table}) if empty.any() else table
    outliers, trends = _outliers_by_direction(trended, coordinates, directions, threshold)
    reasons: dict[int, list[str]] = {}
    for row in outliers.itertuples():
        reasons.setdefault(row.index, []).append(f"{row.quantity} vs {row.coordinate} ({row.deviation:+.1f})")
    table["outlier"] = [i in reasons for i in range(n)]
    table["outlier_reasons"] = ["; ".join(reasons.get(i, [])) for i in range(n)]
    labels = table["image"].to_numpy()
    return Survey(table=table, outliers=outliers, coordinates=coordinates, skipped=skipped, trends=trends,
                  grid_y=gy, grid_x=gx, model_fwhm=shapes["fwhm"], model_e1=shapes["e1"], model_e2=shapes["e2"],
                  pca=pca, pca_images=pca_images, without_model=[str(v) for v in labels[~has_model]],
                  without_diagnostics=[str(v) for v in labels[empty]], threshold=threshold,
                  groups=image_groups(coordinates), directions=directions, direction=direction,
                  other_direction=[str(v) for v in labels[other]])


def coordinate_file_stem(coord: Coordinate) -> str:
    """File stem of the trend figure against ``coord``."""
    return f"trends-{_safe_name(coord.name)}"
