"""FITS files to an input stack (``kernelmap ingest``), files written by astropy."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

fits = pytest.importorskip("astropy.io.fits")

from pipeline.errors import InputError, OptionError  # noqa: E402
from pipeline.io.fits import ingest_fits, read_fits_image  # noqa: E402


def _header(crpix=(50.5, 40.5)) -> fits.Header:
    header = fits.Header()
    header.update({"CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CRVAL1": 150.0, "CRVAL2": 2.0,
                   "CRPIX1": crpix[0], "CRPIX2": crpix[1], "CDELT1": -7e-5, "CDELT2": 7e-5,
                   "CUNIT1": "deg", "CUNIT2": "deg"})
    return header


def _write(path, data, *, header=None, compressed=False, mask=None, **keys):
    header = _header() if header is None else header
    header.update(keys)
    if compressed:
        hdus = fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(data, header=header)])
    else:
        hdus = fits.HDUList([fits.PrimaryHDU(data, header=header)])
    if mask is not None:
        hdus.append(fits.ImageHDU(mask, name="MASK"))
    hdus.writeto(path)
    return str(path)


def test_every_flavour_is_read_as_native_floats(tmp_path):
    rng = np.random.default_rng(0)
    values = rng.normal(100, 10, size=(60, 80)).astype(np.float32)
    plain = _write(tmp_path / "plain.fits", values.astype(">f4"))  # FITS is big-endian
    counts = np.round(rng.uniform(0, 60000, size=(60, 80))).astype(np.int32)
    scaled_hdu = fits.PrimaryHDU(counts.astype(np.float64), header=_header())
    scaled_hdu.scale("int16", bscale=1.0, bzero=32768.0)  # unsigned 16-bit data, as cameras write them
    scaled_hdu.writeto(tmp_path / "scaled.fits")
    packed = _write(tmp_path / "packed.fits.fz", counts, compressed=True)  # Rice tile compression, lossless
    for path, expected in ((plain, values), (str(tmp_path / "scaled.fits"), counts), (packed, counts)):
        image = read_fits_image(path)
        assert image.data.dtype == np.float32 and image.data.dtype.isnative
        np.testing.assert_array_equal(image.data, expected.astype(np.float32))


def test_ingest_writes_the_stack_run_reads_with_masks_and_header_keys(tmp_path):
    rng = np.random.default_rng(1)
    reference = _write(tmp_path / "ref.fits", rng.normal(size=(60, 80)).astype(np.float32))
    targets, masks = [], []
    for i in range(3):
        mask = np.zeros((60, 80), np.int16)
        mask[i, :5] = 4  # a bad-column bit
        mask[10 + i, 10] = 8  # a bit that does not count here
        masks.append(mask)
        targets.append(_write(tmp_path / f"epoch-{i}.fits", rng.normal(size=(60, 80)).astype(np.float32),
                              mask=mask, **{"MJD-OBS": 60000.5 + i, "FILTER": "gri"[i]}))
    out = tmp_path / "stack.zarr"
    ingest_fits(reference, [str(tmp_path / "epoch-*.fits")], out, mask_hdu="MASK", mask_bits=4,
                keys=["MJD-OBS", "FILTER"], chunk=32, log=lambda _: None)
    ds = xr.open_zarr(out, consolidated=False)
    assert list(ds["image"].values) == ["epoch-0", "epoch-1", "epoch-2"]
    np.testing.assert_array_equal(ds["MJD-OBS"].values, [60000.5, 60001.5, 60002.5])
    assert list(ds["FILTER"].values) == ["g", "r", "i"]
    np.testing.assert_array_equal(ds["source"].values, read_fits_image(reference).data)
    np.testing.assert_array_equal(ds["target"].values[2], read_fits_image(targets[2]).data)
    np.testing.assert_array_equal(ds["mask"].values, np.stack([(m & 4) != 0 for m in masks]))
    assert ds["target"].encoding["chunks"] == (1, 32, 32)
    assert "RA---TAN" in ds.attrs["reference_wcs"]
    with pytest.raises(OptionError, match="already exists: nothing was changed"):
        ingest_fits(reference, targets, out, log=lambda _: None)


def test_a_target_off_the_reference_grid_is_refused_saying_how_far_before_anything_is_written(tmp_path):
    rng = np.random.default_rng(2)
    reference = _write(tmp_path / "ref.fits", rng.normal(size=(60, 80)).astype(np.float32))
    on = _write(tmp_path / "on.fits", rng.normal(size=(60, 80)).astype(np.float32))
    off = _write(tmp_path / "off.fits", rng.normal(size=(60, 80)).astype(np.float32),
                 header=_header(crpix=(51.0, 40.5)))  # half a pixel along x
    with pytest.raises(InputError, match=r"off.fits is not on the reference's pixel grid: .* up to 0.5 px"):
        ingest_fits(reference, [on, off], tmp_path / "stack.zarr", log=lambda _: None)
    assert not (tmp_path / "stack.zarr").exists()
    ingest_fits(reference, [on, off], tmp_path / "stack.zarr", tolerance=0.6, log=lambda _: None)
    other = _write(tmp_path / "small.fits", rng.normal(size=(50, 80)).astype(np.float32))
    with pytest.raises(InputError, match="is 50x80 px, the reference .* 60x80"):
        ingest_fits(reference, [other], tmp_path / "other.zarr", log=lambda _: None)


def test_a_missing_hdu_or_file_is_named(tmp_path):
    reference = _write(tmp_path / "ref.fits", np.zeros((20, 20), np.float32))
    with pytest.raises(InputError, match=r"has no mask HDU 'DQ' \(it has 0: PRIMARY\)"):
        read_fits_image(reference, mask_hdu="DQ")
    with pytest.raises(InputError, match="no file matches"):
        ingest_fits(reference, [str(tmp_path / "nothing-*.fits")], tmp_path / "s.zarr", log=lambda _: None)
    (tmp_path / "junk.fits").write_text("not a FITS file")
    with pytest.raises(InputError, match="cannot be read as FITS"):
        read_fits_image(tmp_path / "junk.fits")


def test_fits_files_give_the_kernel_map_their_zarr_stack_gives(tmp_path):
    """The demo's stack as FITS files, ingested: the same kernel map as from the demo's own store; then the
    difference images."""
    from pipeline.job.apply import apply_kernel_map
    from pipeline.job.config import job_from_dict
    from pipeline.job.run import run_job
    from pipeline.sim.demo import demo_dataset

    ds, _ = demo_dataset(n_images=2, size=256, bad_pixels=False)
    ds.to_zarr(tmp_path / "demo.zarr", consolidated=False)
    reference = _write(tmp_path / "ref.fits", ds["source"].values)
    targets = [_write(tmp_path / f"t{i}.fits", ds["target"].values[i]) for i in range(2)]
    ingest_fits(reference, targets, tmp_path / "ingested.zarr", log=lambda _: None)
    results = []
    for name in ("demo", "ingested"):
        job = {"input": {"path": str(tmp_path / f"{name}.zarr")}, "tiles": {"size": 128}, "kernel": {"size": 15},
               "output": {"path": str(tmp_path / f"{name}-kernels.zarr")}, "compute": {"scheduler": "threads"}}
        run_job(job_from_dict(job), progress=False)
        results.append(xr.open_zarr(tmp_path / f"{name}-kernels.zarr", consolidated=False).load())
    for name in ("kernel", "flux", "model_coefficient", "model_degree"):
        np.testing.assert_array_equal(results[0][name].values, results[1][name].values, err_msg=name)
    # the ingested stack's WCS gives each tile centre's place on the sky
    from astropy.wcs import WCS

    mapped = results[1]
    assert "ra" not in results[0].coords and mapped["ra"].dims == ("y", "x")
    yy, xx = np.meshgrid(mapped["y"].values, mapped["x"].values, indexing="ij")
    sky = WCS(_header()).pixel_to_world(xx, yy)
    np.testing.assert_allclose(mapped["ra"].values, sky.ra.deg, rtol=0, atol=1e-9)
    np.testing.assert_allclose(mapped["dec"].values, sky.dec.deg, rtol=0, atol=1e-9)
    assert "RA---TAN" in mapped.attrs["reference_wcs"]
    apply_kernel_map(tmp_path / "ingested-kernels.zarr", tmp_path / "images.zarr", fits=tmp_path / "fits",
                     log=lambda _: None)
    difference = xr.open_zarr(tmp_path / "images.zarr", consolidated=False)["difference"].values
    assert np.isfinite(difference).mean() > 0.85
    for i, label in enumerate(mapped["image"].values):  # and as FITS files, on the reference's sky grid
        with fits.open(tmp_path / "fits" / f"{label}.diff.fits") as hdus:
            np.testing.assert_array_equal(hdus[0].data, difference[i])
            assert hdus[0].header["CTYPE1"] == "RA---TAN" and hdus[0].header["CRPIX1"] == 50.5


def test_kernelmap_ingest_on_the_command_line(tmp_path, capsys):
    from pipeline.cli import main

    reference = _write(tmp_path / "ref.fits", np.ones((20, 30), np.float32))
    for i in range(2):
        _write(tmp_path / f"t{i}.fits", np.full((20, 30), i, np.float32), AIRMASS=1.1 + i)
    out = tmp_path / "stack.zarr"
    assert main(["ingest", reference, str(tmp_path / "t*.fits"), "--out", str(out), "--keys", "AIRMASS"]) == 0
    assert "2 target(s) and the reference written" in capsys.readouterr().out
    np.testing.assert_array_equal(xr.open_zarr(out, consolidated=False)["AIRMASS"].values, [1.1, 2.1])
    assert main(["ingest", reference, str(tmp_path / "t0.fits"), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    other = str(tmp_path / "other.zarr")
    assert main(["ingest", reference, str(tmp_path / "t0.fits"), "--out", other, "--hdu", "SCI"]) == 2
    assert "has no image HDU 'SCI'" in capsys.readouterr().err


def test_one_job_goes_from_fits_files_to_kernel_maps(tmp_path, capsys):
    import yaml

    from pipeline.cli import main
    from pipeline.sim.demo import demo_dataset

    ds, _ = demo_dataset(n_images=2, size=256, bad_pixels=False)
    reference = _write(tmp_path / "ref.fits", ds["source"].values)
    for i in range(2):
        _write(tmp_path / f"epoch-{i}.fits", ds["target"].values[i], **{"MJD-OBS": 60000.0 + i})
    job = {"ingest": {"reference": reference, "targets": [str(tmp_path / "epoch-*.fits")], "keys": ["MJD-OBS"]},
           "input": {"path": str(tmp_path / "stack.zarr")}, "tiles": {"size": 128}, "kernel": {"size": 15},
           "output": {"path": str(tmp_path / "kernels.zarr")}, "compute": {"scheduler": "threads"}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    assert main(["run", str(path), "--dry-run"]) == 0
    assert "to be written from" in capsys.readouterr().out and not (tmp_path / "stack.zarr").exists()
    assert main(["run", str(path), "--quiet"]) == 0
    said = capsys.readouterr().out
    assert "ingest: 2 target(s) and the reference written" in said
    stack = xr.open_zarr(tmp_path / "stack.zarr", consolidated=False)
    np.testing.assert_array_equal(stack["MJD-OBS"].values, [60000.0, 60001.0])
    maps = xr.open_zarr(tmp_path / "kernels.zarr", consolidated=False)
    assert maps["model_degree"].values.min() >= 0 and "ra" in maps.coords
    np.testing.assert_array_equal(maps["MJD-OBS"].values, [60000.0, 60001.0])  # carried on to the kernel map
    assert maps["MJD-OBS"].dims == ("image",)
    # run again: the stack is there, from the same files
    assert main(["run", str(path), "--quiet", "--set", "output.mode=overwrite"]) == 0
    assert "written from these FITS files already" in capsys.readouterr().out
    # another ingest section: the stack there was not made from it
    assert main(["run", str(path), "--quiet", "--set", "output.mode=overwrite", "--set", "ingest.keys=[]"]) == 2
    assert "exists but was not written from this ingest section" in capsys.readouterr().err
