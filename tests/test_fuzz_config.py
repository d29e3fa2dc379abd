"""Property-based tests of job files: whatever the YAML holds, loading it gives a job or a ConfigError whose
lines name the key at fault; never another exception, and never a hang."""

from __future__ import annotations

import copy
import math
import time

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pipeline.errors import ConfigError
from pipeline.job.config import MAX_DEPTH, MAX_VALUES, JobConfig, dump_job, job_from_dict, load_job

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

#: valid jobs with every key written out (so that a mutation can reach each): the default method with the
#: input's optional sections and a batch system, welch with the tile-kernel model, ratio, and an ingest section
_JOBS = [
    {"input": {"path": "in.zarr", "mask": "mask", "saturation": {"source": 6e4, "target": "SATURATE", "grow": 2},
               "gain": {"target": 2.5}, "read_noise": {"target": 4.0}, "storage_options": {"anon": True}},
     "tiles": {"size": 64, "step": 32}, "kernel": {"size": 9, "regularization": [0.1, 1.0]},
     "output": {"path": "out.zarr", "images_per_shard": 16},
     "compute": {"scheduler": "slurm", "block_tiles": 4,
                 "batch": {"walltime": "01:00:00", "job_extra_directives": ["--qos=low"],
                           "adapt": {"minimum_jobs": 1, "maximum_jobs": 3}, "options": {"cores": 4}}}},
    {"input": {"path": "in.zarr", "variance": {"target": "var"}}, "tiles": {"size": 128},
     "kernel": {"method": "welch", "size": 11, "segment_size": 64, "window": "tukey"},
     "model": {"method": "kernels", "degree": 2}, "output": {"path": "out.zarr", "dtype": "float64"}},
    {"input": {"path": "in.zarr", "weight": {"target": "w", "source": "ws"}}, "kernel": {"method": "ratio"},
     "output": {"path": "s3://bucket/out.zarr"}, "compute": {"scheduler": "tcp://host:8786"}},
    {"input": {"path": "stack.zarr"}, "output": {"path": "out.zarr"},
     "ingest": {"reference": "ref.fits", "targets": ["e*.fits"], "hdu": "SCI", "mask_hdu": 1,
                "weight_file": "{dir}/{stem}.weight.fits", "keys": ["MJD-OBS"], "tolerance": 0.05}},
]
VALID = [yaml.safe_load(dump_job(job_from_dict(job))) for job in _JOBS]
def _paths(node, prefix=()):
    """Every (key or index) path into a job's mappings and lists."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        yield (*prefix, key)
        yield from _paths(value, (*prefix, key))


#: the keys of the jobs, for random trees that look like jobs
KEYS = sorted({key for job in VALID for path in _paths(job) for key in path if isinstance(key, str)} | {"<<"})
TRICKY = ["", " ", "\t", "LSTSQ", "Welch", "auto", "AUTO", "1e-3", "21", "0x1F", "true", "yes", "null", "~",
          ".inf", ".nan", "2:00:00", "{dir}", "{x}", "{", "tcp://", ":8786", "host:99999", "s3://b", "é" * 3,
          "x" * 300, "kernels", "joint", "float16", "overwrite", "hann", "none", "compact", "exclude", "SCI"]

scalars = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=12), st.sampled_from(TRICKY),
    st.integers(-(2**70), 2**70), st.sampled_from([0, 1, -1, 2, 16, 2**31, 2**63, 10**30]),
    st.floats(), st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 1e308, 5e-324, 0.5]),
    st.booleans(), st.none(), st.dates(), st.datetimes(),
)
keys = st.one_of(st.sampled_from(KEYS), st.text(max_size=8), st.integers(-3, 3), st.none(), st.booleans(),
                 st.floats(allow_nan=False))
trees = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=5),
                     max_leaves=25)


def _typo(draw, key: str) -> str:
    i = draw(st.integers(0, len(key) - 1))
    how = draw(st.sampled_from(["drop", "double", "swap", "upper", "dash"]))
    if how == "drop" and len(key) > 1:
        return key[:i] + key[i + 1:]
    if how == "swap" and i + 1 < len(key):
        return key[:i] + key[i + 1] + key[i] + key[i + 2:]
    if how == "upper":
        return key.upper() if key.upper() != key else key + "s"
    if how == "dash" and "_" in key:
        return key.replace("_", "-")
    return key[:i] + key[i] + key[i:]


@st.composite
def mutated_jobs(draw) -> tuple[dict, list[tuple]]:
    """A valid job changed at 1 to 3 random places; returns the job and the path each change made or hit.

    Changes: a value replaced by a random one (of any type), a key deleted, an unknown key added, a key
    misspelt, a name in other case, a number negated, made huge, zero or NaN, a value put in a list or a
    mapping.
    """
    job = copy.deepcopy(draw(st.sampled_from(VALID)))
    changed = []
    for _ in range(draw(st.integers(1, 3))):
        paths = sorted(_paths(job), key=repr)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = job
        for key in path[:-1]:
            parent = parent[key]
        key, value = path[-1], parent[path[-1]]
        kind = draw(st.sampled_from(["replace", "delete", "unknown", "typo", "case", "number", "list", "mapping"]))
        if kind == "delete" and isinstance(parent, dict):
            del parent[key]
        elif kind == "unknown" and isinstance(parent, dict):
            key = draw(st.sampled_from([f"{key}_extra", "notes", "Size", "method ", "<<"]))
            path = (*path[:-1], key)
            parent[key] = draw(scalars)
        elif kind == "typo" and isinstance(parent, dict) and isinstance(key, str):
            new = _typo(draw, key)
            parent[new] = parent.pop(key)
            path = (*path[:-1], new)
        elif kind == "case" and isinstance(value, str):
            parent[key] = draw(st.sampled_from([value.upper(), value.title(), f" {value}", f"{value} "]))
        elif kind == "number" and isinstance(value, (int, float)) and not isinstance(value, bool):
            parent[key] = draw(st.sampled_from([-value, value * 10**12, 0, -1, 10**30, 1e308, math.nan, value + 0.5]))
        elif kind == "list":
            parent[key] = [value]
        elif kind == "mapping":
            parent[key] = {"value": value}
        else:
            parent[key] = draw(trees)
        changed.append(path)
    return job, changed


def _bomb(levels: int) -> str:
    """Anchors each holding nine aliases of the one before: 9**levels strings once expanded."""
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


RAW = [
    "\tinput:\n\tpath: a\n", "input: {path: a\noutput: [", "input:\n  path: a\ninput:\n  path: b\n",
    "input: {path: a, path: b}\noutput: {path: c}\n", "a: &x [1, 2]\nb: *x\n", "a: &a [*a]\n", "a: &a {b: *a}\n",
    "input: &i {path: x, storage_options: {s: *i}}\noutput: {path: y}\n", "- a\n- b\n", "'unterminated",
    "input: !!python/object/apply:os.system [ls]\n", "input: !custom 1\n", "---\na: 1\n---\nb: 2\n",
    "%YAML 1.2\n---\na: 1\n", "? [1, 2]\n: 3\n", "{[1]: 2}\n", "a: 1\n b: 2\n", "@foo\n", "`x`\n",
    "key: value: other\n", "<<: {input: {path: a}}\noutput: {path: b}\n", "input: *nope\n",
    "\ufeffinput: {path: a}\noutput: {path: b}\n", "input: {path: a}\r\noutput: {path: b}\r\n", "", "~\n", "42\n",
    "[" * 2000, "- " * 500 + "x\n", "a: " + "[" * 100 + "]" * 100 + "\n",
    *(f"input: {{path: a}}\noutput: {{path: b}}\n{line}\n" for line in (
        "tiles: {size: 0x40}", "tiles: {size: 64.0}", "tiles: {size: 2020-01-01}", "tiles: {size: 1e5}",
        "kernel: {regularization: [.nan, 1]}", "kernel: {method: WELCH}", "compute: {walltime: 2:00:00}")),
]


@st.composite
def raw_texts(draw) -> str | bytes:
    """Text that is not a job: broken YAML, tabs, duplicate keys, aliases, bombs, binary, a job with a byte
    changed."""
    kind = draw(st.sampled_from(["raw", "bomb", "binary", "corrupted"]))
    if kind == "raw":
        return draw(st.sampled_from(RAW))
    if kind == "bomb":
        return _bomb(draw(st.integers(2, 12)))
    if kind == "binary":
        return draw(st.binary(max_size=200))
    text = yaml.safe_dump(draw(st.sampled_from(VALID)), sort_keys=False)
    at = draw(st.integers(0, len(text) - 1))
    junk = draw(st.sampled_from(["\t", "[", "{", "]", ":", "&", "*", "!", "\x00", "'", '"', "\n  ", "", "#", "- ",
                                 "? ", "|", ">", "%", "\x85", "\udcff"]))
    return text[:at] + junk + text[at + draw(st.integers(0, 8)):]


def _check_lines(exc: ConfigError) -> list[str]:
    """The error's lines: none empty, and those of a key (``"key: message"``) with both parts present."""
    assert str(exc).strip() and exc.errors
    for line in exc.errors:
        key, sep, message = line.partition(": ")
        assert key.strip() and (not sep or message.strip()), line
    return exc.errors


def _names(lines: list[str], path: tuple) -> bool:
    """Whether a line is about ``path``: its key lies on the path (the key itself, a section above it, a
    key below it), or its message names the path's section (a check between sections)."""
    dotted = ".".join(map(str, path))
    for line in lines:
        key = line.partition(": ")[0]
        if key == dotted or dotted.startswith(key + ".") or key.startswith(dotted + "."):
            return True
        if str(path[0]) in line:
            return True
    return False


def _load(tmp, content: str | bytes, overrides=()) -> JobConfig | ConfigError:
    """``load_job`` of ``content`` written to a file: the job, or the ConfigError (any other exception
    fails the test)."""
    path = tmp / "job.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_bytes(content.encode("utf-8", "surrogateescape"))
    try:
        job = load_job(path, overrides)
    except ConfigError as exc:
        _check_lines(exc)
        assert exc.source == str(path) or exc.source is None
        return exc
    assert isinstance(job, JobConfig)
    return job


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def _dumped(data) -> str | None:
    """``data`` as YAML text (``None`` where YAML cannot write it)."""
    try:
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    except yaml.YAMLError:
        return None


@FUZZ
@given(trees)
def test_any_yaml_tree_loads_or_is_a_config_error(tmp, tree):
    text = _dumped(tree)
    outcome = _load(tmp, text) if text is not None else None
    try:
        job_from_dict(tree)
    except ConfigError as exc:
        _check_lines(exc)
        event("ConfigError")
    else:
        event("job")
    if isinstance(outcome, ConfigError):
        event("from the file: ConfigError")


@FUZZ
@given(mutated_jobs())
def test_a_changed_job_loads_or_names_the_key_at_fault(tmp, case):
    job, changed = case
    outcome = _load(tmp, _dumped(job))
    try:
        job_from_dict(job)
    except ConfigError as exc:
        lines = _check_lines(exc)
        assert isinstance(outcome, ConfigError)
        if len(changed) == 1:
            assert _names(lines, changed[0]), (changed[0], lines)
        event("ConfigError")
    else:
        assert isinstance(outcome, JobConfig)
        event("job")


override_keys = st.one_of(
    st.sampled_from(sorted({".".join(map(str, path)) for job in VALID for path in _paths(job)
                            if all(isinstance(k, str) for k in path)})),
    st.text(st.sampled_from("abcdeiknoprstz._ "), max_size=16),
)
override_values = st.one_of(
    st.sampled_from([*TRICKY, "[1, 2]", "{a: 1}", "&a [*a]", "*a", "[" * 600, "!!binary x", "- a", "a: b", "'", "1e400",
                     "-1", "0", ""]),
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=16))


@FUZZ
@given(job=st.sampled_from(VALID),
       overrides=st.lists(st.tuples(override_keys, st.sampled_from(["=", "=", "==", " = ", ""]), override_values)
                          .map("".join), min_size=1, max_size=3))
def test_set_overrides_load_or_name_the_override(tmp, job, overrides):
    outcome = _load(tmp, _dumped(job), overrides)
    if isinstance(outcome, ConfigError) and len(overrides) == 1:
        key = overrides[0].partition("=")[0].strip()
        assert (any("override" in line or "--set" in line for line in outcome.errors)
                or _names(outcome.errors, tuple(part.strip() for part in key.split(".")))), (overrides, outcome.errors)
    event(type(outcome).__name__)


@FUZZ
@given(raw_texts())
def test_text_that_is_no_job_is_a_config_error(tmp, text):
    started = time.perf_counter()
    outcome = _load(tmp, text)
    assert time.perf_counter() - started < 10
    event(type(outcome).__name__)


# --- what the properties found, pinned -------------------------------------------------------------


def test_a_yaml_bomb_is_refused_without_expanding_it(tmp):
    """Twelve levels of nine aliases each (2.8e11 strings) are refused at once, not expanded."""
    started = time.perf_counter()
    error = _load(tmp, _bomb(12))
    assert time.perf_counter() - started < 5
    assert error.errors == [f"<job>: holds more than {MAX_VALUES} values (YAML aliases repeating anchors?): "
                            "a job file has settings and lists of files, not millions of values; write them out"]


@pytest.mark.parametrize("text, key", [
    ("a: &a [*a]\n", "a.0.0.0..."),
    ("input: &i {path: x, storage_options: {s: *i}}\noutput: {path: y}\n",
     "input.storage_options.s.storage_options..."),
])
def test_an_alias_inside_its_own_anchor_is_refused(tmp, text, key):
    error = _load(tmp, text)
    assert error.errors == [f"{key}: nests deeper than {MAX_DEPTH} levels (a YAML alias inside its own anchor?): "
                            "a job file is sections of settings; write them out"]


def test_a_self_referring_mapping_is_refused():
    job = copy.deepcopy(VALID[0])
    job["compute"]["batch"]["options"]["again"] = job
    with pytest.raises(ConfigError, match=r"compute\.batch\.options\.again\.\.\.: nests deeper than"):
        job_from_dict(job)


@pytest.mark.parametrize("text", ["[" * 2000, "- " * 2000 + "x\n"])
def test_nesting_deeper_than_the_parser_can_go_is_a_config_error(tmp, text):
    error = _load(tmp, text)
    assert error.errors == [f"invalid YAML: brackets or indents nest deeper than Python can read (more than "
                            f"{MAX_DEPTH} levels make no job)"]


def test_an_override_nesting_too_deep_is_a_config_error(tmp):
    error = _load(tmp, _dumped(VALID[1]), ["tiles.size=" + "[" * 2000])
    assert error.errors == ["override 'tiles.size=" + "[" * 2000 + "': the value nests deeper than Python can read"]
    error = _load(tmp, _dumped(VALID[1]), ["compute.batch.options.x=&a [*a]"])
    assert error.errors[0].startswith("compute.batch.options.x...: nests deeper than")
    assert error.errors[0].endswith("(from --set compute.batch.options.x=&a [*a] on the command line)")


def test_aliases_of_modest_size_still_load(tmp):
    """Anchors and aliases and merge keys are YAML a job may use: refused only past the limits."""
    text = ("input: {path: in.zarr}\noutput: {path: out.zarr}\n"
            "kernel: &k {size: 9}\ncompute: {batch: {options: {copies: [*k, *k, *k]}}}\n")
    job = _load(tmp, text)
    assert isinstance(job, JobConfig) and job.kernel.size == 9


def test_a_key_that_would_not_show_is_quoted():
    """An empty key, or one with spaces around it, is quoted in the line that names it."""
    with pytest.raises(ConfigError) as info:
        job_from_dict({"": 1, "input": {"path": "a", "path ": 2}, "output": {"path": "b"}})
    assert info.value.errors == [
        "input.'path ': unknown key (did you mean 'path'?); allowed keys: path, source, target, mask, group, "
        "storage_options, saturation, variance, weight, gain, read_noise",
        "'': unknown key; allowed keys: input, tiles, kernel, model, output, compute, ingest"]
