"""Hostile input stores for ``kernelmap run``: each case writes a real Zarr store (or something in its place)
and a job, and the run is refused (exit status 2, :class:`InputError`) naming the problem and the fix,
before anything is written: no output, no byte of the input changed."""

from __future__ import annotations

import importlib.util
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import zarr
import zarr.errors

from pipeline.errors import InputError
from pipeline.job.run import run_job

from .conftest import SIZE, Case, check_case, job_file, small_stack


def _group(tmp: Path) -> zarr.Group:
    return zarr.open_group(str(tmp / "stack.zarr"), mode="r+")


def _replace(tmp: Path, name: str, data: np.ndarray, dims: list[str] | None = None) -> None:
    """Array ``name`` of the stack replaced by ``data`` (a plain Zarr array, ``dims`` its dimension names)."""
    group = _group(tmp)
    del group[name]
    with warnings.catch_warnings():  # text has no stable Zarr 3 encoding yet: written all the same
        warnings.simplefilter("ignore", zarr.errors.UnstableSpecificationWarning)
        group.create_array(name, data=data, chunks=data.shape or None, dimension_names=dims)


def _add(tmp: Path, name: str, data: np.ndarray, dims: list[str] | None = None) -> None:
    _group(tmp).create_array(name, data=data, dimension_names=dims)


def run_case(mutate=None, *, stack: bool = True, **sections) -> callable:
    """A case's build: the small stack (unless ``stack=False``), ``mutate(tmp)`` applied to it, the job."""
    def build(tmp: Path) -> list[str]:
        if stack:
            small_stack(tmp / "stack.zarr")
        if mutate is not None:
            mutate(tmp)
        return ["run", str(job_file(tmp, **sections)), "--quiet"]
    return build


def api(tmp: Path) -> None:
    run_job(tmp / "job.yaml", progress=False)


def _store_replaced(thing):
    def mutate(tmp: Path) -> None:
        shutil.rmtree(tmp / "stack.zarr")
        thing(tmp / "stack.zarr")
    return mutate


def _single_array(path: Path) -> None:
    zarr.create_array(str(path), data=np.zeros((2, SIZE, SIZE), np.float32))


IMAGE = ["image", "y", "x"]
RNG = np.random.default_rng(7)

CASES = [
    Case("missing-store", run_case(stack=False), InputError,
         ("stack.zarr", "no Zarr store at"), ("check the path or URL",), api),
    Case("store-is-a-file", run_case(_store_replaced(lambda p: p.write_text("not a store"))), InputError,
         ("stack.zarr is a file, not a Zarr store",), ("point input.path at the store",), api),
    # a pipe where the store should be: opening it for reading would block, so it is refused unread
    Case("store-is-a-pipe", run_case(_store_replaced(os.mkfifo)), InputError,
         ("stack.zarr is not a folder (a pipe",), ("point input.path at the store",), api),
    # a store at a URL whose host does not answer (nothing listens on port 9 of this machine)
    Case("store-url-unreachable", run_case(stack=False, input={"path": "http://127.0.0.1:9/stack.zarr"}),
         InputError, ("cannot read http://127.0.0.1:9/stack.zarr", "Cannot connect"),
         ("check that the store is there and can be reached",), api,
         marks=(pytest.mark.skipif(importlib.util.find_spec("aiohttp") is None,
                                   reason="reading stores over HTTP needs aiohttp"),)),
    Case("store-url-unknown-protocol", run_case(stack=False, input={"path": "nosuch://bucket/stack.zarr"}),
         InputError, ("cannot open nosuch://bucket/stack.zarr", "nosuch"), ("a URL whose protocol fsspec knows",),
         api),
    Case("store-is-an-empty-folder", run_case(_store_replaced(Path.mkdir)), InputError,
         ("no Zarr store at", "stack.zarr"), ("a store is a directory with zarr.json or .zgroup",), api),
    Case("store-is-one-array", run_case(_store_replaced(_single_array)), InputError,
         ("is a single Zarr array, not a group",), ("point input.path at the store holding the source and target",),
         api),
    # unreadable for anyone, root included: the store's own metadata is not JSON
    Case("store-metadata-not-json", run_case(lambda t: (t / "stack.zarr" / "zarr.json").write_text("{not json")),
         InputError, ("zarr.json", "is not JSON", "stack.zarr"), ("restore it from its source",), api),
    Case("array-metadata-not-json",
         run_case(lambda t: (t / "stack.zarr" / "target" / "zarr.json").write_text("{{{")), InputError,
         ("'target'", "its Zarr metadata cannot be read"), ("restore it from its source",), api),
    Case("array-metadata-missing", run_case(lambda t: os.remove(t / "stack.zarr" / "target" / "zarr.json")),
         InputError, ("'target'", "a folder without Zarr metadata"), ("restore it from its source",), api),
    Case("missing-target-array", run_case(lambda t: _group(t).__delitem__("target")), InputError,
         ("input.target: no array 'target'", "arrays there: image, source"),
         ("set input.target to the name of one of them",), api),
    Case("misspelt-source-name", run_case(input={"source": "sorce"}), InputError,
         ("input.source: no array 'sorce'",), ("did you mean 'source'?",), api),
    Case("missing-group", run_case(input={"group": "night2"}), InputError,
         ("input.group: group 'night2'", "missing"), ("groups there",), api),
    Case("source-shape-mismatch", run_case(lambda t: _replace(t, "source", np.ones((60, SIZE), np.float32),
                                                              ["y", "x"])), InputError,
         ("60x64 pixels", "64x64"), ("resample or crop them to match",), api),
    Case("source-count-mismatch", run_case(lambda t: _replace(t, "source", np.ones((3, SIZE, SIZE), np.float32),
                                                              IMAGE)), InputError,
         ("holds 3 images", "holds 2"), ("give one source per target image",), api),
    Case("target-1-d", run_case(lambda t: _replace(t, "target", np.ones(SIZE, np.float32))), InputError,
         ("must be 3-D (image, y, x)", "(64,)"), ("leading image axis of length 1",), api),
    Case("target-2-d", run_case(lambda t: _replace(t, "target", np.ones((SIZE, SIZE), np.float32), ["y", "x"])),
         InputError, ("must be 3-D (image, y, x)", "(64, 64)"), ("leading image axis of length 1",), api),
    Case("target-4-d", run_case(lambda t: _replace(t, "target", np.ones((2, 3, SIZE, SIZE), np.float32))),
         InputError, ("must be 3-D (image, y, x)", "(2, 3, 64, 64)"), ("store one 3-D array per value",), api),
    Case("target-no-images", run_case(lambda t: _replace(t, "target", np.ones((0, SIZE, SIZE), np.float32),
                                                         IMAGE)), InputError,
         ("holds no images", "(0, 64, 64)"), ("write the images into it",), api),
    Case("target-complex", run_case(lambda t: _replace(t, "target", np.ones((2, SIZE, SIZE), np.complex64), IMAGE)),
         InputError, ("'target'", "complex64"), ("store abs() or the real part",), api),
    Case("target-strings", run_case(lambda t: _replace(t, "target", np.full((2, SIZE, SIZE), "a"), IMAGE)),
         InputError, ("'target'", "<U1"), ("convert it to a numeric dtype",), api),
    Case("target-booleans", run_case(lambda t: _replace(t, "target", np.zeros((2, SIZE, SIZE), bool), IMAGE)),
         InputError, ("'target'", "dtype bool"), ("store it as the mask array",), api),
    # a level an unsigned array cannot hold: 70000 overflows uint16, so no pixel is ever saturated
    Case("saturation-above-unsigned-range",
         run_case(lambda t: _replace(t, "target", RNG.integers(0, 60000, (2, SIZE, SIZE)).astype(np.uint16), IMAGE),
                  input={"saturation": {"target": 70000}}), InputError,
         ("input.saturation.target", "70000", "65535", "uint16"), ("Give the level in the units of the stored",),
         api),
    Case("images-smaller-than-a-tile", run_case(tiles={"size": 128}), InputError,
         ("images are 64x64 pixels, smaller than one tile (128)",), ("use a smaller tiles.size",), api),
    Case("tile-size-overflows", run_case(tiles={"size": 2**70}), InputError,
         (f"smaller than one tile ({2**70})",), ("use a smaller tiles.size",), api),
    Case("mask-wrong-image-count", run_case(lambda t: _add(t, "bad", np.zeros((3, SIZE, SIZE), np.uint8), IMAGE),
                                            input={"mask": "bad"}), InputError,
         ("input.mask: mask 'bad' has shape (3, 64, 64)",), ("like target 'target' or (64, 64) shared",), api),
    Case("mask-wrong-2-d-shape", run_case(lambda t: _add(t, "bad", np.zeros((SIZE, 60), np.uint8), ["y", "x"]),
                                          input={"mask": "bad"}), InputError,
         ("mask 'bad' has shape (64, 60)",), ("must be (2, 64, 64) like target",), api),
    Case("mask-4-d", run_case(lambda t: _add(t, "bad", np.zeros((1, 2, SIZE, SIZE), np.uint8)),
                              input={"mask": "bad"}), InputError,
         ("array 'bad'", "(1, 2, 64, 64)"), ("(image, y, x) like the target or (y, x) shared",), api),
    Case("mask-complex", run_case(lambda t: _add(t, "bad", np.zeros((2, SIZE, SIZE), np.complex64), IMAGE),
                                  input={"mask": "bad"}), InputError,
         ("input.mask", "complex64"), ("store abs() or the real part",), api),
    Case("variance-array-missing", run_case(input={"variance": {"target": "var"}}), InputError,
         ("input.variance.target: no array 'var'",), ("set input.variance.target to the name of one of them",), api),
    Case("image-labels-not-unique",
         run_case(lambda t: _replace(t, "image", np.array([5, 5]), ["image"])), InputError,
         ("image coordinate 'image'", "gives the label 5 to 2 images"), ("they must differ; fix the labels",), api),
    Case("image-labels-wrong-length",
         run_case(lambda t: _replace(t, "image", np.arange(3), ["image"])), InputError,
         ("image coordinate 'image'", "(3,)"), ("one label per image; fix or remove it",), api),
]


@pytest.mark.parametrize("case", [c.param() for c in CASES])
def test_a_hostile_store_is_refused_before_anything_is_written(case, tmp_path, capsys):
    check_case(case, tmp_path, capsys)
    assert not (tmp_path / "kernels.zarr").exists()
