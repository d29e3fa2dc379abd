"""Kernel maps on the sky: axes in RA/Dec and a compass for the report's maps.

A kernel map made from a stack with a reference WCS (``kernelmap ingest``)
keeps it as FITS header text in its ``reference_wcs`` attribute, and gives
each tile centre ``ra`` and ``dec`` (degrees) on ``(y, x)``.  The report draws
its maps in input pixel coordinates (each tile over its own cell; the last
tiles, set against the image edge, may lie closer than the step, so the tile
grid need not be evenly spaced), so the data coordinates of every map are the
reference image's pixels and the reference's own WCS maps them onto the sky
exactly: no WCS of the tile grid is needed.  Maps are drawn y up (origin
lower, as ds9 and FITS viewers show an image), and each axis names its unit:
``x (pixel)``, ``y (pixel)``, or the sky's, ``RA (h m s)`` and ``Dec (d m s)``
as the tick labels are written.

astropy (the ``fits`` extra) is optional: without it, or where the WCS cannot
be read or does not give the stored ``ra``/``dec``, :func:`sky_of` returns no
WCS and a note saying why, and the maps keep pixel axes.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import xarray as xr

from ..io.store import icrs_positions

__all__ = ["PIXELS", "Sky", "angle_unit", "axis_names", "compass", "draw_compass", "is_sky_axes", "label_axes",
           "sky_of"]

#: How far (degrees) the WCS's sky positions of the tile centres may lie from the stored ``ra``/``dec``.
TOLERANCE_DEG = 1e-6


@dataclass(frozen=True)
class Sky:
    """The celestial WCS of a kernel map's input pixels (``None``: pixel axes) and, where the map has a
    reference WCS that cannot be used, why not."""

    wcs: Any = None  #: :class:`astropy.wcs.WCS`, celestial, of the input images' pixels (zero-based)
    note: str = ""

    @property
    def on(self) -> bool:
        return self.wcs is not None


#: No sky: maps in pixels.
PIXELS = Sky()


def sky_of(ds: xr.Dataset) -> Sky:
    """The sky of a kernel map: its ``reference_wcs`` read with astropy and checked against the stored
    tile centres' ``ra`` and ``dec``; ``Sky()`` for a map without one; ``Sky(None, note)`` where it has
    one that cannot be used (astropy missing, an unreadable or non-celestial header, other positions)."""
    text = str(ds.attrs.get("reference_wcs", "") or "")
    if not text:
        return PIXELS
    try:
        from astropy.io import fits
        from astropy.wcs import WCS, FITSFixedWarning
    except ImportError:
        return Sky(note="the kernel map has a reference WCS, but astropy is not installed: the maps have "
                        "pixel axes (install the fits extra, pip install 'kernelmap[fits]', for RA/Dec axes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            wcs = WCS(fits.Header.fromstring(text, sep="\n")).celestial
    except Exception as exc:  # astropy raises many kinds on a bad header
        return Sky(note=f"the kernel map's reference_wcs cannot be read ({exc}): the maps have pixel axes")
    if wcs.naxis != 2:
        return Sky(note="the kernel map's reference_wcs has no celestial axes: the maps have pixel axes")
    if "ra" in ds.coords and "dec" in ds.coords:
        ra, dec = icrs_positions(wcs, *np.meshgrid(np.asarray(ds["y"].values, np.float64),
                                                   np.asarray(ds["x"].values, np.float64), indexing="ij"))
        away = _separation(ra, dec, np.asarray(ds["ra"].values, np.float64), np.asarray(ds["dec"].values, np.float64))
        if not np.all(away <= TOLERANCE_DEG):
            return Sky(note=f"the kernel map's reference_wcs puts its tile centres up to {np.nanmax(away):.3g} deg "
                            "from their stored ra/dec: the maps have pixel axes")
    return Sky(wcs)


def _separation(ra1: np.ndarray, dec1: np.ndarray, ra2: np.ndarray, dec2: np.ndarray) -> np.ndarray:
    """Angles (degrees) between positions on the sphere (haversine)."""
    r1, d1, r2, d2 = (np.radians(v) for v in (ra1, dec1, ra2, dec2))
    h = np.sin((d2 - d1) / 2) ** 2 + np.cos(d1) * np.cos(d2) * np.sin((r2 - r1) / 2) ** 2
    return np.degrees(2 * np.arcsin(np.sqrt(np.clip(h, 0.0, 1.0))))


def compass(wcs: Any, y: float, x: float) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors ``(dy, dx)`` in input pixels towards north and towards east (ICRS) at pixel ``(y, x)``
    (zero-based) under a celestial WCS, whatever its axis order and frame."""
    from astropy import units as u

    here = wcs.pixel_to_world(float(x), float(y)).icrs
    scale = float(np.sqrt(abs(np.linalg.det(wcs.pixel_scale_matrix)))) or 1e-4  # degrees per pixel
    out = []
    for position_angle in (0.0, 90.0):  # north, then east (position angles from north through east)
        there = here.directional_offset_by(position_angle * u.deg, 0.5 * scale * u.deg)
        px, py = (float(v) for v in wcs.world_to_pixel(there))
        v = np.array([py - y, px - x])
        out.append(v / np.hypot(*v))
    return out[0], out[1]


def axis_names(wcs: Any) -> tuple[str, str]:
    """Labels of a celestial WCS's longitude and latitude axes: ``RA``/``Dec`` for equatorial frames,
    ``Galactic l``/``Galactic b``, ``Ecliptic lon``/``Ecliptic lat``, else the axes' types."""
    types = [str(t).split("-")[0].upper() for t in wcs.wcs.ctype]
    lng, lat = types[wcs.wcs.lng], types[wcs.wcs.lat]
    names = {("RA", "DEC"): ("RA", "Dec"), ("GLON", "GLAT"): ("Galactic l", "Galactic b"),
             ("ELON", "ELAT"): ("Ecliptic lon", "Ecliptic lat")}
    return names.get((lng, lat), (lng or "longitude", lat or "latitude"))


def is_sky_axes(ax: Any) -> bool:
    """Whether ``ax`` is astropy's WCSAxes (its data coordinates are input pixels; it labels RA/Dec)."""
    return hasattr(ax, "coords") and getattr(ax, "wcs", None) is not None


def angle_unit(coordinate: Any) -> str:
    """How a WCSAxes coordinate's tick labels write an angle: ``h m s`` (hours), ``d m s`` (degrees,
    sexagesimal, the default), ``deg`` (decimal degrees), or the unit's name."""
    from astropy import units as u

    unit = coordinate.get_format_unit()
    if unit == u.hourangle:
        return "h m s"
    fmt = getattr(getattr(coordinate, "_formatter_locator", None), "format", None)
    if unit == u.deg:
        return "deg" if fmt is not None and ":" not in fmt and "m" not in fmt else "d m s"
    return str(unit)


def label_axes(ax: Any, sky: Sky, *, fontsize: float | None = None) -> None:
    """Axis labels of a map with their units: RA/Dec (``RA (h m s)``, ``Dec (d m s)``: as the tick labels
    write them) and a compass on WCSAxes, else ``x (pixel)`` and ``y (pixel)``."""
    size = {} if fontsize is None else {"fontsize": fontsize}
    if not is_sky_axes(ax):
        ax.set_xlabel("x (pixel)", **size)
        ax.set_ylabel("y (pixel)", **size)
        return
    wcs = ax.wcs
    ra, dec = ax.coords[wcs.wcs.lng], ax.coords[wcs.wcs.lat]  # the world axes in the WCS's own order
    lng_name, lat_name = axis_names(wcs)
    ra.set_axislabel(f"{lng_name} ({angle_unit(ra)})", **size)
    dec.set_axislabel(f"{lat_name} ({angle_unit(dec)})", **size)
    ra.set_ticklabel_position("b")
    dec.set_ticklabel_position("l")
    ra.set_axislabel_position("b")
    dec.set_axislabel_position("l")
    ra.set_ticklabel(size=fontsize or 7)
    dec.set_ticklabel(size=fontsize or 7)
    draw_compass(ax, sky)


def draw_compass(ax: Any, sky: Sky, *, at: tuple[float, float] | None = None,
                 stretch: tuple[float, float] = (1.0, 1.0)) -> None:
    """N and E arrows near the upper left corner of ``ax`` as drawn: the directions on the sky at input
    pixel ``at`` (default: the middle of the axes' limits, where its data coordinates are input pixels),
    drawn ``stretch`` (rows, columns of ``ax``'s data per input pixel) larger along each axis."""
    import matplotlib.patheffects as pe

    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    length = 0.12 * min(abs(x1 - x0), abs(y1 - y0))
    base = np.array([y1 + 0.2 * (y0 - y1), x0 + 0.2 * (x1 - x0)])  # y1: the top, whichever way y runs
    north, east = compass(sky.wcs, *(at if at is not None else ((y0 + y1) / 2, (x0 + x1) / 2)))
    halo = [pe.withStroke(linewidth=2.5, foreground="w")]
    for name, v in (("N", north), ("E", east)):
        v = v * np.asarray(stretch, dtype=np.float64)
        v = v / np.hypot(*v)
        tip, label = base + length * v, base + 1.4 * length * v
        ax.annotate("", xy=(tip[1], tip[0]), xytext=(base[1], base[0]), xycoords="data",
                    arrowprops={"arrowstyle": "->", "color": "k", "lw": 1.2, "path_effects": halo})
        ax.text(label[1], label[0], name, ha="center", va="center", fontsize=8, color="k", path_effects=halo)
