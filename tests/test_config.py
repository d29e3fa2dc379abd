"""Job files: defaults, overrides (--set), error reports, cross-field checks, fingerprint; --version, licence."""

from __future__ import annotations

import importlib.metadata
import pathlib
import pickle
import re
import textwrap
import tomllib

import pytest
import yaml

from pipeline import LstsqOptions, WelchOptions
from pipeline.cli import main
from pipeline.errors import KernelmapError
from pipeline.job.config import (
    KERNEL_METHODS,
    PENALTY_TERMS,
    ComputeConfig,
    ConfigError,
    JobConfig,
    LstsqKernel,
    RatioKernel,
    TilesConfig,
    WelchKernel,
    apply_overrides,
    dump_job,
    job_from_dict,
    load_job,
    setting_differences,
)

CONFIGS = pathlib.Path(__file__).parents[1] / "configs"
MINIMAL = {"input": {"path": "in.zarr"}, "output": {"path": "out.zarr"}}
NOT_REG = "is not 'auto', a number >= 0 or a list of numbers >= 0 (one per penalty term)"


def job(**sections) -> JobConfig:
    return job_from_dict({**MINIMAL, **sections})


def errors_of(data, overrides=()) -> list[str]:
    with pytest.raises(ConfigError) as info:
        job_from_dict(data, overrides)
    return info.value.errors


def write(tmp_path: pathlib.Path, text: str, name: str = "job.yaml") -> pathlib.Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


# --- defaults and dumping ---------------------------------------------------


def test_minimal_job_dump_shows_every_default():
    dumped = yaml.safe_load(dump_job(job_from_dict(MINIMAL)))
    assert dumped == {
        "input": {"path": "in.zarr", "source": "source", "target": "target", "mask": None,
                  "group": None, "storage_options": {}, "saturation": None,
                  "variance": None, "weight": None, "gain": None, "read_noise": None},
        "tiles": {"size": 256, "step": 256},
        "kernel": {"method": "lstsq", "size": 21, "normalize": False, "diagnostics": True,
                   "direction": "auto", "regularization": "auto",
                   "penalty": "compact", "robust": True, "recentre": True, "bad_source": "fill",
                       "clip": 5.0},
        "model": {"method": "joint", "degree": None, "max_degree": 3, "clip": 4.0},
        "output": {"path": "out.zarr", "mode": "create", "dtype": "float32", "images_per_shard": None},
        "compute": {"scheduler": "local", "n_workers": 2, "threads_per_worker": 1, "processes": True,
                    "memory_limit": "auto", "dashboard_address": ":0", "block_tiles": None,
                    "batch": {"queue": None, "account": None, "walltime": None, "cores": None, "memory": None,
                              "processes": None, "job_extra_directives": None, "job_script_prologue": None,
                              "interface": None, "python": None, "local_directory": None,
                              "log_directory": None, "worker_lifetime": None,
                              "worker_lifetime_stagger": None, "jobs": 2, "adapt": None,
                              "start_timeout": None, "options": {}}},
        "ingest": None,
    }


def test_dump_keeps_section_and_field_order():
    text = dump_job(job(kernel={"method": "welch"}))
    top = [line.split(":")[0] for line in text.splitlines() if not line.startswith(" ")]
    assert top == ["input", "tiles", "kernel", "model", "output", "compute", "ingest"]
    assert list(yaml.safe_load(text)["kernel"]) == list(WelchKernel.model_fields)
    assert list(WelchKernel.model_fields)[:3] == ["method", "size", "normalize"]


def test_step_defaults_to_size_after_overrides():
    assert job(tiles={"size": 128}).tiles.step == 128
    assert job_from_dict({**MINIMAL, "tiles": {"size": 128}}, ["tiles.size=64"]).tiles.step == 64
    assert TilesConfig().step == 256
    assert job(tiles={"size": 128, "step": 96}).tiles.step == 96


def test_empty_sections_take_their_defaults():
    data = {"input": {"path": "a"}, "output": {"path": "b"}, "tiles": None, "kernel": None, "compute": None}
    assert job_from_dict(data) == job_from_dict({"input": {"path": "a"}, "output": {"path": "b"}})


@pytest.mark.parametrize("kernel", [
    {},
    {"method": "welch", "size": 15, "segment_size": 32, "overlap": 0.25, "window": "tukey"},
    {"method": "ratio", "normalize": True},
    {"regularization": [0.5, 2], "penalty": "wings"},
    {"regularization": 0, "penalty": "identity"},
])
def test_round_trip_through_a_file(tmp_path, kernel):
    original = job(kernel=kernel, tiles={"size": 64, "step": 48}, compute={"scheduler": "threads"},
                   input={"path": "in.zarr", "mask": "bad", "group": "g", "storage_options": {"anon": True}})
    path = write(tmp_path, dump_job(original))
    again = load_job(path)
    assert again == original
    assert dump_job(again) == dump_job(original)
    assert again.fingerprint() == original.fingerprint()


def test_exponent_floats_in_a_file_are_numbers(tmp_path):
    path = write(tmp_path, """
        input: {path: in.zarr}
        output: {path: out.zarr}
        kernel: {method: welch, regularization: 1e-4}
    """)
    assert load_job(path).kernel.regularization == 1e-4


def test_relative_paths_are_kept_as_written(tmp_path):
    path = write(tmp_path, "input: {path: data/in.zarr}\noutput: {path: ../out.zarr}\n")
    loaded = load_job(path)
    assert (loaded.input.path, loaded.output.path) == ("data/in.zarr", "../out.zarr")


def test_numbers_are_accepted_as_names():
    loaded = job(input={"path": "in.zarr", "group": 2020}, compute={"memory_limit": 4000000000})
    assert loaded.input.group == "2020"
    assert loaded.compute.memory_limit == "4000000000"


# --- overrides ----------------------------------------------------------------


def test_override_beats_file_and_later_beats_earlier(tmp_path):
    path = write(tmp_path, """
        input: {path: in.zarr}
        tiles: {size: 128}
        kernel: {size: 15}
        output: {path: out.zarr}
    """)
    assert load_job(path).tiles.size == 128
    loaded = load_job(path, ["tiles.size=512", "kernel.size=31", "kernel.size=25"])
    assert loaded.tiles.size == 512
    assert loaded.kernel.size == 25


@pytest.mark.parametrize(("override", "expected"), [
    ("a=3", 3),
    ("a=0.5", 0.5),
    ("a=1e-3", 1e-3),
    ("a=1.5E+2", 150.0),
    ("a=-2e3", -2000.0),
    ("a=1e", "1e"),
    ("a=.inf", float("inf")),
    ("a=null", None),
    ("a=", None),
    ("a=[1, 2]", [1, 2]),
    ("a=lstsq", "lstsq"),
    ('a="512"', "512"),
    ("a=true", True),
    ("a=tcp://host:8786", "tcp://host:8786"),
    ("a=x=y", "x=y"),
    ("a={b: 1}", {"b": 1}),
])
def test_override_values_are_parsed_as_yaml(override, expected):
    assert apply_overrides({}, [override]) == {"a": expected}


def test_overrides_create_sections_and_leave_the_input_alone():
    data = {"input": {"path": "x"}, "kernel": None}
    out = apply_overrides(data, ["kernel.method=welch", "compute.n_workers=4", "input.mask=bad"])
    assert out == {"input": {"path": "x", "mask": "bad"}, "kernel": {"method": "welch"},
                   "compute": {"n_workers": 4}}
    assert data == {"input": {"path": "x"}, "kernel": None}


def test_override_selects_the_kernel_method():
    loaded = job_from_dict(MINIMAL, ["kernel.method=welch", "kernel.segment_size=32", "tiles.size=64",
                                     "kernel.size=15"])
    assert isinstance(loaded.kernel, WelchKernel)
    assert loaded.kernel.segment_size == 32


def test_string_override_of_an_integer_is_an_error():
    assert errors_of(MINIMAL, ['tiles.size="512"']) == [
        "tiles.size: '512' is not an integer (from --set tiles.size=\"512\" on the command line)"]


def test_errors_of_overridden_keys_name_the_override(tmp_path, capsys):
    path = write(tmp_path, "input: {path: in.zarr}\noutput: {path: out.zarr}\ntiles: {sze: 64}\n")
    assert main(["config", str(path), "--set", "kernel.methd=welch"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"kernelmap config: invalid job configuration in {path}:")
    lines = err.splitlines()[1:]
    assert lines[0] == "  tiles.sze: unknown key (did you mean 'size'?); allowed keys: size, step"  # the file's own
    assert lines[1].startswith("  kernel.methd: unknown key for method 'lstsq' (did you mean 'method'?); allowed keys: "
                               "method, size,")
    assert lines[1].endswith(" (from --set kernel.methd=welch on the command line)")


@pytest.mark.parametrize(("overrides", "expected"), [
    (["kernel.size=20"], "kernel.size: 20 is even: the kernel needs a centre pixel, use 19 or 21 "
                         "(from --set kernel.size=20 on the command line)"),
    (["kernel.size=21", "kernel.size=20"], "kernel.size: 20 is even: the kernel needs a centre pixel, use 19 or "
                                           "21 (from --set kernel.size=20 on the command line)"),
    (["kernel.size=21", "kernel={size: 20}"], "kernel.size: 20 is even: the kernel needs a centre pixel, use 19 "
                                              "or 21 (from --set kernel={size: 20} on the command line)"),
    (["tiles.size=32"], "kernel.size: 21 is too large for tiles.size 32: at most 15 "
                        "(from --set tiles.size=32 on the command line)"),
    (["tiles.step=8"], "kernel.size: 20 is even: the kernel needs a centre pixel, use 19 or 21"),
])
def test_an_error_names_the_overrides_its_value_came_from(overrides, expected):
    data = {**MINIMAL, "kernel": {"size": 20}} if overrides == ["tiles.step=8"] else MINIMAL
    assert errors_of(data, overrides) == [expected]


@pytest.mark.parametrize("argv", [
    ["config", "JOB", "--set", "tiles.size", "128"],
    ["config", "--set", "tiles.size", "128", "JOB"],
    ["run", "JOB", "--set", "tiles.size", "128"],
    ["submit", "JOB", "--set=tiles.size", "128"],
])
def test_a_set_without_its_equals_sign_is_refused_with_the_form(tmp_path, capsys, argv):
    path = write(tmp_path, "input: {path: in.zarr}\noutput: {path: out.zarr}\n")
    with pytest.raises(SystemExit) as info:
        main([str(path) if a == "JOB" else a for a in argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: kernelmap {argv[0]} ")
    assert err.endswith(f"kernelmap {argv[0]}: error: --set tiles.size: expected KEY=VALUE "
                        "(e.g. --set tiles.size=128)\n")


@pytest.mark.parametrize(("argv", "example"), [
    (["config", "--set", "output.mode", "JOB"], "--set output.mode=VALUE"),  # the job file is no value
    (["config", "JOB", "--set", "output.mode"], "--set output.mode=VALUE"),
    (["demo", "--set", "tiles.size", "--images", "2"], "--set tiles.size=VALUE"),
])
def test_a_set_without_its_equals_sign_and_no_value_after_it(tmp_path, capsys, argv, example):
    path = write(tmp_path, "input: {path: in.zarr}\noutput: {path: out.zarr}\n")
    with pytest.raises(SystemExit) as info:
        main([str(path) if a == "JOB" else a for a in argv])
    assert info.value.code == 2
    assert f"error: {example.partition('=')[0]}: expected KEY=VALUE (e.g. {example})\n" in capsys.readouterr().err


def test_repeated_sets_are_applied_in_order(tmp_path, capsys):
    path = write(tmp_path, "input: {path: in.zarr}\noutput: {path: out.zarr}\n")
    assert main(["config", str(path), "--set", "tiles.size=64", "--set", "kernel.size=15",
                 "--set", "tiles.size=48"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert (printed["tiles"]["size"], printed["kernel"]["size"]) == (48, 15)


def test_malformed_overrides_are_all_named():
    with pytest.raises(ConfigError) as info:
        apply_overrides({"tiles": {"size": 64}}, ["tiles.size", "=3", "a..b=1", "tiles.size.x=1",
                                                  "kernel.size=[1"])
    errs = info.value.errors
    assert len(errs) == 5
    assert errs[0].startswith("override 'tiles.size': expected dotted.key=value")
    assert errs[1].startswith("override '=3': empty key")
    assert errs[2].startswith("override 'a..b=1': empty key part")
    assert errs[3] == "override 'tiles.size.x=1': tiles.size is 64, not a mapping"
    assert errs[4].startswith("override 'kernel.size=[1': the value is not valid YAML")


def test_malformed_override_through_load_job_names_the_file(tmp_path):
    path = write(tmp_path, "input: {path: a}\noutput: {path: b}\n")
    with pytest.raises(ConfigError) as info:
        load_job(path, ["tiles"])
    assert info.value.source == str(path)
    assert "override 'tiles'" in str(info.value)


# --- error reports ----------------------------------------------------------


def test_all_errors_are_reported_together_with_dotted_paths():
    data = {
        "input": {"path": "in.zarr", "mask": ""},
        "tiles": {"size": "big", "extra": 1},
        "kernel": {"penalty": "tv", "segment_size": 32, "size": 20},
        "output": {},
        "compute": {"n_workers": 0, "processes": 1, "scheduler": "slurmm"},
        "notes": "x",
    }
    errs = errors_of(data)
    assert errs == [
        "input.mask: must not be empty",
        "tiles.size: 'big' is not an integer",
        "tiles.extra: unknown key; allowed keys: size, step",
        "kernel.size: 20 is even: the kernel needs a centre pixel, use 19 or 21",
        "kernel.penalty: 'tv' is not one of compact, wings, laplacian, identity",
        "kernel.segment_size: unknown key for method 'lstsq'; allowed keys: method, size, normalize, diagnostics, "
        "direction, regularization, penalty, robust, recentre, bad_source, clip ('segment_size' is an option of "
        "method 'welch')",
        "output.path: required",
        "compute.scheduler: 'slurmm' is not a scheduler: use 'local' (a local cluster), 'threads' or "
        "'synchronous' (no cluster), a batch system (slurm, sge, pbs, lsf, htcondor), or the address of "
        "a running scheduler ('tcp://host:8786' or 'host:8786')",
        "compute.n_workers: 0 is too small: at least 1",
        "compute.processes: 1 is not a boolean (true or false)",
        "notes: unknown key; allowed keys: input, tiles, kernel, model, output, compute, ingest",
    ]


def test_error_message_text():
    with pytest.raises(ConfigError) as info:
        job_from_dict({"input": {"path": "a"}})
    err = info.value
    assert isinstance(err, KernelmapError) and isinstance(err, ValueError)
    assert str(err) == "invalid job configuration:\n  output: required"
    assert err.errors == ["output: required"]
    assert pickle.loads(pickle.dumps(err)).errors == err.errors


@pytest.mark.parametrize(("section", "expected"), [
    ({"tiles": {"size": 8}}, "tiles.size: 8 is too small: at least 16"),
    ({"tiles": {"size": 64.0}}, "tiles.size: 64.0 is not an integer"),
    ({"tiles": {"size": True}}, "tiles.size: true is not an integer"),
    ({"tiles": {"step": 0}}, "tiles.step: 0 is too small: at least 1"),
    ({"tiles": 5}, "tiles: 5 is not a mapping"),
    ({"kernel": {"size": 0}}, "kernel.size: 0 is too small: the kernel size must be an odd integer >= 1"),
    ({"kernel": {"clip": 0}}, "kernel.clip: 0 is too small: must be greater than 0"),
    ({"kernel": {"robust": "yes"}}, "kernel.robust: 'yes' is not a boolean (true or false)"),
    ({"kernel": {"method": "fourier"}}, "kernel.method: 'fourier' is not one of lstsq, welch, ratio"),
    ({"kernel": {"method": None}}, "kernel.method: null is not one of lstsq, welch, ratio"),
    ({"kernel": [1]}, "kernel: [1] is not a mapping"),
    ({"kernel": {"regularization": -1}},
     f"kernel.regularization: -1 {NOT_REG}"),
    ({"kernel": {"regularization": "none"}},
     f"kernel.regularization: 'none' {NOT_REG}"),
    ({"kernel": {"regularization": [1, 2, 3]}},
     "kernel.regularization: [1.0, 2.0, 3.0] has 3 value(s) but penalty 'compact' has 2 term(s): "
     "give 2 numbers or one number"),
    ({"kernel": {"regularization": float("nan")}},
     f"kernel.regularization: nan {NOT_REG}"),
    ({"kernel": {"method": "welch", "overlap": 1}}, "kernel.overlap: 1 is too large: must be less than 1"),
    ({"kernel": {"method": "welch", "window": "hamming"}},
     "kernel.window: 'hamming' is not one of auto, hann, sine, tukey, none"),
    ({"kernel": {"method": "ratio", "penalty": "compact"}},
     "kernel.penalty: unknown key for method 'ratio'; allowed keys: method, size, normalize, diagnostics, "
     "direction ('penalty' is an option of method 'lstsq')"),
    ({"output": {"path": "o", "mode": "append"}},
     "output.mode: 'append' is not one of create, resume, overwrite"),
    ({"output": {"path": "o", "dtype": "float16"}},
     "output.dtype: 'float16' is not one of float32, float64 (did you mean 'float64'?)"),
    ({"output": {"path": "in.zarr/"}},
     "output.path: 'in.zarr/' is the input store (input.path): the output must go to another store"),
    ({"output": {"path": "."}},
     "output.path: '.' holds the input store (input.path 'in.zarr'): the output must go elsewhere (replacing it "
     "would delete the input)"),
    ({"output": {"path": "in.zarr/kernels.zarr"}},
     "output.path: 'in.zarr/kernels.zarr' lies inside the input store (input.path 'in.zarr'), which is never "
     "written: the output must go elsewhere"),
    ({"input": {"path": "in.zarr", "target": "source"}}, "input.target: 'source' is also the source array"),
    ({"input": {"path": "in.zarr", "mask": "target"}}, "input.mask: 'target' is also the target array"),
    ({"input": {"path": ["a"]}}, "input.path: ['a'] is not a string"),
    ({"compute": {"threads_per_worker": 1.5}}, "compute.threads_per_worker: 1.5 is not an integer"),
    ({"compute": {"block_tiles": 0}}, "compute.block_tiles: 0 is too small: at least 1"),
])
def test_single_error_messages(section, expected):
    assert errors_of({**MINIMAL, **section}) == [expected]


def test_an_output_beside_the_input_with_a_name_it_starts_with_is_fine():
    assert job_from_dict({**MINIMAL, "output": {"path": "in.zarr2"}}).output.path == "in.zarr2"


@pytest.mark.parametrize(("scheduler", "kind"), [
    ("local", "local"), ("threads", "threads"), ("synchronous", "synchronous"),
    ("tcp://scheduler.example.org:8786", "address"), ("tls://10.0.0.1:8786", "address"),
    ("scheduler:8786", "address"), ("10.1.2.3:8786", "address"), ("[::1]:8786", "address"),
    ("slurm", "batch"), ("sge", "batch"), ("pbs", "batch"), ("lsf", "batch"), ("htcondor", "batch"),
])
def test_scheduler_forms(scheduler, kind):
    assert job(compute={"scheduler": scheduler}).compute.scheduler_kind == kind


@pytest.mark.parametrize("scheduler", ["Slurm", "Local", "host:", "tcp://", "host:port", ""])
def test_bad_scheduler(scheduler):
    (err,) = errors_of({**MINIMAL, "compute": {"scheduler": scheduler}})
    if scheduler:
        assert err.startswith(f"compute.scheduler: {scheduler!r} is not a scheduler: use 'local'")
    else:
        assert err == "compute.scheduler: must not be empty"


# --- the kernel section's method --------------------------------------------


def test_missing_method_means_lstsq():
    loaded = job(kernel={"size": 15})
    assert isinstance(loaded.kernel, LstsqKernel)
    assert loaded.kernel.method == "lstsq"
    assert isinstance(job().kernel, LstsqKernel)


def test_welch_options_only_with_method_welch():
    options = {"segment_size": 32, "overlap": 0.25, "window": "none", "regularization": 0.01}
    welch = job(kernel={"method": "welch", "size": 15, **options}, tiles={"size": 64})
    assert isinstance(welch.kernel, WelchKernel)
    assert welch.kernel.estimator_options() == {**options, "find_defects": True}
    errs = errors_of({**MINIMAL, "kernel": {"size": 15, **options}, "tiles": {"size": 64}})
    # regularization is an lstsq option too; the others belong to welch only
    assert [e.split(":")[0] for e in errs] == ["kernel.segment_size", "kernel.overlap", "kernel.window"]
    assert all(e.endswith(f"('{e.split(':')[0][7:]}' is an option of method 'welch')") for e in errs)


def test_estimator_options():
    assert LstsqKernel().estimator_options() == {
        "regularization": "auto", "penalty": "compact", "robust": True, "recentre": True, "bad_source": "fill",
        "clip": 5.0}
    assert LstsqKernel(regularization=[1, 2]).estimator_options()["regularization"] == [1.0, 2.0]
    assert RatioKernel().estimator_options() == {}
    assert WelchKernel().estimator_options() == {
        "segment_size": 64, "overlap": 0.5, "window": "auto", "regularization": "auto", "find_defects": True}


def test_estimator_options_are_accepted_by_the_estimators():
    import numpy as np

    import pipeline as km

    rng = np.random.default_rng(0)
    src = rng.normal(size=(1, 32, 32))
    kernels = (LstsqKernel(size=5, regularization=0.1), WelchKernel(size=5, segment_size=16), RatioKernel(size=5))
    for kernel in kernels:
        res = km.estimate_kernels(src, src, kernel_size=kernel.size, method=kernel.method,
                                  normalize=kernel.normalize, diagnostics=False, **kernel.estimator_options())
        assert res.kernels.shape == (1, 5, 5)


def test_kernel_sections_follow_the_options_registry():
    """Keys, order and defaults of each kernel section are the core's options marked in_job."""
    from pipeline.core.estimate import REGISTRY
    from pipeline.core.options import option_fields

    assert tuple(KERNEL_METHODS) == tuple(REGISTRY)
    for name, model in KERNEL_METHODS.items():
        options = REGISTRY[name].options
        in_job = [f for f in option_fields(options) if f.metadata["option"].in_job]
        assert list(model.model_fields) == ["method", "size", "normalize", "diagnostics", "direction",
                                            *(f.name for f in in_job)]
        for f in in_job:
            assert model.model_fields[f.name].default == f.default
        dumped = yaml.safe_load(dump_job(job(kernel={"method": name})))["kernel"]
        assert {f.name: dumped[f.name] for f in in_job} == {f.name: f.default for f in in_job}
        assert model().options() == options()  # the YAML defaults are the dataclass defaults
    # options that tune the search or the threads stay out of job files
    for hidden in ("lam_init", "tol", "max_iter", "n_probes", "min_pixels_per_parameter", "chunk"):
        assert hidden not in LstsqKernel.model_fields
    assert "workers" not in WelchKernel.model_fields


def test_kernel_section_options_object():
    kernel = job(kernel={"penalty": "wings", "regularization": [0.5, 2]}).kernel
    assert kernel.options() == LstsqOptions(penalty="wings", regularization=[0.5, 2.0])
    welch = job(kernel={"method": "welch", "size": 15, "segment_size": 32}, tiles={"size": 64}).kernel
    assert welch.options() == WelchOptions(segment_size=32)


def test_choices_and_bounds_come_from_the_core():
    from pipeline.core.options import WINDOWS
    from pipeline.core.penalties import PENALTIES, penalty_operators
    from pipeline.core.penalties import PENALTY_TERMS as CORE_TERMS

    assert PENALTY_TERMS is CORE_TERMS
    assert tuple(LstsqKernel.model_fields["penalty"].annotation.__args__) == PENALTIES
    assert tuple(WelchKernel.model_fields["window"].annotation.__args__) == WINDOWS
    for name, n in CORE_TERMS.items():
        assert len(penalty_operators(5, name)) == n
    (err,) = errors_of({**MINIMAL, "kernel": {"method": "welch", "overlap": 1.0}})
    assert err == "kernel.overlap: 1.0 is too large: must be less than 1"
    (err,) = errors_of({**MINIMAL, "kernel": {"method": "welch", "segment_size": 1, "size": 1}})
    assert err == "kernel.segment_size: 1 is too small: at least 2"


@pytest.mark.parametrize("tile_size", [16, 30, 64, 100, 256])
def test_largest_kernel_size_is_the_cores(tile_size):
    from pipeline.core.validate import max_kernel_size

    largest = max_kernel_size((tile_size, tile_size))
    assert job(tiles={"size": tile_size}, kernel={"size": largest}).kernel.size == largest
    (err,) = errors_of({**MINIMAL, "tiles": {"size": tile_size}, "kernel": {"size": largest + 2}})
    assert err == f"kernel.size: {largest + 2} is too large for tiles.size {tile_size}: at most {largest}"


def test_a_new_job_option_appears_in_the_schema():
    """An option added to a method's dataclass with in_job=True becomes a key; without, it does not."""
    from dataclasses import dataclass, field

    from pydantic import ValidationError

    from pipeline.core.options import Option
    from pipeline.job.config import _LstsqChecks, kernel_model

    @dataclass(frozen=True, kw_only=True)
    class Extended(LstsqOptions):
        smoothing: float = field(default=0.5, metadata={"option": Option("new", float, ge=0, le=1, in_job=True)})
        passes: int = field(default=3, metadata={"option": Option("not in jobs", int, ge=1)})

    model = kernel_model("lstsq", Extended, _LstsqChecks)
    assert list(model.model_fields)[-1] == "smoothing" and "passes" not in model.model_fields
    assert model().smoothing == 0.5 and model(smoothing=1).smoothing == 1.0
    with pytest.raises(ValidationError, match="less than or equal to 1"):
        model(smoothing=1.5)
    with pytest.raises(ValidationError):
        model(regularization=[1.0])  # the lstsq checks still apply


# --- cross-field checks -----------------------------------------------------


@pytest.mark.parametrize(("tiles", "kernel", "expected"), [
    ({"size": 64}, {"size": 41}, ["kernel.size: 41 is too large for tiles.size 64: at most 31"]),
    ({"size": 64}, {"size": 33}, ["kernel.size: 33 is too large for tiles.size 64: at most 31"]),
    ({"size": 62}, {"size": 33}, ["kernel.size: 33 is too large for tiles.size 62: at most 31"]),
    ({"size": 64, "step": 65}, {"size": 15},
     ["tiles.step: 65 is larger than tiles.size 64: at most 64 (a smaller step gives overlapping tiles)"]),
    ({"size": 64}, {"method": "welch", "size": 21, "segment_size": 16},
     ["kernel.segment_size: 16 is smaller than kernel.size 21: at least 21"]),
    ({"size": 64}, {"method": "welch", "size": 21, "segment_size": 128},
     ["kernel.segment_size: 128 is larger than tiles.size 64: at most 64"]),
    ({"size": 64}, {"method": "welch", "size": 41, "segment_size": 128},
     ["kernel.size: 41 is too large for tiles.size 64: at most 31",
      "kernel.segment_size: 128 is larger than tiles.size 64: at most 64"]),
])
def test_cross_field_checks(tiles, kernel, expected):
    assert errors_of({**MINIMAL, "tiles": tiles, "kernel": kernel}) == expected


def test_cross_field_limits_are_inclusive():
    assert job(tiles={"size": 64}, kernel={"size": 31}).kernel.size == 31
    assert job(tiles={"size": 64, "step": 64}).tiles.step == 64
    welch = job(tiles={"size": 64}, kernel={"method": "welch", "size": 31, "segment_size": 64})
    assert welch.kernel.segment_size == 64
    tight = job(tiles={"size": 64}, kernel={"method": "welch", "size": 15, "segment_size": 15})
    assert tight.kernel.segment_size == 15


def test_cross_field_checks_reported_with_errors_elsewhere():
    errs = errors_of({"input": {"path": "a"}, "tiles": {"size": 64}, "kernel": {"size": 41},
                      "compute": {"n_workers": 0}})
    assert errs == ["output: required", "compute.n_workers: 0 is too small: at least 1",
                    "kernel.size: 41 is too large for tiles.size 64: at most 31"]


# --- fingerprint --------------------------------------------------------------


def test_fingerprint_ignores_where_and_how():
    base = job().fingerprint()
    assert len(base) == 64 and int(base, 16) >= 0
    assert job(output={"path": "elsewhere.zarr", "mode": "overwrite"}).fingerprint() == base
    assert job(compute={"scheduler": "tcp://h:1", "n_workers": 9, "block_tiles": 3}).fingerprint() == base
    assert job(input={"path": "in.zarr", "storage_options": {"anon": True}}).fingerprint() == base
    # writing a default explicitly changes nothing
    assert job(kernel={"method": "lstsq", "clip": 5}, tiles={"size": 256, "step": 256}).fingerprint() == base
    assert job(model={"method": "joint"}).fingerprint() == base


def test_fingerprint_of_a_default_job_is_the_one_stores_already_carry():
    """The fingerprint of a default job is fixed: a change to it (which refuses to resume every store made
    before) is made on purpose, as when kernel.direction came with new per-tile records."""
    assert job().fingerprint() == "76c0acd77783a38d47e6d693d72162050a39332c590e9e01d8a53a807ca75750"
    assert job(model={"method": "kernels"}).fingerprint() != job().fingerprint()


def test_setting_differences_name_each_setting_of_the_stored_job_that_differs():
    stored = dump_job(job(tiles={"size": 128}, model={"method": "kernels"}))
    assert setting_differences(stored, job()) == ['model.method: "kernels" in the store, "joint" here',
                                                  "tiles.size: 128 in the store, 256 here",
                                                  "tiles.step: 128 in the store, 256 here"]
    assert setting_differences(dump_job(job()), job()) == []
    # a store from before model.method was written: the model of the tile kernels
    old = yaml.safe_load(dump_job(job()))
    del old["model"]["method"]
    assert setting_differences(yaml.safe_dump(old), job()) == ['model.method: "kernels" in the store, "joint" here']
    for unreadable in (None, "", "[1, 2", "- a list", "input: {nonsense: 1}"):
        assert setting_differences(unreadable, job()) == []


def test_the_ingest_section_names_fits_files_and_needs_a_local_input_path():
    ingest = {"reference": "ref.fits", "targets": ["e*.fits"], "hdu": "SCI", "keys": ["MJD-OBS"]}
    loaded = job(ingest=ingest)
    assert loaded.ingest.hdu == "SCI" and loaded.ingest.mask_hdu is None and loaded.ingest.tolerance == 0.01
    assert loaded.fingerprint() == job().fingerprint()  # the stack's identity counts, not where it came from
    assert any(p.startswith("ingest.targets:") for p in errors_of({**MINIMAL, "ingest": {**ingest, "targets": []}}))
    problems = errors_of({**MINIMAL, "input": {"path": "s3://b/in.zarr"}, "ingest": ingest})
    assert problems == ["ingest: writes the input stack to input.path, a local path: 's3://b/in.zarr' is a URL "
                        "(ingest first, then copy the stack)"]


def test_the_default_model_is_the_joint_fit_where_the_kernel_section_allows_it():
    assert job().model.method == "joint"
    assert job(kernel={"method": "welch"}).model.method == "kernels"
    assert job(kernel={"normalize": True}).model.method == "kernels"
    assert job(kernel={"method": "lstsq", "normalize": False}).model.method == "joint"


def test_the_joint_model_needs_the_exact_solver_and_unnormalised_kernels():
    welch = errors_of({**MINIMAL, "model": {"method": "joint"}, "kernel": {"method": "welch", "normalize": True}})
    assert any(e.startswith("model.method: joint needs kernel.method: lstsq") and "model.method: kernels" in e
               for e in welch)
    assert any(e.startswith("model.method: joint fits the kernels' flux") for e in welch)
    assert job(model={"method": "joint"}).model.method == "joint"


@pytest.mark.parametrize("change", [
    {"tiles": {"step": 128}},
    {"tiles": {"size": 128}},
    {"kernel": {"size": 15}},
    {"kernel": {"penalty": "wings"}},
    {"kernel": {"method": "welch"}},
    {"kernel": {"normalize": True}},
    {"input": {"path": "other.zarr"}},
    {"input": {"path": "in.zarr", "mask": "mask"}},
    {"input": {"path": "in.zarr", "group": "g"}},
    {"output": {"path": "out.zarr", "dtype": "float64"}},
    {"model": {"method": "kernels"}},
])
def test_fingerprint_changes_with_what_changes_the_result(change):
    assert job(**change).fingerprint() != job().fingerprint()


# --- files ------------------------------------------------------------------


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, "input:\n  path: in.zarr\ntiles:\n  size: [64\noutput: {path: o}\n")
    with pytest.raises(ConfigError) as info:
        load_job(path)
    text = str(info.value)
    assert text.startswith(f"invalid job configuration in {path}:\n  line ")
    assert "invalid YAML" in text
    (line,) = info.value.errors
    assert line.startswith("line 5, column ")


def test_yaml_error_line_of_a_bad_mapping(tmp_path):
    path = write(tmp_path, "input:\n  path: in.zarr\n  source: a: b\n")
    with pytest.raises(ConfigError, match=r"line 3, column \d+: invalid YAML: mapping values are not"):
        load_job(path)


def test_duplicate_key_is_an_error(tmp_path):
    path = write(tmp_path, "input: {path: a}\noutput: {path: b}\ntiles:\n  size: 64\n  size: 128\n")
    with pytest.raises(ConfigError) as info:
        load_job(path)
    assert info.value.errors == [
        "line 5, column 3: invalid YAML: duplicate key 'size' (first given on line 4)"]


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_job(missing)
    assert info.value.errors == [f"job file {str(missing)!r} does not exist"]


@pytest.mark.parametrize("text", ["- a\n- b\n", "just text\n", "42\n"])
def test_top_level_must_be_a_mapping(tmp_path, text):
    with pytest.raises(ConfigError, match="the top level must be a mapping of sections"):
        load_job(write(tmp_path, text))


def test_empty_file_reports_the_required_sections(tmp_path):
    path = write(tmp_path, "# nothing yet\n")
    with pytest.raises(ConfigError) as info:
        load_job(path)
    assert info.value.errors == ["input: required", "output: required"]
    assert load_job(path, ["input.path=a", "output.path=b"]).kernel.size == 21


def test_errors_of_a_file_name_it(tmp_path):
    path = write(tmp_path, "input: {path: a}\noutput: {path: b}\ntiles: {size: 8}\nkernel: {penalty: tv}\n")
    with pytest.raises(ConfigError) as info:
        load_job(path)
    assert str(info.value) == (
        f"invalid job configuration in {path}:\n"
        "  tiles.size: 8 is too small: at least 16\n"
        "  kernel.penalty: 'tv' is not one of compact, wings, laplacian, identity"
    )


def test_example_configs_exist():
    assert {p.name for p in CONFIGS.glob("*.yaml")} >= {"demo.yaml", "survey.yaml", "cluster.yaml", "slurm.yaml"}


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_config_loads(path):
    loaded = load_job(path)
    assert load_job(path, ["compute.scheduler=threads"]).fingerprint() == loaded.fingerprint()
    # the examples explain their keys: a comment right above every key of a section
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^  [a-z_]+:", line):
            assert lines[i - 1].lstrip().startswith("#"), f"{path.name}:{i + 1}: {line.strip()} has no comment"


def test_example_configs_content():
    demo = load_job(CONFIGS / "demo.yaml")
    assert (demo.input.path, demo.input.source, demo.input.target, demo.input.mask) == (
        "demo-output/stack.zarr", "source", "target", None)
    assert (demo.tiles.size, demo.tiles.step, demo.kernel.size, demo.kernel.method) == (128, 128, 15, "lstsq")
    assert (demo.output.path, demo.output.mode) == ("demo-output/kernels.zarr", "overwrite")
    compute = demo.compute
    assert (compute.scheduler, compute.n_workers, compute.threads_per_worker) == ("local", 2, 1)
    survey = load_job(CONFIGS / "survey.yaml")
    assert (survey.tiles.size, survey.tiles.step, survey.kernel.size) == (256, 192, 21)
    assert (survey.input.mask, survey.output.mode, survey.kernel.method) == ("mask", "create", "lstsq")
    cluster = load_job(CONFIGS / "cluster.yaml")
    assert cluster.compute.scheduler == "tcp://scheduler.example.org:8786"
    assert cluster.compute.scheduler_kind == "address"
    assert isinstance(cluster.kernel, WelchKernel)
    slurm = load_job(CONFIGS / "slurm.yaml")
    assert slurm.compute.scheduler_kind == "batch" and slurm.compute.batch.adapt.maximum_jobs == 16


def test_models_forbid_extra_keys_directly():
    for model in (ComputeConfig, TilesConfig, LstsqKernel):
        assert model.model_config["extra"] == "forbid"


# --- the command and the package ----------------------------------------------


def test_version_is_the_installed_distributions(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"kernelmap {importlib.metadata.version('kernelmap')}\n"


def test_the_licence_is_bsd_3_clause():
    root = pathlib.Path(__file__).parents[1]
    text = " ".join((root / "LICENSE").read_text().split())
    assert text.startswith("BSD 3-Clause License Copyright (c) 2026, the kernelmap developers")
    assert ("Neither the name of the copyright holder nor the names of its contributors may be used to endorse or "
            "promote products derived from this software without specific prior written permission.") in text
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    assert (project["license"], project["license-files"]) == ("BSD-3-Clause", ["LICENSE"])
