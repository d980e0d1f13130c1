"""One error hierarchy for quantcore.

:class:`UserError` is every mistake a user can fix (a recipe field, a module the placement cannot
handle, a file, a URI, a checkpoint that does not match): its message names the field / module /
quantizer / file it is about, and the CLI prints that one line and exits 2. Anything else escaping
quantcore is a bug and keeps its traceback (exit 1).

``UserError`` subclasses ``ValueError`` so callers that caught ``ValueError`` before keep working.
"""
from __future__ import annotations

import copy


class QuantcoreError(Exception):
    """Base of every error quantcore raises on purpose."""


class UserError(QuantcoreError, ValueError):
    """A user mistake; the message names what to fix. The CLI exits 2 on it."""


class PlacementError(UserError):
    """A placement (quantizer insertion, BatchNorm folding, override) cannot be done as asked;
    the message names the module, quantizer or recipe field."""


class CalibrationError(UserError):
    """A quantizer's range cannot be computed from what it saw (e.g. negative data reaching a log2
    grid); the message names the quantizer and its format."""


class Preempted(QuantcoreError):
    """A job stopped on SIGTERM (pod eviction, spot notice) after writing a checkpoint at ``step``;
    the CLI exits with ``exit_code`` (143 = 128 + SIGTERM) so launchers retry, and the retry resumes."""

    exit_code = 143

    def __init__(self, step: int, uri: str) -> None:
        super().__init__(f"SIGTERM at step {step}; checkpoint {uri} written, a restart resumes there")
        self.step, self.uri = step, uri


def naming_recipe(err: UserError, name: str) -> UserError:
    """``err`` (same type and fields) with ``recipe 'name': `` before its text, unless it names it
    already: when several recipes run at once, whose field it is."""
    if f"recipe {name!r}" in str(err) or not err.args:
        return err
    new = copy.copy(err)
    new.args = (f"recipe {name!r}: {err.args[0]}",) + tuple(err.args[1:])
    return new


def one_line(err: Exception) -> str:
    """A pydantic ``ValidationError`` as ``field: message; ...`` on one line (its ``str`` is a
    multi-line dump with URLs); any other error as ``str(err)``."""
    errors = getattr(err, "errors", None)
    if not callable(errors):
        return str(err)
    try:
        items = errors()
    except Exception:  # noqa: BLE001 - not pydantic's errors(): fall back to the message
        return str(err)
    parts = []
    for e in items:
        loc = ".".join(str(p) for p in e.get("loc", ()))
        msg = str(e.get("msg", "")).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts) or str(err)
