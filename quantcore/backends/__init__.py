"""Calibration backends: which engine computes the ranges of quantcore's quantizers.

``calibration.backend`` in a recipe names one (default ``native``, quantcore's own engine). The
placement is always quantcore's: its quantizers and their names are the contract of ``model.qc.pt``,
``encodings.json`` and export, so a backend only computes the *ranges*, and every output (checkpoint,
report, encodings) is the one a native run writes. That is what makes toolkits comparable on the same
model, data and quantized graph in one run.

* ``native``: :func:`quantcore.api.collect` + merge across ranks + :func:`quantcore.api.finalize`.
* ``modelopt``: NVIDIA ModelOpt's calibrators (``MaxCalibrator``, ``HistogramCalibrator`` with
  percentile / mse / entropy, ``MseCalibrator`` for weights) fed the tensors each quantcore quantizer
  sees (:mod:`.modelopt`). Extra: ``pip install 'quantcore[backends]'``.
* ``aimet``: AIMET ``QuantizationSimModel.compute_encodings`` on a copy of the model, its encodings
  mapped back by module and tensor (:mod:`.aimet`). Extra: ``pip install 'quantcore[backends]'``.

A non-native run adds ``backend`` to the calibration record (report.json ``variants.<name>.calibration``,
the checkpoint's and encodings.json's ``calibration``): the backend, its version, and for every
quantizer the engine that produced its range (``ranges``), so nothing is silently computed by another
engine. A backend is one :class:`Backend` subclass + one :func:`register_backend` call.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

from ..errors import UserError
from ..registry import Registry

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from ..api import CalibrationResult
    from ..config import Recipe

__all__ = ["Backend", "BackendUnavailable", "backend", "backend_names", "calibrate", "register_backend"]


class BackendUnavailable(UserError):
    """The recipe names a backend whose package is not installed; the message names the extra."""


class Backend:
    """Base class. ``package``: the import name it needs (``None``: always available); ``dist``: its
    distribution (for the version recorded); ``install``: what to install when it is missing."""

    name: str = ""
    package: str | None = None
    dist: str | None = None
    install: str = ""

    def check(self, recipe: "Recipe") -> None:
        """Raise :class:`~quantcore.recipe.RecipeError` naming the recipe field (and this backend)
        for an option this backend cannot express. Default: everything is expressible."""

    def version(self) -> str | None:
        """The installed version of ``dist`` (``None``: quantcore's own engine, or not installed)."""
        from importlib import metadata

        try:
            return metadata.version(self.dist) if self.dist else None
        except metadata.PackageNotFoundError:
            return None

    def require(self) -> None:
        """:class:`BackendUnavailable` naming what to install when ``package`` cannot be imported."""
        if self.package is None:
            return
        import importlib

        try:
            importlib.import_module(self.package)
        except ImportError as e:
            raise BackendUnavailable(f"calibration.backend {self.name!r} needs the {self.package!r} package, "
                                     f"which is not importable ({e}); install it: {self.install}") from None

    def calibrate(self, model: "nn.Module", batches: Iterable, max_batches: int | None = None,
                  progress: Any = None) -> "CalibrationResult":
        """Set every quantizer's range of the prepared ``model`` from ``batches`` (as
        :func:`quantcore.api.calibrate`, without the recipe's transforms, which run around it)."""
        raise NotImplementedError


_BACKENDS: Registry[Backend] = Registry("calibration backend", base=Backend)


def register_backend(b: Backend) -> Backend:
    """Register ``b`` under ``b.name``; ``ValueError`` if another class holds that name."""
    return _BACKENDS.register(b)


def backend(name: str) -> Backend:
    """The backend registered as ``name``; ``ValueError`` listing the registered ones otherwise."""
    return _BACKENDS.get(name)


def backend_names() -> list[str]:
    return _BACKENDS.names()


def calibrate(model: "nn.Module", batches: Iterable, max_batches: int | None = None,
              progress: Any = None) -> "CalibrationResult":
    """The one dispatch point (called by :func:`quantcore.api.calibrate`): the prepared model's
    ``recipe.calibration.backend`` computes the ranges (``native`` when the model has no recipe)."""
    from ..placement import unwrap

    recipe = getattr(unwrap(model), "quantcore_recipe", None)
    name = getattr(recipe.calibration, "backend", "native") if recipe is not None else "native"
    b = backend(name)
    if name != "native":
        from ..api import refuse_multi_input

        refuse_multi_input(model, f"calibration.backend {name}")
        b.require()
        b.check(recipe)
    return b.calibrate(model, batches, max_batches, progress)


from . import aimet, modelopt, native  # noqa: E402 - register the built-ins (light: no peer imports)

for _b in (native.NativeBackend(), modelopt.ModelOptBackend(), aimet.AimetBackend()):
    register_backend(_b)
