"""Per-tile quality flags, defined once.

Each flag is one bit of an unsigned integer.  The CF attributes
``flag_masks`` / ``flag_meanings`` written with kernel maps are generated from
:data:`FLAGS`, so this table is the only place a flag is defined.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Flag", "FLAGS", "FLAG_DTYPE", "NO_DATA", "NO_SIGNAL", "MASKED",
           "REGULARIZATION_AT_BOUND", "HIGH_RESIDUAL", "OUTLIERS_CLIPPED",
           "MOMENTS_FAILED", "KERNEL_TRUNCATED", "NON_POSITIVE_FLUX", "MODEL_OUTLIER", "TARGET_SHARPER",
           "NEARLY_EQUAL", "BAD", "NOT_MODELLED",
           "TRUNCATION_FRACTION", "HIGH_RESIDUAL_RATIO", "PROBLEM", "INFORMATION", "PROBLEMS", "INFORMATIONAL",
           "cf_flag_attrs", "describe", "fit_flags", "unusable_kernels", "kernel_flags", "modelled", "problems",
           "model_outliers"]

FLAG_DTYPE = np.uint16


#: The kinds of flag: a ``problem`` says the kernel is unusable or doubtful; ``information`` says
#: what was done to the data (pixels left out) and is set on most tiles of a good run.
PROBLEM, INFORMATION = "problem", "information"


@dataclass(frozen=True)
class Flag:
    bit: int
    name: str
    description: str
    kind: str = PROBLEM

    @property
    def mask(self) -> int:
        return 1 << self.bit


#: Fraction of a kernel's flux on the border of its stamp above which it is flagged truncated.
TRUNCATION_FRACTION = 0.02
#: Residual RMS over its robust standard deviation above which a tile is flagged
#: ``high_residual`` (heavy tails: outliers, or a kernel that does not fit).
HIGH_RESIDUAL_RATIO = 3.0

FLAGS: tuple[Flag, ...] = (
    Flag(0, "no_data", "too few valid pixels (or segments) to estimate a kernel; kernel is NaN"),
    Flag(1, "no_signal", "the source has no usable power; kernel is NaN"),
    Flag(2, "masked", "some pixels were bad (NaN or masked) and were excluded", INFORMATION),
    Flag(3, "regularization_at_bound", "the automatic regularisation reached its upper bound: "
                                       "the data hardly constrain the kernel"),
    Flag(4, "high_residual", "the fit residual has heavy tails: its RMS exceeds "
                              f"{HIGH_RESIDUAL_RATIO:g} robust standard deviations"),
    Flag(5, "outliers_clipped", "the robust pass excluded outlying target pixels", INFORMATION),
    Flag(6, "moments_failed", "adaptive second moments of the kernel did not converge"),
    Flag(7, "kernel_truncated", f"more than {TRUNCATION_FRACTION * 100:g} % of the kernel's flux lies on the "
                                "border of its stamp: the kernel is probably larger than kernel.size"),
    Flag(8, "non_positive_flux", "the kernel sums to zero or less"),
    Flag(9, "model_outlier", "far from the smooth kernel-field model fitted to the image's other tiles; "
                             "left out of that model"),
    Flag(10, "target_sharper", "the image the kernel is fitted to (the target; the source where the image's "
                               "direction is reverse) is sharper than the image it blurs, beyond the tolerance: "
                               "the kernel is a deconvolution, not a physical blur; left out of the model"),
    Flag(11, "nearly_equal", "the two images' PSFs are nearly equal (their squared FWHMs differ by less than the "
                             "tolerance or three uncertainties): the kernel is close to a delta and its shape is "
                             "poorly constrained", INFORMATION),
)

NO_DATA, NO_SIGNAL, MASKED, REGULARIZATION_AT_BOUND, HIGH_RESIDUAL, OUTLIERS_CLIPPED, \
    MOMENTS_FAILED, KERNEL_TRUNCATED, NON_POSITIVE_FLUX, MODEL_OUTLIER, TARGET_SHARPER, NEARLY_EQUAL = (
        f.mask for f in FLAGS)


#: Flags that only say what was done to the data (set on most tiles of a good run).
INFORMATIONAL = sum(f.mask for f in FLAGS if f.kind == INFORMATION)
#: Flags that say a kernel is unusable or doubtful: what "flagged" counts.
PROBLEMS = sum(f.mask for f in FLAGS if f.kind == PROBLEM)

#: Flags meaning the kernel itself is unusable (it is NaN).
BAD = NO_DATA | NO_SIGNAL
#: Flags keeping a tile out of the smooth kernel-field model of its image.
NOT_MODELLED = BAD | NON_POSITIVE_FLUX | HIGH_RESIDUAL | TARGET_SHARPER


def _bits(condition: object, flag: int) -> np.ndarray:
    return np.where(np.asarray(condition, dtype=bool), flag, 0).astype(FLAG_DTYPE)


def fit_flags(
    *,
    masked: np.ndarray,
    no_data: np.ndarray | bool = False,
    no_signal: np.ndarray | bool = False,
    outliers_clipped: np.ndarray | bool = False,
    regularization_at_bound: np.ndarray | bool = False,
) -> np.ndarray:
    """The flags of what an estimator found on each tile (boolean arrays over the batch).

    ``masked``: bad pixels were left out; ``no_data``: too few valid pixels
    or segments to fit; ``no_signal``: the source has no usable power (or
    no solution exists); ``outliers_clipped``: the robust pass removed
    pixels; ``regularization_at_bound``: the automatic regularisation ended
    at its upper bound.
    """
    masked = np.asarray(masked, dtype=bool)
    return (_bits(masked, MASKED) | _bits(no_data, NO_DATA) | _bits(no_signal, NO_SIGNAL)
            | _bits(outliers_clipped, OUTLIERS_CLIPPED)
            | _bits(regularization_at_bound, REGULARIZATION_AT_BOUND)).astype(FLAG_DTYPE, copy=False)


def unusable_kernels(flags: np.ndarray, kernels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Which kernels are unusable, and ``flags`` with :data:`NO_SIGNAL` added where no other says why.

    A kernel is unusable where a :data:`BAD` flag is set or it is not finite.
    Returns ``(flags, unusable)``; ``flags`` is a new array.
    """
    flags = np.array(flags, dtype=FLAG_DTYPE)
    unusable = (flags & BAD) != 0
    unusable |= ~np.all(np.isfinite(kernels), axis=(-2, -1))
    flags[unusable & ((flags & BAD) == 0)] |= NO_SIGNAL
    return flags, unusable


def kernel_flags(
    kernels: np.ndarray,
    flux: np.ndarray,
    *,
    residual: np.ndarray,
    moments_converged: np.ndarray,
    unusable: np.ndarray,
) -> np.ndarray:
    """The flags of what the kernels and their fits look like.

    ``kernels`` ``(n, k, k)`` (NaN where unusable) and their sums ``flux``;
    ``residual`` the residual RMS over its robust standard deviation (NaN
    when not computed); ``moments_converged`` whether the adaptive moments
    converged.  Sets :data:`HIGH_RESIDUAL` (``residual`` above
    :data:`HIGH_RESIDUAL_RATIO`), :data:`NON_POSITIVE_FLUX`,
    :data:`KERNEL_TRUNCATED` (more than :data:`TRUNCATION_FRACTION` of the
    flux on the stamp's border) and :data:`MOMENTS_FAILED` (usable kernels only).
    """
    flags = np.zeros(len(flux), dtype=FLAG_DTYPE)
    with np.errstate(invalid="ignore"):
        flags[residual > HIGH_RESIDUAL_RATIO] |= HIGH_RESIDUAL
        flags[flux <= 0] |= NON_POSITIVE_FLUX
        if kernels.shape[-1] >= 3:
            border = flux - kernels[:, 1:-1, 1:-1].sum(axis=(1, 2))
            flags[(flux > 0) & (border > TRUNCATION_FRACTION * flux)] |= KERNEL_TRUNCATED
    flags[~np.asarray(moments_converged, dtype=bool) & ~unusable] |= MOMENTS_FAILED
    return flags


def modelled(kernels: np.ndarray, flags: np.ndarray) -> np.ndarray:
    """Tiles that may enter their image's kernel-field model: a finite kernel, no :data:`NOT_MODELLED` flag.

    ``kernels`` ``(..., k, k)``, ``flags`` ``(...)``.
    """
    finite = np.all(np.isfinite(kernels), axis=(-2, -1))
    return finite & ((np.asarray(flags).astype(np.int64) & NOT_MODELLED) == 0)


def problems(flags: np.ndarray | int) -> np.ndarray:
    """Whether each tile has a problem flag (:data:`PROBLEMS`); informational flags do not count."""
    return (np.asarray(flags).astype(np.int64) & PROBLEMS) != 0


def model_outliers(rejected: np.ndarray) -> np.ndarray:
    """The flags the kernel-field model adds: :data:`MODEL_OUTLIER` where it rejected a tile."""
    return np.where(rejected, MODEL_OUTLIER, 0).astype(FLAG_DTYPE)


def cf_flag_attrs() -> dict[str, object]:
    """CF-convention attributes describing the flag bits."""
    return {
        "flag_masks": np.array([f.mask for f in FLAGS], dtype=FLAG_DTYPE),
        "flag_meanings": " ".join(f.name for f in FLAGS),
        "flag_descriptions": "; ".join(f"{f.name}: {f.description}" for f in FLAGS),
        "flag_kinds": " ".join(f.kind for f in FLAGS),
    }


def describe(value: int) -> list[str]:
    """Names of the flags set in ``value``."""
    return [f.name for f in FLAGS if int(value) & f.mask]
