"""The public verbs: prepare -> calibrate -> (evaluate) -> save / load, plus worker-state merging.

    model = quantcore.build_model(recipe)                 # FP32, eval mode
    quantcore.prepare(model, recipe)                      # fold BN, place quantizers (in place)
    quantcore.calibrate(model, batches)                   # collect statistics, finalize ranges
    quantcore.save(model, "s3://bucket/run/model.qc.pt")  # weights + ranges + recipe
    model = quantcore.load("s3://bucket/run/model.qc.pt")

Data-parallel calibration: each worker runs ``collect`` on its shard and returns
``calibration_state(model)``; ``merge_calibration_states`` combines them exactly and
``load_calibration_state`` + ``finalize`` give the same ranges as one worker that saw everything.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from .calib.histogram import HistogramState
from .calib.maxcal import MaxState
from .calib.registry import calibrator
from .checkpoint import CheckpointError, checkpoint_bytes, load_state_strict, read_checkpoint
from .config import Recipe
from .encoding_table import encodings_table
from .errors import CalibrationError, PlacementError, UserError, naming_recipe, one_line
from .fold import FoldError
from .models import create_model
from .placement import (place_quantizers, quantizers, unequal_shared_ranges, unify_shared_ranges,
                        unwrap)
from .quantizer import TensorQuantizer
from .quantizer_kinds.affine import MIN_SCALE
from .recipe import load_recipe, recipe_from_dict
from .versions import library_versions

log = logging.getLogger(__name__)


@dataclass
class CalibrationResult:
    batches: int = 0
    images: int = 0
    collect_s: float = 0.0
    finalize_s: float = 0.0
    uncalibrated: list[str] = field(default_factory=list)
    #: quantizers whose range is at their grid's floor (data too small to resolve), one line each
    warnings: list[str] = field(default_factory=list)
    #: what the recipe's calibration-time transforms did: ``reparam_layernorm``, ``reconstruction``
    transforms: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def build_model(recipe: Recipe | str | dict, load_weights: bool = True, seed: int | None = None) -> nn.Module:
    """The recipe's FP32 model (eval mode). ``model.quantcore_weights`` says where its weights came
    from (``None``: random initialization, no checkpoint/pretrained/pretrained_file). ``seed``: the
    torch seed a random initialization is drawn with (the caller's RNG is left alone); ``None`` draws
    from the caller's RNG. Raises :class:`~quantcore.models.ModelError` naming ``model.name`` when the
    recipe has no ``model:``."""
    return create_model(_recipe(recipe).model, load_weights=load_weights, seed=seed)


def prepare(model: nn.Module, recipe: Recipe | str | dict, example_input: Any = None) -> nn.Module:
    """Fold BatchNorm and place quantizers in place, as the recipe says. Returns the model.

    ``model`` may be any ``nn.Module`` you built yourself: the recipe's ``model:`` section is then
    optional (it is only used to build a model, and for its ``img_size``/``in_chans``).

    ``example_input`` (a ``(N, C, H, W)`` tensor or a tuple of positional inputs) is run once to find
    the ops to quantize and to prove BatchNorm folds; by default a seeded random tensor shaped like
    the model's input (``model.img_size``/``in_chans`` of the recipe win). The model is left in eval
    mode, whatever mode it came in (BatchNorm is folded with its running statistics, and calibration
    runs in eval mode): call ``model.train()`` before training it (QAT). Raises
    :class:`~quantcore.errors.PlacementError` naming the field/module/quantizer on a mistake.
    """
    return _prepare(model, recipe, example_input)


def _prepare(model: nn.Module, recipe: Recipe | str | dict, example_input: Any = None,
             fold_pairs: list | None = None) -> nn.Module:
    """:func:`prepare`; ``fold_pairs``: the BatchNorm folds a checkpoint records (:func:`load`)."""
    from .placement import default_example_input

    recipe = _recipe(recipe)
    model.eval()
    inner = unwrap(model)  # placement, names and the recipe belong to the model inside any wrapper
    if example_input is None:
        mc = recipe.model
        example_input = default_example_input(inner, img_size=getattr(mc, "img_size", None),
                                              in_chans=getattr(mc, "in_chans", None))
    try:
        place_quantizers(inner, recipe.placement, recipe.weight_spec(), recipe.activation_spec(),
                         recipe.overrides, bins=recipe.calibration.bins, example_input=example_input,
                         fold_pairs=fold_pairs)
    except PlacementError as err:  # several recipes run at once: say whose field it is
        raise naming_recipe(err, recipe.name) from None
    _quantizers_to_host_devices(inner)
    for name, q in quantizers(inner).items():  # errors name the quantizer on every path (a load too)
        q.qname = name
    inner.quantcore_recipe = recipe
    return model


def _quantizers_to_host_devices(model: nn.Module) -> None:
    """Put each quantizer (built on the CPU) on the device of the module that holds it: a model
    prepared where it already lives (a GPU) then keeps its ranges there, instead of on the CPU beside
    GPU weights (seen: QAT's PTQ copy failed with "cuda:0 and cpu" at its first forward).

    A holder's device is that of its nearest parameter or buffer (its own first, then its descendants',
    breadth first, quantizers at any depth skipped: they are still on the CPU); a holder with none
    takes its parent's, so a split model's quantizers follow their own part."""
    def own_device(m: nn.Module) -> torch.device | None:
        level = [m]
        while level:
            for cur in level:
                for t in itertools.chain(cur.parameters(recurse=False), cur.buffers(recurse=False)):
                    return t.device
            level = [c for cur in level for c in cur.children() if not isinstance(c, TensorQuantizer)]
        return None

    def walk(m: nn.Module, inherited: torch.device | None) -> None:
        dev = own_device(m) or inherited
        for child in m.children():
            if isinstance(child, TensorQuantizer):
                if dev is not None:
                    child.to(dev)
            else:
                walk(child, dev)

    walk(model, None)


def _images(batch: Any) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, dict) and "image" in batch:
        return batch["image"]
    raise UserError(f"calibration batch must be a tensor, (images, ...) or {{'image': ...}}, got {type(batch).__name__}")


def input_count(model: nn.Module) -> int:
    """Positional inputs the model was prepared with (``example_input``'s tuple length; 1 for images)."""
    return int(getattr(getattr(unwrap(model), "quantcore_placement", None), "example_inputs", 1) or 1)


def _model_inputs(model: nn.Module, batch: Any) -> tuple[torch.Tensor, ...]:
    """The positional inputs of one calibration batch: ``(images,)`` for an image model (a batch is a
    tensor, ``(images, labels, ...)`` or ``{'image': ...}``); for a model prepared with a k-tuple
    ``example_input``, the batch's first k tensors (``(input_1, ..., input_k[, labels ...])``)."""
    k = input_count(model)
    if k == 1:
        return (_images(batch),)
    if not (isinstance(batch, (tuple, list)) and len(batch) >= k
            and all(isinstance(t, torch.Tensor) for t in batch[:k])):
        got = f"a {type(batch).__name__} of {len(batch)}" if isinstance(batch, (tuple, list)) else type(batch).__name__
        raise UserError(f"calibration batch: the model was prepared with {k} positional inputs (example_input), so "
                        f"each batch must be a tuple (input_1, ..., input_{k}[, labels ...]) of tensors; got {got}")
    return tuple(batch[:k])


def refuse_multi_input(model: nn.Module, what: str) -> None:
    """UserError for a step that feeds the model images alone (reparameterization, reconstruction,
    peer backends) when the model takes several inputs: it would drop all but the first."""
    k = input_count(model)
    if k > 1:
        raise UserError(f"{what}: feeds the model one image tensor, but it was prepared with {k} positional inputs "
                        f"(example_input); calibrate it with the native backend and without it")


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _refuse_learned(model: nn.Module) -> None:
    """CalibrationError when a quantizer has a learned (QAT) range: its forward uses the learned scale, so
    new statistics would set a range nothing reads, and :func:`convert` would then write the learned
    one back over it (calibration, loading merged statistics and finalizing them all refuse)."""
    learned = [n for n, q in quantizers(model).items() if q.spec.learnable and q.scale is not None]
    if learned:
        who = f"quantizer {learned[0]!r} has" if len(learned) == 1 else \
            f"{len(learned)} quantizers (e.g. {learned[0]!r}) have"
        raise CalibrationError(f"{who} a learned (QAT) range, which the forward uses: calibrating would not change "
                               f"it. Call quantcore.convert(model) first to calibrate anew (the learned ranges are "
                               f"replaced), or keep the learned ranges")


def start_calibration(model: nn.Module) -> None:
    """Put every activation quantizer in collection mode with fresh statistics; CalibrationError for a
    model with learned (QAT) ranges (:func:`_refuse_learned`)."""
    _refuse_learned(model)
    for name, q in quantizers(model).items():
        q.qname = name
        q.start_calibration()


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside, each module's own ``training`` flag restored after: calibration
    describes the model at inference (BatchNorm running statistics, no dropout), and a pass in train
    mode would update the FP32 model's BatchNorm statistics."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, t in modes:
            m.training = t


_NONE = object()  # "no first batch" (a batch may be any object, None included)


@torch.no_grad()
def collect(model: nn.Module, batches: Iterable, max_batches: int | None = None,
            progress: Any = None) -> CalibrationResult:
    """Run forward passes in collection mode (statistics only, outputs are FP32), in eval mode
    (:func:`eval_mode`: the model's train/eval state is restored afterwards)."""
    with eval_mode(model):
        return _collect(model, batches, max_batches, progress)


def _collect(model: nn.Module, batches: Iterable, max_batches: int | None, progress: Any) -> CalibrationResult:
    res = CalibrationResult()
    dev = _device(model)
    t0 = time.perf_counter()
    start_calibration(model)
    # Statistics describe the float model: weights already calibrated (a re-calibration) must not
    # be fake-quantized while activations are collected.
    weights = [q for q in quantizers(model).values() if q.kind == "weight"]
    before = [q.quantize for q in weights]
    for q in weights:
        q.quantize = False
    try:
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            xs = tuple(t.to(dev, non_blocking=True) for t in _model_inputs(model, batch))
            model(*xs)
            res.batches += 1
            res.images += xs[0].shape[0]
            if progress is not None:
                progress(xs[0].shape[0])
    except BaseException:
        # A failed pass must not leave quantizers collecting (they would pass activations through
        # and keep adding later data to the statistics).
        for q in quantizers(model).values():
            q.calibrating, q.observe = False, False
        raise
    finally:
        for q, b in zip(weights, before):
            q.quantize = b
    res.collect_s = time.perf_counter() - t0
    return res


@torch.no_grad()
def finalize(model: nn.Module, result: CalibrationResult | None = None) -> CalibrationResult:
    """Weights from their parameters, activations from collected statistics, shared groups unified.
    Raises CalibrationError for a model with learned (QAT) ranges (:func:`convert` it first)."""
    _refuse_learned(model)
    res = result or CalibrationResult()
    t0 = time.perf_counter()
    qs = quantizers(model)
    inner = unwrap(model)
    for name, wq in qs.items():  # weights: from the parameter, or from what the op received
        if wq.kind != "weight":
            continue
        owner = name.rpartition(".")[0]
        src = getattr(inner.get_submodule(owner), wq.weight_attr, None) if wq.weight_attr else wq.observed
        wq.observe, wq.observed = False, None
        if isinstance(src, torch.Tensor):
            with _naming(name, wq):
                wq.calibrate_tensor(src)
        elif wq.spec.on_grid:
            wq.reset_range()  # not reached by this calibration: passes through, as an activation's
            res.uncalibrated.append(name)
    for name, q in qs.items():
        if q.kind != "activation":
            continue
        with _naming(name, q):
            done = q.finalize()
        if not done and q.spec.enabled:
            res.uncalibrated.append(name)  # never reached by the data: stays pass-through, reported
    if res.uncalibrated:  # a quantizer in the tables that does not act must be said, not only recorded
        w = (f"{len(res.uncalibrated)} quantizer(s) saw no calibration data and pass values through unquantized "
             f"(e.g. {res.uncalibrated[0]!r}): a branch or input the calibration batches did not reach")
        res.warnings.append(w)
        log.warning(w)
    unify_shared_ranges(model)
    for w in _floored(qs) + _degenerate(qs):
        res.warnings.append(w)
        log.warning(w)
    res.finalize_s = time.perf_counter() - t0
    return res


def calibrators_used(model: nn.Module) -> dict[str, dict[str, int]]:
    """How many enabled integer-grid quantizers of each kind (``activation``/``weight``) use each
    calibrator, e.g. ``{"activation": {"mse": 40, "max": 8}, "weight": {"max": 48}}``: what ran, after
    the recipe's sections and overrides (float casts have no calibrator and are left out)."""
    out: dict[str, dict[str, int]] = {}
    for q in quantizers(model).values():
        if q.spec.on_grid:
            per = out.setdefault(q.kind, {})
            per[q.spec.calibrator] = per.get(q.spec.calibrator, 0) + 1
    return out


def method_summary(used: dict[str, dict[str, int]], kind: str = "activation") -> str:
    """``"mse"``, or ``"mse (40), max (8)"`` when several calibrators ran; ``"none"`` without any."""
    per = used.get(kind, {})
    if len(per) == 1:
        return next(iter(per))
    return ", ".join(f"{m} ({n})" for m, n in sorted(per.items(), key=lambda kv: (-kv[1], kv[0]))) or "none"


def _floored(qs: dict[str, Any]) -> list[str]:
    """One line per quantizer whose range is still at its grid's floor (TensorQuantizer.set_range;
    a shared group's wider range replaces it): data that small rounds to zero."""
    out = []
    for name, q in qs.items():
        if q.floored_from is None or not q.is_calibrated or q.spec.is_float:
            continue
        at = q.spec.kind.grid_range(q.amin, q.amax, q.spec)[2]
        if not bool(at.any()):
            continue
        what = f"quantizer {name!r} ({q.spec.bits}-bit {q.spec.format})"
        if at.dim() and at.numel() > 1:  # per channel: the floored channels, not the whole tensor's range
            lo_c, hi_c = (torch.as_tensor(t).expand(at.shape) for t in q.floored_from)
            idx = torch.nonzero(at & ((lo_c != 0) | (hi_c != 0))).flatten().tolist()  # all-zero rows lose nothing
            if not idx:
                continue
            first = idx[0]
            out.append(f"{what}: {len(idx)} of {at.numel()} channels (axis {q.spec.axis}; e.g. channel {first}: "
                       f"calibrated range [{float(lo_c[first]):.3g}, {float(hi_c[first]):.3g}]) are narrower than the grid's "
                       f"smallest scale ({MIN_SCALE:g}) resolves; quantized on the grid "
                       f"[{float(q.amin.flatten()[first] if q.amin.numel() > 1 else q.amin):.3g}, "
                       f"{float(q.amax.flatten()[first]):.3g}] there (values this small round to zero; "
                       f"encodings.json records that grid)")
            continue
        c = q.collector
        lo, hi = (c.min, c.max) if c is not None and c.total else q.floored_from
        lo, hi = float(torch.as_tensor(lo).min()), float(torch.as_tensor(hi).max())
        out.append(f"{what}: data range [{lo:.3g}, {hi:.3g}] "
                   f"is narrower than the grid's smallest scale ({MIN_SCALE:g}) resolves; quantized on the "
                   f"grid [{float(q.amin.min()):.3g}, {float(q.amax.max()):.3g}] (values this small round to "
                   f"zero; encodings.json records that grid)")
    return out


#: a calibrated range is reported as degenerate when it clips at least this share of the calibration
#: values and its expected squared error is at least DEGENERATE_ERROR times that of the plain min/max
DEGENERATE_CLIP = 0.1
DEGENERATE_ERROR = 4.0
#: ... or, when at least half the values are (near) zero, clips this share of the non-zero ones
DEGENERATE_CLIP_NONZERO = 0.5


def _degenerate(qs: dict[str, Any]) -> list[str]:
    """One line per per-tensor integer activation quantizer whose histogram range search returned a
    range that cuts off much of the data (e.g. the entropy/KL search of TensorRT and ModelOpt on data far
    from zero: every threshold below the data folds all mass into one bin, KL 0, and the search keeps
    such a threshold). The range is kept (it is what the calibrator computes) and named, with the
    figures, so it is never silently used."""
    from .calib.search import bin_width, mse_objective, occupied_bins

    out = []
    for name, q in qs.items():
        c = q.collector
        if (q.kind != "activation" or not isinstance(c, HistogramState) or not c.total or q.spec.is_float
                or not q.spec.enabled or q.spec.kind.name != "int" or q.amax.numel() != 1):
            continue
        lo, hi = float(q.amin), float(q.amax)
        counts, e0 = occupied_bins(c)
        w = bin_width(c)
        centers = e0 + (torch.arange(counts.numel(), dtype=torch.float64) + 0.5) * w
        total = max(float(counts.sum()), 1.0)
        clipped_n = float(counts[(centers < lo) | (centers > hi)].sum())
        clipped = clipped_n / total
        # the bin holding zero: a post-ReLU map can be 99 % exact zeros, and a range that clips every
        # non-zero value then clips "only" 1 % of the values (percentile 99 inside the zero mass)
        if w > 0:
            iz = int(round(-e0 / w))
            zeros = float(counts[iz]) if 0 <= iz < counts.numel() else 0.0
        else:  # every value the same (a dead layer: all zeros): one point, no bins
            zeros = total if c.min == 0.0 == c.max else 0.0
        nonzero = total - zeros
        clipped_nz = clipped_n / nonzero if nonzero > 0 else 0.0
        zero_heavy = zeros >= 0.5 * total and clipped_nz >= DEGENERATE_CLIP_NONZERO
        if clipped < DEGENERATE_CLIP and not zero_heavy:
            continue
        err = float(mse_objective(c, q.spec, lo, hi)[0])
        ref = float(mse_objective(c, q.spec, min(c.min, 0.0), max(c.max, 0.0))[0])  # grids hold zero
        if err < DEGENERATE_ERROR * max(ref, 1e-30):
            continue
        head = (f"quantizer {name!r} ({q.spec.bits}-bit, calibrator {q.spec.calibrator!r}): "
                f"range [{lo:.4g}, {hi:.4g}] clips")
        data = f"data [{c.min:.4g}, {c.max:.4g}]"
        excess = f"expected squared error {err / max(ref, 1e-30):.3g}x that of the min/max range"
        if clipped < DEGENERATE_CLIP:  # zero-heavy: the percentile (or search) landed in the zeros
            out.append(f"{head} {100 * clipped_nz:.1f}% of the non-zero calibration values ({100 * zeros / total:.1f}% "
                       f"of all are zero or nearly; {data}); {excess}. A percentile counts the zeros: "
                       + (f"percentile {q.spec.percentile:g} lies inside them; "
                          if q.spec.calibrator == "percentile" else "")
                       + "use calibrator 'mse' or 'max', or a higher percentile, for it (an override)")
            continue
        if q.spec.calibrator == "percentile":  # it clips by design: the percentile is what to change
            out.append(f"{head} {100 * clipped:.1f}% of the calibration values ({data}); {excess}. The range is "
                       f"percentile {q.spec.percentile:g} of the calibration values, as asked; use a higher "
                       f"percentile, or calibrator 'mse', for it (an override)")
            continue
        others = [m for m in ("mse", "percentile") if m != q.spec.calibrator]
        out.append(f"{head} {100 * clipped:.1f}% of the calibration values ({data}); {excess}"
                   + f". The {q.spec.calibrator} search assumes most values lie near zero"
                   + (" (KL search: every threshold below the data folds it into one bin)"
                      if q.spec.calibrator == "entropy" else "")
                   + f"; use calibrator {' or '.join(repr(c) for c in others)} for it (an override)")
    return out


@contextlib.contextmanager
def _naming(name: str, q: Any) -> Iterator[None]:
    """Range searches raise plain ValueErrors (they do not know the quantizer's name): name it."""
    from .plugins import PluginError

    try:
        yield
    except (CalibrationError, PluginError):  # already name the quantizer
        raise
    except ValueError as e:
        raise CalibrationError(f"quantizer {name!r} (format {q.spec.format!r}, calibrator "
                               f"{q.spec.calibrator!r}): {e}") from None


def calibrate(model: nn.Module, batches: Iterable, max_batches: int | None = None,
              progress: Any = None) -> CalibrationResult:
    """Collect statistics over ``batches`` and finalize every range.

    Under ``torch.distributed`` (torchrun, Ray Train) every rank passes its own shard of the
    calibration data; the ranks' statistics are all-gathered and merged exactly
    (:func:`merge_calibration_states`) before every rank finalizes, so K ranks get bit-for-bit the
    ranges of one process that saw all the shards. ``batches``/``images`` count all ranks.

    The recipe's calibration-time transforms run here, so every path that calibrates a recipe
    (``ptq``, QAT's start point, analysis, Ray/torchrun ranks) applies them, each once per model:
    with ``placement.reparam_layernorm`` the LayerNorms are first reparameterized (RepQ-ViT) from one
    extra FP32 pass over ``batches`` (:func:`quantcore.transforms.reparam_layernorm`); with a
    ``reconstruction`` section the weights' rounding is then learned (AdaRound/BRECQ,
    :func:`quantcore.recon.reconstruct`) on the same batches. ``result.transforms`` reports both.

    Every pass runs in eval mode (:func:`eval_mode`); the model's train/eval state is restored after."""
    with eval_mode(model):
        return _calibrate(model, batches, max_batches, progress)


def _calibrate(model: nn.Module, batches: Iterable, max_batches: int | None, progress: Any) -> CalibrationResult:
    from . import distributed

    if not distributed.active():  # under torchrun a rank's shard may be empty; the ranks' total counts
        # refused before any quantizer starts collecting: an empty pass would drop the ranges it has
        # and leave every activation quantizer passing values through, with a warning only
        try:
            empty = len(batches) == 0  # type: ignore[arg-type]
        except TypeError:  # no length: a one-shot iterator (a generator) is peeked, its batch handed back
            empty = False
            if iter(batches) is batches:
                first = next(batches, _NONE)
                empty = first is _NONE
                batches = itertools.chain([first], batches)
        if empty:
            raise CalibrationError("calibration data: no batches (an empty calibration set): calibrate on at "
                                   "least one batch of images")
    inner = unwrap(model)
    recipe = getattr(inner, "quantcore_recipe", None)
    reparam = recipe is not None and recipe.placement.reparam_layernorm and \
        getattr(inner, "quantcore_reparam", None) is None
    recon = recipe is not None and getattr(recipe, "reconstruction", None) is not None and \
        getattr(inner, "quantcore_reconstruction", None) is None
    from .plugins import is_plugin

    # a plug-in kind's fake_quant first runs after calibration: one checking forward on two calibration
    # images, so no checkpoint is written that fails at its first forward (the built-in kinds refuse
    # what they cannot carry while the range is computed)
    plugin_kinds = sorted({q.spec.format for q in quantizers(inner).values()
                           if q.spec.enabled and is_plugin(q.spec.kind)})
    if (reparam or recon) and iter(batches) is batches:  # a one-shot iterator: every pass reads the same batches
        batches = list(batches)
    if plugin_kinds:  # the first batch is kept as it passes (a one-shot or endless iterator is read once)
        batches = _FirstKept(batches)
    if recon:
        refuse_multi_input(model, "reconstruction")
    if reparam:
        refuse_multi_input(model, "placement.reparam_layernorm")
        from .transforms import reparam_layernorm

        reparam_layernorm(model, batches, max_batches)
    from .backends import calibrate as backend_calibrate

    # calibration.backend computes the ranges: native = collect + sync_calibration + finalize
    res = backend_calibrate(model, batches, max_batches, progress)
    if recon:
        from .recon import reconstruct

        reconstruct(model, batches, recipe.reconstruction)
    if plugin_kinds:
        _check_forward(model, batches.first)
    for key, attr in (("reparam_layernorm", "quantcore_reparam"), ("reconstruction", "quantcore_reconstruction")):
        done = getattr(inner, attr, None)
        if done is not None and hasattr(done, "as_dict"):
            res.transforms[key] = done.as_dict()
    return res


class _FirstKept:
    """``batches`` as they are (iterated once per pass, ``len`` when it has one), keeping the first
    batch that passes in ``first`` (None until then)."""

    def __init__(self, batches: Iterable) -> None:
        self.batches, self.first = batches, None

    def __iter__(self) -> Iterator:
        for batch in self.batches:
            if self.first is None:
                self.first = batch
            yield batch

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type] - TypeError without one, as the batches'


def _check_forward(model: nn.Module, first: Any) -> None:
    """One quantized forward of the first two images of ``first`` (a calibration batch; None: this
    rank's shard was empty): a plug-in kind's failure raises its PluginError naming the quantizer here,
    not at the first evaluation. Inputs without the batch dimension are passed whole."""
    if first is None:
        return
    dev = _device(model)
    xs = _model_inputs(model, first)
    n = xs[0].shape[0] if xs and xs[0].dim() else None
    xs = tuple((t[:2] if n is not None and t.dim() and t.shape[0] == n else t).to(dev) for t in xs)
    with torch.no_grad(), eval_mode(model):
        model(*xs)


def sync_calibration(model: nn.Module, result: CalibrationResult | None = None) -> None:
    """All-gather every rank's collected statistics and load their exact merge on every rank (a
    no-op without a process group). Call between :func:`collect` and :func:`finalize`."""
    from . import distributed

    if not distributed.active():
        return
    mine = (calibration_state(model), (result.batches, result.images) if result else (0, 0))
    gathered = distributed.all_gather_object(mine)
    load_calibration_state(model, merge_calibration_states([g[0] for g in gathered]))
    if result is not None:
        result.batches = sum(g[1][0] for g in gathered)
        result.images = sum(g[1][1] for g in gathered)


# -- data-parallel calibration ----------------------------------------------------------------------
def calibration_state(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Each activation quantizer's collected statistics as plain tensors/numbers."""
    out = {}
    for name, q in quantizers(model).items():
        if q.kind == "activation" and q.collector is not None:
            kind = "hist" if isinstance(q.collector, HistogramState) else "max"
            out[name] = {"type": kind, **q.collector.to_dict()}
        elif q.kind == "weight" and q.observed is not None:
            # A weight computed in forward (StdConv2d, a scaled or LoRA-merged weight): the tensor the
            # op received is its calibration data (identical on every worker).
            out[name] = {"type": "observed_weight", "tensor": q.observed.detach().cpu()}
    return out


def _state_obj(d: dict[str, Any]) -> HistogramState | MaxState | torch.Tensor:
    body = {k: v for k, v in d.items() if k != "type"}
    if d["type"] == "observed_weight":
        return body["tensor"]
    return HistogramState.from_dict(body) if d["type"] == "hist" else MaxState.from_dict(body)


def merge_calibration_states(states: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Exact merge of several workers' statistics (order does not matter)."""
    if not states:
        raise UserError("merge_calibration_states needs at least one state")
    names = set().union(*states)
    merged = {}
    for name in sorted(names):
        if states[0].get(name, {}).get("type") == "observed_weight" or any(
                s.get(name, {}).get("type") == "observed_weight" for s in states):
            merged[name] = next(s[name] for s in states if name in s)
            continue
        parts = [_state_obj(s[name]) for s in states if name in s]
        acc = parts[0]
        for p in parts[1:]:
            acc.merge(p)
        merged[name] = {"type": "hist" if isinstance(acc, HistogramState) else "max", **acc.to_dict()}
    return merged


def load_calibration_state(model: nn.Module, state: dict[str, dict[str, Any]]) -> None:
    _refuse_learned(model)
    qs = quantizers(model)
    unknown = sorted(set(state) - set(qs))
    if unknown:
        raise UserError(f"calibration state names quantizers this model lacks: {unknown[:5]} (prepared "
                        f"with another recipe or model?)")
    for name, d in state.items():
        obj = _state_obj(d)
        if isinstance(obj, torch.Tensor):
            qs[name].observed = obj.to(qs[name].amax.device)
        else:
            qs[name].collector = obj


def convert(model: nn.Module) -> nn.Module:
    """After QAT: write every learned scale/zero point back into its quantizer's range
    (:meth:`TensorQuantizer.convert`), so ``encodings``, ``save``/``load`` and export report the
    trained values. Outputs are unchanged bit for bit for scales QAT learned (it leaves them
    representable); a scale set by hand to one of the few float32 values no range reproduces moves
    to the nearest one that does (one ulp). Returns the model."""
    for q in quantizers(model).values():
        q.convert()
    return model


# -- switches ---------------------------------------------------------------------------------------
def set_quantization(model: nn.Module, enabled: bool) -> None:
    """Turn fake quantization on/off everywhere (ranges are kept)."""
    for q in quantizers(model).values():
        q.quantize = enabled


@contextlib.contextmanager
def quantization_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the FP32 path of a prepared model temporarily. The switch is the model's (every
    quantizer's ``quantize`` flag), not the thread's: other threads using the same model meanwhile
    run float too. Use a ``copy.deepcopy`` per thread to compare both paths concurrently."""
    qs = quantizers(model).values()
    before = [q.quantize for q in qs]
    for q in qs:
        q.quantize = False
    try:
        yield model
    finally:
        for q, b in zip(qs, before):
            q.quantize = b


# -- artifacts --------------------------------------------------------------------------------------
def encodings(model: nn.Module, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``encodings.json`` table (names of the unwrapped model under DDP / torch.compile)."""
    return encodings_table(unwrap(model), extra)


def save(model: nn.Module, uri: str, extra: dict[str, Any] | None = None) -> None:
    """Write a calibrated checkpoint atomically to a local path or s3:// URI (the unwrapped model's
    names under DDP / torch.compile, so it loads into a plain model). A model loaded from a QAT
    checkpoint keeps its ``extra["qat"]`` record (what it was trained with) unless ``extra`` sets one."""
    from .io import storage

    model = unwrap(model)
    recipe = getattr(model, "quantcore_recipe", None)
    if recipe is None:
        raise UserError("save() needs a model prepared with quantcore.prepare (it carries the recipe)")
    specs = {n: q.spec.model_dump() for n, q in quantizers(model).items()}
    placement = getattr(model, "quantcore_placement", None)
    extra = dict(extra or {})
    loaded = (getattr(model, "quantcore_meta", None) or {}).get("extra") or {}
    if loaded.get("qat") and "qat" not in extra:
        extra["qat"] = loaded["qat"]  # trained weights stay trained through a load + save
    meta = {"recipe": recipe.model_dump(mode="json"), "quantizer_specs": specs,
            "example_input_shape": list(getattr(placement, "example_input_shape", []) or []),
            "family": getattr(placement, "family", None),  # what family: auto chose (a plug-in's, maybe)
            # the folds decided on the real weights: load() builds on placeholders, which must not decide
            "folded_bn": [list(p) for p in getattr(placement, "folded_bn", [])],
            "versions": library_versions(), "plugins": _plugin_classes(model), "extra": extra}
    tf = _transform_record(model)
    if tf is not None:
        meta["eval_transform"] = tf
    definition = getattr(model, "quantcore_definition", None)
    if definition:  # the files the architecture was read from (an HF directory's config.json ...)
        meta["model_definition"] = definition
    storage.write_bytes(uri, checkpoint_bytes(model, meta))


# what decides the pixels a model is calibrated and evaluated on (not the decoder, which is exact)
_TRANSFORM_KEYS = ("input_size", "resize_size", "mean", "std", "crop_pct", "crop_mode", "interpolation", "mode",
                   "alpha")


def _transform_record(model: nn.Module) -> dict[str, Any] | None:
    from .data import describe_transform
    from .data.transforms import has_data_config

    if not has_data_config(unwrap(model)):  # torchvision's fixed preset: nothing the files could change
        return None  # (and describing it would warn about a preset on every save and load)
    try:
        cfg = describe_transform(model)
    except Exception:  # noqa: BLE001 - a model quantcore has no data config for: nothing to record
        return None
    return {k: cfg.get(k) for k in _TRANSFORM_KEYS if k in cfg}


def _check_transform(model: nn.Module, meta: dict[str, Any], uri: str) -> None:
    """The ranges were calibrated on images preprocessed as stored; a model rebuilt from files that now
    say otherwise (an edited preprocessor_config.json, another timm version's pretrained_cfg) would be
    evaluated on other pixels without a word."""
    stored = meta.get("eval_transform")
    now = _transform_record(model) if stored else None
    if not stored or now is None:
        return
    diff = [f"{k} {stored.get(k)!r} -> {now.get(k)!r}" for k in _TRANSFORM_KEYS
            if k in stored and json.dumps(stored.get(k)) != json.dumps(now.get(k))]
    if diff:
        log.warning("checkpoint %s was calibrated with other preprocessing than its rebuilt model now gives "
                    "(%s): its ranges assume the stored one; evaluate with the original model files",
                    uri, "; ".join(diff))


def _plugin_classes(model: nn.Module) -> dict[str, str]:
    """``{"format 'int_pow2'": "module.Class", ...}``: the plug-in classes (defined outside quantcore)
    behind the kinds, calibrators and family the prepared ``model`` uses, recorded in a checkpoint so a
    load under another class of the same name says so."""
    from .placement.families import family_plan
    from .plugins import is_plugin

    def qual(obj: Any) -> str:
        return f"{type(obj).__module__}.{type(obj).__qualname__}"

    out: dict[str, str] = {}
    for q in quantizers(model).values():
        if is_plugin(q.spec.kind):
            out[f"format {q.spec.format!r}"] = qual(q.spec.kind)
        if not q.spec.is_float and is_plugin(cal := calibrator(q.spec.calibrator)):
            out[f"calibrator {q.spec.calibrator!r}"] = qual(cal)
    family = getattr(getattr(unwrap(model), "quantcore_placement", None), "family", None)
    try:
        plan = family_plan(family) if family else None
    except ValueError:
        plan = None
    if plan is not None and is_plugin(plan):
        out[f"family {family!r}"] = qual(plan)
    return dict(sorted(out.items()))


def load(uri: str, model: nn.Module | None = None, example_input: Any = None) -> nn.Module:
    """Load a calibrated checkpoint, with every weight, range and quantizer spec it stores.

    The FP32 model is rebuilt from the stored recipe's ``model:`` section (no weights are downloaded:
    the checkpoint holds them all). A model you built yourself (no ``model:`` section, or a class
    quantcore cannot build) is passed as ``model``: a fresh, unprepared instance of the same
    architecture, e.g. ``quantcore.load(uri, model=MyNet())``; its weights are replaced.
    ``example_input``: the probe input for placement (default: a seeded random tensor of the shape
    stored at calibration time); pass one for a model that does not take a float image tensor.
    """
    from .io import storage

    try:
        data = storage.read_bytes(uri)
    except (FileNotFoundError, IsADirectoryError) as err:
        inner = storage.join(uri, "model.qc.pt")
        hint = f"; the calibrated checkpoint in it is {inner}" if storage.exists(inner) else ""
        what = "a directory, not a checkpoint file" if isinstance(err, IsADirectoryError) or hint else "not found"
        raise CheckpointError(f"checkpoint {uri}: {what}{hint}") from None
    meta, state = read_checkpoint(data, uri)
    recipe = recipe_from_dict(meta["recipe"], f"{uri} (stored recipe)", stored=True)
    if model is None:
        if recipe.model is None:
            raise CheckpointError(f"checkpoint {uri}: its recipe has no model: section to rebuild the model "
                                  f"from; pass the module: quantcore.load(uri, model=MyModel())")
        try:
            model = _rebuild(recipe, meta)
        except UserError as err:
            raise CheckpointError(f"checkpoint {uri}: the model is rebuilt from its recipe's model: section "
                                  f"(weights from the checkpoint), which failed: {err}") from None
    shape = meta.get("example_input_shape") or None
    if example_input is None and shape:  # the probe input of calibration time (same seed, same shape)
        example_input = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    family = meta.get("family")
    if family is not None:
        from .placement.families import family_names

        if family not in family_names():  # family: auto would silently detect another one
            raise CheckpointError(f"checkpoint {uri}: it was placed by model family {family!r}, which is not "
                                  f"registered here (registered: {family_names()}); import the plug-in that "
                                  f"registers it first (the CLI: QUANTCORE_PLUGINS=module)")
    folds = meta.get("folded_bn")
    if folds is not None:
        fold_pairs: list | None = [tuple(p) for p in folds]
    elif recipe.placement.fold_bn:  # written before the record: the BatchNorms its state lacks were folded
        from .fold import is_batchnorm

        fold_pairs = [n for n, m in unwrap(model).named_modules()
                      if is_batchnorm(m) and not any(k.startswith(f"{n}.") for k in state)]
    else:
        fold_pairs = None
    try:
        _prepare(model, recipe, example_input=example_input, fold_pairs=fold_pairs)
    except (FoldError, PlacementError) as err:  # the stored recipe does not place on this model: name the file
        raise CheckpointError(f"checkpoint {uri}: {err}") from None
    qs = quantizers(model)
    specs = meta.get("quantizer_specs", {})
    if set(specs) != set(qs):
        raise CheckpointError(f"checkpoint {uri}: stored quantizers differ from the model's placement "
                              f"(only in file: {sorted(set(specs) - set(qs))[:5]}, only in model: "
                              f"{sorted(set(qs) - set(specs))[:5]})")
    from .formats import QuantSpec

    for name, spec in specs.items():
        if isinstance(spec, dict) and spec.get("format") == "int_dynamic" and "scale_format" not in spec:
            spec = {**spec, "scale_format": "fp32"}  # written before the field: its scales were float32
        try:
            qs[name].set_spec(QuantSpec.model_validate(spec))
        except ValueError as err:  # pydantic's ValidationError too: a format/calibrator not registered here
            raise CheckpointError(f"checkpoint {uri}: quantizer {name!r}: {one_line(err)}") from None  # (hint: registry)
    load_state_strict(model, state, uri)
    model.quantcore_meta = meta
    _check_transform(model, meta, uri)
    classes = _plugin_classes(model) if meta.get("plugins") else {}
    for what, cls in (meta.get("plugins") or {}).items():
        now = classes.get(what)
        if now != cls:  # a registered name is the contract of the recipe, its class that of the numbers
            log.warning("checkpoint %s: %s was implemented by %s when it was written, here by %s: its outputs "
                        "may differ from the run that wrote it", uri, what, cls, now or "quantcore's built-in")
    for group in unequal_shared_ranges(model):
        log.warning("checkpoint %s: quantizers %s share one range in this quantcore's placement (one kernel reads "
                    "them), but were calibrated with different ranges (by an older quantcore): they keep their own "
                    "ranges here and encodings.json does not report them as shared; re-calibrate (quantcore ptq), "
                    "or quantcore.placement.unify_shared_ranges(model) gives them the union", uri, ", ".join(group))
    return model.eval()


def _rebuild(recipe: Recipe, meta: dict[str, Any]) -> nn.Module:
    """The stored recipe's model without weights; from the definition files the checkpoint stores when it
    has them (an HF directory's config.json/preprocessor_config.json, through its source's ``rebuild``), so
    the checkpoint loads the model it was calibrated on wherever it is loaded, whatever the directory at
    ``model.name`` holds by then."""
    definition = meta.get("model_definition") or {}
    if not definition.get("files"):
        return create_model(recipe.model, load_weights=False)
    from .model_sources import SOURCES

    try:
        source = SOURCES.get(definition.get("source", ""))
    except ValueError as err:  # a plug-in source not registered here
        raise UserError(str(err)) from None
    return source.rebuild(recipe.model, definition["files"])


def _recipe(recipe: Recipe | str | dict) -> Recipe:
    return recipe if isinstance(recipe, Recipe) else load_recipe(recipe)


def analyze(model: nn.Module, batches: Iterable, *, search: bool = False, budget: dict[str, float] | None = None,
            calib_batches: Iterable | None = None, eval_batches: Iterable | None = None,
            fp32: nn.Module | None = None, groups: Any = "module", search_groups: Any = "quantizer",
            choices: tuple[str, ...] = ("4", "6", "8", "float"), cost: str = "bits", workers: int = 1,
            out: str | None = None) -> dict[str, Any]:
    """Error analysis, sensitivity and (``search=True``) the mixed-precision search of a calibrated
    model on ``batches`` (``(images, labels)``; see :mod:`quantcore.analysis`).

    ``budget``: one of ``{"delta_top1": 0.1}``, ``{"agreement": 99.5}``, ``{"sqnr_db": 30}``, plus
    optionally ``"confidence": 0.9`` (check the lower confidence bound, see :class:`~.analysis.Budget`).
    ``calib_batches``: the calibration images (statistics for other bit widths; with ``fp32`` the
    chosen recipe is re-run through prepare + calibrate, ``search.reproduced``). ``eval_batches``: a
    final check. ``out``: also write analysis.json/md, plots and search_recipe.yaml there. Returns the
    result dict (``search_recipe``: the recipe YAML). Raises :class:`UserError` naming the option."""
    from .analysis.run import AnalyzeOptions, analyze_model
    from .analysis.search import Budget
    from .recipe import dump_recipe

    from .analysis.engine import check_workers
    from .analysis.run import check_searchable

    check_workers(workers)
    if budget and not search:
        raise UserError("budget: only the mixed-precision search uses a budget; pass search=True")
    if search and not budget:
        raise UserError("search=True needs a budget: budget={'delta_top1': 0.1}, {'agreement': 99.5} or "
                        "{'sqnr_db': 30} (optionally with 'confidence': 0.9)")
    if budget:
        unknown = sorted(set(budget) - {"delta_top1", "agreement", "sqnr_db", "confidence"})
        if unknown:
            raise UserError(f"budget: unknown key(s) {unknown}; use one of delta_top1, agreement, sqnr_db "
                            "(+ confidence)")
    names = {k: f"budget[{k!r}]" for k in ("delta_top1", "agreement", "sqnr_db", "confidence")}
    names["images"] = "in the batches given"
    opts = AnalyzeOptions(search=search, budget=Budget.from_options(**budget, names=names) if budget else None,
                          groups=groups,
                          search_groups=search_groups, choices=choices, cost=cost, workers=workers)
    check_searchable(getattr(unwrap(model), "quantcore_recipe", None), opts, model)
    stats = calibration_state(model) if search and calib_batches is None else None
    res, recipe = analyze_model(model, list(batches), opts, stats=stats, fp32=fp32,
                                calib_batches=list(calib_batches) if calib_batches is not None else None,
                                eval_batches=list(eval_batches) if eval_batches is not None else None)
    if recipe is not None:
        res["search_recipe"] = dump_recipe(recipe)
    if out is not None:
        from .analysis.report import write_outputs

        res["artifacts"] = write_outputs(res, out, res.get("search_recipe"))
    return res


def export(model: nn.Module | str, out: str, formats: str | list[str] = "all", *, opset: int | None = None,
           check_data: str | None = None, check_split: str | None = None, check_limit: int | None = None,
           example_input: torch.Tensor | None = None) -> dict[str, Any]:
    """Write deployment files for a calibrated model (or a checkpoint URI, PTQ or QAT) into ``out`` (local
    directory or s3:// prefix): ``model.onnx`` (QuantizeLinear/DequantizeLinear, TensorRT explicit
    quantization / onnxruntime), ``model_float.onnx`` + ``model.encodings`` (AIMET/QNN 2.0.0),
    ``trt_ranges.json``/``.cache`` (TensorRT per-tensor ranges), ``export_report.json``.

    ``formats``: ``"all"`` or any of ``onnx``, ``aimet``, ``trt-table`` (list or comma-separated). ``opset``:
    13..21 (default 17, 21 when a 4/16-bit quantizer needs it). ``check_data``: dataset URI whose
    ``check_split`` (default ``val``; optionally a seeded class-stratified ``check_limit`` images, 0 = all) is run through
    onnxruntime and the fake-quant model (top-1 agreement, top-1 of both). ``example_input``: the export's
    trace input ``(1, C, H, W)`` (default: the shape stored at calibration). Returns the report. Raises
    :class:`~quantcore.errors.UserError` (``ExportError``) naming the quantizer or option that cannot be
    exported (see :mod:`quantcore.export`)."""
    from .export.run import check_data as check_options, export_checkpoint, export_model

    check = check_options(check_data, check_split, check_limit)
    if isinstance(model, str):
        if example_input is not None:
            return export_model(load(model), out, formats, opset, check, x=example_input, source=model)
        return export_checkpoint(model, out, formats, opset, check)
    return export_model(model, out, formats, opset, check, x=example_input)
