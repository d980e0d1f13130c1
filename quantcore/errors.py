"""One error hierarchy for quantcore.

:class:`UserError` is every mistake a user can fix (a recipe field, a module the placement cannot
handle, a file, a URI, a checkpoint that does not match): its message names the field / module /
quantizer / file it is about, and the CLI prints that one line and exits 2. Anything else escaping
quantcore is a bug and keeps its traceback (exit 1).

``UserError`` subclasses ``ValueError`` so callers that caught ``ValueError`` before keep working.
"""
from __future__ import annotations


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
        super().__init__(f"preempted (SIGTERM) at step {step}; checkpoint {uri} written, a restart resumes there")
        self.step, self.uri = step, uri
