"""A PTQ sweep on a Ray cluster: one Ray task per run, many runs in parallel, resumable.

    python -m jobs.ray_sweep --sweep SWEEP.yaml --out OUT_URI [--address auto] [--gpus-per-task 1]

Usually submitted as a Ray job (``ray job submit -- python -m jobs.ray_sweep ...``, or the
``entrypoint`` of a KubeRay ``RayJob``). The sweep file (local path or s3:// URI; format:
``jobs/sweep.example.yaml``, validated with clear errors naming the field) lists runs. Each run
becomes one task named ``ptq:<name>`` that calls :func:`quantcore.pipeline.ptq` and writes
``<OUT>/<name>/`` (``report.json``, ``report.md``, ``per_class.png``, ``<recipe>/model.qc.pt``,
``<recipe>/encodings.json`` ...). ``--gpus-per-task 0`` makes CPU tasks (``num_gpus=0``, device
cpu); a run that sets ``device: cuda`` then is an error (exit 2), not a task that never starts.

In the Ray dashboard: the tasks by name, their log lines (``(ptq:<name> pid=...)``), progress
bars (``ray.experimental.tqdm_ray``) and the metrics ``quantcore_sweep_images_processed``
(counter, tags sweep/run/stage), ``quantcore_sweep_progress`` (0..1 per run and stage),
``quantcore_sweep_top1`` (per run and variant, fp32 included), ``quantcore_sweep_run_seconds``
and ``quantcore_sweep_runs_finished`` (tag status) for Prometheus/Grafana.

Resuming. A run is *complete* when ``<OUT>/<name>/_SUCCESS.json`` (its completion manifest:
the run's spec fingerprint, its summary record and every artifact with its size) exists and
every artifact it lists exists with that size. The task writes the manifest last, atomically
(one object via :mod:`quantcore.io.storage`), after all artifacts, and deletes an old one
before it starts rewriting a run, so a run killed half-way is never taken as complete. A sweep
started again with the same ``--out`` (a retried RayJob, a resubmitted job) reuses complete
runs without a Ray task and recomputes the others: missing or partial outputs, failed runs,
and runs whose spec changed (fingerprint of the merged run fields; a recipe file edited behind
the same URI is not detected: ``--no-resume`` recomputes everything). ``<OUT>/summary.json`` and
``summary.md`` are rewritten each time a run finishes (``state: running``, unfinished runs
``pending``) and once more at the end (``state: finished``), so a driver or head that dies
loses no finished run and the next attempt picks up from the manifests.

Why manifests in the output and not Ray Tune's resumable experiments: the output prefix is
the only thing a retried RayJob shares with the attempt that died (a new cluster, new head,
empty local disks); a manifest next to the artifacts says exactly which runs are complete,
is checked against the artifacts themselves, is readable by anyone without Ray, and keeps the
sweep a plain task fan-out. Tune's restore keys its state on the experiment directory and
trial ids, needs a second ``Tuner.restore`` code path in the driver, and knows nothing about
whether a trial's artifacts actually reached the bucket.

A failing run is recorded (status ``failed`` with its error) and does not stop the others. At the
end ``<OUT>/summary.json`` and ``<OUT>/summary.md`` say, per run: status, FP32 and quantized
top-1, delta, agreement, SQNR, artifact URIs, duration, error, and whether the run was reused
from an earlier attempt. Exit status: 0 when every run succeeded, 1 when any failed or the
output storage failed (retries exhausted: retrying the job resumes), 2 for a bad sweep file or
arguments (a user error: retrying cannot help).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime as _dt
import hashlib
import json
import math
import os
import re
import sys
import time
import traceback
from typing import Any, Dict, List, Literal, Optional, Tuple, Union

import yaml
from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from jobs._args import parse_once
from jobs._tags import ascii_tag
from quantcore._model import Section
from quantcore.errors import UserError
from quantcore.yaml_input import DuplicateKeyError, load_yaml

# /2: summaries are written while the sweep runs (`state`, status `pending`, `runs_pending`)
# and say which runs were reused from an earlier attempt (`reused`, `runs_reused`).
SUMMARY_SCHEMA = "quantcore.sweep-summary/2"
MANIFEST_SCHEMA = "quantcore.sweep-run/1"
MANIFEST_NAME = "_SUCCESS.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_RESERVED = {"summary.json", "summary.md"}  # the driver's files next to the run folders


class SweepError(UserError):
    """The sweep file or the command line is wrong (exit 2)."""


# ------------------------------------------------------------------------------ sweep file

RecipeRef = Union[str, Dict[str, Any]]


def _recipe_alias(data: Any) -> Any:
    """``recipe: x`` / ``recipe: [x, y]`` -> ``recipes: [...]`` (a new dict; both keys: left to validation)."""
    if isinstance(data, dict) and "recipe" in data and "recipes" not in data:
        data = dict(data)
        one = data.pop("recipe")
        data["recipes"] = one if isinstance(one, list) else [one]
    return data


class _RunFields(Section):
    """Fields a run may set; ``defaults:`` may set the same ones (except ``name``). Types are strict, as
    the CLI's: ``batch_size: true`` or ``limit: "200"`` are mistakes, not 1 and 200."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)

    recipes: Optional[List[RecipeRef]] = Field(
        None, description="Recipes of the run (one model): built-in names, YAML paths, s3:// URIs or "
                          "inline recipe mappings. `recipe:` takes one or a list too.")
    checkpoint: Optional[str] = Field(None, description="FP32 weights overriding the recipes' model weights.")
    calib_data: Optional[str] = Field(None, description="Calibration dataset URI.")
    calib_split: str = Field("train", min_length=1)
    eval_data: Optional[str] = Field(None, description="Evaluation dataset URI (default: calib_data).")
    eval_split: str = Field("val", min_length=1)
    limit: Optional[int] = Field(None, ge=0, description="Evaluate on a seeded, class-stratified sample of N images "
                                                          "(as --limit: 0 or unset, the whole split).")
    batch_size: int = Field(64, gt=0, description="Evaluation batch size.")
    workers: int = Field(0, ge=0, description="DataLoader worker processes per task.")
    layout: Literal["auto", "folder", "zip", "resisc"] = "auto"
    skip_bad: bool = False
    cache_dir: Optional[str] = None
    device: Optional[str] = Field(None, description="torch device; default cuda with GPUs per task, else cpu.")

    @field_validator("device")
    @classmethod
    def _torch_device(cls, v: Optional[str]) -> Optional[str]:
        # a typo ('tpu', 'gpu') would only fail inside the task, after Ray started: exit 1, not 2
        if v is None or v == "auto":
            return v
        import torch

        try:
            torch.device(v)
        except (RuntimeError, ValueError):
            raise ValueError(f"{v!r} is not a torch device: use auto, cpu, cuda or cuda:N") from None
        return v

    @model_validator(mode="before")
    @classmethod
    def _recipe_alias(cls, data: Any) -> Any:
        if isinstance(data, dict) and "recipe" in data and "recipes" in data:
            raise ValueError("set either `recipe` or `recipes`, not both")
        return _recipe_alias(data)

    @field_validator("recipes")
    @classmethod
    def _non_empty(cls, v: Optional[List[RecipeRef]]) -> Optional[List[RecipeRef]]:
        if v is not None and (not v or any(isinstance(r, str) and not r.strip() for r in v)):
            raise ValueError("needs at least one recipe, and no empty names")
        return v


class RunDefaults(_RunFields):
    pass


class RunSpec(_RunFields):
    name: str = Field(..., description="Unique run name: the output folder <OUT>/<name>/ and task ptq:<name>.")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError("must be 1-100 characters of letters, digits, '.', '_' or '-', starting "
                             "with a letter or digit")
        if v.lower() in _RESERVED:
            raise ValueError(f"{v!r} is the sweep's own file in <OUT>/ ({', '.join(sorted(_RESERVED))}): "
                             "name the run otherwise")
        return v

    @model_validator(mode="after")
    def _complete(self) -> "RunSpec":
        missing = [f for f in ("recipes", "calib_data") if getattr(self, f) is None]
        if missing:
            raise ValueError(f"missing {' and '.join(missing)} (set it in the run or in defaults:)")
        return self

    def recipe_labels(self) -> List[str]:
        return [r if isinstance(r, str) else str(r.get("name", "<inline>")) for r in self.recipes or []]


class Sweep(Section):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    version: Literal[1] = 1
    description: Optional[str] = None
    defaults: RunDefaults = Field(default_factory=RunDefaults)
    runs: List[RunSpec] = Field(..., min_length=1)


def _loc(loc: tuple, data: Dict[str, Any]) -> str:
    out = ""
    runs = data.get("runs") if isinstance(data, dict) else None
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
            if i == 1 and loc[0] == "runs" and isinstance(runs, list) and part < len(runs) \
                    and isinstance(runs[part], dict) and isinstance(runs[part].get("name"), str):
                out += f"({runs[part]['name']})"
        else:
            out += ("." if out else "") + str(part)
    return out or "<root>"


def parse_sweep(data: Any, source: str = "sweep") -> Sweep:
    """Validate a sweep mapping: ``defaults:`` are merged into every run (the run's own fields win)."""
    if not isinstance(data, dict):
        raise SweepError(f"{source}: expected a mapping with `runs:`, got {type(data).__name__}")
    merged = dict(data)
    try:
        defaults = RunDefaults.model_validate(data.get("defaults") or {})
    except ValidationError as err:
        raise SweepError(_format(err, source, {"defaults": data.get("defaults")}, prefix=("defaults",))) from None
    base = defaults.model_dump(exclude_unset=True)
    runs = data.get("runs")
    if isinstance(runs, list):
        merged["runs"] = [{**base, **_recipe_alias(r)} if isinstance(r, dict) else r for r in runs]
    merged["defaults"] = base
    try:
        sweep = Sweep.model_validate(merged)
    except ValidationError as err:
        raise SweepError(_format(err, source, data)) from None
    seen: Dict[str, int] = {}
    for i, run in enumerate(sweep.runs):
        if run.name in seen:
            raise SweepError(f"{source}: runs[{i}].name: duplicate run name {run.name!r} "
                             f"(also runs[{seen[run.name]}])")
        seen[run.name] = i
    return sweep


def _format(err: ValidationError, source: str, data: Dict[str, Any], prefix: tuple = ()) -> str:
    lines = []
    for e in err.errors():
        loc = prefix + tuple(e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"{source}: {_loc(loc, data)}: {msg}")
    return "\n".join(lines)


def load_sweep(uri: str) -> Sweep:
    from quantcore.io import storage

    try:
        text = storage.read_bytes(uri).decode()
    except FileNotFoundError:
        raise SweepError(f"sweep file {uri} not found") from None
    try:
        data = load_yaml(text, uri)
    except DuplicateKeyError as err:
        raise SweepError(str(err)) from None
    except yaml.YAMLError as err:
        raise SweepError(f"{uri} is not valid YAML: {err}") from None
    return _relative_to_sweep(parse_sweep(data, uri), uri)


def _relative_to_sweep(sweep: Sweep, uri: str) -> Sweep:
    """Relative paths in a sweep file (recipe files, checkpoint, calib_data, eval_data) are relative to the
    file's folder or S3 prefix, as model.checkpoint in a recipe: the tasks run on other machines and in
    other working directories than the driver. Built-in recipe names stay names."""
    from quantcore.recipe import builtin_recipes, relative_to_file

    shipped = builtin_recipes()

    def resolve(run: RunSpec, field: str, val: str) -> str:
        try:
            return relative_to_file(val, uri)
        except ValueError as err:
            raise SweepError(f"{uri}: run {run.name}: {field} {val!r} {err}") from None

    runs = []
    for run in sweep.runs:
        upd: Dict[str, Any] = {f: resolve(run, f, getattr(run, f)) for f in ("checkpoint", "calib_data", "eval_data")
                               if getattr(run, f)}
        # a recipe string that is not a built-in name and looks like a file name (a '/' or a suffix) is one
        upd["recipes"] = [resolve(run, "recipes", r) if isinstance(r, str) and r not in shipped
                          and ("/" in r or "." in r) else r for r in run.recipes or []]
        runs.append(run.model_copy(update=upd))
    return sweep.model_copy(update={"runs": runs})


# ------------------------------------------------------------------------------ inside a task

_METRICS: Dict[str, Any] = {}


def _metrics() -> Dict[str, Any]:
    """Ray metrics of this worker process (created once, after Ray is initialised)."""
    if not _METRICS:
        from ray.util.metrics import Counter, Gauge

        _METRICS.update(
            images=Counter("quantcore_sweep_images_processed", "Images calibrated or evaluated, per run and stage.",
                           tag_keys=("sweep", "run", "stage")),
            progress=Gauge("quantcore_sweep_progress", "Fraction of the current stage done (0..1).",
                           tag_keys=("sweep", "run", "stage")),
            top1=Gauge("quantcore_sweep_top1", "Top-1 accuracy (%) per run and variant (fp32 included).",
                       tag_keys=("sweep", "run", "variant")),
            seconds=Gauge("quantcore_sweep_run_seconds", "Duration of a finished run.",
                          tag_keys=("sweep", "run", "status")),
            finished=Counter("quantcore_sweep_runs_finished", "Runs finished, by status.",
                             tag_keys=("sweep", "status")),
        )
    return _METRICS


class _RayBar:
    """Progress sink for quantcore.pipeline (RunOptions.progress_factory): Ray metrics, a tqdm_ray bar, log lines."""

    def __init__(self, sweep: str, run: str, total: Optional[int], desc: str, show: bool) -> None:
        self.tags = {"sweep": sweep, "run": run, "stage": desc.split(" ")[0]}
        self.total, self.done, self.desc, self.run = total, 0, desc, run
        self.metrics = _metrics()
        self.metrics_failed = False
        self.bar = None
        if show:
            from ray.experimental import tqdm_ray

            self.bar = tqdm_ray.tqdm(total=total, desc=f"{run}: {desc}", unit="img")
        print(f"[{run}] {desc}: {total if total is not None else '?'} images", flush=True)

    def update(self, n: int = 1) -> None:
        self.done += n
        try:  # metrics must never fail a run
            self.metrics["images"].inc(n, tags=self.tags)
            if self.total:
                self.metrics["progress"].set(min(self.done / self.total, 1.0), tags=self.tags)
        except Exception as err:  # noqa: BLE001
            if not self.metrics_failed:
                print(f"[{self.run}] metrics not recorded ({type(err).__name__}: {err})", flush=True)
            self.metrics_failed = True
        if self.bar is not None:
            self.bar.update(n)

    def __enter__(self) -> "_RayBar":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.close()
        print(f"[{self.run}] {self.desc}: done, {self.done} images", flush=True)


def _run_record(spec: RunSpec, out: str, status: str = "failed") -> Dict[str, Any]:
    from quantcore.io import storage

    return {
        "name": spec.name, "status": status, "recipes": spec.recipe_labels(), "checkpoint": spec.checkpoint,
        "calib_data": spec.calib_data, "calib_split": spec.calib_split,
        "eval_data": spec.eval_data or spec.calib_data, "eval_split": spec.eval_split, "limit": spec.limit,
        "out": out, "report": storage.join(out, "report.json"), "report_md": storage.join(out, "report.md"),
        "manifest": storage.join(out, MANIFEST_NAME),
        "fp32_top1": None, "eval_count": None, "variants": {}, "duration_s": None, "finished_at": None,
        "reused": False, "error": None, "traceback": None,
        "node": os.uname().nodename if status != "pending" else None, "device": None, "warnings": [],
        "fingerprint": run_fingerprint(spec),
    }


def _legacy_fingerprint(prev: Dict[str, Any], spec: RunSpec, out: str) -> str:
    """For a failed run's record from a summary written before records carried the fingerprint: the
    current spec's fingerprint when the fields the record shows still match, else a marker that never does."""
    keys = ("recipes", "checkpoint", "calib_data", "calib_split", "eval_data", "eval_split", "limit")
    now = _run_record(spec, out)
    return now["fingerprint"] if all(prev.get(k) == now[k] for k in keys) else "changed"


def run_fingerprint(spec: RunSpec) -> str:
    """sha256 of the run's merged fields (defaults applied) as canonical JSON: a manifest only
    completes the run it was written for."""
    canon = json.dumps(spec.model_dump(mode="json", exclude_none=True), sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canon.encode()).hexdigest()


def _relative(uri: str, out: str) -> str:
    prefix = out.rstrip("/") + "/"
    if not uri.startswith(prefix):
        raise ValueError(f"artifact {uri} is not under the run's output {out}")
    return uri[len(prefix):]


def _report_artifacts(rep: Dict[str, Any], out: str) -> List[str]:
    """The files :func:`quantcore.pipeline.ptq` wrote for ``rep``, relative to ``out``."""
    from quantcore.io import storage

    rel = ["report.json", "report.md"] + [str(p) for p in rep.get("plots") or []]
    for name, v in (rep.get("variants") or {}).items():
        rel += [_relative(u, out) for u in (v.get("artifacts") or {}).values()]
        rel.append(_relative(storage.join(out, name, "report.json"), out))
    return sorted(set(rel))


def _ray_job_id() -> Optional[str]:
    try:
        import ray

        return ray.get_runtime_context().get_job_id() if ray.is_initialized() else None
    except Exception:  # noqa: BLE001 - provenance only
        return None


def write_manifest(spec: RunSpec, out: str, rep: Dict[str, Any], rec: Dict[str, Any]) -> str:
    """Write ``<out>/_SUCCESS.json``: the last object of a run, written once every artifact of
    ``rep`` exists (each one's size is read back and recorded). Returns its URI."""
    from quantcore.io import storage

    artifacts = []
    for rel in _report_artifacts(rep, out):
        try:
            artifacts.append({"path": rel, "size": storage.size(storage.join(out, rel))})
        except FileNotFoundError:
            raise RuntimeError(f"artifact {storage.join(out, rel)} is missing after the run") from None
    manifest = {"schema": MANIFEST_SCHEMA, "run": spec.name, "fingerprint": run_fingerprint(spec),
                "spec": spec.model_dump(mode="json", exclude_none=True), "finished_at": rec["finished_at"],
                "ray_job_id": _ray_job_id(), "artifacts": artifacts, "record": rec}
    uri = storage.join(out, MANIFEST_NAME)
    storage.write_bytes(uri, (json.dumps(manifest, indent=2, allow_nan=False) + "\n").encode())
    return uri


def completed_record(spec: RunSpec, out: str) -> Tuple[Optional[Dict[str, Any]], str]:
    """``(record, why)``: the run's summary record from its manifest when the run at ``out`` is
    complete (manifest of this spec, every listed artifact present with its recorded size),
    else ``(None, reason it must be computed)``."""
    from quantcore.io import storage

    uri = storage.join(out, MANIFEST_NAME)
    # storage errors propagate: an unreachable bucket is no reason to recompute finished runs
    try:
        raw = storage.read_bytes(uri)
    except FileNotFoundError:
        return None, "not run yet (no completion manifest)"
    try:
        manifest = json.loads(raw)
    except ValueError as err:  # not JSON, not UTF-8: a foreign or damaged object
        return None, f"unreadable completion manifest {uri} ({type(err).__name__}: {err})"
    if not isinstance(manifest, dict) or manifest.get("schema") != MANIFEST_SCHEMA \
            or not isinstance(manifest.get("record"), dict) or not isinstance(manifest.get("artifacts"), list) \
            or not all(isinstance(a, dict) and isinstance(a.get("path"), str) for a in manifest["artifacts"]):
        return None, f"{uri} is not a {MANIFEST_SCHEMA} manifest"
    if manifest.get("fingerprint") != run_fingerprint(spec):
        return None, "its fields changed since the completed run (fingerprint differs)"
    for a in manifest["artifacts"]:
        art = storage.join(out, a["path"])
        try:
            size = storage.size(art)
        except FileNotFoundError:
            return None, f"artifact {art} is missing"
        if size != a.get("size"):
            return None, f"artifact {art} has {size} bytes, the manifest says {a.get('size')}"
    # the record's URIs are where the run was written; OUT may have been copied or moved since
    rec = dict(_rebased(manifest["record"], str(manifest["record"].get("out") or out), out), reused=True)
    return rec, f"complete since {manifest.get('finished_at')} ({len(manifest['artifacts'])} artifacts)"


def _rebased(obj: Any, old: str, new: str) -> Any:
    """``obj`` (JSON) with every string that is ``old`` or under it moved to ``new``."""
    old, new = old.rstrip("/"), new.rstrip("/")
    if isinstance(obj, dict):
        return {k: _rebased(v, old, new) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rebased(v, old, new) for v in obj]
    if isinstance(obj, str) and old != new and (obj == old or obj.startswith(old + "/")):
        return new + obj[len(old):]
    return obj


def execute_run(run: Dict[str, Any], out: str, sweep_name: str, default_device: str,
                show_progress: bool = True) -> Dict[str, Any]:
    """One run: :func:`quantcore.pipeline.ptq` into ``out``, then its completion manifest
    (:func:`write_manifest`). Never raises for a failing run: the returned record says
    ``status: failed`` with the error, and no manifest exists afterwards."""
    from quantcore import pipeline
    from quantcore.io import storage
    from quantcore.recipe import load_recipe

    spec = RunSpec.model_validate(run)
    rec = _run_record(spec, out)
    device = spec.device or default_device
    rec["device"] = device
    print(f"[{spec.name}] start: recipes {', '.join(rec['recipes'])} -> {out} (device {device})", flush=True)
    t0 = time.perf_counter()
    rep = None
    try:
        # from here until the new manifest exists the run is incomplete, whatever an older one said
        storage.delete(storage.join(out, MANIFEST_NAME))
        recipes = [load_recipe(r) for r in spec.recipes or []]
        calib = pipeline.DataSpec(spec.calib_data or "", spec.calib_split, spec.layout, spec.skip_bad, spec.cache_dir)
        evald = pipeline.DataSpec(spec.eval_data or spec.calib_data or "", spec.eval_split, spec.layout,
                                  spec.skip_bad, spec.cache_dir, spec.limit, given=spec.eval_data is not None)
        opts = pipeline.RunOptions(
            batch_size=spec.batch_size, num_workers=spec.workers, device=device, progress=False,
            checkpoint=spec.checkpoint,
            progress_factory=lambda total, desc: _RayBar(sweep_name, spec.name, total, desc, show_progress))
        rep = pipeline.ptq(recipes, calib, evald, out, opts)
        rec.update(_results(rep))
        rec.update(status="succeeded", duration_s=round(time.perf_counter() - t0, 3), finished_at=_now())
        write_manifest(spec, out, rep, rec)
    except Exception as err:  # noqa: BLE001 - recorded, the sweep goes on
        rec.update(status="failed", error=f"{type(err).__name__}: {_as_fields(err)}",
                   traceback=traceback.format_exc()[-6000:], duration_s=round(time.perf_counter() - t0, 3),
                   finished_at=_now())
        _drop_unwritten(rec, wrote_reports=rep is not None)
        print(f"[{spec.name}] FAILED: {rec['error']}", flush=True)
    try:
        m = _metrics()
        m["seconds"].set(rec["duration_s"], tags={"sweep": sweep_name, "run": spec.name, "status": rec["status"]})
        m["finished"].inc(1, tags={"sweep": sweep_name, "status": rec["status"]})
        for variant, top1 in [("fp32", rec["fp32_top1"])] + [(k, v["top1"]) for k, v in rec["variants"].items()]:
            if isinstance(top1, (int, float)):
                m["top1"].set(top1, tags={"sweep": sweep_name, "run": spec.name, "variant": variant})
    except Exception as err:  # noqa: BLE001 - metrics must never fail a run
        print(f"[{spec.name}] metrics not recorded: {err}", flush=True)
    if rec["status"] == "succeeded":
        print(f"[{spec.name}] done in {rec['duration_s']:.1f} s: " + _one_line(rec), flush=True)
    return rec


# a flag as messages write it: at the start, or after a blank, quote, bracket or comma (not inside a path)
# (several joined by '/': "--eval-data/--eval-split")
_FLAG = re.compile(r"(?:^|(?<=[\s'\"(\[,]))--[a-z][a-z0-9]*(?:-[a-z0-9]+)*(?:/--[a-z][a-z0-9]*(?:-[a-z0-9]+)*)*")


def _as_fields(err: BaseException) -> str:
    """The message of ``err`` with quantcore's CLI flags named as the sweep file's fields (``--calib-data``
    -> ``calib_data``): quantcore's user errors name the flag a CLI user set, the sweep's user set the field.
    Flags without a run field (``--out``) and other errors (bugs: kept verbatim) are left as they are."""
    if not isinstance(err, UserError):
        return str(err)

    def one(flag: str) -> str:
        name = flag[2:].replace("-", "_")
        return name if name in _RunFields.model_fields else flag

    def field(m: "re.Match[str]") -> str:
        return "/".join(one(f) for f in m.group(0).split("/"))

    return _FLAG.sub(field, str(err))


def _results(rep: Dict[str, Any]) -> Dict[str, Any]:
    results = rep.get("results") or {}
    ref = rep.get("reference") or "fp32"
    variants = {}
    for name, v in (rep.get("variants") or {}).items():
        r = results.get(name) or {}
        art = v.get("artifacts") or {}
        variants[name] = {"top1": r.get("top1"), "top5": r.get("top5"), "delta_top1": r.get("delta_top1"),
                          "agreement": r.get("agreement"), "sqnr_db": r.get("sqnr_db"),
                          "checkpoint": art.get("checkpoint"), "encodings": art.get("encodings"),
                          "calibration_images": (v.get("calibration") or {}).get("images")}
    return {"fp32_top1": (results.get(ref) or {}).get("top1"),
            "eval_count": (rep.get("data") or {}).get("eval_count"), "variants": variants,
            "warnings": list(rep.get("warnings") or [])}


def _one_line(rec: Dict[str, Any]) -> str:
    parts = [f"fp32 {_fmt(rec['fp32_top1'])}%"]
    for name, v in rec["variants"].items():
        parts.append(f"{name} {_fmt(v['top1'])}% (Δ {_fmt(v['delta_top1'], '{:+.2f}')}, "
                     f"agreement {_fmt(v['agreement'])}%, SQNR {_fmt(v['sqnr_db'], '{:.1f}')} dB)")
    return "; ".join(parts)


def _fmt(v: Any, fmt: str = "{:.2f}") -> str:
    return fmt.format(v) if isinstance(v, (int, float)) else "–"


def _duration(seconds: Any) -> str:
    """A run's duration_s for people: "–" when none was measured (a task that died: :func:`_failure`), and
    a run that failed within its first milliseconds "<0.1", not "0.0", which reads as a measured zero."""
    if isinstance(seconds, (int, float)) and 0 <= seconds < 0.05:
        return "<0.1"
    return _fmt(seconds, "{:.1f}")


def _ptq_task(run: Dict[str, Any], out: str, sweep_name: str, default_device: str,
              show_progress: bool) -> Dict[str, Any]:
    from quantcore.plugins import load_plugins

    load_plugins()  # this task's process: the plug-ins its recipes need
    return execute_run(run, out, sweep_name, default_device, show_progress)


# ------------------------------------------------------------------------------ summary

def build_summary(sweep: Sweep, records: Dict[str, Dict[str, Any]], meta: Dict[str, Any],
                  state: Literal["running", "finished"]) -> Dict[str, Any]:
    """Summary of ``sweep`` in run order: ``records`` by run name; runs without one are ``pending``."""
    from quantcore.io import storage

    out = meta["out"]
    runs = [records.get(s.name) or _run_record(s, storage.join(out, s.name), "pending") for s in sweep.runs]
    count = {k: sum(r["status"] == k for r in runs) for k in ("succeeded", "failed", "pending")}
    return {"schema": SUMMARY_SCHEMA, **meta, "state": state, "runs_total": len(runs),
            "runs_succeeded": count["succeeded"], "runs_failed": count["failed"], "runs_pending": count["pending"],
            "runs_reused": sum(bool(r.get("reused")) for r in runs), "description": sweep.description,
            "runs": runs}


def summary_markdown(summary: Dict[str, Any]) -> str:
    done = summary["runs_succeeded"] + summary["runs_failed"]
    state = ("" if summary["state"] == "finished" else
             f" **In progress**: {done} of {summary['runs_total']} runs finished so far.")
    lines = [f"# quantcore PTQ sweep: {summary['out']}", "",
             f"Sweep file `{summary['sweep_file']}`; started {summary['started']}, "
             f"{summary['duration_s']:.0f} s in all. {summary['runs_succeeded']} of {summary['runs_total']} "
             f"runs succeeded" + (f", **{summary['runs_failed']} failed**." if summary["runs_failed"] else ".")
             + state, "",
             "| run | status | variant | FP32 top-1 % | quantized top-1 % | Δ top-1 | agreement % | "
             "SQNR dB | duration s | artifacts |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary["runs"]:
        dur = _duration(r.get("duration_s"))
        if not r["variants"]:
            lines.append(f"| {r['name']} | {r['status']} | – | – | – | – | – | – | {dur} | – |")
        for name, v in r["variants"].items():
            arts = f"[report]({r['report_md']}), [checkpoint]({v['checkpoint']}), [encodings]({v['encodings']})"
            lines.append(f"| {r['name']} | {r['status']} | {name} | {_fmt(r['fp32_top1'])} | {_fmt(v['top1'])} | "
                         f"{_fmt(v['delta_top1'], '{:+.2f}')} | {_fmt(v['agreement'])} | "
                         f"{_fmt(v['sqnr_db'], '{:.1f}')} | {dur} | {arts} |")
    reused = [r["name"] for r in summary["runs"] if r.get("reused")]
    if reused:
        lines += ["", f"Reused from an earlier attempt (complete manifests, not recomputed): {', '.join(reused)}."]
    failed = [r for r in summary["runs"] if r["status"] == "failed"]
    if failed:
        lines += ["", "## Failed runs", ""]
        for r in failed:
            err = (r.get("error") or "unknown error").replace("\n", " ")
            lines.append(f"- **{r['name']}**: {err}")
    warned = [(r["name"], w) for r in summary["runs"] for w in r.get("warnings") or []]
    if warned:
        lines += ["", "## Warnings", ""] + [f"- **{name}**: {w}" for name, w in warned]
    return "\n".join(lines) + "\n"


def write_summary(summary: Dict[str, Any]) -> None:
    """summary.json, then summary.md (each one atomic object)."""
    from quantcore.io import storage

    storage.write_bytes(summary["summary_json"], (json.dumps(summary, indent=2, allow_nan=False) + "\n").encode())
    storage.write_bytes(summary["summary_md"], summary_markdown(summary).encode())


# ------------------------------------------------------------------------------ driver

def _resource_amount(text: str) -> float:
    """argparse type of --gpus-per-task / --cpus-per-task: what Ray accepts as a task's amount."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}")
    if v > 1 and not v.is_integer():
        raise argparse.ArgumentTypeError(f"above 1 it must be a whole number (only a fraction below 1 shares "
                                         f"a device), got {text!r}")
    return v


def _retries(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return v


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jobs.ray_sweep",
        description="Run a PTQ sweep on a Ray cluster: one task (ptq:<name>) per run of the sweep file, "
                    "results in <OUT>/<name>/, summary in <OUT>/summary.json and summary.md. Runs that "
                    "are already complete in <OUT> (see --no-resume) are reused, not recomputed.")
    p.add_argument("--sweep", required=True, help="Sweep file (local path or s3:// URI), see jobs/sweep.example.yaml.")
    p.add_argument("--out", required=True, help="Output URI prefix (s3://bucket/prefix or a path shared by all nodes).")
    p.add_argument("--address", default=None,
                   help="Ray cluster address (auto, ray://host:10001, host:6379). Default: $RAY_ADDRESS as set "
                        "by `ray job submit`, else a local Ray instance.")
    p.add_argument("--gpus-per-task", type=_resource_amount, default=1.0,
                   help="GPUs each run reserves: 0 makes CPU tasks (num_gpus=0, device cpu) for a cluster "
                        "without GPUs; a fraction such as 0.5 lets runs share a GPU. Default 1.")
    p.add_argument("--cpus-per-task", type=_resource_amount, default=1.0, help="CPUs each run reserves. Default 1.")
    p.add_argument("--max-retries", type=_retries, default=1,
                   help="Ray retries of a run whose worker died (node lost, OOM kill); run errors are not "
                        "retried. Default 1.")
    p.add_argument("--only", action="append", default=[], metavar="NAME",
                   help="Run only the named run(s) of the sweep file (repeatable); the summary still lists "
                        "every run, the others as their manifests or the previous summary say.")
    p.add_argument("--no-resume", dest="resume", action="store_false",
                   help="Recompute every run, even those whose completion manifest (<OUT>/<name>/_SUCCESS.json) "
                        "says they are complete.")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="No tqdm_ray progress bars (metrics and log lines stay).")
    return p


def task_options(name: str, gpus_per_task: float, cpus_per_task: float, max_retries: int) -> Dict[str, Any]:
    """Ray ``.options()`` of the task of run ``name``; ``num_gpus`` is exactly ``gpus_per_task``
    (0 = a CPU task that never waits for a GPU)."""
    for flag, value in (("--gpus-per-task", gpus_per_task), ("--cpus-per-task", cpus_per_task)):
        try:
            _resource_amount(str(value))
        except argparse.ArgumentTypeError as err:
            raise SweepError(f"{flag}: {err}") from None
    if max_retries < 0:
        raise SweepError(f"--max-retries: must be >= 0, got {max_retries}")
    return {"name": f"ptq:{name}", "num_gpus": gpus_per_task, "num_cpus": cpus_per_task,
            "max_retries": max_retries, "retry_exceptions": False}


def _check_devices(sweep: Sweep, gpus_per_task: float, source: str) -> None:
    if gpus_per_task > 0:
        return
    for i, run in enumerate(sweep.runs):
        if run.device and run.device.startswith("cuda"):
            raise SweepError(f"{source}: runs[{i}]({run.name}).device: {run.device!r} needs a GPU, but "
                             f"--gpus-per-task is 0 (CPU tasks)")


def _check_recipes(sweep: Sweep, source: str) -> None:
    """Every run's recipes load and describe one model, checked by the driver before Ray starts: a
    typo'd recipe must not wait for a GPU task to find out (then fail as a run, exit 1)."""
    from quantcore.pipeline import DataSpec, check_cache_dir
    from quantcore.pipeline import _check_recipes as check_run
    from quantcore.recipe import RecipeError, load_recipe

    for i, run in enumerate(sweep.runs):
        try:
            recipes = [load_recipe(r) for r in run.recipes or []]
            check_run(recipes)
        except RecipeError as err:
            raise SweepError(f"{source}: runs[{i}]({run.name}).recipes: {err}") from None
        _check_model(recipes[0], run.checkpoint, f"{source}: runs[{i}]({run.name})")
        try:
            check_cache_dir(DataSpec(run.calib_data or "", run.calib_split, cache_dir=run.cache_dir),
                            DataSpec(run.eval_data or run.calib_data or "", run.eval_split, cache_dir=run.cache_dir))
        except UserError as err:
            raise SweepError(f"{source}: runs[{i}]({run.name}).cache_dir: {_as_fields(err)}") from None


def _check_data(sweep: Sweep, source: str) -> None:
    """Every run's local ``calib_data`` / ``eval_data`` exists, checked by the driver before Ray starts (a
    typo'd path must not fail as a run inside its task, exit 1). S3 data is left to the task: the driver
    only HEADs single files (checkpoints), and a dataset there is a prefix, known only by listing it."""
    from quantcore.io import storage

    for i, run in enumerate(sweep.runs):
        for field in ("calib_data", "eval_data"):
            uri = getattr(run, field)
            if field == "eval_data" and not uri and run.calib_data and run.eval_split != run.calib_split:
                uri, field = run.calib_data, "calib_data"  # evaluation reads the calibration data's eval_split
                split_key = "eval_split"
            else:
                split_key = "calib_split" if field == "calib_data" else "eval_split"
            if not uri or storage.is_s3(uri):
                continue
            try:
                path = storage.local_path(uri)
            except ValueError as err:
                raise SweepError(f"{source}: runs[{i}]({run.name}).{field}: {err}") from None
            if not os.path.exists(path):
                raise SweepError(f"{source}: runs[{i}]({run.name}).{field}: dataset {uri}: no such file or directory "
                                 f"({os.path.abspath(path)})")
            split = getattr(run, split_key)
            if run.layout == "auto" and os.path.isdir(path):
                # the split is found where the task will look (a typo'd eval_split failed inside the task)
                from quantcore.data.detect import detect_layout
                from quantcore.errors import UserError

                try:
                    detect_layout(uri, split)
                except UserError as err:
                    raise SweepError(f"{source}: runs[{i}]({run.name}).{split_key} {split!r}: {err}") from None
            elif run.layout != "auto":
                # an explicit layout the local data does not have failed inside the task (exit 1): open it
                # as the task will (a local index or folder listing, no image read)
                from quantcore.data.detect import open_dataset
                from quantcore.errors import UserError

                try:
                    open_dataset(uri, split, None, layout=run.layout, skip_bad=run.skip_bad)
                except UserError as err:
                    raise SweepError(f"{source}: runs[{i}]({run.name}).layout {run.layout!r} ({split_key} "
                                     f"{split!r}): {err}") from None


def _check_model(recipe: Any, checkpoint: Optional[str], where: str) -> None:
    """The run's FP32 model can be built and its weight files exist, checked by the driver: a model name
    its source does not know, an unreadable Hugging Face config or a missing weights file would
    otherwise fail every task of the run after Ray starts (exit 1). The architecture is built on the
    meta device (no memory, no weights read). Raises :class:`SweepError` naming the run and field."""
    import torch

    from quantcore.io import storage
    from quantcore.models import create_model

    cfg = recipe.model
    if cfg is None:
        return  # the pipeline names this one (a recipe without model:)
    files = {"checkpoint": checkpoint} if checkpoint else {
        f"recipes: recipe {recipe.name!r}: model.checkpoint": cfg.checkpoint,
        f"recipes: recipe {recipe.name!r}: model.pretrained_file": cfg.pretrained_file}
    for field, uri in files.items():
        try:
            found = not uri or storage.exists(uri)
        except (OSError, ValueError):  # no rights to look, or not an object URI: the task will say
            continue
        if not found:
            raise SweepError(f"{where}.{field}: {uri}: no such file")
    try:
        try:
            with torch.device("meta"):
                create_model(cfg, load_weights=False)
        except UserError:  # a builder that reads its own tensors (torchvision RegNet) cannot build on meta
            create_model(cfg, load_weights=False)
    except UserError as err:
        raise SweepError(f"{where}.recipes: recipe {recipe.name!r}: {_as_fields(err)}") from None


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _failure(spec: RunSpec, out: str, err: BaseException) -> Dict[str, Any]:
    """Record of a run whose task itself failed (worker died, node lost ...): duration unknown."""
    rec = _run_record(spec, out)
    rec["error"] = f"{type(err).__name__}: {err}"[:4000]
    rec["finished_at"] = _now()
    _drop_unwritten(rec)
    return rec


def _drop_unwritten(rec: Dict[str, Any], wrote_reports: bool = False) -> None:
    """A failed run's record names only files this attempt wrote: the reports are written last, so a
    run that failed before them has none (a report.json left by an earlier attempt is stale, and a
    reader following a never-written URI got "no such key"); the manifest never exists after a failure."""
    rec["manifest"] = None
    if not wrote_reports:
        rec["report"] = rec["report_md"] = None


def _completed(sweep: Sweep, out: str) -> Dict[str, Tuple[Optional[Dict[str, Any]], str]]:
    """:func:`completed_record` of every run (a few HEAD requests each, in parallel)."""
    from quantcore.io import storage

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(16, len(sweep.runs)))) as pool:
        futures = {s.name: pool.submit(completed_record, s, storage.join(out, s.name)) for s in sweep.runs}
        return {name: f.result() for name, f in futures.items()}


def _previous_runs(out: str) -> Dict[str, Dict[str, Any]]:
    """Finished run records (succeeded or failed) of ``OUT/summary.json``, by run name; {} when there
    is none or it cannot be read."""
    from quantcore.io import storage

    try:
        doc = json.loads(storage.read_bytes(storage.join(out, "summary.json")))
        return {r["name"]: r for r in doc.get("runs", []) if r.get("status") in ("succeeded", "failed")}
    except Exception:  # noqa: BLE001 - no summary yet, or one from another version: nothing to keep
        return {}


def run_sweep(sweep: Sweep, out: str, *, sweep_file: str, address: Optional[str] = None,
              gpus_per_task: float = 1.0, cpus_per_task: float = 1.0, max_retries: int = 1,
              progress: bool = True, resume: bool = True, only: Optional[List[str]] = None) -> Dict[str, Any]:
    """Run ``sweep`` (every run, or the runs named in ``only``) on Ray; returns the summary, also
    written to ``OUT/summary.json``/``.md``. The summary always lists every run of the sweep file: with
    ``only``, the others keep what their manifests (complete runs) or the previous summary (failed
    ones) say, or stay ``pending``."""
    import ray

    from quantcore.io import StorageError, storage

    selected = sweep.model_copy(update={"runs": [r for r in sweep.runs if r.name in only]}) if only else sweep
    options = {s.name: task_options(s.name, gpus_per_task, cpus_per_task, max_retries) for s in selected.runs}
    _check_devices(selected, gpus_per_task, sweep_file)
    _check_recipes(selected, sweep_file)
    _check_data(selected, sweep_file)
    if not storage.is_s3(out):  # (an unreachable bucket is a storage failure, exit 1, found below)
        from quantcore.pipeline import check_out

        check_out(out)  # before Ray runs anything: the summary and every run's files go there
    started_at, t0 = _now(), time.perf_counter()
    sweep_name = ascii_tag(out.rstrip("/").rsplit("/", 1)[-1], "sweep")  # a metric tag: ASCII
    default_device = "cuda" if gpus_per_task > 0 else "cpu"
    versions: Dict[str, Any] = {"ray": ray.__version__}
    try:
        import quantcore

        versions["quantcore"] = quantcore.__version__
    except Exception:  # noqa: BLE001
        pass
    meta = {"sweep_file": sweep_file, "out": out, "started": started_at, "finished": None, "duration_s": 0.0,
            "gpus_per_task": gpus_per_task, "cpus_per_task": cpus_per_task, "versions": versions,
            "summary_json": storage.join(out, "summary.json"), "summary_md": storage.join(out, "summary.md")}

    def summary(state: Literal["running", "finished"]) -> Dict[str, Any]:
        meta["duration_s"] = round(time.perf_counter() - t0, 3)
        meta["finished"] = _now() if state == "finished" else None
        return build_summary(sweep, records, meta, state)

    def checkpoint_summary() -> None:
        # a storage hiccup must not stop the sweep: the manifests are the record, the next write catches up
        try:
            write_summary(summary("running"))
        except (StorageError, OSError) as err:
            print(f"summary not updated ({type(err).__name__}: {err}); the next update retries", flush=True)

    records: Dict[str, Dict[str, Any]] = {}
    done = _completed(sweep if only else selected, out) if (only or resume) else {}
    if only:  # the runs left out keep their record in the summary
        earlier = _previous_runs(out)
        for spec in sweep.runs:
            # a complete run keeps its manifest's record; the previous summary only says which runs
            # failed: a "succeeded" there whose manifest no longer completes it (spec changed, artifact
            # gone) is pending, not a success with stale numbers
            prev = earlier.get(spec.name) if (earlier.get(spec.name) or {}).get("status") == "failed" else None
            if prev is not None and (prev.get("fingerprint") or _legacy_fingerprint(prev, spec, out)) != run_fingerprint(spec):
                prev = None  # its fields changed since it failed: pending, not the old failure

            if spec.name not in only and (done[spec.name][0] or prev):
                records[spec.name] = done[spec.name][0] or prev
    total, finished = len(selected.runs), 0
    if resume:
        for spec in selected.runs:
            rec, why = done[spec.name]
            if rec is not None:
                records[spec.name] = rec
                finished += 1
                print(f"[{finished}/{total}] {spec.name}: reused, {why}: {rec['manifest']}", flush=True)
            elif not why.startswith("not run yet"):
                print(f"{spec.name}: recomputing: {why}", flush=True)
    todo = [s for s in selected.runs if s.name not in records]
    if todo:
        if not ray.is_initialized():
            from quantcore.plugins import runtime_env

            ray.init(address=address, log_to_driver=True, runtime_env=runtime_env() or None)
        if gpus_per_task > 0 and not ray.cluster_resources().get("GPU"):
            print(f"warning: tasks ask {gpus_per_task:g} GPU each but no node of the Ray cluster has a GPU now; "
                  f"they wait for GPU nodes. For a CPU sweep pass --gpus-per-task 0.", flush=True)
        # written once the cluster is reached: a driver that cannot reach it leaves the previous summary
        # (a finished sweep's, under --no-resume) as it was
        checkpoint_summary()
        task = ray.remote(_ptq_task)
        pending: Dict[Any, RunSpec] = {}
        for spec in todo:
            ref = task.options(**options[spec.name]).remote(
                spec.model_dump(mode="json", exclude_none=True), storage.join(out, spec.name), sweep_name,
                default_device, progress)
            pending[ref] = spec
        print(f"sweep {sweep_file}: {len(pending)} runs submitted, {len(records)} reused ({gpus_per_task:g} GPU, "
              f"{cpus_per_task:g} CPU each) -> {out}", flush=True)
        waiting = list(pending)
        while waiting:
            ready, waiting = ray.wait(waiting, num_returns=1)
            for ref in ready:
                spec = pending[ref]
                try:
                    rec = ray.get(ref)
                except Exception as err:  # worker died, task cancelled ...: recorded like a failed run
                    rec = _failure(spec, storage.join(out, spec.name), err)
                records[spec.name] = rec
                finished += 1
                status = rec["status"] if rec["status"] != "succeeded" else "ok"
                detail = _one_line(rec) if rec["status"] == "succeeded" else rec["error"]
                print(f"[{finished}/{total}] {spec.name}: {status} "
                      f"({_duration(rec.get('duration_s'))} s) {detail}", flush=True)
            if waiting:
                checkpoint_summary()
    else:
        print(f"sweep {sweep_file}: all {total} runs already complete in {out}, nothing to run", flush=True)
    final = summary("finished")
    write_summary(final)
    return final


def main(argv: Optional[List[str]] = None) -> int:
    from quantcore.io import StorageError

    args = parse_once(_parser(), argv)
    try:
        from quantcore.plugins import load_plugins

        load_plugins()  # before the sweep's recipes are read
        sweep = load_sweep(args.sweep)
        if args.only:
            unknown = sorted(set(args.only) - {r.name for r in sweep.runs})
            if unknown:
                raise SweepError(f"--only: no run named {', '.join(unknown)} in {args.sweep}")
        summary = run_sweep(sweep, args.out, sweep_file=args.sweep, address=args.address,
                            gpus_per_task=args.gpus_per_task, cpus_per_task=args.cpus_per_task,
                            max_retries=args.max_retries, progress=args.progress, resume=args.resume,
                            only=args.only or None)
    except UserError as err:  # SweepError, a bad URI ...: one line, exit 2 (retrying cannot help)
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    except StorageError as err:  # storage retries exhausted: exit 1, a retry resumes from the manifests
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    print("\n" + summary_markdown(summary), flush=True)
    print(f"summary: {summary['summary_json']}", flush=True)
    ran = [r for r in summary["runs"] if not args.only or r["name"] in args.only]  # this invocation's runs
    failed = [r["name"] for r in ran if r["status"] != "succeeded"]
    if failed:
        print(f"error: {len(failed)} of {len(ran)} runs failed: {', '.join(failed)}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    # Run through the importable module, not __main__: Ray then pickles the task by reference and
    # workers import jobs.ray_sweep (the image has it on PYTHONPATH) instead of a by-value copy.
    from jobs import ray_sweep as _module

    sys.exit(_module.main())
