"""Built-in demo data: a survey-like image stack with a known kernel field.

One shared reference image (``source``, 2-D) and ``n_images`` target epochs
(``target``, 3-D) of the same simulated sky. Each epoch is the noiseless scene
convolved with a kernel field that varies smoothly across the field and from
epoch to epoch, scaled in flux, shifted by a fraction of a pixel and offset by
a constant background; then both images get Poisson and read noise
independently, and the targets get a few NaN bad pixels.

With ``u = x / (nx - 1)``, ``v = y / (ny - 1)``, ``X = 2u - 1``, ``Y = 2v - 1``
(image pixel coordinates, centres at integers) the kernel of epoch ``i`` at
``(y, x)`` is ``gaussian_kernel(kernel_size, fwhm, e1, e2, dy_i, dx_i,
flux_i)`` (see :mod:`pipeline.sim.scenes`) with::

    fwhm = 2.0 + 1.4 u + 0.3 (v - 0.5) + dfwhm_i
    e1   = 0.035 (X**2 - Y**2) + c1_i
    e2   = 0.07 X Y            + c2_i

so the FWHM grows from about 2.0 px on the left to 3.4 px on the right, and
the distortion, at most ``0.035 (X**2 + Y**2) + 0.03 <= 0.1``, is radial about
the field centre and rotates with the position angle there. Per epoch, from
the seed: ``dfwhm_i ~ U(-0.3, 0.3)``; ``(c1_i, c2_i) = 0.03 (cos 2p, sin 2p)``
with ``p ~ U(0, pi)``; the offset ``(dy_i, dx_i) = r (sin t, cos t)`` with
``r ~ U(0.1, 0.4)``, ``t ~ U(0, 2 pi)``; ``flux_i ~ U(0.9, 1.1)``; the
background ``b_i ~ U(-20, 50)`` ADU.

The field is applied piecewise constant (:func:`pipeline.sim.scenes.convolve_varying`)
on ``PATCH``-pixel blocks aligned with the image origin: light landing on
pixel ``(y, x)`` went through the kernel at the block centre
``(PATCH floor(y / PATCH) + (PATCH - 1) / 2, ...)``
(:meth:`DemoTruth.patch_centre`). A tile made of whole blocks therefore sees
the average of its blocks' kernels, which for this slowly varying field is the
field at the tile centre to within its curvature.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import xarray as xr

from ..core.validate import check_int, check_odd_size
from ..errors import InputError, OptionError
from .scenes import (
    MoffatPSF,
    add_noise,
    convolve_varying,
    gaussian_kernel,
    render_scene,
    scene_reach,
)

if TYPE_CHECKING:
    from ..job.config import JobConfig

__all__ = [
    "DemoTruth",
    "GAIN",
    "PATCH",
    "PSF_FWHM",
    "READ_NOISE",
    "SKY",
    "demo_dataset",
    "write_demo_stack",
]

#: Block size of the piecewise-constant kernel field, pixels.
PATCH = 32
#: Moffat PSF of the simulated sky, FWHM pixels (``beta = 3.5``).
PSF_FWHM = 2.8
_PSF_BETA = 3.5
#: Sky level of both images before it is subtracted, ADU per pixel.
SKY = 1000.0
#: Read noise of both images, electrons RMS.
READ_NOISE = 5.0
#: Gain of both images, electrons per ADU.
GAIN = 1.0

_FWHM_FORMULA = "2.0 + 1.4 * u + 0.3 * (v - 0.5) + truth_fwhm_shift[i]"
_E1_FORMULA = "0.035 * (X**2 - Y**2) + truth_e1_const[i]"
_E2_FORMULA = "0.07 * X * Y + truth_e2_const[i]"


def _image_index(image: object, n: int) -> int:
    if isinstance(image, bool) or not isinstance(image, (int, np.integer)):
        raise OptionError(f"image must be an integer index, got {image!r}")
    if not 0 <= image < n:
        raise OptionError(f"image must be in [0, {n}), got {image}")
    return int(image)


@dataclass(frozen=True)
class DemoTruth:
    """The true kernel field, flux scales and backgrounds of a demo stack.

    Attributes
    ----------
    n_images, shape, kernel_size, labels
        Number of target epochs, ``(ny, nx)``, kernel stamp size, epoch labels.
    seed, patch
        Seed of the simulation and block size of the kernel field.
    fwhm_shift, e_const, shifts, flux_scale, sky_offset
        Per-epoch parameters ``dfwhm_i``, ``(c1_i, c2_i)``, ``(dy_i, dx_i)``,
        ``flux_i`` and ``b_i`` of the module's formulas.
    """

    n_images: int
    shape: tuple[int, int]
    kernel_size: int
    labels: tuple[str, ...]
    seed: int
    patch: int
    fwhm_shift: tuple[float, ...]
    e_const: tuple[tuple[float, float], ...]
    shifts: tuple[tuple[float, float], ...]
    flux_scale: tuple[float, ...]
    sky_offset: tuple[float, ...]

    def _uv(self, y: Any, x: Any) -> tuple[np.ndarray, np.ndarray]:
        ny, nx = self.shape
        y, x = np.broadcast_arrays(np.asarray(y, dtype=np.float64),
                                   np.asarray(x, dtype=np.float64))
        return y / (ny - 1), x / (nx - 1)

    def fwhm(self, image: int, y: Any, x: Any) -> np.ndarray:
        """True kernel FWHM (pixels) of epoch ``image`` at positions ``(y, x)``.

        Vectorised: ``y`` and ``x`` broadcast against each other.
        """
        i = _image_index(image, self.n_images)
        v, u = self._uv(y, x)
        return 2.0 + 1.4 * u + 0.3 * (v - 0.5) + self.fwhm_shift[i]

    def ellipticity(self, image: int, y: Any, x: Any) -> tuple[np.ndarray, np.ndarray]:
        """True kernel distortion ``(e1, e2)`` of epoch ``image`` at ``(y, x)``."""
        i = _image_index(image, self.n_images)
        v, u = self._uv(y, x)
        big_x, big_y = 2.0 * u - 1.0, 2.0 * v - 1.0
        c1, c2 = self.e_const[i]
        return 0.035 * (big_x ** 2 - big_y ** 2) + c1, 0.07 * big_x * big_y + c2

    def flux(self, image: int) -> float:
        """Flux scale (kernel sum) of epoch ``image``."""
        return self.flux_scale[_image_index(image, self.n_images)]

    def offset(self, image: int) -> tuple[float, float]:
        """Sub-pixel shift ``(dy, dx)`` of the kernel centre of epoch ``image``."""
        return self.shifts[_image_index(image, self.n_images)]

    def background(self, image: int) -> float:
        """Constant background of epoch ``image`` relative to ``K (*) source``, ADU."""
        return self.sky_offset[_image_index(image, self.n_images)]

    def kernel(self, image: int, y: float, x: float) -> np.ndarray:
        """The ``(kernel_size, kernel_size)`` true kernel of epoch ``image`` at ``(y, x)``."""
        e1, e2 = self.ellipticity(image, y, x)
        dy, dx = self.offset(image)
        return gaussian_kernel(self.kernel_size, fwhm=float(self.fwhm(image, y, x)),
                               e1=float(e1), e2=float(e2), dy=dy, dx=dx,
                               flux=self.flux(image))

    def patch_centre(self, y: Any, x: Any) -> tuple[np.ndarray, np.ndarray]:
        """Centre of the kernel-field block holding pixel ``(y, x)`` (vectorised)."""
        p = self.patch
        cy = p * np.floor(np.asarray(y, dtype=np.float64) / p) + (p - 1) / 2.0
        cx = p * np.floor(np.asarray(x, dtype=np.float64) / p) + (p - 1) / 2.0
        return cy, cx

    def patch_kernel(self, image: int, y: float, x: float) -> np.ndarray:
        """The kernel actually applied to light landing on pixel ``(y, x)``."""
        cy, cx = self.patch_centre(y, x)
        return self.kernel(image, float(cy), float(cx))

    def to_attrs(self) -> dict[str, Any]:
        """JSON-serialisable attributes from which :meth:`from_attrs` rebuilds this."""
        return {
            "seed": self.seed,
            "n_images": self.n_images,
            "shape": list(self.shape),
            "kernel_size": self.kernel_size,
            "kernel_field_patch": self.patch,
            "truth_fwhm_shift": list(self.fwhm_shift),
            "truth_e1_const": [c[0] for c in self.e_const],
            "truth_e2_const": [c[1] for c in self.e_const],
            "truth_offset_y": [s[0] for s in self.shifts],
            "truth_offset_x": [s[1] for s in self.shifts],
            "truth_flux": list(self.flux_scale),
            "truth_background": list(self.sky_offset),
            "labels": list(self.labels),
        }

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> DemoTruth:
        """Rebuild the truth from a demo store's attributes (``Dataset.attrs``)."""
        try:
            return cls(
                n_images=int(attrs["n_images"]),
                shape=(int(attrs["shape"][0]), int(attrs["shape"][1])),
                kernel_size=int(attrs["kernel_size"]),
                labels=tuple(str(s) for s in attrs["labels"]),
                seed=int(attrs["seed"]),
                patch=int(attrs["kernel_field_patch"]),
                fwhm_shift=tuple(float(v) for v in attrs["truth_fwhm_shift"]),
                e_const=tuple((float(a), float(b)) for a, b in
                              zip(attrs["truth_e1_const"], attrs["truth_e2_const"])),
                shifts=tuple((float(a), float(b)) for a, b in
                             zip(attrs["truth_offset_y"], attrs["truth_offset_x"])),
                flux_scale=tuple(float(v) for v in attrs["truth_flux"]),
                sky_offset=tuple(float(v) for v in attrs["truth_background"]),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise InputError(f"these attributes do not describe a demo stack: {exc!r}") from None


# --------------------------------------------------------------------------
# simulation


def _check_options(n_images: object, size: object, kernel_size: object,
                   seed: object) -> tuple[int, int, int, int]:
    n_images = check_int("n_images", n_images, 1)
    size = check_int("size", size, PATCH)
    kernel_size = check_odd_size("kernel_size", kernel_size)
    if kernel_size < 3:
        raise OptionError(f"kernel_size must be at least 3, got {kernel_size}")
    if kernel_size > size:
        raise OptionError(f"kernel_size must be <= size ({size}), got {kernel_size}")
    seed = check_int("seed", seed, 0)
    return n_images, size, kernel_size, seed


def _stream(seed: int, *key: int) -> np.random.Generator:
    """Independent random stream ``key`` of the demo with ``seed``."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


# Stream keys: the scene, the source noise, and per epoch i its parameters,
# noise and bad pixels.
_SCENE, _SOURCE_NOISE, _EPOCH = 0, 1, 2
_PARAMS, _NOISE, _BAD = 0, 1, 2


def _epoch_truth(n_images: int, size: int, kernel_size: int, seed: int) -> DemoTruth:
    fwhm_shift, e_const, shifts, flux, sky = [], [], [], [], []
    for i in range(n_images):
        rng = _stream(seed, _EPOCH, i, _PARAMS)
        fwhm_shift.append(float(rng.uniform(-0.3, 0.3)))
        p = rng.uniform(0.0, math.pi)
        e_const.append((0.03 * math.cos(2.0 * p), 0.03 * math.sin(2.0 * p)))
        r, t = rng.uniform(0.1, 0.4), rng.uniform(0.0, 2.0 * math.pi)
        shifts.append((float(r * math.sin(t)), float(r * math.cos(t))))
        flux.append(float(rng.uniform(0.9, 1.1)))
        sky.append(float(rng.uniform(-20.0, 50.0)))
    return DemoTruth(
        n_images=n_images, shape=(size, size), kernel_size=kernel_size,
        labels=tuple(f"epoch-{i}" for i in range(n_images)), seed=seed, patch=PATCH,
        fwhm_shift=tuple(fwhm_shift), e_const=tuple(e_const), shifts=tuple(shifts),
        flux_scale=tuple(flux), sky_offset=tuple(sky),
    )


def _bad_pixels(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Boolean mask: one bad column segment, a few round blobs, hot pixels."""
    ny, nx = shape
    bad = np.zeros(shape, dtype=bool)
    length = int(rng.integers(ny // 8, ny // 3 + 1))
    y0 = int(rng.integers(0, ny - length + 1))
    bad[y0:y0 + length, int(rng.integers(0, nx))] = True
    yy, xx = np.ogrid[:ny, :nx]
    for _ in range(1 + (ny * nx) // 200_000):
        cy, cx = rng.uniform(0, ny - 1), rng.uniform(0, nx - 1)
        r = rng.uniform(1.5, 4.0)
        bad |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    n_hot = int(rng.poisson(2e-4 * ny * nx))
    bad[rng.integers(0, ny, n_hot), rng.integers(0, nx, n_hot)] = True
    return bad


def demo_dataset(
    *,
    n_images: int = 3,
    size: int = 768,
    kernel_size: int = 15,
    seed: int = 2026,
    noise: bool = True,
    bad_pixels: bool = True,
) -> tuple[xr.Dataset, DemoTruth]:
    """Simulate the demo stack in memory.

    Parameters
    ----------
    n_images
        Number of target epochs.
    size
        Image size (square), pixels, ``>= PATCH``.
    kernel_size
        Odd size of the true kernels.
    seed
        Non-negative integer; the result is a function of the options alone,
        and epoch ``i`` does not depend on ``n_images``.
    noise
        Add Poisson and read noise (sky 1000 ADU, read noise 5 e-, gain 1);
        without it ``source`` is the noiseless scene and ``target`` its exact
        expectation.
    bad_pixels
        Set a bad column segment, a few blobs and hot pixels of each target
        to NaN (well under 1 % of the pixels).

    Returns
    -------
    dataset : xarray.Dataset
        ``source`` ``(y, x)`` and ``target`` ``(image, y, x)``, float32, with
        the ``image`` coordinate and attributes describing the simulation.
    truth : DemoTruth
    """
    n_images, size, kernel_size, seed = _check_options(n_images, size, kernel_size, seed)
    truth = _epoch_truth(n_images, size, kernel_size, seed)

    # The scene on a canvas wide enough that every pixel within a kernel
    # half-size of the image gets all its light, and that holds whole
    # kernel-field blocks aligned with the image origin around the image.
    psf = MoffatPSF(fwhm=PSF_FWHM, beta=_PSF_BETA)
    half = kernel_size // 2
    lead = PATCH * -(-half // PATCH)
    tail = PATCH * -(-(size + half) // PATCH) - size
    margin = max(scene_reach(psf) + half, lead, tail)
    canvas, _ = render_scene(_stream(seed, _SCENE), (size, size), psf=psf,
                             margin=margin)
    image = (slice(margin, margin + size),) * 2
    scene = canvas[image]
    region = canvas[margin - lead:margin + size + tail, margin - lead:margin + size + tail]

    if noise:
        source = add_noise(_stream(seed, _SOURCE_NOISE), scene, sky=SKY,
                           read_noise=READ_NOISE, gain=GAIN)[0]
    else:
        source = scene
    target = np.empty((n_images, size, size), dtype=np.float32)
    for i in range(n_images):
        conv = convolve_varying(
            region, lambda yc, xc, i=i: truth.kernel(i, yc - lead, xc - lead),
            patch=PATCH, kernel_size=kernel_size)[lead:lead + size, lead:lead + size]
        if noise:
            conv = add_noise(_stream(seed, _EPOCH, i, _NOISE), conv, sky=SKY,
                             read_noise=READ_NOISE, gain=GAIN)[0]
        target[i] = conv + truth.background(i)
        if bad_pixels:
            target[i][_bad_pixels(_stream(seed, _EPOCH, i, _BAD), (size, size))] = np.nan

    attrs: dict[str, Any] = {
        "title": "kernelmap demo stack",
        "description": (
            "Simulated survey stack with a known kernel field: one shared reference "
            "image (source) and target epochs, target[i] = K_i (*) source_true + "
            "truth_background[i] + noise, with (*) the convolution of "
            "scipy.signal.fftconvolve(source, kernel, mode='same')."),
        "scene": (f"stars and Sersic galaxies, fluxes dN/dF ~ F^-2 on [1e3, 1e6] ADU, "
                  f"Moffat PSF fwhm={PSF_FWHM} px beta={_PSF_BETA}"),
        "noise": (f"Poisson + read noise, independently per image: sky={SKY} ADU, "
                  f"read_noise={READ_NOISE} e-, gain={GAIN} e-/ADU; sky subtracted"
                  if noise else "none"),
        "bad_pixels": ("NaN in target: a bad column segment, a few blobs, hot pixels"
                       if bad_pixels else "none"),
        "kernel_model": ("K_i(y, x) = gaussian_kernel(kernel_size, fwhm, e1, e2, "
                         "dy=truth_offset_y[i], dx=truth_offset_x[i], flux=truth_flux[i]); "
                         "u = x / (nx - 1), v = y / (ny - 1), X = 2u - 1, Y = 2v - 1"),
        "kernel_fwhm": _FWHM_FORMULA,
        "kernel_e1": _E1_FORMULA,
        "kernel_e2": _E2_FORMULA,
        "kernel_field": (f"piecewise constant on {PATCH}x{PATCH}-pixel blocks aligned "
                         f"with pixel (0, 0); each block uses the kernel at its centre"),
        "conventions": ("odd kernels centred at (k//2, k//2); pixel centres at integer "
                        "coordinates; bad pixels NaN"),
    }
    attrs.update(truth.to_attrs())
    ds = xr.Dataset(
        {
            "source": (("y", "x"), np.asarray(source, dtype=np.float32),
                       {"long_name": "reference image, sky subtracted", "units": "ADU"}),
            "target": (("image", "y", "x"), target,
                       {"long_name": "target epochs, sky subtracted", "units": "ADU"}),
        },
        coords={"image": ("image", np.array(truth.labels, dtype=object),
                          {"long_name": "epoch label"})},
        attrs=attrs,
    )
    return ds, truth


def write_demo_stack(
    path: str | os.PathLike,
    *,
    n_images: int = 3,
    size: int = 768,
    kernel_size: int = 15,
    seed: int = 2026,
    chunk: int = 256,
    overwrite: bool = False,
) -> DemoTruth:
    """Write the demo stack (:func:`demo_dataset`) to a Zarr (format 3) store.

    Parameters
    ----------
    path
        Store location (local path or fsspec URL).
    n_images, size, kernel_size, seed
        As :func:`demo_dataset`.
    chunk
        Chunk side: ``target`` is chunked ``(1, chunk, chunk)`` and ``source``
        ``(chunk, chunk)`` (clipped to ``size``).
    overwrite
        Replace an existing store at ``path``.

    Returns
    -------
    DemoTruth

    Raises
    ------
    InputError
        If ``path`` exists and ``overwrite`` is false.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise OptionError(f"path must be a string or path-like, got {path!r}")
    if not isinstance(overwrite, bool):
        raise OptionError(f"overwrite must be True or False, got {overwrite!r}")
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise OptionError(f"chunk must be a positive integer, got {chunk!r}")
    target = os.fspath(path)
    if not overwrite and "://" not in str(target) and os.path.exists(target):
        raise InputError(f"{target} already exists; pass overwrite=True to replace it")
    ds, truth = demo_dataset(n_images=n_images, size=size, kernel_size=kernel_size, seed=seed)
    c = min(int(chunk), truth.shape[0])
    encoding = {"target": {"chunks": (1, c, c)}, "source": {"chunks": (c, c)}}
    with warnings.catch_warnings():
        # Consolidated metadata lets plain xarray.open_zarr open the store quietly.
        warnings.filterwarnings("ignore", message="Consolidated metadata",
                                category=UserWarning)
        try:
            ds.to_zarr(target, zarr_format=3, mode="w" if overwrite else "w-",
                       encoding=encoding)
        except FileExistsError:
            raise InputError(f"{target} already exists; pass overwrite=True to replace it"
                             ) from None
    return truth


#: The demo job (``configs/demo.yaml`` holds the same settings, commented).
DEMO_JOB: dict = {
    "input": {"path": "demo-output/stack.zarr", "source": "source", "target": "target"},
    "tiles": {"size": 128, "step": 128},
    "kernel": {"size": 15},
    "output": {"path": "demo-output/kernels.zarr", "mode": "overwrite"},
    "compute": {"scheduler": "local", "n_workers": 2, "threads_per_worker": 1},
}


def demo_job(folder: str | os.PathLike = "demo-output", overrides: Sequence[str] = ()) -> JobConfig:
    """The demo job with its stack and result inside ``folder``."""
    from ..job.config import job_from_dict

    data = {section: dict(values) for section, values in DEMO_JOB.items()}
    data["input"]["path"] = str(Path(folder) / "stack.zarr")
    data["output"]["path"] = str(Path(folder) / "kernels.zarr")
    return job_from_dict(data, overrides)


def summarise_demo(ds, truth: DemoTruth, *, positions: int = 3) -> str:
    """Recovered against true kernels: FWHM range across the field and a few tiles."""
    fwhm = np.asarray(ds["fwhm"].values, dtype=float)
    ys, xs = ds["y"].values, ds["x"].values
    lines = ["", "kernel FWHM across the field (recovered / true, px):"]
    for i, label in enumerate(ds["image"].values):
        yy, xx = np.meshgrid(ys, xs, indexing="ij")
        true = truth.fwhm(i, yy, xx)
        lines.append(f"  {label}: {np.nanmin(fwhm[i]):.2f}-{np.nanmax(fwhm[i]):.2f} / "
                     f"{true.min():.2f}-{true.max():.2f}; median |error| "
                     f"{np.nanmedian(np.abs(fwhm[i] / true - 1)) * 100:.1f} %")
    lines.append("recovered vs true kernel at a few tiles of the first epoch:")
    kern = ds["kernel"]
    picks = [(len(ys) // 2, len(xs) // 2), (0, 0), (len(ys) - 1, len(xs) - 1)][:positions]
    for iy, ix in picks:
        est = np.asarray(kern[0, iy, ix].values, dtype=float)
        true = truth.kernel(0, float(ys[iy]), float(xs[ix]))
        err = np.linalg.norm(est - true) / np.linalg.norm(true)
        lines.append(
            f"  tile at y={ys[iy]:.1f} x={xs[ix]:.1f}: FWHM {fwhm[0, iy, ix]:.2f} (true "
            f"{float(truth.fwhm(0, ys[iy], xs[ix])):.2f}), flux {est.sum():.3f} (true {true.sum():.3f}), "
            f"relative L2 error {err:.3f}"
        )
    if "model_coefficient" in ds:
        tiles, model = model_against_truth(ds, truth)
        lines.append("smooth kernel-field model (per epoch: degree, cross-validated error) and its kernels "
                     "against the truth at the tile centres (median relative L2 error, tiles -> model):")
        for i, label in enumerate(ds["image"].values):
            lines.append(f"  {label}: degree {int(ds['model_degree'].values[i])}, CV error "
                         f"{float(ds['model_cv_error'].values[i]):.3f}; {tiles[i]:.3f} -> {model[i]:.3f}")
    flags = np.asarray(ds["quality_flag"].values)
    lines.append(f"tiles with unusable kernels: {int(np.count_nonzero(flags & 3))} of {flags.size}")
    return "\n".join(lines)


def model_against_truth(ds, truth: DemoTruth) -> tuple[np.ndarray, np.ndarray]:
    """Median relative L2 error against the true kernels at the tile centres, per image:
    ``(tiles, model)``."""
    from ..analysis.maps import KernelMap

    yy, xx = np.meshgrid(ds["y"].values, ds["x"].values, indexing="ij")
    tiles = np.asarray(ds["kernel"].values, dtype=np.float64)
    model = KernelMap(ds).model_kernels().values
    out = np.zeros((2, len(tiles)))
    for i in range(len(tiles)):
        true = np.stack([truth.kernel(i, float(a), float(b)) for a, b in zip(yy.ravel(), xx.ravel())])
        true = true.reshape(tiles.shape[1:])
        norm = np.sum(true**2, axis=(-2, -1))
        for j, est in enumerate((tiles[i], model[i])):
            out[j, i] = np.nanmedian(np.sqrt(np.sum((est - true) ** 2, axis=(-2, -1)) / norm))
    return out[0], out[1]
