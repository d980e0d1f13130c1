"""The jobs users run, as plain functions: calibrate, evaluate, ptq (calibrate + evaluate + report),
train. The CLI, the demo and the cluster launchers all call these; none of them knows about clusters.

Artifacts under ``out`` (local path or s3:// prefix), written atomically:
    report.json, report.md, per_class.png        combined report (FP32 + every variant)
    <variant>/model.qc.pt                        calibrated checkpoint (quantcore.load)
    <variant>/encodings.json, <variant>/ranges.png, <variant>/report.json

Data parallel (torchrun/TorchX ``ddp``, Ray Train, ``torch.multiprocessing``): :func:`ptq` and
:func:`evaluate_checkpoint` join the launcher's process group (:func:`quantcore.distributed.setup`;
each rank on its own GPU with ``--device cuda``). Each rank calibrates on its contiguous shard of the
calibration images (statistics merged exactly by :func:`quantcore.api.calibrate`) and evaluates its
shard of the evaluation images (counts all-reduced by :func:`quantcore.evaluate.evaluate_models`),
so K ranks produce the ranges and figures of one process. Only rank 0 writes artifacts and shows
progress; every rank returns rank 0's report.

Many variants: each is prepared on a transient copy of the FP32 model and then holds the FP32
model's tensors wherever it did not change them (:class:`quantcore.evaluate.WeightSharing`), so N
variants on a device cost one set of weights plus what each changes; the report's
``evaluation_cost`` says what the data path and each variant's forward cost per image and what the
models hold in memory.
"""
from __future__ import annotations

import copy
import gc
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from . import api, distributed
from .config import Recipe
from .data import (class_names, describe_transform, eval_transform, first_batches, label_notes, limit_subset,
                   make_loader, model_label_names, open_dataset, per_class_subset, unused_files, unused_files_warning)
from .data.errors import DataError
from .errors import UserError, naming_recipe
from .evaluate import (EvalCost, ModelScore, WeightSharing, evaluate_models, model_memory,
                       peak_memory, quant_toggle)
from .io import StorageError, storage
from .placement import unwrap
from .recipe import RecipeError
from .report import build_report, per_class_plot, ranges_plot, report_markdown

log = logging.getLogger(__name__)


@dataclass
class DataSpec:
    """Where images come from: ``uri`` + ``split`` (+ layout, bad-sample policy, local cache)."""

    uri: str
    split: str
    layout: str = "auto"
    skip_bad: bool = False
    cache_dir: str | None = None
    limit: int | None = None  # evaluate on a class-stratified seeded sample of N images (data.limit_subset)
    # False: the evaluation data was not given and ``uri`` is the calibration data's (errors then say so)
    given: bool = field(default=True, compare=False)


@dataclass
class RunOptions:
    batch_size: int = 64
    num_workers: int = 0
    device: str = "auto"
    progress: bool = True
    checkpoint: str | None = None  # FP32 weights overriding recipe.model.checkpoint
    # Progress sink: ``factory(total, desc)`` returns a context manager with ``update(n)``
    # (a launcher routes progress to its dashboard this way); None = tqdm bars if ``progress``.
    progress_factory: Callable[[int | None, str], Any] | None = None


@dataclass
class VariantResult:
    name: str
    recipe: Recipe
    model: nn.Module
    calibration: dict[str, Any] = field(default_factory=dict)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as err:
        raise UserError(f"--device {device!r}: not a torch device ({err}); use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device!r}: CUDA is not available on this machine; use --device cpu (or auto)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"--device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


class _NoBar:
    def __enter__(self) -> "_NoBar":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def update(self, n: int = 1) -> None:
        return None


def _bar(total: int | None, desc: str, opts: "RunOptions"):
    """Progress for ``total`` images of this rank; only rank 0 shows any (bar or ``progress_factory``)."""
    if distributed.rank() != 0:
        return _NoBar()
    if opts.progress_factory is not None:
        return opts.progress_factory(total, desc)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not opts.progress, leave=False, dynamic_ncols=True)


def _rank_device(device: str) -> torch.device:
    """This rank's device: under an active process group ``cuda``/``auto`` is ``cuda:LOCAL_RANK``
    (:func:`quantcore.distributed.setup`), otherwise :func:`resolve_device`."""
    if distributed.active():
        return distributed.setup(device).device
    return resolve_device(device)


def _loader(ds, batch_size: int, num_workers: int, indices, device: torch.device, batched_decode: bool | None = None):
    """The evaluation/calibration loader: on a GPU, workers only read bytes and each batch is decoded
    (nvJPEG) and transformed on the device (:func:`quantcore.data.decode.device_loader`); elsewhere the
    workers decode and transform (:func:`make_loader`). ``batched_decode`` forces the choice (tests)."""
    if batched_decode if batched_decode is not None else device.type == "cuda":
        from .data.decode import device_loader

        return device_loader(ds, batch_size, device=device, num_workers=num_workers, indices=indices)
    return make_loader(ds, batch_size, num_workers, indices=indices)


def _my_shard(indices: Sequence[int] | None, n: int, batch_size: int) -> list[int] | None:
    """This rank's whole batches of ``indices`` (``None`` = all ``n`` samples) under an active process
    group (:func:`quantcore.distributed.shard_batches`: the single process's batches, so its exact
    figures); unchanged without one."""
    if not distributed.active():
        return None if indices is None else list(indices)
    return distributed.shard_batches(n if indices is None else indices, batch_size)


def _gather_skipped(records: list[dict]) -> list[dict]:
    """Skipped-sample records of every rank, in rank order, without duplicates."""
    return _dedupe([r for part in distributed.all_gather_object(list(records)) for r in part])


def _on_main(rep: dict[str, Any], write: Callable[[], None]) -> dict[str, Any]:
    """Rank 0 runs ``write`` (the artifacts); every rank returns rank 0's ``rep``. A failure on rank 0
    is raised on every rank (so no rank waits for it), as a user error where it was one."""
    if not distributed.active():
        write()
        return rep
    err: tuple[bool, str] | None = None
    if distributed.rank() == 0:
        try:
            write()
        except BaseException as e:  # re-raised below after the other ranks learn of it
            err = (isinstance(e, (UserError, StorageError, FileNotFoundError, PermissionError)),
                   f"{type(e).__name__}: {e}")
            failure = e
    shared = distributed.broadcast_object((rep, err) if distributed.rank() == 0 else None)
    if distributed.rank() == 0:
        if err is not None:
            raise failure
        return rep
    rep, err = shared
    if err is not None:
        raise (UserError if err[0] else RuntimeError)(f"rank 0 failed to write the results: {err[1]}")
    return rep


def _with_checkpoint(recipe: Recipe, checkpoint: str | None) -> Recipe:
    if not checkpoint:
        return recipe
    if recipe.model is None:
        raise RecipeError(f"recipe {recipe.name!r}: model.name is missing (no model: section), so there is no "
                          f"model to load the checkpoint {checkpoint} into")
    # recorded in the reports and the stored recipe, where a relative path would be read against the
    # recipe's folder, not the working directory it was given in
    checkpoint = storage.absolute(checkpoint)
    # it replaces every source of weights the recipe names (pretrained_file would not be read either)
    model = recipe.model.model_copy(update={"checkpoint": checkpoint, "pretrained": False, "pretrained_file": None})
    return recipe.model_copy(update={"model": model})


def _calibration_indices(ds, recipe: Recipe) -> list[int]:
    c = recipe.calibration
    if c.images_per_class:
        from .data import DataError

        try:
            return per_class_subset(ds, c.images_per_class, seed=c.seed)
        except DataError as err:  # name the recipe field the user set
            raise DataError(f"recipe {recipe.name!r} calibration.images_per_class: {err}",
                            file=getattr(err, "file", None)) from None
    return first_batches(ds, c.num_batches or 1, c.batch_size, seed=c.seed)


def calibrate_variants(recipes: Sequence[Recipe], data: DataSpec, opts: RunOptions,
                       fp32: nn.Module | None = None, eval_classes: tuple[DataSpec, list[str]] | None = None
                       ) -> tuple[nn.Module, list[VariantResult], list[dict]]:
    """Build the FP32 model once, then prepare + calibrate one variant per recipe.

    Each variant is prepared on a ``copy.deepcopy`` of the FP32 model, then shares every tensor it
    left bit-identical with the FP32 model (or an earlier variant): see
    :class:`~quantcore.evaluate.WeightSharing` (change a variant's weights in place only after
    copying it). Under an active process group each rank calibrates on its shard of the calibration images and
    every rank ends with the same (exactly merged) ranges; the skipped list covers all ranks."""
    # --checkpoint first: recipes that differ only in the weights it replaces calibrate one model
    recipes = [_with_checkpoint(r, opts.checkpoint) for r in recipes]
    _check_recipes(recipes)
    dev = _rank_device(opts.device)
    if fp32 is None:
        if recipes[0].model is None:
            raise RecipeError(f"recipe {recipes[0].name!r}: model.name is missing (no model: section); the "
                              f"pipeline builds the FP32 model from it")
        fp32 = api.build_model(recipes[0], seed=RANDOM_INIT_SEED)
    weights = getattr(fp32, "quantcore_weights", "given by the caller")
    if weights is None and distributed.rank() == 0:
        log.warning(random_weights_warning(recipes[0], [r.name for r in recipes[1:]]))
    fp32 = fp32.to(dev).eval()
    if weights is None:  # random initialization differs from rank to rank: all take rank 0's
        distributed.broadcast_module(fp32)
    ds = open_dataset(data.uri, data.split, eval_transform(fp32), layout=data.layout, skip_bad=data.skip_bad,
                      cache_dir=data.cache_dir)
    # made-up names (a map's label numbers) are not compared: there is nothing to say the classes differ
    class_note = _check_classes(data, class_names(ds), *eval_classes) if eval_classes and class_names(ds) else None
    skipped: list[dict] = []
    variants = []
    sharing = WeightSharing(fp32)
    unused = unused_files_warning(ds)
    for r in recipes:
        every = _calibration_indices(ds, r)
        notes = []
        asked = (r.calibration.num_batches or 1) * r.calibration.batch_size
        idx = _my_shard(every, len(ds), r.calibration.batch_size)
        loader = _loader(ds, r.calibration.batch_size, opts.num_workers, idx, dev)
        model = api.prepare(copy.deepcopy(fp32), r)
        sharing.share(model)  # before calibrating: the transient copy is freed here
        gc.collect()  # ... also what reference cycles of the copy hold (freed by the cyclic collector only)
        with _bar(len(idx), f"calibrate {r.name}", opts) as bar:
            try:
                res = api.calibrate(model, loader, progress=bar.update)  # + the recipe's reparam/reconstruction
            except DataError:  # about the images, whichever recipe read them
                raise
            except UserError as err:  # several recipes run at once: say whose field it is
                raise naming_recipe(err, r.name) from None
        # gathered per recipe: the list is in recipe order (then image order), whatever the rank count
        # (the dataset's log holds every recipe's skips, once per name: this recipe's are those of its
        # images, and those skipped while the dataset was listed)
        mine_here = set(idx)
        pos = {i: k for k, i in enumerate(every)}
        mine = _gather_skipped(_dedupe([s for s in loader.skipped.as_list()
                                        if s.get("index") in mine_here or s.get("index") is None]))
        mine.sort(key=lambda s: pos.get(s.get("index"), -1))  # image order, whatever the rank count
        skipped.extend(mine)
        if res.images == 0 and every:
            raise DataError(f"recipe {r.name!r}: none of the {len(every)} calibration images of split "
                            f"{data.split!r} of {data.uri} could be read ({len(mine)} skipped as unreadable, e.g. "
                            f"{mine[0]['name'] if mine else '?'}): its activation quantizers would stay "
                            "uncalibrated (pass-through) under a W/A name; fix the images or calibrate on others")
        if not r.calibration.images_per_class and len(every) < asked:  # counted after the pass: skips are known
            lost = len(every) - res.images
            notes.append(f"recipe {r.name!r}: calibration asks for {asked} images (calibration.num_batches x "
                         f"batch_size), split {data.split!r} of {data.uri} has {len(ds)}: calibrated on {res.images}"
                         + (f" ({lost} unreadable, skipped)" if lost > 0 else ""))
            if distributed.rank() == 0:
                log.warning(notes[-1])
        used = api.calibrators_used(model)  # what ran, after quant sections and overrides
        cal = {"method": api.method_summary(used), "weights_method": api.method_summary(used, "weight"),
               "calibrators": used, "uri": storage.absolute(data.uri), "split": data.split, "images": res.images,
               "batches": res.batches, "images_per_class": r.calibration.images_per_class,
               "seed": r.calibration.seed, "collect_s": res.collect_s, "finalize_s": res.finalize_s,
               "uncalibrated": res.uncalibrated, "fp32_weights": weights, "classes": class_names(ds),
               **res.transforms}
        notes += [f"recipe {r.name!r}: {w}" for w in res.warnings]  # api.finalize logged them
        if class_note:
            notes.append(class_note)
        if unused:  # open_dataset logged it
            notes.append(f"calibration data: {unused}")
            cal["unused_files"] = unused_files(ds)
        if notes:
            cal["warnings"] = notes
        if mine:
            cal["skipped"] = mine  # this recipe's own (its per-variant report lists these)
        variants.append(VariantResult(r.name, r, model, cal))
    return fp32, variants, _dedupe(skipped)


def _check_classes(calib: DataSpec, calib_classes: list[str], evald: DataSpec, eval_classes: list[str]) -> str | None:
    """Calibration reads no labels, but two splits of one dataset whose class lists differ mean the
    evaluation labels are shifted (a renamed folder, NFD vs NFC names): refused then. Two different
    datasets may legitimately differ: a warning (returned for the report, logged on rank 0)."""
    from .data import class_mismatch

    diff = class_mismatch(calib_classes, eval_classes)
    if diff is None:
        return None
    msg = (f"the calibration data ({calib.uri} split {calib.split!r}) and the evaluation data ({evald.uri} split "
           f"{evald.split!r}) list different classes: {diff}")
    if storage.same_location(calib.uri, evald.uri):
        raise DataError(msg + "; the evaluation labels would be shifted against the model's classes. Give both "
                        "splits the same class folders", file=evald.uri)
    if distributed.rank() == 0:
        log.warning("%s; if the model's classes are the calibration data's, its top-1 is scored against other "
                    "labels", msg)
    return msg


def _check_recipes(recipes: Sequence[Recipe]) -> None:
    """The recipes of one run: at least one, unique names, none named 'fp32', one model."""
    if not recipes:
        raise RecipeError("at least one recipe is needed (--recipe/-r)")
    names = [r.name for r in recipes]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise RecipeError(f"name: recipe names must be unique within one run; {', '.join(map(repr, dupes))} "
                          f"appears more than once (a recipe file without name: is named after the file: give "
                          f"each a name:)")
    if "fp32" in names:
        raise RecipeError("name: 'fp32' is reserved for the FP32 reference in reports; rename that recipe")
    first = recipes[0]
    ref = first.model.model_dump(mode="json") if first.model is not None else None
    for r in recipes[1:]:
        other = r.model.model_dump(mode="json") if r.model is not None else None
        if other != ref:
            a, b = ref or {}, other or {}
            fields = ", ".join(f"model.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)) or "model"
            raise RecipeError(f"recipes {first.name!r} and {r.name!r} describe different models ({fields} "
                              f"differ); one run calibrates one FP32 model: run them separately")


# Without weights, a model is initialized under this torch seed: two runs of one recipe calibrate the same
# model, so their ranges and figures compare (the report's seeds are then the whole story).
RANDOM_INIT_SEED = 0


def random_weights_warning(recipe: Recipe, others: Sequence[str] = (), seed: int = RANDOM_INIT_SEED) -> str:
    """The warning for an FP32 model with random weights; ``others``: further recipes of the run (they
    quantize the same model); ``seed``: the torch seed it was initialized with."""
    name = recipe.model.name if recipe.model is not None else "?"
    names = ", ".join(repr(n) for n in [recipe.name, *others])
    return (f"the FP32 model {name} (recipe{'s' if others else ''} {names}) has RANDOM WEIGHTS: the recipe sets none of "
            f"model.checkpoint, model.pretrained, model.pretrained_file, and no --checkpoint was given. Its "
            f"accuracy, and every quantized variant's, will be at chance level (initialized with torch seed "
            f"{seed}: the same model on every run).")


def _dedupe(records: list[dict]) -> list[dict]:
    seen, out = set(), []
    for r in records:
        key = (r.get("name"), r.get("reason"))
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def evaluate_variants(fp32: nn.Module, variants: Sequence[VariantResult], data: DataSpec,
                      opts: RunOptions) -> tuple[dict[str, ModelScore], dict[str, Any], list[dict]]:
    """FP32 and every variant in one pass. Under an active process group each rank evaluates its
    shard of the (limited) evaluation set and every rank gets the merged scores and skipped list."""
    dev = _rank_device(opts.device)
    ds = open_dataset(data.uri, data.split, eval_transform(fp32), layout=data.layout, skip_bad=data.skip_bad,
                      cache_dir=data.cache_dir, label_names=model_label_names(unwrap(fp32)))
    indices, subset, limit_note = _limited(ds, data)
    indices = _my_shard(indices, len(ds), opts.batch_size)
    loader = _loader(ds, opts.batch_size, opts.num_workers, indices, dev)
    models: dict[str, Any] = {"fp32": fp32.to(dev)}
    for v in variants:
        if v.name == "fp32":
            raise RecipeError("name: 'fp32' is reserved for the FP32 reference in reports; rename that recipe")
        models[v.name] = v.model.to(dev)
    n = len(indices) if indices is not None else len(ds)
    cost = EvalCost(list(models), dev)
    with _bar(n, "evaluate", opts) as bar:
        scores = evaluate_models(models, loader, ds.num_classes, reference="fp32", device=dev, progress=bar.update,
                                 cost=cost)
    info = {"eval_uri": storage.absolute(data.uri), "eval_split": data.split, "eval_count": scores["fp32"].count, "eval_subset": subset,
            "num_classes": ds.num_classes, "class_names": list(getattr(ds, "classes", None) or []),
            "evaluation_cost": _cost_info(cost, models, dev)}
    unused = unused_files(ds)
    if unused:
        info["unused_files"] = unused
    notes = _data_warnings(ds) + ([limit_note] if limit_note else [])
    if notes:
        info["warnings"] = notes
    return scores, info, _gather_skipped(_dedupe(list(loader.skipped.as_list())))


def _data_warnings(ds: Any, what: str = "evaluation data") -> list[str]:
    """What :func:`open_dataset` warned about ``ds`` (logged there: how its labels map to the model's
    classes, files that are not samples), for the report."""
    notes = [f"{what}: {n}" for n in label_notes(ds)]
    if unused_files(ds):
        notes.append(f"{what}: {unused_files_warning(ds)}")
    return notes


def _cost_info(cost: EvalCost, models: dict[str, nn.Module], dev: torch.device) -> dict[str, Any]:
    """``time`` (this pass, all ranks) and ``memory`` (this rank's models; the peak of rank 0's
    process or device is what the report shows) of an evaluation."""
    return {"time": cost.as_dict(reference="fp32"), "memory": {**model_memory(models), **peak_memory(dev)}}


def _write_json(uri: str, obj: Any) -> None:
    # JSON has no inf/nan: reports and encodings write them as null, and a regression fails here
    # instead of producing a file strict JSON consumers reject.
    storage.write_bytes(uri, (json.dumps(obj, indent=2, allow_nan=False) + "\n").encode())


def variant_artifact_uris(name: str, out: str) -> dict[str, str]:
    """Where :func:`write_variant_artifacts` puts a variant's files."""
    base = storage.join(out, name)
    return {"checkpoint": storage.join(base, "model.qc.pt"), "encodings": storage.join(base, "encodings.json"),
            "ranges_plot": storage.join(base, "ranges.png")}


def earlier_variants(out: str, names: Sequence[str]) -> list[str] | None:
    """The variants an earlier ptq run wrote into ``out`` that this run (recipes ``names``) does not
    write, and whose checkpoints are still there; None when there are none.

    This run's report.json replaces that run's and lists only its own variants; their folders stay as
    they are (never deleted: they may be all that is left of that run), so the report must not pass
    them over in silence: it names them in a warning and under ``earlier_variants``, which the next run
    reads too. An unreadable earlier report gives no warning: the run replaces it either way."""
    try:
        old = json.loads(storage.read_bytes(storage.join(out, "report.json")))
    except (OSError, ValueError, StorageError):  # none (the usual case), or not a report of ours
        return None
    if not isinstance(old, dict) or not isinstance(old.get("variants"), dict):
        return None
    # with those an earlier run's report itself warned about: they stay named run after run
    carried = old.get("earlier_variants")
    listed = list(old["variants"]) + (carried if isinstance(carried, list) else [])

    def there(n: str) -> bool:
        try:
            return storage.exists(variant_artifact_uris(n, out)["checkpoint"])
        except (OSError, ValueError, StorageError):  # advisory: a name we cannot look up is not there
            return False

    left = list(dict.fromkeys(n for n in listed if isinstance(n, str) and n not in names and there(n)))
    return left or None


def earlier_variants_warning(out: str, left: Sequence[str]) -> str:
    """The report's and log's line for :func:`earlier_variants`' names."""
    return (f"--out {out} holds an earlier run's results for {', '.join(map(repr, left))}: this run's report "
            f"replaces that run's and lists only its own variants; their folders ({', '.join(left)}) are left "
            f"as they are (use a new --out per run to keep reports and checkpoints together)")


def write_variant_artifacts(v: VariantResult, out: str) -> dict[str, str]:
    uris = variant_artifact_uris(v.name, out)
    ckpt, enc_uri, plot = uris["checkpoint"], uris["encodings"], uris["ranges_plot"]
    api.save(v.model, ckpt, extra={"calibration": v.calibration})
    enc = api.encodings(v.model, extra={"calibration": v.calibration})
    _write_json(enc_uri, enc)
    storage.write_bytes(plot, ranges_plot(enc, f"Activation ranges: {v.name}"))
    return uris


def ptq(recipes: Sequence[Recipe], calib: DataSpec, evald: DataSpec | None, out: str,
        opts: RunOptions | None = None, fp32: nn.Module | None = None) -> dict[str, Any]:
    """Calibrate every recipe, evaluate FP32 and all variants in one pass, write artifacts + report.

    Run by K ranks (torchrun, Ray Train), the ranks split the calibration and evaluation images,
    rank 0 alone writes, and every rank returns the same report, whose figures (ranges, top-1/top-5,
    per-class, agreement; SQNR up to float64 summation order) are those of one process;
    ``report["data"]["world_size"]`` says how many ranks ran."""
    opts = opts or RunOptions()
    ctx = distributed.setup(opts.device)
    try:
        return _ptq(recipes, calib, evald, out, opts, fp32)
    finally:
        distributed.teardown(ctx)


def check_cache_dir(*specs: "DataSpec | None") -> None:
    """``--cache-dir`` caches zip shards read from object storage: refused when every dataset it was
    given for is local, where it could not apply (a remote folder layout is warned about on opening)."""
    given = [s for s in specs if s is not None and s.cache_dir]
    if given and not any(storage.is_s3(s.uri) for s in given):
        uris = ", ".join(dict.fromkeys(s.uri for s in given))
        raise UserError(f"--cache-dir {given[0].cache_dir}: caches zip shards read from s3://, but the data "
                        f"({uris}) is local and is read in place; drop --cache-dir")


def _limited(ds: Any, data: "DataSpec") -> tuple:
    """``(indices, subset, note)``: :func:`limit_subset` of ``--limit``, and when the split holds fewer
    images than asked the note saying all of them are used (logged on rank 0 and kept for the report,
    whose reader could otherwise take the count for the asked number), else None."""
    note = None
    if data.limit and int(data.limit) > len(ds):
        note = (f"--limit {int(data.limit)}: split {data.split!r} of {data.uri} has {len(ds)} images; all of "
                f"them are evaluated")
        if distributed.rank() == 0:
            log.warning("%s", note)
    return (*limit_subset(ds, data.limit), note)


def check_out(out: str, flag: str = "--out") -> None:
    """``out`` (the option ``flag``) must be a writable directory or s3:// prefix: refused before any work
    (a file, a missing bucket, no permission), by writing and deleting one empty probe object there (rank 0)."""
    if not storage.is_s3(out):
        path = storage.local_path(out)
        if os.path.isfile(path):
            raise UserError(f"{flag} {out}: is a file; give a directory (local or s3:// prefix)")
    if distributed.rank() != 0:
        return
    probe = storage.join(out, f".quantcore-write-check-{os.getpid()}")
    # the output folder the probe makes is removed with it: a run refused later leaves no empty folder.
    # Only that folder, never a parent the probe made too: another run may be creating its own folder
    # beside it in the same new parent.
    leaf = None if storage.is_s3(out) else os.path.abspath(storage.local_path(out))
    made = leaf is not None and not os.path.exists(leaf)
    try:
        storage.write_bytes(probe, b"")
    except (OSError, ValueError) as e:  # StorageError is an OSError
        _remove_empty(leaf if made else None)
        raise UserError(f"{flag} {out}: cannot write there ({type(e).__name__}: {e}); give a writable directory "
                        "or s3:// prefix") from None
    try:
        storage.delete(probe)
    except (OSError, ValueError) as e:  # writing is what the run needs; a role without delete rights may
        log.warning("%s %s: could not delete the write probe %s (%s); it is empty and can be removed", flag, out,
                    probe, e)
        return
    _remove_empty(leaf if made else None)


def _remove_empty(path: str | None) -> None:
    if path:
        try:
            os.rmdir(path)  # only if empty: anything written there meanwhile stays
        except OSError:
            pass


def _ptq(recipes: Sequence[Recipe], calib: DataSpec, evald: DataSpec | None, out: str, opts: RunOptions,
         fp32: nn.Module | None) -> dict[str, Any]:
    check_cache_dir(calib, evald)
    check_out(out)
    earlier = earlier_variants(out, [r.name for r in recipes]) if distributed.rank() == 0 else None
    if earlier:
        log.warning("%s", earlier_variants_warning(out, earlier))
    if evald is not None and evald.limit is not None and int(evald.limit) < 0:
        raise UserError(f"--limit: must be >= 0 (0 = the whole split), got {evald.limit}")
    eval_classes = None
    if evald is not None and evald != calib:  # a missing split is found before calibration, not after
        try:
            eval_classes = class_names(open_dataset(evald.uri, evald.split, None, layout=evald.layout,
                                                    skip_bad=evald.skip_bad, cache_dir=evald.cache_dir))
        except DataError as e:
            # without --eval-data the evaluation split is read from the calibration data: say so (only then:
            # an --eval-data naming the calibration folder was given, nothing fell back)
            what = ("evaluation data (--eval-data/--eval-split " if evald.given else
                    "the calibration data, read for evaluation too (--calib-data, --eval-split ")
            raise DataError(f"{what}{evald.split!r}): {e}", file=e.file, shard=e.shard, line=e.line) from None
    t0 = time.perf_counter()
    fp32, variants, skipped = calibrate_variants(recipes, calib, opts, fp32,
                                                 eval_classes=(evald, eval_classes) if eval_classes else None)
    t_cal = time.perf_counter()
    artifacts = {v.name: variant_artifact_uris(v.name, out) for v in variants}
    # checkpoints are written before evaluation starts (they survive a failing evaluation)
    _on_main(artifacts, lambda: [write_variant_artifacts(v, out) for v in variants])
    t_write = time.perf_counter()
    scores, data_info, eval_skipped = ({}, {}, [])
    if evald is not None:
        try:
            scores, data_info, eval_skipped = evaluate_variants(fp32, variants, evald, opts)
        except Exception:
            # the run stops without a report: say that the calibration's results are there to keep
            if distributed.rank() == 0:
                log.warning("evaluation failed (the error follows); the calibrated checkpoints are written and "
                            "kept, without a report: %s; once the cause is fixed, evaluate them with `quantcore "
                            "evaluate --checkpoint URI --data ...` (no re-calibration)",
                            ", ".join(a["checkpoint"] for a in artifacts.values()))
            raise
    t_eval = time.perf_counter()
    ds_classes = data_info.pop("class_names", None) or None
    eval_cost = data_info.pop("evaluation_cost", None)
    data_info.update({"calib_uri": storage.absolute(calib.uri), "calib_split": calib.split, "world_size": distributed.world_size()})
    timings = {"calibrate": t_cal - t0, "write_artifacts": t_write - t_cal}
    if evald is not None:  # checkpoints and plots are written first: their time is not the evaluation's
        timings["evaluate"] = t_eval - t_write
    cal = {v.name: v.calibration for v in variants}
    first = variants[0]
    general = ([random_weights_warning(first.recipe, [v.recipe.name for v in variants[1:]])]
               if first.calibration.get("fp32_weights", "") is None else [])
    general += data_info.pop("warnings", []) + ([earlier_variants_warning(out, earlier)] if earlier else [])
    own = {v.name: list(v.calibration.get("warnings", ())) for v in variants}
    # the calibration data's note once, not once per variant
    warnings = list(dict.fromkeys(general[:1] + [w for v in variants for w in own[v.name]] + general[1:]))
    rep = build_report(model=_model_name(first.recipe, fp32), recipe=None, scores=scores,
                       reference="fp32" if scores else None,
                       data=data_info, calibration=first.calibration if len(variants) == 1 else
                       _calibration_summary(variants, calib),
                       timings=timings, skipped=_dedupe(skipped + eval_skipped), class_names=ds_classes,
                       warnings=warnings, extra={"variants": {v.name: {"recipe": v.recipe.model_dump(mode="json"),
                                                    "calibration": cal[v.name], "artifacts": artifacts[v.name],
                                                    "placement": v.model.quantcore_placement.as_dict()}
                                           for v in variants},
                              "transform": describe_transform(fp32), "device": str(_rank_device(opts.device)),
                              **({"evaluation_cost": eval_cost} if eval_cost else {}),
                              **({"earlier_variants": earlier} if earlier else {})})
    if scores:
        rep["plots"] = ["per_class.png"]

    def write() -> None:
        if scores:
            storage.write_bytes(storage.join(out, "per_class.png"), per_class_plot(rep))
        _write_json(storage.join(out, "report.json"), rep)
        storage.write_bytes(storage.join(out, "report.md"), report_markdown(rep).encode("utf-8", "backslashreplace"))
        for v in variants:  # each checkpoint gets the report of its own variant next to it, and nothing else
            sub = dict(rep, results={k: r for k, r in rep["results"].items() if k in ("fp32", v.name)},
                       variants={v.name: rep["variants"][v.name]}, plots=[], calibration=cal[v.name],
                       warnings=list(dict.fromkeys(general[:1] + own[v.name] + general[1:])),
                       skipped=_dedupe(list(v.calibration.get("skipped", [])) + list(eval_skipped)))
            sub.pop("evaluation_cost", None)  # the run's one pass over every variant: in the run's report
            _write_json(storage.join(out, v.name, "report.json"), sub)

    return _on_main(rep, write)


def _calibration_summary(variants: Sequence[VariantResult], calib: DataSpec) -> dict[str, Any]:
    """The run report's calibration line for several variants: one method / image count when all share
    it, else each variant's (``per_variant``); each variant's full record is under ``variants``."""
    methods = {v.name: v.calibration["method"] for v in variants}
    images = {v.name: v.calibration["images"] for v in variants}
    out: dict[str, Any] = {"method": ", ".join(sorted(set(methods.values()))), "uri": storage.absolute(calib.uri)}
    if len(set(images.values())) == 1:
        out["images"] = next(iter(images.values()))
    else:
        out["per_variant"] = {n: {"method": methods[n], "images": images[n]} for n in images}
    return out


def evaluate_checkpoint(checkpoint: str, evald: DataSpec, out: str | None, opts: RunOptions | None = None) -> dict:
    """Evaluate a calibrated checkpoint against its own float path (quantization off).

    Run by K ranks, each evaluates its shard of the images; rank 0 writes the report and every rank
    returns it, with the single-process figures (see :func:`ptq`)."""
    opts = opts or RunOptions()
    ctx = distributed.setup(opts.device)
    try:
        return _evaluate_checkpoint(checkpoint, evald, out, opts)
    finally:
        distributed.teardown(ctx)


def _reference_note(model: nn.Module) -> str:
    note = "fp32 = the checkpoint with quantization off"
    if (getattr(model, "quantcore_meta", None) or {}).get("extra", {}).get("qat"):
        note += (": for this QAT checkpoint its trained weights, not the original FP32 model (the QAT run's "
                 "report compares against that one)")
    elif getattr(getattr(model, "quantcore_recipe", None), "reconstruction", None) is not None:
        note += (": for this checkpoint its weights as reconstruction (AdaRound/BRECQ) rounded them onto their "
                 "grid, not the original FP32 model (the ptq run's report compares against that one)")
    return note


def _evaluate_checkpoint(checkpoint: str, evald: DataSpec, out: str | None, opts: RunOptions) -> dict:
    check_cache_dir(evald)
    if out is not None:
        check_out(out)
    dev = _rank_device(opts.device)
    model = api.load(checkpoint).to(dev)
    ds = open_dataset(evald.uri, evald.split, eval_transform(model), layout=evald.layout,
                      skip_bad=evald.skip_bad, cache_dir=evald.cache_dir, label_names=model_label_names(unwrap(model)))
    indices, subset, limit_note = _limited(ds, evald)
    indices = _my_shard(indices, len(ds), opts.batch_size)
    loader = _loader(ds, opts.batch_size, opts.num_workers, indices, dev)
    name = model.quantcore_recipe.name
    t0 = time.perf_counter()
    cost = EvalCost(["fp32", name], dev)
    with _bar(len(indices) if indices is not None else len(ds), "evaluate", opts) as bar:
        scores = evaluate_models({"fp32": quant_toggle(model, False), name: quant_toggle(model, True)}, loader,
                                 ds.num_classes, reference="fp32", device=dev, progress=bar.update, cost=cost)
    api.set_quantization(model, True)
    skipped = _gather_skipped(_dedupe(list(loader.skipped.as_list())))
    calibration = model.quantcore_meta.get("extra", {}).get("calibration")
    warnings = []
    if (calibration or {}).get("fp32_weights", "") is None:  # recorded at calibration time
        warnings.append(random_weights_warning(model.quantcore_recipe))
        if distributed.rank() == 0:
            log.warning(warnings[-1])
    warnings += _data_warnings(ds) + ([limit_note] if limit_note else [])
    unused = unused_files(ds)
    rep = build_report(model=_model_name(model.quantcore_recipe, model),
                       recipe=model.quantcore_recipe.model_dump(mode="json"),
                       scores=scores, reference="fp32",
                       data={"eval_uri": storage.absolute(evald.uri), "eval_split": evald.split, "eval_count": scores["fp32"].count,
                             "eval_subset": subset, "world_size": distributed.world_size(),
                             "checkpoint": storage.absolute(checkpoint), "reference_note": _reference_note(model),
                             **({"unused_files": unused} if unused else {})},
                       calibration=calibration, warnings=warnings, class_names=list(ds.classes),
                       timings={"evaluate": time.perf_counter() - t0}, skipped=skipped,
                       extra={"evaluation_cost": _cost_info(cost, {name: model}, dev),
                              "transform": describe_transform(model), "device": str(dev)})
    if out:
        rep["plots"] = ["per_class.png"]

    def write() -> None:
        if out:
            storage.write_bytes(storage.join(out, "per_class.png"), per_class_plot(rep))
            _write_json(storage.join(out, "report.json"), rep)
            storage.write_bytes(storage.join(out, "report.md"), report_markdown(rep).encode("utf-8", "backslashreplace"))

    return _on_main(rep, write)


def _model_name(recipe: Recipe, model: nn.Module) -> str:
    return recipe.model.name if recipe.model is not None else type(model).__name__
