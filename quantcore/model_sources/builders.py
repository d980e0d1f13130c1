"""Source ``builder``: quantcore's own :func:`quantcore.models.register_builder` functions."""
from __future__ import annotations

from torch import nn

from . import ModelSource, register_source


class BuilderSource(ModelSource):
    name = "builder"
    priority = 10

    def claims(self, cfg, name: str) -> bool:
        from ..models import BUILDERS

        return name in BUILDERS

    def build(self, cfg, name: str, load_weights: bool) -> tuple[nn.Module, str | None]:
        from ..models import BUILDERS, PRETRAINED_BUILDERS, ModelError, _kwargs

        if name not in BUILDERS:
            raise ModelError(f"model.name {name!r} is not a registered builder ({', '.join(sorted(BUILDERS))})")
        if cfg.pretrained_file:
            raise ModelError(f"model.pretrained_file: not used by builder {name!r} (timm models only); load a "
                             f"state_dict with model.checkpoint")
        pretrained = cfg.pretrained and load_weights and cfg.checkpoint is None
        if pretrained and name not in PRETRAINED_BUILDERS:
            raise ModelError(f"model.pretrained: builder {name!r} has no pretrained weights; set model.checkpoint")
        kw = _kwargs(cfg)
        if name in PRETRAINED_BUILDERS:
            kw["pretrained"] = pretrained
        try:
            model = BUILDERS[name](**kw)
        except TypeError as err:  # an unknown or ill-typed builder argument
            raise ModelError(f"model.kwargs: builder {name!r} rejected its arguments {kw}: {err}") from None
        return model, getattr(model, "quantcore_weights", None) or (f"{name} pretrained" if pretrained else None)


register_source(BuilderSource())
