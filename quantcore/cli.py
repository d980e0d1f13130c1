"""``quantcore`` command line: pack, calibrate, evaluate, ptq, train, demo, recipes.

User mistakes (bad recipe, bad data, missing file, bad URI) print one clear line and exit 2; no
stack trace. Anything else is a bug and keeps its traceback (exit 1).
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
import time
from typing import List, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Post-training quantization of vision models: calibrate, evaluate, report.")

RecipeOpt = typer.Option(..., "--recipe", "-r", help="Built-in recipe name, YAML path, or s3:// URI. Repeat for several variants.")
DeviceOpt = typer.Option("auto", help="torch device: auto (cuda if present), cpu, cuda, cuda:1 ...")
WorkersOpt = typer.Option(0, "--workers", "-j", min=0, help="DataLoader worker processes for decoding images.")
BatchOpt = typer.Option(64, "--batch-size", "-b", min=1, help="Evaluation batch size (calibration uses the recipe's).")
SkipOpt = typer.Option(False, "--skip-bad", help="Skip corrupt/missing samples and list them in the report instead of failing.")
CacheOpt = typer.Option(None, "--cache-dir", help="Local directory caching remote zip shards.")
LayoutOpt = typer.Option("auto", help="Dataset layout: auto, folder (ImageNet), zip (zipped/sharded), resisc.")
ProgressOpt = typer.Option(True, "--progress/--no-progress", help="Show progress bars.")
LimitOpt = typer.Option(None, min=0, help="Evaluate a seeded, class-stratified sample of N images (marked as a subset; 0 or unset: the whole split).")


def _progress(progress: bool) -> bool:
    """``--no-progress`` also for the libraries this process drives (transformers' "Loading weights" bar,
    Hugging Face Hub downloads): the CLI owns the process, so their process-wide switches are its to set."""
    if not progress:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read by the Hub when it is imported later
        for mod, fn in (("huggingface_hub.utils", "disable_progress_bars"), ("transformers.utils.logging",
                                                                            "disable_progress_bar")):
            if importlib.util.find_spec(mod.split(".")[0]) is None:
                continue
            try:  # (already imported: the variable above came too late for it)
                getattr(importlib.import_module(mod), fn)()
            except (ImportError, AttributeError):  # a broken or other install: its bars stay
                pass
    return progress


def _opts(batch_size, workers, device, progress, checkpoint=None):
    from .pipeline import RunOptions

    return RunOptions(batch_size=batch_size, num_workers=workers, device=device, progress=_progress(progress),
                      checkpoint=checkpoint)


@app.command()
def recipes() -> None:
    """List the built-in recipes."""
    from .recipe import builtin_recipes, load_recipe

    for name in sorted(builtin_recipes()):
        _echo(f"{name:<22} {load_recipe(name).description}")


@app.command("show-recipe")
def show_recipe(recipe: str = typer.Argument(..., help="Recipe name, path or URI.")) -> None:
    """Print a recipe with every default filled in (validates it)."""
    from .recipe import dump_recipe, load_recipe

    _echo(dump_recipe(load_recipe(recipe)))


@app.command()
def pack(src: str = typer.Argument(..., help="Source dataset URI (ImageNet folder or Resisc45 imagepaths)."),
         dst: str = typer.Argument(..., help="Destination URI for zip shards + maps (local or s3://)."),
         split: List[str] = typer.Option(["train", "val"], "--split", "-s", help="Split(s) to pack."),
         layout: str = LayoutOpt,
         shard_size: int = typer.Option(10000, min=1, help="Images per zip shard."),
         skip_bad: bool = SkipOpt) -> None:
    """Convert a folder or imagepaths dataset into zip shards + maps (many workers can read in parallel)."""
    from .data import pack as pack_fn

    for s in split:
        info = pack_fn(src, dst, s, layout=layout, shard_size=shard_size, skip_bad=skip_bad)
        _echo(f"{s}: {json.dumps(_short(info))}")


def _short(info):
    if isinstance(info, dict):
        return {k: v for k, v in info.items() if k in ("count", "shards", "classes", "skipped")} or info
    return info


@app.command()
def calibrate(recipe: List[str] = RecipeOpt,
              data: str = typer.Option(..., "--data", "-d", help="Calibration dataset URI."),
              split: str = typer.Option("train", help="Split to draw calibration images from."),
              out: str = typer.Option(..., "--out", "-o", help="Output URI prefix (local or s3://)."),
              checkpoint: Optional[str] = typer.Option(None, help="FP32 weights (local/s3) overriding the recipe's."),
              layout: str = LayoutOpt, skip_bad: bool = SkipOpt, cache_dir: Optional[str] = CacheOpt,
              workers: int = WorkersOpt, device: str = DeviceOpt, progress: bool = ProgressOpt) -> None:
    """Calibrate: writes <out>/<recipe>/model.qc.pt, encodings.json and a report (no evaluation)."""
    from .pipeline import DataSpec, ptq

    rep = ptq(_load_recipes(recipe), DataSpec(data, split, layout, skip_bad, cache_dir), None, out,
              _opts(64, workers, device, progress, checkpoint))
    for name, v in rep["variants"].items():
        _echo(f"{name}: {v['artifacts']['checkpoint']} ({v['calibration']['images']} images, "
                   f"{v['calibration']['collect_s'] + v['calibration']['finalize_s']:.1f} s)")


def _load_recipes(values: List[str]) -> list:
    """``-r a -r b`` or ``-r a,b`` (as the TorchX components take them); a value that names a recipe
    as a whole (a path with a comma in it) is not split."""
    from .recipe import load_recipe

    out = []
    for v in values:
        parts = [p.strip() for p in v.split(",")]
        if len(parts) > 1 and all(parts) and not _names_a_file(v):
            out += [load_recipe(p) for p in parts]
        else:
            out.append(load_recipe(v))
    return out


def _check_train_classes(model, ds, data: str, split: str) -> None:
    """The model's logits must match the training data's classes (a label beyond them would fail in the
    loss; fewer classes would train a head of the wrong size without a word)."""
    import torch

    from .data import model_label_names
    from .errors import UserError
    from .models import output_logits
    from .placement import default_example_input, unwrap

    if model_label_names(unwrap(model)) is not None:
        return  # the data's folders are mapped by the model's class names when read
    with torch.no_grad():
        got = output_logits(model(default_example_input(model))).shape[-1]
    if got != ds.num_classes:
        raise UserError(f"model.num_classes: the model gives {got} logits, but the training data ({data} split "
                        f"{split!r}) has {ds.num_classes} classes; set model.num_classes: {ds.num_classes}")


def _join(out: str, name: str) -> str:
    """``out``/``name`` as the storage layer writes it (``s3://b/run/`` + ``report.md``: one slash)."""
    from .io import storage

    return storage.join(out, name)


def _names_a_file(v: str) -> bool:
    """Whether ``v`` as a whole is an existing recipe file (local, file:// or s3://)."""
    from .io import storage

    try:
        return storage.exists(v)
    except (OSError, ValueError):
        return False


def _one(values: List[str], flag: str, why: str) -> str:
    """The single value of an option typer would otherwise let a repeat overwrite silently."""
    from .errors import UserError

    if len(values) != 1:
        raise UserError(f"{flag}: give it once (got {len(values)}: {', '.join(values)}); {why}")
    return values[0]


@app.command()
def evaluate(checkpoint: List[str] = typer.Option(..., "--checkpoint", "-c", help="Calibrated checkpoint (model.qc.pt), once."),
             data: str = typer.Option(..., "--data", "-d", help="Evaluation dataset URI."),
             split: str = typer.Option("val", help="Split to evaluate on."),
             out: Optional[str] = typer.Option(None, "--out", "-o", help="Where to write report.json/md/png."),
             limit: Optional[int] = LimitOpt,
             layout: str = LayoutOpt, skip_bad: bool = SkipOpt, cache_dir: Optional[str] = CacheOpt,
             batch_size: int = typer.Option(64, "--batch-size", "-b", min=1, help="Evaluation batch size."),
             workers: int = WorkersOpt, device: str = DeviceOpt,
             progress: bool = ProgressOpt) -> None:
    """Evaluate a calibrated checkpoint, quantized vs its own float path, in one pass over the data."""
    from .errors import UserError
    from .io import storage
    from .pipeline import DataSpec, evaluate_checkpoint

    why = ("evaluate one checkpoint per run (`quantcore ptq -r a -r b` calibrates and evaluates several recipes "
           "in one pass)")
    checkpoint = _one(checkpoint, "--checkpoint/-c", why)
    if "," in checkpoint and not storage.exists(checkpoint):  # `ptq -r a,b` takes a list: -c does not
        raise UserError(f"--checkpoint/-c {checkpoint}: one checkpoint, not a comma-separated list; {why}")
    rep = evaluate_checkpoint(checkpoint, DataSpec(data, split, layout, skip_bad, cache_dir, limit), out,
                              _opts(batch_size, workers, device, progress))
    _print_results(rep)


@app.command()
def ptq(recipe: List[str] = RecipeOpt,
        calib_data: str = typer.Option(..., "--calib-data", help="Calibration dataset URI."),
        calib_split: str = typer.Option("train", help="Calibration split."),
        eval_data: Optional[str] = typer.Option(None, help="Evaluation dataset URI (default: the calibration one)."),
        eval_split: str = typer.Option("val", help="Evaluation split."),
        out: str = typer.Option(..., "--out", "-o", help="Output URI prefix (local or s3://)."),
        checkpoint: Optional[str] = typer.Option(None, help="FP32 weights (local/s3) overriding the recipe's."),
        limit: Optional[int] = LimitOpt,
        layout: str = LayoutOpt, skip_bad: bool = SkipOpt, cache_dir: Optional[str] = CacheOpt,
        batch_size: int = BatchOpt, workers: int = WorkersOpt, device: str = DeviceOpt,
        progress: bool = ProgressOpt) -> None:
    """Calibrate every recipe, evaluate FP32 and all variants in one pass, write checkpoints and reports."""
    from .pipeline import DataSpec, ptq as ptq_fn

    rep = ptq_fn(_load_recipes(recipe), DataSpec(calib_data, calib_split, layout, skip_bad, cache_dir),
                 DataSpec(eval_data or calib_data, eval_split, layout, skip_bad, cache_dir, limit,
                          given=eval_data is not None), out,
                 _opts(batch_size, workers, device, progress, checkpoint))
    _print_results(rep)
    _echo(f"report: {_join(out, 'report.md')}")


@app.command()
def train(recipe: str = typer.Option(..., "--recipe", "-r", help="Recipe whose model: and train: sections are used."),
          data: str = typer.Option(..., "--data", "-d", help="Training dataset URI."),
          split: str = typer.Option("train", help="Training split."),
          out: str = typer.Option(..., "--out", "-o", help="Where to write the FP32 state_dict (e.g. s3://b/m.pt)."),
          epochs: Optional[int] = typer.Option(None, min=1, help="Override train.epochs."),
          layout: str = LayoutOpt,
          workers: Optional[int] = typer.Option(None, "--workers", "-j", min=0,
                                                help="DataLoader worker processes (default: train.num_workers)."),
          device: str = DeviceOpt) -> None:
    """Plain FP32 training / fine-tuning of the recipe's model (single process), as its train: section says."""
    import io

    import torch

    from .api import build_model
    from .config import TrainConfig
    from .data import eval_transform, make_loader, open_dataset
    from .io import storage
    from .pipeline import resolve_device
    from .recipe import load_recipe
    from .train import train_classifier

    r = load_recipe(recipe)
    cfg = r.train or TrainConfig()
    if epochs is not None:
        cfg = cfg.model_copy(update={"epochs": epochs})
    torch.manual_seed(cfg.seed)  # train.seed seeds the model's initialization too (as the demo's training)
    model = build_model(r)
    ds = open_dataset(data, split, eval_transform(model), layout=layout)
    _check_train_classes(model, ds, data, split)
    loader = make_loader(ds, cfg.batch_size, cfg.num_workers if workers is None else workers, shuffle=True,
                         seed=cfg.seed, drop_last=False)
    res = train_classifier(model, lambda e: loader, len(loader), cfg, device=resolve_device(device),
                           on_epoch=lambda e, loss: _echo(f"epoch {e + 1}/{cfg.epochs} loss {loss:.4f}"))
    buf = io.BytesIO()
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, buf)
    storage.write_bytes(out, buf.getvalue())
    _echo(f"trained {res.steps} steps in {res.seconds:.0f} s -> {out}")


@app.command()
def qat(recipe: List[str] = typer.Option(..., "--recipe", "-r", help="Recipe (name, YAML path or s3:// URI), once; its qat: section drives training."),
        data: str = typer.Option(..., "--data", "-d", help="Training dataset URI (calibration images come from it too)."),
        split: str = typer.Option("train", help="Training split."),
        eval_data: Optional[str] = typer.Option(None, help="Validation dataset URI (default: the training one)."),
        eval_split: str = typer.Option("val", help="Validation split (periodic validation and the final report)."),
        out: str = typer.Option(..., "--out", "-o", help="Output URI prefix: checkpoints/, metrics.jsonl, ptq/, <recipe>/, report.*"),
        checkpoint: Optional[str] = typer.Option(None, help="FP32 weights (local/s3) overriding the recipe's."),
        init: Optional[str] = typer.Option(None, help="Start from this PTQ checkpoint (model.qc.pt) instead of calibrating."),
        epochs: Optional[int] = typer.Option(None, min=1, help="Override qat.epochs."),
        max_steps: Optional[int] = typer.Option(None, min=1, help="Override qat.max_steps (optimizer steps in all)."),
        batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", min=1, help="Override qat.batch_size (per rank)."),
        eval_limit: Optional[int] = typer.Option(None, min=1, help="Final evaluation on a seeded, class-stratified sample of N images (periodic validation: qat.eval_limit)."),
        layout: str = LayoutOpt, skip_bad: bool = SkipOpt, cache_dir: Optional[str] = CacheOpt,
        workers: Optional[int] = typer.Option(None, "--workers", "-j", min=0, help="DataLoader workers per rank (default: qat.num_workers)."),
        device: str = DeviceOpt, progress: bool = ProgressOpt,
        resume: bool = typer.Option(True, "--resume/--no-resume", help="Resume from the newest valid checkpoint under OUT/checkpoints.")) -> None:
    """Quantization-aware training: calibrate (or --init), train with the recipe's qat: section, convert, report.

    Data-parallel when started by torchrun (one rank per GPU with --device cuda) or Ray Train.
    Exit 143 after SIGTERM: a checkpoint was written, and running the same command again resumes."""
    from .pipeline import DataSpec
    from .qat import QATOptions, run_qat
    from .recipe import load_recipe

    r = load_recipe(_one(recipe, "--recipe/-r", "one QAT run trains one recipe"))
    opts = QATOptions(device=device, num_workers=workers, progress=_progress(progress), checkpoint=checkpoint, init=init,
                      resume=resume, epochs=epochs, max_steps=max_steps, batch_size=batch_size, eval_limit=eval_limit)
    rep = run_qat(r, DataSpec(data, split, layout, skip_bad, cache_dir),
                  DataSpec(eval_data or data, eval_split, layout, skip_bad, cache_dir), out, opts)
    import os

    if os.environ.get("RANK", "0") == "0" and rep.get("results"):  # one rank prints (the group is gone by now)
        _print_results(rep)
        _echo(f"report: {_join(out, 'report.md')}")


@app.command()
def analyze(ctx: typer.Context,
            checkpoint: Optional[str] = typer.Option(None, "--checkpoint", "-c", help="Calibrated checkpoint (model.qc.pt), or FP32 weights with --recipe (without it: the weights the recipe's model: section names)."),
            data: str = typer.Option(..., "--data", "-d", help="Dataset URI (calibration images and held-out analysis/search images)."),
            out: str = typer.Option(..., "--out", "-o", help="Where to write analysis.json/md, plots, search_recipe.yaml."),
            recipe: Optional[str] = typer.Option(None, "--recipe", "-r", help="Recipe for FP32 weights (default: the checkpoint's own)."),
            split: str = typer.Option("train", help="Split for calibration and the held-out analysis/search images."),
            eval_split: Optional[str] = typer.Option(None, help="Split for the final check of the model and the search's recipe (e.g. test)."),
            limit: int = typer.Option(1000, min=1, help="Held-out images for error analysis and sensitivity."),
            search_limit: int = typer.Option(5000, min=1, help="Held-out images the search measures its budget on."),
            eval_limit: Optional[int] = typer.Option(None, min=0, help="Final check on a seeded, class-stratified sample of N images (0 or unset: the whole split)."),
            search: bool = typer.Option(False, "--search", help="Run the mixed-precision search (needs a budget)."),
            budget_top1: Optional[float] = typer.Option(None, help="Search budget: max top-1 drop vs FP32, points."),
            budget_agreement: Optional[float] = typer.Option(None, help="Search budget: min top-1 agreement with FP32, %."),
            budget_sqnr: Optional[float] = typer.Option(None, help="Search budget: min logit SQNR vs FP32, dB."),
            budget_confidence: Optional[float] = typer.Option(None, help="With --search and --budget-top1 or --budget-agreement: check the budget on the lower confidence bound of the search images' figure (a probability in [0.5, 1), e.g. 0.9), not on the figure itself; a result that just meets the budget on N images is otherwise a coin toss on other images."),
            groups: str = typer.Option("module", help="Sensitivity groups: quantizer, module, block, or comma-separated globs (blocks.*.mlp.fc2)."),
            search_groups: str = typer.Option("quantizer", help="Search groups (same forms as --groups)."),
            choices: str = typer.Option("4,6,8,float", help="Search precisions, cheapest first: bits, float (no quantizer), fp16/bf16 (a cast; it also acts during calibration: the ranges after it are collected for each set of casts tried, one calibration pass each)."),
            cost: str = typer.Option("bits", help="Search cost model: bits (effective bits) or bops."),
            no_errors: bool = typer.Option(False, "--no-errors", help="Skip the per-quantizer error analysis."),
            no_sensitivity: bool = typer.Option(False, "--no-sensitivity", help="Skip the sensitivity sweep."),
            parallel: int = typer.Option(1, "--parallel", min=1, help="Processes sharing the sensitivity/search sweeps (ranks under torchrun)."),
            batch_size: int = BatchOpt, workers: int = WorkersOpt, device: str = DeviceOpt,
            progress: bool = ProgressOpt) -> None:
    """Find what hurts: per-quantizer SQNR (isolated/cumulative), sensitivity, and a mixed-precision search to a budget."""
    from .analysis.run import AnalyzeOptions, run_cli
    from .analysis.search import Budget, parse_choices
    from .errors import UserError

    def _given(*names: str) -> list[str]:  # typed on the command line or from the environment
        return ["--" + n.replace("_", "-") for n in names
                if getattr(ctx.get_parameter_source(n), "name", "DEFAULT") not in ("DEFAULT", "DEFAULT_MAP")]

    budget = None
    given = _given("budget_top1", "budget_agreement", "budget_sqnr", "budget_confidence")
    if given and not search:
        raise UserError(f"{', '.join(given)}: only the mixed-precision search uses a budget; add --search")
    if no_errors and no_sensitivity and not search and eval_split is None:
        raise UserError("--no-errors and --no-sensitivity without --search or --eval-split: this run would "
                        "analyze nothing; drop one of them, or add --search / --eval-split")
    why = [(_given("search_limit", "search_groups", "choices", "cost") if not search else [],
            "the search options need --search"),
           (_given("eval_limit") if eval_split is None else [], "--eval-limit needs --eval-split"),
           (_given("groups") if no_errors and no_sensitivity else [],
            "--groups is for the error analysis and the sensitivity sweep, both switched off")]
    unused = [o for opts_, _ in why for o in opts_]
    if unused:
        raise UserError(f"{', '.join(unused)}: not used by this run (" + "; ".join(w for o, w in why if o) + ")")
    if search:
        budget = Budget.from_options(budget_top1, budget_agreement, budget_sqnr, budget_confidence)
    opts = AnalyzeOptions(errors=not no_errors, sensitivity=not no_sensitivity, search=search, budget=budget,
                          groups=groups, search_groups=search_groups, choices=parse_choices(choices.split(","), "--choices"),
                          cost=cost, workers=parallel, progress=_progress(progress))
    if cost not in ("bits", "bops"):
        raise UserError(f"--cost: unknown cost model {cost!r} (bits or bops)")
    res = run_cli(recipe, checkpoint, data, out, split=split, eval_split=eval_split, limit=limit,
                  search_limit=search_limit, eval_limit=eval_limit, batch_size=batch_size, workers=workers,
                  device=device, opts=opts)
    if res.get("search"):
        s = res["search"]
        _echo(f"search: {'met' if s['met'] else 'NOT met'} ({s['budget']['text']}"
                   + (f"; {s['budget']['bound_text']}" if s["budget"].get("bound_text") else "") + "); "
                   f"{100 * s['fraction_above_lowest']:.1f}% of quantizers above {s['choices'][0]}; "
                   f"metrics {json.dumps(s['metrics'])}")
        if s.get("check"):
            _echo(f"check on {eval_split}: {json.dumps(s['check'])}")
    if res.get("base_check"):
        _echo(f"check of the model as given on {eval_split}: {json.dumps(res['base_check'])}")
    _echo(f"report: {res['artifacts']['md']}")


@app.command("export")
def export_cmd(checkpoint: str = typer.Argument(..., help="Calibrated checkpoint (model.qc.pt, PTQ or QAT), local or s3://."),
               out: str = typer.Option(..., "--out", "-o", help="Directory or s3:// prefix for model.onnx, encodings, tables, export_report.json."),
               format: str = typer.Option("all", "--format", "-f", help="onnx, aimet, trt-table, a comma-separated list, or all."),
               opset: Optional[int] = typer.Option(None, help="ONNX opset 13..21 (default 17; 21 when a 4/16-bit quantizer needs it)."),
               check_data: Optional[str] = typer.Option(None, help="Dataset URI: run its images through onnxruntime and the fake-quant model (agreement, top-1)."),
               check_split: Optional[str] = typer.Option(None, help="Split of --check-data (default val, as evaluate)."),
               check_limit: Optional[int] = typer.Option(None, help="Check on a seeded, class-stratified sample of N images of --check-data (0 or unset: the whole split)."),
               check_skip_bad: bool = typer.Option(False, "--check-skip-bad", help="Skip undecodable images of --check-data (listed in export_report.json check.skipped) instead of failing.")) -> None:
    """Export a checkpoint for deployment: ONNX QDQ (TensorRT/onnxruntime), AIMET encodings, TensorRT range table."""
    from .export.run import check_data as check_options, export_checkpoint

    check = check_options(check_data, check_split, check_limit, check_skip_bad)
    rep = export_checkpoint(checkpoint, out, format, opset, check)
    _echo(f"opset {rep['opset']}, {len(rep['quantizers'])} quantizers in the graph, onnx.checker ok; "
               f"{len(rep['not_trt_native'])} not TensorRT-native")
    for key in ("trt_table", "aimet"):  # left out of `all`, with the reason
        if (rep.get(key) or {}).get("written") is False:
            _echo(f"not written: {rep[key]['why']}")
    for w in rep.get("warnings", []):
        _echo(f"warning: {w}", err=True)
    if rep.get("check"):
        c = rep["check"]
        _echo(f"onnxruntime vs fake quant on {c['images']} images: agreement {c['top1_agreement']:.2f}%, "
                   f"top-1 {c['top1_onnx']:.2f}% vs {c['top1_fake_quant']:.2f}%")
    _echo(f"report: {rep['files']['report']}")


@app.command()
def demo(store: str = typer.Option("demo-store", help="Local folder (or s3:// prefix) acting as the object store."),
         epochs: Optional[int] = typer.Option(None, min=1, help="FP32 training epochs; other than the demo recipe's 12, a model is trained here (as --retrain)."),
         eval_limit: Optional[int] = typer.Option(None, min=0, help="Evaluate a seeded, class-stratified sample of N test images (default, or 0: all 10,000)."),
         train_limit: Optional[int] = typer.Option(None, min=1, help="Use only the first N images of each split; a model is trained on them here (as --retrain)."),
         seed: Optional[int] = typer.Option(None, help="FP32 training seed; other than the demo recipe's 0, a model is trained here (as --retrain)."),
         retrain: bool = typer.Option(False, "--retrain", help="Use a model trained here (trained now, or cached in the store by an earlier run) instead of the one shipped with quantcore."),
         workers: int = WorkersOpt, progress: bool = ProgressOpt) -> None:
    """Run the main job in this process: pack Fashion-MNIST, install the shipped small ViT (or train one), PTQ (ft1/ft2 W8A8, ft1 W4A4), QAT (W4A4 ft1, W8A8 ft2), report."""
    from .demo import run_demo, summary_lines

    res = run_demo(store, epochs=epochs, train_limit=train_limit, eval_limit=eval_limit, progress=_progress(progress),
                   num_workers=workers, log=typer.echo, seed=seed, retrain=retrain)
    _echo("")
    for line in summary_lines(res.report, res.qat_reports):
        _echo(line)
    _echo(f"\nreport: {_join(res.out, 'report.md')}   ({res.report['timings_s']['total']:.0f} s in all)")


def _fmt(v, fmt: str) -> str:
    return "–" if v is None else fmt.format(v)  # None: not finite (an SQNR of identical logits is +inf)


def _print_results(rep: dict) -> None:
    if _rank_from_env() > 0:
        return
    for name, r in rep["results"].items():
        extra = "" if name == rep.get("reference") else (
            f"  Δ {_fmt(r.get('delta_top1'), '{:+.2f}')}  agreement {_fmt(r.get('agreement'), '{:.2f}')}%  "
            f"SQNR {_fmt(r.get('sqnr_db'), '{:.1f}')} dB")
        _echo(f"{name:<22} top-1 {r['top1']:.2f}%  top-{r.get('top5_k', 5)} {r['top5']:.2f}%{extra}")
    sub = (rep.get("data") or {}).get("eval_subset")
    if sub:  # the figures are of a sample, as report.md says
        n = (rep.get("data") or {}).get("eval_count")
        scored = f", {n} scored (the others bad, skipped)" if isinstance(n, int) and n != sub["selected"] else ""
        _echo(f"(subset: {sub['selected']} of {sub['of']} images of the split{scored}, {sub['classes_represented']} "
              f"of {sub['num_classes']} classes, seed {sub['seed']}: estimates, not the full split)")
    if rep.get("skipped"):
        _echo(f"skipped {len(rep['skipped'])} bad samples (listed in report.json)")
    note = (rep.get("data") or {}).get("reference_note")
    if note:
        _echo(f"({note})")
    for w in rep.get("warnings") or []:  # logged when found, repeated under the results
        _echo(f"warning: {w}", err=True)


class _WarningLine(logging.Handler):
    """quantcore's logged warnings as one ``warning: ...`` line each on (the current) stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        _echo(f"{record.levelname.lower()}: {record.getMessage()}", err=True)


def _echo(message: object = "", err: bool = False) -> None:
    typer.echo(_printable(str(message)), err=err)


def _printable(text: str) -> str:
    """``text`` with undecodable file-name bytes (os.fsdecode's surrogates, e.g. a Latin-1 name)
    spelled ``\\udce9``: a strict UTF-8 stream would raise on them."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _user_errors() -> tuple[type[BaseException], ...]:
    from .errors import UserError
    from .io import StorageError

    # OS errors about the paths the user gave (an output that is a file, a directory where a file goes)
    return (UserError, StorageError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def main(argv: list[str] | None = None) -> int:
    # Under torchrun every rank runs this; rank 0 prints the results and the warnings (the others
    # would print the same lines again), every rank its errors.
    quiet = _rank_from_env() > 0
    logger, handler = logging.getLogger("quantcore"), _WarningLine(logging.ERROR if quiet else logging.WARNING)
    logger.addHandler(handler)
    saved = sys.stdout
    try:
        if quiet:
            sys.stdout = open(os.devnull, "w")
        return _main(argv)
    finally:
        if quiet:
            sys.stdout.close()
            sys.stdout = saved
        logger.removeHandler(handler)


def _rank_from_env() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _repeated_options(argv: list[str]) -> None:
    """A single-valued option given twice (``--device cuda ... --device cpu``, a launcher's flag plus
    the same flag in extra arguments) is refused: click keeps the last one silently."""
    from .errors import UserError

    group = typer.main.get_command(app)
    cmd = getattr(group, "commands", {}).get(argv[0]) if argv else None
    if cmd is None:
        return
    args = argv[1:]
    if "--" in args:
        args = args[:args.index("--")]
    for p in cmd.params:
        names = [o for o in (*getattr(p, "opts", ()), *getattr(p, "secondary_opts", ())) if o.startswith("-")]
        if not names or getattr(p, "multiple", False) or p.param_type_name != "option":
            continue
        seen: list[str] = []
        flag = getattr(p, "is_flag", False)
        for i, a in enumerate(args):
            for o in names:
                if a == o or (o.startswith("--") and a.startswith(o + "=")):
                    seen.append(a if flag else a.partition("=")[2] if "=" in a else
                                (args[i + 1] if i + 1 < len(args) else ""))
                elif not flag and not o.startswith("--") and a.startswith(o) and not a.startswith("--"):
                    seen.append(a[len(o):])  # a short option's value attached: -b8
        if len(seen) > 1:
            raise UserError(f"{'/'.join(names)} given {len(seen)} times ({', '.join(seen)}): give it once (the "
                            f"last one would win silently)")


def _main(argv: list[str] | None) -> int:
    from .errors import Preempted

    try:
        from .plugins import load_plugins

        load_plugins()  # $QUANTCORE_PLUGINS and installed entry points: their kinds/calibrators/families
        _repeated_options(list(sys.argv[1:] if argv is None else argv))
        app(args=argv, standalone_mode=False)
    except _user_errors() as err:
        _echo(f"error: {err}", err=True)
        return 2
    except Preempted as err:  # a checkpoint was written: the launcher's retry resumes from it
        _echo(f"preempted: {err}", err=True)
        return err.exit_code
    except (typer.Abort, KeyboardInterrupt):
        _echo("aborted", err=True)
        return 130
    except Exception as err:
        # Usage errors (typer vendors click, so match by behaviour, not class) carry their own exit code.
        if callable(getattr(err, "show", None)) and isinstance(getattr(err, "exit_code", None), int):
            err.show()
            return err.exit_code
        if _peer_left(err):
            # another rank stopped first (a bad image in its shard, a user error): its one-line error is
            # the news; this rank's collective failing after it is not (it was a page of gloo traceback)
            first = " ".join(str(err).split())[:240]
            _echo(f"error: rank {_rank_from_env()}: a collective failed, most likely because another rank stopped "
                  f"first (its error is in its log): {type(err).__name__}: {first}", err=True)
            # Leave the launcher time to see the other rank's own exit first: a rank with a user error
            # tears its process group down before it exits 2, and had this rank's exit 1 been seen first,
            # the job would end with status 1 (retried by podFailurePolicy, restarted by torchrun) and
            # the agent's SIGTERM would hide the 2.
            time.sleep(_PEER_GRACE_S)
            return 1
        raise
    return 0


_PEER_GRACE_S = 5.0


def _peer_left(err: BaseException) -> bool:
    """Whether ``err`` is a collective failing because another rank of this process group exited."""
    try:  # the group may be torn down by the time the error reaches here: the launcher's variable
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        world = 1
    if not isinstance(err, RuntimeError) or world < 2:
        return False
    text = str(err)
    return any(s in text for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe"))


if __name__ == "__main__":
    sys.exit(main())
