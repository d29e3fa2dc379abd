"""Per-pixel variances and weights of the inputs: the job section, the reader, errors and whole runs."""

from __future__ import annotations

import hashlib
from pathlib import Path

import dask
import numpy as np
import pytest
import xarray as xr
import yaml
import zarr
from conftest import job_dict
from stacks import make_stack

from pipeline.cli import main
from pipeline.errors import ConfigError, InputError, OptionError
from pipeline.io.inputs import open_inputs
from pipeline.job.config import VarianceConfig, WeightConfig, dump_job, job_from_dict
from pipeline.job.run import plan_job, run_job

SIZE, TILE, K = 96, 48, 7
#: columns of every target image with 8 times the noise of the rest (variance 64 instead of 1)
STRIPES = (slice(10, 16), slice(60, 64))
#: variance of the noise-free source (a power of two: its weight is exactly its inverse)
SOURCE_VAR = 0.25


@pytest.fixture(autouse=True)
def _sync_scheduler():
    with dask.config.set(scheduler="synchronous"):
        yield


def noisy_stack(path: Path, *, shared_source: bool = True, writer: str = "zarr", chunk: int = TILE) -> dict:
    """The test stack with unit target noise, 8x noisier stripes, and its variances and weights.

    Arrays added: ``target_var`` and ``target_wht`` (image, y, x), ``source_var`` and ``source_wht`` like the
    source, all chunked 32x32 (not like the images).  Every variance is a power of two, so the weights are
    exactly their inverses.
    """
    truth = make_stack(path, n_images=2, size=SIZE, tile=TILE, chunk=chunk, k=K, noise=1.0,
                       shared_source=shared_source, writer=writer)
    group = zarr.open_group(path, mode="r+")
    target = group["target"][...]
    var = np.ones(target.shape, dtype=np.float32)
    for columns in STRIPES:
        var[:, :, columns] = 64.0
    rng = np.random.default_rng(5)
    target += (np.sqrt(var) - 1) * rng.normal(size=target.shape).astype(np.float32)
    group["target"][...] = target
    source_shape = group["source"].shape
    source_var = np.full(source_shape, SOURCE_VAR, dtype=np.float32)
    image_chunks = (1, 32, 32)
    source_chunks = (32, 32) if shared_source else image_chunks
    group.create_array("target_var", data=var, chunks=image_chunks)
    group.create_array("target_wht", data=1 / var, chunks=image_chunks)
    group.create_array("source_var", data=source_var, chunks=source_chunks)
    group.create_array("source_wht", data=1 / source_var, chunks=source_chunks)
    return {**truth, "target_var": var, "source_var": source_var}


def set_values(path: Path, name: str, index: tuple, value: float) -> None:
    array = zarr.open_group(path, mode="r+")[name]
    values = array[...]
    values[index] = value
    array[...] = values


def small_job(tmp_path: Path, output: str = "kernels.zarr", **input_section) -> dict:
    data = job_dict(tmp_path, input=input_section, tiles={"size": TILE}, kernel={"size": K})
    data["output"]["path"] = str(tmp_path / output)
    return data


def run(tmp_path: Path, output: str, *, kernel: dict | None = None, **input_section) -> xr.Dataset:
    data = small_job(tmp_path, output, **input_section)
    data["kernel"].update(kernel or {})
    return run_job(job_from_dict(data), progress=False).open_dataset().load()


def same_result(a: xr.Dataset, b: xr.Dataset) -> None:
    xr.testing.assert_identical(a.drop_attrs(), b.drop_attrs())


def digest(path: Path) -> dict[str, str]:
    group = zarr.open_group(path, mode="r")
    return {name: hashlib.sha256(np.ascontiguousarray(group[name][...]).tobytes()).hexdigest()
            for name in sorted(group.array_keys())}


# --------------------------------------------------------------------------- the job section


def job(**input_section) -> object:
    return job_from_dict({"input": {"path": "in.zarr", **input_section}, "output": {"path": "out.zarr"}})


def test_the_sections_and_their_dump(tmp_path):
    plain = job()
    assert plain.input.variance is None and plain.input.weight is None and plain.input.noise() is None
    var = job(variance={"target": "target_var", "source": "source_var"})
    assert var.input.variance == VarianceConfig(target="target_var", source="source_var")
    assert var.input.noise() == ("variance", {"target": "target_var", "source": "source_var"})
    wht = job(weight={"source": "source_wht"})
    assert wht.input.weight == WeightConfig(source="source_wht")
    assert wht.input.noise() == ("weight", {"source": "source_wht"})
    dumped = yaml.safe_load(dump_job(wht))["input"]
    assert dumped["weight"] == {"target": None, "source": "source_wht"} and dumped["variance"] is None
    path = tmp_path / "job.yaml"
    path.write_text(dump_job(var))
    assert job_from_dict(yaml.safe_load(path.read_text())) == var


def test_the_fingerprint_follows_the_variance_settings():
    prints = [job(**s).fingerprint() for s in (
        {}, {"variance": {"target": "a"}}, {"variance": {"target": "b"}}, {"variance": {"source": "a"}},
        {"weight": {"target": "a"}}, {"weight": {"target": "a", "source": "c"}})]
    assert len(set(prints)) == len(prints)
    assert job(variance=None, weight=None).fingerprint() == prints[0]


@pytest.mark.parametrize(("section", "message"), [
    ({"variance": {"target": "tv"}, "weight": {"target": "tw"}},
     "input.weight: input.variance is given too: give the per-pixel variances (variance) or their inverses "
     "(weight), not both; remove one of them"),
    ({"variance": "target_var"},
     "input.variance: 'target_var' is a name, not a mapping: say which image the array describes, e.g. "
     "variance: {target: target_var}"),
    ({"weight": {}}, "input.weight: no array for the target or the source: give target and/or source (names of "
                     "arrays of weights in the input store), or remove input.weight"),
    ({"variance": {"target": None}}, "input.variance: no array for the target or the source"),
    ({"variance": {"target": ""}}, "input.variance.target: must not be empty"),
    ({"weight": {"traget": "w"}}, "input.weight.traget: unknown key (did you mean 'target'?); allowed keys: target, "
                                  "source"),
    ({"weight": {"target": "target"}},
     "input.weight.target: 'target' is the target array itself: give the array holding the target's weights"),
    ({"variance": {"source": "target"}},
     "input.variance.source: 'target' is the target array itself: give the array holding the source's variances"),
    ({"variance": {"target": "bad"}, "mask": "bad"},
     "input.variance.target: 'bad' is the mask array itself"),
    ({"weight": 2.0}, "input.weight: 2.0 is not a mapping"),
])
def test_bad_sections_name_the_key_and_the_fix(section, message):
    with pytest.raises(ConfigError) as info:
        job(**section)
    errors = info.value.errors
    assert len(errors) == 1 and errors[0].startswith(message), errors


# --------------------------------------------------------------------------- the reader


def test_the_reader_returns_the_variances_of_each_block(tmp_path):
    path = tmp_path / "stack.zarr"
    truth = noisy_stack(path)
    set_values(path, "target_wht", (1, 40, 50), 0.0)
    set_values(path, "target_wht", (0, 3, 4), np.nan)
    set_values(path, "source_wht", (7, 8), 0.0)
    by_var = open_inputs(path, variance={"target": "target_var", "source": "source_var"})
    by_wht = open_inputs(path, weight={"target": "target_wht", "source": "source_wht"})
    plain = open_inputs(path)
    stored = zarr.open_group(path, mode="r")
    assert plain.variances is None and by_wht.variances.kind == "weight"
    for ys, xs in ((slice(0, SIZE), slice(0, SIZE)), (slice(30, 70), slice(5, 50)), (slice(40, 41), slice(50, 51))):
        for image in range(2):
            want_t = truth["target_var"][image, ys, xs].astype(np.float64)
            want_s = truth["source_var"][ys, xs].astype(np.float64)
            got = by_var.reader.read(image, ys, xs)
            np.testing.assert_array_equal(got.variance, want_t)
            np.testing.assert_array_equal(got.source_variance, want_s)
            assert got.variance.dtype == got.source_variance.dtype == np.float64
            np.testing.assert_array_equal(got.target, plain.reader.read(image, ys, xs).target)
            weighted = by_wht.reader.read(image, ys, xs)
            want_t[~(stored["target_wht"][image, ys, xs] > 0)] = np.nan  # 0 or NaN
            want_s[stored["source_wht"][ys, xs] == 0] = np.nan
            np.testing.assert_array_equal(weighted.variance, want_t)
            np.testing.assert_array_equal(weighted.source_variance, want_s)
    whole = by_wht.reader.read(1, slice(0, SIZE), slice(0, SIZE))
    assert np.isnan(whole.variance[40, 50]) and np.isnan(whole.source_variance[7, 8])
    assert np.isnan(by_wht.reader.read(0, slice(0, 8), slice(0, 8)).variance[3, 4])
    assert np.count_nonzero(np.isnan(whole.variance)) == 1
    assert plain.reader.read(0, slice(0, 4), slice(0, 4))[3:] == (None, None)
    assert by_var.identity["variance"]["kind"] == "variance"
    assert by_var.identity["variance"]["target"]["name"] == "target_var"
    assert by_var.identity["variance"]["source"]["chunks"] == [32, 32]
    assert "variance" not in plain.identity
    assert "variances: target 'target_var' float32 (image, y, x), source 'source_var' float32 (y, x)" in repr(by_var)


def test_either_image_may_be_left_out_and_dimension_names_order_the_axes(tmp_path):
    path = tmp_path / "stack.zarr"
    truth = noisy_stack(path, shared_source=False)
    group = zarr.open_group(path, mode="r+")
    flipped = np.ascontiguousarray(np.swapaxes(truth["target_var"], 1, 2))  # stored (image, x, y)
    flipped[1, 70, 20] = 2.0  # (y=20, x=70)
    group.create_array("var_xy", data=flipped, chunks=(2, 16, 96), dimension_names=("image", "x", "y"))
    inputs = open_inputs(path, variance={"target": "var_xy"})
    got = inputs.reader.read(1, slice(10, 30), slice(60, 80))
    assert got.source_variance is None and got.variance[10, 10] == 2.0
    want = truth["target_var"][1, 10:30, 60:80].astype(np.float64)
    want[10, 10] = 2.0
    np.testing.assert_array_equal(got.variance, want)
    only_source = open_inputs(path, weight={"source": "source_wht"})
    got = only_source.reader.read(0, slice(0, 5), slice(0, 5))
    assert got.variance is None
    np.testing.assert_array_equal(got.source_variance, np.full((5, 5), SOURCE_VAR))


def test_the_reader_still_travels_to_other_processes(tmp_path):
    import pickle

    noisy_stack(tmp_path / "stack.zarr")
    inputs = open_inputs(tmp_path / "stack.zarr", weight={"target": "target_wht"})
    reader = pickle.loads(pickle.dumps(inputs.reader))
    np.testing.assert_array_equal(reader.read(1, slice(0, 20), slice(8, 18)).variance,
                                  inputs.reader.read(1, slice(0, 20), slice(8, 18)).variance)


# --------------------------------------------------------------------------- errors in the store


@pytest.fixture(scope="module")
def error_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("errors") / "stack.zarr"
    noisy_stack(path, shared_source=True)
    group = zarr.open_group(path, mode="r+")
    group.create_array("var_2d", data=np.ones((SIZE, SIZE), np.float32))
    group.create_array("var_3d", data=np.ones((2, SIZE, SIZE), np.float32))
    group.create_array("var_small", data=np.ones((2, SIZE, SIZE - 1), np.float32))
    group.create_array("var_images", data=np.ones((3, SIZE, SIZE), np.float32))
    group.create_array("var_complex", data=np.ones((2, SIZE, SIZE), np.complex64))
    group.create_array("var_4d", data=np.ones((1, 2, SIZE, SIZE), np.float32))
    group.create_group("sub")
    return path


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"variance": {"target": "target_variance"}},
     r"input\.variance\.target: no array 'target_variance' in .*stack\.zarr; arrays there: source, source_var, "
     r"source_wht, target, target_var, target_wht, var_2d, .*; did you mean 'target_var'\? Set "
     r"input\.variance\.target to an array there"),
    ({"weight": {"source": "Source_WHT"}}, r"input\.weight\.source: no array 'Source_WHT' .* did you mean "
                                            r"'source_wht'\?"),
    ({"weight": {"source": "sub"}}, r"input\.weight\.source: 'sub' in .* is a group, not an array"),
    ({"variance": {"target": "var_2d"}},
     r"input\.variance\.target: array 'var_2d' in .* has shape \(96, 96\), but target 'target' holds one image "
     r"per target image: give an \(image, y, x\) array of shape \(2, 96, 96\), one map of variances per image"),
    ({"variance": {"target": "var_small"}},
     r"input\.variance\.target: array 'var_small' in .* has shape \(2, 96, 95\) as \(image, y, x\) but target "
     r"'target' has \(2, 96, 96\): the variances must cover every pixel of the target .*; resample or crop them"),
    ({"weight": {"target": "var_images"}},
     r"input\.weight\.target: array 'var_images' .* shape \(3, 96, 96\) .* but target 'target' has \(2, 96, 96\)"),
    ({"variance": {"target": "var_4d"}}, r"input\.variance\.target: array 'var_4d' .* has shape \(1, 2, 96, 96\), "
                                         r"but it must be \(image, y, x\) like target 'target'"),
    ({"variance": {"source": "var_3d"}},
     r"input\.variance\.source: array 'var_3d' in .* has shape \(2, 96, 96\), but the source 'source' is one 2-D "
     r"\(y, x\) image shared by every target image, so it has one variance per pixel: give a 2-D \(y, x\) array "
     r"of shape \(96, 96\), not one per image"),
    ({"variance": {"target": "var_complex"}},
     r"input\.variance\.target: array 'var_complex' in .* must hold real numbers .* got dtype complex64; store "
     r"abs\(\) or the real part"),
    ({"variance": {"target": "target_var"}, "weight": {"target": "target_wht"}},
     r"input\.weight: input\.variance is given too: .* not both; remove one of them"),
    ({"variance": {"target": "target"}}, r"input\.variance\.target: 'target' is the target array itself"),
    ({"weight": {}}, r"input\.weight: no array for the target or the source: give target and/or source"),
    ({"weight": {"target": "target_wht", "other": "x"}},
     r"input\.weight: unknown key\(s\) 'other'; allowed keys: target, source"),
])
def test_store_errors_name_the_key_and_the_fix(error_store, kwargs, message):
    with pytest.raises(InputError, match=message):
        open_inputs(error_store, **kwargs)


def test_a_2d_source_variance_for_one_source_per_image_is_refused(tmp_path):
    path = tmp_path / "stack.zarr"
    noisy_stack(path, shared_source=False)
    zarr.open_group(path, mode="r+").create_array("var_2d", data=np.ones((SIZE, SIZE), np.float32))
    with pytest.raises(InputError, match=r"input\.variance\.source: array 'var_2d' .* has shape \(96, 96\), but "
                                         r"source 'source' holds one image per target image: give an \(image, y, "
                                         r"x\) array of shape \(2, 96, 96\)"):
        open_inputs(path, variance={"source": "var_2d"})


@pytest.mark.parametrize("kind", ["variance", "weight"])
def test_negative_values_are_an_error_when_read(tmp_path, kind):
    path = tmp_path / "stack.zarr"
    noisy_stack(path, writer="xarray")  # with image labels
    name = f"target_{kind[:3] if kind == 'variance' else 'wht'}"
    set_values(path, name, (1, 60, 20), -2.0)
    inputs = open_inputs(path, **{kind: {"target": name}})  # not scanned when opened
    assert inputs.reader.read(0, slice(0, SIZE), slice(0, SIZE)).variance is not None
    assert inputs.reader.read(1, slice(0, 48), slice(0, 48)).variance is not None
    fix = "NaN" if kind == "variance" else "0"
    message = (rf"input\.{kind}\.target: array '{name}' in .*stack\.zarr has 1 negative value\(s\) in image 1 "
               rf"\('epoch-1'\), rows 48:96, columns 0:48 \(e\.g\. -2\): .* >= 0 .*Fix the array \(set such pixels "
               rf"to {fix} to mark them bad\), or remove input\.{kind}\.target")
    with pytest.raises(InputError, match=message):
        inputs.reader.read(1, slice(48, 96), slice(0, 48))
    set_values(path, "source_var", (5, 5), -1.0)
    with pytest.raises(InputError, match=r"input\.variance\.source: array 'source_var' .* in the shared 2-D source"):
        open_inputs(path, variance={"source": "source_var"}).reader.read(0, slice(0, 8), slice(0, 8))
    # and in a run: the job fails with that error
    with pytest.raises(InputError, match=rf"input\.{kind}\.target: array '{name}'.* image 1 \('epoch-1'\)"):
        run(tmp_path, "kernels.zarr", **{kind: {"target": name}})


def test_store_errors_come_before_any_work(tmp_path, capsys):
    noisy_stack(tmp_path / "stack.zarr")
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(small_job(tmp_path, weight={"target": "target_weight"})))
    assert main(["run", str(job_file)]) == 2
    assert "input.weight.target: no array 'target_weight'" in capsys.readouterr().err
    assert main(["run", str(job_file), "--dry-run"]) == 2
    assert not (tmp_path / "kernels.zarr").exists()
    job_file.write_text(yaml.safe_dump(small_job(tmp_path, weight={"target": "target_wht"},
                                                 variance={"target": "target_var"})))
    assert main(["run", str(job_file)]) == 2
    assert "input.weight: input.variance is given too" in capsys.readouterr().err
    assert not (tmp_path / "kernels.zarr").exists()


# --------------------------------------------------------------------------- whole runs


def test_variances_and_weights_give_the_same_result_and_are_recorded(tmp_path, capsys):
    path = tmp_path / "stack.zarr"
    truth = noisy_stack(path)
    before = digest(path)
    data = small_job(tmp_path, "var.zarr", variance={"target": "target_var", "source": "source_var"})
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(data))
    assert main(["run", str(job_file), "--dry-run"]) == 0
    dry = capsys.readouterr().out
    assert ("variance   variances: target 'target_var' float32 (image, y, x), source 'source_var' float32 (y, x); "
            "lstsq's robust pass judges residuals against them") in dry

    var = run(tmp_path, "var.zarr", variance={"target": "target_var", "source": "source_var"})
    wht = run(tmp_path, "wht.zarr", weight={"target": "target_wht", "source": "source_wht"})
    same_result(var, wht)
    assert yaml.safe_load(var.attrs["kernelmap_config"])["input"]["variance"] == {
        "target": "target_var", "source": "source_var"}
    assert yaml.safe_load(wht.attrs["kernelmap_config"])["input"]["weight"] == {
        "target": "target_wht", "source": "source_wht"}
    assert '"variance": {"kind": "weight", "source": {' in wht.attrs["kernelmap_input"]
    assert digest(path) == before  # inputs are never written

    # the variances are those of the noise: the noisy stripes are kept, where the fitted noise model clips them
    plain = run(tmp_path, "plain.zarr")
    fit_pixels = (TILE - K + 1) ** 2
    assert (var["n_valid"].values == fit_pixels).all()
    assert (plain["n_valid"].values < fit_pixels).all()
    true = truth["kernels"]
    err = np.sqrt(((var["kernel"].values - true) ** 2).sum(axis=(-2, -1)) / (true**2).sum(axis=(-2, -1)))
    assert err.max() < 0.1, err


def test_variances_only_change_the_robust_pass(tmp_path):
    """... and the sharpness measure, whose noise floors they bound from below: the kernels are the same."""
    noisy_stack(tmp_path / "stack.zarr")
    robust_off = {"robust": False}
    plain = run(tmp_path, "plain.zarr", kernel=robust_off)
    var = run(tmp_path, "var.zarr", kernel=robust_off, variance={"target": "target_var", "source": "source_var"})
    measure = ["width_difference", "width_difference_error"]

    def same_kernels(a: xr.Dataset, b: xr.Dataset) -> None:
        np.testing.assert_allclose(b["width_difference"], a["width_difference"], rtol=0.05)
        np.testing.assert_array_equal(b["direction"], a["direction"])
        same_result(a.drop_vars(measure), b.drop_vars(measure))

    same_kernels(plain, var)
    welch = {"method": "welch", "segment_size": 32}
    same_kernels(run(tmp_path, "welch.zarr", kernel=welch),
                 run(tmp_path, "welch-var.zarr", kernel=welch, weight={"target": "target_wht"}))


def test_a_zero_weight_is_a_nan_variance_and_a_bad_pixel(tmp_path):
    path = tmp_path / "stack.zarr"
    noisy_stack(path)
    target_pixels = [(0, 20, 30), (1, 50, 70), (1, 47, 47)]
    for index in target_pixels:
        set_values(path, "target_wht", index, 0.0)
        set_values(path, "target_var", index, np.nan)
    set_values(path, "source_wht", (30, 31), 0.0)
    set_values(path, "source_var", (30, 31), np.inf)
    both = {"target": "target_var", "source": "source_var"}
    zero_weight = run(tmp_path, "wht.zarr", weight={"target": "target_wht", "source": "source_wht"})
    nan_variance = run(tmp_path, "var.zarr", variance=both)
    same_result(zero_weight, nan_variance)
    # a zero weight in the target is the same as a NaN target pixel (with any variance there)
    for index in target_pixels:
        set_values(path, "target_var", index, 1.0)
        set_values(path, "target", index, np.nan)
    set_values(path, "source_var", (30, 31), np.nan)
    nan_pixel = run(tmp_path, "nan.zarr", variance=both)
    same_result(zero_weight, nan_pixel)
    assert (zero_weight["n_valid"].values < (TILE - K + 1) ** 2).any()


@pytest.mark.parametrize("shared_source", [True, False])
def test_a_shared_or_per_image_source_takes_its_own_variances(tmp_path, shared_source):
    noisy_stack(tmp_path / "stack.zarr", shared_source=shared_source, writer="xarray", chunk=32)
    variance = {"target": "target_var", "source": "source_var"}
    plan = plan_job(job_from_dict(small_job(tmp_path, variance=variance)))
    assert plan.inputs.shared_source is shared_source
    assert plan.inputs.variances.source.ndim == (2 if shared_source else 3)
    ds = plan.execute(progress=False).open_dataset().load()
    assert np.isfinite(ds["kernel"].values).all()
    assert (ds["n_valid"].values == (TILE - K + 1) ** 2).all()
    small_blocks = small_job(tmp_path, "small-blocks.zarr", variance=variance)
    small_blocks["compute"]["block_tiles"] = 1
    same_result(ds, run_job(job_from_dict(small_blocks), progress=False).open_dataset().load())


def test_the_dry_run_says_when_variances_are_not_used(tmp_path):
    noisy_stack(tmp_path / "stack.zarr")
    plain = plan_job(job_from_dict(small_job(tmp_path))).describe()
    assert ("variance   none (input.variance/input.weight/input.gain not set; lstsq's robust pass fits a noise "
            "model per tile)") in plain
    data = small_job(tmp_path, weight={"target": "target_wht"})
    text = plan_job(job_from_dict(data)).describe()
    assert ("variance   weights: target 'target_wht' float32 (image, y, x), source none (variance = 1/weight; a "
            "weight of 0 is a bad pixel); lstsq's robust pass") in text
    data["kernel"]["robust"] = False
    assert "kernel.robust is false, so only the bad pixels they mark are used" in plan_job(job_from_dict(data)
                                                                                           ).describe()
    data["kernel"] = {"method": "welch", "size": K, "segment_size": 32}
    assert "method welch does not use variances, only the bad pixels they mark" in plan_job(job_from_dict(data)
                                                                                            ).describe()


def test_a_resume_with_other_variance_settings_is_refused(tmp_path):
    path = tmp_path / "stack.zarr"
    noisy_stack(path)
    settings = {"variance": {"target": "target_var"}}
    run_job(job_from_dict(small_job(tmp_path, **settings)), progress=False)
    for other in ({"weight": {"target": "target_wht"}}, {"variance": {"target": "target_var", "source": "source_var"}},
                  {"variance": {"source": "source_var"}}, {}):
        data = small_job(tmp_path, **other)
        data["output"]["mode"] = "resume"
        with pytest.raises(OptionError, match="different configuration"):
            run_job(job_from_dict(data), progress=False)
    # the same settings, but the variance array replaced by another one (other chunks): other input data
    group = zarr.open_group(path, mode="r+")
    values = group["target_var"][...]
    del group["target_var"]
    group.create_array("target_var", data=values, chunks=(1, 48, 48))
    data = small_job(tmp_path, **settings)
    data["output"]["mode"] = "resume"
    with pytest.raises(OptionError, match="different input data"):
        run_job(job_from_dict(data), progress=False)
    del group["target_var"]
    group.create_array("target_var", data=values, chunks=(1, 32, 32))
    assert run_job(job_from_dict(data), progress=False).tiles_computed == 0
