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
           "MOMENTS_FAILED", "KERNEL_TRUNCATED", "NON_POSITIVE_FLUX", "MODEL_OUTLIER", "BAD", "NOT_MODELLED",
           "TRUNCATION_FRACTION", "cf_flag_attrs", "describe", "modelled", "model_outliers"]

FLAG_DTYPE = np.uint16


@dataclass(frozen=True)
class Flag:
    bit: int
    name: str
    description: str

    @property
    def mask(self) -> int:
        return 1 << self.bit


FLAGS: tuple[Flag, ...] = (
    Flag(0, "no_data", "too few valid pixels (or segments) to estimate a kernel; kernel is NaN"),
    Flag(1, "no_signal", "the source has no usable power; kernel is NaN"),
    Flag(2, "masked", "some pixels were bad (NaN or masked) and were excluded"),
    Flag(3, "regularization_at_bound", "the automatic regularisation reached its upper bound: the data hardly constrain the kernel"),
    Flag(4, "high_residual", "the fit residual has heavy tails: its RMS exceeds 3 robust standard deviations"),
    Flag(5, "outliers_clipped", "the robust pass excluded outlying target pixels"),
    Flag(6, "moments_failed", "adaptive second moments of the kernel did not converge"),
    Flag(7, "kernel_truncated", "more than 2 % of the kernel's flux lies on the border of its stamp: "
                                "the kernel is probably larger than kernel.size"),
    Flag(8, "non_positive_flux", "the kernel sums to zero or less"),
    Flag(9, "model_outlier", "far from the smooth kernel-field model fitted to the image's other tiles; "
                             "left out of that model"),
)

NO_DATA, NO_SIGNAL, MASKED, REGULARIZATION_AT_BOUND, HIGH_RESIDUAL, OUTLIERS_CLIPPED, \
    MOMENTS_FAILED, KERNEL_TRUNCATED, NON_POSITIVE_FLUX, MODEL_OUTLIER = (f.mask for f in FLAGS)

#: Fraction of a kernel's flux on the border of its stamp above which it is flagged truncated.
TRUNCATION_FRACTION = 0.02

#: Flags meaning the kernel itself is unusable (it is NaN).
BAD = NO_DATA | NO_SIGNAL
#: Flags keeping a tile out of the smooth kernel-field model of its image.
NOT_MODELLED = BAD | NON_POSITIVE_FLUX | HIGH_RESIDUAL


def modelled(kernels: np.ndarray, flags: np.ndarray) -> np.ndarray:
    """Tiles that may enter their image's kernel-field model: a finite kernel, no :data:`NOT_MODELLED` flag.

    ``kernels`` ``(..., k, k)``, ``flags`` ``(...)``.
    """
    finite = np.all(np.isfinite(kernels), axis=(-2, -1))
    return finite & ((np.asarray(flags).astype(np.int64) & NOT_MODELLED) == 0)


def model_outliers(rejected: np.ndarray) -> np.ndarray:
    """The flags the kernel-field model adds: :data:`MODEL_OUTLIER` where it rejected a tile."""
    return np.where(rejected, MODEL_OUTLIER, 0).astype(FLAG_DTYPE)


def cf_flag_attrs() -> dict[str, object]:
    """CF-convention attributes describing the flag bits."""
    return {
        "flag_masks": np.array([f.mask for f in FLAGS], dtype=FLAG_DTYPE),
        "flag_meanings": " ".join(f.name for f in FLAGS),
        "flag_descriptions": "; ".join(f"{f.name}: {f.description}" for f in FLAGS),
    }


def describe(value: int) -> list[str]:
    """Names of the flags set in ``value``."""
    return [f.name for f in FLAGS if int(value) & f.mask]
