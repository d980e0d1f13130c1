"""Model families: registered placement plans.

A family is detected from what the model computes (:func:`quantcore.placement.core.detect_family`),
not from its class. Each :class:`FamilyPlan` says when it applies (``matches``, tried in ``priority``
order), what stays float by default, and what it requires; the placement engine
(:mod:`quantcore.placement.core`) applies whichever plan the recipe names or detection picks. A new
family is one module with a subclass and one :func:`register_family` call.

Built-in: ``vit`` (attention, at most a patch-embedding convolution), ``cnn`` (convolutions with
BatchNorm; attention inside still quantized) and ``generic`` (anything else).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..registry import Registry


@dataclass(frozen=True)
class FamilyFacts:
    """What detection knows about a model: its traced sites and a few flags."""

    has_attention: bool
    convolutions: int
    had_batchnorm: bool
    torchvision_resnet: bool


class FamilyPlan:
    """Base of a family's placement plan.

    ``default_keep_float``: module globs left float by default (``PlacementConfig.keep_float =
    None``); a glob also covers the matched module's descendants. An explicit ``keep_float`` list in
    the recipe replaces them.
    """

    name: str = ""
    priority: int = 100  # detection order: lower first
    default_keep_float: tuple[str, ...] = ()
    requires_attention: bool = False

    def matches(self, facts: FamilyFacts) -> bool:  # pragma: no cover - overridden
        """Whether detection picks this family for a model with ``facts``."""
        return False

    def default_float_reason(self, site: Any, keep_float_given: bool) -> str | None:
        """Why ``site`` (a traced weighted op or attention) stays float by default, or ``None``."""
        return None


class ViTPlan(FamilyPlan):
    name = "vit"
    priority = 10
    requires_attention = True
    # timm (patch_embed, head), torchvision (conv_proj, heads), Hugging Face (embeddings, classifier)
    default_keep_float = ("patch_embed", "head", "head_dist", "attn_pool", "conv_proj", "heads", "*.embeddings",
                          "classifier", "distillation_classifier", "cls_classifier")

    def matches(self, facts: FamilyFacts) -> bool:
        return facts.has_attention and facts.convolutions <= 1

    def default_float_reason(self, site: Any, keep_float_given: bool) -> str | None:
        if not keep_float_given and site.op.startswith("conv"):
            # auto picks this plan for at most one convolution; a forced `family: vit` on a hybrid floats them all
            return ("vit family default: every convolution stays float (a plain ViT's one is its patch embedding; "
                    "a hybrid with convolutions in its body, such as MobileViT or PVT, quantizes them under "
                    "placement.family: auto)")
        return None


class CNNPlan(FamilyPlan):
    name = "cnn"
    priority = 20

    def matches(self, facts: FamilyFacts) -> bool:
        return facts.convolutions > 0 and (facts.torchvision_resnet or facts.had_batchnorm)


class GenericPlan(FamilyPlan):
    name = "generic"
    priority = 1000

    def matches(self, facts: FamilyFacts) -> bool:
        return True


_FAMILIES: Registry[FamilyPlan] = Registry("family", reserved=("auto",), base=FamilyPlan)


def register_family(plan: FamilyPlan) -> FamilyPlan:
    """Register ``plan`` under ``plan.name``; ``ValueError`` if another class holds the name."""
    return _FAMILIES.register(plan)


def family_plan(name: str) -> FamilyPlan:
    """The plan registered as ``name``; ``ValueError`` listing the registered ones otherwise."""
    return _FAMILIES.get(name)


def family_names() -> list[str]:
    """Registered families in detection (priority) order."""
    return [n for n, _ in sorted(_FAMILIES.items(), key=lambda kv: (kv[1].priority, kv[0]))]


def detect(facts: FamilyFacts) -> str:
    """The first registered family (by priority) whose plan matches ``facts``."""
    from ..plugins import PluginError, is_plugin

    for name in family_names():
        plan = _FAMILIES.get(name)
        if not is_plugin(plan):
            if plan.matches(facts):
                return name
            continue
        try:  # one faulty plug-in family would break every family: auto run, whatever the model
            hit = plan.matches(facts)
        except Exception as e:  # noqa: BLE001 - a plug-in's failure, named
            raise PluginError(f"model family {name!r} ({type(plan).__module__}.{type(plan).__qualname__}): "
                              f"matches() raised {type(e).__name__}: {e} (placement.family: auto tries every "
                              f"registered family)") from e
        if not isinstance(hit, bool):
            raise PluginError(f"model family {name!r} ({type(plan).__module__}.{type(plan).__qualname__}): "
                              f"matches() returned {type(hit).__name__} {hit!r:.60}; it must return True or False")
        if hit:
            return name
    return "generic"


for _p in (ViTPlan, CNNPlan, GenericPlan):
    register_family(_p())


#: The built-in family names, fixed at import (:func:`family_names` also lists plug-in families).
FAMILIES = tuple(family_names())
#: Default keep-float globs of the built-in families, as plain lists (a plug-in family's are its
#: plan's ``default_keep_float``: ``family_plan(name).default_keep_float``).
DEFAULT_KEEP_FLOAT: dict[str, list[str]] = {n: list(family_plan(n).default_keep_float) for n in family_names()}
