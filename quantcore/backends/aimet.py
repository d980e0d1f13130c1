"""AIMET ``QuantizationSimModel`` as the range engine.

AIMET builds its own quantized copy of the model (``QuantizedLinear``/``QuantizedConv2d``... with
``input_quantizers``, ``output_quantizers``, ``param_quantizers``). Here it gets a float copy of the
prepared model (BatchNorm already folded, quantcore's quantizers replaced by identities), and its
quantizers are set to mirror quantcore's placement exactly, module by module and tensor by tensor:

=====================================  =========================================================
quantcore quantizer                    AIMET quantizer of the same module
=====================================  =========================================================
``<module>.input_quantizer``           ``input_quantizers[0]``
``<module>.output_quantizer``          ``output_quantizers[0]``
``<module>.weight_quantizer``          ``param_quantizers["weight"]`` (per-channel: shape (C, 1, ...))
=====================================  =========================================================

Each is an AIMET ``QuantizeDequantize`` on quantcore's integer grid (``qmin``/``qmax`` of the spec:
bits, symmetry, narrow range) with the encoding analyzer of the recipe's statistics:
``max`` -> ``MinMaxEncodingAnalyzer`` (AIMET's ``tf``), ``percentile`` -> ``PercentileEncodingAnalyzer``
(``calibration.bins``, the spec's percentile), ``tf_enhanced`` -> ``TfEnhancedEncodingAnalyzer``
(AIMET's own tf_enhanced, as ``QuantScheme.post_training_tf_enhanced`` builds it). Every other
AIMET quantizer is removed, ``sim.compute_encodings`` runs over the calibration batches, and each
encoding is set on its quantcore quantizer: symmetric ``(-max, max)`` (AIMET's scale exactly:
``max = scale * qmax``), asymmetric ``(min, max)``.

**No counterpart**: quantizers on ops AIMET does not wrap as modules (the attention matmul inputs
q/k/v, the softmax input/output, residual adds, the model input hook) keep quantcore's own range
from the same batches; each is listed as ``quantcore: no AIMET counterpart`` in the record and in
``no_counterpart``, so a report never passes them off as AIMET's. (Refusing would make every ViT
recipe with attention quantizers unusable with this backend; the record keeps the comparison honest.)

Refused naming the recipe field: ``mse`` / ``entropy`` (no AIMET analyzer), ``weights_method: mse``,
non-integer grids, ``reconstruction``; data-parallel calibration (AIMET's statistics are per process).
"""
from __future__ import annotations

import copy
import time
from typing import Any, Iterable

import torch
from torch import nn

from . import Backend
from ._common import check_common, check_quantizer, record, refuse_data_parallel

ACT_METHODS = ("max", "percentile", "tf_enhanced")
WEIGHT_METHODS = ("max",)
_SLOTS = {"input_quantizer": "input", "output_quantizer": "output", "weight_quantizer": "weight"}


class _PassThrough(nn.Identity):
    """A switched-off quantizer in AIMET's float copy: the identity, with the flags quantcore's layers
    read before choosing their path (e.g. the residual blocks of ``placement.quantize_residual``)."""

    calibrating = False
    active = False
    observe = False


class AimetBackend(Backend):
    name = "aimet"
    package = "aimet_torch"
    dist = "aimet-torch"
    install = "pip install 'quantcore[backends]' (aimet-torch, nvidia-modelopt)"

    def check(self, recipe) -> None:
        check_common(recipe, self.name, ACT_METHODS, WEIGHT_METHODS, asymmetric=True)

    def calibrate(self, model, batches: Iterable, max_batches: int | None = None, progress: Any = None):
        from ..api import _images
        from ..placement import quantizers, unify_shared_ranges, unwrap
        from .native import NativeBackend

        refuse_data_parallel(self.name)
        inner = unwrap(model)
        recipe = inner.quantcore_recipe
        qs = quantizers(model)
        for name, q in qs.items():
            if q.spec.on_grid:
                check_quantizer(name, q, self.name, ACT_METHODS, WEIGHT_METHODS, asymmetric=True)
        batches = list(batches)[:max_batches] if max_batches is not None else list(batches)
        # quantcore's engine first, on the same batches: the ranges of quantizers AIMET has no
        # counterpart for (overwritten below for every one it has)
        res = NativeBackend().calibrate(model, batches, None, progress)
        t0 = time.perf_counter()
        dev = next(inner.parameters()).device
        xs = [_images(b).to(dev) for b in batches]
        sim, plan = self._sim(inner, qs, xs[0][:1], recipe.calibration.bins)

        def run(m: nn.Module) -> None:
            for x in xs:
                m(x)

        sim.compute_encodings(run)
        ranges: dict[str, str] = {}
        unmapped = []
        for name, q in qs.items():
            aq = plan.get(name)
            if q.spec.is_float:
                ranges[name] = f"none: float cast ({q.spec.format}, no range)"
            elif aq is not None and aq.is_initialized():
                lo = aq.get_min(torch.float32).detach().reshape(q.amax.shape if q.amax.numel() > 1 else ())
                hi = aq.get_max(torch.float32).detach().reshape(lo.shape)
                q.set_range(-hi if q.spec.symmetric else lo, hi)
                ranges[name] = f"aimet: {type(aq.encoding_analyzer).__name__}"
            elif aq is not None:
                ranges[name] = "none: not reached by the calibration data (pass-through)"
            elif not q.spec.enabled:
                ranges[name] = "quantcore: disabled quantizer (range not used)"
            else:
                ranges[name] = "quantcore: no AIMET counterpart (op not wrapped by AIMET)"
                unmapped.append(name)
        shared = unify_shared_ranges(model)
        for group in shared:
            for n in group:
                ranges[n] += " + union of the shared group"
        aimet_s = time.perf_counter() - t0
        res.finalize_s += aimet_s
        record(res, self, ranges, shared_groups=shared, no_counterpart=unmapped,
               seconds={"quantcore_pass": res.collect_s, "aimet": aimet_s})
        return res

    @staticmethod
    def _sim(inner: nn.Module, qs: dict, dummy: torch.Tensor, bins: int):
        """AIMET's QuantSim of a float copy, its quantizers replaced by quantcore's placement.
        Returns ``(sim, {quantcore quantizer name: AIMET quantizer})``."""
        from aimet_torch.common.defs import QuantScheme
        from aimet_torch.nn import BaseQuantizationMixin, QuantizationMixin
        from aimet_torch.quantization.affine import QuantizeDequantize
        from aimet_torch.quantization.encoding_analyzer import MinMaxEncodingAnalyzer, PercentileEncodingAnalyzer, \
            TfEnhancedEncodingAnalyzer
        from aimet_torch.quantsim import QuantizationSimModel

        from ..quantizer import TensorQuantizer

        float_copy = copy.deepcopy(inner)
        for name, m in list(float_copy.named_modules()):
            for attr, child in list(m._modules.items()):
                if isinstance(child, TensorQuantizer):  # intercepts then pass through (no TensorQuantizer)
                    m._modules[attr] = _PassThrough()
        # Modules AIMET has no quantized class for (timm's LayerNorm, ...) stay float in the sim: their
        # quantcore quantizers, if any, are reported as having no counterpart. AIMET's switch is
        # class-wide: restored right after.
        before = QuantizationMixin._ignore_unknown_modules
        QuantizationMixin.ignore_unknown_modules(True)
        try:
            sim = QuantizationSimModel(float_copy, dummy_input=dummy, quant_scheme=QuantScheme.min_max)
        finally:
            QuantizationMixin.ignore_unknown_modules(before)

        def qdq(q: TensorQuantizer, shape: tuple[int, ...]) -> Any:
            s = q.spec
            if s.calibrator == "percentile":
                ana = PercentileEncodingAnalyzer(shape, num_bins=bins, percentile=s.percentile)
            elif s.calibrator == "tf_enhanced":
                ana = TfEnhancedEncodingAnalyzer(shape)
            else:
                ana = MinMaxEncodingAnalyzer(shape)
            qmin, qmax = s.qrange()
            return QuantizeDequantize(shape, qmin, qmax, s.symmetric, ana)

        plan: dict[str, Any] = {}
        for mname, m in sim.model.named_modules():
            if not isinstance(m, BaseQuantizationMixin):
                continue
            for i in range(len(m.input_quantizers)):
                m.input_quantizers[i] = None
            for i in range(len(m.output_quantizers)):
                m.output_quantizers[i] = None
            for k in list(m.param_quantizers):
                m.param_quantizers[k] = None
            for attr, slot in _SLOTS.items():
                qname = f"{mname}.{attr}" if mname else attr
                q = qs.get(qname)
                if q is None or not q.spec.on_grid:
                    continue
                if slot == "weight":
                    w = getattr(m, "weight", None)
                    if q.weight_attr != "weight" or "weight" not in m.param_quantizers or w is None:
                        continue
                    shape = (w.shape[0],) + (1,) * (w.dim() - 1) if q.spec.axis is not None else ()
                    m.param_quantizers["weight"] = plan[qname] = qdq(q, shape)
                elif slot == "input" and len(m.input_quantizers):
                    m.input_quantizers[0] = plan[qname] = qdq(q, ())
                elif slot == "output" and len(m.output_quantizers):
                    m.output_quantizers[0] = plan[qname] = qdq(q, ())
        return sim, plan
