"""NVIDIA ModelOpt (pytorch-quantization's successor) as the range engine.

Every quantcore quantizer gets ModelOpt's own calibrator object, built with the recipe's statistics
choice, and collects exactly the tensors that quantizer sees in the calibration pass (run by
:func:`quantcore.api.collect`; the calibrator stands in for the quantizer's collector):

============================  ===============================================================
recipe                        ModelOpt (``modelopt.torch.quantization.calib``)
============================  ===============================================================
activations ``max``           ``MaxCalibrator(num_bits, axis)``: ``compute_amax()``
activations ``percentile``    ``HistogramCalibrator(num_bits, num_bins=calibration.bins)``:
                              ``compute_amax("percentile", percentile=spec.percentile)``
activations ``mse``           refused: ModelOpt 0.47's ``compute_amax("mse")`` is broken (below)
activations ``entropy``       same histogram: ``compute_amax("entropy")`` (TensorRT's KL search)
weights ``max``               ``MaxCalibrator(num_bits, axis)`` on the weight
weights ``mse``               ``MseCalibrator(amax=max, axis, quant_func=fake_tensor_quant)``:
                              ModelOpt's per-channel search of multipliers 0.25..4 of the max
============================  ===============================================================

The range is then ``(-amax, amax)`` on the quantcore quantizer. ModelOpt's integer calibrators are
symmetric (one amax), so an asymmetric grid, ``tf_enhanced``, other grids (log2, twin) and
``reconstruction`` are refused naming the recipe field; float casts (fp16/bf16/fp8) have no range.
Activation ``mse`` is refused too: in nvidia-modelopt 0.47 ``HistogramCalibrator.compute_amax("mse")``
calls ``fake_tensor_quant(centers, amax, num_bits, unsigned)`` (calib/histogram.py), whose third
parameter is ``bias``, so every candidate is scored on shifted data and the first one (a quarter of the
max at 512 bins) wins: measured top-1 8.8 % instead of 88 % on the demo ViT. Weights' ``mse`` uses
``MseCalibrator``, which is correct. Data-parallel calibration is refused (ModelOpt's histograms are per process; its
``compute_amax`` does not synchronize ranks).
"""
from __future__ import annotations

import time
from typing import Any, Iterable

import torch

from . import Backend
from ._common import Feed, check_common, check_quantizer, feeding, record, refuse_data_parallel, \
    weight_tensor

ACT_METHODS = ("max", "percentile", "entropy")  # not "mse": see the module docstring
MSE_BUG = ("nvidia-modelopt 0.47's HistogramCalibrator.compute_amax('mse') passes num_bits as fake_tensor_quant's "
           "bias argument and returns about a quarter of the range (see quantcore/backends/modelopt.py)")
WEIGHT_METHODS = ("max", "mse")


class ModelOptBackend(Backend):
    name = "modelopt"
    package = "modelopt.torch.quantization"
    dist = "nvidia-modelopt"
    install = "pip install 'quantcore[backends]' (nvidia-modelopt and requests)"

    def check(self, recipe) -> None:
        if recipe.calibration.method == "mse":
            from ._common import recipe_error

            raise recipe_error(f"calibration.method: 'mse' is not available with calibration.backend 'modelopt': "
                               f"{MSE_BUG}; use max, percentile or entropy, or backend 'native'")
        check_common(recipe, self.name, ACT_METHODS, WEIGHT_METHODS, asymmetric=False)

    def calibrate(self, model, batches: Iterable, max_batches: int | None = None, progress: Any = None):
        from .. import api
        from ..placement import quantizers, unify_shared_ranges, unwrap

        from modelopt.torch.quantization.calib import HistogramCalibrator, MaxCalibrator

        refuse_data_parallel(self.name)
        recipe = unwrap(model).quantcore_recipe
        qs = quantizers(model)
        feeds: dict[str, Feed] = {}
        ranges: dict[str, str] = {}
        for name, q in qs.items():
            if q.spec.is_float:
                ranges[name] = f"none: float cast ({q.spec.format}, no range)"
                continue
            if not q.spec.enabled:
                continue  # never acts; its range (quantcore's) is recorded below
            check_quantizer(name, q, self.name, ACT_METHODS, WEIGHT_METHODS, asymmetric=False)
            if q.kind == "activation":
                if q.spec.calibrator == "max":
                    cal = MaxCalibrator(num_bits=q.spec.bits, axis=q.spec.axis, unsigned=False)
                else:
                    cal = HistogramCalibrator(num_bits=q.spec.bits, axis=None, unsigned=False,
                                              num_bins=recipe.calibration.bins)
                feeds[name] = Feed(cal)
        with feeding(qs, feeds):
            res = api.collect(model, batches, max_batches, progress)
        t0 = time.perf_counter()
        for name, q in qs.items():
            if q.kind == "weight" and not q.spec.is_float:
                src = weight_tensor(model, name, q)
                q.observe, q.observed = False, None
                if src is None:
                    if q.spec.enabled:
                        res.uncalibrated.append(name)
                        ranges[name] = "none: no weight tensor reached it"
                    continue
                if q.spec.enabled:
                    amax, how = self._weight_amax(src.detach().float(), q.spec)
                    q.set_range(-amax, amax)
                    ranges[name] = f"modelopt: {how}"
                else:
                    q.calibrate_tensor(src)
                    ranges[name] = "quantcore: disabled quantizer (range not used)"
            elif q.kind == "activation":
                feed = feeds.get(name)
                if feed is not None and feed.total:
                    feed.amax, how = self._act_amax(feed.calibrator, q.spec)
                    ranges[name] = f"modelopt: {how}"
                if not q.finalize() and q.spec.enabled:
                    res.uncalibrated.append(name)
                    ranges[name] = "none: not reached by the calibration data (pass-through)"
                elif feed is None and not q.spec.is_float:
                    ranges[name] = "quantcore: disabled quantizer (range not used)"
        for name in feeds:  # the peer's statistics are not quantcore state (calibration_state, merge)
            qs[name].collector = None
        shared = unify_shared_ranges(model)
        for group in shared:
            for n in group:
                ranges[n] += " + union of the shared group"
        res.finalize_s = time.perf_counter() - t0
        record(res, self, ranges, shared_groups=shared)
        return res

    @staticmethod
    def _act_amax(cal: Any, spec) -> tuple[torch.Tensor, str]:
        kind = type(cal).__name__
        if spec.calibrator == "max":
            amax = cal.compute_amax()
            how = f"{kind}"
        elif spec.calibrator == "percentile":
            amax = cal.compute_amax("percentile", percentile=spec.percentile)
            how = f"{kind}.compute_amax('percentile', {spec.percentile})"
        else:
            amax = cal.compute_amax(spec.calibrator)
            how = f"{kind}.compute_amax({spec.calibrator!r})"
        amax = torch.as_tensor(amax, dtype=torch.float32).detach().cpu()
        return (amax.reshape(-1) if spec.axis is not None else amax.reshape(())), how

    @staticmethod
    def _weight_amax(w: torch.Tensor, spec) -> tuple[torch.Tensor, str]:
        from modelopt.torch.quantization.calib import MaxCalibrator, MseCalibrator
        from modelopt.torch.quantization.tensor_quant import fake_tensor_quant

        mx = MaxCalibrator(num_bits=spec.bits, axis=spec.axis, unsigned=False)
        mx.collect(w)
        amax, how = mx.compute_amax(), "MaxCalibrator"
        if spec.calibrator == "mse":
            bits, narrow = spec.bits, spec.narrow_range

            def quant(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
                return fake_tensor_quant(x, a, None, bits, False, narrow)

            mse = MseCalibrator(amax=amax, axis=spec.axis, quant_func=quant)
            mse.collect(w)
            amax, how = mse.compute_amax(), "MseCalibrator"
        amax = amax.detach().float().cpu()
        return (amax.reshape(-1) if spec.axis is not None else amax.reshape(())), how
