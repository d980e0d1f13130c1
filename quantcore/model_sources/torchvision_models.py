"""Source ``torchvision``: ``torchvision.models.get_model`` (``model.name: torchvision:<name>``)."""
from __future__ import annotations

from torch import nn

from ..data.transforms import TORCHVISION_WEIGHTS_ATTR, weights_name
from . import ModelSource, register_source


class TorchvisionSource(ModelSource):
    name = "torchvision"
    priority = 90  # never claims a bare name: picked by the ``torchvision:`` prefix or ``source: torchvision``

    def build(self, cfg, name: str, load_weights: bool) -> tuple[nn.Module, str | None]:
        import torchvision

        from ..models import ModelError

        # fields this source has no use for are refused, not ignored (a random model, a 224-px transform)
        for field, value in (("pretrained_file", cfg.pretrained_file), ("img_size", cfg.img_size),
                             ("in_chans", cfg.in_chans)):
            if value is not None and value != "":
                hint = ("load a state_dict with model.checkpoint" if field == "pretrained_file" else
                        "torchvision builds its models at their own input size and channels")
                raise ModelError(f"model.{field}: not used by torchvision models (torchvision:{name}); {hint}")
        pretrained = cfg.pretrained and load_weights and cfg.checkpoint is None
        kw = dict(cfg.kwargs)
        if cfg.num_classes is not None:
            kw["num_classes"] = cfg.num_classes
        try:
            model = torchvision.models.get_model(name, weights="DEFAULT" if pretrained else None, **kw)
        except ValueError as err:
            raise ModelError(f"model.name torchvision:{name}: {err}") from None
        except Exception as err:
            took = [k for k in kw if f"'{k}'" in str(err)]
            if isinstance(err, TypeError) and took:  # an argument the builder does not take: not a download
                field = "model.num_classes" if took[0] == "num_classes" else f"model.kwargs.{took[0]}"
                raise ModelError(f"{field}: torchvision model {name!r} does not take {took[0]!r} ({err}); remove "
                                 "it from the recipe's model section") from None
            if not pretrained:
                raise ModelError(f"could not build torchvision model {name!r} with {sorted(kw) or 'no arguments'} "
                                 f"from the recipe's model section: {type(err).__name__}: {err}") from err
            raise ModelError(f"could not build torchvision model {name!r} (pretrained=True): {err}. "
                             "Offline? Point model.checkpoint at a local/s3 state_dict.") from err
        try:
            default = torchvision.models.get_model_weights(name).DEFAULT
        except (ValueError, AttributeError, KeyError):  # a builder without weights: the standard preset
            default = None
        if default is not None:
            # its preprocessing (resize, crop, interpolation, mean/std) is the DEFAULT weights' transforms,
            # also for random init or a fine-tune loaded from model.checkpoint
            setattr(model, TORCHVISION_WEIGHTS_ATTR, weights_name(default))
        return model, (f"torchvision:{name} weights DEFAULT" if pretrained else None)


register_source(TorchvisionSource())
