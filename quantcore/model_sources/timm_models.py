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
            return model, f"model.pretrained_file {cfg.pretrained_file}{_check_file_loaded(model, name, cfg)}"
        return model, (f"timm pretrained {name}" if pretrained else None)


def _check_file_loaded(model: nn.Module, name: str, cfg) -> str:
    """timm loads a ``pretrained_file`` leniently: it resamples position embeddings, sums input-conv
    channels, and drops or skips what does not fit. The FP32 model must be the file's weights, so:
    every tensor the file names must have the model's shape (nothing adapted), and no tensor may be
    left at its random initialization (a second build under another seed must give the same state).
    Raises ModelError naming the file and the first tensors; returns the cast note
    (:func:`quantcore.models.cast_note`)."""
    import torch

    from ..models import ModelError, _check_float_values, cast_note, read_state_dict

    uri = cfg.pretrained_file
    state = model.state_dict()
    raw = read_state_dict(uri, state.keys())
    _check_float_values(state, raw, f"model.pretrained_file {uri}")
    reshaped = [f"{k} {tuple(raw[k].shape)} in the file, {tuple(v.shape)} in the model" for k, v in state.items()
                if k in raw and tuple(raw[k].shape) != tuple(v.shape)]
    if reshaped:
        raise ModelError(f"model.pretrained_file {uri} does not fit the model (timm would adapt it): "
                         f"{'; '.join(reshaped[:3])}{' ...' if len(reshaped) > 3 else ''}; set the model's "
                         f"in_chans/img_size/num_classes/kwargs to the file's")
    shared = [k for k in state if k in raw]
    if len(shared) * 2 >= len(state):  # the file uses the model's names (timm's own format): all must be there
        absent = [k for k in state if k not in raw]
        if absent:
            raise ModelError(f"model.pretrained_file {uri} does not provide {len(absent)} tensor(s) of the model "
                             f"(e.g. {absent[:4]}): give the file the model was saved to")
    # timm's loader prefers a file's EMA weights ('state_dict_ema', 'model_ema'): the model must hold
    # the values model.checkpoint would load from the same file, or say why not
    other = [k for k, v in state.items() if k in raw and v.is_floating_point()
             and not torch.equal(v, raw[k].to(v.dtype))]
    if other:
        raise ModelError(f"model.pretrained_file {uri}: timm loaded other values than the file's weights (e.g. "
                         f"{other[:3]}): the file also holds EMA weights ('state_dict_ema'/'model_ema'), which "
                         f"timm prefers. Give model.checkpoint (the main weights), or a file with one set")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(torch.initial_seed() + 1)
        again = create_timm(name, cfg, False, True).state_dict()
    random = [k for k, v in state.items() if v.is_floating_point() and not torch.equal(v, again[k])]
    if random:
        raise ModelError(f"model.pretrained_file {uri} does not provide {len(random)} tensor(s) of the model, which "
                         f"stayed at their random initialization (e.g. {random[:4]}); a classifier of another class "
                         f"count, or missing keys: give the file the model was saved to, or set model.num_classes")
    return cast_note(state, raw)


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
        # timm's own overlay mechanism: weights from a local file, preprocessing from the timm config;
        # the model's class count as the file's, so timm keeps the file's classifier instead of dropping it
        kw["pretrained_cfg_overlay"] = {"file": _local_file(cfg.pretrained_file),
                                        **({"num_classes": kw["num_classes"]} if kw.get("num_classes") else {})}
        pretrained = True
    try:
        return timm.create_model(name, pretrained=pretrained, **kw)
    except Exception as err:  # hub downloads fail offline: say what to do instead
        if use_file:
            lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
            raise ModelError(f"model.pretrained_file {cfg.pretrained_file} does not load into timm model {name!r}: "
                             f"{type(err).__name__}: {'; '.join(lines[:3])[:400]}") from None
        msg = str(err)
        took = [k for k in kw if k != "pretrained_cfg_overlay" and f"'{k}'" in msg]
        if isinstance(err, TypeError) and took:
            field = {"img_size": "model.img_size", "in_chans": "model.in_chans",
                     "num_classes": "model.num_classes"}.get(took[0], f"model.kwargs.{took[0]}")
            raise ModelError(f"{field}: timm model {name!r} does not take {took[0]!r} ({err}); remove it from the "
                             f"recipe's model section") from None
        if not pretrained:
            raise ModelError(f"could not build timm model {name!r} with {sorted(kw) or 'no arguments'} from the "
                             f"recipe's model section: {type(err).__name__}: {err}") from err
        raise ModelError(f"could not build timm model {name!r} (pretrained=True): {err}. "
                         "Offline? Point model.checkpoint or model.pretrained_file at a local/s3 file.") from err


def _local_file(uri: str) -> str:
    """What timm's overlay opens: a local path (``file://`` decoded by the storage layer's rules)."""
    from ..io.uri import is_s3, local_path
    from ..models import ModelError

    if is_s3(uri):
        raise ModelError(f"model.pretrained_file {uri}: timm reads local files only; give model.checkpoint "
                         f"for weights on S3")
    path = local_path(uri)
    if not os.path.isfile(path):
        raise ModelError(f"model.pretrained_file {uri}: {'a directory' if os.path.isdir(path) else 'not found'}")
    return path


register_source(TimmSource())
