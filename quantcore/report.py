"""Run reports: ``report.json`` (machine-readable), ``report.md`` (people) and PNG plots."""
from __future__ import annotations

import contextlib
import datetime as _dt
import io
import logging
import re
import math
import os
import warnings
from typing import Any

from .evaluate import ModelScore
from .versions import library_versions

REPORT_SCHEMA = "quantcore.report/1"
# Process-wide switches that change model numerics: recorded, never silently relied upon.
RECORDED_ENV = ("TIMM_FUSED_ATTN", "CUBLAS_WORKSPACE_CONFIG", "OMP_NUM_THREADS", "AWS_ENDPOINT_URL",
                "AWS_ENDPOINT_URL_S3")


def _clean(v: Any) -> Any:
    """JSON-safe: non-finite floats (an infinite SQNR of identical logits, a NaN per-class accuracy of
    a class without images) become null, the only value every JSON consumer accepts."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def build_report(*, model: str, recipe: dict[str, Any] | None, scores: dict[str, ModelScore],
                 reference: str | None, data: dict[str, Any], calibration: dict[str, Any] | None = None,
                 timings: dict[str, float] | None = None, skipped: list[dict[str, str]] | None = None,
                 class_names: list[str] | None = None, extra: dict[str, Any] | None = None,
                 warnings: list[str] | None = None) -> dict[str, Any]:
    """The report dict. ``warnings``: things the reader must know before trusting the numbers (e.g. an
    FP32 model with random weights); shown at the top of report.md."""
    results = {n: s.as_dict() for n, s in scores.items()}
    warnings = list(warnings or []) + [
        f"{n}: inf/NaN logits on {s.nonfinite} of {s.count} images (e.g. float16 overflow), scored as wrong and, "
        f"against the reference, as disagreeing" + (" with logit SQNR -inf" if n != reference else "")
        for n, s in scores.items() if s.nonfinite]
    if reference is not None:
        ref = scores[reference]
        for n, s in scores.items():
            if n != reference:
                results[n]["delta_top1"] = s.top1 - ref.top1
                results[n]["delta_top5"] = s.top5 - ref.top5
    rep = {
        "schema": REPORT_SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": model,
        "recipe": recipe,
        "data": data,
        "calibration": calibration or {},
        "reference": reference,
        "results": results,
        "class_names": class_names,
        "timings_s": timings or {},
        "skipped": skipped or [],
        "versions": library_versions(),
        "environment": {k: os.environ[k] for k in RECORDED_ENV if k in os.environ},
        "warnings": list(warnings or []),
    }
    rep.update(extra or {})
    return _clean(rep)


def code(text: Any) -> str:
    """``text`` as one Markdown code span whatever it holds (a file name with a backtick closed the span
    early): fenced by one backtick more than its longest run, padded when it starts or ends with one."""
    t = " ".join(str(text).splitlines())
    run = max((len(m) for m in re.findall(r"`+", t)), default=0)
    pad = " " if t.startswith("`") or t.endswith("`") else ""
    return f"{'`' * (run + 1)}{pad}{t}{pad}{'`' * (run + 1)}"


def report_markdown(rep: dict[str, Any]) -> str:
    ref = rep.get("reference")
    evaluated = bool(rep.get("results"))
    lines = [f"# quantcore report: {rep['model']}", "",
             f"Created {rep['created']}. " + (f"Evaluation data: {code(rep['data'].get('eval_uri', '?'))} "
                                              f"({rep['data'].get('eval_count', '?')} images)." if evaluated else
                                              "Calibration only: nothing was evaluated."), ""]
    for w in rep.get("warnings") or []:
        lines += [f"> **WARNING**: {w}", ""]
    sub = rep["data"].get("eval_subset")
    if sub:
        n = rep["data"].get("eval_count")
        scored = f", {n} of them scored (the others bad, skipped)" if isinstance(n, int) and n != sub["selected"] else ""
        lines += [f"**Subset evaluation**: {sub['selected']} of {sub['of']} images of the split{scored} "
                  f"({sub['classes_represented']} of {sub['num_classes']} classes), {sub['method']} "
                  f"(seed {sub['seed']}). Accuracies are estimates on this sample, not the full split.", ""]
    cal = rep.get("calibration") or {}
    if cal and cal.get("per_variant"):
        each = ", ".join(f"{code(n)} {c.get('method', '?')} on {c.get('images', '?')}" for n, c in cal["per_variant"].items())
        lines += [f"Calibration images from {code(cal.get('uri', '?'))}: {each}.", ""]
    elif cal:
        lines += [f"Calibration: {cal.get('method', '?')} on {cal.get('images', '?')} images "
                  f"from {code(cal.get('uri', '?'))}.", ""]
        for key, what in (("reparam_layernorm", "LayerNorm reparameterization (RepQ-ViT)"),
                          ("reconstruction", "Reconstruction (AdaRound/BRECQ)")):
            if cal.get(key):
                info = cal[key]
                brief = ", ".join(f"{k} {v}" for k, v in info.items() if isinstance(v, (int, float, str)))[:300]
                lines += [f"{what}: {brief}.", ""]
                lines += [l for w in info.get("warnings") or [] for l in (f"> **WARNING**: {w}", "")]
    if evaluated:
        k = min([r.get("top5_k", 5) for r in rep["results"].values()] or [5])
        lines += [f"| model | top-1 % | top-{k} % | Δ top-1 | agreement % | logit SQNR dB |",
                  "|---|---|---|---|---|---|"]
    for name, r in rep["results"].items():
        def f(v, fmt="{:.2f}"):
            return "–" if v is None else (fmt.format(v) if isinstance(v, (int, float)) else str(v))
        delta = r.get("delta_top1")
        lines.append(f"| {name} | {f(r['top1'])} | {f(r['top5'])} | {f(delta, '{:+.2f}')} | "
                     f"{f(r.get('agreement') if name != ref else None)} | "
                     f"{f(r.get('sqnr_db') if name != ref else None, '{:.1f}')} |")
    lines.append("")
    tf = rep.get("transform")
    if isinstance(tf, dict) and tf.get("input_size"):  # what decides the pixels, beside the figures it explains
        lines += [f"Preprocessing ({tf.get('source', '?')}): input {'x'.join(str(v) for v in tf['input_size'])}, "
                  f"resize {tf.get('resize_size')} {tf.get('interpolation')}, crop {tf.get('crop_mode')} "
                  f"(crop_pct {tf.get('crop_pct')}), mean {tf.get('mean')}, std {tf.get('std')}"
                  + (f", mode {tf['mode']}" if tf.get("mode") else "") + ".", ""]
    if rep["data"].get("reference_note"):
        lines += [f"Reference: {rep['data']['reference_note']}.", ""]
    for vname, v in (rep.get("variants") or {}).items():
        be = ((v.get("calibration") or {}).get("backend") or {}) if isinstance(v, dict) else {}
        if be:  # which toolkit computed the ranges: several variants may compare toolkits in one run
            engines = ", ".join(f"{k} {n}" for k, n in sorted((be.get("engines") or {}).items()))
            lines += [f"Ranges of `{vname}` computed by {be.get('name')} {be.get('version') or ''}".rstrip()
                      + (f" (quantizers per range source: {engines})" if engines else "") + ".", ""]
            if be.get("no_counterpart"):
                n = len(be["no_counterpart"])
                lines += [f"> **WARNING**: {n} quantizer(s) of `{vname}` have no {be.get('name')} counterpart; "
                          f"their ranges come from quantcore's calibrator (report.json lists them).", ""]
        pl = v.get("placement") if isinstance(v, dict) else None
        if not pl:
            continue
        lines += [f"Placement of `{vname}`: family {pl.get('family')}, {pl.get('quantizers')} quantizers, "
                  f"{len(pl.get('attention') or [])} attentions quantized, {len(pl.get('folded_bn') or [])} "
                  f"BatchNorms folded, {len(pl.get('unfolded_bn') or {})} kept.", ""]
        lines += [f"- {n}" for n in pl.get("notes") or ()] + ([""] if pl.get("notes") else [])
        floats = pl.get("float") or {}
        if floats:
            lines += [f"Left float in `{vname}`:"] + [f"- {code(k)}: {r}" for k, r in list(floats.items())[:40]]
            if len(floats) > 40:
                lines.append(f"- … {len(floats) - 40} more in report.json")
            lines.append("")
    if rep.get("timings_s"):
        lines += ["Timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in rep["timings_s"].items()), ""]
    skipped = rep.get("skipped") or []
    lines += [f"Skipped samples: {len(skipped)}" + (":" if skipped else ".")]
    lines += [f"- {code(s['name'])}: {s['reason']}" for s in skipped[:50]]
    if len(skipped) > 50:
        lines.append(f"- … {len(skipped) - 50} more in report.json")
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in rep["versions"].items()), ""]
    for plot in rep.get("plots", []):
        lines.append(f"![{plot}]({plot})")
    text = "\n".join(lines) + "\n"
    if rep.get("evaluation_cost"):
        from .evaluate import cost_markdown

        text += "\n" + cost_markdown(rep["evaluation_cost"], rep.get("reference"))
    return text


def per_class_plot(rep: dict[str, Any]) -> bytes:
    """Grouped bars of per-class top-1 for every evaluated model (PNG bytes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    results = rep["results"]
    names = list(results)
    ncls = len(next(iter(results.values()))["per_class"])
    # a folder name that is not UTF-8 arrives with surrogate escapes, which no font can draw (matplotlib
    # raises): shown with the byte escaped, as report.md shows it
    labels = [_printable(c) for c in rep.get("class_names") or [str(i) for i in range(ncls)]]
    width = 0.8 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * ncls + 2), 4))
    for i, n in enumerate(names):
        vals = [v if v is not None else 0 for v in results[n]["per_class"]]
        ax.bar(np.arange(ncls) + i * width, vals, width, label=n)
    # class names are the data's folder names: '$' must print as itself, not start matplotlib's math mode
    ax.set_xticks(np.arange(ncls) + 0.4 - width / 2, labels, rotation=45, ha="right", fontsize=8, parse_math=False)
    ax.set_ylabel("top-1 %")
    ax.set_ylim(max(0, min(min(v or 0 for v in r["per_class"]) for r in results.values()) - 5), 100)
    ax.set_title(_printable(f"Per-class accuracy: {rep['model']}"), parse_math=False)
    legend = ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # never over the bars
    for t in legend.get_texts():
        t.set_parse_math(False)
    buf = io.BytesIO()
    with _missing_glyphs_said_once("per_class.png"):
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _printable(text: Any) -> str:
    """``text`` with surrogate escapes (bytes of a non-UTF-8 file name) written as ``\\xNN``."""
    try:
        return str(text).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that stands for no byte
        return str(text).encode("utf-8", "backslashreplace").decode("utf-8")


_GLYPH = re.compile(r"Glyph (\d+) \(.*\) missing from font")


@contextlib.contextmanager
def _missing_glyphs_said_once(plot: str):
    """One log line for characters the plot's font cannot draw (CJK folder names with DejaVu Sans)
    instead of matplotlib's warning per character and draw call. Only those warnings are taken; every
    other one goes through the filters and display it would have had."""
    glyphs: list[str] = []
    with warnings.catch_warnings():  # restores the filters and showwarning
        warnings.filterwarnings("always", message=_GLYPH.pattern)
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            m = _GLYPH.match(str(message))
            if m:
                glyphs.append(chr(int(m.group(1))))
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield
    if glyphs:
        logging.getLogger(__name__).warning(
            "%s: the plot's font has no glyph for %d character(s) of its labels (e.g. %r); they are drawn as "
            "boxes there (report.md and report.json have the names)", plot, len(set(glyphs)), sorted(set(glyphs))[0])


def ranges_plot(encodings: dict[str, Any], title: str = "Activation ranges") -> bytes:
    """Per-quantizer activation range (min..max) for every calibrated activation quantizer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in encodings["quantizers"] if r["kind"] == "activation" and isinstance(r.get("max"), float)
            and isinstance(r.get("min"), float)]
    fig, ax = plt.subplots(figsize=(8, max(3, 0.18 * len(rows) + 1)))
    for i, r in enumerate(rows):
        ax.plot([r["min"], r["max"]], [i, i], lw=3)
    ax.set_yticks(range(len(rows)), [r["name"].replace("_quantizer", "") for r in rows], fontsize=6, parse_math=False)
    ax.invert_yaxis()
    ax.set_xlabel("calibrated range")
    ax.set_title(title, parse_math=False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
