"""The CCD noise model: gain and read noise as an image's variances, from the pure function to whole runs."""

from __future__ import annotations

import json
from pathlib import Path

import dask
import numpy as np
import pytest
import xarray as xr
import yaml
import zarr
from conftest import job_dict

from pipeline.cli import main
from pipeline.core.noise import ccd_variance
from pipeline.errors import ConfigError, InputError, OptionError
from pipeline.io.inputs import open_inputs
from pipeline.job.config import GainConfig, ReadNoiseConfig, dump_job, job_from_dict
from pipeline.job.run import plan_job, run_job
from pipeline.sim.defects import add_defects
from pipeline.sim.scenes import add_noise, gaussian_kernel, survey_tile_pair

SIZE, TILE, K = 96, 48, 7
SKY = 800.0
#: per image: gains (e-/ADU) and read noises (e-) of the target, and of the source
GAINS, NOISES = (1.5, 2.5), (4.0, 7.0)
SOURCE_GAIN, SOURCE_NOISE = 2.0, 5.0
LABELS = ("epoch-0", "epoch-1")


@pytest.fixture(autouse=True)
def _sync_scheduler():
    with dask.config.set(scheduler="synchronous"):
        yield


def ccd_stack(path: Path, *, cosmic_rays: int = 0) -> dict:
    """Two simulated CCD image pairs (ADU, sky not subtracted) in a store, with their CCD settings.

    Arrays: ``target`` and ``source`` ``(image, y, x)`` float32; coordinates ``image``, ``GAIN`` and
    ``RDNOISE`` along ``image`` (the target's); attributes ``TGAIN`` and ``TRDNOISE`` (one per image) of
    ``target``, ``SGAIN`` and ``SRDNOISE`` (one number) of ``source``; ``target_var`` and ``source_var``: the
    CCD model's variances of the stored pixels (float64), and ``target_sub``, the target less its sky.
    """
    rng = np.random.default_rng(11)
    targets, sources, kernels = [], [], []
    for i in range(2):
        kernel = gaussian_kernel(K, fwhm=2.0 + 0.5 * i, e1=0.05, flux=1.0)
        # the source with one gain and read noise, sky kept; the target observed again with its own
        pair = survey_tile_pair(seed=rng, kernel=kernel, size=SIZE, sky=SKY, gain=SOURCE_GAIN,
                                read_noise=SOURCE_NOISE, sky_offset=SKY, source_sky_offset=SKY, star_density=8e-3)
        target = add_noise(rng, pair.target_true - SKY, sky=SKY, read_noise=NOISES[i], gain=GAINS[i])[0] + SKY
        hit = add_defects(pair.source, target, seed=rng, cosmic_rays=cosmic_rays, sky=SKY)
        sources.append(hit.source)
        targets.append(hit.target)
        kernels.append(kernel)
    target = np.stack(targets).astype(np.float32)
    source = np.stack(sources).astype(np.float32)
    target_var = np.stack([ccd_variance(target[i], GAINS[i], NOISES[i]) for i in range(2)])
    source_var = ccd_variance(source, SOURCE_GAIN, SOURCE_NOISE)
    group = zarr.open_group(path, mode="w", zarr_format=3)
    dims = ("image", "y", "x")
    for name, values in (("target", target), ("source", source), ("target_var", target_var),
                         ("source_var", source_var), ("target_sub", target - SKY)):
        group.create_array(name, data=values, chunks=(1, TILE, TILE), dimension_names=dims)
    group.create_array("image", shape=(2,), dtype=str, dimension_names=("image",))[...] = np.array(LABELS)
    for name, values in (("GAIN", np.array(GAINS)), ("RDNOISE", np.array(NOISES))):
        group.create_array(name, data=values, dimension_names=("image",))
    group["target"].attrs.update({"TGAIN": list(GAINS), "TRDNOISE": list(NOISES)})
    group["source"].attrs.update({"SGAIN": SOURCE_GAIN, "SRDNOISE": SOURCE_NOISE})
    return {"target": target, "source": source, "target_var": target_var, "source_var": source_var,
            "kernels": np.stack(kernels)}




@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A CCD stack with a few cosmic rays on every target, shared by the tests that only read it."""
    path = tmp_path_factory.mktemp("ccd") / "stack.zarr"
    return path, ccd_stack(path, cosmic_rays=6)


def formula(pixels: np.ndarray, gain: float, read_noise: float) -> np.ndarray:
    """The documented CCD variance, written out."""
    pixels = pixels.astype(np.float64)
    return np.maximum(pixels, 0) / gain + (read_noise / gain) ** 2


# --------------------------------------------------------------------------- the pure function


def test_ccd_variance_is_the_formula_and_keeps_bad_pixels_bad():
    image = np.array([[100.0, -3.0, 0.0], [np.nan, np.inf, 7.5]], dtype=np.float32)
    got = ccd_variance(image, 2.0, 4.0)
    assert got.dtype == np.float64 and got.shape == image.shape
    np.testing.assert_array_equal(got, [[54.0, 4.0, 4.0], [np.nan, np.nan, 7.75]])
    np.testing.assert_array_equal(ccd_variance(image, 2.0), [[50.0, 0.0, 0.0], [np.nan, np.nan, 3.75]])
    stack = np.full((2, 3, 3), 90.0)
    np.testing.assert_array_equal(ccd_variance(stack, np.array([1.0, 3.0])[:, None, None])[:, 0, 0], [90.0, 30.0])
    assert ccd_variance(np.arange(4, dtype=np.int16), 1.0).tolist() == [0.0, 1.0, 2.0, 3.0]
    assert float(ccd_variance(50.0, 2.0, 2.0)) == 26.0


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"gain": 0.0}, r"gain must be finite and > 0 \(electrons per ADU\), got 0"),
    ({"gain": -1.0}, r"gain must be finite and > 0"),
    ({"gain": np.nan}, r"gain must be finite and > 0"),
    ({"gain": [1.0, 0.0]}, r"gain must be finite and > 0 .* 1 bad value\(s\), e\.g\. 0\.0"),
    ({"gain": 1.0, "read_noise": -2.0}, r"read_noise must be finite and >= 0 \(electrons RMS\), got -2"),
    ({"gain": 1.0, "read_noise": np.inf}, r"read_noise must be finite and >= 0"),
    ({"gain": "high"}, r"gain must be a number or an array of numbers, got 'high'"),
    ({"gain": np.ones(3)}, r"gain \(3,\) and read_noise \(\) must broadcast against the image \(2, 4\)"),
])
def test_ccd_variance_refuses_bad_gains_and_read_noises(kwargs, message):
    with pytest.raises(OptionError, match=message):
        ccd_variance(np.ones((2, 4)), **kwargs)
    with pytest.raises(InputError, match="real numbers"):
        ccd_variance(np.ones(3, dtype=complex), 1.0)


# --------------------------------------------------------------------------- the job section


def job(**input_section) -> object:
    return job_from_dict({"input": {"path": "in.zarr", **input_section}, "output": {"path": "out.zarr"}})


def test_the_sections_their_single_number_form_and_the_fingerprint(tmp_path):
    plain = job()
    assert plain.input.gain is None and plain.input.read_noise is None and plain.input.ccd() == {}
    both = job(gain=1.5, read_noise={"target": "RDNOISE"})
    assert both.input.gain == GainConfig(source=1.5, target=1.5)
    assert both.input.read_noise == ReadNoiseConfig(target="RDNOISE")
    assert both.input.ccd() == {"target": (1.5, "RDNOISE"), "source": (1.5, None)}
    mixed = job(gain={"target": "GAIN"}, variance={"source": "source_var"})  # one image each way
    assert mixed.input.ccd() == {"target": ("GAIN", None)}
    assert yaml.safe_load(dump_job(both))["input"]["read_noise"] == {"source": None, "target": "RDNOISE"}
    path = tmp_path / "job.yaml"
    path.write_text(dump_job(both))
    assert job_from_dict(yaml.safe_load(path.read_text())) == both
    prints = [job(**s).fingerprint() for s in (
        {}, {"gain": 1.5}, {"gain": 2.0}, {"gain": {"target": 1.5}}, {"gain": 1.5, "read_noise": 3.0},
        {"gain": 1.5, "read_noise": 0.0}, {"gain": {"target": "GAIN"}})]
    assert len(set(prints)) == len(prints)
    assert job(gain=None, read_noise=None).fingerprint() == prints[0]


@pytest.mark.parametrize(("section", "messages"), [
    ({"gain": 0}, ["input.gain.source: 0 is not > 0: give the gain in electrons per ADU",
                   "input.gain.target: 0 is not > 0"]),
    ({"gain": {"target": -1.5}}, ["input.gain.target: -1.5 is not > 0: give the gain in electrons per ADU (the "
                                  "GAIN of a FITS header)"]),
    ({"gain": {"target": float("inf")}}, ["input.gain.target: inf is not a finite number: give the gain"]),
    ({"gain": {"target": 2, "source": float("nan")}}, ["input.gain.source: nan is not a finite number"]),
    ({"gain": 1, "read_noise": {"target": -4}},
     ["input.read_noise.target: -4 is not >= 0: give the read noise in electrons RMS (the RDNOISE of a FITS "
      "header; 0 for none)"]),
    ({"gain": 1, "read_noise": {"source": float("nan")}}, ["input.read_noise.source: nan is not a finite number"]),
    ({"read_noise": {"target": 4}},
     ["input.read_noise.target: no gain for the target: the CCD model needs the gain (electrons per ADU) to turn "
      "the read noise (electrons) into ADU; give input.gain.target too, or remove input.read_noise.target"]),
    ({"gain": {"source": 2}, "read_noise": 4}, ["input.read_noise.target: no gain for the target"]),
    ({"gain": {"target": 1.5}, "variance": {"target": "target_var"}},
     ["input.gain.target: input.variance.target is given too: the target's variances come from its variance "
      "array or from its gain and read noise; give one: remove input.variance.target or input.gain.target"]),
    ({"gain": 1.5, "read_noise": 3, "weight": {"source": "source_wht"}},
     ["input.gain.source: input.weight.source is given too: the source's variances come from its weight array or "
      "from its gain and read noise; give one: remove input.weight.source or input.gain.source and "
      "input.read_noise.source"]),
    ({"gain": "GAIN"}, ["input.gain: 'GAIN' is not a number or a mapping: a name is looked up for source and "
                        "target separately, so give it per image, e.g. gain: {target: GAIN}"]),
    ({"gain": {}}, ["input.gain: no gain for the source or the target: give source and/or target"]),
    ({"gain": 1, "read_noise": {"target": None}}, ["input.read_noise: no read noise for the source or the target"]),
    ({"gain": {"target": "1.5"}}, ["input.gain.target: '1.5' is quoted text, not a number: write the gain without "
                                   "quotes"]),
    ({"gain": {"target": True}}, ["input.gain.target: true is not a number (the gain in electrons per ADU), or "
                                  "the name of a per-image coordinate"]),
    ({"gain": {"target": ""}}, ["input.gain.target: must not be empty"]),
    ({"gain": {"traget": 1}}, ["input.gain.traget: unknown key (did you mean 'target'?); allowed keys: source, "
                                "target"]),
])
def test_bad_sections_name_the_key_and_the_fix(section, messages):
    with pytest.raises(ConfigError) as info:
        job(**section)
    errors = info.value.errors
    assert len(errors) == len(messages), errors
    for error, message in zip(sorted(errors), sorted(messages)):
        assert error.startswith(message), errors


# --------------------------------------------------------------------------- the reader


@pytest.mark.parametrize(("gain", "read_noise", "origin"), [
    ({"target": 1.5, "source": SOURCE_GAIN}, {"target": 4.0, "source": SOURCE_NOISE}, "number"),
    ({"target": "GAIN", "source": "GAIN"}, {"target": "RDNOISE", "source": "RDNOISE"}, "coordinate"),
    ({"target": "GAIN"}, {"target": "RDNOISE"}, "coordinate, target only"),
])
def test_the_reader_returns_the_formula_of_each_blocks_own_pixels(store, gain, read_noise, origin):
    path, truth = store
    inputs = open_inputs(path, gain=gain, read_noise=read_noise)
    ccd = inputs.variances.ccd
    for image in range(2):
        g = ccd["target"].gain.level(image)
        rn = ccd["target"].read_noise.level(image)
        assert (g, rn) == ((1.5, 4.0) if origin == "number" else (GAINS[image], NOISES[image]))
        for ys, xs in ((slice(0, SIZE), slice(0, SIZE)), (slice(30, 70), slice(5, 50)), (slice(47, 49), slice(0, 3))):
            got = inputs.reader.read(image, ys, xs)
            np.testing.assert_array_equal(got.variance, formula(truth["target"][image, ys, xs], g, rn))
            assert got.variance.dtype == np.float64
            if "source" in ccd:
                sg, srn = ccd["source"].values(image)
                np.testing.assert_array_equal(got.source_variance, formula(truth["source"][image, ys, xs], sg, srn))
            else:
                assert got.source_variance is None
    assert inputs.identity["variance"]["target"]["model"] == "ccd"


def test_attributes_one_number_or_one_per_image_and_the_source_alone(store):
    path, truth = store
    # a coordinate comes before an attribute of the same name
    group = zarr.open_group(path, mode="r")
    assert group["target"].attrs["TGAIN"] == list(GAINS) and "TGAIN" not in group
    # attributes: a list on 'target', one number on 'source'; the target has no read noise: 0
    inputs = open_inputs(path, gain={"target": "TGAIN", "source": "SGAIN"}, read_noise={"target": 4.0})
    ccd = inputs.variances.ccd
    np.testing.assert_array_equal(ccd["target"].gain.levels, GAINS)
    np.testing.assert_array_equal(ccd["source"].gain.levels, [SOURCE_GAIN, SOURCE_GAIN])
    got = inputs.reader.read(1, slice(10, 40), slice(50, 96))
    np.testing.assert_array_equal(got.variance, formula(truth["target"][1, 10:40, 50:96], GAINS[1], 4.0))
    np.testing.assert_array_equal(got.source_variance, formula(truth["source"][1, 10:40, 50:96], SOURCE_GAIN, 0.0))
    assert inputs.identity["variance"] == {
        "kind": "variance",
        "target": {"model": "ccd", "gain": {"setting": "TGAIN", "levels": list(GAINS)},
                   "read_noise": {"setting": 4.0, "levels": 4.0}},
        "source": {"model": "ccd", "gain": {"setting": "SGAIN", "levels": SOURCE_GAIN}, "read_noise": None}}
    text = inputs.variances.describe()
    assert ("variances: target CCD model (gain attribute 'TGAIN' of array 'target' (1.5 to 2.5 over 2 images) "
            "e-/ADU, read noise 4 e-), source CCD model (gain attribute 'SGAIN' of array 'source' = 2 e-/ADU, "
            "read noise 0 e- (not given))") == text


def test_saturated_pixels_are_bad_and_their_variance_nan(store):
    path, truth = store
    inputs = open_inputs(path, gain={"target": "GAIN"}, saturation={"target": 5000.0, "grow": 0})
    got = inputs.reader.read(0, slice(0, SIZE), slice(0, SIZE))
    saturated = truth["target"][0] >= 5000.0
    assert saturated.any()
    np.testing.assert_array_equal(np.isnan(got.variance), saturated)
    np.testing.assert_array_equal(got.variance[~saturated], formula(truth["target"][0], GAINS[0], 0.0)[~saturated])


def test_the_reader_still_travels_to_other_processes(store):
    import pickle

    inputs = open_inputs(store[0], gain={"target": "GAIN"}, read_noise={"target": "RDNOISE"})
    reader = pickle.loads(pickle.dumps(inputs.reader))
    np.testing.assert_array_equal(reader.read(1, slice(0, 20), slice(8, 18)).variance,
                                  inputs.reader.read(1, slice(0, 20), slice(8, 18)).variance)


# --------------------------------------------------------------------------- errors in the store


@pytest.fixture(scope="module")
def error_store(store) -> Path:
    path = store[0]
    group = zarr.open_group(path, mode="r+")
    for name, values in (("ZEROGAIN", [1.5, 0.0]), ("NEGNOISE", [-1.0, 3.0]), ("NANGAIN", [np.nan, 1.0])):
        group.create_array(name, data=np.array(values), dimension_names=("image",))
    group["target"].attrs.update({"BADGAIN": "high", "TGAIN": list(GAINS), "TRDNOISE": list(NOISES)})
    group.create_array("shared", data=group["source"][0], chunks=(TILE, TILE), dimension_names=("y", "x"))
    return path


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"gain": {"target": "GAINS"}},
     r"input\.gain\.target: no coordinate 'GAINS' along the images in .*stack\.zarr, and no attribute 'GAINS' of "
     r"array 'target'; coordinates along 'image' there: GAIN, NANGAIN, NEGNOISE, RDNOISE, ZEROGAIN; attributes of "
     r"'target': BADGAIN, TGAIN, TRDNOISE; did you mean 'GAIN' or 'TGAIN'\? Give one of those, or the gain as a "
     r"number$"),
    ({"gain": {"target": "ZEROGAIN"}},
     r"input\.gain\.target: coordinate 'ZEROGAIN' is not a finite number > 0 for 1 image\(s\) \('epoch-1': 0\): "
     r"every image needs a finite gain > 0 \(electrons per ADU\); fix those values, or give the gain as a number"),
    ({"gain": {"target": "NANGAIN"}}, r"coordinate 'NANGAIN' is not a finite number > 0 for 1 image\(s\) "
                                      r"\('epoch-0': nan\)"),
    ({"gain": {"target": 1.5}, "read_noise": {"target": "NEGNOISE"}},
     r"input\.read_noise\.target: coordinate 'NEGNOISE' is not a finite number >= 0 for 1 image\(s\) \('epoch-0': "
     r"-1\): every image needs a finite read noise >= 0 \(electrons\)"),
    ({"gain": {"target": "BADGAIN"}},
     r"input\.gain\.target: attribute 'BADGAIN' of array 'target' is 'high', not a number, or a list of 2 numbers "
     r"\(one per image\): fix the attribute, or give the gain as a number"),
    ({"source": "shared", "gain": {"source": "GAIN"}},
     r"input\.gain\.source: 'GAIN' is an array of the input store \(a gain per image\), but source 'shared' is one "
     r"2-D reference shared by every target image, so it has one gain: give a number, or the name of an attribute"),
    ({"read_noise": {"target": 4.0}}, r"input\.read_noise\.target: no gain for the target: .* give input\.gain\."
                                      r"target too, or remove input\.read_noise\.target"),
    ({"gain": {"target": -1.0}}, r"input\.gain\.target: -1\.0 is not > 0: give the gain in electrons per ADU"),
    ({"gain": {"target": 1.0}, "read_noise": {"target": float("nan")}},
     r"input\.read_noise\.target: nan is not a finite number: give the read noise in electrons RMS"),
    ({"gain": {"target": 1.5}, "variance": {"target": "target_var"}},
     r"input\.gain\.target: input\.variance\.target is given too: .* give one: remove input\.variance\.target or "
     r"input\.gain\.target$"),
    ({"gain": "GAIN"}, r"input\.gain must be a mapping of source and target values, got 'GAIN'"),
    ({"gain": {"target": 1.5, "other": 1}}, r"input\.gain: unknown key\(s\) 'other'; allowed keys: target, source"),
    ({"target": "target_sub", "gain": {"target": "GAIN"}, "read_noise": {"target": "RDNOISE"}},
     r"input\.gain\.target: the pixels of image 'epoch-0' scatter by 2\d\.\d+ ADU \(the robust spread of neighbour "
     r"differences in rows 48:96, columns 48:96 of 'target_sub'\), \d+\.?\d* times the \d\.\d+ ADU that gain 1\.5 "
     r"e-/ADU and read noise 4 e- predict at their median .* ADU: the CCD model would much underrate the noise\. "
     r"Perhaps the image is sky-subtracted .*; or the gain is in ADU per electron .*\. Fix that, or give the "
     r"variances as arrays instead of input\.gain\.target$"),
    ({"gain": {"target": 40.0}}, r"input\.gain\.target: the pixels of image 'epoch-0' scatter by .* read noise 0 e- "
                                 r".*; or the read noise dominates and is missing \(give input\.read_noise\.target\)"),
])
def test_store_errors_name_the_key_and_the_fix(error_store, kwargs, message):
    with pytest.raises(InputError, match=message):
        open_inputs(error_store, **kwargs)


def test_store_errors_come_before_any_work(tmp_path, capsys):
    ccd_stack(tmp_path / "stack.zarr")
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(small_job(tmp_path, target="target_sub", gain={"target": "GAIN"})))
    assert main(["run", str(job_file)]) == 2
    assert "input.gain.target: the pixels of image 'epoch-0' scatter by" in capsys.readouterr().err
    assert main(["run", str(job_file), "--dry-run"]) == 2
    assert not (tmp_path / "kernels.zarr").exists()
    job_file.write_text(yaml.safe_dump(small_job(tmp_path, read_noise={"target": 4.0})))
    assert main(["run", str(job_file)]) == 2
    assert "input.read_noise.target: no gain for the target" in capsys.readouterr().err
    assert not (tmp_path / "kernels.zarr").exists()


# --------------------------------------------------------------------------- whole runs


def small_job(tmp_path: Path, output: str = "kernels.zarr", **input_section) -> dict:
    data = job_dict(tmp_path, input=input_section, tiles={"size": TILE}, kernel={"size": K})
    data["output"]["path"] = str(tmp_path / output)
    return data


def run(tmp_path: Path, output: str, **input_section) -> xr.Dataset:
    return run_job(job_from_dict(small_job(tmp_path, output, **input_section)), progress=False).open_dataset().load()


def test_a_blind_run_with_gain_and_read_noise_equals_one_with_the_same_variances(tmp_path, capsys):
    truth = ccd_stack(tmp_path / "stack.zarr", cosmic_rays=12)
    ccd = {"gain": {"target": "GAIN", "source": SOURCE_GAIN}, "read_noise": {"target": "RDNOISE", "source": "SRDNOISE"}}
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(small_job(tmp_path, "ccd.zarr", **ccd)))
    assert main(["run", str(job_file), "--dry-run"]) == 0
    assert ("variance   variances: target CCD model (gain coordinate 'GAIN' (1.5 to 2.5 over 2 images) e-/ADU, "
            "read noise coordinate 'RDNOISE' (4 to 7 over 2 images) e-), source CCD model (gain 2 e-/ADU, read noise "
            "attribute 'SRDNOISE' of array 'source' = 5 e-); lstsq's robust pass judges residuals against them"
            ) in capsys.readouterr().out

    by_ccd = run(tmp_path, "ccd.zarr", **ccd)
    by_arrays = run(tmp_path, "var.zarr", variance={"target": "target_var", "source": "source_var"})
    xr.testing.assert_identical(by_ccd.drop_attrs(), by_arrays.drop_attrs())  # the same variances: the same result
    assert (by_ccd["n_valid"].values < (TILE - K + 1) ** 2).any()  # the cosmic rays were clipped
    err = np.sqrt(((by_ccd["kernel"].values - truth["kernels"][:, None, None]) ** 2).sum(axis=(-2, -1))
                  / (truth["kernels"][:, None, None] ** 2).sum(axis=(-2, -1)))
    assert err.max() < 0.3, err  # a sanity check: small, noisy tiles of a sparse field
    # the settings are recorded: the job and the values read for every image
    assert yaml.safe_load(by_ccd.attrs["kernelmap_config"])["input"]["gain"] == {"source": 2.0, "target": "GAIN"}
    recorded = json.loads(by_ccd.attrs["kernelmap_input"])["variance"]
    assert recorded["target"] == {"model": "ccd", "gain": {"setting": "GAIN", "levels": list(GAINS)},
                                  "read_noise": {"setting": "RDNOISE", "levels": list(NOISES)}}
    assert recorded["source"]["read_noise"] == {"setting": "SRDNOISE", "levels": SOURCE_NOISE}
    # a resume with other CCD settings is refused
    other = small_job(tmp_path, "ccd.zarr", gain={"target": "GAIN", "source": 2.5})
    other["output"]["mode"] = "resume"
    with pytest.raises(OptionError, match="different configuration"):
        run_job(job_from_dict(other), progress=False)


def test_the_dry_run_says_when_the_variances_are_not_used(tmp_path):
    ccd_stack(tmp_path / "stack.zarr")
    data = small_job(tmp_path, gain={"target": 1.5})
    data["kernel"] = {"method": "welch", "size": K, "segment_size": 32}
    text = plan_job(job_from_dict(data)).describe()
    assert ("variance   variances: target CCD model (gain 1.5 e-/ADU, read noise 0 e- (not given)), source none; "
            "method welch does not use variances") in text
