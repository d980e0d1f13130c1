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
    from ..plugins import is_plugin

    if not is_plugin(b):
        return b.calibrate(model, batches, max_batches, progress)
    return _plugin_calibrate(b, model, batches, max_batches, progress)


class _Counted:
    """``batches`` as given (iterable again, ``len`` when it has one), counting the batches handed out."""

    def __init__(self, batches: Iterable) -> None:
        self.batches, self.fed = batches, 0

    def __iter__(self):
        for batch in self.batches:
            self.fed += 1
            yield batch

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]  # TypeError as the object itself gives


def _plugin_calibrate(b: Backend, model: "nn.Module", batches: Iterable, max_batches: int | None,
                      progress: Any) -> "CalibrationResult":
    """A plug-in backend's ``calibrate``, its failures and malformed results named, and its run recorded
    (``backend`` in the calibration record) when it did not record one itself."""
    from ..api import CalibrationResult
    from ..placement import quantizers
    from ..plugins import PluginError
    from ._common import record

    who = f"calibration.backend {b.name!r} ({type(b).__module__}.{type(b).__qualname__})"
    counted = _Counted(batches)  # 0 images counted after some batches were fed is the backend's fault
    try:
        res = b.calibrate(model, counted, max_batches, progress)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - a plug-in's failure, named
        raise PluginError(f"{who}: calibrate() raised {type(e).__name__}: {e}") from e
    if not isinstance(res, CalibrationResult):
        raise PluginError(f"{who}: calibrate() returned {type(res).__name__}; it must return a "
                          f"quantcore.api.CalibrationResult (batches, images, ...)")
    if counted.fed and not res.images:
        raise PluginError(f"{who}: calibrate() read {counted.fed} batch(es) but its result counts no images "
                          f"(CalibrationResult.images); it must count the images it calibrated on")
    if "backend" not in res.transforms:  # what ran is recorded whatever the plug-in wrote
        ranged = {n: b.name for n, q in quantizers(model).items() if q.is_calibrated}
        record(res, b, ranged, implementation=f"{type(b).__module__}.{type(b).__qualname__}")
    return res


from . import aimet, modelopt, native  # noqa: E402 - register the built-ins (light: no peer imports)

for _b in (native.NativeBackend(), modelopt.ModelOptBackend(), aimet.AimetBackend()):
    register_backend(_b)
