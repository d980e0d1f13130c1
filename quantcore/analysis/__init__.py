"""Find what hurts and fix it: per-quantizer error analysis, sensitivity, mixed-precision search.

    model = quantcore.load("run/fmnist_w4a4_ft1/model.qc.pt")
    eng = Engine(model, batches)                       # batches: (images, labels) kept in memory
    err = error_analysis(model, eng)                   # isolated / cumulative SQNR, range warnings
    sens = sensitivity(model, eng, groups="module")    # alone quantized / alone float
    stats = collect_statistics(model, calib_batches)   # once; reused for every bit width
    res = search(model, eng, Budget.from_options(delta_top1=0.1), stats)
    recipe = search_recipe(model.quantcore_recipe, model, res)   # base recipe + overrides

``quantcore analyze`` (CLI) and :func:`quantcore.api.analyze` run all of it and write
analysis.json, analysis.md, plots and search_recipe.yaml (:mod:`.report`).
"""
from .engine import Engine, LogitStats, trace_forward
from .error_analysis import error_analysis
from .groups import GROUPINGS, make_groups
from .search import Budget, CostModel, RangeBank, collect_statistics, parse_choices, search, search_recipe, verify_recipe
from .sensitivity import sensitivity

__all__ = ["Budget", "CostModel", "Engine", "GROUPINGS", "LogitStats", "RangeBank", "collect_statistics",
           "error_analysis", "make_groups", "parse_choices", "search", "search_recipe", "sensitivity",
           "trace_forward", "verify_recipe"]
