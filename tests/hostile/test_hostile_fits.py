"""Hostile FITS files for ``kernelmap ingest``: not FITS, truncated, a pipe or a folder in a file's place, no
2-D image, off the reference's grid, missing; and outputs that would overwrite an input or cannot be written.
Each is refused (exit status 2) from the files' headers, before the stack is created: no output, no byte of
the FITS files changed."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import zarr

fits = pytest.importorskip("astropy.io.fits")

from pipeline.errors import InputError, OptionError  # noqa: E402
from pipeline.job.ingest import ingest_fits  # noqa: E402

from .conftest import Case, check_case, raises_exactly, read_only, refused  # noqa: E402

RNG = np.random.default_rng(3)


def _image(path: Path, shape=(64, 64), **header) -> None:
    hdu = fits.PrimaryHDU(RNG.normal(100.0, 5.0, size=shape).astype(np.float32))
    hdu.header.update(header)
    hdu.writeto(path)


def _truncated(path: Path) -> None:
    _image(path.with_suffix(".whole"))
    data = path.with_suffix(".whole").read_bytes()
    os.remove(path.with_suffix(".whole"))
    path.write_bytes(data[: len(data) // 4])  # the header and a quarter of the pixels


def _with_mask(path: Path, dtype=np.uint8) -> None:
    """An image with an 8-bit unsigned (BITPIX 8) mask HDU ``MASK``."""
    hdus = fits.HDUList([fits.PrimaryHDU(RNG.normal(100.0, 5.0, size=(64, 64)).astype(np.float32)),
                         fits.ImageHDU(np.zeros((64, 64), dtype), name="MASK")])
    hdus.writeto(path)


def ingest_case(make_target, *, options: tuple[str, ...] = (), target: str = "target.fits", out: str = "stack.zarr"):
    """A case's build: a good reference ``ref.fits`` and ``make_target(tmp / target)`` (None: nothing)."""
    def build(tmp: Path) -> list[str]:
        _image(tmp / "ref.fits")
        if make_target is not None:
            make_target(tmp / target)
        if out == "other.zarr":  # a Zarr store another program wrote
            zarr.open_group(str(tmp / out), mode="w").attrs["written_by"] = "another program"
        return ["ingest", str(tmp / "ref.fits"), str(tmp / target), "--out", str(tmp / out), "--quiet", *options]
    return build


def api(target: str = "target.fits", out: str = "stack.zarr", **options):
    def call(tmp: Path) -> None:
        ingest_fits(tmp / "ref.fits", [str(tmp / target)], tmp / out, log=lambda _: None, **options)
    return call


CASES = [
    Case("fits-not-fits", ingest_case(lambda p: p.write_text("SIMPLE? no: just text\n" * 40)), InputError,
         ("target.fits cannot be read as FITS",), ("give a FITS file, plain or tile-compressed",), api()),
    Case("fits-truncated", ingest_case(_truncated), InputError,
         ("target.fits is truncated", "smaller than the expected size"), ("copy it again from its source",), api()),
    # a pipe in a file's place: reading it would wait for a writer forever, so it is refused unread
    Case("fits-is-a-pipe", ingest_case(os.mkfifo), InputError,
         ("target.fits is not a regular file (a pipe",), ("give the path of the FITS file itself",), api()),
    Case("fits-is-a-folder", ingest_case(Path.mkdir), InputError,
         ("target.fits is a folder, not a FITS file",), ("give the path of the FITS file itself",), api()),
    Case("fits-missing", ingest_case(None), InputError, ("target.fits: no such file",), ("check the path",), api()),
    Case("fits-pattern-matches-nothing", ingest_case(None, target="night-*.fits"), InputError,
         ("no file matches", "night-*.fits"), ("check the pattern and its folder",), api(target="night-*.fits")),
    Case("fits-cube", ingest_case(lambda p: _image(p, (2, 64, 64))), InputError,
         ("target.fits: HDU 0 holds no 2-D image (shape (2, 64, 64))",), ("choose the HDU of the image",), api()),
    Case("fits-1-d", ingest_case(lambda p: _image(p, (64,))), InputError,
         ("target.fits: HDU 0 holds no 2-D image (shape (64,))",), ("choose the HDU of the image",), api()),
    Case("fits-off-the-reference-grid", ingest_case(lambda p: _image(p, (60, 64))), InputError,
         ("target.fits is 60x64 px", "ref.fits 64x64"), ("--reproject",), api()),
    Case("fits-missing-hdu", ingest_case(_image, options=("--hdu", "SCI")), InputError,
         ("has no image HDU 'SCI' (it has 0: PRIMARY)",), ("set the image HDU by index or name",),
         api(hdu="SCI")),
    # bits an unsigned 8-bit mask cannot hold: 256 overflows it, so no pixel would ever be flagged by them
    Case("fits-mask-bits-overflow-an-8-bit-mask", ingest_case(_with_mask, options=("--mask-hdu", "MASK",
                                                                                   "--mask-bits", "256")),
         InputError, ("mask HDU 'MASK'", "mask bits 256 (0x100)", "8 bits", "at most 0xff"),
         ("give the bits of this mask's flags",), api(mask_hdu="MASK", mask_bits=256)),
    Case("ingest-onto-a-store-another-program-wrote", ingest_case(_image, out="other.zarr", options=("--overwrite",)),
         OptionError, ("other.zarr is not a stack written by kernelmap ingest", "nothing was changed"),
         ("remove it yourself or choose another --out",), api(out="other.zarr", mode="overwrite")),
    Case("ingest-output-is-an-input", ingest_case(_image, out="target.fits"), OptionError,
         ("target.fits is one of the input files", "nothing was changed"), ("give another output path",),
         api(out="target.fits")),
]


@pytest.mark.parametrize("case", [c.param() for c in CASES])
def test_a_hostile_fits_file_is_refused_before_the_stack_is_created(case, tmp_path, capsys):
    check_case(case, tmp_path, capsys)
    assert not (tmp_path / "stack.zarr").exists()


def test_an_ingest_into_a_read_only_folder_is_refused(tmp_path, capsys):
    _image(tmp_path / "ref.fits")
    _image(tmp_path / "target.fits")
    with read_only(tmp_path / "locked") as locked:
        argv = ["ingest", str(tmp_path / "ref.fits"), str(tmp_path / "target.fits"), "--out",
                str(locked / "stack.zarr"), "--quiet"]
        result = refused(capsys, argv, watch=[tmp_path])
        assert f"--out {locked / 'stack.zarr'}: {locked} is on a read-only file system" in result.err
        assert "choose another output path (or make that folder writable)" in result.err
        raises_exactly(OptionError, lambda: ingest_fits(tmp_path / "ref.fits", [str(tmp_path / "target.fits")],
                                                        locked / "stack.zarr", log=lambda _: None), watch=[tmp_path])
