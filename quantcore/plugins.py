"""Third-party extensions: modules that register quantizer kinds, calibrators, model families or model
sources (``docs/extending.md``) from outside quantcore.

The CLI, and so every launcher that runs it (TorchX components, the Helm chart's jobs, Ray
entrypoints), imports before anything else:

* the modules named in the environment variable ``QUANTCORE_PLUGINS`` (comma-separated, e.g.
  ``QUANTCORE_PLUGINS=mycompany.qkinds,mycompany.families``), and
* every installed package's entry points in the group ``quantcore.plugins`` (a package declares
  ``[project.entry-points."quantcore.plugins"] myplug = "myplug"`` and is found once installed in
  the image).

A library user imports the module itself (or calls :func:`load_plugins`).
"""
from __future__ import annotations

import importlib
import os
from importlib import metadata

from .errors import UserError

ENV = "QUANTCORE_PLUGINS"
GROUP = "quantcore.plugins"


class PluginError(UserError):
    """A plug-in cannot be loaded, or its code failed or returned something it must not; the message
    names the module, or the quantizer and its format/calibrator."""


def is_plugin(obj: object) -> bool:
    """Whether ``obj``'s class is defined outside quantcore (a registered extension)."""
    return not type(obj).__module__.startswith("quantcore.")


def load_plugins(env: str | None = None) -> list[str]:
    """Import the plug-in modules (``env``, default ``$QUANTCORE_PLUGINS``, then the ``quantcore.plugins``
    entry points); returns their names in import order. Importing twice is a no-op (Python's module
    cache). Raises :class:`PluginError` naming the module and where it was named."""
    names: list[tuple[str, str]] = []
    raw = os.environ.get(ENV, "") if env is None else env
    names += [(n.strip(), f"${ENV}") for n in raw.split(",") if n.strip()]
    for ep in metadata.entry_points(group=GROUP):
        dist = getattr(getattr(ep, "dist", None), "name", None) or "an installed package"
        names.append((ep.value.split(":")[0].strip(), f"entry point {ep.name!r} of {dist}"))
    done = []
    for name, where in names:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - any failure of foreign code is reported with its origin
            raise PluginError(f"plug-in module {name!r} (named by {where}) failed to import: "
                              f"{type(e).__name__}: {e}") from e
        done.append(name)
    return done


def runtime_env() -> dict:
    """A Ray ``runtime_env`` that passes ``$QUANTCORE_PLUGINS`` on to the cluster's workers (they run
    in processes the cluster started, not under this driver's environment); ``{}`` when unset."""
    value = os.environ.get(ENV, "")
    return {"env_vars": {ENV: value}} if value else {}
