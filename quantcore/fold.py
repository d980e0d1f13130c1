"""BatchNorm folding: merge eval-mode BatchNorm into the preceding convolution.

Pairs are proven on the data flow of one forward on an example input
(:func:`quantcore.placement.probe.run_probe`), never guessed from declaration order: a conv module
folds into a BatchNorm module when

* the conv module's output is exactly the output of its one convolution op, computed with the
  module's own ``weight`` (and ``bias``) parameters (so ``StdConv2d``-style weight transforms or a
  forward that post-processes the conv result are never folded into);
* that output is read by nothing but one call of the BatchNorm module (an activation in between,
  a residual add, a second reader: no fold);
* each module runs once (a shared module would change its other uses too).

Every other BatchNorm is listed with the reason it stayed (:attr:`FoldResult.unfolded`). The folded
model is always compared with the original on the example input; on a mismatch it is restored and
:class:`FoldError` is raised.

A plain BatchNorm is replaced by ``nn.Identity``; timm's ``BatchNormAct2d`` (BN + drop + activation)
by ``nn.Sequential(drop, act)``, keeping its activation.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from .errors import PlacementError

try:
    from torchvision.ops.misc import FrozenBatchNorm2d
except ImportError:  # pragma: no cover
    FrozenBatchNorm2d = None  # type: ignore[assignment]

try:
    from timm.layers.norm_act import BatchNormAct2d
except ImportError:  # pragma: no cover
    BatchNormAct2d = None  # type: ignore[assignment]

try:  # what timm.layers.freeze_batch_norm_2d makes of a BatchNormAct2d (frozen backbones)
    from timm.layers.norm_act import FrozenBatchNormAct2d
except ImportError:  # pragma: no cover
    FrozenBatchNormAct2d = None  # type: ignore[assignment]

__all__ = ["fold_batchnorm", "find_conv_bn_pairs", "FoldError", "FoldResult", "is_batchnorm"]


class FoldError(PlacementError):
    """Folding is impossible or changed the model's outputs."""


@dataclass
class FoldResult:
    pairs: list[tuple[str, str]] = field(default_factory=list)
    unfolded: dict[str, str] = field(default_factory=dict)  # BatchNorm name -> why it stayed
    _backup: list = field(default_factory=list, repr=False)
    _model: Any = field(default=None, repr=False)

    @torch.no_grad()
    def undo(self) -> None:
        """Put the BatchNorms back and the conv weights/biases as they were."""
        for conv, w, b, bn_name, bn in self._backup:
            conv.weight.copy_(w)
            if b is None:
                conv.bias = None
            else:
                conv.bias.copy_(b)
            _set(self._model, bn_name, bn)
        self._backup = []


# -- what can be folded ------------------------------------------------------------------------
def _has_base(mod: nn.Module, base: type | None) -> bool:
    return base is not None and any(k is base for k in type(mod).__mro__)


def _is_conv(mod: nn.Module) -> bool:
    return isinstance(mod, _ConvNd) and not mod.transposed


def is_batchnorm(mod: nn.Module) -> bool:
    return (isinstance(mod, _BatchNorm) or _has_base(mod, FrozenBatchNorm2d) or _has_base(mod, BatchNormAct2d)
            or _has_base(mod, FrozenBatchNormAct2d))


def _is_bn(mod: nn.Module) -> bool:
    """A BatchNorm whose forward we know: plain ``_BatchNorm`` subclasses, timm BatchNormAct2d and
    FrozenBatchNormAct2d, torchvision FrozenBatchNorm2d."""
    if _has_base(mod, BatchNormAct2d):
        return type(mod).forward is BatchNormAct2d.forward
    if _has_base(mod, FrozenBatchNormAct2d):
        return type(mod).forward is FrozenBatchNormAct2d.forward
    if _has_base(mod, FrozenBatchNorm2d):
        return type(mod).forward is FrozenBatchNorm2d.forward
    if isinstance(mod, _BatchNorm):
        return type(mod).forward is _BatchNorm.forward
    return False


def _bn_features(bn: nn.Module) -> int:
    return int(bn.running_mean.numel()) if getattr(bn, "running_mean", None) is not None else -1


def find_conv_bn_pairs(model: nn.Module, example_input: Any) -> FoldResult:
    """``(conv_name, bn_name)`` for every conv->BatchNorm pair the data flow on ``example_input``
    proves foldable, and the reason for every BatchNorm left alone."""
    from .placement.probe import run_probe

    return _pairs_from_trace(model, run_probe(model, example_input)[0])


def _pairs_from_trace(model: nn.Module, trace: Any) -> FoldResult:
    res = FoldResult()
    mods = dict(model.named_modules())
    counts: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        counts[id(m)] = counts.get(id(m), 0) + 1
    # Which calls read each tensor (module calls and ops, with the frames they ran in).
    readers: dict[int, list[tuple[str, Any]]] = {}
    for c in trace.calls:
        for t in set(c.inputs):
            readers.setdefault(t, []).append(("call", c))
    for op in trace.ops:
        for t in set(op.inputs):
            readers.setdefault(t, []).append(("op", op))
    conv_of_output: dict[int, tuple[str, int]] = {}  # output id -> (conv name, seq of its conv op)
    owners: dict[int, int] = {}  # parameter id -> modules holding it (tied weights)
    for _, m in model.named_modules(remove_duplicate=False):
        for prm in m.parameters(recurse=False):
            owners[id(prm)] = owners.get(id(prm), 0) + 1
    shared: dict[int, str] = {}  # output id -> conv whose weight another module holds too
    refused: dict[int, str] = {}  # output id -> why the conv that wrote it cannot take a fold
    for name, mod in mods.items():
        if not _is_conv(mod):
            continue
        calls = trace.calls_of(name)
        if len(calls) != 1 or counts.get(id(mod), 0) != 1:
            why = (f"its conv {name!r} is called {len(calls)} times (one folded weight cannot serve each "
                   f"call's BatchNorm)" if len(calls) > 1 else f"its conv {name!r} is registered more than once")
            for c in calls:
                if len(c.outputs) == 1:
                    refused[c.outputs[0]] = why
            continue
        call = calls[0]
        if any(owners.get(id(prm), 0) > 1 for prm in mod.parameters(recurse=False)):
            # folding rescales the weight: a tied copy elsewhere would change with it
            if len(call.outputs) == 1:
                shared[call.outputs[0]] = name
            continue
        frame = (call.name, call.index)
        convs = [op for op in trace.ops if op.kind == "weighted" and op.stack and op.stack[-1] == frame]
        if len(convs) != 1 or len(call.outputs) != 1 or convs[0].outputs != call.outputs:
            continue
        op = convs[0]
        if op.weight != (f"{name}.weight" if name else "weight"):
            refused[call.outputs[0]] = (f"its conv {name!r} computes its weight in forward (a parametrization "
                                        f"such as weight_norm, or a weight read from elsewhere): there is no "
                                        f"stored weight to fold into")
            continue
        want_bias = f"{name}.bias" if mod.bias is not None else None
        if op.bias != want_bias:
            refused[call.outputs[0]] = f"its conv {name!r} adds a bias other than its own"
            continue
        conv_of_output[call.outputs[0]] = (name, op.seq)

    for bn_name, bn in mods.items():
        if not is_batchnorm(bn) or not bn_name:
            continue
        why = _pair_for(bn_name, bn, trace, readers, conv_of_output, mods, counts, res)
        if why:
            calls = trace.calls_of(bn_name)
            src = calls[0].inputs[0] if len(calls) == 1 and calls[0].inputs else None
            if src in shared:
                why = f"its conv {shared[src]!r} shares its weight with another module (folding would change both)"
            elif src in refused and why.startswith("its input is not the direct output"):
                why = refused[src]
            res.unfolded[bn_name] = why
    return res


def _pair_for(bn_name, bn, trace, readers, conv_of_output, mods, counts, res) -> str:
    if not _is_bn(bn):
        return f"{type(bn).__qualname__} overrides the BatchNorm forward"
    if getattr(bn, "running_mean", None) is None or getattr(bn, "running_var", None) is None:
        return "no running statistics (normalizes with batch statistics)"
    calls = trace.calls_of(bn_name)
    if not calls:
        return "not called on the example input"
    if len(calls) != 1 or counts.get(id(bn), 0) != 1:
        return "called or registered more than once"
    call = calls[0]
    frame = (call.name, call.index)
    if not call.inputs or call.inputs[0] not in conv_of_output:
        return "its input is not the direct output of a convolution module"
    src = call.inputs[0]
    conv_name, born = conv_of_output[src]
    conv = mods[conv_name]
    if conv.out_channels != _bn_features(bn):
        return f"channel count differs from {conv_name!r}"
    hooked = [n for n, m in ((conv_name, conv), (bn_name, bn)) if m._forward_hooks or m._forward_pre_hooks]
    if hooked:  # folded, the conv's hooks would see the BatchNorm's output and the BatchNorm's would not run
        # (a conv's pre-hook may recompute its weight, as torch.nn.utils.weight_norm's and pruning's do)
        return (f"{hooked[0]!r} has forward hooks (a feature extractor's, or a pre-hook that recomputes the weight "
                f"such as weight_norm's or pruning's), which folding would silently change or undo: remove them "
                f"before quantizing, or register them afterwards")
    root = next((c for c in trace.calls if c.name == "" and c.index == 0), None)
    if root is not None and src in root.outputs:
        return f"the output of {conv_name!r} is also returned by the model"
    if src in trace.stashed:  # read after the forward, where the output check does not look
        return f"the output of {conv_name!r} is kept as the attribute {trace.stashed[src]!r}"
    for kind, r in readers.get(src, []):
        if (kind == "call" and r is call) or r.seq < born:
            continue  # the BatchNorm itself, or an older tensor that had the same id
        stack = r.stack
        if frame in stack:
            continue  # read inside the BatchNorm's own forward
        who = r.name if kind == "call" else f"op {r.func} in {stack[-1][0] if stack else '<model>'!r}"
        return f"the output of {conv_name!r} is also read by {who}"
    res.pairs.append((conv_name, bn_name))
    return ""


# -- folding -----------------------------------------------------------------------------------
def _bn_replacement(bn: nn.Module) -> nn.Module:
    if _has_base(bn, BatchNormAct2d) or _has_base(bn, FrozenBatchNormAct2d):  # both: act(drop(bn(x)))
        parts = OrderedDict()
        for key in ("drop", "act"):
            sub = getattr(bn, key, None)
            if isinstance(sub, nn.Module) and not isinstance(sub, nn.Identity):
                parts[key] = sub
        return nn.Sequential(parts) if parts else nn.Identity()
    return nn.Identity()


@torch.no_grad()
def _fold_into(conv: nn.Module, bn: nn.Module) -> None:
    w = conv.weight
    mean = bn.running_mean.to(torch.float64)
    var = bn.running_var.to(torch.float64)
    gamma = bn.weight.to(torch.float64) if getattr(bn, "weight", None) is not None else torch.ones_like(mean)
    beta = bn.bias.to(torch.float64) if getattr(bn, "bias", None) is not None else torch.zeros_like(mean)
    s = gamma / torch.sqrt(var + float(bn.eps))
    b = conv.bias.to(torch.float64) if conv.bias is not None else torch.zeros_like(mean)
    # Per-channel factors in float64; one rounding per weight element (fp16/bf16 weights too).
    w.copy_((w.to(torch.float64) * s.reshape(-1, *([1] * (w.dim() - 1)))).to(w.dtype))
    new_b = ((b - mean) * s + beta).to(w.dtype)
    if conv.bias is not None:
        conv.bias.copy_(new_b)
    else:
        conv.bias = nn.Parameter(new_b, requires_grad=w.requires_grad)


def _set(model: nn.Module, name: str, mod: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, mod)


def fold_batchnorm(model: nn.Module, example_input: Any, rtol: float = 1e-4, atol: float = 1e-5,
                   pairs: list[tuple[str, str]] | None = None) -> FoldResult:
    """Fold every BatchNorm that the data flow on ``example_input`` proves to directly follow a conv,
    in place (see the module docstring). Returns the folded pairs and why each other BatchNorm stayed.

    The model must be in eval mode. The outputs before and after are always compared on
    ``example_input``: within ``rtol`` of each value plus ``atol`` times the output's abs-max (both at
    least 8 machine epsilons of the output dtype, for fp16/bf16 models). Folding rounds the folded
    weights once, and a deep model can amplify that past the tolerance (four chained patch-embedding
    folds in LeViT: 2e-5 of the output scale), so a float32/16 mismatch is checked again on a float64
    copy, where rounding is ~1e-13 and only a real change of the computation shows; its verdict
    decides. Pairs that change the outputs stay unfolded, listed in ``unfolded`` with the reason, and
    the rest are folded; if those still fail together the model is restored and :class:`FoldError`
    (a :class:`~quantcore.errors.PlacementError`) is raised, as when the model's own output is not
    finite (nothing to check against).

    ``pairs``: fold exactly these ``(conv, bn)`` pairs, as recorded when a checkpoint was written
    (:func:`quantcore.load`; the weights are placeholders there, so the outputs are not compared), or
    the pairs of these BatchNorm names (a checkpoint without the record: the BatchNorms its state
    lacks); each must still be a pair the data flow proves, else :class:`FoldError`.
    """
    from .placement.probe import model_outputs, run_probe

    if example_input is None:
        raise FoldError("fold_batchnorm needs an example input: pairs are proven on the data flow of one forward")
    if model.training:
        raise FoldError("fold_batchnorm needs the model in eval mode (call model.eval() first): "
                        "training-mode BatchNorm uses batch statistics and cannot be folded")
    training = [n for n, m in model.named_modules() if (is_batchnorm(m) or _is_conv(m)) and m.training]
    if training:
        raise FoldError(f"fold_batchnorm needs eval mode, but {training[:5]} are in training mode "
                        "(call model.eval() first)")
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    trace, out = run_probe(model, example_input)  # the probe's output is the reference
    reference = [t.clone() for t in model_outputs(out)]
    res = _pairs_from_trace(model, trace)
    res._model = model
    if pairs is not None:
        if all(isinstance(p, str) for p in pairs):  # BatchNorm names: their proven pairs
            wanted = [p for p in res.pairs if p[1] in set(pairs)]
            lost_bn = sorted(set(pairs) - {p[1] for p in wanted})
            if lost_bn:
                raise FoldError(f"BatchNorm folding: {lost_bn[:4]} were folded when the checkpoint was written, but "
                                f"this model's data flow does not show them right after a conv")
        else:
            wanted = [tuple(p) for p in pairs]
        lost = [p for p in wanted if p not in res.pairs]
        if lost:
            raise FoldError(f"BatchNorm folding: {lost[:4]} were folded when the checkpoint was written, but this "
                            f"model's data flow does not show them as a conv followed by its BatchNorm")
        for _conv, bn in res.pairs:
            if (_conv, bn) not in wanted:
                res.unfolded[bn] = "not folded when the checkpoint was written"
        res.pairs = wanted
        res._backup = _fold(model, wanted)
        return res
    if not res.pairs:
        return res
    if any(r.is_floating_point() and not bool(torch.isfinite(r).all()) for r in reference):
        raise FoldError("the model's own output on the example input holds NaN or inf before any folding, so "
                        "BatchNorm folding cannot be checked; look at the model's weights (e.g. their "
                        "initialization), or leave BatchNorm unfolded with placement.fold_bn: false")
    good, unfolded, problem = _verified(model, inputs, reference, res.pairs, rtol, atol)
    numeric = {bn for bn, why in unfolded.items() if _BEYOND in why}  # not an exception: maybe rounding
    if ((_BEYOND in problem or numeric)
            and any(r.is_floating_point() and r.dtype != torch.float64 for r in reference)):
        exact = _verified_in_float64(model, inputs, res.pairs, min(rtol, 1e-9), min(atol, 1e-9))
        if exact is not None and not exact[2]:
            # float64 proves these folds keep the computation: float32 rounding is no reason to refuse or
            # skip them (a float64 problem never overrides the float32 verdict)
            good = [p for p in exact[0] if p in good or p[1] in numeric or problem]
            kept = {p[1] for p in good}
            unfolded = {**{bn: why for bn, why in unfolded.items() if bn not in kept},
                        **{bn: why for bn, why in exact[1].items() if bn not in kept}}
            problem = ""
    res.unfolded.update(unfolded)
    if problem:
        raise FoldError(f"BatchNorm folding: {problem}; the model was restored. Pairs tried: "
                        f"{good[:8]}{' ...' if len(good) > 8 else ''}; leave them unfolded with "
                        "placement.fold_bn: false")
    res.pairs = good
    res._backup = _fold(model, good)
    return res


def _fold(model: nn.Module, pairs: list[tuple[str, str]]) -> list:
    """Fold ``pairs`` into ``model`` in place; returns the backup :meth:`FoldResult.undo` restores."""
    backup = []
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        backup.append((conv, conv.weight.detach().clone(),
                       None if conv.bias is None else conv.bias.detach().clone(), bn_name, bn))
        _fold_into(conv, bn)
        _set(model, bn_name, _bn_replacement(bn))
    return backup


_BEYOND = "beyond the relative tolerance"  # a numeric mismatch (vs. a model that fails once folded)


def _mismatch(model: nn.Module, inputs: tuple, reference: list, rtol: float, atol: float) -> str:
    """'' when ``model``'s outputs on ``inputs`` still match ``reference``, else what went wrong."""
    from .placement.probe import model_outputs

    try:
        with torch.no_grad():
            after = model_outputs(model(*inputs))
    except Exception as err:  # noqa: BLE001 - e.g. the model reads a folded BatchNorm's parameters
        return f"the model fails once it is folded ({type(err).__name__}: {str(err).strip()[:160]})"
    if len(after) != len(reference):
        return "folding changed the model's outputs (their number)"
    worst = None
    for a, r in zip(after, reference):
        if a.shape != r.shape:
            return "folding changed the model's outputs (their shapes)"
        scale = max(float(r.abs().max()) if r.numel() else 1.0, 1e-12)
        # a half-precision model rounds the folded weights and every activation to its own precision
        eps = 8 * torch.finfo(r.dtype).eps if r.is_floating_point() else 0.0
        rt, at = max(rtol, eps), max(atol, eps)
        if not torch.allclose(a, r, rtol=rt, atol=at * scale):
            # the criterion that failed: |after - before| <= atol x scale + rtol x |before|, per value
            excess = ((a - r).abs() - rt * r.abs()).double().max() / scale
            worst = max(worst or 0.0, float(excess))
    if worst is None:
        return ""
    return (f"folding changed the model's outputs by {worst:.3g} of the output scale {_BEYOND} "
            f"(|after - before| <= {at:g} x scale + {rt:g} x |before|)")


def split_by_check(items: list, changes: Callable[[list], str]) -> tuple[list, list[tuple[Any, str]], str]:
    """``(good items, [(item, why)], problem)`` for transforms checked on the model's outputs:
    ``changes(some)`` applies ``some``, compares the outputs, undoes them and returns what went wrong
    ('' when nothing). All items first; on a mismatch each alone (something may read one outside the
    data flow), then the good ones together (``problem``: what those still change). Used by BatchNorm
    folding and the LayerNorm reparameterization."""
    if not changes(list(items)):
        return list(items), [], ""
    good, bad = [], []
    for item in items:
        why = changes([item])
        if why:
            bad.append((item, why))
        else:
            good.append(item)
    return good, bad, changes(good) if good else ""


def _verified(model: nn.Module, inputs: tuple, reference: list, pairs: list, rtol: float, atol: float
              ) -> tuple[list, dict[str, str], str]:
    """``(good pairs, {bn: why unfolded}, problem)``; ``model`` is left unfolded (:func:`split_by_check`)."""
    def changes(some: list) -> str:
        backup = _fold(model, some)
        try:
            return _mismatch(model, inputs, reference, rtol, atol)
        finally:
            FoldResult(_backup=backup, _model=model).undo()

    good, bad, problem = split_by_check(pairs, changes)
    return good, {pair[1]: f"{why} when folded into {pair[0]!r} (something reads it outside the data flow)"
                  for pair, why in bad}, problem


def _verified_in_float64(model: nn.Module, inputs: tuple, pairs: list, rtol: float, atol: float
                         ) -> tuple[list, dict[str, str], str] | None:
    """:func:`_verified` on a float64 copy of ``model`` (a tolerance of 1e-9 or below: rounding is ~1e-13
    there, a changed computation is O(1)); None when the model cannot run in float64. The copy costs
    twice the model's float32 weights, once, and only after a float32 mismatch."""
    import copy

    from .placement.probe import model_outputs

    try:
        m64 = copy.deepcopy(model).double()
        in64 = tuple(t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs)
        with torch.no_grad():
            ref64 = [t.clone() for t in model_outputs(m64(*in64))]
    except Exception:  # noqa: BLE001 - a model with float32-only parts: the float32 verdict stands
        return None
    if not all(bool(torch.isfinite(r).all()) for r in ref64 if r.is_floating_point()):
        return None
    return _verified(m64, in64, ref64, pairs, rtol, atol)
