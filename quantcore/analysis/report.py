"""analysis.json, analysis.md and its plots (matplotlib, Agg canvas: no global backend switch)."""
from __future__ import annotations

import io
import json
import logging
import math
from typing import Any

from ..io import storage


def _fig():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _num(v: Any) -> float:
    return 80.0 if v is None else max(min(float(v), 80.0), -20.0)  # None: identical (+inf); clipped for the plot


def sqnr_plot(err: dict[str, Any]) -> bytes:
    """Per-quantizer tensor SQNR (dB), isolated bars and cumulative line, in execution order."""
    fig = _fig()
    ax = fig.add_subplot(111)
    names = err["order"]
    iso = [_num(err["quantizers"][n]["isolated"]["sqnr_db"]) for n in names]
    cum = [_num(err["quantizers"][n]["cumulative"]["sqnr_db"]) for n in names]
    xs = range(len(names))
    ax.bar(xs, iso, color=["#4C72B0" if err["quantizers"][n]["kind"] == "activation" else "#DD8452" for n in names],
           label="isolated (blue: activation, orange: weight)")
    ax.plot(xs, cum, color="k", marker=".", lw=1, label="cumulative")
    ax.set_xlabel("quantizer (execution order)")
    ax.set_ylabel("tensor SQNR vs float twin (dB)")
    step = max(1, len(names) // 40)
    ax.set_xticks(list(xs)[::step])
    ax.set_xticklabels([n.replace("_quantizer", "") for n in names][::step], rotation=90, fontsize=6, parse_math=False)
    ax.legend(fontsize=8)
    return _png(fig)


def pareto_plot(res: dict[str, Any]) -> bytes:
    """Every configuration the search evaluated (cost vs budget metric), the Pareto front, the budget."""
    fig = _fig()
    ax = fig.add_subplot(111)
    key = res["budget"]["metric"]
    pts = [(p["cost"], p["score"]) for p in res["evaluated"] if math.isfinite(p["score"])]
    if pts:
        ax.scatter(*zip(*pts), s=10, color="#999999", label="evaluated")
    front = [(p["cost"], p["score"]) for p in res["pareto"] if math.isfinite(p["score"])]
    if front:
        ax.step(*zip(*front), where="post", color="#C44E52", marker="o", ms=4, label="Pareto front")
    thr = -res["budget"]["value"] if key == "delta_top1" else res["budget"]["value"]
    ax.axhline(thr, color="#55A868", ls="--", lw=1, label=f"budget ({res['budget']['text']})")
    if math.isfinite(_score(res)):
        ax.scatter([res["cost"]], [_score(res)], marker="*", s=160, color="#8172B2", zorder=5, label="chosen")
    ax.set_xlabel("effective bits per element" if res["cost_model"] == "bits" else "GBOPs per image")
    ax.set_ylabel({"delta_top1": "Δ top-1 vs FP32 (points)", "agreement": "agreement with FP32 (%)",
                   "sqnr_db": "logit SQNR (dB)"}[key])
    ax.legend(fontsize=8)
    return _png(fig)


def _score(res: dict[str, Any]) -> float:
    v = res["metrics"].get(res["budget"]["metric"])
    return float("inf") if v is None else float(v)


def _f(v: Any, fmt: str = "{:.2f}") -> str:
    return "–" if v is None else fmt.format(v)


def markdown(result: dict[str, Any]) -> str:
    """analysis.md: error analysis, sensitivity, search (each present when run)."""
    lines = [f"# Quantization analysis: {result.get('name', '')}", ""]
    info = result.get("info") or {}
    if info:
        lines += [", ".join(f"{k}: {v}" for k, v in info.items()), ""]
    err = result.get("errors")
    if err:
        m = err.get("model") or {}
        lines += ["## Error analysis", "",
                  f"{err['images']} images; the model as given: agreement {_f(m.get('agreement'))}%, "
                  f"Δ top-1 {_f(m.get('delta_top1'), '{:+.2f}')}, logit SQNR {_f(m.get('sqnr_db'), '{:.1f}')} dB, "
                  f"KL {_f(m.get('kl'), '{:.4f}')}.", "", "![per-quantizer SQNR](sqnr.png)", "",
                  "| # | quantizer | spec | isolated SQNR dB | cumulative SQNR dB | cos (iso) | max/p99.99 | "
                  "zeros | clip % | grid use |", "|---|---|---|---|---|---|---|---|---|---|"]
        for n in err["order"]:
            q = err["quantizers"][n]
            st = q["stats"]
            lines.append(f"| {q['position']} | `{n}` | {q['spec']} | {_f(q['isolated']['sqnr_db'], '{:.1f}')} | "
                         f"{_f(q['cumulative']['sqnr_db'], '{:.1f}')} | {_f(q['isolated']['cosine'], '{:.4f}')} | "
                         f"{_f(st['outlier_ratio'], '{:.1f}')} | {100 * st['zero_fraction']:.1f}% | "
                         f"{_f(None if st['clip_fraction'] is None else 100 * st['clip_fraction'], '{:.3f}')} | "
                         f"{_f(None if st['grid_use'] is None else 100 * st['grid_use'], '{:.0f}%')} |")
        if err.get("groups"):
            lines += ["", f"Model output per group ({err.get('group_by')}): only this group quantized (isolated) / "
                      "everything up to it quantized (cumulative).", "",
                      "| group | isolated agreement % | isolated logit SQNR dB | cumulative agreement % | "
                      "cumulative logit SQNR dB |", "|---|---|---|---|---|"]
            for g, r in err["groups"].items():
                lines.append(f"| `{g}` | {_f(r['isolated']['agreement'])} | {_f(r['isolated']['sqnr_db'], '{:.1f}')} | "
                             f"{_f(r['cumulative']['agreement'])} | {_f(r['cumulative']['sqnr_db'], '{:.1f}')} |")
        if err["warnings"]:
            lines += ["", "### Warnings", ""] + [f"- {w}" for w in err["warnings"]]
        lines.append("")
    sens = result.get("sensitivity")
    if sens:
        lines += ["## Sensitivity", "", f"{sens['images']} images, groups by {sens['group_by']}, most sensitive "
                  "first (KL gain when the group alone stays float).", "",
                  "| group | alone quantized: Δ top-1 / agreement / KL / SQNR | alone float: Δ top-1 / agreement / KL / SQNR |",
                  "|---|---|---|"]
        for g in sens["ranking"]:
            r = sens["groups"][g]

            def row(m):
                return (f"{_f(m['delta_top1'], '{:+.2f}')} / {_f(m['agreement'])} / {_f(m['kl'], '{:.4f}')} / "
                        f"{_f(m['sqnr_db'], '{:.1f}')}")
            lines.append(f"| `{g}` | {row(r['alone_quantized'])} | {row(r['alone_float'])} |")
        lines.append("")
    srch = result.get("search")
    if srch:
        m = srch["metrics"]
        lines += ["## Mixed-precision search", "",
                  f"Budget: {srch['budget']['text']} on {srch['images']} search images; choices {srch['choices']}; "
                  f"cost: {srch['cost_model']}. {'Met' if srch['met'] else 'NOT met'}: Δ top-1 "
                  f"{_f(m.get('delta_top1'), '{:+.2f}')}{_discordant(m)}, agreement {_f(m['agreement'])}%, logit SQNR "
                  f"{_f(m['sqnr_db'], '{:.1f}')} dB, cost {srch['cost']:.4g}; "
                  f"{srch['quantizers_above_lowest']} of {len(srch['specs'])} quantizers "
                  f"({100 * srch['fraction_above_lowest']:.1f}%) above {srch['choices'][0]}; "
                  f"{len(srch['evaluated'])} configurations evaluated in {srch['seconds']:.0f} s.{_bound_text(srch)}", "",
                  "![Pareto](pareto.png)", "", "| group | choice |", "|---|---|"]
        if srch.get("uncosted"):
            lines[-5:-5] = [f"Cost {srch['cost_model']} does not price {len(srch['uncosted'])} searched quantizer(s) "
                            f"(no product op reads them): {', '.join(f'`{n}`' for n in srch['uncosted'])}.", ""]
        lines += [f"| `{g}` | {c} |" for g, c in srch["config"].items() if c != srch["choices"][0]]
        for key, title in (("check", "Check on the evaluation data"), ("reproduced", "Recipe through the PTQ path")):
            if srch.get(key):
                lines += ["", f"{title}: " + _rounded(srch[key])]
        lines += ["", "Recipe: `search_recipe.yaml`.", ""]
    for extra in result.get("tables") or []:
        lines += [extra, ""]
    return "\n".join(lines)


def _discordant(m: dict[str, Any]) -> str:
    """' (12 gained, 20 lost)': the images behind a top-1 difference (its noise is ~sqrt(sum) images)."""
    return "" if m.get("gained") is None else f" ({m['gained']} gained, {m['lost']} lost)"


def _bound_text(srch: dict[str, Any]) -> str:
    b = srch["budget"]
    if not b.get("bound_text"):
        return ""
    return (f" Checked on the search images' lower confidence bound (sampling noise of {srch['images']} images; "
            f"not a shift between the search images and other data): {b['bound_text']}.")


def _rounded(m: dict[str, Any]) -> str:
    return json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in m.items()})


def write_outputs(result: dict[str, Any], out: str, recipe_yaml: str | None = None) -> dict[str, str]:
    """Write analysis.json, analysis.md, sqnr.png / pareto.png and search_recipe.yaml under ``out``."""
    uris = {"json": storage.join(out, "analysis.json"), "md": storage.join(out, "analysis.md")}
    if result.get("errors"):
        uris["sqnr_plot"] = storage.join(out, "sqnr.png")
        storage.write_bytes(uris["sqnr_plot"], sqnr_plot(result["errors"]))
    if result.get("search"):
        uris["pareto_plot"] = storage.join(out, "pareto.png")
        storage.write_bytes(uris["pareto_plot"], pareto_plot(result["search"]))
    if recipe_yaml is not None:
        uris["recipe"] = storage.join(out, "search_recipe.yaml")
        storage.write_bytes(uris["recipe"], recipe_yaml.encode())
    storage.write_bytes(uris["md"], markdown(result).encode("utf-8", "backslashreplace"))
    storage.write_bytes(uris["json"], (json.dumps(_jsonable(result), indent=1, allow_nan=False) + "\n").encode())
    # an earlier analysis in this folder left outputs this run does not make: beside the new
    # analysis.json they would pass for this run's (a pipeline picking up search_recipe.yaml)
    stale = [name for key, name in (("sqnr_plot", "sqnr.png"), ("pareto_plot", "pareto.png"),
                                    ("recipe", "search_recipe.yaml"))
             if key not in uris and storage.exists(storage.join(out, name))]
    for name in stale:
        storage.delete(storage.join(out, name))
    if stale:
        logging.getLogger("quantcore").warning(
            "removed %s of an earlier analysis in %s: this run wrote none of them, and analysis.json/analysis.md "
            "now describe this run", ", ".join(stale), out)
    return uris


def _jsonable(o: Any) -> Any:
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o
