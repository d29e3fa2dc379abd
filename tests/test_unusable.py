"""A run in which every tile of some image is unusable: the output is written, the summary says
which images and why, and ``kernelmap run`` exits with a status of its own."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import xarray as xr
import yaml
import zarr
from conftest import job_dict
from stacks import make_stack

from pipeline import flags as fl
from pipeline.cli import main
from pipeline.job.config import job_from_dict
from pipeline.job.finish import unusable_flag_counts
from pipeline.job.run import EXIT_UNUSABLE, RunSummary, UnusableImage, run_job, unusable_hint


def write_job(tmp_path, **sections) -> str:
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(job_dict(tmp_path, **sections)))
    return str(job_file)


def blank_target(path, image: int) -> None:
    """Every target pixel of ``image`` NaN."""
    target = zarr.open_group(str(path), mode="r+")["target"]
    target[image] = np.full(target.shape[1:], np.nan, dtype=target.dtype)


def assert_complete(path, n_images: int, unusable: int) -> xr.Dataset:
    """The store is complete; the unusable image has NaN kernels flagged BAD, the others finite ones."""
    ds = xr.open_zarr(path).load()
    assert ds.attrs["kernelmap_status"] == "complete"
    kernels, flags = ds["kernel"].values, ds["quality_flag"].values.astype(np.int64)
    assert kernels.shape[0] == n_images
    for i in range(n_images):
        if i == unusable:
            assert np.isnan(kernels[i]).all() and np.all(flags[i] & fl.BAD)
        else:
            assert np.isfinite(kernels[i]).all() and not np.any(flags[i] & fl.BAD)
    return ds


@pytest.mark.parametrize(("method", "advice"), [("lstsq", "set kernel.size smaller or tiles.size larger"),
                                                ("welch", "set kernel.segment_size smaller")])
def test_a_blank_target_image_exits_non_zero_after_writing_everything(tmp_path, capsys, method, advice):
    make_stack(tmp_path / "stack.zarr", n_images=3)
    blank_target(tmp_path / "stack.zarr", 1)
    job_file = write_job(tmp_path, kernel={"method": method})
    assert main(["run", job_file, "--quiet"]) == EXIT_UNUSABLE == 3
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines[0] == ("kernelmap run: every tile of 1 of 3 images is unusable (kernels NaN); the output is "
                        f"complete: {tmp_path / 'kernels.zarr'}")
    assert lines[1] == "  image 1 ('epoch-1'): 9 of 9 tiles unusable: no_data 9"
    assert lines[2].startswith("  no_data: ") and advice in lines[2]
    assert len(lines) == 3
    assert_complete(tmp_path / "kernels.zarr", 3, unusable=1)
    # the store is resumable: a resumed run of the complete store says the same again
    assert main(["run", job_file, "--quiet", "--set", "output.mode=resume"]) == EXIT_UNUSABLE
    assert capsys.readouterr().err.strip().splitlines()[1:] == lines[1:]


def test_a_constant_source_is_no_signal_and_says_to_check_the_inputs(tmp_path, capsys):
    make_stack(tmp_path / "stack.zarr", n_images=2, shared_source=False, writer="zarr")
    source = zarr.open_group(str(tmp_path / "stack.zarr"), mode="r+")["source"]
    source[0] = np.full(source.shape[1:], 7.0, dtype=source.dtype)
    assert main(["run", write_job(tmp_path), "--quiet"]) == EXIT_UNUSABLE
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith("kernelmap run: every tile of 1 of 2 images is unusable")
    assert lines[1] == "  image 0: 9 of 9 tiles unusable: no_signal 9"  # plain zarr: labels are positions
    assert "not swapped" in lines[2] and "blank or constant" in lines[2]
    assert_complete(tmp_path / "kernels.zarr", 2, unusable=0)


def test_the_summary_lists_the_unusable_images(tmp_path):
    make_stack(tmp_path / "stack.zarr", n_images=3)
    for image in (0, 2):
        blank_target(tmp_path / "stack.zarr", image)
    summary = run_job(job_from_dict(job_dict(tmp_path, kernel={"method": "welch"})), progress=False)
    assert not summary.all_images_usable
    assert summary.unusable_images == (UnusableImage(0, "epoch-0", 9, {"no_data": 9}),
                                       UnusableImage(2, "epoch-2", 9, {"no_data": 9}))
    assert summary.method == "welch" and summary.n_images == 3
    report = summary.unusable_report().splitlines()
    assert report[0].startswith("every tile of 2 of 3 images is unusable")
    assert report[3] == f"  no_data: {unusable_hint('no_data', 'welch')}"
    assert "every tile unusable in 2 image(s)" in summary.describe()
    assert summary.tiles_flagged == 18
    # "flagged" in the summary counts problem flags: those in the store, the model's outliers included
    flags = np.asarray(xr.open_zarr(summary.path)["quality_flag"].values).astype(np.int64)
    assert summary.tiles_with_problems == np.count_nonzero(fl.problems(flags)) >= 18
    assert f"{summary.tiles_with_problems} with a problem flag (18 unusable)" in summary.describe()


def test_informational_flags_are_not_counted_as_flagged(tmp_path):
    make_stack(tmp_path / "stack.zarr", n_images=2)
    summary = run_job(job_from_dict(job_dict(tmp_path)), progress=False)
    flags = np.asarray(xr.open_zarr(summary.path)["quality_flag"].values).astype(np.int64)
    assert np.count_nonzero(flags & fl.INFORMATIONAL) > 0  # pixels were left out on some tiles ...
    assert summary.tiles_with_problems == np.count_nonzero(fl.problems(flags)) == 0  # ... none has a problem
    assert "0 with a problem flag (0 unusable)" in summary.describe()


def test_a_normal_stack_exits_zero_and_says_nothing(tmp_path, capsys):
    make_stack(tmp_path / "stack.zarr", n_images=2)
    assert main(["run", write_job(tmp_path), "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    summary = run_job(job_from_dict(job_dict(tmp_path, output={"mode": "resume"})), progress=False)
    assert summary.all_images_usable and summary.unusable_images == () and summary.unusable_report() == ""


def test_some_unusable_tiles_are_not_an_unusable_image(tmp_path, capsys):
    make_stack(tmp_path / "stack.zarr", n_images=2)
    target = zarr.open_group(str(tmp_path / "stack.zarr"), mode="r+")["target"]
    target[1, :64, :] = np.nan  # the first row of tiles only
    assert main(["run", write_job(tmp_path, kernel={"method": "welch"}), "--quiet"]) == 0
    ds = xr.open_zarr(tmp_path / "kernels.zarr")
    assert np.all(ds["quality_flag"].values[1, 0].astype(np.int64) & fl.NO_DATA)


def test_the_process_exit_status(tmp_path):
    make_stack(tmp_path / "stack.zarr", n_images=2)
    blank_target(tmp_path / "stack.zarr", 0)
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", write_job(tmp_path), "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == EXIT_UNUSABLE, done.stderr
    assert "image 0 ('epoch-0'): 9 of 9 tiles unusable: no_data 9" in done.stderr
    assert done.stdout == ""


def test_flag_counts_and_hints():
    assert unusable_flag_counts(np.array([fl.NO_DATA, fl.NO_DATA | fl.MASKED, fl.NO_SIGNAL])) == {
        "no_data": 2, "no_signal": 1}
    assert unusable_flag_counts(np.array([fl.NO_DATA, 0])) is None
    assert unusable_flag_counts(np.array([], dtype=np.int64)) is None
    assert "kernel.method: lstsq" in unusable_hint("no_data", "welch")
    assert "tiles.size larger" in unusable_hint("no_data", "lstsq")
    assert "bad pixels" in unusable_hint("no_data", "ratio")
    assert "swapped" in unusable_hint("no_signal", "lstsq")
    one = RunSummary("out.zarr", 4, 4, 0, 4, 1, 0, 1.0, (UnusableImage(0, "0", 4, {"no_signal": 4}),),
                     "lstsq", 1)
    assert one.unusable_report().splitlines()[0] == ("every tile of 1 of 1 image is unusable (kernels NaN); "
                                                     "the output is complete: out.zarr")


def test_the_summary_names_the_images_left_without_a_model(tmp_path, monkeypatch):
    """An image with usable tiles whose model could not be fitted (model_degree -1; the fit is made to fail for
    the second image here, as it does where a fit has too little to go on): the run says so, naming it."""
    import pipeline.job.finish as finish

    make_stack(tmp_path / "stack.zarr", n_images=2)
    fit_tiles, calls = finish.fit_tiles, []

    def no_model_for_the_second(*args, **kwargs):
        calls.append(1)
        model, residual, rejected = fit_tiles(*args, **kwargs)
        return (None, np.full_like(residual, np.nan), np.zeros_like(rejected)) if len(calls) == 2 else \
            (model, residual, rejected)

    monkeypatch.setattr(finish, "fit_tiles", no_model_for_the_second)
    summary = run_job(job_from_dict(job_dict(tmp_path, model={"method": "kernels"})), progress=False)
    ds = xr.open_zarr(tmp_path / "kernels.zarr")
    assert ds["model_degree"].values.tolist()[1] == -1 and ds["model_degree"].values[0] >= 0
    assert summary.unmodelled_images == ("epoch-1",) and summary.unusable_images == ()
    assert "no kernel-field model could be fitted for 1 image(s) (epoch-1: model_degree -1" in summary.describe()
