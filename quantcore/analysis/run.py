"""One analysis run (what ``quantcore analyze`` and :func:`quantcore.api.analyze` do).

Data: calibration images are the recipe's own (``calibration`` section, as ``quantcore ptq`` picks
them); the analysis/search images are a seeded sample of the *rest* of the same split (held out from
calibration, so the search is not tuned on the test set); an optional evaluation split checks the
chosen recipe at the end, run through the normal PTQ path (prepare + calibrate + evaluate).
"""
from __future__ import annotations

import contextlib
import copy
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from .. import api
from ..io import storage as _storage
from ..placement import unwrap
from ..errors import UserError
from .engine import Engine
from .error_analysis import error_analysis
from .groups import as_grouping
from .search import Budget, cast_specs, collect_statistics, search, search_recipe, verify_recipe
from .sensitivity import sensitivity

log = logging.getLogger(__name__)


@dataclass
class AnalyzeOptions:
    """What to run. ``groups``: sensitivity/logit-case grouping; ``search_groups``: the search's."""

    errors: bool = True
    sensitivity: bool = True
    search: bool = False
    budget: Budget | None = None
    groups: Any = "module"
    search_groups: Any = "quantizer"
    choices: Sequence[str] = ("4", "6", "8", "float")
    cost: str = "bits"
    workers: int = 1
    memory_mb: float = 512.0
    clip_warn: float = 0.01
    progress: bool = False  # tqdm bars per phase (rank 0 only under torchrun)


@contextlib.contextmanager
def _bar(on: bool, desc: str, total: int | None, unit: str) -> Iterator[Callable[[int], None] | None]:
    """A progress callback adding ``n`` per call (``unit="img"``) or setting the count reached
    (``unit="config"``: the search reports how many configurations it has evaluated); ``None`` off."""
    from .. import distributed

    if not on or (distributed.active() and distributed.rank() != 0):
        yield None
        return
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True) as bar:
        if unit == "config":
            def update(n: int) -> None:
                bar.n = n
                bar.refresh()
        else:
            update = bar.update
        yield update


def analyze_model(model: nn.Module, batches: list, opts: AnalyzeOptions, *, stats: dict | None = None,
                  fp32: nn.Module | None = None, calib_batches: list | None = None,
                  eval_batches: list | None = None, checkpoint: str | None = None) -> tuple[dict[str, Any], Any]:
    """Run the parts ``opts`` asks for on a calibrated ``model``; returns ``(result, search recipe or
    None)``. ``stats``: calibration statistics (default: collected on ``calib_batches``); ``fp32`` +
    ``calib_batches``: the FP32 model to re-run the recipe through the PTQ path (``reproduced``);
    ``eval_batches``: the final check (``check``)."""
    if opts.search and opts.budget is None:
        raise UserError("--search needs a budget: --budget-top1, --budget-agreement or --budget-sqnr")
    groups, sgroups = as_grouping(opts.groups), as_grouping(opts.search_groups)
    eng = Engine(model, batches)
    eng.require_quantized()
    result: dict[str, Any] = {"name": getattr(getattr(model, "quantcore_recipe", None), "name", type(model).__name__)}
    t0 = time.perf_counter()
    images = sum(x.shape[0] for x, _ in eng.batches)
    if opts.errors:
        with _bar(opts.progress, "error analysis", 2 * images, "img") as bar:
            result["errors"] = error_analysis(model, eng, groups=groups, memory_mb=opts.memory_mb,
                                              clip_warn=opts.clip_warn, workers=opts.workers, progress=bar)
    if opts.sensitivity:
        with _bar(opts.progress, "sensitivity", images, "img") as bar:
            result["sensitivity"] = sensitivity(model, eng, groups=groups, workers=opts.workers,
                                                errors=result.get("errors"), progress=bar)
    recipe = None
    if opts.search:
        casts = cast_specs(eng, sgroups, opts.choices, stats)
        if stats is None or casts:
            if calib_batches is None:
                raise UserError("the search needs calibration statistics: pass calib_batches (or stats)"
                                if stats is None else
                                f"the search needs calibration statistics of {len(casts)} float-cast quantizer(s) "
                                f"it may put on an integer grid ({', '.join(list(casts)[:3])}"
                                f"{', ...' if len(casts) > 3 else ''}): pass calib_batches, or keep them out "
                                "of search_groups")
            new = collect_statistics(model, calib_batches, casts)
            stats = new if stats is None else {**stats, **{n: new[n] for n in casts}}
        with _bar(opts.progress, "search", None, "config") as bar:
            res = search(model, eng, opts.budget, stats, groups=sgroups, choices=opts.choices, cost=opts.cost,
                         workers=opts.workers, progress=bar, calib_batches=calib_batches)
        recipe = search_recipe(model.quantcore_recipe, model, res, checkpoint=checkpoint)
        if fp32 is not None and calib_batches is not None:
            res["reproduced"] = verify_recipe(recipe, fp32, calib_batches, batches)
            res["reproduced"]["equal"] = res["reproduced"] == res["metrics"]
            if not res["reproduced"]["equal"]:
                log.warning("the search recipe run through prepare+calibrate gives %s, the search measured %s",
                            res["reproduced"], res["metrics"])
                if res["met"] and not opts.budget.ok(res["reproduced"]):
                    # what the recipe gives decides (a difference the search could not foresee)
                    res["met"], res["reproduced_met"] = False, False
                    recipe = search_recipe(model.quantcore_recipe, model, res, checkpoint=checkpoint)
                    log.warning("the budget (%s) is met on the search's figure but not by the recipe it writes: "
                                "reported as not met", opts.budget.describe())
            if eval_batches is not None:
                res["check"] = verify_recipe(recipe, fp32, calib_batches, eval_batches)
        result["search"] = res
    if eval_batches is not None:
        result["base_check"] = Engine(model, eval_batches).evaluate({"m": {}})["m"]
    result["seconds"] = time.perf_counter() - t0
    return result, recipe


def _batches(ds, indices: list[int], batch_size: int, workers: int, device: torch.device) -> list:
    from ..pipeline import _loader

    return [(x, y) for x, y, *_ in _loader(ds, batch_size, workers, indices, device)]


def _check_classes(model: nn.Module, batches: list, datasets: dict[str, Any]) -> None:
    """The model's logits must be the datasets' classes (as ``quantcore ptq``'s evaluation checks):
    with fewer logits, images of the extra classes are never right and every figure is silently off."""
    from ..models import output_logits

    with torch.no_grad(), api.quantization_disabled(model):
        n_out = output_logits(model(batches[0][0][:1])).shape[-1]
    for what, ds in datasets.items():
        if ds is not None and len(ds.classes) != n_out:
            raise UserError(f"model.num_classes: the model gives {n_out} logits, but {what} has {len(ds.classes)} "
                            f"classes; analyze on data of the model's classes (or set model.num_classes: "
                            f"{len(ds.classes)}, with weights trained for them)")


def check_searchable(recipe: Any, opts: AnalyzeOptions, model: nn.Module | None = None) -> None:
    """The search reuses one set of calibration statistics for every candidate; calibration-time
    weight changes (LayerNorm reparameterization, reconstruction) would have to be redone per
    candidate, which it does not do, and trained weights and ranges (QAT) are not what a recipe run
    on the FP32 weights gives: refuse instead of reporting figures the recipe won't give."""
    if not opts.search:
        return
    meta = getattr(unwrap(model), "quantcore_meta", None) if model is not None else None
    if isinstance(meta, dict) and (meta.get("extra") or {}).get("qat"):
        raise UserError("--search: this checkpoint was trained by QAT (learned weights and ranges); the search "
                        "re-derives ranges from calibration statistics and writes a PTQ recipe of the FP32 "
                        "weights, so its figures would not be this model's. Search on the PTQ checkpoint or the "
                        "FP32 weights (with --recipe), then train the recipe it writes with quantcore qat")
    if recipe is None:
        return
    if recipe.placement.reparam_layernorm:
        raise UserError(f"--search: recipe {recipe.name!r} sets placement.reparam_layernorm, which the search "
                        "does not redo per candidate; search without it, then add it to the found recipe")
    if getattr(recipe, "reconstruction", None) is not None:
        raise UserError(f"--search: recipe {recipe.name!r} has a reconstruction section, which the search does "
                        "not redo per candidate; search without it, then add it to the found recipe")


def run_cli(recipe: str | None, checkpoint: str | None, data: str, out: str, *, split: str = "train",
            eval_split: str | None = None, limit: int = 1000, search_limit: int = 5000, eval_limit: int | None = None,
            batch_size: int = 256, workers: int = 0, device: str = "auto", opts: AnalyzeOptions) -> dict[str, Any]:
    """The ``quantcore analyze`` job: load or calibrate, analyze, search, check, write the outputs."""
    from ..checkpoint import CheckpointError
    from ..data import eval_transform, limit_subset, open_dataset
    from ..pipeline import _calibration_indices, _with_checkpoint, check_out, resolve_device
    from ..recipe import dump_recipe, load_recipe
    from .report import write_outputs

    if limit < 1 or search_limit < 1:
        raise UserError("--limit/--search-limit: must be at least 1 image")
    if checkpoint is None and recipe is None:
        raise UserError("give --checkpoint (a calibrated model.qc.pt, or FP32 weights with --recipe) or --recipe "
                        "(its model: section names the FP32 weights)")
    check_out(out)
    if eval_split is not None and eval_split == split:
        log.warning("--eval-split %s is --split: the final check runs on the split the calibration and "
                    "analysis/search images come from, so it is not an independent check", split)
    if checkpoint is not None and not _storage.is_s3(checkpoint) and os.path.isdir(checkpoint):
        raise UserError(f"--checkpoint {checkpoint}: a directory; a calibrated checkpoint is a model.qc.pt file, "
                        "FP32 weights a state_dict file. A Hugging Face model folder goes into the recipe "
                        "(model.name: <folder>, pretrained: true): give --recipe alone")
    dev = resolve_device(device)
    model = fp32 = None
    fp32_ckpt = None
    try:
        if checkpoint is None:
            raise CheckpointError("no checkpoint")
        model = api.load(checkpoint).to(dev)
        r = model.quantcore_recipe
        if recipe is not None:
            raise UserError(f"--recipe {recipe}: --checkpoint {checkpoint} is calibrated already, with its own "
                            f"recipe {r.name!r}; drop --recipe, or give FP32 weights to calibrate with another")
    except CheckpointError as err:
        if recipe is None:
            raise UserError(f"--checkpoint {checkpoint}: not a calibrated checkpoint ({err}); give --recipe to "
                            "calibrate FP32 weights") from None
        r = _with_checkpoint(load_recipe(recipe), checkpoint)
        fp32_ckpt = checkpoint
    if fp32 is None and r.model is not None and (r.model.checkpoint or r.model.pretrained):
        fp32 = api.build_model(r).to(dev).eval()
        fp32_ckpt = fp32_ckpt or r.model.checkpoint
    check_searchable(r, opts, model)
    if model is None and fp32 is None:  # before anything reads the model (its eval transform, its classes)
        raise UserError(f"recipe {r.name!r}: no FP32 weights to calibrate: give --checkpoint (FP32 weights or a "
                        f"calibrated model.qc.pt), or set model.checkpoint / model.pretrained in the recipe")
    ref = fp32 if fp32 is not None else model
    ds = open_dataset(data, split, eval_transform(ref))
    # the final check's split is opened before any calibration or analysis: a missing one fails first
    eds = open_dataset(data, eval_split, eval_transform(ref)) if eval_split else None
    cidx = _calibration_indices(ds, r)
    calib = _batches(ds, cidx, r.calibration.batch_size, workers, dev)
    _check_classes(ref, calib, {f"{data} (split {split!r})": ds, f"{data} (split {eval_split!r})": eds})
    if model is None:
        model = api.prepare(copy.deepcopy(fp32), r)
        api.calibrate(model, calib)
        stats = api.calibration_state(model)
    else:
        stats = collect_statistics(model, calib) if opts.search else None
    taken = set(cidx)
    rest = [i for i in torch.randperm(len(ds), generator=torch.Generator().manual_seed(1)).tolist() if i not in taken]
    if not rest:
        raise UserError(f"split {split!r} of {data}: its {len(ds)} images are all calibration images (recipe "
                        f"{r.name!r}, calibration section); none is left to analyze: use a larger split or "
                        "fewer calibration images")
    held = rest[:max(limit, search_limit if opts.search else 0)]
    for opt, asked in (("--limit", limit), ("--search-limit", search_limit if opts.search else 0)):
        if asked > len(rest):  # said, not silently clamped
            log.warning("%s %d: split %r of %s has %d images besides the %d calibration images; using those %d",
                        opt, asked, split, data, len(rest), len(cidx), len(rest))
    if opts.search:  # before any analysis runs
        opts.budget.check_reachable(len(held[:search_limit]))
    search_set = _batches(ds, sorted(held[:search_limit]), batch_size, workers, dev) if opts.search else None
    analysis_set = _batches(ds, sorted(held[:limit]), batch_size, workers, dev)
    eval_set = None
    if eds is not None:
        eidx, _ = limit_subset(eds, eval_limit)
        if eval_limit and eval_limit > len(eds):
            log.warning("--eval-limit %d: split %r of %s has %d images; the final check uses all of them",
                        eval_limit, eval_split, data, len(eds))
        eval_set = _batches(eds, eidx if eidx is not None else list(range(len(eds))), batch_size, workers, dev)
    info = {"checkpoint": _storage.absolute(checkpoint) if checkpoint else checkpoint, "data": _storage.absolute(data),
            "split": split, "calibration_images": len(cidx),
            "analysis_images": len(sorted(held[:limit])), "eval_split": eval_split}
    a_opts = copy.copy(opts)
    a_opts.search = False
    result, _ = analyze_model(model, analysis_set, a_opts)
    recipe_obj = None
    if opts.search:
        s_opts = AnalyzeOptions(errors=False, sensitivity=False, search=True, budget=opts.budget,
                                search_groups=opts.search_groups, choices=opts.choices, cost=opts.cost,
                                workers=opts.workers, progress=opts.progress)
        sres, recipe_obj = analyze_model(model, search_set, s_opts, stats=stats, fp32=fp32, calib_batches=calib,
                                         eval_batches=eval_set, checkpoint=fp32_ckpt)
        result["search"] = sres["search"]
        info["search_images"] = len(held[:search_limit])
        if "base_check" in sres:
            result["base_check"] = sres["base_check"]
    elif eval_set is not None:
        result["base_check"] = Engine(model, eval_set).evaluate({"m": {}})["m"]
    result["info"] = info
    from .. import distributed

    if not distributed.active() or distributed.rank() == 0:  # under torchrun: rank 0 writes
        result["artifacts"] = write_outputs(result, out, dump_recipe(recipe_obj) if recipe_obj is not None else None)
    return result
