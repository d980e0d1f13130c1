"""Library versions recorded in checkpoints and reports."""
from __future__ import annotations

import platform
from importlib import metadata


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("quantcore", "torch", "torchvision", "timm", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out
