"""``quantcore export``: a checkpoint (PTQ or QAT ``model.qc.pt``, local or s3://) to deployment files.

Writes into ``out`` (local directory or s3:// prefix):

* ``model.onnx`` — QDQ ONNX (:mod:`.onnx_qdq`), checked with ``onnx.checker`` and run in onnxruntime;
* ``model_float.onnx`` + ``model.encodings`` (AIMET/QNN 2.0.0, :mod:`.aimet`) + ``tensor_map.json``
  (quantizer -> tensor name) for ``aimet``;
* ``model_float.onnx`` + ``trt_ranges.json`` + ``trt_ranges.cache`` for ``trt-table`` (:mod:`.trt_table`);
* ``export_report.json`` — checker result, opset, every quantizer's nodes and ONNX type, the quantizers
  TensorRT's explicit quantization does not run natively, onnxruntime vs fake-quant agreement on the
  example input and, with ``check_data``, top-1 / agreement on real images.
"""
from __future__ import annotations

import copy

import json
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .aimet import encodings_v2
from .onnx_qdq import (VALUE_CHANGING_REWRITES, ExportError, OnnxExport, check_model, export_onnx, float_graph, grid_plans,
                       ort_session)
from .trt_table import calibration_cache, range_table

FORMATS = ("onnx", "aimet", "trt-table")
#: onnxruntime settings the agreement check runs under: every fusion and integer kernel, less the two
#: rewrites that change values (:data:`~quantcore.export.onnx_qdq.VALUE_CHANGING_REWRITES`).
CHECK_OPTIMIZATION = "all-exact"


def parse_formats(value: str | Sequence[str]) -> tuple[str, ...]:
    """``"all"``, one format or a comma-separated list -> formats; :class:`ExportError` naming ``--format``."""
    items = value.split(",") if isinstance(value, str) else list(value)
    items = [i.strip() for i in items if i.strip()]
    if items == ["all"]:
        return FORMATS
    if "all" in items:
        raise ExportError(f"--format {value!r}: 'all' already names every format ({', '.join(FORMATS)}); give "
                          f"'all' alone or a list without it")
    bad = [i for i in items if i not in FORMATS]
    if bad or not items:
        raise ExportError(f"--format: {bad or value!r} not one of {list(FORMATS)} or 'all'")
    return tuple(dict.fromkeys(items))


def example_input(model: nn.Module, batch: int = 1) -> torch.Tensor:
    """A seeded float input of the shape the model was calibrated with (stored in the checkpoint)."""
    placement = getattr(model, "quantcore_placement", None)
    shape = list(getattr(placement, "example_input_shape", []) or [])
    if len(shape) < 2:
        raise ExportError("the checkpoint stores no example input shape; pass example_input= to quantcore.api.export")
    return torch.randn(batch, *shape[1:], generator=torch.Generator().manual_seed(0))


@dataclass
class CheckData:
    """Images to check the ONNX model against the fake-quant model on: a dataset URI, split and an
    optional seeded class-stratified limit (``quantcore.data.limit_subset``)."""

    uri: str
    split: str = "val"
    limit: Optional[int] = None
    batch_size: int = 250
    skip_bad: bool = False  # undecodable images are listed in the report's check.skipped, not fatal


#: --check-data figures below which the export warns (onnxruntime vs the quantized model, top-1): a
#: trained model differs on a few rounding ties (well under 1 % of images), not more
CHECK_AGREEMENT_WARN = 99.0
CHECK_TOP1_WARN = 0.5


def check_data(uri: Optional[str], split: Optional[str] = None, limit: Optional[int] = None,
               skip_bad: bool = False) -> Optional[CheckData]:
    """The onnxruntime check's images from the CLI/API options: ``None`` without ``uri``. ``split``
    defaults to ``val`` (as ``quantcore evaluate``); ``limit`` ``None`` or ``0`` = the whole split. A
    split or limit without a URI, or a negative limit, raises :class:`ExportError` naming the option
    (it would be ignored)."""
    if not uri:
        given = [o for o, v in (("--check-split", split), ("--check-limit", limit),
                                ("--check-skip-bad", True if skip_bad else None)) if v is not None]
        if given:
            raise ExportError(f"{' and '.join(given)} {'need' if len(given) > 1 else 'needs'} --check-data (the dataset whose images are run "
                              f"through onnxruntime); without it nothing is checked")
        return None
    if limit is not None and int(limit) < 0:
        raise ExportError(f"--check-limit must be >= 0 (0 = the whole split), got {limit}")
    return CheckData(uri, split or "val", (int(limit) or None) if limit is not None else None, skip_bad=skip_bad)


def _load_check_images(model: nn.Module, check: CheckData) -> tuple[torch.Tensor, torch.Tensor, dict | None,
                                                                     list[dict]]:
    from ..data import eval_transform, limit_subset, make_loader, model_label_names, open_dataset
    from ..placement import unwrap
    from .onnx_qdq import _Logits

    ds = open_dataset(check.uri, check.split, eval_transform(model), skip_bad=check.skip_bad,
                      label_names=model_label_names(unwrap(model)))

    with torch.no_grad():  # top-1 on data with other classes than the model's logits would be meaningless
        n_out = _Logits(unwrap(model)).eval()(example_input(model, 1)).shape[-1]
    if n_out != ds.num_classes:
        raise ExportError(f"--check-data {check.uri} (split {check.split!r}) has {ds.num_classes} classes, but the "
                          f"model gives {n_out} logits: check on the data the model was trained for")
    idx, subset = limit_subset(ds, check.limit)
    xs, ys = [], []
    loader = make_loader(ds, check.batch_size, num_workers=0, indices=idx)
    for x, y, _ in loader:
        if x is not None:
            xs.append(x)
            ys.append(y)
    skipped = [r.as_dict() if hasattr(r, "as_dict") else r for r in loader.skipped.as_list()]
    if not xs:
        raise ExportError(f"--check-data {check.uri} (split {check.split!r}): no image could be decoded "
                          f"({len(skipped)} skipped)")
    return torch.cat(xs), torch.cat(ys), subset, skipped


def fused_integer_ops(onnx_bytes: bytes) -> dict[str, int]:
    """The integer kernels onnxruntime's CPU optimizer (at :data:`CHECK_OPTIMIZATION`) puts in
    ``onnx_bytes``: op type -> count (QLinearConv, QLinearMatMul, QLinearSoftmax, ...)."""
    import collections
    import os
    import tempfile

    import onnx

    with tempfile.TemporaryDirectory() as td:
        path = os.path.join(td, "optimized.onnx")
        ort_session(onnx_bytes, optimization=CHECK_OPTIMIZATION, save_optimized=path)
        g = onnx.load(path)
    ops = collections.Counter(n.op_type for n in g.graph.node
                              if n.op_type.startswith("QLinear") or n.op_type.endswith("Integer"))
    return dict(sorted(ops.items()))


@torch.no_grad()
def compare(model: nn.Module, onnx_bytes: bytes, x: torch.Tensor, y: Optional[torch.Tensor] = None,
            batch_size: int = 250, optimization: str = "all", threads: int = 1) -> dict[str, Any]:
    """onnxruntime (CPU) vs ``model`` (fake quant, CPU, float32) on ``x`` ``(N, C, H, W)``: top-1 agreement
    (%), max |logit difference|, and with labels ``y`` both top-1 accuracies (%) and their difference
    (points)."""
    from ..placement import unwrap
    from .onnx_qdq import _Logits

    sess = ort_session(onnx_bytes, threads=threads, optimization=optimization)
    ref_model = _Logits(unwrap(model)).eval()
    p_ort, p_ref, maxdiff, scale = [], [], 0.0, 0.0
    first: Optional[np.ndarray] = None
    constant = True  # the quantized model gives every input the same logits
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size].float()
        a = sess.run(["logits"], {"input": xb.numpy()})[0]
        b = ref_model(xb).float().numpy()
        first = b[0] if first is None else first
        constant = constant and bool((b == first).all())
        maxdiff = max(maxdiff, float(np.abs(a - b).max()))
        scale = max(scale, float(np.abs(b).max()))
        p_ort.append(a.argmax(1))
        p_ref.append(b.argmax(1))
    po, pr = np.concatenate(p_ort), np.concatenate(p_ref)
    res: dict[str, Any] = {"images": int(len(x)), "optimization": optimization,
                           "top1_agreement": float(100.0 * (po == pr).mean()), "max_abs_logit_diff": maxdiff,
                           "max_abs_logit": scale, "constant_output": constant and len(x) > 1}
    if y is not None:
        yy = y.numpy()
        res["top1_onnx"] = float(100.0 * (po == yy).mean())
        res["top1_fake_quant"] = float(100.0 * (pr == yy).mean())
        res["top1_delta"] = res["top1_onnx"] - res["top1_fake_quant"]
    return res


def _runnable_compare(model: nn.Module, onnx_bytes: bytes, x: torch.Tensor, optimization: str, opset: Any,
                      y: Optional[torch.Tensor] = None, batch_size: int = 250) -> dict[str, Any]:
    """:func:`compare`; a graph onnxruntime cannot load or run at ``optimization`` is an
    :class:`ExportError` naming that level, not onnxruntime's traceback (nothing is written then)."""
    try:
        return compare(model, onnx_bytes, x, y, batch_size, optimization=optimization)
    except ExportError:
        raise
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own Fail/InvalidGraph types
        what = "with its default graph optimizations" if optimization == "all" else f"(optimization {optimization})"
        raise ExportError(f"onnxruntime {what} cannot run the exported graph (opset {opset}): {type(e).__name__}: "
                          f"{str(e).splitlines()[0][:300]}; nothing was written") from None


def _four_bit_hint(plans: dict, onnx_bytes: bytes) -> str:
    """What is known to make onnxruntime's optimized kernels compute a QDQ graph otherwise, and which of
    ``plans`` (quantizer -> QdqSpec) meet it in the graph ``onnx_bytes``: its Relu -> QuantizeLinear
    fusion drops the Relu before a 4-bit grid that holds negative codes (signed int4, or uint4 with a
    zero point above 0), so negative values reach the grid (measured, onnxruntime 1.2x CPU)."""
    import onnx

    graph = onnx.load_from_string(onnx_bytes).graph
    producer = {o: n for n in graph.node for o in n.output}
    seen = []
    for n in graph.node:
        if n.op_type != "QuantizeLinear" or "/" not in n.name:
            continue
        name = n.name.rsplit("/", 1)[0]
        p, src = plans.get(name), producer.get(n.input[0])
        if p is None or p.bits != 4 or src is None or src.op_type != "Relu" or name in seen:
            continue
        if p.signed or bool(np.any(np.asarray(p.zero_point) > 0)):
            seen.append(name)
    rule = ("onnxruntime's Relu -> QuantizeLinear fusion drops a ReLU before a 4-bit grid that holds negative "
            "codes (signed int4, or uint4 with a zero point above 0, as QAT learns with qat.learn_zero_point: "
            "true), so negative values reach the grid")
    if not seen:
        return f"{rule}, and no quantizer here is of that kind: the cause is another fused kernel"
    more = f" and {len(seen) - 3} more" if len(seen) > 3 else ""
    return (f"{rule}; here: {', '.join(seen[:3])}{more}. A ReLU's output is never negative: give those "
            f"quantizers asymmetric ranges from 0 (zero point 0; what calibration finds after a ReLU, and what "
            f"QAT keeps with qat.learn_zero_point: false), or 8 bits")


def _off(res: dict[str, Any]) -> bool:
    """Whether a check comparison (``compare`` with labels) disagrees enough to warn about."""
    return res["top1_agreement"] < CHECK_AGREEMENT_WARN or abs(res.get("top1_delta", 0.0)) >= CHECK_TOP1_WARN


def _constant_warning(res: dict[str, Any], where: str) -> str:
    """The comparison of a model whose logits do not depend on the input proves nothing: say so."""
    what = "all 0" if res["max_abs_logit"] == 0 else "the same for every input"
    return (f"the quantized model's logits are {what} on {where}, so agreeing with onnxruntime there says "
            f"nothing about the export: activations below their grid's smallest step (see the calibration's "
            f"floored-quantizer warnings) or a model that ignores its input")


def _write(out: str, name: str, data: bytes | str) -> str:
    from ..io import storage

    uri = storage.join(out, name)  # parses out: an empty or malformed location is refused, never written
    storage.write_bytes(uri, data.encode() if isinstance(data, str) else data)  # creates local parents
    return uri


#: Every file an export can write (export_report.json lists those of the last export).
EXPORT_FILES = ("model.onnx", "model_float.onnx", "tensor_map.json", "model.encodings", "trt_ranges.json",
                "trt_ranges.cache")


def _refuse_stale(out: str, writing: set[str]) -> None:
    """Files of an earlier export in ``out`` that this one would not replace would sit next to its
    own as if they belonged to it (another checkpoint's graph beside these encodings): refuse."""
    from ..io import storage

    stale = [f for f in EXPORT_FILES if f not in writing and storage.exists(storage.join(out, f))]
    if stale:
        raise ExportError(f"--out {out} already holds {', '.join(stale)} from an earlier export, which this export "
                          f"({', '.join(sorted(writing)) or 'nothing'}) would not replace: remove them or choose "
                          f"another --out (nothing was written)")


def export_model(model: nn.Module, out: str, formats: Sequence[str] = FORMATS, opset: Optional[int] = None,
                 check: Optional[CheckData] = None, x: Optional[torch.Tensor] = None,
                 source: Optional[str] = None) -> dict[str, Any]:
    """Export a prepared, calibrated ``model`` to ``out`` (see the module docstring); returns the report
    (also written as ``export_report.json``). Raises :class:`ExportError` (a UserError) naming the
    quantizer or option that cannot be exported."""
    from ..io import storage

    t0 = time.perf_counter()
    items = [i.strip() for i in (formats.split(",") if isinstance(formats, str) else formats)]
    all_formats = items == ["all"] or formats is FORMATS  # "all", or the API's default
    formats = parse_formats(formats)
    storage.join(out, "export_report.json")  # an empty or malformed --out fails here, before any work
    from ..placement import quantizers, unwrap

    if any(q.spec.learnable for q in quantizers(unwrap(model)).values()):
        # QAT in progress: every format (the range table and AIMET encodings too) from the learned
        # scales, converted on a copy as export_onnx does; the caller's model is not changed
        model = copy.deepcopy(unwrap(model))
        for q in quantizers(model).values():
            q.convert()
    x = example_input(model) if x is None else x
    ex: OnnxExport = export_onnx(model, x, opset=opset)
    report: dict[str, Any] = {"source": source, "formats": list(formats), "opset": ex.opset,
                              "checker": check_model(ex.model), "files": {}}
    recipe = getattr(model, "quantcore_recipe", None)
    if recipe is not None:
        report["recipe"] = recipe.name
    onnx_bytes = ex.to_bytes()
    smoke_x = torch.cat([x, example_input(model, 3)[1:]])
    report["smoke"] = _runnable_compare(model, onnx_bytes, smoke_x, CHECK_OPTIMIZATION, ex.opset)
    plain = _runnable_compare(model, onnx_bytes, smoke_x, "disable", ex.opset)
    report["smoke"]["max_abs_logit_diff_unoptimized"] = plain["max_abs_logit_diff"]
    got = report["smoke"]
    if got["constant_output"]:
        report.setdefault("warnings", []).append(_constant_warning(got, "the check inputs"))
    # the graph is right when unoptimized onnxruntime agrees; its fused kernels may still compute it
    # otherwise: a few rounding steps (QLinearSoftmax on a symmetric int8 softmax output rounds ~4 % of
    # the probability codes differently) are reported, a wrong result is refused
    rel = got["max_abs_logit_diff"] / max(got["max_abs_logit"], 1e-12)
    rel_plain = plain["max_abs_logit_diff"] / max(got["max_abs_logit"], 1e-12)
    if plain["top1_agreement"] < 100.0 or rel_plain > 0.01:
        # the graph itself computes otherwise (an activation on a rounding tie: ONNX divides by the
        # scale where torch multiplies by its reciprocal; a chaotic random-weight model amplifies it)
        report.setdefault("warnings", []).append(
            f"onnxruntime without optimizations differs from the quantized model by up to "
            f"{plain['max_abs_logit_diff']:.3g} of logits up to {got['max_abs_logit']:.3g} (top-1 agreement "
            f"{plain['top1_agreement']:.0f} %) on the check inputs"
            + ("" if check is not None else "; check on real images with --check-data"))
    if got["max_abs_logit_diff"] > 4 * plain["max_abs_logit_diff"] + 1e-6:
        fused = fused_integer_ops(onnx_bytes)
        # (the serialized optimized graph shows the selector fusions, e.g. QLinearSoftmax, not the
        # kernels onnxruntime picks later, e.g. QLinearConv: an empty list names none)
        kernels = ", ".join(f"{k} x{n}" for k, n in fused.items()) or "integer kernels"
        what = (f"up to {got['max_abs_logit_diff']:.3g} of logits up to {got['max_abs_logit']:.3g}, top-1 agreement "
                f"{got['top1_agreement']:.0f} %; unoptimized {plain['max_abs_logit_diff']:.3g}")
        wrong = got["top1_agreement"] < 100.0 or rel > 0.02
        if "QLinearSoftmax" in fused:
            # The graph is right (unoptimized onnxruntime agrees); onnxruntime's CPU QLinearSoftmax (a
            # softmax between two quantizers, ft2's softmax input) computes its own table: a property of
            # that runtime, reported, not a reason to withhold the files from TensorRT/QNN.
            report.setdefault("warnings", []).append(
                f"onnxruntime's optimized CPU kernels ({kernels}) compute this graph otherwise ({what}): its "
                f"QLinearSoftmax (a softmax between two quantizers, e.g. ft2's softmax_input_quantizer) does not "
                f"compute the graph's grids. The graph itself is exact (unoptimized onnxruntime); for an "
                f"onnxruntime CPU deployment set placement.quantize_softmax_input: false")
        elif wrong:
            raise ExportError(f"onnxruntime with its graph optimizations ({CHECK_OPTIMIZATION}) disagrees with "
                              f"the quantized model on the check inputs ({what}), while the graph itself is "
                              f"exact (unoptimized onnxruntime agrees): its fused kernels ({kernels}) do not "
                              f"compute this graph's grids; {_four_bit_hint(ex.plans, onnx_bytes)}; nothing was written")
        else:
            report.setdefault("warnings", []).append(
                f"onnxruntime's optimized kernels ({CHECK_OPTIMIZATION}: {kernels}) differ from the quantized "
                f"model on the check inputs ({what})")
    # what a deployment gets by default: a graph its default session cannot load is refused here too, not
    # only with --check-data (onnxruntime's fused integer kernels take fewer forms than the Q/DQ graph)
    report["smoke"]["max_abs_logit_diff_ort_default"] = \
        _runnable_compare(model, onnx_bytes, smoke_x, "all", ex.opset)["max_abs_logit_diff"]
    report["quantizers"] = {name: {"op": p.op, "type": p.dtype, "axis": p.axis, "kind": p.kind,
                                   "nodes": ex.graph[name]["nodes"], "trt_native": p.trt_native(),
                                   **({"notes": p.notes} if p.notes else {})}
                            for name, p in ex.plans.items()}
    inactive = [n for n, q in quantizers(unwrap(model)).items() if n not in ex.plans]
    report["inactive_quantizers"] = inactive  # disabled / off / uncalibrated: no node (the tensor stays float)
    report["not_trt_native"] = [n for n, p in ex.plans.items() if not p.trt_native()]
    pending: dict[str, tuple[str, bytes | str]] = {}  # report key -> (file name, content): written last
    if "onnx" in formats:
        pending["onnx"] = ("model.onnx", onnx_bytes)
    if "aimet" in formats or "trt-table" in formats:
        fproto, tensor_map = float_graph(ex.model, ex.float_weights)
        check_model(fproto)
        # the quantizers' own grids: model.onnx may write int8 activations as uint8 (opset 21), the
        # range table and AIMET encodings describe what the model computes
        source = grid_plans(model)
        pending["float_onnx"] = ("model_float.onnx", fproto.SerializeToString())
        pending["tensor_map"] = ("tensor_map.json", json.dumps(tensor_map, indent=1))
        if "aimet" in formats:
            try:
                pending["aimet"] = ("model.encodings", json.dumps(encodings_v2(source, tensor_map), indent=1))
            except ExportError as e:  # a grid the format cannot hold: an error, or left out of `all` with why
                if not all_formats:
                    raise
                report["aimet"] = {"written": False, "why": str(e)}
        if "trt-table" in formats:
            table = range_table(source, tensor_map)
            report["trt_table"] = {"tensors": len(table["tensors"]), "skipped": table["skipped"],
                                   "widened": [r["quantizer"] for r in table["tensors"].values() if not r["exact"]]}
            if table["tensors"]:
                pending["trt_ranges"] = ("trt_ranges.json", json.dumps(table, indent=1))
                pending["trt_cache"] = ("trt_ranges.cache", calibration_cache(table))
            else:  # a table of nothing would build an engine TensorRT calibrates on its own
                reasons = sorted(set(table["skipped"].values()))
                why = (f"trt-table: none of the {len(table['skipped'])} quantizers is an INT8 per-tensor activation "
                       f"range TensorRT's implicit mode can take ({'; '.join(reasons[:3])}"
                       f"{'; ...' if len(reasons) > 3 else ''}); use the QDQ model.onnx (--format onnx)")
                if not all_formats:
                    raise ExportError(why)
                report["trt_table"]["written"] = False
                report["trt_table"]["why"] = why
    if check is not None:  # before anything is written: bad check data leaves out as it was
        xs, ys, subset, skipped = _load_check_images(model, check)
        report["check"] = {"data": storage.absolute(check.uri), "split": check.split, **({"subset": subset} if subset else {}),
                           **({"skipped": skipped} if check.skip_bad else {}),
                           **compare(model, onnx_bytes, xs, ys, check.batch_size, optimization=CHECK_OPTIMIZATION)}
        c = report["check"]
        if c["constant_output"]:
            report.setdefault("warnings", []).append(_constant_warning(c, f"the {c['images']} check images"))
        if _off(c):
            # rounding ties flip a handful of images on a trained model; more means the deployed model
            # will not score what the quantized model's report says
            report.setdefault("warnings", []).append(
                f"on the {c['images']} check images ({check.uri} split {check.split!r}) onnxruntime ({CHECK_OPTIMIZATION}) "
                f"agrees with the quantized model on {c['top1_agreement']:.2f} % of top-1 predictions"
                + (f", top-1 {c['top1_onnx']:.2f} % vs {c['top1_fake_quant']:.2f} %" if "top1_onnx" in c else "")
                + f" (max logit difference {c['max_abs_logit_diff']:.3g} of logits up to {c['max_abs_logit']:.3g}): "
                "the deployed model will not score what the quantized model's report says")
        # onnxruntime's defaults (with the value-changing rewrites), for the record; a graph its default
        # optimizations cannot load is an error naming that, not a traceback
        report["check_ort_default"] = _runnable_compare(model, onnx_bytes, xs, "all", report.get("opset"), ys,
                                                        check.batch_size)
        d = report["check_ort_default"]
        worse = d["top1_agreement"] < c["top1_agreement"] or \
            abs(d.get("top1_delta", 0.0)) > abs(c.get("top1_delta", 0.0))
        if worse and _off(d):
            # (when all-exact is as far off, its own warning above says so: disabling the rewrites would not help)
            # the session a deployment gets without options: its u8 rewrite and int32 bias change values
            report.setdefault("warnings", []).append(
                f"with onnxruntime's default session options (graph optimizations including "
                f"{' and '.join(VALUE_CHANGING_REWRITES)}) the exported model agrees with the quantized model on "
                f"{d['top1_agreement']:.2f} % of the check images' top-1 predictions"
                + (f", top-1 {d['top1_onnx']:.2f} % vs {d['top1_fake_quant']:.2f} %" if "top1_onnx" in d else "")
                + f" ({CHECK_OPTIMIZATION}, those two disabled: {c['top1_agreement']:.2f} %): deploy on onnxruntime "
                f"with them disabled (SessionOptions + disabled_optimizers, as quantcore.export.ort_session("
                f"optimization='{CHECK_OPTIMIZATION}') does)")
    _refuse_stale(out, {name for name, _ in pending.values()})
    for key, (name, data) in pending.items():
        report["files"][key] = _write(out, name, data)
    report["wall_s"] = time.perf_counter() - t0
    report["files"]["report"] = storage.join(out, "export_report.json")
    _write(out, "export_report.json", json.dumps(report, indent=1, default=str))
    return report


def export_checkpoint(checkpoint: str, out: str, formats: str | Sequence[str] = "all", opset: Optional[int] = None,
                      check: Optional[CheckData] = None) -> dict[str, Any]:
    """:func:`export_model` on ``quantcore.api.load(checkpoint)`` (PTQ or QAT, local or s3://)."""
    from ..api import load

    from ..io import storage

    parse_formats(formats)  # bad --format or --out fails before the checkpoint is read
    storage.join(out, "export_report.json")
    model = load(checkpoint)
    return export_model(model, out, formats, opset, check, source=checkpoint)


__all__ = ["FORMATS", "CheckData", "compare", "example_input", "export_checkpoint", "export_model", "parse_formats"]
