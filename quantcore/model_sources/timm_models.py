"""Source ``timm``: ``timm.create_model`` (the ``source: auto`` fallback for any other name)."""
from __future__ import annotations

import os

from torch import nn

from . import ModelSource, register_source


class TimmSource(ModelSource):
    name = "timm"
    priority = 100

    def claims(self, cfg, name: str) -> bool:
        return True

    def build(self, cfg, name: str, load_weights: bool) -> tuple[nn.Module, str | None]:
        pretrained = cfg.pretrained and load_weights and cfg.checkpoint is None
        use_file = bool(cfg.pretrained_file) and load_weights and cfg.checkpoint is None
        model = create_timm(name, cfg, pretrained, use_file)
        if use_file:
            return model, f"model.pretrained_file {cfg.pretrained_file}"
        return model, (f"timm pretrained {name}" if pretrained else None)


def create_timm(name: str, cfg, pretrained: bool = False, use_file: bool = False) -> nn.Module:
    """``timm.create_model(name)`` with the recipe's size/class/kwargs arguments; ModelError when timm
    does not know ``name`` or cannot build it (offline hub downloads)."""
    import timm

    from ..models import BUILDERS, ModelError, _kwargs

    if not timm.is_model(name):
        from .hf import looks_like_path

        if looks_like_path(name) or "/" in name or os.sep in name:  # meant as a model directory, most likely
            where = "a file, not a directory" if os.path.isfile(name) else "no such directory"
            raise ModelError(f"model.name {name!r}: {where} (a Hugging Face save_pretrained directory holds "
                             f"config.json + weights); nor is it a timm model, 'torchvision:<name>' or a builder "
                             f"({', '.join(sorted(BUILDERS))})")
        raise ModelError(f"model.name {name!r} is neither a timm model, 'torchvision:<name>', nor a builder "
                         f"({', '.join(sorted(BUILDERS))})")
    kw = _kwargs(cfg)
    if use_file:
        # timm's own overlay mechanism: weights from a local file, preprocessing from the timm config.
        kw["pretrained_cfg_overlay"] = {"file": cfg.pretrained_file.removeprefix("file://")}
        pretrained = True
    try:
        return timm.create_model(name, pretrained=pretrained, **kw)
    except Exception as err:  # hub downloads fail offline: say what to do instead
        raise ModelError(f"could not build timm model {name!r} (pretrained={pretrained}): {err}. "
                         "Offline? Point model.checkpoint or model.pretrained_file at a local/s3 file.") from err


register_source(TimmSource())
