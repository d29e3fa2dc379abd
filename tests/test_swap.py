"""Overwrite = write beside, then swap: an interrupted overwrite leaves the earlier result readable, and its
replacement is resumed or removed by the next command."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import yaml
from conftest import job_dict
from stacks import make_stack

from pipeline.cli import main
from pipeline.errors import OptionError
from pipeline.io import swap
from pipeline.io.lock import lock_path
from pipeline.io.store import OutputStore
from pipeline.io.swap import MARKER, Leftover, leftovers, new_sibling, swap_into_place, tidy
from pipeline.job.config import job_from_dict
from pipeline.job.run import plan_job, run_job


def _folder(path: Path, **files: str) -> Path:
    path.mkdir(parents=True)
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def _contents(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): p.read_text() for p in sorted(path.rglob("*")) if p.is_file()}


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(path.name + "."))


# --------------------------------------------------------------------------- the swap itself

@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_swap_puts_the_new_folder_in_place_and_removes_the_old(tmp_path, monkeypatch, exchange):
    if not exchange:  # a filesystem that cannot exchange two paths: the old is renamed aside first
        monkeypatch.setattr(swap, "_exchange", lambda a, b: False)
    old = _folder(tmp_path / "out.zarr", **{"a.txt": "old", "zarr.json": "{}"})
    new = _folder(Path(new_sibling(old)), **{"b.txt": "new", "zarr.json": "{}"})
    assert new.name.startswith("out.zarr.kernelmap-new-") and new.parent == tmp_path
    assert leftovers(old) == [Leftover(str(new), "new", ready=False)]
    swap_into_place(new, old)
    assert _contents(old) == {"b.txt": "new", "zarr.json": "{}"}  # no marker left
    assert _siblings(old) == [] and leftovers(old) == []
    # nothing at the path: the new one is renamed to it
    fresh = _folder(Path(new_sibling(tmp_path / "absent")), **{"c.txt": "c"})
    swap_into_place(fresh, tmp_path / "absent")
    assert _contents(tmp_path / "absent") == {"c.txt": "c"} and not fresh.exists()


def test_every_moment_of_an_interrupted_swap_leaves_a_readable_path_and_named_leftovers(tmp_path):
    """The states a crash can leave, each as the swap leaves it: what :func:`leftovers` says of the siblings
    and what :func:`tidy` removes (only what is never needed again)."""
    out = tmp_path / "out"
    said: list[str] = []
    # writing the replacement: the old result in place, the replacement not complete
    _folder(out, v="old")
    new = _folder(tmp_path / "out.kernelmap-new-1", v="new")
    assert leftovers(out) == [Leftover(str(new), "new", ready=False)]
    assert tidy(out, said.append) == leftovers(out) and said == [] and _contents(out) == {"v": "old"}
    # complete, marked, not yet exchanged: the old result in place, the replacement ready
    (new / MARKER).write_text(json.dumps({"aside": new.name}))
    assert leftovers(out) == [Leftover(str(new), "new", ready=True)]
    # exchanged, the old result not yet removed: the new result in place, the sibling holds the old one
    assert swap._exchange(str(new), str(out))
    assert _contents(out) == {"v": "new", MARKER: json.dumps({"aside": new.name})}
    assert leftovers(out) == [Leftover(str(new), "old")]
    assert tidy(out, said.append) == [] and _contents(out) == {"v": "new"} and _siblings(out) == []
    assert said == [f"removing {new} (the earlier result, set aside by an interrupted replacement)"]
    # two renames, interrupted between them: nothing at the path for an instant, the new one ready
    _folder(tmp_path / "out.kernelmap-old-2", v="new")
    os.rename(out, tmp_path / "out.kernelmap-new-2")
    (tmp_path / "out.kernelmap-new-2" / MARKER).write_text(json.dumps({"aside": "out.kernelmap-old-2"}))
    assert leftovers(out) == [Leftover(str(tmp_path / "out.kernelmap-new-2"), "new", ready=True),
                              Leftover(str(tmp_path / "out.kernelmap-old-2"), "old")]
    swap_into_place(tmp_path / "out.kernelmap-new-2", out)  # resumed: put in place
    assert tidy(out, said.append) == [] and _contents(out) == {"v": "new"} and _siblings(out) == []


# --------------------------------------------------------------------------- kernelmap run

def _kill_overwrite_after(job_file: Path, output: Path, blocks: int, timeout: float = 120) -> tuple[str, int]:
    """Start ``kernelmap run JOB_FILE`` (an overwrite), SIGKILL it once its replacement beside ``output``
    records at least ``blocks`` blocks; ``(the replacement, its blocks done)``."""
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(job_file), "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, done, sibling = time.monotonic() + timeout, 0, ""
    while time.monotonic() < deadline and proc.poll() is None:
        found = [x.path for x in leftovers(output) if x.kind == "new"]
        if found:
            sibling = found[0]
            try:
                done = int(OutputStore(sibling).completed_blocks().sum())
            except Exception:  # not created yet, or a chunk caught mid-write: look again
                done = 0
            if done >= blocks:
                break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return sibling, done


def _open(path: Path, consolidated: bool | None = None) -> xr.Dataset:
    return xr.open_zarr(path, consolidated=consolidated).load()


def test_a_killed_overwrite_leaves_the_old_result_and_resume_finishes_and_swaps_in_the_new(tmp_path, capsys):
    make_stack(tmp_path / "stack.zarr", n_images=3, size=256, chunk=64)
    out = tmp_path / "kernels.zarr"
    run_job(job_from_dict(job_dict(tmp_path, compute={"block_tiles": 2})), progress=False)
    old = _open(out)
    data = job_dict(tmp_path, compute={"scheduler": "threads", "n_workers": 1, "block_tiles": 1},
                    output={"mode": "overwrite", "images_per_shard": 1})
    data["kernel"]["size"] = 7  # the new result differs from the old
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(data))
    sibling, done = _kill_overwrite_after(job_file, out, 3)
    assert 3 <= done < 48 and Path(sibling).name.startswith("kernels.zarr.kernelmap-new-")
    xr.testing.assert_identical(_open(out), old)  # the old result, readable and untouched (its attributes too)
    assert _open(Path(sibling)).attrs["kernelmap_status"] == "incomplete"
    assert leftovers(out) == [Leftover(sibling, "new", ready=False)]
    assert Path(lock_path(out)).exists()  # the killed run's lock, stale
    # create names the leftover; a dry run of the resume says what it resumes, and the stale lock
    created = plan_job(job_from_dict({**data, "output": {**data["output"], "mode": "create"}})).opening
    assert isinstance(created.refusal, OptionError) and sibling in str(created.refusal)
    assert "output.mode=resume finishes it" in str(created.refusal)
    capsys.readouterr()
    assert main(["run", str(job_file), "--dry-run", "--set", "output.mode=resume"]) == 0
    dry = capsys.readouterr().out
    assert f"replace    resuming {sibling}, the replacement an interrupted overwrite left" in dry
    assert f"lock       stale lock {lock_path(out)}" in dry and "a run now takes it over" in dry
    xr.testing.assert_identical(_open(out), old)
    # resumed: the replacement is finished, then swapped in; nothing is left beside the output
    assert main(["run", str(job_file), "--quiet", "--set", "output.mode=resume"]) == 0
    said = capsys.readouterr().out
    resumed_from = re.search(rf"resuming {re.escape(sibling)}: (\d+) of 48 blocks already done", said)
    assert resumed_from and done <= int(resumed_from[1]) < 48  # (blocks may land between the look and the kill)
    assert "taking over the stale lock" in said
    assert f"replaced {out} with the new result" in said
    assert _siblings(out) == [] and not Path(sibling).exists()
    resumed = _open(out)
    assert resumed.attrs["kernelmap_status"] == "complete" and resumed.sizes["ky"] == 7
    reference = {**data, "compute": {"scheduler": "synchronous"},
                 "output": {"path": str(tmp_path / "reference.zarr")}}
    run_job(job_from_dict(reference), progress=False)
    xr.testing.assert_identical(resumed.drop_attrs(), _open(tmp_path / "reference.zarr").drop_attrs())


def test_a_completed_overwrite_swaps_in_the_new_result_and_removes_what_interrupted_ones_left(tmp_path):
    make_stack(tmp_path / "stack.zarr", n_images=1, size=128)
    out = tmp_path / "kernels.zarr"
    run_job(job_from_dict(job_dict(tmp_path)), progress=False)
    old_id = _open(out).attrs["kernelmap_store_id"]
    stray = _folder(tmp_path / "kernels.zarr.kernelmap-new-abc", **{"zarr.json": "{}"})
    aside = _folder(tmp_path / "kernels.zarr.kernelmap-old-def", **{"zarr.json": "{}"})
    data = job_dict(tmp_path, output={"mode": "overwrite"})
    data["kernel"]["size"] = 7
    said: list[str] = []
    plan = plan_job(job_from_dict(data))
    assert plan.opening.replacing and plan.opening.leftovers == (Leftover(str(stray), "new"),)
    describe = plan.describe()
    assert f"leftover   {stray} (the replacement an interrupted overwrite was writing: not complete)" in describe
    assert f"{out} keeps the earlier result until then" in describe
    summary = run_job(job_from_dict(data), progress=False, log=said.append)
    assert summary.path == str(out)
    assert f"removing {aside} (the earlier result, set aside by an interrupted replacement)" in said
    assert any(line.startswith(f"removing {stray}") for line in said)
    assert any(line.startswith(f"overwriting {out}: the new result is written to {out}.kernelmap-new-")
               for line in said)
    new = _open(out)
    assert new.sizes["ky"] == 7 and new.attrs["kernelmap_status"] == "complete"
    assert new.attrs["kernelmap_store_id"] != old_id
    assert _siblings(out) == []  # no replacement, no old result, no lock left


def test_an_overwrite_cut_short_at_its_swap_keeps_the_old_result_and_resume_swaps_the_complete_new_one(
        tmp_path, monkeypatch):
    make_stack(tmp_path / "stack.zarr", n_images=1, size=128)
    out = tmp_path / "kernels.zarr"
    run_job(job_from_dict(job_dict(tmp_path)), progress=False)
    old = _open(out)
    data = job_dict(tmp_path, output={"mode": "overwrite"})
    data["kernel"]["size"] = 7

    def cut(a: str, b: str) -> bool:  # the replacement complete and marked; interrupted before the exchange
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(swap, "_exchange", cut)
        with pytest.raises(KeyboardInterrupt):
            run_job(job_from_dict(data), progress=False)
    xr.testing.assert_identical(_open(out), old)
    (left,) = leftovers(out)
    assert left.kind == "new" and left.ready and not Path(lock_path(out)).exists()
    assert _open(Path(left.path)).attrs["kernelmap_status"] == "complete"
    summary = run_job(job_from_dict({**data, "output": {"path": str(out), "mode": "resume"}}), progress=False,
                      log=lambda _: None)
    assert summary.tiles_computed == 0 and summary.path == str(out)
    assert _open(out).sizes["ky"] == 7 and _siblings(out) == [] and not (out / MARKER).exists()


# --------------------------------------------------------------------------- apply and ingest

def test_an_interrupted_apply_overwrite_keeps_the_old_images_and_resume_swaps_in_the_new(tmp_path, monkeypatch):
    from pipeline.job import apply as apply_module
    from pipeline.job.apply import apply_kernel_map

    make_stack(tmp_path / "stack.zarr", n_images=1, size=128)
    run_job(job_from_dict(job_dict(tmp_path)), progress=False)
    kernels, images = tmp_path / "kernels.zarr", tmp_path / "images.zarr"
    quiet = lambda _: None  # noqa: E731
    apply_kernel_map(kernels, images, chunk=64, log=quiet)
    old = _open(images, False)

    def interrupted(*args, **kwargs):  # Ctrl-C once the matched images of the replacement are written
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(apply_module, "tile_median", interrupted)
        with pytest.raises(KeyboardInterrupt):
            apply_kernel_map(kernels, images, mode="overwrite", chunk=32, log=quiet)
    xr.testing.assert_identical(_open(images, False), old)
    (left,) = leftovers(images)
    assert left.kind == "new" and not Path(lock_path(images)).exists()  # the lock given back
    with pytest.raises(OptionError, match="an interrupted --overwrite left .*pass --resume to finish it"):
        apply_kernel_map(kernels, images, chunk=32, log=quiet)
    said: list[str] = []
    apply_kernel_map(kernels, images, mode="resume", chunk=32, log=said.append)
    assert any(line.startswith(f"apply: resuming the replacement of {images} in {left.path}") for line in said)
    assert _siblings(images) == []
    apply_kernel_map(kernels, tmp_path / "reference.zarr", chunk=32, log=quiet)
    resumed = _open(images, False)
    assert resumed.attrs["kernelmap_status"] == "complete"
    xr.testing.assert_identical(resumed, _open(tmp_path / "reference.zarr", False).assign_attrs(resumed.attrs))
    assert not np.array_equal(resumed["matched"].encoding["chunks"], old["matched"].encoding["chunks"])


def test_an_interrupted_ingest_overwrite_keeps_the_old_stack_and_the_next_overwrite_replaces_it(tmp_path,
                                                                                                monkeypatch):
    pytest.importorskip("astropy")
    from astropy.io import fits

    from pipeline.job.ingest import ingest_fits

    rng = np.random.default_rng(3)
    files = []
    for name in ("ref", "t1", "t2"):
        header = fits.Header({"AIRMASS": 1.25})
        fits.PrimaryHDU(rng.normal(size=(24, 32)).astype(np.float32), header=header).writeto(tmp_path / f"{name}.fits")
        files.append(str(tmp_path / f"{name}.fits"))
    out = tmp_path / "stack.zarr"
    quiet = lambda _: None  # noqa: E731
    ingest_fits(files[0], files[1:], out, log=quiet)
    old = xr.open_zarr(out, consolidated=False).load()
    to_zarr = xr.Dataset.to_zarr

    def crash(self, *args, **kwargs):  # the replacement's arrays written, then interrupted
        to_zarr(self, *args, **kwargs)
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(xr.Dataset, "to_zarr", crash)
        with pytest.raises(KeyboardInterrupt):
            ingest_fits(files[0], files[1:], out, mode="overwrite", keys=["AIRMASS"], log=quiet)
    xr.testing.assert_identical(xr.open_zarr(out, consolidated=False).load(), old)
    (left,) = leftovers(out)
    assert left.kind == "new" and not Path(lock_path(out)).exists()
    with pytest.raises(OptionError, match=r"an interrupted overwrite left .*use --overwrite .* keeps the stack"):
        ingest_fits(files[0], files[1:], out, keys=["AIRMASS"], log=quiet)
    said: list[str] = []
    ingest_fits(files[0], files[1:], out, mode="overwrite", keys=["AIRMASS"], log=said.append)
    assert f"ingest: removing {left.describe()}" in said
    assert _siblings(out) == []
    new = xr.open_zarr(out, consolidated=False).load()
    assert new["AIRMASS"].values.tolist() == [1.25, 1.25] and "AIRMASS" not in old
    np.testing.assert_array_equal(new["target"].values, old["target"].values)


# --------------------------------------------------------------------------- setting up a new output whole

def test_a_store_stopped_while_being_set_up_leaves_nothing_at_its_path(tmp_path, monkeypatch):
    """A new kernel map is set up beside its path and renamed into place: a failure (or a kill) meanwhile
    leaves no half-made store that a resume would then refuse as made by another configuration."""
    import pipeline.io.store as store_module

    make_stack(tmp_path / "stack.zarr", n_images=2)
    job = job_from_dict(job_dict(tmp_path))
    out = Path(job.output.path)

    def failing(group, layout):
        raise OSError("stopped while setting up")

    real = store_module._create_variables
    monkeypatch.setattr(store_module, "_create_variables", failing)
    with pytest.raises(OSError, match="stopped while setting up"):
        run_job(job, progress=False)
    assert not out.exists() and _siblings(out) == []  # the staging removed, nothing at the path
    monkeypatch.setattr(store_module, "_create_variables", real)
    # what a SIGKILL while setting up leaves: a staging sibling, removed (and named) by the next run
    staging = _folder(Path(f"{out}{swap.CREATING}0123abcd"), **{"zarr.json": "{}"})
    assert leftovers(out) == [Leftover(str(staging), "creating")]
    said = []
    summary = run_job(job, progress=False, log=said.append)
    assert summary.path == str(out) and xr.open_zarr(out).attrs["kernelmap_status"] == "complete"
    assert _siblings(out) == [] and any("setting up was interrupted" in line for line in said)
