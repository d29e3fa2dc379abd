"""Saturation levels: the pure bad-pixel function, the job section, the reader and whole runs."""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import dask
import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import xarray as xr
import yaml
import zarr
from conftest import job_dict
from hypothesis import given
from hypothesis import strategies as st
from stacks import make_stack

from pipeline import flags as fl
from pipeline.cli import main
from pipeline.core.saturation import halo, mask_saturated, saturated_pixels
from pipeline.errors import ConfigError, InputError, OptionError
from pipeline.io.inputs import open_inputs
from pipeline.job.config import SaturationConfig, dump_job, job_from_dict, load_job
from pipeline.job.run import plan_job, run_job

SIZE, TILE, K = 96, 48, 7
LEVEL = 5000.0
#: (image, y, x) of the injected saturated pixels: inside a tile, on a tile (and chunk) edge, at the image edge
STARS = [(0, 20, 20), (0, 21, 20), (1, 47, 60), (1, 48, 10), (1, 95, 0)]


@pytest.fixture(autouse=True)
def _sync_scheduler():
    with dask.config.set(scheduler="synchronous"):
        yield


def square(shape: tuple[int, int], points: list[tuple[int, int]], grow: int) -> np.ndarray:
    """The union of the (2 grow + 1)-pixel squares around ``points``, clipped to ``shape``."""
    out = np.zeros(shape, dtype=bool)
    for y, x in points:
        out[max(y - grow, 0): y + grow + 1, max(x - grow, 0): x + grow + 1] = True
    return out


def expected_bad(grow: int, n: int = 2) -> np.ndarray:
    return np.stack([square((SIZE, SIZE), [(y, x) for i, y, x in STARS if i == image], grow)
                     for image in range(n)])


def saturated_stack(path: Path, *, chunk: int = TILE, shared_source: bool = True, writer: str = "xarray",
                    stars: list[tuple[int, int, int]] = STARS) -> dict:
    """The test stack with saturated stars (values at and above ``LEVEL``) injected into the target."""
    truth = make_stack(path, n_images=2, size=SIZE, tile=TILE, chunk=chunk, k=K, shared_source=shared_source,
                       writer=writer)
    target = zarr.open_group(path, mode="r+")["target"]
    values = target[...]
    for number, (image, y, x) in enumerate(stars):
        values[image, y, x] = LEVEL if number % 2 else 4 * LEVEL  # exactly at the level, and far above
    target[...] = values
    return truth


def add_coordinates(path: Path, **coords: tuple[str, object]) -> None:
    """1-D arrays with their dimension name, as xarray writes coordinates into a Zarr 3 store."""
    group = zarr.open_group(path, mode="r+")
    for name, (dim, values) in coords.items():
        values = np.asarray(values)
        group.create_array(name, shape=values.shape, dtype=values.dtype, dimension_names=(dim,))[...] = values


def small_job(tmp_path: Path, **input_section) -> dict:
    return job_dict(tmp_path, input=input_section, tiles={"size": TILE}, kernel={"size": K})


def bad_map(inputs, role: str = "target", regions: int = 1) -> np.ndarray:
    """NaN pixels of every image as the reader returns them, read in ``regions`` x ``regions`` pieces."""
    n, ny, nx = inputs.shape
    index = {"source": 0, "target": 1}[role]
    out = np.zeros((n, ny, nx), dtype=bool)
    edges_y = np.linspace(0, ny, regions + 1).astype(int)
    edges_x = np.linspace(0, nx, regions + 1).astype(int)
    for image in range(n):
        for y0, y1 in itertools.pairwise(edges_y):
            for x0, x1 in itertools.pairwise(edges_x):
                values = inputs.reader.read(image, slice(y0, y1), slice(x0, x1))[index]
                out[image, y0:y1, x0:x1] = np.isnan(values)
    return out


# --------------------------------------------------------------------------- the pure function


@pytest.mark.parametrize("grow", [0, 1, 2, 3])
def test_a_pixel_at_the_level_grows_into_a_square(grow):
    image = np.zeros((15, 17))
    image[7, 8] = 10.0
    image[0, 16] = 11.0  # a corner: its square is clipped by the image edge
    bad = saturated_pixels(image, 10.0, grow)
    np.testing.assert_array_equal(bad, square(image.shape, [(7, 8), (0, 16)], grow))
    assert bad.sum() == (2 * grow + 1) ** 2 + (grow + 1) ** 2


def test_values_just_below_the_level_are_not_bad():
    level = 60000.0
    image = np.full((6, 6), np.nextafter(level, 0.0))
    assert not saturated_pixels(image, level, 2).any()
    below32 = np.full((6, 6), np.nextafter(np.float32(level), np.float32(0)), dtype=np.float32)
    assert not saturated_pixels(below32, level, 2).any()
    assert not saturated_pixels(np.full((4, 4), 59999, dtype=np.uint16), level, 1).any()
    assert saturated_pixels(np.full((4, 4), 60000, dtype=np.uint16), level, 0).all()


def test_nan_pixels_stay_nan_and_do_not_grow():
    image = np.ones((7, 7), dtype=np.float32)
    image[3, 3] = np.nan
    assert not saturated_pixels(image, 0.5 * np.inf, 1).any()
    out = mask_saturated(image, 2.0, 2)
    assert np.isnan(out[3, 3]) and np.isnan(out).sum() == 1
    image[0, 0] = 5.0
    out = mask_saturated(image, 2.0, 1)
    np.testing.assert_array_equal(np.isnan(out), square((7, 7), [(0, 0), (3, 3)], 0) | square((7, 7), [(0, 0)], 1))


def test_the_masked_copy_leaves_the_image_alone_and_keeps_float_dtypes():
    ints = np.arange(16, dtype=np.int32).reshape(4, 4)
    out = mask_saturated(ints, 15, 0)
    assert out.dtype == np.float64 and np.isnan(out[3, 3]) and ints[3, 3] == 15
    floats = np.zeros((4, 4), dtype=np.float32)
    floats[1, 1] = 9
    out = mask_saturated(floats, 9, 1)
    assert out.dtype == np.float32 and np.isnan(out).sum() == 9 and floats[1, 1] == 9


def test_a_stack_has_one_level_per_image():
    stack = np.zeros((3, 5, 5))
    stack[:, 2, 2] = [1.0, 2.0, 3.0]
    bad = saturated_pixels(stack, np.array([1.0, 5.0, 3.0]), 1)
    assert bad[0].sum() == 9 and not bad[1].any() and bad[2].sum() == 9
    with pytest.raises(ValueError, match="grow"):
        saturated_pixels(stack, 1.0, -1)
    with pytest.raises(ValueError, match="broadcast"):
        saturated_pixels(stack, [1.0, 2.0], 1)


images = hnp.arrays(np.float64, st.tuples(st.integers(1, 12), st.integers(1, 12)),
                    elements=st.floats(0, 100, allow_nan=False) | st.just(np.nan))


@given(images, st.floats(0, 100), st.floats(0, 100), st.integers(0, 3), st.integers(0, 3))
def test_more_pixels_are_bad_for_a_lower_level_or_a_larger_growth(image, a, b, g1, g2):
    lo, hi = sorted((a, b))
    small, large = sorted((g1, g2))
    assert not np.any(saturated_pixels(image, hi, small) & ~saturated_pixels(image, lo, small))
    assert not np.any(saturated_pixels(image, lo, small) & ~saturated_pixels(image, lo, large))
    assert not np.any(np.isnan(image) & ~np.isnan(mask_saturated(image, lo, large)))


@given(images, st.floats(0, 100), st.integers(0, 3), st.data())
def test_a_region_read_with_its_halo_has_the_bad_pixels_of_the_whole_image(image, level, grow, data):
    ny, nx = image.shape
    y0 = data.draw(st.integers(0, ny - 1))
    y1 = data.draw(st.integers(y0 + 1, ny))
    x0 = data.draw(st.integers(0, nx - 1))
    x1 = data.draw(st.integers(x0 + 1, nx))
    (read_y, keep_y), (read_x, keep_x) = halo(y0, y1, grow, ny), halo(x0, x1, grow, nx)
    region = saturated_pixels(image[read_y, read_x], level, grow)[keep_y, keep_x]
    np.testing.assert_array_equal(region, saturated_pixels(image, level, grow)[y0:y1, x0:x1])


# --------------------------------------------------------------------------- the job section


def job(saturation) -> object:
    """(The tile-kernel model: the one stores made before these keys were written with.)"""
    return job_from_dict({"input": {"path": "in.zarr", "saturation": saturation}, "model": {"method": "kernels"},
                          "output": {"path": "out.zarr"}})


def config_errors(saturation) -> list[str]:
    with pytest.raises(ConfigError) as info:
        job(saturation)
    return info.value.errors


def test_the_section_and_its_single_number_form(tmp_path):
    assert job(None).input.saturation is None
    assert job(60000).input.saturation == SaturationConfig(source=60000.0, target=60000.0, grow=1)
    assert job({"target": "SATURATE"}).input.saturation == SaturationConfig(target="SATURATE")
    full = job({"source": 6e4, "target": "SATURATE", "grow": 0})
    assert yaml.safe_load(dump_job(full))["input"]["saturation"] == {"source": 60000.0, "target": "SATURATE",
                                                                     "grow": 0}
    path = tmp_path / "job.yaml"
    path.write_text("input:\n  path: in.zarr\n  saturation: 6.0e4\noutput:\n  path: out.zarr\n")
    assert load_job(path).input.saturation == job(60000).input.saturation
    with pytest.raises(ConfigError, match="input.saturation is 60000.0, not a mapping"):
        load_job(path, ["input.saturation.grow=3"])
    assert load_job(path, ["input.saturation={target: 1}", "input.saturation.grow=3"]).input.saturation.grow == 3
    assert load_job(path, ["input.saturation={target: SAT}"]).input.saturation.source is None
    path.write_text(dump_job(full))
    assert load_job(path) == full
    survey = load_job(Path(__file__).parents[1] / "configs" / "survey.yaml").input.saturation
    assert survey == SaturationConfig(source=60000.0, target="SATURATE", grow=1)


@pytest.mark.parametrize(("saturation", "message"), [
    ({"target": 1, "grow": -1}, "input.saturation.grow: -1 is too small: at least 0"),
    ({"target": 1, "grow": 1.5}, "input.saturation.grow: 1.5 is not an integer"),
    ({"target": 1, "grw": 2}, "input.saturation.grw: unknown key (did you mean 'grow'?); allowed keys: source, target, "
                              "grow"),
    ("SATURATE", "input.saturation: 'SATURATE' is not a number or a mapping: a name is looked up for source and "
                 "target separately, so give it per image, e.g. saturation: {target: SATURATE}"),
    ({"target": "60000"}, "input.saturation.target: '60000' is quoted text, not a number: write the level "
                          "without quotes"),
    ({"target": float("nan")}, "input.saturation.target: nan is not a finite number"),
    ({"source": float("inf")}, "input.saturation.source: inf is not a finite number"),
    ({"target": True}, "input.saturation.target: true is not a number (the level in the images' stored units"),
    ({"target": [1, 2]}, "input.saturation.target: [1, 2] is not a number"),
    ({"target": ""}, "input.saturation.target: must not be empty"),
    ({}, "input.saturation: no level for the source or the target: give source and/or target"),
    ({"grow": 2}, "input.saturation: no level for the source or the target"),
    (True, "input.saturation: true is not a mapping"),
])
def test_bad_sections_name_the_key_and_the_fix(saturation, message):
    errors = config_errors(saturation)
    assert len(errors) == 1 and errors[0].startswith(message), errors


def test_the_fingerprint_follows_the_saturation_settings():
    base = job(None).fingerprint()
    prints = {job(s).fingerprint() for s in ({"target": 1}, {"target": 2}, {"source": 1}, {"target": 1, "grow": 2},
                                              {"target": "SAT"}, 1)}
    assert len(prints) == 6 and base not in prints
    assert job(60000).fingerprint() == job({"source": 60000, "target": 60000.0, "grow": 1}).fingerprint()
    # a job without saturation keeps the fingerprint it had before the key existed: stores made then resume
    data = job(None).model_dump(mode="json")
    # keys added since, left out when unset
    later = ("storage_options", "saturation", "variance", "weight", "gain", "read_noise")
    before = {"input": {k: v for k, v in data["input"].items() if k not in later},
              **{k: data[k] for k in ("tiles", "kernel")}, "output": {"dtype": data["output"]["dtype"]},
              "model": {k: v for k, v in data["model"].items() if k != "method"}}
    text = json.dumps(before, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    assert base == hashlib.sha256(text.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------- the reader


@pytest.mark.parametrize("grow", [0, 1, 2])
def test_the_reader_returns_nan_exactly_at_the_grown_saturated_pixels(tmp_path, grow):
    saturated_stack(tmp_path / "stack.zarr")
    plain = open_inputs(tmp_path / "stack.zarr")
    inputs = open_inputs(tmp_path / "stack.zarr", saturation={"target": LEVEL, "grow": grow})
    want = expected_bad(grow)
    for regions in (1, 2, 3, 5):  # whole images, the chunks, and regions straddling them
        np.testing.assert_array_equal(bad_map(inputs, regions=regions), want)
    target, original = inputs.target.compute(), plain.target.compute()
    np.testing.assert_array_equal(np.isnan(target), want)
    np.testing.assert_array_equal(target[~want], original[~want])  # everything else as stored
    assert target.dtype == original.dtype == np.float32
    source = inputs.reader.read(0, slice(0, SIZE), slice(0, SIZE))[0]
    assert not np.isnan(source).any()  # no source level: the source is untouched
    assert inputs.identity["saturation"] == {"grow": grow, "source": None,
                                             "target": {"setting": LEVEL, "levels": LEVEL}}


@pytest.mark.parametrize("chunk", [24, 32, 48, 96])
def test_the_bad_map_does_not_depend_on_the_chunks_or_the_blocks(tmp_path, chunk):
    path = tmp_path / f"stack-{chunk}.zarr"
    saturated_stack(path, chunk=chunk, writer="zarr")
    inputs = open_inputs(path, saturation={"target": LEVEL, "grow": 2})
    assert inputs.chunks == (chunk, chunk)
    for regions in (1, 2, 4):
        np.testing.assert_array_equal(bad_map(inputs, regions=regions), expected_bad(2))


def test_a_per_image_coordinate_gives_each_image_its_level(tmp_path):
    path = tmp_path / "stack.zarr"
    saturated_stack(path, shared_source=False)
    add_coordinates(path, SATURATE=("image", [LEVEL, 2 * LEVEL]))
    zarr.open_group(path, mode="r+")["target"].attrs["SATURATE"] = 1.0  # the coordinate comes first
    inputs = open_inputs(path, saturation={"target": "SATURATE", "source": "SATURATE"})
    want = expected_bad(1)
    want[1] = square((SIZE, SIZE), [(y, x) for i, y, x in STARS[2::2] if i == 1], 1)  # only 4 x LEVEL >= 2 x LEVEL
    np.testing.assert_array_equal(bad_map(inputs, regions=2), want)
    np.testing.assert_array_equal(np.isnan(inputs.target.compute()), want)
    assert not bad_map(inputs, "source").any()
    np.testing.assert_array_equal(inputs.saturation.target.levels, [LEVEL, 2 * LEVEL])
    assert "coordinate 'SATURATE' (5000 to 10000 over 2 images" in inputs.saturation.describe()


def test_attribute_levels_one_number_or_one_per_image(tmp_path):
    path = tmp_path / "stack.zarr"
    saturated_stack(path)
    group = zarr.open_group(path, mode="r+")
    group["target"].attrs["SATURATE"] = [LEVEL, 2 * LEVEL]
    group["source"].attrs["SATURATE"] = 120.0
    source = group["source"][...]
    inputs = open_inputs(path, saturation={"target": "SATURATE", "source": "SATURATE", "grow": 0})
    want = expected_bad(0)
    want[1] = square((SIZE, SIZE), [(y, x) for i, y, x in STARS[2::2] if i == 1], 0)
    np.testing.assert_array_equal(bad_map(inputs), want)
    for image in range(2):  # the shared 2-D source: one level, the same bad pixels for every image
        np.testing.assert_array_equal(np.isnan(inputs.reader.read(image, slice(0, SIZE), slice(0, SIZE))[0]),
                                      source >= 120.0)
    assert 0 < np.count_nonzero(source >= 120.0) < 200
    np.testing.assert_array_equal(np.isnan(inputs.source.compute()), source >= 120.0)
    assert inputs.identity["saturation"]["target"] == {"setting": "SATURATE", "levels": [LEVEL, 2 * LEVEL]}
    assert inputs.identity["saturation"]["source"] == {"setting": "SATURATE", "levels": 120.0}


def test_levels_are_in_the_decoded_units_of_packed_integers(tmp_path):
    path = tmp_path / "stack.zarr"
    rng = np.random.default_rng(3)
    raw = rng.integers(0, 1000, size=(2, 40, 40)).astype(np.int16)
    raw[1, 10, 30] = 30000
    group = zarr.open_group(path, mode="w", zarr_format=3)
    for name in ("source", "target"):
        arr = group.create_array(name, shape=raw.shape, dtype=raw.dtype, chunks=(2, 20, 20))
        arr[...] = raw
        arr.attrs.update({"scale_factor": 2.0, "add_offset": 100.0, "SATURATE": [5000.0, 60100.0]})
    # stored 30000 is 60100 decoded; stored 1000 or less (up to 2100 decoded) is not saturated
    want = np.stack([np.zeros((40, 40), bool), square((40, 40), [(10, 30)], 1)])
    for target in (60100, "SATURATE"):
        inputs = open_inputs(path, saturation={"target": target, "source": 60101, "grow": 1})
        np.testing.assert_array_equal(bad_map(inputs), want)
        np.testing.assert_array_equal(np.isnan(inputs.target.compute()), want)  # two images in a chunk
        assert not bad_map(inputs, "source").any()
    assert inputs.target.dtype == np.float32


def test_the_reader_still_travels_to_other_processes(tmp_path):
    import pickle

    saturated_stack(tmp_path / "stack.zarr")
    inputs = open_inputs(tmp_path / "stack.zarr", saturation={"target": LEVEL})
    reader = pickle.loads(pickle.dumps(inputs.reader))
    np.testing.assert_array_equal(np.isnan(reader.read(1, slice(40, 56), slice(0, 70))[1]),
                                  expected_bad(1)[1, 40:56, 0:70])


# --------------------------------------------------------------------------- errors in the store


@pytest.fixture(scope="module")
def error_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("errors") / "stack.zarr"
    saturated_stack(path, shared_source=True)
    add_coordinates(
        path,
        SATURATE=("image", [LEVEL, LEVEL]),
        GAIN=("image", [1.5, 1.6]),
        holes=("image", [LEVEL, np.nan]),
        names=("image", np.array([True, False])),
        too_long=("other", [1.0, 2.0, 3.0]),
        along_y=("y", np.arange(SIZE, dtype=float)),
        row=("other2", [LEVEL, LEVEL]),
    )
    group = zarr.open_group(path, mode="r+")
    group["target"].attrs.update({"SATLEVEL": "high", "PERIMAGE": [1.0, 2.0, 3.0], "LOW": 1.0,
                                  "BADLIST": [LEVEL, float("nan")]})
    group["source"].attrs.update({"SATURATE": 60000})
    return path


@pytest.mark.parametrize(("saturation", "message"), [
    ({"target": "saturate"},
     r"input\.saturation\.target: no coordinate 'saturate' along the images in .*stack\.zarr, and no attribute "
     r"'saturate' of array 'target'; coordinates along 'image' there: GAIN, SATURATE, holes, names, row; "
     r"attributes of 'target': BADLIST, LOW, PERIMAGE, SATLEVEL; did you mean 'SATURATE'\? Give one of those, "
     r"or the level as a number$"),
    ({"target": "SATLEVL"}, r"no coordinate 'SATLEVL' .* did you mean 'SATLEVEL'\?"),
    ({"source": "GAINS"},
     r"input\.saturation\.source: no coordinate 'GAINS' along the images .* and no attribute 'GAINS' of array "
     r"'source'; attributes of 'source': SATURATE\. Give one of those"),
    ({"source": "SATURATE", "target": "SATURATE"},
     None),  # the source's attribute and the target's coordinate: fine
    ({"source": "GAIN"},
     r"input\.saturation\.source: 'GAIN' is an array of the input store \(a level per image\), but source "
     r"'source' is one 2-D reference shared by every target image, so it has one level: give a number, or the "
     r"name of an attribute of array 'source'"),
    ({"target": "too_long"},
     r"input\.saturation\.target: coordinate 'too_long' in .* has shape \(3,\) but must be 1-D along 'image' "
     r"with one level per image \(2\); fix it, or give the level as a number"),
    ({"target": "row"},
     r"input\.saturation\.target: coordinate 'row' in .* lies along 'other2', not along the image axis 'image'"),
    ({"target": "along_y"}, r"coordinate 'along_y' in .* has shape \(96,\) but must be 1-D along 'image'"),
    ({"target": "names"}, r"input\.saturation\.target: coordinate 'names' in .* holds .* values, not numbers"),
    ({"target": "holes"},
     r"input\.saturation\.target: coordinate 'holes' is not a finite number for 1 image\(s\) \('epoch-1'\): "
     r"every image needs a finite level; fix those values, or give the level as a number"),
    ({"target": "SATLEVEL"},
     r"input\.saturation\.target: attribute 'SATLEVEL' of array 'target' is 'high', not a number, or a list of "
     r"2 numbers \(one per image\): fix the attribute, or give the level as a number"),
    ({"target": "PERIMAGE"}, r"attribute 'PERIMAGE' of array 'target' is \[1\.0, 2\.0, 3\.0\], not a number"),
    ({"target": "BADLIST"}, r"attribute 'BADLIST' of array 'target' is not a finite number for 1 image"),
    ({"target": "LOW"},
     r"input\.saturation\.target: the level 1 \(attribute 'LOW' of array 'target'\) of image 'epoch-0' is at or "
     r"below its median pixel value .* \(sampled in rows 48:96, columns 48:96 of 'target'\): at least half of its "
     r"pixels would be bad, so the level is probably in other units .* remove input\.saturation\.target$"),
    ({"source": -50.0}, r"input\.saturation\.source: the level -50 of the shared source is at or below"),
    ({"target": 1, "grow": -1}, r"input\.saturation\.grow: -1 is not an integer >= 0"),
    ({"target": 1, "grw": 1}, r"input\.saturation: unknown key\(s\) 'grw'; allowed keys: source, target, grow"),
])
def test_store_errors_name_the_key_and_the_fix(error_store, saturation, message):
    if message is None:
        assert open_inputs(error_store, saturation=saturation).saturation.source.level(None) == 60000.0
        return
    with pytest.raises(InputError, match=message):
        open_inputs(error_store, saturation=saturation)


def test_store_errors_come_before_any_work(tmp_path, capsys):
    saturated_stack(tmp_path / "stack.zarr")
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(small_job(tmp_path, saturation={"target": "SATURATE"})))
    assert main(["run", str(job_file)]) == 2
    assert "input.saturation.target: no coordinate 'SATURATE'" in capsys.readouterr().err
    assert main(["run", str(job_file), "--dry-run"]) == 2
    assert not (tmp_path / "kernels.zarr").exists()
    job_file.write_text(yaml.safe_dump(small_job(tmp_path, saturation={"target": 1, "grow": -2})))
    assert main(["run", str(job_file)]) == 2
    assert "input.saturation.grow: -2 is too small: at least 0" in capsys.readouterr().err


# --------------------------------------------------------------------------- whole runs


def test_a_run_masks_the_saturated_stars_and_records_the_settings(tmp_path, capsys):
    truth = saturated_stack(tmp_path / "stack.zarr")
    data = small_job(tmp_path, saturation={"target": LEVEL, "grow": 1})
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(data))
    assert main(["run", str(job_file), "--dry-run"]) == 0
    dry = capsys.readouterr().out
    assert "saturation target >= 5000; sampled medians" in dry and "source no limit; bad areas grown by 1 px" in dry

    ds = run_job(job_from_dict(data), progress=False).open_dataset().load()
    touched = np.zeros((2, 2, 2), dtype=bool)  # tiles holding a saturated pixel or its grown area
    fitted = np.zeros((2, 2, 2), dtype=bool)  # ... where the tile fits target pixels (a bad one drops its row)
    bad = expected_bad(1)
    h = K // 2
    for image in range(2):
        for ty in range(2):
            for tx in range(2):
                tile = bad[image, ty * TILE:(ty + 1) * TILE, tx * TILE:(tx + 1) * TILE]
                touched[image, ty, tx] = tile.any()
                fitted[image, ty, tx] = tile[h:-h, h:-h].any()
    assert touched.sum() == 5 and fitted.sum() >= 1
    masked = (ds["quality_flag"].values & fl.MASKED) != 0
    np.testing.assert_array_equal(masked, fitted)
    assert not np.any(ds["quality_flag"].values & fl.BAD)
    kernels = ds["kernel"].values.astype(float)
    assert np.isfinite(kernels).all()
    true = truth["kernels"]
    err = np.sqrt(((kernels - true) ** 2).sum(axis=(-2, -1)) / (true**2).sum(axis=(-2, -1)))
    assert err.max() < 2e-2, err  # the stars are left out, not fitted
    assert yaml.safe_load(ds.attrs["kernelmap_config"])["input"]["saturation"] == {
        "source": None, "target": LEVEL, "grow": 1}
    assert '"saturation": {"grow": 1, "source": null, "target": {"levels": 5000.0, "setting": 5000.0}}' \
        in ds.attrs["kernelmap_input"]

    # without the level (and without the robust pass, which finds flat saturated cores by itself)
    # a star spoils the kernel of its tile
    data = small_job(tmp_path)
    data["kernel"]["robust"] = False
    data["output"]["path"] = str(tmp_path / "plain.zarr")
    plain = run_job(job_from_dict(data), progress=False).open_dataset()["kernel"].values.astype(float)
    plain_err = np.sqrt(((plain - true) ** 2).sum(axis=(-2, -1)) / (true**2).sum(axis=(-2, -1)))
    assert plain_err[touched].max() > 0.5


def test_blocks_of_any_size_give_the_same_result(tmp_path):
    saturated_stack(tmp_path / "stack.zarr", chunk=32, writer="zarr")
    results = []
    for block_tiles in (1, 2):
        data = small_job(tmp_path, saturation={"target": LEVEL, "grow": 2})
        data["compute"]["block_tiles"] = block_tiles
        data["output"]["path"] = str(tmp_path / f"kernels-{block_tiles}.zarr")
        plan = plan_job(job_from_dict(data))
        assert plan.grid.block_tiles == (block_tiles, block_tiles)
        results.append(plan.execute(progress=False).open_dataset().load())
    xr.testing.assert_identical(results[0].drop_attrs(), results[1].drop_attrs())
    assert np.count_nonzero(results[0]["quality_flag"].values & fl.MASKED) >= 1


def test_a_resume_with_other_saturation_settings_is_refused(tmp_path):
    saturated_stack(tmp_path / "stack.zarr")
    run_job(job_from_dict(small_job(tmp_path, saturation={"target": LEVEL})), progress=False)
    for other in ({"target": LEVEL, "grow": 2}, {"target": 2 * LEVEL}, {"target": LEVEL, "source": 1e4}, None):
        data = small_job(tmp_path, saturation=other)
        data["output"]["mode"] = "resume"
        with pytest.raises(OptionError, match="different configuration"):
            run_job(job_from_dict(data), progress=False)
    data = small_job(tmp_path, saturation={"target": LEVEL})
    data["output"]["mode"] = "resume"
    assert run_job(job_from_dict(data), progress=False).tiles_computed == 0
