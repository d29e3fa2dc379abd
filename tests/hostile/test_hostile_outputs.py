"""Hostile outputs: an output another job made, a store kernelmap did not write, a path under a file, a
read-only folder; and the other commands' outputs and options (``apply``, ``report``, ``compare``).  Each is
refused (exit status 2) naming the path and the fix before anything is written: an existing output is left
byte for byte as it was, and no byte of the inputs changes."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import zarr

from pipeline.analysis.compare import write_comparison
from pipeline.analysis.report import write_report
from pipeline.errors import InputError, OptionError
from pipeline.job.apply import apply_kernel_map
from pipeline.job.run import run_job

from .conftest import Case, check_case, job_file, read_only


def run_into(where, **sections):
    """A case's build: the job of the copied kernel map (``with_map``), writing to ``where(tmp)``."""
    def build(tmp: Path) -> list[str]:
        output = {"path": str(where(tmp)), **sections.pop("output", {})} if where else sections.pop("output", {})
        return ["run", str(job_file(tmp, output=output, **sections)), "--quiet"]
    return build


def run_api(tmp: Path) -> None:
    run_job(tmp / "job.yaml", progress=False)


def _foreign(tmp: Path) -> Path:
    zarr.open_group(str(tmp / "foreign.zarr"), mode="w").attrs["written_by"] = "another program"
    return tmp / "foreign.zarr"


def _under_a_file(tmp: Path) -> Path:
    (tmp / "notes.txt").write_text("a file, not a folder")
    return tmp / "notes.txt" / "kernels.zarr"


def _folder_of_files(tmp: Path) -> Path:
    (tmp / "results").mkdir()
    (tmp / "results" / "table.csv").write_text("a,b\n1,2\n")
    return tmp / "results"


def command(*argv):
    """A case's build: ``kernelmap ARGV``, ``{tmp}`` in an argument replaced by the case's folder."""
    def build(tmp: Path) -> list[str]:
        return [arg.format(tmp=tmp) for arg in argv]
    return build


CASES = [
    Case("output-exists-mode-create", run_into(None), OptionError,
         ("kernels.zarr already exists and output.mode is 'create'", "nothing was changed"),
         ("Use output.mode=resume", "output.mode=overwrite"), run_api),
    Case("output-made-by-another-job", run_into(None, output={"mode": "resume"}, kernel={"size": 5}), OptionError,
         ("kernels.zarr was made by a different configuration", "kernel.size: 7 in the store, 5 here"),
         ("set these as the store has them", "output.mode=overwrite or another output.path"), run_api),
    Case("output-made-by-a-job-on-another-stack", run_into(None, output={"mode": "resume"}), OptionError,
         ("kernels.zarr was made by a different configuration", "made0/stack.zarr\" in the store"),
         ("--set input.path=...", "output.mode=overwrite or another output.path"), run_api),
    Case("overwrite-a-store-not-from-kernelmap", run_into(_foreign, output={"mode": "overwrite"}), OptionError,
         ("foreign.zarr exists and is not a kernel map written by kernelmap run",),
         ("Remove it yourself, or choose another output.path",), run_api),
    Case("resume-a-store-not-from-kernelmap", run_into(_foreign, output={"mode": "resume"}), OptionError,
         ("foreign.zarr exists and is not a kernel map written by kernelmap run",),
         ("Choose another output.path",), run_api),
    Case("resume-a-folder-of-other-files", run_into(_folder_of_files, output={"mode": "resume"}), OptionError,
         ("results exists and is not a kernel map written by kernelmap run",),
         ("Choose another output.path",), run_api),
    Case("output-under-a-file", run_into(_under_a_file), OptionError,
         ("notes.txt is a file, not a folder",), ("choose another output.path",), run_api),
    Case("apply-to-an-input-stack", command("apply", "{tmp}/stack.zarr", "--out", "{tmp}/images.zarr"),
         InputError, ("stack.zarr is not a kernelmap kernel map",), ("give the output.path of a kernelmap run",),
         lambda t: apply_kernel_map(t / "stack.zarr", t / "images.zarr", log=lambda _: None)),
    Case("apply-to-a-missing-map", command("apply", "{tmp}/nothing.zarr", "--out", "{tmp}/images.zarr"),
         InputError, ("nothing.zarr does not exist",), ("give the output.path of a kernelmap run",),
         lambda t: apply_kernel_map(t / "nothing.zarr", t / "images.zarr", log=lambda _: None)),
    Case("apply-chunk-zero", command("apply", "{tmp}/kernels.zarr", "--out", "{tmp}/images.zarr", "--chunk", "0"),
         OptionError, ("chunk (--chunk)", "got 0"), ("must be a positive integer (>= 1)",),
         lambda t: apply_kernel_map(t / "kernels.zarr", t / "images.zarr", chunk=0, log=lambda _: None)),
    Case("apply-output-inside-the-map", command("apply", "{tmp}/kernels.zarr", "--out", "{tmp}/kernels.zarr/m"),
         OptionError, ("kernels.zarr/m is, holds or lies inside the kernel map",), ("write the images elsewhere",),
         lambda t: apply_kernel_map(t / "kernels.zarr", t / "kernels.zarr" / "m", log=lambda _: None)),
    Case("apply-fits-inside-the-map",
         command("apply", "{tmp}/kernels.zarr", "--out", "{tmp}/images.zarr", "--fits", "{tmp}/kernels.zarr/fits"),
         OptionError, ("--fits", "kernels.zarr/fits is or lies inside the kernel map"),
         ("write the FITS files elsewhere",),
         lambda t: apply_kernel_map(t / "kernels.zarr", t / "images.zarr", fits=t / "kernels.zarr" / "fits",
                                    log=lambda _: None)),
    Case("apply-fits-inside-the-output",
         command("apply", "{tmp}/kernels.zarr", "--out", "{tmp}/images.zarr", "--fits", "{tmp}/images.zarr/fits"),
         OptionError, ("--fits", "images.zarr/fits is or lies inside --out"), ("write the FITS files elsewhere",),
         lambda t: apply_kernel_map(t / "kernels.zarr", t / "images.zarr", fits=t / "images.zarr" / "fits",
                                    log=lambda _: None)),
    Case("apply-storage-options-not-json",
         command("apply", "{tmp}/kernels.zarr", "--out", "{tmp}/images.zarr", "--storage-options", "{{anon"),
         OptionError, ("--storage-options is not JSON",), ("give a JSON object",)),
    Case("apply-overwrite-a-store-not-from-apply",
         command("apply", "{tmp}/kernels.zarr", "--out", "{tmp}/stack.zarr", "--overwrite"), OptionError,
         ("stack.zarr exists and is not an output of kernelmap apply", "nothing was changed"),
         ("Remove it yourself, or give another output path",),
         lambda t: apply_kernel_map(t / "kernels.zarr", t / "stack.zarr", mode="overwrite", log=lambda _: None)),
    Case("apply-resume-a-store-not-from-apply",
         lambda t: ["apply", str(t / "kernels.zarr"), "--out", str(_foreign(t)), "--resume"], OptionError,
         ("foreign.zarr was not made by kernelmap apply",), ("give another --out, or --overwrite",),
         lambda t: apply_kernel_map(t / "kernels.zarr", t / "foreign.zarr", mode="resume", log=lambda _: None)),
    Case("report-overwrite-a-folder-not-a-report",
         command("report", "{tmp}/kernels.zarr", "--out", "{tmp}/stack.zarr", "--overwrite"), OptionError,
         ("stack.zarr is not a report written by kernelmap report",), ("Remove it yourself, or give another --out",),
         lambda t: write_report(t / "kernels.zarr", t / "stack.zarr", overwrite=True)),
    Case("report-inside-the-map", command("report", "{tmp}/kernels.zarr", "--out", "{tmp}/kernels.zarr/report"),
         OptionError, ("--out", "kernels.zarr/report is, holds or lies inside the kernel map"),
         ("nothing was changed; give another --out",),
         lambda t: write_report(t / "kernels.zarr", t / "kernels.zarr" / "report")),
    Case("report-over-the-folder-holding-the-map", command("report", "{tmp}/kernels.zarr", "--out", "{tmp}",
                                                           "--overwrite"),
         OptionError, ("is, holds or lies inside the kernel map",), ("nothing was changed; give another --out",),
         lambda t: write_report(t / "kernels.zarr", t, overwrite=True)),
    Case("compare-into-a-map", command("compare", "{tmp}/kernels.zarr", "{tmp}/kernels.zarr", "--out",
                                       "{tmp}/kernels.zarr"), OptionError,
         ("kernels.zarr is or lies inside kernel map A",), ("nothing was changed; give another --out folder",),
         lambda t: write_comparison(t / "kernels.zarr", t / "kernels.zarr", t / "kernels.zarr")),
    # nothing listens on port 9 of this machine
    Case("report-of-an-unreachable-map", command("report", "http://127.0.0.1:9/kernels.zarr", "--out", "{tmp}/r"),
         InputError, ("cannot read http://127.0.0.1:9/kernels.zarr", "Cannot connect"),
         ("check that the kernel map is there and can be reached",),
         lambda t: write_report("http://127.0.0.1:9/kernels.zarr", t / "r"),
         marks=(pytest.mark.skipif(importlib.util.find_spec("aiohttp") is None,
                                   reason="reading stores over HTTP needs aiohttp"),)),
    Case("report-no-panels", command("report", "{tmp}/kernels.zarr", "--out", "{tmp}/report", "--max-images", "0"),
         OptionError, ("max_images (--max-images)", "got 0"), ("must be an integer >= 1",),
         lambda t: write_report(t / "kernels.zarr", t / "report", max_images=0)),
    Case("report-of-an-input-stack", command("report", "{tmp}/stack.zarr", "--out", "{tmp}/report"), InputError,
         ("stack.zarr is not a kernelmap kernel map",), ("give the output.path of a kernelmap run",),
         lambda t: write_report(t / "stack.zarr", t / "report")),
    Case("compare-with-a-missing-map", command("compare", "{tmp}/kernels.zarr", "{tmp}/nothing.zarr", "--out",
                                               "{tmp}/cmp"), InputError,
         ("nothing.zarr does not exist",), ("give the output.path of a kernelmap run",),
         lambda t: write_comparison(t / "kernels.zarr", t / "nothing.zarr", t / "cmp")),
]


@pytest.mark.parametrize("case", [c.param() for c in CASES])
def test_a_hostile_output_or_option_is_refused_and_nothing_changes(case, with_map, capsys):
    check_case(case, with_map, capsys)


READ_ONLY = [
    ("run", ["run", "{tmp}/job.yaml", "--quiet", "--set", "output.path={tmp}/locked/kernels.zarr"],
     "output.path {tmp}/locked/kernels.zarr",
     lambda t: run_job(t / "job.yaml", overrides=[f"output.path={t}/locked/kernels.zarr"], progress=False)),
    ("run-nested", ["run", "{tmp}/job.yaml", "--quiet", "--set", "output.path={tmp}/locked/a/b/kernels.zarr"],
     "output.path {tmp}/locked/a/b/kernels.zarr",
     lambda t: run_job(t / "job.yaml", overrides=[f"output.path={t}/locked/a/b/kernels.zarr"], progress=False)),
    ("apply", ["apply", "{tmp}/kernels.zarr", "--out", "{tmp}/locked/images.zarr"], "--out {tmp}/locked/images.zarr",
     lambda t: apply_kernel_map(t / "kernels.zarr", t / "locked" / "images.zarr", log=lambda _: None)),
    ("report", ["report", "{tmp}/kernels.zarr", "--out", "{tmp}/locked/report"], "--out {tmp}/locked/report",
     lambda t: write_report(t / "kernels.zarr", t / "locked" / "report")),
    ("compare", ["compare", "{tmp}/kernels.zarr", "{tmp}/kernels.zarr", "--out", "{tmp}/locked/cmp"],
     "--out {tmp}/locked/cmp", lambda t: write_comparison(t / "kernels.zarr", t / "kernels.zarr", t / "locked/cmp")),
]


@pytest.mark.parametrize(("argv", "named", "api"), [pytest.param(*c[1:], id=c[0]) for c in READ_ONLY])
def test_an_output_in_a_read_only_folder_is_refused(with_map, capsys, argv, named, api):
    """A read-only bind mount of the output's folder (root ignores chmod): refused before anything is tried,
    naming the output and the read-only folder."""
    from .conftest import raises_exactly, refused

    with read_only(with_map / "locked") as locked:
        result = refused(capsys, [a.format(tmp=with_map) for a in argv], watch=[with_map])
        assert named.format(tmp=with_map) in result.err
        assert f"{locked} is on a read-only file system" in result.err
        assert "choose another output path (or make that folder writable)" in result.err
        error = raises_exactly(OptionError, lambda: api(with_map), watch=[with_map])
        assert f"{locked} is on a read-only file system" in str(error)


def test_resuming_an_output_that_cannot_be_written_is_refused(with_map, capsys):
    """An unwritable output: the kernel map to be resumed lies on a read-only mount.  Refused before anything
    is tried, naming the store; the store is left byte for byte."""
    from .conftest import raises_exactly, refused

    (with_map / "locked").mkdir()
    shutil.move(with_map / "kernels.zarr", with_map / "locked" / "kernels.zarr")
    with read_only(with_map / "locked") as locked:
        store = locked / "kernels.zarr"
        argv = ["run", str(with_map / "job.yaml"), "--quiet", "--set", f"output.path={store}", "--set",
                "output.mode=resume"]
        result = refused(capsys, argv, watch=[with_map])
        assert f"output.path {store}: {store} is on a read-only file system" in result.err
        assert "nothing was changed; choose another output path" in result.err
        raises_exactly(OptionError, lambda: run_job(with_map / "job.yaml", overrides=argv[4::2], progress=False),
                       watch=[with_map])
