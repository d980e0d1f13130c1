"""What the peer backends share: recipe checks naming the field, the data-parallel refusal, weight
sources, shared-range groups, and the per-quantizer record of which engine produced each range."""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import nn

from ..errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from ..config import Recipe, SpecPatch
    from ..quantizer import TensorQuantizer


def recipe_error(msg: str) -> Exception:
    from ..recipe import RecipeError

    return RecipeError(msg)


def spec_patches(recipe: "Recipe") -> list[tuple[str, str, "SpecPatch"]]:
    """``(field prefix, applies to, patch)`` for every place a recipe sets quantizer specs:
    ``quant.weights``, ``quant.activations`` and each ``overrides[i].spec``."""
    out = [("quant.weights", "weight", recipe.quant.weights), ("quant.activations", "activation",
                                                                  recipe.quant.activations)]
    out += [(f"overrides[{i}].spec", "any", o.spec) for i, o in enumerate(recipe.overrides) if o.spec is not None]
    return out


def check_common(recipe: "Recipe", backend: str, act_methods: tuple[str, ...], weight_methods: tuple[str, ...],
                 asymmetric: bool) -> None:
    """Refuse, naming the field, what ``backend`` cannot express: calibrators outside ``act_methods`` /
    ``weight_methods``, non-integer grids (float casts pass: they have no range), asymmetric grids
    unless ``asymmetric``, and ``reconstruction`` (quantcore's AdaRound/BRECQ rewrites the weights
    after calibration: a run that mixes engines would not compare toolkits)."""
    from ..quantizer_kinds import quantizer_kind

    where = f"calibration.backend {backend!r}"
    c = recipe.calibration
    if c.method not in act_methods:
        raise recipe_error(f"calibration.method: {c.method!r} is not available with {where}; it offers "
                           f"{list(act_methods)} (or use backend 'native')")
    if c.weights_method not in weight_methods:
        raise recipe_error(f"calibration.weights_method: {c.weights_method!r} is not available with {where}; it "
                           f"offers {list(weight_methods)}")
    if getattr(recipe, "reconstruction", None) is not None:
        raise recipe_error(f"reconstruction: quantcore's AdaRound/BRECQ is not part of {where}; remove the "
                           f"section or use backend 'native'")
    for field, applies, p in spec_patches(recipe):
        if p.format is not None and p.format != "int" and not quantizer_kind(p.format).is_float:
            raise recipe_error(f"{field}.format: {p.format!r} is not an integer grid {where} can calibrate; use "
                               f"format 'int' (or a float cast) or backend 'native'")
        if p.symmetric is False and not asymmetric:
            raise recipe_error(f"{field}.symmetric: false (an asymmetric grid) cannot be expressed by {where}: "
                               f"its calibrators give one amax per tensor/channel; set symmetric: true or use "
                               f"backend 'native'")
        allowed = {"weight": weight_methods, "activation": act_methods}.get(applies, act_methods + weight_methods)
        if p.calibrator is not None and p.calibrator not in allowed:
            raise recipe_error(f"{field}.calibrator: {p.calibrator!r} is not available with {where}; it offers "
                               f"{sorted(set(allowed))}")


def check_quantizer(name: str, q: "TensorQuantizer", backend: str, act_methods: tuple[str, ...],
                    weight_methods: tuple[str, ...], asymmetric: bool) -> None:
    """The effective spec of one quantizer (after overrides): a backstop for :func:`check_common`."""
    s = q.spec
    allowed = weight_methods if q.kind == "weight" else act_methods
    bad = None
    if s.format != "int":
        bad = f"format {s.format!r}"
    elif not s.symmetric and not asymmetric:
        bad = "an asymmetric grid"
    elif s.calibrator not in allowed:
        bad = f"calibrator {s.calibrator!r} (offered: {list(allowed)})"
    if bad:
        raise recipe_error(f"quantizer {name!r} ({s.short()}): {bad} cannot be expressed by calibration.backend "
                           f"{backend!r}; change the recipe's quant/overrides for it or use backend 'native'")


def refuse_data_parallel(backend: str) -> None:
    """The peers calibrate in one process: their statistics are not merged across ranks, so K ranks
    would each calibrate on 1/K of the images and disagree. Refused rather than done silently."""
    from .. import distributed

    if distributed.active():
        raise UserError(f"calibration.backend {backend!r} calibrates in one process, but this run has "
                        f"{distributed.world_size()} ranks (torchrun / Ray Train): its statistics are not merged "
                        f"across ranks, so each rank would calibrate on its own shard only. Calibrate with one "
                        f"process (then train/evaluate data-parallel from the checkpoint), or use backend 'native'")


def weight_tensor(model: nn.Module, name: str, q: "TensorQuantizer") -> torch.Tensor | None:
    """The tensor a weight quantizer's range comes from: the owner's parameter, or what the op
    received during the calibration pass (a weight computed in forward)."""
    from ..placement import unwrap

    if q.weight_attr:
        return getattr(unwrap(model).get_submodule(name.rpartition(".")[0]), q.weight_attr, None)
    return q.observed


class Feed:
    """Stands in for a quantizer's collector during a peer's calibration pass: every tensor the
    quantizer sees goes to the peer's calibrator. ``amax`` (set by the backend once collection ends)
    is read back by :meth:`TensorQuantizer.finalize` as ``min``/``max``."""

    def __init__(self, calibrator: Any) -> None:
        self.calibrator = calibrator
        self.total = 0
        self.amax: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        self.calibrator.collect(x.detach())
        self.total += x.numel()

    @property
    def min(self) -> torch.Tensor:
        return -self.amax

    @property
    def max(self) -> torch.Tensor:
        return self.amax


@contextlib.contextmanager
def feeding(qs: dict[str, "TensorQuantizer"], feeds: dict[str, Feed]) -> Iterator[None]:
    """While open, each quantizer of ``feeds`` collects into its :class:`Feed` (a forward pre-hook
    swaps it in after :func:`quantcore.api.collect` has started a fresh native collector), so
    :func:`quantcore.api.collect` runs the pass (devices, progress, weights off, error clean-up)."""
    def swap(mod: nn.Module, args: tuple, feed: Feed) -> None:
        if mod.calibrating and mod.collector is not feed:
            mod.collector = feed

    handles = [qs[n].register_forward_pre_hook(lambda m, a, f=f: swap(m, a, f)) for n, f in feeds.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def record(res: Any, backend: Any, ranges: dict[str, str], **extra: Any) -> None:
    """Put the backend record into ``res.transforms["backend"]``: the pipeline spreads it into the
    variant's calibration record (report.json, the checkpoint, encodings.json)."""
    counts: dict[str, int] = {}
    for src in ranges.values():
        head = src.split(":")[0]
        counts[head] = counts.get(head, 0) + 1
    res.transforms["backend"] = {"name": backend.name, "version": backend.version(), "engines": counts,
                                 "ranges": dict(ranges), **extra}
