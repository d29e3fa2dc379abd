"""The options of each estimator method: typed, documented, validated, written once.

Every method has a frozen, keyword-only dataclass of options
(:class:`LstsqOptions`, :class:`WelchOptions`, :class:`RatioOptions`).  Each
field carries its default, and in its metadata an :class:`Option` that
documents it and states what values it takes (kind, named choices, bounds)
and whether job files expose it (``in_job``).  The dataclass validates
itself from these; the job schema (:mod:`pipeline.job.config`) derives its
``kernel`` sections from them.

What only changes how the work is run, not the result (the kernel size, the
number of threads, the tiles solved together), is an argument of the
estimator functions, not an option.
"""

from __future__ import annotations

import inspect
import math
import numbers
import textwrap
from dataclasses import Field, dataclass, field, fields, replace
from typing import Any, ClassVar, TypeVar

import numpy as np

from ..errors import OptionError
from .penalties import PENALTIES, PENALTY_TERMS, check_penalty

__all__ = [
    "Option",
    "MethodOptions",
    "LstsqOptions",
    "WelchOptions",
    "RatioOptions",
    "WINDOWS",
    "option_fields",
    "option_summary",
    "parse_window",
]

#: Taper names of :class:`WelchOptions` ``window`` (the job files' choices).
WINDOWS = ("auto", "hann", "sine", "tukey", "none")
#: Other spellings :func:`parse_window` accepts.
_WINDOW_ALIASES = {"hanning": "hann", "cosine": "sine", "boxcar": "none", "rectangular": "none"}


@dataclass(frozen=True)
class Option:
    """What one option means and which values it takes (a dataclass field's metadata).

    ``kind`` is ``bool``, ``int``, ``float`` or ``str``; ``choices`` are the
    names a ``str`` option (or a number option that also takes names, such
    as ``regularization="auto"``) accepts; ``ge``/``gt``/``le``/``lt``
    bound a number.  ``per_term``: a number option that also takes one
    number per lstsq penalty term.  ``in_job``: a key of the job file's
    ``kernel`` section.
    """

    doc: str
    kind: type
    choices: tuple[str, ...] = ()
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    per_term: bool = False
    in_job: bool = False

    def requirement(self) -> str:
        """The accepted values in words, e.g. ``"a number >= 0"``."""
        if self.kind is bool:
            return "True or False"
        if self.kind is str:
            return f"one of {', '.join(self.choices)}"
        noun = "an integer" if self.kind is int else "a number"
        bounds = [f"{op} {_bound(v)}" for op, v in ((">=", self.ge), (">", self.gt),
                                                     ("<=", self.le), ("<", self.lt)) if v is not None]
        text = f"{noun} {' and '.join(bounds)}".strip()
        if self.per_term:
            text = f"{text} (or one such number per penalty term)"
        if self.choices:
            text = f"{' or '.join(map(repr, self.choices))} or {text}"
        return text

    def accepts_number(self, value: object) -> bool:
        """Whether ``value`` is a number of this option's kind within its bounds."""
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return False
        if self.kind is int and not isinstance(value, numbers.Integral):
            return False
        number = float(value)
        return (
            math.isfinite(number)
            and (self.ge is None or number >= self.ge)
            and (self.gt is None or number > self.gt)
            and (self.le is None or number <= self.le)
            and (self.lt is None or number < self.lt)
        )


def _bound(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _option(default: Any, doc: str, kind: type, **spec: Any) -> Any:
    """A dataclass field with its default and its :class:`Option` metadata."""
    return field(default=default, metadata={"option": Option(doc, kind, **spec)})


def _document(cls: type[_Options]) -> type[_Options]:
    """Append each option, its default and its meaning to the class docstring (for ``help``)."""
    items = []
    for f in option_fields(cls):
        spec: Option = f.metadata["option"]
        where = "" if spec.in_job else " Not a job-file key."
        text = f"{spec.doc} Takes {spec.requirement()}.{where}"
        items.append(f"{f.name} = {f.default!r}\n" + textwrap.fill(text, 80, initial_indent="    ",
                                                                   subsequent_indent="    "))
    if items:
        cls.__doc__ = inspect.cleandoc(cls.__doc__ or "") + "\n\nOptions\n-------\n" + "\n".join(items) + "\n"
    return cls


def option_summary(cls: type[MethodOptions]) -> str:
    """``name=default, ...`` of an options class (``"no options"`` when it has none)."""
    return ", ".join(f"{f.name}={f.default!r}" for f in option_fields(cls)) or "no options"


def option_fields(cls: type[MethodOptions] | MethodOptions) -> tuple[Field, ...]:
    """The option fields of an options class, in order."""
    return tuple(f for f in fields(cls) if "option" in f.metadata)


_Options = TypeVar("_Options", bound="MethodOptions")


@dataclass(frozen=True, kw_only=True)
class MethodOptions:
    """Base of the option classes: validation from the fields' :class:`Option` metadata."""

    #: The method these options belong to.
    method: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for f in option_fields(self):
            self._check(f.name, f.metadata["option"], getattr(self, f.name))

    def _check(self, name: str, spec: Option, value: Any) -> None:
        """Raise an :class:`OptionError` unless ``value`` is valid for option ``name``."""
        if spec.kind is bool:
            ok = isinstance(value, (bool, np.bool_))
        elif spec.kind is str:
            ok = isinstance(value, str) and value in spec.choices
            if not ok:
                raise OptionError(f"{name}={value!r} is not known; choose one of {', '.join(spec.choices)}")
        else:
            ok = (isinstance(value, str) and value in spec.choices) or spec.accepts_number(value)
        if not ok:
            raise OptionError(f"{name} must be {spec.requirement()}, got {value!r}")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The option names, in order."""
        return tuple(f.name for f in option_fields(cls))

    @classmethod
    def resolve(cls: type[_Options], options: MethodOptions | None = None,
                keywords: dict[str, Any] | None = None) -> _Options:
        """An instance from an options object and/or keyword options (keywords win).

        Raises :class:`OptionError` for options of another method or unknown
        keywords, naming the allowed ones.
        """
        keywords = keywords or {}
        if options is not None and not isinstance(options, cls):
            given = type(options).__name__
            raise OptionError(
                f"options={given}(...) does not fit method={cls.method!r}: pass {cls.__name__}(...) "
                f"or method={getattr(options, 'method', '?')!r}"
            )
        unknown = sorted(set(keywords) - set(cls.names()))
        if unknown:
            allowed = ", ".join(cls.names()) or f"none (method {cls.method!r} has no options)"
            raise OptionError(
                f"unknown option(s) {', '.join(unknown)} for method={cls.method!r}; allowed: {allowed}"
            )
        if options is None:
            return cls(**keywords)
        return replace(options, **keywords) if keywords else options

    def as_dict(self) -> dict[str, Any]:
        """The options by name."""
        return {f.name: getattr(self, f.name) for f in option_fields(self)}


@_document
@dataclass(frozen=True, kw_only=True)
class LstsqOptions(MethodOptions):
    """Options of the exact least-squares method ``"lstsq"`` (:mod:`pipeline.core.lstsq`)."""

    method: ClassVar[str] = "lstsq"

    regularization: float | str | tuple[float, ...] | list[float] = _option(
        "auto",
        "``\"auto\"`` (the strengths that maximise the Bayesian evidence), a fixed "
        "dimensionless ``lam >= 0`` for every penalty term, or one ``lam`` per term "
        "(as many as the penalty has terms: 2 for the compact penalties).",
        float, choices=("auto",), ge=0, per_term=True, in_job=True)
    penalty: str = _option(
        "compact",
        "Penalty of the kernel: ``\"compact\"``, ``\"wings\"``, ``\"laplacian\"`` or "
        "``\"identity\"`` (see :mod:`pipeline.core.penalties`).",
        str, choices=PENALTIES, in_job=True)
    robust: bool = _option(
        True,
        "Exclude target pixels whose residual exceeds ``clip`` robust standard "
        "deviations (cosmic rays, saturated cores, artefacts) and solve again.",
        bool, in_job=True)
    recentre: bool = _option(
        True,
        "For the compact penalties: centre them on the kernel's core when a first "
        "fit finds it off the stamp centre.",
        bool, in_job=True)
    bad_source: str = _option(
        "fill",
        "Bad source pixels: ``\"fill\"`` replaces each isolated one by a polynomial "
        "through its good neighbours and keeps every target pixel (a cluster too dense "
        "to fill is excluded as with ``\"exclude\"``); ``\"exclude\"`` drops every "
        "target pixel whose kernel footprint covers one.",
        str, choices=("fill", "exclude"), in_job=True)
    clip: float = _option(
        5.0, "Threshold of the robust pass, in sigmas of the tile's noise model (or of the given "
        "variances, rescaled by the residuals' robust spread).",
        float, gt=0, in_job=True)
    lam_init: float = _option(
        300.0,
        "Starting ``lam`` of the evidence search (about where survey tiles end, so the "
        "search takes fewer steps there).  Every tile starts from it, so a "
        "tile's result does not depend on the other tiles of the batch.",
        float, gt=0)
    tol: float = _option(0.07, "Convergence tolerance of the search, in natural ``log lam``.",
                         float, gt=0)
    max_iter: int = _option(60, "Most fixed-point steps of the evidence search.", int, ge=1)
    n_probes: int = _option(24, "Random probes of the trace estimates used by the evidence updates.",
                            int, ge=1)
    min_pixels_per_parameter: float = _option(
        2.0, "Tiles with fewer valid pixels per unknown are flagged ``no_data``.", float, ge=0)

    def __post_init__(self) -> None:
        check_penalty(self.penalty)  # first: the number of terms of regularization depends on it
        super().__post_init__()
        if isinstance(self.regularization, list):  # frozen means frozen: no list to change afterwards
            object.__setattr__(self, "regularization", tuple(self.regularization))

    def _check(self, name: str, spec: Option, value: Any) -> None:
        if name == "regularization":
            self.fixed_lam()  # validates
            return
        super()._check(name, spec, value)

    @property
    def n_terms(self) -> int:
        """Number of terms of the penalty."""
        return PENALTY_TERMS[self.penalty]

    @property
    def auto(self) -> bool:
        """Whether the regularisation is searched (``regularization="auto"``)."""
        return isinstance(self.regularization, str) and self.regularization == "auto"

    def fixed_lam(self) -> np.ndarray | None:
        """One ``lam`` per penalty term for a fixed ``regularization``; ``None`` for ``"auto"``."""
        if self.auto:
            return None
        value = self.regularization
        try:
            lam = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            lam = np.array(np.nan)
        if lam.ndim == 0:
            lam = np.full(self.n_terms, float(lam))
        if lam.shape != (self.n_terms,) or not np.all(np.isfinite(lam)) or np.any(lam < 0):
            raise OptionError(
                f"regularization must be 'auto', a number >= 0 or {self.n_terms} numbers >= 0 "
                f"(one per term of penalty={self.penalty!r}), got {value!r}"
            )
        return lam


def parse_window(window: object) -> tuple[str, float | None]:
    """``(name, parameter)`` of a taper given as a name or a ``(name, parameter)`` pair.

    Names: ``"auto"`` (chosen per tile), ``"hann"``, ``"sine"``, ``"tukey"``
    (parameter: the tapered fraction, in ``[0, 1]``, default 0.5) and ``"none"``
    (also ``"hanning"``, ``"cosine"``, ``"boxcar"``, ``"rectangular"``).
    """
    if isinstance(window, str):
        given, param = window.lower(), None
    elif isinstance(window, (tuple, list)) and len(window) == 2 and isinstance(window[0], str):
        given, param = window[0].lower(), window[1]
    else:
        raise OptionError(f"window must be a name or a (name, parameter) pair, got {window!r}")
    name = _WINDOW_ALIASES.get(given, given)
    if name not in WINDOWS:
        raise OptionError(f"unknown window {given!r}; expected 'auto', 'hann', 'sine', 'tukey' or 'none'")
    if name == "tukey":
        alpha = 0.5 if param is None else param
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0.0 <= float(alpha) <= 1.0:
            raise OptionError(f"tukey parameter must be in [0, 1], got {alpha!r}")
        return name, float(alpha)
    if param is not None:
        raise OptionError(f"window {given if name == 'none' else name!r} takes no parameter")
    return name, None


@_document
@dataclass(frozen=True, kw_only=True)
class WelchOptions(MethodOptions):
    """Options of the Welch-averaged spectra method ``"welch"`` (:mod:`pipeline.core.welch`)."""

    method: ClassVar[str] = "welch"

    segment_size: int = _option(
        64, "Side of the square segments; at least the kernel size, at most the tile's smaller side.",
        int, ge=2, in_job=True)
    overlap: float = _option(
        0.5,
        "Fraction of overlap of neighbouring segments; step "
        "``max(1, round(segment_size * (1 - overlap)))``.  The last segment of each "
        "row/column is aligned to the tile's end.",
        float, ge=0, lt=1, in_job=True)
    window: str | tuple[str, float] = _option(
        "auto",
        "Taper of every segment: ``\"auto\"``: ``\"sine\"`` on tiles whose images both show sources on a "
        "white-noise sky, but for one bright source at the tile's edge, ``\"hann\"`` on the others; ``\"sine\"`` "
        "(the square root of Hann: at overlap 0.5 "
        "the squares of overlapping segments' tapers sum to one, so every pixel weighs alike; its spectrum falls "
        "off more slowly, so smooth scenes leak), ``\"hann\"``, ``\"tukey\"`` (tapered fraction 0.5), "
        "``(\"tukey\", alpha)`` or ``\"none\"``.",
        str, choices=WINDOWS, in_job=True)
    regularization: float | str = _option(
        "auto",
        "``\"auto\"``: a Laplacian (smoothness) penalty on the kernel less its own Gaussian core, "
        "its strength chosen per tile to minimise the estimated prediction risk, with each "
        "frequency's noise measured from the spread of the segments; the kernel confined to its "
        "stamp, the taper's gain undone and the source's noise taken out of its power; on nearly noise-free "
        "tiles refined by least squares over the whole tile.  A number "
        "``lambda``: a fixed ridge, the kernel transform is ``cross / (power + eps)`` with "
        "``eps = lambda * mean(power)`` over all frequencies of the tile's summed source power; "
        "``0`` is plain division (frequencies of zero power give zero).",
        float, choices=("auto",), ge=0, in_job=True)
    find_defects: bool = _option(
        True,
        "Find defects nobody marked (single-pixel spikes and saturation plateaus, "
        ":mod:`pipeline.core.defects`; hot and dead pixels and cosmic-ray tracks, light the other image "
        "has not got, :func:`pipeline.core.sharpness.pair_spikes`) in both images and treat them as bad pixels.",
        bool, in_job=True)

    @property
    def auto_regularization(self) -> bool:
        """Whether the regularisation is chosen per tile (``regularization="auto"``)."""
        return isinstance(self.regularization, str) and self.regularization == "auto"

    def _check(self, name: str, spec: Option, value: Any) -> None:
        if name == "window":
            parse_window(value)  # names, aliases and (name, parameter) pairs
            return
        super()._check(name, spec, value)


@_document
@dataclass(frozen=True, kw_only=True)
class RatioOptions(MethodOptions):
    """Options of the plain ``FFT(target) / FFT(source)`` method ``"ratio"``: none."""

    method: ClassVar[str] = "ratio"
