"""FITS files to an input stack (``kernelmap ingest``), files written by astropy."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import xarray as xr

fits = pytest.importorskip("astropy.io.fits")

from pipeline.errors import InputError, OptionError  # noqa: E402
from pipeline.io.fits import ImageSpec, Plane, read_image  # noqa: E402
from pipeline.job.ingest import ingest_fits  # noqa: E402


def _header(crpix=(50.5, 40.5)) -> fits.Header:
    header = fits.Header()
    header.update({"CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CRVAL1": 150.0, "CRVAL2": 2.0,
                   "CRPIX1": crpix[0], "CRPIX2": crpix[1], "CDELT1": -7e-5, "CDELT2": 7e-5,
                   "CUNIT1": "deg", "CUNIT2": "deg"})
    return header


def _pixels(path, hdu=0):
    """The image of a FITS file as ingest reads it."""
    return read_image(ImageSpec(Plane(str(path), hdu))).data


def _write(path, data, *, header=None, compressed=False, mask=None, planes=None, **keys):
    header = _header() if header is None else header
    header.update(keys)
    if compressed:
        hdus = fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(data, header=header)])
    else:
        hdus = fits.HDUList([fits.PrimaryHDU(data, header=header)])
    if mask is not None:
        hdus.append(fits.ImageHDU(mask, name="MASK"))
    for name, values in (planes or {}).items():  # more image HDUs: weights, variances
        hdus.append(fits.ImageHDU(values, name=name))
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
        image = _pixels(path)
        assert image.dtype == np.float32 and image.dtype.isnative
        np.testing.assert_array_equal(image, expected.astype(np.float32))


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
    np.testing.assert_array_equal(ds["source"].values, _pixels(reference))
    np.testing.assert_array_equal(ds["target"].values[2], _pixels(targets[2]))
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
        read_image(ImageSpec(Plane(reference), Plane(reference, "DQ", "mask")))
    with pytest.raises(InputError, match="no file matches"):
        ingest_fits(reference, [str(tmp_path / "nothing-*.fits")], tmp_path / "s.zarr", log=lambda _: None)
    (tmp_path / "junk.fits").write_text("not a FITS file")
    with pytest.raises(InputError, match="cannot be read as FITS"):
        _pixels(tmp_path / "junk.fits")


def test_fits_files_give_the_kernel_map_their_zarr_stack_gives(tmp_path):
    """The demo's stack as FITS files, ingested: the same kernel map as from the demo's own store; then the
    difference images."""
    from pipeline.job.apply import apply_kernel_map
    from pipeline.job.config import job_from_dict
    from pipeline.job.run import run_job
    from pipeline.sim.demo import demo_dataset

    ds, truth = demo_dataset(n_images=2, size=256, bad_pixels=False)
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
    # the difference images: the same from both kernel maps, and noise at the level the simulation gives
    apply_kernel_map(tmp_path / "ingested-kernels.zarr", tmp_path / "images.zarr", fits=tmp_path / "fits",
                     log=lambda _: None)
    apply_kernel_map(tmp_path / "demo-kernels.zarr", tmp_path / "demo-images.zarr", log=lambda _: None)
    images = xr.open_zarr(tmp_path / "images.zarr", consolidated=False).load()
    demo_images = xr.open_zarr(tmp_path / "demo-images.zarr", consolidated=False).load()
    for name in ("difference", "matched", "background"):
        np.testing.assert_array_equal(images[name].values, demo_images[name].values, err_msg=name)
    difference = images["difference"].values
    z = difference / np.sqrt(_expected_difference_variance(tmp_path / "ingested-kernels.zarr", truth))
    tile, margin = 128, 15  # each tile's interior: a kernel's width from its edges
    for i in range(2):
        for ty in range(2):
            for tx in range(2):
                inner = z[i, ty * tile + margin:(ty + 1) * tile - margin, tx * tile + margin:(tx + 1) * tile - margin]
                assert np.isfinite(inner).all()
                assert np.sqrt(np.mean(inner**2)) == pytest.approx(1.0, abs=0.05), (i, ty, tx)
    for i, label in enumerate(mapped["image"].values):  # and as FITS files, on the reference's sky grid
        with fits.open(tmp_path / "fits" / f"{label}.diff.fits") as hdus:
            np.testing.assert_array_equal(hdus[0].data, difference[i])
            assert hdus[0].header["CTYPE1"] == "RA---TAN" and hdus[0].header["CRPIX1"] == 50.5


def _expected_difference_variance(kernel_map, truth) -> np.ndarray:
    """The variance of the demo's difference images (``demo_dataset(n_images=2, size=256, bad_pixels=False)``)
    made with ``kernel_map``: the target's plus the matched source's, each the Poisson noise of the noiseless
    image on the sky plus the read noise (gain 1)."""
    import pipeline
    from pipeline.core.apply import matched_variance
    from pipeline.sim.demo import READ_NOISE, SKY, demo_dataset

    clean, _ = demo_dataset(n_images=2, size=256, noise=False, bad_pixels=False)
    km = pipeline.KernelMap.open(kernel_map)
    source = clean["source"].values.astype(np.float64) + SKY + READ_NOISE**2
    return np.stack([clean["target"].values[i] - truth.background(i) + SKY + READ_NOISE**2
                     + matched_variance(source, km.field(label)) for i, label in enumerate(km.ds["image"].values)])


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


# --------------------------------------------------------------------------- weights, variances, mask files

def _quiet(_):
    return None


def test_weights_become_variances_a_zero_weight_no_data_and_the_job_reads_them(tmp_path):
    from pipeline.io.inputs import open_inputs
    from pipeline.job.config import job_from_dict

    rng = np.random.default_rng(3)
    weights = [rng.uniform(0.5, 2.0, size=(40, 50)).astype(np.float32) for _ in range(3)]
    weights[1][5, 7] = 0.0  # no data there
    reference = _write(tmp_path / "ref.fits", rng.normal(size=(40, 50)).astype(np.float32),
                       planes={"WHT": weights[0]})
    targets = [_write(tmp_path / f"t{i}.fits", rng.normal(size=(40, 50)).astype(np.float32),
                      planes={"WHT": weights[i]}) for i in (1, 2)]
    out = tmp_path / "stack.zarr"
    ingest_fits(reference, targets, out, weight_hdu="WHT", log=_quiet)
    ds = xr.open_zarr(out, consolidated=False)
    assert ds["target_variance"].dims == ("image", "y", "x") and ds["source_variance"].dims == ("y", "x")
    with np.errstate(divide="ignore"):
        expect = (1.0 / np.stack(weights).astype(np.float64)).astype(np.float32)
    np.testing.assert_array_equal(ds["target_variance"].values, expect[1:])  # inf where the weight is 0
    assert ds["target_variance"].values[0, 5, 7] == np.inf
    np.testing.assert_array_equal(ds["source_variance"].values, expect[0])
    # the job's input reads the variances the ingest section writes, without being told
    job = job_from_dict({"ingest": {"reference": reference, "targets": targets, "weight_hdu": "WHT"},
                         "input": {"path": str(out)}, "output": {"path": str(tmp_path / "k.zarr")}})
    assert job.input.variance.arrays() == {"target": "target_variance", "source": "source_variance"}
    assert job.input.mask is None
    inputs = open_inputs(out, variance=job.input.variance.arrays())
    block = inputs.reader.read(0, slice(0, 10), slice(0, 10))
    assert block.variance[5, 7] == np.inf and block.variance.dtype == np.float64  # a bad pixel of the run
    np.testing.assert_array_equal(block.source_variance, expect[0][:10, :10])


def test_variance_and_mask_files_by_template_with_the_bits_that_count(tmp_path):
    rng = np.random.default_rng(4)
    reference = _write(tmp_path / "ref.fits", rng.normal(size=(30, 40)).astype(np.float32))
    variances, masks = [], []
    for i in range(2):
        _write(tmp_path / f"epoch-{i}.fits.fz", rng.normal(size=(30, 40)).astype(np.float32), compressed=True)
        variance = rng.uniform(1, 3, size=(30, 40)).astype(np.float32)
        variance[i, i] = np.nan  # no data
        variances.append(variance)
        fits.PrimaryHDU(variance).writeto(tmp_path / f"epoch-{i}.var.fits")
        mask = np.zeros((30, 40), np.int32)
        mask[3, : 4 + i] = 1 | 16
        mask[9, 9] = 2  # a bit that does not count
        masks.append(mask)
        fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(mask, name="DQ")]).writeto(tmp_path / f"epoch-{i}.dq.fits")
    out = tmp_path / "stack.zarr"
    ingest_fits(reference, [str(tmp_path / "epoch-*.fits.fz")], out, variance_file="{dir}/{stem}.var.fits",
                reference_noise=False, mask_file="{dir}/{stem}.dq.fits", mask_hdu="DQ", mask_bits=16, log=_quiet)
    ds = xr.open_zarr(out, consolidated=False)
    assert "source_variance" not in ds and list(ds["image"].values) == ["epoch-0", "epoch-1"]
    np.testing.assert_array_equal(ds["target_variance"].values, np.stack(variances))
    np.testing.assert_array_equal(ds["mask"].values, np.stack([(m & 16) != 0 for m in masks]).astype(np.uint8))
    from pipeline.job.config import job_from_dict

    job = job_from_dict({"ingest": {"reference": reference, "targets": [str(tmp_path / "epoch-*.fits.fz")],
                                    "variance_file": "{dir}/{stem}.var.fits", "reference_noise": False,
                                    "mask_file": "{dir}/{stem}.dq.fits", "mask_hdu": "DQ"},
                         "input": {"path": str(out)}, "output": {"path": str(tmp_path / "k.zarr")}})
    assert job.input.mask == "mask" and job.input.variance.arrays() == {"target": "target_variance"}


def test_bad_weight_variance_and_mask_planes_are_named_before_anything_is_written(tmp_path):
    from pipeline.errors import ConfigError
    from pipeline.job.config import job_from_dict

    rng = np.random.default_rng(5)
    reference = _write(tmp_path / "ref.fits", rng.normal(size=(30, 40)).astype(np.float32),
                       planes={"WHT": np.ones((30, 40), np.float32)})
    plain = _write(tmp_path / "plain.fits", rng.normal(size=(30, 40)).astype(np.float32))
    out = tmp_path / "stack.zarr"
    with pytest.raises(InputError, match=r"plain.fits has no weight HDU 'WHT' \(it has 0: PRIMARY\)"):
        ingest_fits(reference, [plain], out, weight_hdu="WHT", log=_quiet)
    small = _write(tmp_path / "small.fits", rng.normal(size=(30, 40)).astype(np.float32),
                   planes={"WHT": np.ones((20, 40), np.float32)})
    with pytest.raises(InputError, match=r"small.fits: the weight HDU 'WHT' is 20x40 px, the image .* 30x40"):
        ingest_fits(reference, [small], out, weight_hdu="WHT", log=_quiet)
    with pytest.raises(InputError, match=r"plain.wht.fits: no such file"):
        ingest_fits(reference, [plain], out, weight_file="{dir}/{stem}.wht.fits", reference_noise=False,
                    log=_quiet)
    assert not out.exists()
    with pytest.raises(ConfigError, match=r"ingest.variance_hdu: weights are given too"):
        ingest_fits(reference, [plain], out, weight_hdu="WHT", variance_hdu=1, log=_quiet)
    with pytest.raises(ConfigError, match=r"ingest.weight_file: .* names \{path\}: the placeholders are"):
        ingest_fits(reference, [plain], out, weight_file="{path}.wht", log=_quiet)
    with pytest.raises(ConfigError, match=r"ingest.mask_bits: no mask is read"):
        ingest_fits(reference, [plain], out, mask_bits=4, log=_quiet)
    with pytest.raises(ConfigError, match=r"input.weight: the ingest section writes variances"):
        job_from_dict({"ingest": {"reference": reference, "targets": [plain], "weight_hdu": "WHT"},
                       "input": {"path": str(out), "weight": {"target": "w"}}, "output": {"path": "k.zarr"}})
    assert not out.exists()
    # negative variances are found as the image is read: that image is not recorded, the others are;
    # once the file is fixed, the same ingest finishes the stack
    good = _write(tmp_path / "good.fits", rng.normal(size=(30, 40)).astype(np.float32),
                  planes={"VAR": np.ones((30, 40), np.float32)})
    variance = np.ones((30, 40), np.float32)
    variance[4, 5] = -2.0
    negative = _write(tmp_path / "negative.fits", rng.normal(size=(30, 40)).astype(np.float32),
                      planes={"VAR": variance})
    with pytest.raises(InputError, match=r"negative.fits, variance HDU 'VAR': 1 negative variance\(s\) \(e.g. -2\)"):
        ingest_fits(reference, [good, negative], out, variance_hdu="VAR", reference_noise=False, workers=1,
                    log=_quiet)
    written = np.asarray(__import__("zarr").open_group(str(out), mode="r")["ingest/target_written"][...])
    np.testing.assert_array_equal(written, [1, 0])
    with fits.open(negative, mode="update") as hdus:
        hdus["VAR"].data[4, 5] = 2.0
    said = []
    ingest_fits(reference, [good, negative], out, variance_hdu="VAR", reference_noise=False, log=said.append)
    assert "1 of 2 target(s) written now" in said[-1]
    assert xr.open_zarr(out, consolidated=False)["target_variance"].values[1, 4, 5] == 2.0


# --------------------------------------------------------------------------- reprojection

def _rotated_header(crpix, angle_deg, scale=7e-5):
    c, s = np.cos(np.radians(angle_deg)), np.sin(np.radians(angle_deg))
    header = _header(crpix)
    for key in ("CDELT1", "CDELT2"):
        del header[key]
    header.update({"CD1_1": -scale * c, "CD1_2": scale * s, "CD2_1": scale * s, "CD2_2": scale * c})
    return header


def test_reproject_puts_a_star_where_the_reference_grid_has_it_and_spreads_the_bad_pixels(tmp_path):
    from astropy.wcs import WCS

    ref_header, tgt_header = _header(), _rotated_header((47.2, 44.9), 12.0)
    ref_wcs, tgt_wcs = WCS(ref_header), WCS(tgt_header)
    star = (31.3, 42.6)  # (y, x) in the reference's pixels
    tx, ty = tgt_wcs.world_to_pixel(ref_wcs.pixel_to_world(star[1], star[0]))
    yy, xx = np.mgrid[0:70, 0:90]  # another shape than the reference's 60x80
    image = (1000.0 * np.exp(-((yy - ty) ** 2 + (xx - tx) ** 2) / (2 * 1.8**2))).astype(np.float32)
    mask = np.zeros((70, 90), np.int16)
    mx, my = (round(float(v)) for v in tgt_wcs.world_to_pixel(ref_wcs.pixel_to_world(60, 15)))
    mask[my, mx] = 1  # a bad pixel that lands near the reference's (15, 60)
    reference = _write(tmp_path / "ref.fits", np.zeros((60, 80), np.float32), header=ref_header,
                       planes={"WHT": np.full((60, 80), 0.25, np.float32)})
    rotated = _write(tmp_path / "rotated.fits", image, header=tgt_header, mask=mask,
                     planes={"WHT": np.full((70, 90), 0.25, np.float32)})
    on_grid = _write(tmp_path / "on.fits", np.arange(4800, dtype=np.float32).reshape(60, 80), header=_header(),
                     mask=np.zeros((60, 80), np.int16), planes={"WHT": np.full((60, 80), 0.25, np.float32)})
    with pytest.raises(InputError, match=r"rotated.fits is 70x90 px, .* reproject: true, or --reproject"):
        ingest_fits(reference, [rotated], tmp_path / "refused.zarr", mask_hdu="MASK", log=_quiet)
    out = tmp_path / "stack.zarr"
    summary = ingest_fits(reference, [rotated, on_grid], out, mask_hdu="MASK", weight_hdu="WHT", reproject=True,
                          log=_quiet)
    assert summary.resampled == (rotated,)
    ds = xr.open_zarr(out, consolidated=False).load()
    assert ds.attrs["resampled_targets"] == [rotated]
    # the target on the grid as it is
    np.testing.assert_array_equal(ds["target"].values[1], np.arange(4800, dtype=np.float32).reshape(60, 80))
    assert not ds["mask"].values[1].any()
    # the star at its place on the reference's grid, to far better than 0.05 px
    out_image, bad = ds["target"].values[0].astype(np.float64), ds["mask"].values[0].astype(bool)
    iy, ix = round(star[0]), round(star[1])
    window = out_image[iy - 7:iy + 8, ix - 7:ix + 8]
    gy, gx = np.mgrid[iy - 7:iy + 8, ix - 7:ix + 8]
    assert abs((window * gy).sum() / window.sum() - star[0]) < 0.05
    assert abs((window * gx).sum() / window.sum() - star[1]) < 0.05
    assert window.sum() == pytest.approx(image.astype(np.float64).sum(), rel=1e-3)  # same pixel scale
    # the bad pixel is bad where it lands, and in a few pixels around it only
    sky = tgt_wcs.pixel_to_world(mx, my)
    bx, by = (float(v) for v in ref_wcs.world_to_pixel(sky))
    near = bad[round(by) - 4:round(by) + 5, round(bx) - 4:round(bx) + 5]
    assert bad[round(by), round(bx)] and 4 <= near.sum() <= 25
    # where the rotated target does not reach, the stack has no data
    ry, rx = np.mgrid[0:60, 0:80]
    px, py = tgt_wcs.world_to_pixel(ref_wcs.pixel_to_world(rx, ry))
    outside = (px < -0.5) | (px > 89.5) | (py < -0.5) | (py > 69.5)
    assert outside.any() and bad[outside].all() and np.isnan(out_image[outside]).all()
    assert np.isnan(out_image[bad]).all() and np.isfinite(out_image[~bad]).all()
    # the variances: the weights' 4 times the interpolation's sum of squared weights where there is data
    # (test_resampled_variance_is_the_variance_of_resampled_noise), no data where there is none
    from pipeline.io.resample import resampling_noise_factor

    variance = ds["target_variance"].values[0]
    expected = 4.0 * resampling_noise_factor(tgt_wcs, ref_wcs, variance.shape, (70, 90))
    np.testing.assert_allclose(variance[~bad], expected[~bad], rtol=1e-5)
    assert variance[~bad].min() < 0.6 * 4 and variance[~bad].max() > 0.97 * 4  # offsets from 0 to about 0.5
    assert np.isinf(variance[bad]).all()
    bare = fits.Header()
    no_wcs = _write(tmp_path / "no-wcs.fits", image, header=bare)
    with pytest.raises(InputError, match=r"no-wcs.fits has no celestial WCS: reproject resamples"):
        ingest_fits(reference, [no_wcs], tmp_path / "bare.zarr", reproject=True, log=_quiet)
    far = tmp_path / "far.fits"
    _write(far, image, header=_header(crpix=(500.5, 40.5)), mask=mask)
    with pytest.raises(InputError, match="does not overlap the reference"):
        ingest_fits(reference, [str(far)], tmp_path / "far.zarr", mask_hdu="MASK", reproject=True, log=_quiet)


# --------------------------------------------------------------------------- the job: parallel, resumable

def _files_for_stack(tmp_path, n=4):
    """A reference and ``n`` targets with weights and masks, one of them rotated."""
    rng = np.random.default_rng(6)
    reference = _write(tmp_path / "ref.fits", rng.normal(size=(48, 64)).astype(np.float32),
                       header=_header((32.5, 24.5)), planes={"WHT": rng.uniform(1, 2, (48, 64)).astype(np.float32)})
    targets = []
    for i in range(n):
        header = _rotated_header((33.0, 25.5), 8.0) if i == 2 else _header((32.5, 24.5))
        mask = (rng.uniform(size=(48, 64)) < 0.01).astype(np.int16)
        targets.append(_write(tmp_path / f"t{i}.fits", rng.normal(size=(48, 64)).astype(np.float32), header=header,
                              mask=mask, planes={"WHT": rng.uniform(1, 2, (48, 64)).astype(np.float32)},
                              EXPTIME=30.0 + i))
    options = {"mask_hdu": "MASK", "weight_hdu": "WHT", "reproject": True, "keys": ["EXPTIME"], "chunk": 32}
    return reference, targets, options


def test_ingest_in_threads_and_on_a_dask_cluster_equals_the_serial_one(tmp_path):
    from distributed import Client

    reference, targets, options = _files_for_stack(tmp_path)
    ingest_fits(reference, targets, tmp_path / "serial.zarr", workers=1, log=_quiet, **options)
    ingest_fits(reference, targets, tmp_path / "threads.zarr", workers=4, log=_quiet, **options)
    with Client(processes=False, n_workers=2, threads_per_worker=1, dashboard_address=":0") as client:
        ingest_fits(reference, targets, tmp_path / "cluster.zarr", client=client, log=_quiet, **options)
    serial = xr.open_zarr(tmp_path / "serial.zarr", consolidated=False).load()
    assert serial.attrs["resampled_targets"] == [targets[2]] and serial["target"].encoding["chunks"] == (1, 32, 32)
    for name in ("threads", "cluster"):
        xr.testing.assert_identical(xr.open_zarr(tmp_path / f"{name}.zarr", consolidated=False).load(), serial)


@pytest.mark.parametrize("sharded", [True, False])
def test_an_interrupted_ingest_is_finished_by_the_same_ingest_and_equals_an_uninterrupted_one(tmp_path, monkeypatch,
                                                                                               sharded):
    import zarr

    from pipeline.io import store

    if not sharded:  # images too large to share a file: each written by its own task
        monkeypatch.setattr(store, "SHARD_BYTES", 48 * 64 * 4 * 2 - 1)
    reference, targets, options = _files_for_stack(tmp_path)
    whole, out = tmp_path / "whole.zarr", tmp_path / "stack.zarr"
    ingest_fits(reference, targets, whole, log=_quiet, **options)
    ingest_fits(reference, targets, out, log=_quiet, **options)
    group = zarr.open_group(str(out), mode="r")
    for name in ("target", "mask", "target_variance", "ingest/target_written"):
        # the 4 targets in one shard (chunks of 32 px: shards of whole chunks), else a file a chunk
        assert group[name].shards == (((4,) if name.startswith("ingest") else (4, 64, 64)) if sharded else None)
        files = [f for f in (out / name / "c").rglob("*") if f.is_file()]
        expected = 1 if sharded else 4 if name.startswith("ingest") else 4 * 2 * 2
        # (a chunk of the mask with no bad pixel, its fill value, is not written)
        assert len(files) <= expected if name == "mask" else len(files) == expected, name
    # forget the reference and targets 1 and 2: unrecorded, their pixels scribbled over
    group = zarr.open_group(str(out), mode="r+")
    for i in (1, 2):
        group["ingest/target_written"][i] = 0
        for name in ("target", "mask", "target_variance"):
            group[name][i] = 7
    group["ingest/source_written"][0] = 0
    group["source"][...] = -1
    said = []
    ingest_fits(reference, targets, out, workers=2, log=said.append, **options)
    assert said[-1].startswith(f"ingest: finished {out}: 2 of 4 target(s) and the reference written now")
    xr.testing.assert_identical(xr.open_zarr(out, consolidated=False).load(),
                                xr.open_zarr(whole, consolidated=False).load())
    # complete: left as it is
    ingest_fits(reference, targets, out, log=said.append, **options)
    assert "written from these FITS files already" in said[-1]
    # other settings: refused, then replaced when asked
    with pytest.raises(OptionError, match="already exists: nothing was changed"):
        ingest_fits(reference, targets, out, log=_quiet, **{**options, "keys": []})
    ingest_fits(reference, targets[:3], out, mode="overwrite", log=_quiet, **options)
    assert xr.open_zarr(out, consolidated=False).sizes["image"] == 3
    with pytest.raises(OptionError, match="is one of the input files"):
        ingest_fits(reference, targets, targets[0], mode="overwrite", log=_quiet, **options)
    assert fits.getdata(targets[0]).shape == (48, 64)  # inputs are never written
    # a pattern that matches other files now than when the stack was written
    pattern = str(tmp_path / "t*.fits")
    ingest_fits(reference, [pattern], tmp_path / "glob.zarr", log=_quiet, **options)
    _write(tmp_path / "t9.fits", fits.getdata(targets[0]), header=fits.getheader(targets[0]))
    with pytest.raises(OptionError, match=r"ingested from 4 target file\(s\); the targets now match 5"):
        ingest_fits(reference, [pattern], tmp_path / "glob.zarr", log=_quiet, **options)


def test_kernelmap_ingest_command_line_weights_reproject_workers_and_resume(tmp_path, capsys):
    import zarr

    from pipeline.cli import main

    reference, _, _ = _files_for_stack(tmp_path, n=3)
    out = str(tmp_path / "stack.zarr")
    args = ["ingest", reference, str(tmp_path / "t*.fits"), "--out", out, "--mask-hdu", "MASK", "--weight-hdu",
            "WHT", "--reproject", "--workers", "3", "--chunk", "32", "--quiet"]
    assert main(args) == 0
    assert "3 target(s) and the reference written" in capsys.readouterr().out
    zarr.open_group(out, mode="r+")["ingest/target_written"][1] = 0
    assert main(args) == 0
    assert "1 of 3 target(s) written now" in capsys.readouterr().out
    assert main([*args[:-1], "--variance-hdu", "WHT"]) == 2
    assert "weights are given too" in capsys.readouterr().err


def test_kernel_maps_from_fits_files_with_weights_and_a_shifted_grid_match_the_simulated_kernels(tmp_path):
    """FITS files of the demo field, one target on a grid shifted by whole pixels (resampled back exactly),
    with weights: one kernelmap run from the ingest section gives the simulated kernels."""
    import yaml

    from pipeline.cli import main
    from pipeline.sim.demo import demo_dataset

    ds, truth = demo_dataset(n_images=2, size=256, bad_pixels=False)
    source, target = ds["source"].values, ds["target"].values

    def weight(image, background=0.0):  # the simulation's noise: Poisson on sky 1000 ADU, read noise 5 e-, gain 1
        return (1.0 / (np.maximum(image - background, 0) + 1000.0 + 25.0)).astype(np.float32)

    reference = _write(tmp_path / "ref.fits", source, planes={"WHT": weight(source)})
    _write(tmp_path / "epoch-0.fits", target[0], planes={"WHT": weight(target[0], truth.background(0))})
    dy, dx = 6, -4  # the file's pixel (y, x) is the reference's (y + dy, x + dx)
    shifted = np.full_like(target[1], np.nan)
    shifted[: 256 - dy, -dx:] = target[1][dy:, : 256 + dx]
    w = np.zeros_like(shifted)
    w[: 256 - dy, -dx:] = weight(target[1], truth.background(1))[dy:, : 256 + dx]
    _write(tmp_path / "epoch-1.fits", shifted, header=_header(crpix=(50.5 - dx, 40.5 - dy)), planes={"WHT": w})
    job = {"ingest": {"reference": reference, "targets": [str(tmp_path / "epoch-*.fits")], "weight_hdu": "WHT",
                      "reproject": True, "chunk": 128},
           "input": {"path": str(tmp_path / "stack.zarr")}, "tiles": {"size": 128}, "kernel": {"size": 15},
           "output": {"path": str(tmp_path / "kernels.zarr")}, "compute": {"scheduler": "threads"}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    assert main(["run", str(path), "--quiet"]) == 0
    stack = xr.open_zarr(tmp_path / "stack.zarr", consolidated=False)
    assert stack.attrs["resampled_targets"] == [str(tmp_path / "epoch-1.fits")]
    inside = np.s_[dy + 2:256 - 2, 2:256 + dx - 2]  # resampled exactly where the shifted file has data
    np.testing.assert_allclose(stack["target"].values[1][inside], target[1][inside], rtol=0, atol=1e-3)
    maps = xr.open_zarr(tmp_path / "kernels.zarr", consolidated=False)
    errors = []
    for i in range(2):
        for iy, y in enumerate(maps["y"].values):
            for ix, x in enumerate(maps["x"].values):
                est = maps["kernel"].values[i, iy, ix].astype(np.float64)
                true = truth.kernel(i, float(y), float(x))
                errors.append(np.linalg.norm(est - true) / np.linalg.norm(true))
    # at the accuracy of this small noisy field's tiles (as from its Zarr stack: relative L2 errors 0.11-0.20,
    # flux within 4 %, FWHM within 17 %), the resampled epoch as well as the other
    errors = np.array(errors).reshape(2, -1)
    assert np.isfinite(errors).all() and errors.max() < 0.25 and np.median(errors) < 0.16
    yy, xx = np.meshgrid(maps["y"].values, maps["x"].values, indexing="ij")
    for i in range(2):
        np.testing.assert_allclose(maps["flux"].values[i], truth.flux(i), rtol=0.05)
        np.testing.assert_allclose(maps["fwhm"].values[i], truth.fwhm(i, yy, xx), rtol=0.2)
    config = yaml.safe_load(maps.attrs["kernelmap_config"])  # the run weighted its pixels by the variances
    assert config["input"]["variance"] == {"target": "target_variance", "source": "source_variance"}


def test_settings_stamp_of_a_stack_ingested_before_the_later_settings_is_unchanged():
    import json

    from pipeline.job.config import IngestConfig

    settings = IngestConfig(reference="ref.fits", targets=["t*.fits"], mask_hdu="DQ", keys=["MJD-OBS"])
    before = {"reference": "ref.fits", "targets": ["t*.fits"], "hdu": 0, "mask_hdu": "DQ", "mask_bits": None,
              "keys": ["MJD-OBS"], "tolerance": 0.01}
    assert settings.stamp() == json.dumps(before, sort_keys=True)
    assert settings.model_copy(update={"reproject": True}).stamp() != settings.stamp()


# --------------------------------------------------------------------------- what an ingest may remove

def test_an_output_holding_or_being_an_input_or_not_written_by_ingest_is_never_removed(tmp_path):
    import zarr

    from pipeline.job.config import job_from_dict
    from pipeline.job.ingest import job_ingest_plan

    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(7)
    reference = _write(data / "ref.fits", rng.normal(size=(20, 30)).astype(np.float32))
    target = _write(data / "t0.fits", rng.normal(size=(20, 30)).astype(np.float32))
    fits.PrimaryHDU(np.ones((20, 30), np.float32)).writeto(data / "t0.wht.fits")
    fits.PrimaryHDU(np.ones((20, 30), np.float32)).writeto(data / "ref.wht.fits")
    before = sorted(p.name for p in data.iterdir())
    weights = {"weight_file": "{dir}/{stem}.wht.fits"}
    (tmp_path / "link").symlink_to(data, target_is_directory=True)
    for out, said in ((data, "holds the input file"), (tmp_path / "link", "holds the input file"),
                      (data / "t0.wht.fits", "is one of the input files"),
                      (data / "ref.wht.fits", "is one of the input files"), (target, "is one of the input files")):
        for mode in ("create", "overwrite"):
            with pytest.raises(OptionError, match=f"{said}.*: nothing was changed"):
                ingest_fits(reference, [target], out, mode=mode, log=_quiet, **weights)
    assert sorted(p.name for p in data.iterdir()) == before
    # the job's ingest section: input.path the folder of the files
    job = job_from_dict({"ingest": {"reference": reference, "targets": [target]}, "input": {"path": str(data)},
                         "output": {"path": str(tmp_path / "k.zarr")}})
    with pytest.raises(OptionError, match=r"ingest: input.path .*data holds the input file .*: nothing was changed; "
                                          "point input.path elsewhere"):
        job_ingest_plan(job)
    # anything else ingest did not write: a folder of other files, a Zarr group, a file
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    group = tmp_path / "group.zarr"
    zarr.open_group(str(group), mode="w", zarr_format=3, attributes={"title": "kernel maps"})
    (tmp_path / "file.txt").write_text("keep me")
    for out in (other, group, tmp_path / "file.txt"):
        with pytest.raises(OptionError, match=r"is not a stack written by kernelmap ingest: nothing was changed; "
                                              "remove it yourself or choose another --out"):
            ingest_fits(reference, [target], out, mode="overwrite", log=_quiet)
        with pytest.raises(OptionError, match=r"already exists and is not a stack written by kernelmap ingest"):
            ingest_fits(reference, [target], out, log=_quiet)
        job = job_from_dict({"ingest": {"reference": reference, "targets": [target]},
                             "input": {"path": str(out)}, "output": {"path": str(tmp_path / "k.zarr")}})
        with pytest.raises(OptionError, match=r"is not a stack written by kernelmap ingest: nothing was changed"):
            job_ingest_plan(job)
    assert (other / "notes.txt").read_text() == "keep me" and (tmp_path / "file.txt").read_text() == "keep me"
    assert zarr.open_group(str(group), mode="r").attrs["title"] == "kernel maps"
    # an empty folder is taken as no stack; a stack ingest wrote is replaced when asked
    (tmp_path / "empty").mkdir()
    ingest_fits(reference, [target], tmp_path / "empty", log=_quiet)
    ingest_fits(reference, [target], tmp_path / "empty", mode="overwrite", tolerance=0.5, log=_quiet)
    assert xr.open_zarr(tmp_path / "empty", consolidated=False).sizes["image"] == 1


def test_an_interrupted_creation_is_written_anew_by_the_same_ingest_and_replaced_only_when_asked(tmp_path,
                                                                                                monkeypatch):
    import zarr

    reference, targets, options = _files_for_stack(tmp_path, n=2)
    whole, out = tmp_path / "whole.zarr", tmp_path / "stack.zarr"
    ingest_fits(reference, targets, whole, log=_quiet, **options)
    to_zarr = xr.Dataset.to_zarr

    def crash(self, *args, **kwargs):  # the arrays' metadata written, then the process dies
        to_zarr(self, *args, **kwargs)
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(xr.Dataset, "to_zarr", crash)
        with pytest.raises(KeyboardInterrupt):
            ingest_fits(reference, targets, out, log=_quiet, **options)
    assert "kernelmap_ingest" not in zarr.open_group(str(out), mode="r").attrs
    said = []
    ingest_fits(reference, targets, out, log=said.append, **options)  # the same ingest: written anew
    assert said[-1].startswith(f"ingest: 2 target(s) and the reference written to {out}")
    xr.testing.assert_identical(xr.open_zarr(out, consolidated=False).load(),
                                xr.open_zarr(whole, consolidated=False).load())
    # interrupted with other settings, or by an ingest that did not mark its creation: refused saying so,
    # replaced with --overwrite
    for other in ({**options, "keys": []}, None):
        shutil.rmtree(out)  # a creation interrupted (an interrupted overwrite keeps the stack: test_swap.py)
        with monkeypatch.context() as m:
            m.setattr(xr.Dataset, "to_zarr", crash)
            with pytest.raises(KeyboardInterrupt):
                ingest_fits(reference, targets, out, mode="overwrite", log=_quiet, **(other or options))
        if other is None:
            group = zarr.open_group(str(out), mode="r+")
            del group.attrs["kernelmap_ingest_creating"]
            group.create_group("ingest")
        with pytest.raises(OptionError, match=r"whose creation by kernelmap ingest did not finish \(it may have "
                                              r"been interrupted.*use --overwrite"):
            ingest_fits(reference, targets, out, log=_quiet, **options)
        ingest_fits(reference, targets, out, mode="overwrite", log=_quiet, **options)
        xr.testing.assert_identical(xr.open_zarr(out, consolidated=False).load(),
                                    xr.open_zarr(whole, consolidated=False).load())


# --------------------------------------------------------------------------- labels, masks, WCS

def test_labels_are_the_file_names_without_fits_suffixes_and_must_differ(tmp_path):
    rng = np.random.default_rng(8)
    reference = _write(tmp_path / "ref.fits", rng.normal(size=(20, 30)).astype(np.float32))
    dotted = [_write(tmp_path / f"ep.{i}.fits", rng.normal(size=(20, 30)).astype(np.float32)) for i in (1, 2)]
    ingest_fits(reference, dotted, tmp_path / "s.zarr", log=_quiet)
    assert list(xr.open_zarr(tmp_path / "s.zarr", consolidated=False)["image"].values) == ["ep.1", "ep.2"]
    (tmp_path / "night2").mkdir()
    same = [_write(tmp_path / "a.fits", np.zeros((20, 30), np.float32)),
            _write(tmp_path / "night2" / "a.fits.fz", np.zeros((20, 30), np.float32), compressed=True)]
    with pytest.raises(InputError, match=r"targets .*a.fits and .*night2/a.fits.fz both get the image label 'a'"):
        ingest_fits(reference, same, tmp_path / "t.zarr", log=_quiet)
    with pytest.raises(InputError, match=r"targets .*ep.1.fits and .*ep.1.fits are the same file"):
        ingest_fits(reference, [dotted[0], dotted[0]], tmp_path / "t.zarr", log=_quiet)
    assert not (tmp_path / "t.zarr").exists()


def test_the_reference_mask_makes_its_bad_pixels_nan_and_a_reference_without_one_is_said(tmp_path):
    from pipeline.io.inputs import open_inputs

    rng = np.random.default_rng(9)
    ref_mask = np.zeros((20, 30), np.int16)
    ref_mask[4, 5], ref_mask[6, 7] = 2, 8  # bit 2 counts, bit 8 does not
    source = rng.normal(size=(20, 30)).astype(np.float32)
    reference = _write(tmp_path / "ref.fits", source, mask=ref_mask, planes={"VAR": np.ones((20, 30), np.float32)})
    target = _write(tmp_path / "t0.fits", rng.normal(size=(20, 30)).astype(np.float32),
                    mask=np.zeros((20, 30), np.int16), planes={"VAR": np.ones((20, 30), np.float32)})
    said = []
    ingest_fits(reference, [target], tmp_path / "s.zarr", mask_hdu="MASK", mask_bits=2 | 4, variance_hdu="VAR",
                log=said.append)
    ds = xr.open_zarr(tmp_path / "s.zarr", consolidated=False)
    expected = np.where(ref_mask == 2, np.nan, source)
    np.testing.assert_array_equal(ds["source"].values, expected)
    assert ds["source_variance"].values[4, 5] == np.inf and ds["source_variance"].values[6, 7] == 1.0
    assert not any("has no mask" in line for line in said)
    block = open_inputs(tmp_path / "s.zarr", mask="mask").reader.read(0, slice(0, 10), slice(0, 10))
    assert np.isnan(block.source[4, 5])  # a bad pixel of the run (NaN = bad)
    # a reference without the mask HDU (a coadd, say): its NaNs are its only bad pixels, and the ingest says so
    plain = _write(tmp_path / "plain-ref.fits", source)
    said = []
    ingest_fits(plain, [target], tmp_path / "p.zarr", mask_hdu="MASK", log=said.append)
    np.testing.assert_array_equal(xr.open_zarr(tmp_path / "p.zarr", consolidated=False)["source"].values, source)
    assert any(f"the reference {plain} has no mask (no HDU 'MASK' in {plain}): its bad pixels are its NaN pixels "
               "only" in line for line in said)
    fits.PrimaryHDU(np.zeros((20, 30), np.int16)).writeto(tmp_path / "t0.dq.fits")
    said = []
    ingest_fits(plain, [target], tmp_path / "f.zarr", mask_file="{dir}/{stem}.dq.fits", log=said.append)
    assert any("has no mask (no file" in line for line in said)


def test_a_float_mask_is_bad_where_nonzero_or_nan_and_takes_no_bits(tmp_path):
    rng = np.random.default_rng(10)
    reference = _write(tmp_path / "ref.fits", rng.normal(size=(20, 30)).astype(np.float32))
    mask = np.zeros((20, 30), np.float32)
    mask[1, 1], mask[2, 2], mask[3, 3] = 0.5, np.nan, -1.0
    target = _write(tmp_path / "t0.fits", rng.normal(size=(20, 30)).astype(np.float32), mask=mask)
    said = []
    ingest_fits(reference, [target], tmp_path / "s.zarr", mask_hdu="MASK", log=said.append)
    bad = xr.open_zarr(tmp_path / "s.zarr", consolidated=False)["mask"].values[0]
    assert sorted(zip(*np.nonzero(bad))) == [(1, 1), (2, 2), (3, 3)]
    assert "3 of the 600 target pixels written are bad" in said[-1]
    with pytest.raises(InputError, match=r"t0.fits, mask HDU 'MASK' holds floating-point values, and mask bits "
                                         "need integers: remove mask_bits"):
        ingest_fits(reference, [target], tmp_path / "b.zarr", mask_hdu="MASK", mask_bits=1, log=_quiet)
    assert not (tmp_path / "b.zarr").exists()


def test_a_target_without_a_wcs_beside_a_reference_with_one_is_named(tmp_path):
    reference = _write(tmp_path / "ref.fits", np.zeros((20, 30), np.float32))
    bare = _write(tmp_path / "bare.fits", np.zeros((20, 30), np.float32), header=fits.Header())
    with pytest.raises(InputError, match=r"the target .*bare.fits has no celestial WCS, the reference .*ref.fits "
                                         "has one: where its pixels lie"):
        ingest_fits(reference, [bare], tmp_path / "s.zarr", log=_quiet)
    with pytest.raises(InputError, match=r"the reference .*bare.fits has no celestial WCS, the target .*ref.fits "
                                         "has one"):
        ingest_fits(bare, [reference], tmp_path / "s.zarr", log=_quiet)
    ingest_fits(bare, [bare], tmp_path / "s.zarr", log=_quiet)  # neither has one: taken to be on the grid


# --------------------------------------------------------------------------- noise through resampling

def _noise_through_resampling(target_header, n_real, shape=(96, 96), variance=4.0, seed=11):
    """Empirical per-pixel variance of white noise of ``variance`` resampled onto the reference grid of
    ``shape`` (over ``n_real`` realisations), the stored variances, and each output pixel's input position."""
    from astropy.wcs import WCS
    from astropy.wcs.utils import pixel_to_pixel

    from pipeline.io.resample import resample_onto

    ref_wcs, wcs = WCS(_header((48.5, 48.5))), WCS(target_header)
    rng = np.random.default_rng(seed)
    sum2, stored = np.zeros(shape), None
    for _ in range(n_real):
        noise = rng.normal(0.0, np.sqrt(variance), size=shape)
        out, bad, stored = resample_onto(noise, None, np.full(shape, variance), wcs, ref_wcs, shape)
        sum2 += np.where(bad, np.nan, out.astype(np.float64)) ** 2
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]].astype(float)
    px, py = pixel_to_pixel(ref_wcs, wcs, xx, yy)
    return sum2 / n_real, stored.astype(np.float64), py, px


def test_resampled_variance_is_the_variance_of_resampled_noise():
    """An interpolated pixel sum_i w_i x_i has the variance sum_i w_i**2 var_i: measured on white noise
    resampled by whole shifts plus 0, 0.25 and 0.5 px, and across a rotated grid grouped by the offset."""
    from astropy.wcs import WCS

    from pipeline.io.resample import resampling_noise_factor

    inner = np.s_[16:-16, 16:-16]  # away from the input's edges, where the spline's boundary weighs otherwise
    for frac, expect in ((0.0, 1.0), (0.25, 0.758), (0.5, 0.572)):
        # the target's pixel (x, y) is the reference's (x + 2 + frac, y - 1 + frac)
        empirical, stored, _, _ = _noise_through_resampling(_header((48.5 - 2 - frac, 48.5 + 1 - frac)), 12)
        assert np.isfinite(stored[inner]).all()
        np.testing.assert_allclose(stored[inner], 4.0 * expect, rtol=2e-3)
        assert np.mean(empirical[inner]) == pytest.approx(4.0 * expect, rel=0.02), frac
    # rotated by 3 degrees and shifted: the offset, and so the variance, varies from pixel to pixel
    header = _rotated_header((48.1, 47.8), 3.0)
    empirical, stored, py, px = _noise_through_resampling(header, 80, shape=(128, 128))
    covered = np.isfinite(stored)
    assert covered.mean() > 0.8
    factor = resampling_noise_factor(WCS(header), WCS(_header((48.5, 48.5))), (128, 128), (128, 128))
    # the factor of each pixel, the input's edges included, is exactly reproject's (tests/test_resample.py)
    np.testing.assert_allclose(stored[covered], 4.0 * factor[covered], rtol=1e-5)
    ty, tx = py - np.round(py), px - np.round(px)  # in [-0.5, 0.5]
    usable = np.isfinite(empirical) & (px > 3) & (px < 124) & (py > 3) & (py < 124)
    for frac, expect in ((0.0, 1.0), (0.25, 0.758), (0.5, 0.572)):
        near = usable & (np.abs(np.abs(ty) - frac) < 0.05) & (np.abs(np.abs(tx) - frac) < 0.05)
        assert near.sum() > 60, frac
        assert np.mean(stored[near]) == pytest.approx(4.0 * expect, rel=0.015), frac
        assert np.mean(empirical[near]) / np.mean(stored[near]) == pytest.approx(1.0, abs=0.05), frac


# --------------------------------------------------------------------------- pairs: a source per target

def _pair_files(tmp_path, n=3, *, off_grid=(), shape=(48, 64)):
    """``n`` pairs of a source and a target with masks (bit 1 counts, bit 2 does not) and weights; the images
    of ``off_grid`` (``"s1"``, ``"t2"``...) on a rotated grid.  Returns the sources, the targets, the pixels
    written (``{name: (data, mask, weight, header)}``) and the ingest options."""
    rng = np.random.default_rng(12)
    ny, nx = shape
    crpix = (nx / 2 + 0.5, ny / 2 + 0.5)
    written, sources, targets = {}, [], []
    for i in range(n):
        for role, files in (("s", sources), ("t", targets)):
            name = f"{role}{i}"
            header = _rotated_header((crpix[0] + 0.4, crpix[1] - 0.3), 6.0) if name in off_grid else _header(crpix)
            data = rng.normal(100.0, 10.0, size=shape).astype(np.float32)
            mask = np.zeros(shape, np.int16)
            mask[rng.integers(0, ny, 4), rng.integers(0, nx, 4)] = 1
            mask[rng.integers(0, ny, 2), rng.integers(0, nx, 2)] = 2
            weight = rng.uniform(0.5, 2.0, size=shape).astype(np.float32)
            folder = tmp_path / ("src" if role == "s" else "tgt")
            folder.mkdir(exist_ok=True)
            files.append(_write(folder / f"{'src' if role == 's' else 'epoch'}-{i}.fits", data, header=header,
                                mask=mask, planes={"WHT": weight}, EXPTIME=10.0 * (i + 1)))
            written[name] = (data, mask, weight, header)
    options = {"sources": sources, "mask_hdu": "MASK", "mask_bits": 1, "weight_hdu": "WHT", "keys": ["EXPTIME"],
               "chunk": 32}
    return sources, targets, written, options


def test_a_pairs_stack_holds_each_targets_own_source_on_the_first_sources_grid_as_built_by_hand(tmp_path):
    from astropy.wcs import WCS

    from pipeline.io.inputs import open_inputs
    from pipeline.io.resample import resample_onto

    sources, targets, written, options = _pair_files(tmp_path, off_grid=("s1", "t2"))
    out = tmp_path / "stack.zarr"
    # without reproject, the source off the first source's grid is refused, saying how far, nothing written
    with pytest.raises(InputError, match=r"src-1.fits is not on the first source's pixel grid: .* up to \d"):
        ingest_fits(None, targets, out, **{**options, "reproject": False})
    assert not out.exists()
    said = []
    summary = ingest_fits(None, targets, out, reproject=True, log=said.append, **options)
    assert said[-1].startswith(f"ingest: 3 pair(s) of a source and a target written to {out}")
    assert summary.resampled == (sources[1], targets[2])
    ds = xr.open_zarr(out, consolidated=False).load()
    # by hand: the sources' bad pixels (mask bit 1) NaN with an infinite variance, the targets' in the mask;
    # the images off the grid resampled onto the first source's
    grid = WCS(written["s0"][3]).celestial
    expected = {name: [] for name in ("source", "source_variance", "target", "target_variance", "mask")}
    for i in range(3):
        for role in ("source", "target"):
            data, mask, weight, header = written[f"{role[0]}{i}"]
            bad = (mask & 1) != 0
            variance = (1.0 / weight.astype(np.float64)).astype(np.float32)
            if f"{role[0]}{i}" in ("s1", "t2"):
                data, bad, variance = resample_onto(data, bad, variance, WCS(header).celestial, grid, (48, 64))
            if role == "source":
                data, variance = np.where(bad, np.nan, data), np.where(bad, np.inf, variance)
            else:
                expected["mask"].append(bad.astype(np.uint8))
            expected[role].append(data.astype(np.float32))
            expected[f"{role}_variance"].append(variance.astype(np.float32))
    assert sorted(ds.data_vars) == sorted(expected)
    for name, values in expected.items():
        assert ds[name].dims == ("image", "y", "x") and ds[name].dtype == values[0].dtype, name
        np.testing.assert_array_equal(ds[name].values, np.stack(values), err_msg=name)
    assert list(ds["image"].values) == ["epoch-0", "epoch-1", "epoch-2"]  # the targets' names
    np.testing.assert_array_equal(ds["EXPTIME"].values, [10.0, 20.0, 30.0])
    assert ds.attrs["sources"] == sources and ds.attrs["targets"] == targets and "reference" not in ds.attrs
    assert ds.attrs["resampled_sources"] == [sources[1]] and ds.attrs["resampled_targets"] == [targets[2]]
    assert ds.attrs["reference_wcs"] == WCS(written["s0"][3]).celestial.to_header().tostring(sep="\n")
    # the run reads one source per image, with its variances
    inputs = open_inputs(out, mask="mask", variance={"target": "target_variance", "source": "source_variance"})
    assert not inputs.shared_source
    block = inputs.reader.read(1, slice(0, 48), slice(0, 64))
    np.testing.assert_array_equal(block.source, expected["source"][1])
    np.testing.assert_array_equal(block.source_variance, expected["source_variance"][1].astype(np.float64))


def test_a_kernelmap_run_from_a_jobs_pairs_section_gives_each_pairs_own_kernel(tmp_path, capsys):
    """Each pair's target is its own source (another field) convolved with another Gaussian kernel, with
    noise: one kernelmap run from the job's ingest section finds each pair's kernel."""
    import yaml
    from scipy.signal import fftconvolve

    from pipeline.cli import main
    from pipeline.sim.scenes import add_noise, gaussian_kernel, render_scene

    size, k = 256, 15
    truths, fwhms, fluxes = [], (2.5, 4.0), (1.0, 1.2)
    for i in range(2):
        canvas, _ = render_scene(10 + i, (size, size), psf=2.5)
        m = (canvas.shape[0] - size) // 2
        inner = np.s_[m:m + size, m:m + size]
        truths.append(gaussian_kernel(k, fwhm=fwhms[i], e1=0.1 * i, flux=fluxes[i]))
        target = add_noise(30 + i, fftconvolve(canvas, truths[i], mode="same")[inner])[0] + 5.0 * i
        _write(tmp_path / f"src-{i}.fits", add_noise(20 + i, canvas[inner])[0].astype(np.float32))
        _write(tmp_path / f"epoch-{i}.fits", target.astype(np.float32))
    job = {"ingest": {"sources": [str(tmp_path / "src-*.fits")], "targets": [str(tmp_path / "epoch-*.fits")]},
           "input": {"path": str(tmp_path / "stack.zarr")}, "tiles": {"size": 128}, "kernel": {"size": k},
           "output": {"path": str(tmp_path / "kernels.zarr")}, "compute": {"scheduler": "threads"}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    assert main(["run", str(path), "--dry-run"]) == 0
    said = capsys.readouterr().out
    assert "2 pair(s) of a source and a target" in said and "from 1 source file pattern(s)" in said
    assert main(["run", str(path), "--quiet"]) == 0
    assert "ingest: 2 pair(s) of a source and a target written" in capsys.readouterr().out
    assert xr.open_zarr(tmp_path / "stack.zarr", consolidated=False)["source"].dims == ("image", "y", "x")
    maps = xr.open_zarr(tmp_path / "kernels.zarr", consolidated=False).load()
    for i in range(2):
        kernels = maps["kernel"].values[i].astype(np.float64)
        errors = [np.linalg.norm(kernels - t, axis=(-2, -1)) / np.linalg.norm(t) for t in truths]
        # its own kernel to better than 15 % per tile (the other pair's is 40 % or more away)
        assert errors[i].max() < 0.15 and errors[1 - i].min() > 0.3, (i, errors)
        np.testing.assert_allclose(maps["fwhm"].values[i], fwhms[i], rtol=0.06)
        assert np.median(maps["flux"].values[i]) == pytest.approx(fluxes[i], rel=0.05)


@pytest.mark.parametrize("sharded", [True, False])
def test_an_interrupted_pairs_ingest_is_finished_per_image_and_equals_an_uninterrupted_one(tmp_path, monkeypatch,
                                                                                           sharded):
    import zarr

    from pipeline.io import store

    if not sharded:  # images too large to share a file: each written by its own task
        monkeypatch.setattr(store, "SHARD_BYTES", 48 * 64 * 4 * 2 - 1)
    _, targets, _, options = _pair_files(tmp_path, n=4, off_grid=("s2",))
    options["reproject"] = True
    whole, out = tmp_path / "whole.zarr", tmp_path / "stack.zarr"
    ingest_fits(None, targets, whole, log=_quiet, **options)
    ingest_fits(None, targets, out, workers=3, log=_quiet, **options)
    group = zarr.open_group(str(out), mode="r+")
    for name in ("source", "target", "source_variance", "ingest/source_written", "ingest/target_written"):
        assert group[name].shape[0] == 4, name
        assert group[name].shards == (((4,) if name.startswith("ingest") else (4, 64, 64)) if sharded else None)
    # forget pair 1 (its source and its target) and the source of pair 2: pixels scribbled over
    for i, names in ((1, ("source", "source_variance", "target", "target_variance", "mask")),
                     (2, ("source", "source_variance"))):
        for name in names:
            group[name][i] = 7
        group["ingest/source_written"][i] = 0
        if "target" in names:
            group["ingest/target_written"][i] = 0
    said = []
    ingest_fits(None, targets, out, workers=2, log=said.append, **options)
    assert said[-1].startswith(f"ingest: finished {out}: 2 of 4 source(s) and 1 of 4 target(s) written now")
    xr.testing.assert_identical(xr.open_zarr(out, consolidated=False).load(),
                                xr.open_zarr(whole, consolidated=False).load())
    ingest_fits(None, targets, out, log=said.append, **options)
    assert "written from these FITS files already" in said[-1]
    # the sources' pattern matching other files now: refused
    pattern = {**options, "sources": [str(tmp_path / "src" / "src-*.fits")]}
    ingest_fits(None, targets, tmp_path / "glob.zarr", log=_quiet, **pattern)
    (tmp_path / "src" / "src-0.fits").rename(tmp_path / "src" / "src-9.fits")
    with pytest.raises(OptionError, match=r"ingested from 4 source file\(s\); the sources now match 4, not the "
                                          "same"):
        ingest_fits(None, targets, tmp_path / "glob.zarr", log=_quiet, **pattern)


def test_pairs_on_the_command_line_and_their_refusals_before_anything_is_written(tmp_path, capsys):
    from pipeline.cli import main

    sources, targets, _, _ = _pair_files(tmp_path, n=2)
    options = ["--mask-hdu", "MASK", "--weight-hdu", "WHT", "--chunk", "32", "--quiet"]
    by_pairs, by_patterns = str(tmp_path / "pairs.zarr"), str(tmp_path / "patterns.zarr")
    assert main(["ingest", "--pairs", sources[0], targets[0], sources[1], targets[1], "--out", by_pairs,
                 *options]) == 0
    assert "2 pair(s) of a source and a target written" in capsys.readouterr().out
    assert main(["ingest", "--sources", str(tmp_path / "src" / "*.fits"), "--targets",
                 str(tmp_path / "tgt" / "*.fits"), "--out", by_patterns, *options]) == 0
    a, b = (xr.open_zarr(p, consolidated=False).load() for p in (by_pairs, by_patterns))
    assert a["source"].dims == ("image", "y", "x") and list(a["image"].values) == ["epoch-0", "epoch-1"]
    for name in a.data_vars:
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)
    out = str(tmp_path / "refused.zarr")
    refusals = [
        (["--pairs", sources[0], targets[0], sources[1]], rf"--pairs takes a source and a target file for each "
                                                            rf"pair .*: 3 files are given, the last, {sources[1]}, "
                                                            "without its target"),
        ([sources[0], targets[0], "--sources", sources[1]], rf"a reference \({sources[0]}\) and --sources are "
                                                             "both given"),
        (["--sources", sources[0], "--targets", *targets], rf"the sources match 1 file\(s\), the targets 2: pairs "
                                                           rf"need one source per target, matched in order; the "
                                                           rf"first target without a source is {targets[1]}"),
        (["--sources", *sources, "--targets", targets[0]], rf"the sources match 2 file\(s\), the targets 1: .* "
                                                           rf"the first source without a target is {sources[1]}"),
        (["--sources", *sources], "--sources needs --targets"),
        ([sources[0]], "give the files: kernelmap ingest REF TARGET"),
    ]
    for args, message in refusals:
        assert main(["ingest", *args, "--out", out, *options]) == 2, args
        err = capsys.readouterr().err
        assert __import__("re").search(message, err), err
    assert not (tmp_path / "refused.zarr").exists()


def test_a_reference_with_sources_no_source_and_labels_of_pairs_are_refused(tmp_path):
    from pipeline.errors import ConfigError
    from pipeline.job.config import IngestConfig, job_from_dict

    sources, targets, _, _ = _pair_files(tmp_path, n=2)
    out = tmp_path / "stack.zarr"
    with pytest.raises(ConfigError, match=r"ingest.sources: a reference \(.*src-0.fits\) is given too: give one "
                                          "reference, the source shared by every target, or sources"):
        ingest_fits(sources[0], targets, out, sources=sources, log=_quiet)
    for section, message in (({"reference": sources[0], "sources": sources, "targets": targets},
                              "ingest.sources: a reference"),
                             ({"targets": targets}, "ingest.reference: no source is given: give the reference")):
        with pytest.raises(ConfigError, match=message):
            job_from_dict({"ingest": section, "input": {"path": str(out)}, "output": {"path": "k.zarr"}})
    with pytest.raises(InputError, match=r"targets .*epoch-0.fits and .*epoch-0.fits are the same file"):
        ingest_fits(None, [targets[0], targets[0]], out, sources=sources, log=_quiet)
    assert not out.exists()
    # sources without the mask HDU (coadds, say): their NaNs are their only bad pixels, and the ingest says so
    plain = [_write(tmp_path / f"coadd-{i}.fits", fits.getdata(sources[i]), header=fits.getheader(sources[i]))
             for i in range(2)]
    said = []
    ingest_fits(None, targets, out, sources=plain, mask_hdu="MASK", log=said.append)
    assert any(f"2 of the 2 source(s) have no mask (the first: {plain[0]}, no HDU 'MASK' in {plain[0]}): their bad "
               "pixels are their NaN pixels only" in line for line in said)
    np.testing.assert_array_equal(xr.open_zarr(out, consolidated=False)["source"].values[1], fits.getdata(plain[1]))
    # the settings of pairs are stamped with their sources; a reference's as before
    pairs = IngestConfig(sources=["s*.fits"], targets=["t*.fits"])
    assert "sources" in pairs.stamp() and "reference" not in pairs.stamp()
    assert "sources" not in IngestConfig(reference="r.fits", targets=["t*.fits"]).stamp()


# --------------------------------------------------------------------------- the files a stack was ingested from

def _folder_of_files(folder, seed, *, negative=False):
    """``ref.fits``, ``t1.fits`` and ``t2.fits`` in ``folder`` with variances (HDU ``VAR``) and an ``AIRMASS``;
    ``negative``: t2 has a negative variance."""
    rng = np.random.default_rng(seed)
    folder.mkdir()
    for name in ("ref", "t1", "t2"):
        variance = rng.uniform(1, 2, (20, 30)).astype(np.float32)
        if negative and name == "t2":
            variance[3, 4] = -1.0
        _write(folder / f"{name}.fits", rng.normal(size=(20, 30)).astype(np.float32), planes={"VAR": variance},
               AIRMASS=1.5)
    return folder


def _stamped_later(path, seconds=5):
    """Give the file at ``path`` a modification time ``seconds`` later (as a file written again has)."""
    import os

    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 10**9))


def test_a_stack_is_resumed_or_reused_only_from_the_files_it_was_ingested_from(tmp_path, monkeypatch, capsys):
    import zarr

    from pipeline.cli import main
    from pipeline.job.config import job_from_dict
    from pipeline.job.ingest import job_ingest_plan

    a = _folder_of_files(tmp_path / "A", 20, negative=True)
    b = _folder_of_files(tmp_path / "B", 21)
    out = str(tmp_path / "x.zarr")
    args = ["ingest", "ref.fits", "t1.fits", "t2.fits", "--out", out, "--variance-hdu", "VAR", "--workers", "1",
            "--quiet"]
    monkeypatch.chdir(a)
    assert main(args) == 2  # the stack is created, ref and t1 written, t2 refused as it is read
    said = capsys.readouterr().err
    assert "negative variance" in said and "once the file is fixed, the same ingest again writes the rest" in said
    group = zarr.open_group(out, mode="r")
    assert group["ingest/target_written"][...].tolist() == [1, 0] and group["ingest/source_written"][0] == 1
    identities = group["ingest"].attrs["files"]
    assert "files" not in group.attrs and not any("files" in key for key in group.attrs)  # off the root
    assert [i["path"] for i in identities] == [str((a / f"{n}.fits").resolve()) for n in ("ref", "t1", "t2")]
    assert identities[0]["size"] == (a / "ref.fits").stat().st_size
    assert identities[0]["mtime_ns"] == (a / "ref.fits").stat().st_mtime_ns
    stamp = __import__("json").loads(group.attrs["kernelmap_ingest"])  # the settings as before: paths as typed
    assert stamp["reference"] == "ref.fits" and stamp["targets"] == ["t1.fits", "t2.fits"]
    # the same command in another folder holding files of the same names: refused, nothing written
    monkeypatch.chdir(b)
    assert main(args) == 2
    said = capsys.readouterr().err
    assert (f"{out} was ingested from other files than these: ref.fits is now the file {b.resolve()}/ref.fits, the "
            f"stack was ingested from {a.resolve()}/ref.fits (moved, or another folder): nothing was changed; use "
            "--overwrite") in said
    group = zarr.open_group(out, mode="r")
    assert group["ingest/target_written"][...].tolist() == [1, 0]
    np.testing.assert_array_equal(group["target"][0], fits.getdata(a / "t1.fits"))
    # a file of an image already written, changed in place: refused
    monkeypatch.chdir(a)
    _stamped_later(a / "t1.fits")
    assert main(args) == 2
    assert "t1.fits was modified since the stack was ingested: nothing was changed" in capsys.readouterr().err
    _stamped_later(a / "t1.fits", -5)
    # the file of the image not written yet, fixed in place: the same ingest finishes the stack
    with fits.open(a / "t2.fits", mode="update") as hdus:
        hdus["VAR"].data[3, 4] = 1.0
    assert main(args) == 0
    assert "1 of 2 target(s) written now" in capsys.readouterr().out
    stack = xr.open_zarr(out, consolidated=False)
    np.testing.assert_array_equal(stack["target"].values[1], fits.getdata(a / "t2.fits"))
    assert zarr.open_group(out, mode="r")["ingest"].attrs["files"][2]["mtime_ns"] == \
        (a / "t2.fits").stat().st_mtime_ns
    assert main(args) == 0
    assert "written from these FITS files already" in capsys.readouterr().out
    # complete: a file replaced in place under the same name (another size, or only modified) is refused
    (a / "t2.fits").unlink()
    _write(a / "t2.fits", np.ones((20, 30), np.float32), planes={"VAR": np.ones((20, 30), np.float32),
                                                                  "MORE": np.ones((20, 30), np.float32)})
    assert main(args) == 2
    assert "t2.fits has another size: " in capsys.readouterr().err
    (a / "t2.fits").unlink()
    _write(a / "t2.fits", np.ones((20, 30), np.float32), planes={"VAR": np.ones((20, 30), np.float32)},
           AIRMASS=1.5)
    _stamped_later(a / "t2.fits")
    assert main(args) == 2
    assert "t2.fits was modified since the stack was ingested" in capsys.readouterr().err
    # so is it from a job's ingest section
    job = job_from_dict({"ingest": {"reference": "ref.fits", "targets": ["t1.fits", "t2.fits"],
                                    "variance_hdu": "VAR"},
                         "input": {"path": out}, "output": {"path": str(tmp_path / "k.zarr")}})
    with pytest.raises(OptionError, match=r"ingest: input.path .*x.zarr was ingested from other files than these: "
                                          r"t2.fits was modified .*: nothing was changed; remove it to write it again"):
        job_ingest_plan(job)
    # written again when asked, from the files now
    monkeypatch.chdir(b)
    assert main([*args, "--overwrite"]) == 0
    np.testing.assert_array_equal(xr.open_zarr(out, consolidated=False)["target"].values[1],
                                  fits.getdata(b / "t2.fits"))
    # a stack ingested before the files were identified is taken as before
    del zarr.open_group(out, mode="r+")["ingest"].attrs["files"]
    monkeypatch.chdir(a)
    assert main(args) == 0
    assert "written from these FITS files already" in capsys.readouterr().out


def test_a_file_of_an_image_not_written_changed_to_give_other_header_keys_is_refused(tmp_path, monkeypatch):
    a = _folder_of_files(tmp_path / "A", 22, negative=True)
    out = tmp_path / "x.zarr"
    options = {"variance_hdu": "VAR", "keys": ["AIRMASS"], "workers": 1, "log": _quiet}
    with pytest.raises(InputError, match="negative variance"):
        ingest_fits(a / "ref.fits", [a / "t1.fits", a / "t2.fits"], out, **options)
    with fits.open(a / "t2.fits", mode="update") as hdus:
        hdus["VAR"].data[3, 4] = 1.0
        hdus[0].header["AIRMASS"] = 2.0
    with pytest.raises(OptionError, match=r"t2.fits was changed since the stack was created \(before its image was "
                                          r"written\), and the files now give another value of the header key "
                                          r"AIRMASS: nothing was changed; use --overwrite"):
        ingest_fits(a / "ref.fits", [a / "t1.fits", a / "t2.fits"], out, **options)
    ingest_fits(a / "ref.fits", [a / "t1.fits", a / "t2.fits"], out, mode="overwrite", **options)
    np.testing.assert_array_equal(xr.open_zarr(out, consolidated=False)["AIRMASS"].values, [1.5, 2.0])


@pytest.mark.parametrize("form", [".", "$PWD"])
def test_the_stack_is_written_into_an_empty_working_folder_which_is_kept(tmp_path, monkeypatch, capsys, form):
    import os

    from pipeline.cli import main

    a = _folder_of_files(tmp_path / "A", 23)
    here = tmp_path / "empty"
    here.mkdir()
    monkeypatch.chdir(here)
    inode = here.stat().st_ino
    out = "." if form == "." else os.getcwd()
    args = ["ingest", str(a / "ref.fits"), str(a / "t1.fits"), "--out", out, "--quiet"]
    assert main(args) == 0
    assert "1 target(s) and the reference written" in capsys.readouterr().out
    assert here.stat().st_ino == inode and os.path.samefile(os.getcwd(), here)
    np.testing.assert_array_equal(xr.open_zarr(here, consolidated=False)["target"].values[0],
                                  fits.getdata(a / "t1.fits"))
    assert main([*args, "--overwrite", "--keys", "AIRMASS"]) == 0  # replaced inside the folder, kept
    assert here.stat().st_ino == inode and os.path.samefile(os.getcwd(), here)
    assert xr.open_zarr(here, consolidated=False)["AIRMASS"].values.tolist() == [1.5]


def test_the_exit_status_of_ingest_is_described_in_its_help(capsys):
    from pipeline.cli import main

    with pytest.raises(SystemExit):
        main(["ingest", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Exit status: 0 done; 2 refused" in text
    assert ("a value found while reading an image's pixels (e.g. a negative variance) stops the ingest with status 2 "
            "after the stack is created: the images written before are recorded, and running the same ingest again "
            "once the file is fixed writes the rest") in text


@pytest.mark.parametrize("scaling", [{"BZERO": 0.5, "BSCALE": 1.0}, {"BLANK": -99}])
def test_an_integer_mask_read_as_floats_takes_no_bits_before_anything_is_written(tmp_path, scaling):
    from pipeline.io.fits import float_plane

    rng = np.random.default_rng(24)
    reference = _write(tmp_path / "ref.fits", rng.normal(size=(20, 30)).astype(np.float32))
    mask = fits.ImageHDU(np.zeros((20, 30), np.int16), name="MASK")
    mask.header.update(scaling)
    fits.HDUList([fits.PrimaryHDU(rng.normal(size=(20, 30)).astype(np.float32), header=_header()),
                  mask]).writeto(tmp_path / "t0.fits")
    assert fits.getdata(tmp_path / "t0.fits", "MASK").dtype.kind == "f"  # astropy reads it as floats
    assert float_plane(fits.getheader(tmp_path / "t0.fits", "MASK"))
    out = tmp_path / "s.zarr"
    with pytest.raises(InputError, match="mask HDU 'MASK' holds floating-point values, and mask bits need integers"):
        ingest_fits(reference, [tmp_path / "t0.fits"], out, mask_hdu="MASK", mask_bits=1, log=_quiet)
    assert not out.exists()
    unsigned = fits.Header({"BITPIX": 16, "BZERO": 32768, "BSCALE": 1})  # unsigned 16-bit integers
    assert not float_plane(unsigned)


def test_a_variance_of_0_is_a_bad_pixel_like_a_weight_of_0(tmp_path):
    from pipeline.io.fits import noise_variances

    np.testing.assert_array_equal(noise_variances(np.array([0.0, 2.0, np.nan, np.inf]), "variance"),
                                  np.array([np.inf, 2.0, np.nan, np.inf], np.float32))
    rng = np.random.default_rng(25)
    variance = rng.uniform(1, 2, (20, 30)).astype(np.float32)
    variance[2, 3] = 0.0
    reference = _write(tmp_path / "ref.fits", rng.normal(size=(20, 30)).astype(np.float32))
    target = _write(tmp_path / "t0.fits", rng.normal(size=(20, 30)).astype(np.float32), planes={"VAR": variance})
    said = []
    ingest_fits(reference, [target], tmp_path / "s.zarr", variance_hdu="VAR", reference_noise=False,
                log=said.append)
    stored = xr.open_zarr(tmp_path / "s.zarr", consolidated=False)["target_variance"].values[0]
    assert stored[2, 3] == np.inf and np.isfinite(np.delete(stored.ravel(), 2 * 30 + 3)).all()
    assert "1 of the 600 target pixels written are bad" in said[-1]
