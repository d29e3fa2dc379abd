"""Reading the input stack from Zarr stores: formats, layouts, labels and errors."""

from __future__ import annotations

import json
import os
import pickle
import uuid
from pathlib import Path

import dask
import fsspec
import numpy as np
import pytest
import xarray as xr
import zarr
import zarr.errors

from pipeline.errors import InputError
from pipeline.io.inputs import Inputs, open_inputs

N, NY, NX = 3, 24, 20
CHUNKS = (1, 8, 10)
EPOCHS = ["2021-03-04a", "2021-03-05", "e3"]


@pytest.fixture(autouse=True)
def _sync_scheduler():
    with dask.config.set(scheduler="synchronous"):
        yield


def stack(n: int = N, ny: int = NY, nx: int = NX, seed: int = 0) -> dict[str, np.ndarray]:
    """Source (float32), target (float64) and mask (uint8) with distinct values."""
    rng = np.random.default_rng(seed)
    source = rng.normal(size=(n, ny, nx)).astype(np.float32)
    target = rng.normal(size=(n, ny, nx))
    mask = (rng.random((n, ny, nx)) < 0.1).astype(np.uint8)
    return {"source": source, "target": target, "mask": mask}


def write_plain(
    path: str | Path,
    arrays: dict[str, np.ndarray],
    *,
    zarr_format: int = 3,
    group: str | None = None,
    chunks: dict[str, tuple[int, ...]] | None = None,
    dimension_names: dict[str, tuple[str, ...]] | None = None,
    storage_options: dict | None = None,
) -> None:
    """Plain Zarr arrays, without dimension names unless given (Zarr 3 only)."""
    root = zarr.open_group(path, mode="w", zarr_format=zarr_format, storage_options=storage_options)
    grp = root.create_group(group) if group else root
    for name, values in arrays.items():
        kwargs = {}
        if dimension_names and name in dimension_names:
            kwargs["dimension_names"] = dimension_names[name]
        chunk = (chunks or {}).get(name, CHUNKS[-values.ndim:] if values.ndim <= 3 else values.shape)
        arr = grp.create_array(name, shape=values.shape, dtype=values.dtype, chunks=chunk, **kwargs)
        arr[...] = values


def write_xarray(path: Path, ds: xr.Dataset, *, zarr_format: int, chunks: tuple[int, ...] = CHUNKS) -> None:
    """``ds`` written by xarray; consolidated metadata only for Zarr 2 (it warns in Zarr 3)."""
    encoding = {
        name: {"chunks": chunks[-var.ndim:]} for name, var in ds.data_vars.items() if var.ndim >= 2
    }
    ds.to_zarr(path, mode="w", zarr_format=zarr_format, consolidated=zarr_format == 2, encoding=encoding)


def epoch_dataset(data: dict[str, np.ndarray], labels: np.ndarray | None = None) -> xr.Dataset:
    labels = np.array(EPOCHS, dtype=object) if labels is None else labels
    dims = ("image", "y", "x")
    return xr.Dataset(
        {name: (dims[-v.ndim:], v) for name, v in data.items()},
        coords={"image": ("image", labels, {"long_name": "epoch id"})},
    )


def computed(inputs: Inputs) -> dict[str, np.ndarray]:
    """The whole arrays through Dask, after checking the block reader agrees with them."""
    out = {"source": inputs.source.compute(), "target": inputs.target.compute()}
    if inputs.mask is not None:
        out["mask"] = inputs.mask.compute()
    check_reader(inputs, out)
    return out


def check_reader(inputs: Inputs, whole: dict[str, np.ndarray]) -> None:
    """What tasks read (regions straddling chunks, every image) equals the Dask arrays."""
    n, ny, nx = inputs.shape
    regions = [(slice(0, ny), slice(0, nx)), (slice(3, ny - 2), slice(5, nx - 1)), (slice(7, 9), slice(9, 11))]
    for image in range(n):
        for ys, xs in regions:
            got = dict(zip(("source", "target", "mask"), inputs.reader.read(image, ys, xs)))
            for name, values in whole.items():
                want = values[ys, xs] if values.ndim == 2 else values[image, ys, xs]
                assert got[name].dtype == want.dtype, name
                np.testing.assert_array_equal(got[name], want, err_msg=name)
    if "mask" not in whole:
        assert inputs.reader.read(0, slice(0, 2), slice(0, 2))[2] is None


# --------------------------------------------------------------------------- formats and layouts


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_plain_arrays_round_trip(tmp_path: Path, zarr_format: int) -> None:
    data = stack()
    path = tmp_path / "stack.zarr"
    write_plain(path, data, zarr_format=zarr_format)

    inputs = open_inputs(path, mask="mask")

    assert inputs.shape == (N, NY, NX)
    assert not inputs.shared_source
    assert inputs.chunks == CHUNKS[1:]
    for name, values in computed(inputs).items():
        assert values.dtype == data[name].dtype
        np.testing.assert_array_equal(values, data[name])
        assert getattr(inputs, name).chunksize == CHUNKS
    np.testing.assert_array_equal(inputs.images, np.arange(N))
    assert inputs.image_attrs == {}

    ident = inputs.identity
    assert json.loads(json.dumps(ident)) == ident
    assert ident["store"] == str(path.resolve())
    assert ident["group"] == ""
    assert ident["image_coordinate"] is None
    assert ident["arrays"]["target"] == {
        "name": "target",
        "shape": [N, NY, NX],
        "dtype": "float64",
        "chunks": list(CHUNKS),
        "zarr_format": zarr_format,
        "dimension_names": None,
    }
    assert ident["arrays"]["mask"]["dtype"] == "uint8"
    assert "stack.zarr" in repr(inputs) and "3 images of 24x20" in repr(inputs)


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_xarray_dataset_with_epoch_labels(tmp_path: Path, zarr_format: int) -> None:
    data = stack()
    path = tmp_path / "stack.zarr"
    write_xarray(path, epoch_dataset(data), zarr_format=zarr_format)

    inputs = open_inputs(path, mask="mask")

    for name, values in computed(inputs).items():
        np.testing.assert_array_equal(values, data[name])
    assert inputs.chunks == CHUNKS[1:]
    assert inputs.images.dtype.kind == "U"
    assert inputs.images.tolist() == EPOCHS
    assert inputs.image_attrs == {"long_name": "epoch id"}
    assert inputs.identity["image_coordinate"] == "image"
    assert inputs.identity["arrays"]["source"]["dimension_names"] == ["image", "y", "x"]
    # the labels come back as xarray itself reads them
    assert inputs.images.tolist() == xr.open_zarr(path, consolidated=zarr_format == 2).image.values.tolist()


@pytest.mark.parametrize(
    "labels",
    [
        np.array(EPOCHS),  # fixed-length unicode
        np.array([e.encode() for e in EPOCHS]),  # fixed-length bytes
        np.array(EPOCHS, dtype=np.dtypes.StringDType()),
    ],
    ids=["unicode", "bytes", "stringdtype"],
)
def test_string_labels_zarr2(tmp_path: Path, labels: np.ndarray) -> None:
    path = tmp_path / "stack.zarr"
    write_xarray(path, epoch_dataset(stack(), labels), zarr_format=2)
    inputs = open_inputs(path)
    assert inputs.images.dtype.kind == "U"
    assert inputs.images.tolist() == EPOCHS


def test_fixed_width_labels_zarr3(tmp_path: Path) -> None:
    path = tmp_path / "stack.zarr"
    # Zarr 3 has no stable spec for fixed-width strings: zarr warns on write, not on read
    with pytest.warns(zarr.errors.UnstableSpecificationWarning, match="FixedLengthUTF32"):
        write_xarray(path, epoch_dataset(stack(), np.array(EPOCHS)), zarr_format=3)
    assert open_inputs(path).images.tolist() == EPOCHS


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_numeric_and_time_labels(tmp_path: Path, zarr_format: int) -> None:
    path = tmp_path / "ints.zarr"
    write_xarray(path, epoch_dataset(stack(), np.array([101, 205, 309])), zarr_format=zarr_format)
    inputs = open_inputs(path)
    assert inputs.images.dtype.kind == "i"
    assert inputs.images.tolist() == [101, 205, 309]

    times = np.array(["2021-03-04T01:00", "2021-03-05", "2021-04-01"], dtype="datetime64[ns]")
    path = tmp_path / "times.zarr"
    write_xarray(path, epoch_dataset(stack(), times), zarr_format=zarr_format)
    inputs = open_inputs(path)
    np.testing.assert_array_equal(inputs.images, times)
    assert inputs.image_attrs == {"long_name": "epoch id"}


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_transposed_named_layout(tmp_path: Path, zarr_format: int) -> None:
    data = stack()
    flipped = {k: v.transpose(0, 2, 1) for k, v in data.items()}  # stored as (image, x, y)
    ds = xr.Dataset(
        {k: (("image", "x", "y"), v) for k, v in flipped.items()},
        coords={"image": ("image", np.array(EPOCHS, dtype=object))},
    )
    path = tmp_path / "stack.zarr"
    write_xarray(path, ds, zarr_format=zarr_format, chunks=(1, 5, 12))  # x chunk 5, y chunk 12

    inputs = open_inputs(path, mask="mask")

    assert inputs.shape == (N, NY, NX)
    assert inputs.chunks == (12, 5)
    for name, values in computed(inputs).items():
        np.testing.assert_array_equal(values, data[name])
    assert inputs.images.tolist() == EPOCHS
    assert inputs.identity["arrays"]["target"]["dimension_names"] == ["image", "x", "y"]


def test_dimension_names_zarr3(tmp_path: Path) -> None:
    data = stack()
    path = tmp_path / "stack.zarr"
    write_plain(
        path,
        {
            "target": data["target"].transpose(1, 0, 2),  # (y, epoch, x)
            "source": data["source"],  # names unknown: positional
            "epoch": np.array([7, 8, 9]),
        },
        chunks={"target": (8, 1, 10), "epoch": (3,)},
        dimension_names={"target": ("y", "epoch", "x"), "source": ("a", "b", "c"), "epoch": ("epoch",)},
    )
    inputs = open_inputs(path)
    np.testing.assert_array_equal(inputs.target.compute(), data["target"])
    np.testing.assert_array_equal(inputs.source.compute(), data["source"])
    computed(inputs)  # the block reader reorders axes like the Dask arrays
    assert inputs.chunks == (8, 10)
    # the image dimension is named "epoch", so its labels come from the array "epoch"
    assert inputs.images.tolist() == [7, 8, 9]
    assert inputs.identity["image_coordinate"] == "epoch"


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_shared_source_and_2d_mask(tmp_path: Path, zarr_format: int) -> None:
    data = stack()
    reference, bad = data["source"][0], data["mask"][0]
    path = tmp_path / "stack.zarr"
    write_plain(path, {"ref": reference, "target": data["target"], "bad": bad}, zarr_format=zarr_format)

    inputs = open_inputs(path, source="ref", mask="bad")

    assert inputs.shared_source
    assert inputs.source.shape == (NY, NX) and inputs.mask.shape == (NY, NX)
    np.testing.assert_array_equal(inputs.source.compute(), reference)
    np.testing.assert_array_equal(inputs.mask.compute(), bad)
    computed(inputs)
    assert inputs.identity["arrays"]["source"]["name"] == "ref"


def test_xarray_shared_source(tmp_path: Path) -> None:
    data = stack()
    ds = epoch_dataset({"source": data["source"][0], "target": data["target"], "mask": data["mask"][1]})
    path = tmp_path / "stack.zarr"
    write_xarray(path, ds, zarr_format=3)
    inputs = open_inputs(path, mask="mask")
    assert inputs.shared_source and inputs.mask.ndim == 2
    np.testing.assert_array_equal(inputs.source.compute(), data["source"][0])


def test_bool_mask(tmp_path: Path) -> None:
    data = stack()
    path = tmp_path / "stack.zarr"
    write_plain(path, {**data, "mask": data["mask"].astype(bool)})
    inputs = open_inputs(path, mask="mask")
    np.testing.assert_array_equal(inputs.mask.compute(), data["mask"].astype(bool))


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_group_inside_store(tmp_path: Path, zarr_format: int) -> None:
    data = stack()
    path = tmp_path / "survey.zarr"
    write_plain(path, data, zarr_format=zarr_format, group="night1")

    inputs = open_inputs(path, group="night1")
    np.testing.assert_array_equal(inputs.target.compute(), data["target"])
    assert inputs.identity["group"] == "night1"

    missing = r"input\.group: group 'night2' in .*survey\.zarr is missing; groups there: night1"
    with pytest.raises(InputError, match=missing):
        open_inputs(path, group="night2")
    with pytest.raises(InputError, match=r"input\.group: group 'night1/target' .* is an array, not a group"):
        open_inputs(path, group="night1/target")
    at_root = r"no array 'source' .*arrays there: \(none\); groups there: night1 \(set input\.group"
    with pytest.raises(InputError, match=at_root):
        open_inputs(path)


def test_xarray_group(tmp_path: Path) -> None:
    data = stack()
    path = tmp_path / "survey.zarr"
    epoch_dataset(data).to_zarr(path, group="g/r", zarr_format=3, consolidated=False)
    inputs = open_inputs(path, group="g/r")
    assert inputs.images.tolist() == EPOCHS
    np.testing.assert_array_equal(inputs.target.compute(), data["target"])


def test_file_url(tmp_path: Path) -> None:
    data = stack()
    path = tmp_path / "stack.zarr"
    write_xarray(path, epoch_dataset(data), zarr_format=3)
    url = path.resolve().as_uri()
    assert url.startswith("file:///")

    inputs = open_inputs(url, storage_options={"auto_mkdir": False})

    np.testing.assert_array_equal(inputs.source.compute(), data["source"])
    assert inputs.images.tolist() == EPOCHS
    assert inputs.identity["store"] == url


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_memory_store(zarr_format: int) -> None:
    data = stack()
    url = f"memory://kernelmap-test-{uuid.uuid4().hex}/stack.zarr"
    try:
        write_plain(url, data, zarr_format=zarr_format, chunks={"target": (2, 24, 4)})
        inputs = open_inputs(url, mask="mask")
        assert inputs.chunks == (24, 4)
        for name, values in computed(inputs).items():
            np.testing.assert_array_equal(values, data[name])
        assert inputs.identity["store"] == url
    finally:
        fsspec.filesystem("memory").rm(url.removeprefix("memory://").split("/")[0], recursive=True)


def test_sharded_store_reads_whole_shards(tmp_path: Path) -> None:
    data = stack()
    path = tmp_path / "stack.zarr"
    grp = zarr.open_group(path, mode="w", zarr_format=3)
    for name in ("source", "target"):
        values = data[name]
        arr = grp.create_array(
            name, shape=values.shape, dtype=values.dtype, chunks=(1, 4, 5), shards=(1, 8, 10)
        )
        arr[...] = values
    inputs = open_inputs(path)
    assert inputs.chunks == (8, 10)
    assert inputs.target.chunksize == (1, 8, 10)
    assert inputs.identity["arrays"]["target"]["shards"] == [1, 8, 10]
    np.testing.assert_array_equal(inputs.target.compute(), data["target"])
    computed(inputs)


def test_big_endian_zarr2(tmp_path: Path) -> None:
    data = stack()
    path = tmp_path / "stack.zarr"
    swapped = {"source": data["source"].astype(">f4"), "target": data["target"].astype(">f8")}
    write_plain(path, swapped, zarr_format=2)
    inputs = open_inputs(path)
    assert inputs.target.dtype == np.dtype("float64") and inputs.target.dtype.isnative
    np.testing.assert_array_equal(inputs.target.compute(), data["target"])
    np.testing.assert_array_equal(inputs.source.compute(), data["source"])
    computed(inputs)


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_cf_packed_values_and_fill(tmp_path: Path, zarr_format: int) -> None:
    """Packed integers with a fill value decode as xarray decodes them, fills to NaN."""
    data = stack()
    target = np.round(data["target"] * 4) / 4
    target[0, 1, 2] = np.nan
    dims = ("image", "y", "x")
    ds = xr.Dataset({"source": (dims, data["source"]), "target": (dims, target)})
    ds.target.encoding = {"dtype": "int16", "scale_factor": 0.25, "add_offset": 1.0, "_FillValue": -999}
    path = tmp_path / "packed.zarr"
    ds.to_zarr(path, mode="w", zarr_format=zarr_format, consolidated=zarr_format == 2)

    inputs = open_inputs(path)

    got = inputs.target.compute()
    assert np.isnan(got[0, 1, 2]) and np.isnan(got).sum() == 1
    np.testing.assert_allclose(got, target, rtol=0, atol=1e-6)
    expected = xr.open_zarr(path, consolidated=zarr_format == 2).target.values
    np.testing.assert_array_equal(got, expected)
    desc = inputs.identity["arrays"]["target"]
    assert desc["packing"] == {"scale_factor": 0.25, "add_offset": 1.0}
    assert desc["missing_values"] == [-999]
    np.testing.assert_array_equal(inputs.source.compute(), data["source"])
    computed(inputs)  # tasks decode their blocks the same way


def test_stale_consolidated_metadata(tmp_path: Path) -> None:
    data = stack()
    path = tmp_path / "stack.zarr"
    write_xarray(path, epoch_dataset({"source": data["source"], "target": data["target"]}), zarr_format=2)
    write_plain_group = zarr.open_group(path, mode="a", use_consolidated=False)
    arr = write_plain_group.create_array("mask", shape=data["mask"].shape, dtype="u1", chunks=CHUNKS)
    arr[...] = data["mask"]
    inputs = open_inputs(path, mask="mask")
    np.testing.assert_array_equal(inputs.mask.compute(), data["mask"])


def test_threads_and_pickling(tmp_path: Path) -> None:
    """The graphs run on threads and travel to other processes (distributed workers)."""
    data = stack()
    path = tmp_path / "stack.zarr"
    write_xarray(path, epoch_dataset(data), zarr_format=3)
    inputs = open_inputs(path, mask="mask")
    with dask.config.set(scheduler="threads"):
        np.testing.assert_array_equal(inputs.target.compute(), data["target"])
    again = pickle.loads(pickle.dumps(inputs.source))
    np.testing.assert_array_equal(again.compute(), data["source"])
    reader = pickle.loads(pickle.dumps(inputs.reader))
    src, tgt, bad, var, src_var = reader.read(2, slice(5, 20), slice(3, 17))
    assert var is None and src_var is None
    np.testing.assert_array_equal(tgt, data["target"][2, 5:20, 3:17])
    np.testing.assert_array_equal(src, data["source"][2, 5:20, 3:17])
    np.testing.assert_array_equal(bad, data["mask"][2, 5:20, 3:17])
    # the same store opened twice gives the same graph keys
    assert open_inputs(path, mask="mask").target.name == inputs.target.name


# --------------------------------------------------------------------------- read-only


def snapshot(root: Path) -> dict[str, tuple[int, bytes | None]]:
    """mtime and contents of every file and directory under ``root``."""
    out = {}
    for dirpath, _, files in os.walk(root):
        out[dirpath] = (os.stat(dirpath).st_mtime_ns, None)
        for f in files:
            p = os.path.join(dirpath, f)
            out[p] = (os.stat(p).st_mtime_ns, Path(p).read_bytes())
    return out


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_store_is_never_written(tmp_path: Path, zarr_format: int) -> None:
    path = tmp_path / "stack.zarr"
    write_xarray(path, epoch_dataset(stack()), zarr_format=zarr_format)
    before = snapshot(tmp_path)

    inputs = open_inputs(path, mask="mask")
    computed(inputs)
    open_inputs(path.as_uri(), mask="mask").target.sum().compute()

    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("errors") / "stack.zarr"
    data = stack()
    write_plain(
        path,
        {
            **data,
            "short": data["source"][:2],
            "narrow": data["source"][:, :, :15],
            "flat": data["target"][0],
            "cube4": data["source"][None],
            "cplx": data["target"].astype(np.complex64),
            "flags": data["mask"].astype(bool),
            "badmask": data["mask"][:, :10],
            "empty": np.zeros((0, NY, NX)),
            "badmask2d": data["mask"][0, :, :7],
        },
    )
    return path


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"target": "tgt"},
            r"input\.target: no array 'tgt' in .*stack\.zarr; arrays there: badmask, badmask2d, cplx, "
            r"cube4, empty, flags, flat, mask, narrow, short, source, target; did you mean 'target'\? Set "
            r"input\.target to an array there$",
        ),
        ({"source": "src"}, r"input\.source: no array 'src' in .*stack\.zarr; arrays there: badmask"),
        ({"mask": "bpm"}, r"input\.mask: no array 'bpm'"),
        (
            {"target": "flat"},
            r"input\.target: array 'flat' .* must be 3-D \(image, y, x\), got shape \(24, 20\)",
        ),
        (
            {"source": "cube4"},
            r"input\.source: array 'cube4' .* must be 3-D \(image, y, x\) or 2-D \(y, x\)"
            r".*got shape \(1, 3, 24, 20\)",
        ),
        (
            {"source": "short"},
            r"input\.source: 'short' holds 2 images but target 'target' holds 3 .*2-D \(y, x\) source",
        ),
        (
            {"source": "narrow"},
            r"input\.source: source 'narrow' images are 24x15 pixels but target 'target' images are 24x20",
        ),
        (
            {"mask": "badmask"},
            r"input\.mask: mask 'badmask' has shape \(3, 10, 20\) as \(image, y, x\) but must be "
            r"\(3, 24, 20\) like target .* or \(24, 20\)",
        ),
        ({"mask": "badmask2d"}, r"input\.mask: mask 'badmask2d' has shape \(24, 7\) as \(y, x\) but must be"),
        ({"mask": "cube4"}, r"input\.mask: array 'cube4' .* got shape \(1, 3, 24, 20\)"),
        (
            {"target": "cplx"},
            r"input\.target: array 'cplx' in .*stack\.zarr must hold real numbers .* "
            r"got dtype complex64; store abs\(\)",
        ),
        ({"source": "flags"}, r"input\.source: array 'flags' in .* must hold real numbers .* got dtype bool"),
        ({"target": "empty"}, r"input\.target: array 'empty' .* holds no images"),
        (
            {"min_size": 21},
            r"^images are 24x20 pixels, smaller than one tile \(21\): use a smaller tiles\.size$",
        ),
        ({"group": "nope"}, r"input\.group: group 'nope' in .* is missing; groups there: \(none\)"),
        ({"target": ""}, r"input\.target: array names must be non-empty strings"),
        ({"storage_options": {"anon": True}}, r"input\.storage_options only apply to URLs"),
    ],
)
def test_errors(store: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        open_inputs(store, **kwargs)


def test_min_size_fits(store: Path) -> None:
    assert open_inputs(store, min_size=20).shape == (N, NY, NX)


def test_string_image_array_rejected(tmp_path: Path) -> None:
    path = tmp_path / "stack.zarr"
    write_plain(path, stack())
    grp = zarr.open_group(path, mode="a")
    grp.create_array("names", shape=(N, 2, 2), dtype=np.dtypes.StringDType())
    message = r"input\.target: array 'names' in .* must hold real numbers .* got dtype StringDType"
    with pytest.raises(InputError, match=message):
        open_inputs(path, target="names")


@pytest.mark.parametrize(
    "where", ["missing.zarr", "file:///nonexistent/dir/stack.zarr", "memory://kernelmap-none/x.zarr"]
)
def test_no_store(tmp_path: Path, where: str) -> None:
    path = str(tmp_path / where) if "://" not in where else where
    with pytest.raises(InputError, match=r"input\.path: no Zarr store at .*x?\.zarr"):
        open_inputs(path)
    assert not os.path.exists(tmp_path / "missing.zarr")


def test_path_is_an_array(store: Path) -> None:
    with pytest.raises(InputError, match=r"input\.path: .*target is a single Zarr array, not a group"):
        open_inputs(store / "target")


def test_name_is_a_group(tmp_path: Path) -> None:
    path = tmp_path / "stack.zarr"
    write_plain(path, stack(), group="sub")
    zarr.open_group(path, mode="a").create_group("target")
    with pytest.raises(InputError, match=r"input\.target: 'target' in .* is a group, not an array"):
        open_inputs(path, source="sub/source")


def test_unknown_protocol() -> None:
    with pytest.raises(InputError, match=r"input\.path: cannot open nosuch://x\.zarr"):
        open_inputs("nosuch://x.zarr")


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_image_coordinate_length_mismatch(tmp_path: Path, zarr_format: int) -> None:
    path = tmp_path / "stack.zarr"
    write_plain(path, {**stack(), "image": np.arange(N + 1)}, zarr_format=zarr_format, chunks={"image": (4,)})
    message = r"the image coordinate 'image' .* has shape \(4,\) but the target holds 3 images"
    with pytest.raises(InputError, match=message):
        open_inputs(path)


def test_the_stacks_other_coordinates_along_image_are_carried_to_the_kernel_map(tmp_path):
    from pipeline.job.config import job_from_dict
    from pipeline.job.run import run_job
    from pipeline.sim.demo import demo_dataset

    ds, _ = demo_dataset(n_images=2, size=256, bad_pixels=False)
    ds = ds.assign_coords(
        time=("image", np.array(["2026-01-01T00:00", "2026-01-02T12:00"], dtype="datetime64[ns]")),
        band=("image", np.array(["g", "r"], dtype=object)),
        airmass=("image", np.array([1.1, 1.3]), {"long_name": "airmass"}))
    ds.to_zarr(tmp_path / "stack.zarr", consolidated=False)
    inputs = open_inputs(tmp_path / "stack.zarr")
    assert sorted(inputs.image_coords) == ["airmass", "band", "time"]
    run_job(job_from_dict({"input": {"path": str(tmp_path / "stack.zarr")}, "tiles": {"size": 128},
                           "kernel": {"size": 15}, "output": {"path": str(tmp_path / "kernels.zarr")},
                           "compute": {"scheduler": "threads"}}), progress=False)
    maps = xr.open_zarr(tmp_path / "kernels.zarr", consolidated=False)
    np.testing.assert_array_equal(maps["time"].values, ds["time"].values)
    assert list(maps["band"].values) == ["g", "r"] and maps["airmass"].attrs["long_name"] == "airmass"
    np.testing.assert_array_equal(maps["airmass"].values, [1.1, 1.3])
