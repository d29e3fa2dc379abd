"""Exceptions raised by kernelmap.

Every error kernelmap raises on bad input derives from :class:`KernelmapError`,
which is itself a :class:`ValueError`, so callers can catch either.  Warnings
kernelmap gives derive from :class:`KernelmapWarning`.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["KernelmapError", "InputError", "OptionError", "OutsideImageError", "ConfigError", "BatchError",
           "KernelmapWarning", "OutsideImageWarning", "unreadable_store"]


class KernelmapError(ValueError):
    """Base class of every error raised by kernelmap."""


class InputError(KernelmapError):
    """An input array is unusable (shape, dimensionality, dtype, content)."""


class OptionError(KernelmapError):
    """An option has a value outside what is allowed."""


class OutsideImageError(OptionError):
    """A position asked of the kernel-field model lies outside the image its tiles cover."""


class ConfigError(KernelmapError):
    """A job configuration is invalid.

    Parameters
    ----------
    errors
        One line per problem, each ``"dotted.key: message"``.
    source
        The job file, when the configuration came from one.

    Attributes
    ----------
    errors : list of str
        The problems, in the order found.
    source : str or None
        The job file, if any.
    """

    def __init__(self, errors: Sequence[str] | str, *, source: str | None = None) -> None:
        self.errors: list[str] = [errors] if isinstance(errors, str) else list(errors)
        self.source = source
        where = f" in {source}" if source else ""
        super().__init__(f"invalid job configuration{where}:\n  " + "\n  ".join(self.errors))

    def __reduce__(self):  # keep the keyword argument when pickled
        return _rebuild_config_error, (self.errors, self.source)


def _rebuild_config_error(errors: list[str], source: str | None) -> ConfigError:
    return ConfigError(errors, source=source)


class BatchError(KernelmapError):
    """The batch system refused a job, did not answer, or its workers never came."""


class KernelmapWarning(UserWarning):
    """Base class of every warning kernelmap gives."""


class OutsideImageWarning(KernelmapWarning):
    """Positions outside the image were asked of the kernel-field model and given NaN kernels."""


def unreadable_store(exc: Exception, where: str, *, named: str, options: str, then: str = "") -> InputError:
    """The :class:`InputError` of a store at ``where`` that could not be read: ``exc`` an ``OSError``
    (unreachable host, permissions) or, at a URL, the object store's own error (no credentials, access denied);
    any other ``exc`` is raised as it is.  ``named`` says what the store is (``the store``), ``options`` where
    its credentials are set, ``then`` what follows the checks."""
    if not isinstance(exc, OSError) and "://" not in where:
        raise exc
    return InputError(f"cannot read {where} ({type(exc).__name__}: {exc}): check that {named} is there and can be "
                      f"reached and read (network, {options} credentials, permissions){then}")
