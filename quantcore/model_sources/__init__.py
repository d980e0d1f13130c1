"""Where FP32 models come from: one registered :class:`ModelSource` per kind of model file.

Built in (one module each):

* ``builder`` - quantcore's own :func:`quantcore.models.register_builder` functions (``quantcore/vit_fmnist``);
* ``timm`` - ``timm.create_model`` (library pretrained weights, or a ``pretrained_file`` overlay);
* ``torchvision`` - ``torchvision.models.get_model`` (``torchvision:<name>``);
* ``hf`` - a Hugging Face ``transformers`` image classifier saved with ``save_pretrained`` (local or
  s3:// directory; never the hub), preprocessing from its ``preprocessor_config.json``;
* ``npz`` - Google's ViT / R50+ViT ``.npz`` checkpoints (google-research/vision_transformer) loaded into
  the timm architecture named by ``model.name`` with timm's own loader.

``model.source: auto`` asks the sources in ``priority`` order whether they claim the recipe's model (a
``<source>:`` prefix on ``model.name`` picks one directly). ``model.checkpoint`` is read by
:func:`quantcore.models.read_state_dict` (torch ``state_dict`` or safetensors, by content) on top of any
source, except by sources that consume it themselves (``npz``).

A new source is one subclass and one :func:`register_source` call; ``model.source`` in recipes is
validated against this registry.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..registry import Registry

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from ..config import ModelConfig


class ModelSource:
    """One kind of model origin. Subclasses set ``name`` (the ``model.source`` value), ``priority``
    (order in which ``source: auto`` asks :meth:`claims`, lowest first) and implement :meth:`build`."""

    name: str = ""
    priority: int = 50
    #: True when ``model.checkpoint`` is this source's own weights file (not a state_dict loaded on top)
    consumes_checkpoint: bool = False

    def claims(self, cfg: "ModelConfig", name: str) -> bool:
        """Whether ``source: auto`` should use this source for ``name`` (``model.name`` without prefix)."""
        return False

    def build(self, cfg: "ModelConfig", name: str, load_weights: bool) -> "tuple[nn.Module, str | None]":
        """The model for ``cfg`` (any mode; the caller sets eval) and where its weights came from (a short
        string for ``model.quantcore_weights``; None = random initialization). ``load_weights=False``:
        architecture only (a quantized checkpoint supplies every tensor), preprocessing config included.
        Raises :class:`quantcore.models.ModelError` naming the recipe field / file on bad input."""
        raise NotImplementedError

    def rebuild(self, cfg: "ModelConfig", files: "dict[str, str]") -> "nn.Module":
        """The architecture (no weights, eval mode) from the definition files a checkpoint stored: what
        :meth:`build` recorded as ``model.quantcore_definition["files"]``. Only a source that records
        them is asked (:func:`quantcore.load`)."""
        raise NotImplementedError


SOURCES: Registry[ModelSource] = Registry("model source", reserved=("auto",), base=ModelSource)


def register_source(source: ModelSource) -> ModelSource:
    """Register ``source`` under ``source.name`` (``ValueError`` for a taken or reserved name)."""
    return SOURCES.register(source)


# quantcore builders shadow the library name spaces, as they always did (``timm:``/``torchvision:``)
_BUILDER_SHADOWS = ("timm", "torchvision")


def resolve_source(cfg: "ModelConfig") -> tuple[ModelSource, str]:
    """The source that builds ``cfg`` and the model name it is given (any ``<source>:`` prefix removed).

    Order: a registered ``<source>:`` prefix of ``model.name``; else ``model.source`` when not ``auto``;
    else the first source (by priority) whose :meth:`ModelSource.claims` accepts the model.
    """
    from ..models import BUILDERS

    name = cfg.name
    prefix, sep, rest = name.partition(":")
    if sep and prefix in SOURCES.names():
        src_name, name = prefix, rest
    else:
        src_name = cfg.source
    if src_name in ("auto", *_BUILDER_SHADOWS) and name in BUILDERS and not _claimed_by_npz(cfg, name):
        return SOURCES.get("builder"), name
    if src_name != "auto":
        return SOURCES.get(src_name), name
    for _, src in sorted(SOURCES.items(), key=lambda kv: kv[1].priority):
        if src.claims(cfg, name):
            return src, name
    return SOURCES.get("timm"), name


def _claimed_by_npz(cfg: "ModelConfig", name: str) -> bool:
    return cfg.source in ("auto", "npz") and "npz" in SOURCES.names() and SOURCES.get("npz").claims(cfg, name)


def _register_builtins() -> None:
    from . import builders, hf, npz, timm_models, torchvision_models  # noqa: F401  (register on import)


_register_builtins()

__all__ = ["ModelSource", "SOURCES", "register_source", "resolve_source"]
