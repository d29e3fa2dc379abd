"""Hostile job files for ``kernelmap run``: text that is not YAML, keys that do not exist, values of the wrong
type or outside their choices, sizes no tile or kernel can have, outputs that would land in the input.  Each
is refused (exit status 2, :class:`ConfigError`) naming the key or the place in the file and the fix, before
the input is opened: no output, no byte of the input changed."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.errors import ConfigError
from pipeline.job.config import load_job
from pipeline.job.run import run_job

from .conftest import Case, check_case, job_file, small_stack


def job_case(text: str | bytes | None = None, *, overrides: tuple[str, ...] = (), where=None, **sections):
    """A case's build: the small stack, then ``job.yaml`` holding ``text`` (bytes as they are) or the small
    job with ``sections`` on top (``where(tmp)`` gives sections that depend on the folder)."""
    def build(tmp: Path) -> list[str]:
        small_stack(tmp / "stack.zarr")
        if isinstance(text, bytes):
            (tmp / "job.yaml").write_bytes(text)
        else:
            job_file(tmp, text, **sections, **(where(tmp) if where else {}))
        return ["run", str(tmp / "job.yaml"), "--quiet", *[arg for o in overrides for arg in ("--set", o)]]
    return build


def api(overrides: tuple[str, ...] = ()):
    def call(tmp: Path) -> None:
        run_job(tmp / "job.yaml", overrides=overrides, progress=False)
    return call


CASES = [
    Case("yaml-unclosed-bracket", job_case("input: [unclosed\n  path: x\n"), ConfigError,
         ("job.yaml", "invalid YAML"), ("line 2, column 7", "expected ',' or ']'"), api()),
    Case("yaml-tab-indent", job_case("input:\n\tpath: x\n"), ConfigError,
         ("invalid YAML", "'\\t'"), ("line 2, column 1",), api()),
    Case("yaml-duplicate-section", job_case("input:\n  path: a\ninput:\n  path: b\n"), ConfigError,
         ("duplicate key 'input'",), ("line 3, column 1", "first given on line 1"), api()),
    Case("yaml-not-a-mapping", job_case("just some words\n"), ConfigError,
         ("the top level must be a mapping of sections", "'just some words'"),
         ("input, tiles, kernel, model, output, compute",), api()),
    Case("job-not-text", job_case(b"\xff\xfe\x00\x01binary"), ConfigError,
         ("job.yaml", "is not UTF-8 text"), ("at byte 0",), api()),
    Case("job-empty", job_case(""), ConfigError, ("input: required",), ("output: required",), api()),
    Case("unknown-key", job_case(tiles={"size": 32, "sise": 16}), ConfigError,
         ("tiles.sise: unknown key",), ("did you mean 'size'?", "allowed keys: size, step"), api()),
    Case("unknown-section", job_case(outptu={"path": "x.zarr"}), ConfigError,
         ("outptu: unknown key",), ("did you mean 'output'?",), api()),
    Case("unknown-key-of-another-method", job_case(kernel={"segment_size": 16}), ConfigError,
         ("kernel.segment_size: unknown key for method 'lstsq'",), ("an option of method 'welch'",), api()),
    Case("wrong-type-text-for-integer", job_case(tiles={"size": "big"}), ConfigError,
         ("tiles.size: 'big'",), ("is not an integer",), api()),
    Case("wrong-type-fraction-for-integer", job_case(kernel={"size": 7.5}), ConfigError,
         ("kernel.size: 7.5",), ("is not an integer",), api()),
    Case("wrong-type-list-for-path", job_case(where=lambda t: {"input": {"path": [str(t / "stack.zarr")]}}),
         ConfigError, ("input.path: [",), ("is not a string",), api()),
    Case("wrong-type-text-for-boolean", job_case(kernel={"robust": "yes"}), ConfigError,
         ("kernel.robust: 'yes'",), ("is not a boolean (true or false)",), api()),
    Case("enum-typo-method", job_case(kernel={"method": "welsh"}), ConfigError,
         ("kernel.method: 'welsh' is not one of lstsq, welch, ratio",), ("did you mean 'welch'?",), api()),
    Case("enum-typo-output-mode", job_case(output={"mode": "overwirte"}), ConfigError,
         ("output.mode: 'overwirte'",), ("did you mean 'overwrite'?",), api()),
    Case("enum-typo-scheduler", job_case(compute={"scheduler": "synchronus"}), ConfigError,
         ("compute.scheduler: 'synchronus' is not a scheduler",), ("'synchronous' (no cluster)",), api()),
    Case("even-kernel-size", job_case(kernel={"size": 8}), ConfigError,
         ("kernel.size: 8 is even",), ("use 7 or 9",), api()),
    Case("kernel-larger-than-the-tile-allows", job_case(kernel={"size": 31}), ConfigError,
         ("kernel.size: 31 is too large for tiles.size 32",), ("at most 15",), api()),
    Case("tile-too-small", job_case(tiles={"size": 8}), ConfigError,
         ("tiles.size: 8 is too small",), ("at least 16",), api()),
    Case("tile-step-zero", job_case(tiles={"size": 32, "step": 0}), ConfigError,
         ("tiles.step: 0 is too small",), ("at least 1",), api()),
    Case("infinite-saturation-level", job_case(input={"saturation": {"target": float("inf")}}), ConfigError,
         ("input.saturation.target: inf is not a finite number",), ("give the level, or null for none",), api()),
    Case("infinite-regularization", job_case(kernel={"regularization": float("inf")}), ConfigError,
         ("kernel.regularization: inf",), ("'auto', a number >= 0",), api()),
    Case("override-not-yaml", job_case(overrides=("tiles.size=[1",)), ConfigError,
         ("override 'tiles.size=[1'", "not valid YAML"), ("expected ',' or ']'",), api(("tiles.size=[1",))),
    Case("override-unknown-key", job_case(overrides=("tiles.sizee=32",)), ConfigError,
         ("tiles.sizee: unknown key", "--set tiles.sizee=32"), ("did you mean 'size'?",),
         api(("tiles.sizee=32",))),
    Case("output-inside-the-input", job_case(where=lambda t: {"output": {"path": str(t / "stack.zarr" / "k.zarr")}}),
         ConfigError, ("output.path", "lies inside the input store"), ("the output must go elsewhere",), api()),
    Case("output-is-the-input", job_case(where=lambda t: {"output": {"path": str(t / "stack.zarr")}}), ConfigError,
         ("output.path", "is the input store"), ("the output must go to another store",), api()),
    Case("output-holds-the-input", job_case(where=lambda t: {"output": {"path": str(t)}}), ConfigError,
         ("output.path", "holds the input store"), ("replacing it would delete the input",), api()),
]


@pytest.mark.parametrize("case", [c.param() for c in CASES])
def test_a_hostile_job_is_refused_before_anything_is_read_or_written(case, tmp_path, capsys):
    check_case(case, tmp_path, capsys)
    assert not (tmp_path / "kernels.zarr").exists()


@pytest.mark.parametrize(("name", "make", "message"), [
    ("missing.yaml", None, "does not exist"),
    ("folder.yaml", Path.mkdir, "is a directory, not a file"),
])
def test_a_job_file_that_is_not_there_or_not_a_file(tmp_path, capsys, name, make, message):
    from .conftest import raises_exactly, refused

    if make is not None:
        make(tmp_path / name)
    result = refused(capsys, ["run", str(tmp_path / name)], watch=[tmp_path])
    assert f"job file {str(tmp_path / name)!r} {message}" in result.err
    raises_exactly(ConfigError, lambda: load_job(tmp_path / name), watch=[tmp_path])


@pytest.mark.parametrize("inside", ["stack.zarr", "kernels.zarr"])
def test_a_performance_report_inside_a_store_is_refused(tmp_path, capsys, inside):
    from pipeline.errors import OptionError

    from .conftest import raises_exactly, refused

    small_stack(tmp_path / "stack.zarr")
    job_file(tmp_path)
    report = str(tmp_path / inside / "dask.html")
    key = "input.path" if inside == "stack.zarr" else "output.path"
    result = refused(capsys, ["run", str(tmp_path / "job.yaml"), "--quiet", "--performance-report", report],
                     watch=[tmp_path])
    assert f"--performance-report {report} lies inside the store {key}" in result.err
    assert "give a file outside it" in result.err
    raises_exactly(OptionError, lambda: run_job(tmp_path / "job.yaml", progress=False, performance_report=report),
                   watch=[tmp_path])
    assert not (tmp_path / "kernels.zarr").exists()
