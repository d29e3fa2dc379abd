"""Job files: what to read, how to tile, which estimator, where to write, how to run.

A job file is YAML with these sections::

    input:   {path, source, target, mask, group, storage_options,
              saturation: {source, target, grow},
              variance: {target, source} or weight: {target, source},
              gain: {source, target}, read_noise: {source, target}}
    tiles:   {size, step}
    kernel:  {method, size, normalize, diagnostics, direction, <options of the method>}
    model:   {method, degree, max_degree, clip}
    output:  {path, mode, dtype, images_per_shard}
    compute: {scheduler, n_workers, threads_per_worker, processes,
              memory_limit, dashboard_address, block_tiles}
    ingest:  {reference or sources, targets, hdu, mask_hdu, mask_file, mask_bits,
              weight_hdu, weight_file, variance_hdu, variance_file,
              reference_noise, keys, tolerance, reproject, chunk}
             (optional: FITS files written to input.path first; the
              input section then reads their mask and variances)

Only ``input.path`` and ``output.path`` are required; :func:`dump_job` shows
every default.  A ``kernel`` section without ``method`` is the default method,
``lstsq``.  A section left empty (all its keys commented out) takes its
defaults.  Command-line overrides (``dotted.key=value``, the value parsed as
YAML) are applied on top of the file before validation, so they beat it.

Every problem of a job is reported at once in a :class:`ConfigError`, one
line per problem, each starting with the dotted key at fault.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import math
import os
import re
import typing
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, ClassVar, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Strict,
    Tag,
    TypeAdapter,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from ..core.estimate import DEFAULT_METHOD, REGISTRY
from ..core.options import MethodOptions, Option, option_fields
from ..core.penalties import PENALTY_TERMS
from ..core.validate import max_kernel_size, odd_size_problem
from ..errors import ConfigError
from ..io.paths import path_within, same_path

__all__ = [
    "ConfigError",
    "InputConfig",
    "SaturationConfig",
    "VarianceConfig",
    "WeightConfig",
    "GainConfig",
    "ReadNoiseConfig",
    "TilesConfig",
    "LstsqKernel",
    "WelchKernel",
    "RatioKernel",
    "KernelConfig",
    "ModelConfig",
    "OutputConfig",
    "AdaptConfig",
    "BatchConfig",
    "ComputeConfig",
    "JobConfig",
    "KERNEL_METHODS",
    "load_job",
    "job_from_dict",
    "apply_overrides",
    "dump_job",
]

#: Smallest allowed ``tiles.size``.
MIN_TILE_SIZE = 16
#: Names of the local schedulers accepted by ``compute.scheduler``.
LOCAL_SCHEDULERS = ("local", "threads", "synchronous")
#: Batch systems accepted by ``compute.scheduler`` (workers as batch jobs, through dask-jobqueue).
BATCH_SYSTEMS = ("slurm", "sge", "pbs", "lsf", "htcondor")

_SECTIONS = ("input", "tiles", "kernel", "model", "output", "compute")
_HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9._-]*):[0-9]{1,5}$")
_CHECKS = "kernelmap_checks"  # error type of the cross-field checks below


def _problems(*items: tuple[str, str]) -> PydanticCustomError:
    """One validation error carrying several ``(relative dotted key, message)`` problems."""
    text = "; ".join(f"{key}: {msg}" for key, msg in items)
    return PydanticCustomError(_CHECKS, "{text}", {"text": text, "problems": tuple(items)})


# ---------------------------------------------------------------------------
# value types: YAML already gives typed values, so numbers and flags are
# strict (no "21" -> 21, no true -> 1); names accept numbers (group: 2020).

Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]
Bool = Annotated[bool, Strict()]
Name = Annotated[str, Strict(False), Field(min_length=1)]
Text = Annotated[str, Strict(False)]
_NonNegative = Annotated[Float, Field(ge=0)]
_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, coerce_numbers_to_str=True)


def _level_forms(noun: str, units: str) -> str:
    return (f"a number (the {noun} in {units}), or the name of a per-image coordinate in the input store or "
            "of an attribute of the array")


_LEVEL_FORMS = _level_forms("level", "the images' stored units, after any scale_factor/add_offset")


def _fail(text: str) -> PydanticCustomError:
    return PydanticCustomError(_CHECKS, "{text}", {"text": text})


class _PerImage(BaseModel):
    """A number per image of the source and of the target: each a number, a coordinate name or an attribute name.

    A single number given for the whole section sets both.
    """

    model_config = _STRICT

    #: the job key, what the numbers are and in which units, for messages
    _key: ClassVar[str] = ""
    _noun: ClassVar[str] = "level"
    _forms: ClassVar[str] = _LEVEL_FORMS

    source: Float | Name | None = None
    target: Float | Name | None = None

    @model_validator(mode="before")
    @classmethod
    def _one_number(cls, value: Any) -> Any:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return {"source": value, "target": value}
        if isinstance(value, str):
            raise _fail(f"{_show(value)} is not a number or a mapping: a name is looked up for source and "
                        f"target separately, so give it per image, e.g. {cls._key}: {{target: {value}}}")
        return value

    @field_validator("source", "target", mode="before")
    @classmethod
    def _level(cls, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, (int, float)) and not isinstance(value, bool):  # never a name
            if not math.isfinite(value):
                raise _fail(f"{_show(value)} is not a finite number: give the {cls._noun}, or null for none")
            problem = cls._number_problem(float(value))
            if problem:
                raise _fail(f"{_show(value)} {problem}")
            return float(value)
        if isinstance(value, str):
            if not value.strip():
                raise _fail(f"must not be empty: give {cls._forms}, or null for none")
            try:
                float(value)
            except ValueError:
                return value
            raise _fail(f"{_show(value)} is quoted text, not a number: write the {cls._noun} without quotes")
        raise _fail(f"{_show(value)} is not {cls._forms}")

    @classmethod
    def _number_problem(cls, value: float) -> str | None:
        """What is wrong with a finite number given (``None``: nothing)."""
        return None

    @model_validator(mode="after")
    def _some_value(self) -> _PerImage:
        if self.source is None and self.target is None:
            raise _fail(f"no {self._noun} for the source or the target: give source and/or target (a number or a "
                        f"name), or remove input.{self._key}")
        return self

    def settings(self) -> dict[str, float | str]:
        """``{"target": value, "source": value}`` of the images given."""
        return {role: value for role in ("target", "source") if (value := getattr(self, role)) is not None}


class SaturationConfig(_PerImage):
    """Upper valid levels of the images: pixels at or above them are bad, widened by ``grow`` pixels.

    ``source`` and ``target`` are each a number, the name of a coordinate along
    ``image`` in the input store (one level per image), the name of an
    attribute of that array (e.g. ``SATURATE``), or null (no limit); see
    :mod:`pipeline.core.saturation`.  A single number given for the whole
    section sets both.
    """

    _key: ClassVar[str] = "saturation"

    grow: Annotated[Int, Field(ge=0)] = 1


class GainConfig(_PerImage):
    """Gains of the images in electrons per ADU (> 0): with them, an image's variances follow the CCD model.

    The variance of a pixel ``p`` (ADU) is ``max(p, 0) / gain + (read_noise /
    gain)**2`` ADU² (:func:`pipeline.core.noise.ccd_variance`), computed from
    the image's own pixels, which must not be sky-subtracted.  ``source`` and
    ``target`` are each a number, the name of a coordinate along ``image`` in
    the input store (e.g. ``GAIN`` from each FITS header), the name of an
    attribute of the array, or null (no CCD model for that image); a single
    number sets both.
    """

    _key: ClassVar[str] = "gain"
    _noun: ClassVar[str] = "gain"
    _forms: ClassVar[str] = _level_forms("gain", "electrons per ADU")

    @classmethod
    def _number_problem(cls, value: float) -> str | None:
        return None if value > 0 else "is not > 0: give the gain in electrons per ADU (the GAIN of a FITS header)"


class ReadNoiseConfig(_PerImage):
    """Read noises of the images in electrons RMS (>= 0), for the CCD model of :class:`GainConfig`.

    Only with a gain for the same image; an image with a gain and no read
    noise has read noise 0 (the Poisson term alone, like HOTPANTS' default).
    """

    _key: ClassVar[str] = "read_noise"
    _noun: ClassVar[str] = "read noise"
    _forms: ClassVar[str] = _level_forms("read noise", "electrons")

    @classmethod
    def _number_problem(cls, value: float) -> str | None:
        return None if value >= 0 else "is not >= 0: give the read noise in electrons RMS (the RDNOISE of a " \
                                       "FITS header; 0 for none)"


class VarianceConfig(BaseModel):
    """Arrays of the input store holding the per-pixel variances of the images.

    ``target`` is like the target ``(image, y, x)``; ``source`` like the
    source: ``(image, y, x)``, or ``(y, x)`` for a shared 2-D source.  Either
    may be null (not known).  A NaN or infinite variance marks that pixel bad
    in that image.  Method ``lstsq``'s robust pass judges its residuals
    against them instead of the noise model it fits per tile.
    """

    model_config = _STRICT

    #: kind of values the arrays hold, for messages: variances, or their inverses
    _key: ClassVar[str] = "variance"
    _values: ClassVar[str] = "variances"

    target: Name | None = None
    source: Name | None = None

    @model_validator(mode="before")
    @classmethod
    def _a_mapping(cls, value: Any) -> Any:
        if isinstance(value, str):
            raise PydanticCustomError(_CHECKS, "{text}", {
                "text": f"{_show(value)} is a name, not a mapping: say which image the array describes, "
                        f"e.g. {cls._key}: {{target: {value}}} (and source: for the source's {cls._values})"})
        return value

    @model_validator(mode="after")
    def _some_array(self) -> VarianceConfig:
        if self.target is None and self.source is None:
            raise PydanticCustomError(_CHECKS, "{text}", {
                "text": f"no array for the target or the source: give target and/or source (names of arrays "
                        f"of {self._values} in the input store), or remove input.{self._key}"})
        return self

    def arrays(self) -> dict[str, str]:
        """``{"target": name, "source": name}`` of the arrays given."""
        return {role: name for role in ("target", "source") if (name := getattr(self, role)) is not None}


class WeightConfig(VarianceConfig):
    """Arrays of the input store holding per-pixel weights: inverse variances (``variance = 1 / weight``).

    Weight maps as survey pipelines and SWarp write them; a weight of 0 (or
    NaN or inf) marks that pixel bad in that image.  Otherwise like
    :class:`VarianceConfig`.
    """

    _key: ClassVar[str] = "weight"
    _values: ClassVar[str] = "weights"


class InputConfig(BaseModel):
    """The input stack: a Zarr group with source, target and optional mask arrays."""

    model_config = _STRICT

    path: Name
    source: Name = "source"
    target: Name = "target"
    mask: Name | None = None
    group: Text | None = None
    storage_options: dict[str, Any] = {}
    #: upper valid levels of the images (null: none)
    saturation: SaturationConfig | None = None
    #: arrays of per-pixel variances of the target and the source (null: not known)
    variance: VarianceConfig | None = None
    #: or arrays of per-pixel weights, inverse variances (not both)
    weight: WeightConfig | None = None
    #: or, per image, the CCD model: gains in electrons per ADU (null: none) ...
    gain: GainConfig | None = None
    #: ... and read noises in electrons (null: 0)
    read_noise: ReadNoiseConfig | None = None

    @model_validator(mode="after")
    def _distinct_arrays(self) -> InputConfig:
        items = []
        if self.target == self.source:
            items.append(("target", f"{self.target!r} is also the source array"))
        if self.mask is not None and self.mask in (self.source, self.target):
            role = "source" if self.mask == self.source else "target"
            items.append(("mask", f"{self.mask!r} is also the {role} array"))
        if self.variance is not None and self.weight is not None:
            items.append(("weight", "input.variance is given too: give the per-pixel variances (variance) or "
                                    "their inverses (weight), not both; remove one of them"))
        images = {self.source: "source", self.target: "target"}
        if self.mask is not None:
            images[self.mask] = "mask"
        for section in (self.variance, self.weight):
            if section is None:
                continue
            for role, name in section.arrays().items():
                if name in images:
                    items.append((f"{section._key}.{role}", f"{name!r} is the {images[name]} array itself: give "
                                  f"the array holding the {role}'s {section._values}"))
        items += self._ccd_problems()
        if items:
            raise _problems(*items)
        return self

    def _ccd_problems(self) -> list[tuple[str, str]]:
        """Each image's variances from arrays or from its gain and read noise, and no read noise without gain."""
        items = []
        gains = {} if self.gain is None else self.gain.settings()
        noises = {} if self.read_noise is None else self.read_noise.settings()
        arrays = {} if self.noise() is None else self.noise()[1]
        kind = None if self.noise() is None else self.noise()[0]
        for role in ("target", "source"):
            if role in noises and role not in gains:
                items.append((f"read_noise.{role}", f"no gain for the {role}: the CCD model needs the gain "
                              "(electrons per ADU) to turn the read noise (electrons) into ADU; give "
                              f"input.gain.{role} too, or remove input.read_noise.{role}"))
            if role in arrays and (role in gains or role in noises):
                given = " and ".join(f"input.{key}.{role}" for key, values in (("gain", gains), ("read_noise", noises))
                                     if role in values)
                key = "gain" if role in gains else "read_noise"
                items.append((f"{key}.{role}", f"input.{kind}.{role} is given too: the {role}'s variances come "
                              f"from its {kind} array or from its gain and read noise; give one: remove "
                              f"input.{kind}.{role} or {given}"))
        return items

    def ccd(self) -> dict[str, tuple[float | str, float | str | None]]:
        """``{role: (gain, read_noise or None)}`` of the images whose variances follow the CCD model."""
        gains = {} if self.gain is None else self.gain.settings()
        noises = {} if self.read_noise is None else self.read_noise.settings()
        return {role: (gain, noises.get(role)) for role, gain in gains.items()}

    def noise(self) -> tuple[str, dict[str, str]] | None:
        """``("variance" or "weight", {role: array name})``, or ``None`` when neither is given."""
        for section in (self.variance, self.weight):
            if section is not None:
                return section._key, section.arrays()
        return None


class TilesConfig(BaseModel):
    """Tile geometry: square tiles of ``size`` pixels every ``step`` pixels."""

    model_config = _STRICT

    size: Annotated[Int, Field(ge=MIN_TILE_SIZE)] = 256
    step: Annotated[Int, Field(ge=1)] | None = None

    @model_validator(mode="after")
    def _default_step(self) -> TilesConfig:
        if self.step is None:
            self.step = self.size
        elif self.step > self.size:
            raise _problems(("step", f"{self.step} is larger than tiles.size {self.size}: at most "
                                     f"{self.size} (a smaller step gives overlapping tiles)"))
        return self


class _KernelBase(BaseModel):
    model_config = _STRICT

    method: str
    size: Int = 21
    normalize: Bool = False
    #: per-tile residual, noise and signal-to-noise (one more FFT convolution per
    #: tile); false leaves them NaN and saves about a third of a Welch job's time
    diagnostics: Bool = True
    #: which image each kernel blurs: ``forward`` (target = kernel * source + background), ``reverse``
    #: (source = kernel * target + background), ``auto`` (each image in the well-posed direction: that of
    #: the majority of its tiles, by which image is sharper)
    direction: Literal["auto", "forward", "reverse"] = "auto"

    @field_validator("size")
    @classmethod
    def _odd_size(cls, value: int) -> int:
        problem = odd_size_problem(value)
        if problem:
            raise PydanticCustomError(_CHECKS, "{text}", {"text": problem})
        return value

    def estimator_options(self) -> dict[str, Any]:
        """Method options for :func:`pipeline.estimate_kernels` (all but method, size, normalize, diagnostics,
        direction)."""
        return self.model_dump(exclude={"method", "size", "normalize", "diagnostics", "direction"})

    def options(self) -> MethodOptions:
        """The method's options object (:class:`pipeline.LstsqOptions`, ...) with this section's values."""
        return REGISTRY[self.method].options(**self.estimator_options())


# ---------------------------------------------------------------------------
# kernel sections, one per method of the core's registry: the keys, defaults,
# choices and bounds of a method's options marked ``in_job``


def _schema_type(spec: Option) -> Any:
    """The pydantic type of an option from its :class:`~pipeline.core.options.Option`."""
    if spec.kind is bool:
        return Bool
    if spec.kind is str:
        return Literal[spec.choices]
    bounds = {name: getattr(spec, name) for name in ("ge", "gt", "le", "lt") if getattr(spec, name) is not None}
    number = Int if spec.kind is int else Float
    if bounds:
        number = Annotated[number, Field(**bounds)]
    forms = [number, list[number]] if spec.per_term else [number]
    if spec.choices:
        forms.insert(0, Literal[spec.choices])
    return Union[tuple(forms)] if len(forms) > 1 else number  # noqa: UP007 - a union built at run time


def kernel_model(method: str, options: type[MethodOptions], base: type[_KernelBase] = _KernelBase,
                 doc: str | None = None) -> type[_KernelBase]:
    """The kernel section of ``method``: the common keys plus the options marked ``in_job``."""
    fields: dict[str, Any] = {"method": (Literal[method], method)}
    for f in option_fields(options):
        spec: Option = f.metadata["option"]
        if spec.in_job:
            fields[f.name] = (_schema_type(spec), f.default)
    name = f"{method.capitalize()}Kernel"
    return create_model(name, __base__=base, __doc__=doc, __module__=__name__, **fields)


class _LstsqChecks(_KernelBase):
    """Checks of the lstsq section beyond each key's type and bounds."""

    @field_validator("regularization", mode="wrap", check_fields=False)
    @classmethod
    def _one_message(cls, value: Any, handler: Any) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError(_CHECKS, "{text}", {
                "text": f"{_show(value)} is not 'auto', a number >= 0 or a list of numbers >= 0 "
                        "(one per penalty term)"}) from None

    @model_validator(mode="after")
    def _terms_match(self) -> _LstsqChecks:
        regularization, penalty = self.regularization, self.penalty
        if isinstance(regularization, list):
            n, m = len(regularization), PENALTY_TERMS[penalty]
            if n != m:
                raise _problems(("regularization", f"{_show(regularization)} has {n} value(s) but "
                                 f"penalty {penalty!r} has {m} term(s): give {m} numbers or one number"))
        return self


class _WelchChecks(_KernelBase):
    """Checks of the welch section beyond each key's type and bounds."""

    @model_validator(mode="after")
    def _segment_fits_kernel(self) -> _WelchChecks:
        segment_size = self.segment_size
        if segment_size < self.size:
            raise _problems(("segment_size", f"{segment_size} is smaller than kernel.size "
                                             f"{self.size}: at least {self.size}"))
        return self


LstsqKernel = kernel_model(
    "lstsq", REGISTRY["lstsq"].options, _LstsqChecks,
    "Exact regularised least squares (:func:`pipeline.core.lstsq.lstsq_kernels`).")
WelchKernel = kernel_model(
    "welch", REGISTRY["welch"].options, _WelchChecks,
    "Welch-averaged cross/auto spectra (:func:`pipeline.core.welch.welch_kernels`).")
RatioKernel = kernel_model(
    "ratio", REGISTRY["ratio"].options, _KernelBase,
    "The plain ``FFT(target) / FFT(source)`` baseline (no options).")

#: Method name -> kernel section model, in the order of the core's registry.
KERNEL_METHODS: dict[str, type[_KernelBase]] = {
    "lstsq": LstsqKernel, "welch": WelchKernel, "ratio": RatioKernel,
}
if tuple(KERNEL_METHODS) != tuple(REGISTRY):  # a method added to the core needs its section here
    raise RuntimeError(f"kernel sections {tuple(KERNEL_METHODS)} do not follow the registry {tuple(REGISTRY)}")


def _kernel_method(value: Any) -> str | None:
    """Discriminator: the ``method`` of a kernel section, ``lstsq`` when absent."""
    if isinstance(value, Mapping):
        method = value.get("method", DEFAULT_METHOD)
        return method if isinstance(method, str) else None
    return getattr(value, "method", DEFAULT_METHOD)  # non-mappings fail in the default method's model


KernelConfig = Annotated[
    Union[tuple(Annotated[model, Tag(name)] for name, model in KERNEL_METHODS.items())],  # noqa: UP007
    Discriminator(_kernel_method),
]
_KERNEL_ADAPTER: TypeAdapter[Any] = TypeAdapter(KernelConfig)


class ModelConfig(BaseModel):
    """The smooth model of the kernel field fitted to each image's tiles (see :mod:`pipeline.core.field`)."""

    model_config = _STRICT

    #: ``kernels``: fitted to the tiles' kernels (:mod:`pipeline.core.field`); ``joint``: fitted to the
    #: pixels of all tiles at once (:mod:`pipeline.core.joint`; ``kernel.method: lstsq`` without
    #: ``kernel.normalize`` only); null (the default): ``joint`` where the kernel section allows it,
    #: else ``kernels`` (the job then says which)
    method: Literal["kernels", "joint"] | None = None
    #: total polynomial degree in (y, x); null: chosen by leave-one-out cross-validation
    degree: Annotated[Int, Field(ge=0, le=8)] | None = None
    #: highest degree tried when ``degree`` is null
    max_degree: Annotated[Int, Field(ge=0, le=8)] = 3
    #: tiles farther from the model than this many robust standard deviations are rejected
    #: (``method: kernels``; the joint fit keeps every usable tile)
    clip: Annotated[Float, Field(gt=0)] | Annotated[Int, Field(gt=0)] = 4.0


#: Placeholders of the ``*_file`` templates of the ingest section, from each image file's path.
INGEST_FILE_FIELDS = ("dir", "name", "stem")
#: Names of the arrays an ingested stack holds beside ``source`` and ``target``.
INGEST_MASK = "mask"
INGEST_VARIANCES = {"target": "target_variance", "source": "source_variance"}

_Hdu = Annotated[Int, Field(ge=0)] | Name


class IngestConfig(BaseModel):
    """FITS files to write the input stack from before the run (``kernelmap ingest``): the stack goes to
    ``input.path`` (a local path), once; a later run finds it there and uses it, an interrupted one is
    finished.

    The images come as one ``reference`` (the source shared by every target) and ``targets``, or as pairs:
    ``sources`` and ``targets`` matched in order, one source per target (the stack's ``source`` is then
    ``(image, y, x)``, the first source's grid the stack's).

    Each image's planes come from HDUs of its own file (``*_hdu``) or of another file (``*_file``: a
    template of the image file's path with ``{dir}``, ``{name}`` and ``{stem}`` (the name without its FITS
    suffixes), e.g. ``"{dir}/{stem}.weight.fits"``, the plane then in its ``*_hdu`` or first image HDU).
    Weights are inverse variances (0: no data); the stack holds variances either way (``target_variance``,
    ``source_variance``; a weight of 0 an infinite variance, a bad pixel), and the job's ``input`` reads
    them, and the ``mask``, without being told.
    """

    model_config = _STRICT

    #: the reference (source) FITS file, shared by every target; or give ``sources``
    reference: Name | None = None
    #: pairs: a source FITS file per target (files or glob patterns, in order, as many files as the targets)
    sources: Annotated[list[Name], Field(min_length=1)] | None = None
    #: the target FITS files or glob patterns, in order
    targets: Annotated[list[Name], Field(min_length=1)]
    #: the image HDU: an index or a name
    hdu: _Hdu = 0
    #: the mask HDU (index or name; of ``mask_file`` where given) of the targets, and of the reference (or of
    #: each source) where it has one; nonzero (in ``mask_bits``) = bad
    mask_hdu: _Hdu | None = None
    #: masks in other files: a template of each image's path (``{dir}/{stem}.mask.fits``; the reference's
    #: where that file exists)
    mask_file: Name | None = None
    #: the bits of the mask that mark a bad pixel; null: any
    mask_bits: Annotated[Int, Field(ge=1)] | None = None
    #: the HDU of per-pixel weights (inverse variances; 0 = no data), of the image's file or ``weight_file``
    weight_hdu: _Hdu | None = None
    #: weights in other files: a template of the image's path (``{dir}/{stem}.weight.fits``)
    weight_file: Name | None = None
    #: the HDU of per-pixel variances (0, NaN or inf = no data), of the image's file or ``variance_file``
    variance_hdu: _Hdu | None = None
    #: variances in other files: a template of the image's path
    variance_file: Name | None = None
    #: whether the reference (or the sources) have weights or variances too (false: the sources' are not known)
    reference_noise: Bool = True
    #: header keys kept as coordinates along ``image``
    keys: list[Name] = []
    #: how far (pixels) a target's grid may lie from the reference's
    tolerance: Annotated[Float, Field(gt=0)] | Annotated[Int, Field(gt=0)] = 0.01
    #: targets off the reference's grid resampled onto it (``reproject``) instead of refused
    reproject: Bool = False
    #: side of the stack's stored chunks (one image per chunk along ``image``)
    chunk: Annotated[Int, Field(ge=16)] = 1024

    #: settings added after the first stacks were written: left out of :meth:`stamp` at their defaults, so
    #: that a stack ingested before still matches its ingest section
    _LATER: ClassVar[tuple[str, ...]] = ("mask_file", "weight_hdu", "weight_file", "variance_hdu", "variance_file",
                                         "reference_noise", "reproject", "chunk", "sources")

    @model_validator(mode="after")
    def _planes(self) -> IngestConfig:
        items = []
        if self.reference is not None and self.sources is not None:
            items.append(("sources", f"a reference ({self.reference}) is given too: give one reference, the source "
                                     "shared by every target, or sources, one per target, not both"))
        elif self.reference is None and self.sources is None:
            items.append(("reference", "no source is given: give the reference (one source shared by every "
                                       "target) or sources (one per target, matched in order)"))
        weights = self.weight_hdu is not None or self.weight_file is not None
        variances = self.variance_hdu is not None or self.variance_file is not None
        if weights and variances:
            items.append(("variance_hdu" if self.variance_hdu is not None else "variance_file",
                          "weights are given too: give the weights (inverse variances) or the variances, not both"))
        for key in ("mask_file", "weight_file", "variance_file"):
            template = getattr(self, key)
            if template is not None and (problem := _template_problem(template)):
                items.append((key, problem))
        if self.mask_bits is not None and not self.has_mask:
            items.append(("mask_bits", "no mask is read: give mask_hdu or mask_file too, or remove mask_bits"))
        if items:
            raise _problems(*items)
        return self

    @property
    def has_mask(self) -> bool:
        """Whether the targets' masks are read (the stack then holds ``mask``)."""
        return self.mask_hdu is not None or self.mask_file is not None

    @property
    def pairs(self) -> bool:
        """Whether each target has its own source (``sources``), not one shared reference."""
        return self.sources is not None

    @property
    def noise_kind(self) -> str | None:
        """``"weight"``, ``"variance"`` or ``None``: what the noise planes hold."""
        if self.weight_hdu is not None or self.weight_file is not None:
            return "weight"
        if self.variance_hdu is not None or self.variance_file is not None:
            return "variance"
        return None

    def variance_arrays(self) -> dict[str, str]:
        """``{role: array}`` of the variances the stack holds (empty without weights or variances)."""
        if self.noise_kind is None:
            return {}
        return {role: name for role, name in INGEST_VARIANCES.items() if role == "target" or self.reference_noise}

    def stamp(self) -> str:
        """The settings as canonical JSON: a stack records them (attribute ``kernelmap_ingest``), and is
        finished or reused only by the same settings."""
        settings = self.model_dump(mode="json")
        for key in self._LATER:
            if settings[key] == type(self).model_fields[key].default:
                del settings[key]
        if settings["reference"] is None:  # pairs
            del settings["reference"]
        return json.dumps(settings, sort_keys=True)

    @classmethod
    def from_options(cls, reference: Any, targets: Any, **options: Any) -> IngestConfig:
        """The settings from keyword options (those of the job file's ``ingest`` section), checked;
        ``reference`` ``None`` for pairs (``sources=[...]``).

        Raises
        ------
        ConfigError
            One line per problem, each starting ``ingest.<key>``.
        """
        data = {"targets": targets, **options}
        if reference is not None:
            data["reference"] = reference
        try:
            return _IngestOnly.model_validate({"ingest": data}).ingest
        except ValidationError as exc:
            raise ConfigError(_format_errors(exc)) from None


def _template_problem(template: str) -> str | None:
    """What is wrong with a ``*_file`` template (``None``: nothing)."""
    import string

    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        return f"{_show(template)} is not a template ({exc}): use {{dir}}, {{name}} or {{stem}}, e.g. " \
               "'{dir}/{stem}.weight.fits'"
    unknown = [name for name in fields if name not in INGEST_FILE_FIELDS]
    if unknown:
        return f"{_show(template)} names {{{unknown[0]}}}: the placeholders are {{dir}}, {{name}} and {{stem}}"
    return None


class _IngestOnly(BaseModel):
    """The ingest section alone, validated as in a job (its errors keyed ``ingest.<key>``)."""

    model_config = _STRICT

    ingest: IngestConfig


class OutputConfig(BaseModel):
    """The output store."""

    model_config = _STRICT

    path: Name
    mode: Literal["create", "resume", "overwrite"] = "create"
    dtype: Literal["float32", "float64"] = "float32"
    #: images to a file (Zarr shard) of every array along ``image``: null chooses by the images' size (shards
    #: of up to 16 MiB where 16 images fit); 1: no shards (each block's task writes its own chunks, so an
    #: interrupted run keeps every finished block); else a multiple of 16.  How the output is written, not
    #: what it holds: not in the fingerprint, and a resumed store keeps its own.
    images_per_shard: Annotated[Int, Field(ge=1)] | None = None

    @field_validator("images_per_shard")
    @classmethod
    def _whole_chunks(cls, value: int | None) -> int | None:
        if value is not None and value > 1 and value % 16:
            raise _fail(f"{value} is not 1 or a multiple of 16 (the images of a chunk of the per-image "
                        "variables): e.g. 256, or 1 for no shards, or null to choose by the images' size")
        return value


class AdaptConfig(BaseModel):
    """Adaptive scaling of batch worker jobs between two bounds (replaces jobs that end)."""

    model_config = _STRICT

    #: at least one: the run waits for a first worker before it submits any work
    minimum_jobs: Annotated[Int, Field(ge=1)] = 1
    maximum_jobs: Annotated[Int, Field(ge=1)] = 4

    @model_validator(mode="after")
    def _ordered(self) -> AdaptConfig:
        if self.minimum_jobs > self.maximum_jobs:
            raise _problems(("minimum_jobs", f"{self.minimum_jobs} is more than maximum_jobs "
                                             f"({self.maximum_jobs})"))
        return self


class BatchConfig(BaseModel):
    """Dask workers as jobs of a batch system, through dask-jobqueue.

    Settings left ``null`` are not passed: dask-jobqueue then takes them from
    the user's configuration (``~/.config/dask/jobqueue.yaml``).
    """

    model_config = _STRICT

    queue: Text | None = None
    account: Text | None = None
    walltime: Text | None = None
    cores: Annotated[Int, Field(ge=1)] | None = None
    memory: Text | None = None
    processes: Annotated[Int, Field(ge=1)] | None = None
    job_extra_directives: list[Text] | None = None
    job_script_prologue: list[Text] | None = None
    interface: Text | None = None
    python: Text | None = None
    local_directory: Text | None = None
    log_directory: Text | None = None
    #: a worker leaves gracefully after this long (e.g. "50m", shorter than walltime); with
    #: ``adapt`` a new job replaces it
    worker_lifetime: Text | None = None
    worker_lifetime_stagger: Text | None = None
    #: worker jobs to keep (``scale``); ignored when ``adapt`` is set
    jobs: Annotated[Int, Field(ge=1)] = 2
    adapt: AdaptConfig | None = None
    #: seconds to wait for the first worker job to start; null: as long as the queue takes
    start_timeout: Annotated[Float, Field(gt=0)] | Annotated[Int, Field(gt=0)] | None = None
    #: any other keyword argument of the dask-jobqueue cluster class, passed as is
    options: dict[str, Any] = {}

    @field_validator("walltime", "account", "queue", "memory", mode="before")
    @classmethod
    def _text_not_number(cls, value: Any) -> Any:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            raise PydanticCustomError(_CHECKS, "{text}", {
                "text": f"{value!r} is a number, not text (YAML reads 2:00:00 as 7200 and 0123 as 83): "
                        "quote it, e.g. walltime: '02:00:00'"})
        return value


class ComputeConfig(BaseModel):
    """Where and how the job runs."""

    model_config = _STRICT

    scheduler: Name = "local"
    n_workers: Annotated[Int, Field(ge=1)] = 2
    threads_per_worker: Annotated[Int, Field(ge=1)] = 1
    processes: Bool = True
    memory_limit: Text | None = "auto"
    dashboard_address: Text | None = ":0"
    block_tiles: Annotated[Int, Field(ge=1)] | None = None
    batch: BatchConfig = BatchConfig()

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, value: str) -> str:
        if _scheduler_kind(value) is None:
            raise PydanticCustomError(_CHECKS, "{text}", {
                "text": f"{value!r} is not a scheduler: use 'local' (a local cluster), 'threads' or "
                        f"'synchronous' (no cluster), a batch system ({', '.join(BATCH_SYSTEMS)}), or "
                        "the address of a running scheduler ('tcp://host:8786' or 'host:8786')"})
        return value

    @property
    def scheduler_kind(self) -> Literal["local", "threads", "synchronous", "address", "batch"]:
        """``"local"``, ``"threads"``, ``"synchronous"``, ``"batch"`` or ``"address"`` (a running scheduler)."""
        return _scheduler_kind(self.scheduler)  # type: ignore[return-value]


def _scheduler_kind(value: str) -> str | None:
    if value in LOCAL_SCHEDULERS:
        return value
    if value in BATCH_SYSTEMS:
        return "batch"
    scheme, sep, rest = value.partition("://")
    if (sep and scheme and rest) or _HOST_PORT.match(value):
        return "address"
    return None


class JobConfig(BaseModel):
    """A whole job: input, tiles, kernel, output and compute sections."""

    model_config = _STRICT

    input: InputConfig
    tiles: TilesConfig = TilesConfig()
    kernel: KernelConfig = LstsqKernel()
    model: ModelConfig = ModelConfig()
    output: OutputConfig
    compute: ComputeConfig = ComputeConfig()
    ingest: IngestConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _empty_sections(cls, data: Any) -> Any:
        return _fill_empty_sections(data)

    @model_validator(mode="after")
    def _consistent(self) -> JobConfig:
        if self.model.method is None:
            self.model.method = default_model_method(self.kernel)
        items = (_consistency(self.tiles, self.kernel) + _paths_differ(self.input, self.output)
                 + _model_fits(self.model, self.kernel))
        if self.ingest is not None and "://" in self.input.path:
            items.append(("ingest", f"writes the input stack to input.path, a local path: "
                                    f"{self.input.path!r} is a URL (ingest first, then copy the stack)"))
        if self.ingest is not None:
            items += _ingested_arrays(self.input, self.ingest)
        if items:
            raise _problems(*items)
        return self

    def result_settings(self) -> dict[str, Any]:
        """The settings that change the result (:meth:`fingerprint`), by section."""
        data = self.model_dump(mode="json")
        data["input"].pop("storage_options")
        return {"input": data["input"], "tiles": data["tiles"], "kernel": data["kernel"], "model": data["model"],
                "output": {"dtype": data["output"]["dtype"]}}

    def fingerprint(self) -> str:
        """SHA-256 (hex) of everything that changes the result.

        That is the input (except ``storage_options``; with ``saturation``,
        ``variance``, ``weight``, ``gain`` and ``read_noise`` when set), the tiles, the kernel and model sections and
        ``output.dtype``; not where the output goes, how it is written, or how
        the job is computed.
        """
        canonical = self.result_settings()
        for key in ("saturation", "variance", "weight", "gain", "read_noise"):
            if canonical["input"][key] is None:  # the fingerprint of a job without it, as before it existed
                del canonical["input"][key]
        if canonical["model"]["method"] == "kernels":  # likewise
            del canonical["model"]["method"]
        text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _ingested_arrays(inputs: InputConfig, ingest: IngestConfig) -> list[tuple[str, str]]:
    """The input section reads the arrays the ingest section writes: its mask and variances, set here where
    the input section leaves them out; problems where it names others."""
    items = []
    for key, name in (("source", "source"), ("target", "target")):
        if getattr(inputs, key) != name:
            items.append((f"input.{key}", f"{getattr(inputs, key)!r}: the ingest section writes the {key} as "
                                          f"{name!r}: remove input.{key}"))
    if ingest.has_mask:
        if inputs.mask is None:
            inputs.mask = INGEST_MASK
        elif inputs.mask != INGEST_MASK:
            items.append(("input.mask", f"{inputs.mask!r}: the ingest section writes the targets' mask as "
                                        f"{INGEST_MASK!r}: remove input.mask"))
    arrays = ingest.variance_arrays()
    if not arrays:
        return items
    ccd = inputs.ccd()
    if inputs.weight is not None:
        items.append(("input.weight", f"the ingest section writes variances ({', '.join(arrays.values())}), not "
                                      "weights: remove input.weight (input.variance follows the ingest section)"))
    elif inputs.variance is None:
        for role in arrays:
            if role in ccd:
                key = "gain" if inputs.gain is not None and role in inputs.gain.settings() else "read_noise"
                items.append((f"input.{key}.{role}", f"the ingest section writes the {role}'s variances "
                              f"({arrays[role]}): remove input.{key}.{role}, or the ingest section's weights or "
                              "variances"))
        if not items:
            inputs.variance = VarianceConfig(**arrays)
    elif inputs.variance.arrays() != arrays:
        items.append(("input.variance", f"{inputs.variance.arrays()}: the ingest section writes the variances "
                                        f"{arrays}: remove input.variance"))
    return items


def _fill_empty_sections(data: Any) -> Any:
    """A section given as ``null`` (all its keys commented out) means an empty one."""
    if isinstance(data, Mapping) and any(data.get(s, {}) is None for s in _SECTIONS):
        data = {k: ({} if k in _SECTIONS and v is None else v) for k, v in data.items()}
    return data


def _consistency(tiles: TilesConfig, kernel: _KernelBase) -> list[tuple[str, str]]:
    """Checks between the tiles and the kernel sections."""
    items = []
    largest = max_kernel_size((tiles.size, tiles.size))
    if kernel.size > largest:
        items.append(("kernel.size", f"{kernel.size} is too large for tiles.size {tiles.size}: "
                                     f"at most {largest}"))
    if isinstance(kernel, WelchKernel) and kernel.segment_size > tiles.size:
        items.append(("kernel.segment_size", f"{kernel.segment_size} is larger than tiles.size "
                                             f"{tiles.size}: at most {tiles.size}"))
    return items


def setting_differences(stored: str | None, job: JobConfig) -> list[str]:
    """How ``job``'s settings that change the result differ from those of the job a store's
    ``kernelmap_config`` holds: ``"model.method: kernels in the store, joint here"``, ...  Empty where
    the stored job cannot be read (written by another version)."""
    try:
        data = yaml.safe_load(stored) if stored else None
        if not isinstance(data, dict):
            return []
        model = data.setdefault("model", {}) or {}
        model.setdefault("method", "kernels")  # stores from before model.method: the tile-kernel model
        data["model"] = model
        old = JobConfig.model_validate(data).result_settings()
    except (yaml.YAMLError, ValidationError, ConfigError, TypeError, ValueError):
        return []

    def flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
        return out

    before, now = flat(old), flat(job.result_settings())
    return [f"{key}: {json.dumps(before.get(key))} in the store, {json.dumps(now.get(key))} here"
            for key in sorted(set(before) | set(now)) if before.get(key) != now.get(key)]


def default_model_method(kernel: _KernelBase) -> str:
    """The model a job gets without ``model.method``: ``joint`` (closer to the truth) where the kernel
    section allows it (``lstsq`` without ``normalize``), else ``kernels``."""
    return "joint" if kernel.method == "lstsq" and not kernel.normalize else "kernels"


def _model_fits(model: ModelConfig, kernel: _KernelBase) -> list[tuple[str, str]]:
    """Checks between the model and the kernel sections."""
    if model.method != "joint":
        return []
    items = []
    if kernel.method != "lstsq":
        items.append(("model.method", f"joint needs kernel.method: lstsq (it pools the exact solver's normal "
                                      f"equations), not {kernel.method}; with {kernel.method} use "
                                      "model.method: kernels"))
    if kernel.normalize:
        items.append(("model.method", "joint fits the kernels' flux with their shape: it cannot be combined "
                                      "with kernel.normalize: true; use model.method: kernels, or normalise "
                                      "the model's kernels when you evaluate them"))
    return items


def _paths_differ(inp: InputConfig, out: OutputConfig) -> list[tuple[str, str]]:
    if same_path(inp.path, out.path):
        return [("output.path", f"{out.path!r} is the input store (input.path): the output "
                                "must go to another store")]
    if path_within(inp.path, out.path):
        return [("output.path", f"{out.path!r} holds the input store (input.path {inp.path!r}): the output "
                                "must go elsewhere (replacing it would delete the input)")]
    if path_within(out.path, inp.path):
        return [("output.path", f"{out.path!r} lies inside the input store (input.path {inp.path!r}), which "
                                "is never written: the output must go elsewhere")]
    return []


# ---------------------------------------------------------------------------
# error messages


def _show(value: Any) -> str:
    """A value as the user wrote it, short."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, str):
        return repr(value) if len(value) <= 60 else repr(value[:57] + "...")
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        text = "[" + ", ".join(_show(v) for v in value[:6]) + (", ..." if len(value) > 6 else "") + "]"
        return text
    return repr(value)


def _bound(value: Any) -> str:
    """A numeric limit: ``0`` rather than ``0.0``."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _literal_choices(model: type[BaseModel] | None, field: Any) -> list[str] | None:
    if model is None or not isinstance(field, str) or field not in model.model_fields:
        return None

    def walk(tp: Any) -> list[str]:
        if typing.get_origin(tp) is Literal:
            return [str(a) for a in typing.get_args(tp)]
        return [c for arg in typing.get_args(tp) for c in walk(arg)]

    return walk(model.model_fields[field].annotation) or None


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The model of a key holding a section (``Model`` or ``Model | None``), else ``None``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    models = [a for a in typing.get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
    return models[0] if len(models) == 1 else None


def _locate(loc: tuple[Any, ...]) -> tuple[list[str], type[BaseModel] | None]:
    """Dotted path (without union tags) and the model holding its last key."""
    parts: list[str] = []
    model: type[BaseModel] | None = JobConfig
    holder: type[BaseModel] | None = None
    i = 0
    while i < len(loc):
        seg = loc[i]
        holder = model
        parts.append(str(seg))
        if model is not None and isinstance(seg, str) and seg in model.model_fields:
            if model is JobConfig and seg == "kernel":
                tag = loc[i + 1] if i + 1 < len(loc) else None
                if tag in KERNEL_METHODS:
                    model = KERNEL_METHODS[tag]
                    i += 2
                    continue
                model = None
            else:
                model = _section_model(model.model_fields[seg].annotation)
        else:
            model = None
        i += 1
    return parts, holder


_TYPE_NAMES = {
    "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
    "float_type": "a number", "float_parsing": "a number", "bool_type": "a boolean (true or false)",
    "bool_parsing": "a boolean (true or false)", "string_type": "a string", "list_type": "a list",
    "dict_type": "a mapping", "model_type": "a mapping", "model_attributes_type": "a mapping",
}


def _key_text(key: str) -> str:
    """A key of a dotted path as written, quoted where it would not show (empty, or with spaces around it)."""
    return key if key and key == key.strip() else repr(key)


def _format_errors(exc: ValidationError) -> list[str]:
    lines = []
    for err in exc.errors(include_url=False):
        parts, holder = _locate(tuple(err["loc"]))
        path = ".".join(map(_key_text, parts))
        kind, value, ctx = err["type"], err.get("input"), err.get("ctx") or {}
        if kind == _CHECKS:
            problems = ctx.get("problems")
            if problems is None:
                lines.append(f"{path or '<job>'}: {ctx['text']}")
            for key, msg in problems or ():
                lines.append(f"{'.'.join([*map(_key_text, parts), key])}: {msg}")
            continue
        if kind in ("union_tag_invalid", "union_tag_not_found"):
            method = value.get("method") if isinstance(value, Mapping) else value
            lines.append(f"{path}.method: {_not_one_of(method, list(KERNEL_METHODS))}")
            continue
        lines.append(f"{path or '<job>'}: {_message(kind, value, ctx, err['msg'], holder, parts)}")
    return lines


def _not_one_of(value: Any, choices: list[str]) -> str:
    """``'welsh' is not one of lstsq, welch, ratio (did you mean 'welch'?)``: the choices, and the closest."""
    close = difflib.get_close_matches(value, choices, n=1, cutoff=0.75) if isinstance(value, str) else []
    guess = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{_show(value)} is not one of {', '.join(choices)}{guess}"


def _message(kind: str, value: Any, ctx: Mapping[str, Any], default: str,
             holder: type[BaseModel] | None, parts: list[str]) -> str:
    if kind == "missing":
        return "required"
    if kind == "extra_forbidden":
        allowed = ", ".join(holder.model_fields) if holder is not None else "?"
        close = (difflib.get_close_matches(parts[-1], list(holder.model_fields), n=1, cutoff=0.75)
                 if holder is not None and parts else [])
        guess = f" (did you mean {close[0]!r}?)" if close else ""
        if holder is not None and issubclass(holder, _KernelBase):
            method = holder.model_fields["method"].default
            msg = f"unknown key for method {method!r}{guess}; allowed keys: {allowed}"
            owners = [m for m, cls in KERNEL_METHODS.items() if m != method and parts[-1] in cls.model_fields]
            if owners:
                msg += f" ({parts[-1]!r} is an option of method {' and '.join(map(repr, owners))})"
            return msg
        return f"unknown key{guess}; allowed keys: {allowed}"
    if kind == "literal_error":
        choices = _literal_choices(holder, parts[-1] if parts else None)
        if choices:
            return _not_one_of(value, choices)
        return f"{_show(value)}: {default.lower()}"
    if kind in _TYPE_NAMES:
        return f"{_show(value)} is not {_TYPE_NAMES[kind]}"
    if kind == "finite_number":
        return f"{_show(value)} is not a finite number"
    if kind == "greater_than_equal":
        return f"{_show(value)} is too small: at least {_bound(ctx['ge'])}"
    if kind == "greater_than":
        return f"{_show(value)} is too small: must be greater than {_bound(ctx['gt'])}"
    if kind == "less_than_equal":
        return f"{_show(value)} is too large: at most {_bound(ctx['le'])}"
    if kind == "less_than":
        return f"{_show(value)} is too large: must be less than {_bound(ctx['lt'])}"
    if kind == "string_too_short":
        return "must not be empty"
    return f"{default} (got {_show(value)})"


# ---------------------------------------------------------------------------
# building jobs


def _plain(data: Any) -> Any:
    """Deep copy with every mapping as a ``dict``."""
    if isinstance(data, Mapping):
        return {k: _plain(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_plain(v) for v in data]
    return copy.deepcopy(data)


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with ``dotted.key=value`` overrides applied in order.

    Parameters
    ----------
    data
        The job as read from the file (not modified).
    overrides
        ``"tiles.size=512"``, ``"kernel.regularization=[0.1, 1]"``, ...; the
        value is parsed as YAML like the job file (``yaml.safe_load``, plus
        exponent floats such as ``1e-3``; an empty value is ``null``).
        Missing intermediate sections are created; later overrides win.

    Raises
    ------
    ConfigError
        Naming every malformed override (no ``=``, an empty key or key part,
        a value that is not YAML, a path through a value that is not a mapping).
    """
    if not isinstance(data, Mapping):
        raise ConfigError([f"the job must be a mapping of sections, got {type(data).__name__}"])
    if isinstance(overrides, str):
        overrides = [overrides]
    result = _plain(data)
    problems = []
    for item in overrides:
        key, sep, text = str(item).partition("=")
        key = key.strip()
        keys = key.split(".")
        if not sep:
            problems.append(f"override {item!r}: expected dotted.key=value, e.g. tiles.size=512")
            continue
        if not key or not all(k.strip() for k in keys):
            problems.append(f"override {item!r}: empty key{' part' if key else ''}; "
                            "expected dotted.key=value, e.g. tiles.size=512")
            continue
        keys = [k.strip() for k in keys]
        try:
            value = _parse_value(text)
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            problems.append(f"override {item!r}: the value is not valid YAML ({problem})")
            continue
        except RecursionError:
            problems.append(f"override {item!r}: the value nests deeper than Python can read")
            continue
        node = result
        for depth, k in enumerate(keys[:-1]):
            child = node.get(k)
            if child is None:
                child = node[k] = {}
            elif not isinstance(child, dict):
                where = ".".join(keys[: depth + 1])
                problems.append(f"override {item!r}: {where} is {_show(child)}, not a mapping")
                break
            node = child
        else:
            node[keys[-1]] = value
    if problems:
        raise ConfigError(problems)
    return result


def job_from_dict(data: Mapping[str, Any], overrides: Sequence[str] = ()) -> JobConfig:
    """Validate a job given as a mapping (after applying ``overrides``).

    Raises
    ------
    ConfigError
        With every problem found, one line each.
    """
    return _build(data, overrides, None)


def _build(data: Any, overrides: Sequence[str], source: str | None) -> JobConfig:
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError([f"the top level must be a mapping of sections ({', '.join(_SECTIONS)}), "
                           f"got {_show(data) if isinstance(data, (list, str)) else type(data).__name__}"],
                          source=source)
    if problem := _size_problem(data):  # before any copy: a YAML bomb or a self-referring alias
        raise ConfigError([problem], source=source)
    try:
        merged = apply_overrides(data, overrides)
    except ConfigError as exc:
        raise ConfigError(exc.errors, source=source) from None
    if problem := _size_problem(merged):
        raise ConfigError(_with_origins([problem], overrides), source=source)
    try:
        return JobConfig.model_validate(merged)
    except ValidationError as exc:
        lines = _format_errors(exc)
        lines += _partial_consistency(merged, exc)
        raise ConfigError(_with_origins(lines, overrides), source=source) from None


#: Most values (mappings, lists and scalars, each alias counted where it is used) and deepest nesting a
#: job may have: a job file has a few dozen settings, a few levels deep, and perhaps long lists of files.
MAX_VALUES, MAX_DEPTH = 1_000_000, 32


def _size_problem(data: Any) -> str | None:
    """What makes ``data`` too large or too deep to be a job (aliases repeating anchors, an alias inside
    its own anchor), as a ``"dotted.key: message"`` line; ``None`` when nothing does.  Walks at most
    :data:`MAX_VALUES` values, without recursion."""
    stack: list[tuple[Any, tuple[str, ...]]] = [(data, ())]
    count = 0
    while stack:
        value, path = stack.pop()
        count += 1
        if count > MAX_VALUES:
            return (f"<job>: holds more than {MAX_VALUES} values (YAML aliases repeating anchors?): "
                    "a job file has settings and lists of files, not millions of values; write them out")
        if len(path) > MAX_DEPTH:
            return (f"{'.'.join(path[:4])}...: nests deeper than {MAX_DEPTH} levels (a YAML alias inside "
                    "its own anchor?): a job file is sections of settings; write them out")
        if isinstance(value, Mapping):
            stack.extend((v, (*path, str(k))) for k, v in value.items())
        elif isinstance(value, (list, tuple)):
            stack.extend((v, (*path, str(i))) for i, v in enumerate(value))
    return None


def _with_origins(lines: list[str], overrides: Sequence[str]) -> list[str]:
    """``lines`` (``"dotted.key: message"``), each about a key set by an override marked with it: ``(from
    --set tiles.size=8 on the command line)``.

    An override is named on the lines of its key and of the keys beneath it, and on those whose message
    names its key (``kernel.size: 21 is too large for tiles.size 32``); one replaced by a later override
    of the same key or of a section above it is not.
    """
    if isinstance(overrides, str):
        overrides = [overrides]
    items = [(str(item), ".".join(k.strip() for k in str(item).partition("=")[0].split("."))) for item in overrides]
    effective = [(item, key) for i, (item, key) in enumerate(items)
                 if not any(key == later or key.startswith(later + ".") for _, later in items[i + 1:])]
    marked = []
    for line in lines:
        path, _, message = line.partition(": ")
        origins = [f"--set {item}" for item, key in effective
                   if path == key or path.startswith(key + ".")
                   or re.search(rf"(?<![\w.]){re.escape(key)}(?![\w.])", message)]
        marked.append(f"{line} (from {' and '.join(origins)} on the command line)" if origins else line)
    return marked


def _partial_consistency(data: dict[str, Any], exc: ValidationError) -> list[str]:
    """The tiles/kernel checks, when those sections are valid but others are not."""
    if any(not err["loc"] or err["loc"][0] in ("tiles", "kernel") for err in exc.errors()):
        return []
    data = _fill_empty_sections(data)
    try:
        tiles = TilesConfig.model_validate(data.get("tiles", {}))
        kernel = _KERNEL_ADAPTER.validate_python(data.get("kernel", {}))
    except ValidationError:
        return []
    return [f"{key}: {msg}" for key, msg in _consistency(tiles, kernel)]


class _JobLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue
            key = self.construct_object(key_node)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"duplicate key {key!r} (first given on line {seen[key] + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


# YAML 1.1 reads 1e-3 and 1.0e3 as strings; job files mean numbers (as YAML 1.2 does).
_JobLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _parse_value(text: str) -> Any:
    """An override's value: YAML, read like the job file."""
    return yaml.load(text, Loader=_JobLoader)  # a SafeLoader subclass


def load_job(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> JobConfig:
    """Read, override and validate a YAML job file.

    Parameters
    ----------
    path
        The job file.  Relative paths inside it are kept as written (they are
        resolved against the working directory when used).
    overrides
        ``dotted.key=value`` settings that beat the file, see
        :func:`apply_overrides`.

    Raises
    ------
    ConfigError
        The file is missing or not YAML (with the line), or the job is invalid
        (every problem at once).
    """
    name = os.fspath(path)
    try:
        with open(name, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise ConfigError([f"job file {name!r} does not exist"]) from None
    except IsADirectoryError:
        raise ConfigError([f"job file {name!r} is a directory, not a file"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"job file {name!r} is not UTF-8 text ({exc.reason} at byte {exc.start})"]
                          ) from None
    except OSError as exc:
        raise ConfigError([f"job file {name!r} cannot be read: {exc.strerror or exc}"]) from None
    try:
        data = yaml.load(text, Loader=_JobLoader)  # a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = exc.problem or exc.context or "syntax error"
        raise ConfigError([f"{where}invalid YAML: {problem}"], source=name) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"invalid YAML: {exc}"], source=name) from None
    except RecursionError:
        raise ConfigError([f"invalid YAML: brackets or indents nest deeper than Python can read (more than "
                           f"{MAX_DEPTH} levels make no job)"], source=name) from None
    return _build(data, overrides, name)


#: what a stored job holds instead of each value of ``input.storage_options`` (credentials, endpoints)
NOT_STORED = "(not stored)"


def dump_job(job: JobConfig, *, secrets: bool = True) -> str:
    """The effective job as YAML: every default filled in, sections and keys in model order; with
    ``secrets=False`` (what a store's attributes keep) each value of ``input.storage_options`` is
    :data:`NOT_STORED`."""
    data = job.model_dump(mode="json")
    if not secrets:
        data["input"]["storage_options"] = {key: NOT_STORED for key in data["input"]["storage_options"]}
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)
