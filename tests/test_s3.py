"""Input stacks and kernel maps on an object store: a real S3-compatible server (moto) on 127.0.0.1."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import xarray as xr
import zarr

pytest.importorskip("moto.server")
s3fs = pytest.importorskip("s3fs")

from pipeline.job.config import job_from_dict  # noqa: E402
from pipeline.job.run import run_job  # noqa: E402
from pipeline.sim.demo import demo_dataset  # noqa: E402

SECRET = "kernelmap-test-secret"


@pytest.fixture(scope="module")
def s3():
    """An S3 server on 127.0.0.1 (moto), the credentials and endpoint in the environment, a bucket."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {key: os.environ.get(key) for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                                  "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")}
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": SECRET,
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint})
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
    fs.mkdir("stacks")
    yield fs, endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    s3fs.S3FileSystem.clear_instance_cache()


def _job(stack: str, out: str, **input_options) -> dict:
    return {"input": {"path": stack, **input_options}, "tiles": {"size": 128}, "kernel": {"size": 15},
            "output": {"path": out}, "compute": {"scheduler": "threads"}}


def _values(path: str) -> xr.Dataset:
    return xr.open_zarr(path, consolidated=False).load().drop_attrs()


def test_a_stack_on_s3_gives_the_kernel_map_on_s3_that_it_gives_on_disk(s3, tmp_path):
    fs, _ = s3
    ds, _ = demo_dataset(n_images=2, size=256)
    ds.to_zarr("s3://stacks/demo.zarr", mode="w", consolidated=False)
    ds.to_zarr(tmp_path / "demo.zarr", mode="w", consolidated=False)
    run_job(job_from_dict(_job("s3://stacks/demo.zarr", "s3://stacks/kernels.zarr")), progress=False)
    run_job(job_from_dict(_job(str(tmp_path / "demo.zarr"), str(tmp_path / "kernels.zarr"))), progress=False)
    assert fs.exists("stacks/kernels.zarr/zarr.json")
    on_s3, on_disk = _values("s3://stacks/kernels.zarr"), _values(str(tmp_path / "kernels.zarr"))
    xr.testing.assert_identical(on_s3, on_disk)
    assert on_s3["model_degree"].values.min() >= 0
    # the difference images, written to the object store as to disk
    from pipeline.job.apply import apply_kernel_map

    apply_kernel_map("s3://stacks/kernels.zarr", "s3://stacks/images.zarr", chunk=100, log=lambda _: None)
    apply_kernel_map(tmp_path / "kernels.zarr", tmp_path / "images.zarr", chunk=100, log=lambda _: None)
    xr.testing.assert_identical(_values("s3://stacks/images.zarr"), _values(str(tmp_path / "images.zarr")))


def test_a_kernel_map_on_s3_resumes_as_on_disk_and_keeps_no_credentials(s3):
    _, endpoint = s3
    ds, _ = demo_dataset(n_images=2, size=256)
    ds.to_zarr("s3://stacks/resume.zarr", mode="w", consolidated=False)
    options = {"key": "testing", "secret": SECRET, "client_kwargs": {"endpoint_url": endpoint}}
    data = _job("s3://stacks/resume.zarr", "s3://stacks/resumed.zarr", storage_options=options)
    data["compute"]["block_tiles"] = 1
    run_job(job_from_dict(data), progress=False)
    reference = _values("s3://stacks/resumed.zarr")
    attrs = zarr.open_group("s3://stacks/resumed.zarr", mode="r").attrs.asdict()
    assert SECRET not in str(attrs) and endpoint not in str(attrs)
    # as if killed: image 1's model not written, two of its blocks not done
    group = zarr.open_group("s3://stacks/resumed.zarr", mode="r+")
    group["model_degree"][1] = -1
    records = group["status/records"]
    written = records.attrs["fields"].index("written")
    for ty, tx in ((0, 1), (1, 0)):
        records[1, ty, tx, written] = 0
    group.attrs["kernelmap_status"] = "incomplete"
    summary = run_job(job_from_dict({**data, "output": {"path": "s3://stacks/resumed.zarr", "mode": "resume"}}),
                      progress=False)
    assert summary.tiles_computed == 2
    xr.testing.assert_identical(_values("s3://stacks/resumed.zarr"), reference)
    assert zarr.open_group("s3://stacks/resumed.zarr", mode="r").attrs["kernelmap_status"] == "complete"
    assert np.all(reference["model_degree"].values >= 0)


def _files(fs, root: str) -> dict[str, bytes]:
    """Every file under ``root`` of ``fs`` by its path relative to ``root``."""
    root = root.rstrip("/")
    return {path[len(root) + 1:]: fs.cat_file(path) for path in fs.find(root)}


def test_a_report_from_s3_to_s3_equals_the_report_from_disk_to_disk(s3, tmp_path, capsys):
    """A kernel map on the sky (a reference WCS), its report written from and to the object store through
    --storage-options: the same files, byte for byte, as on disk; no credentials in them."""
    import json

    from astropy.io import fits
    from conftest import job_dict
    from fsspec.implementations.local import LocalFileSystem
    from stacks import make_stack

    from pipeline.cli import main

    fs, endpoint = s3
    make_stack(tmp_path / "stack.zarr", n_images=3, noise=0.5)
    header = fits.Header({"CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CRVAL1": 150.0, "CRVAL2": 2.0,
                          "CRPIX1": 96.5, "CRPIX2": 96.5, "CDELT1": -5e-5, "CDELT2": 5e-5})
    zarr.open_group(str(tmp_path / "stack.zarr"), mode="r+").attrs["reference_wcs"] = header.tostring(sep="\n")
    run_job(job_from_dict(job_dict(tmp_path)), progress=False)
    fs.put(str(tmp_path / "kernels.zarr"), "stacks/report-kernels.zarr", recursive=True)
    options = json.dumps({"key": "testing", "secret": SECRET, "client_kwargs": {"endpoint_url": endpoint}})
    assert main(["report", "s3://stacks/report-kernels.zarr", "--out", "s3://stacks/reports/one",
                 "--storage-options", options, "--max-images", "2", "--rows", "2"]) == 0
    assert "report: s3://stacks/reports/one/index.html" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "kernels.zarr"), "--out", str(tmp_path / "report"),
                 "--max-images", "2", "--rows", "2"]) == 0
    on_s3, on_disk = _files(fs, "stacks/reports/one"), _files(LocalFileSystem(), str(tmp_path / "report"))
    assert set(on_s3) == set(on_disk) and {"images.csv", "outliers.csv", "tiles.csv", "fwhm.png", "index.html",
                                           "images-001.html"} <= set(on_s3)
    for name in on_disk:
        if name == "index.html":  # it names the store it was made from
            assert on_s3[name].replace(b"s3://stacks/report-kernels.zarr", str(tmp_path / "kernels.zarr").encode()) \
                == on_disk[name]
        else:
            assert on_s3[name] == on_disk[name], name
    assert b"ra,dec" in on_s3["tiles.csv"] and b"maps in RA/Dec" in on_s3["index.html"]
    for content in on_s3.values():
        assert SECRET.encode() not in content and endpoint.encode() not in content
    assert main(["report", "s3://stacks/report-kernels.zarr", "--out", "s3://stacks/reports/two",
                 "--storage-options", "[1]"]) == 2
    assert "must be a JSON object" in capsys.readouterr().err and not fs.exists("stacks/reports/two")


def test_an_interrupted_apply_on_s3_is_finished_by_resume_as_on_disk(s3, tmp_path):
    """A kernel map and its images on the object store: an apply interrupted (one image unrecorded, one
    with only its matched image, their pixels scribbled over), then resumed, equals an uninterrupted one."""
    from conftest import job_dict
    from stacks import make_stack

    from pipeline.errors import OptionError
    from pipeline.job.apply import STATUS, apply_kernel_map

    fs, _ = s3
    make_stack(tmp_path / "stack.zarr", n_images=3, noise=0.5)
    run_job(job_from_dict(job_dict(tmp_path)), progress=False)
    fs.put(str(tmp_path / "kernels.zarr"), "stacks/apply-kernels.zarr", recursive=True)
    kernels, out = "s3://stacks/apply-kernels.zarr", "s3://stacks/apply-images.zarr"
    apply_kernel_map(kernels, out, chunk=64, log=lambda _: None)
    reference = xr.open_zarr(out, consolidated=False).load()
    group = zarr.open_group(out, mode="r+")
    group[STATUS][0] = [0, 0]
    group[STATUS][2] = [1, 0]
    for name in ("matched", "difference", "background"):
        group[name][0] = 7.0
    group["difference"][2] = -3.0
    group.attrs["kernelmap_status"] = "incomplete"
    with pytest.raises(OptionError, match="the chunk side: 64 there, 128 here"):
        apply_kernel_map(kernels, out, mode="resume", chunk=128, log=lambda _: None)
    summary = apply_kernel_map(kernels, out, mode="resume", chunk=64, log=lambda _: None)
    labels = list(reference["image"].values)
    assert summary.kept == [labels[1]] and summary.images == [labels[0], labels[2]]
    xr.testing.assert_identical(xr.open_zarr(out, consolidated=False).load(), reference)
    apply_kernel_map(tmp_path / "kernels.zarr", tmp_path / "images.zarr", chunk=64, log=lambda _: None)
    xr.testing.assert_identical(_values(out), _values(str(tmp_path / "images.zarr")))
