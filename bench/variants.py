"""Many variants in one evaluation pass: time per image and peak memory for 1, 2, 4, 8 variants.

    python -m bench.variants [--quick] [--device cpu|cuda] [--threads N] [--images N]

A ViT-S/16 (timm ``vit_small_patch16_224``, random weights, 22 M parameters, head sized to the
data's classes) is calibrated for the first N of eight recipes (placements ft1/ft2, weights W8/W4,
activation ranges max/percentile) and evaluated with FP32 in one pass of
:func:`quantcore.pipeline.evaluate_variants` over ImageNet-like 500x375 JPEGs (``bench.loader``'s
generator: decode, resize 256, crop 224 through the model's own transform). Each N runs in a fresh
process, one after another in this run, so the peak memory (peak RSS on CPU,
``torch.cuda.max_memory_allocated`` on CUDA) is that of N variants alone; the same N = 8 run with
every variant as a separate full copy (the behaviour before weights were shared) is the memory
control. Time per image is split into the data path and each model's forward as the ptq report
does (``report["evaluation_cost"]``).

Results: ``bench/results/variants-<device>.json`` and the section between the ``bench:variants``
markers of ``docs/benchmarks.md``. Nothing here asserts a threshold.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._docs import finish, markers, new_record, write_marked

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
RESULTS = ROOT / "bench" / "results"
START, END = markers("variants")  # CPU runs; GPU runs own bench:variants-gpu
MODEL = "vit_small_patch16_224"
CLASSES = 10  # bench.loader's generator: 10 class folders


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def recipes(n: int) -> list[dict]:
    """The first ``n`` of eight recipes: every combination of placement, weight bits and calibrator."""
    out = []
    for bits in (8, 4):
        for mode in ("ft1", "ft2"):
            for method in ("max", "percentile"):
                out.append({"name": f"w{bits}a8_{mode}_{method}",
                            "model": {"name": MODEL, "pretrained": False, "num_classes": CLASSES},
                            "placement": {"family": "vit", "mode": mode},
                            "quant": {"weights": {"bits": bits, "per_channel": True}, "activations": {"bits": 8}},
                            "calibration": {"method": method, "num_batches": 1, "batch_size": 4}})
    return out[:n]


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """One configuration in this (fresh) process: calibrate N variants, evaluate them with FP32."""
    import logging

    import torch

    import quantcore
    from quantcore import pipeline

    logging.getLogger("quantcore").setLevel(logging.ERROR)  # the random-weights warning, once per run
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    rs = [quantcore.load_recipe(r) for r in recipes(args.worker)]
    opts = pipeline.RunOptions(batch_size=args.batch, device=args.device, progress=False)
    data = pipeline.DataSpec(args.data, "val", limit=args.images)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    fp32, variants, _ = pipeline.calibrate_variants(rs, pipeline.DataSpec(args.data, "val"), opts)
    if args.separate:  # the control: every variant holds a full copy of its weights
        for v in variants:
            v.model = copy.deepcopy(v.model)
    cal_s = time.perf_counter() - t0
    # warm-up on 2 images (first-call costs: allocator, kernel selection), then the measured pass
    pipeline.evaluate_variants(fp32, variants, pipeline.DataSpec(args.data, "val", limit=2), opts)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)  # the evaluation's peak (weights are all resident)
    scores, info, _ = pipeline.evaluate_variants(fp32, variants, data, opts)
    ec = info["evaluation_cost"]
    return {"variants": len(variants), "separate": args.separate, "calibrate_s": cal_s, **ec,
            "sqnr_db": {n: s.sqnr_db for n, s in scores.items() if n != "fp32"}}


def run_config(n: int, separate: bool, args: argparse.Namespace, data: str) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.variants", "--worker", str(n), "--data", data, "--device", args.device,
           "--threads", str(args.threads), "--images", str(args.images), "--batch", str(args.batch)]
    if separate:
        cmd.append("--separate")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {n}{' separate' if separate else ''} failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process_s"] = time.perf_counter() - t0
    return out


def machine() -> dict[str, Any]:
    from bench.loader import machine as loader_machine

    return loader_machine()


def _f(x: Any, nd: int = 1) -> str:
    return "–" if x is None else f"{x:.{nd}f}"


def _mb(b: Any) -> str:
    return "–" if b is None else f"{b / 2 ** 20:.0f}"


def summarize(res: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for r in res["runs"]:
        t, m = r["time"], r["memory"]
        vs = [v for n, v in t["models"].items() if n != "fp32"]
        rows.append({"variants": r["variants"], "separate": r["separate"],
                     "data": t["data"]["ms_per_image"], "fp32": t["models"]["fp32"]["ms_per_image"],
                     "variant_mean": sum(v["ms_per_image"] for v in vs) / len(vs),
                     "scoring": t["scoring"]["ms_per_image"], "total": t["total"]["ms_per_image"],
                     "extra": t["extra_variant_ms_per_image"], "models_bytes": m["models_bytes"],
                     "separate_bytes": m["separate_bytes"], "peak_bytes": m["peak_bytes"], "source": m["source"]})
    return rows


def interpretation(res: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    shared = [r for r in rows if not r["separate"]]
    out = []
    if len(shared) >= 2:
        a, b = shared[0], shared[-1]
        slope = (b["total"] - a["total"]) / (b["variants"] - a["variants"])
        out.append(f"**Cost of one more variant.** From {a['variants']} to {b['variants']} variants the pass costs "
                   f"{_f(slope)} ms more per image per added variant (total {_f(a['total'])} -> {_f(b['total'])} "
                   f"ms/image); the report's own per-variant figure (forward + scoring share) is "
                   f"{_f(b['extra'])} ms/image, and the data path, paid once whatever N, is {_f(b['data'])} ms/image "
                   f"({_f(100 * b['data'] / b['total'], 0)} % of the pass at N = {b['variants']}, "
                   f"{_f(100 * a['data'] / a['total'], 0)} % at N = {a['variants']}).")
        grow = (b["models_bytes"] - a["models_bytes"]) / (b["variants"] - a["variants"])
        out.append(f"**Memory.** The models hold {_mb(a['models_bytes'])} MB at N = {a['variants']} and "
                   f"{_mb(b['models_bytes'])} MB at N = {b['variants']} ({grow / 2 ** 10:.0f} kB per added variant: "
                   f"its ranges); as separate copies they would hold {_mb(b['separate_bytes'])} MB. Peak "
                   f"({b['source']}): {_mb(a['peak_bytes'])} MB at N = {a['variants']}, {_mb(b['peak_bytes'])} MB "
                   f"at N = {b['variants']}.")
    sep = [r for r in rows if r["separate"]]
    if sep and shared:
        s, b = sep[0], next((r for r in shared if r["variants"] == sep[0]["variants"]), shared[-1])
        out.append(f"**Control.** The same {s['variants']} variants as separate full copies (the behaviour before "
                   f"sharing): models {_mb(s['models_bytes'])} MB, peak {_mb(s['peak_bytes'])} MB, i.e. "
                   f"{_mb(s['peak_bytes'] - b['peak_bytes'])} MB more than shared; time per image "
                   f"{_f(s['total'])} vs {_f(b['total'])} ms (the same work: sharing changes no arithmetic, "
                   f"outputs are bit-identical, tests/test_evaluate_variants.py).")
    return out


def render(res: dict[str, Any]) -> str:
    rows = summarize(res)
    mc = res["machine"]
    start, end = markers("variants", res["device"])
    lines = [start, "## Many variants in one pass" + (" on the GPU" if start != START else ""), "",
             f"`{res['command']}` — {res['date']}, {res['device']}, {mc.get('cpu')} ({mc.get('affinity_cpus')} "
             f"CPUs usable), torch {mc.get('torch')}, {res['threads']} torch thread(s); load average "
             f"{res['loadavg_start']} at start, {res['loadavg_end']} at end (other jobs shared the machine: absolute "
             f"times are for the record, the comparison is within this run). Model: {MODEL} (random weights, "
             f"{CLASSES}-class head), {res['images']} ImageNet-like 500x375 JPEGs per configuration in batches of "
             f"{res['batch']}, loader in the main process (num_workers 0, so the data path includes decoding), each "
             "configuration in a fresh process, after a 2-image warm-up pass.", "",
             "| variants | weights | data ms/img | FP32 ms/img | mean variant ms/img | scoring ms/img | "
             "total ms/img | one more variant ms/img | models MB | peak MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variants']} | {'separate copies' if r['separate'] else 'shared'} | {_f(r['data'])} | "
                     f"{_f(r['fp32'])} | {_f(r['variant_mean'])} | {_f(r['scoring'])} | {_f(r['total'])} | "
                     f"{_f(r['extra'])} | {_mb(r['models_bytes'])} | {_mb(r['peak_bytes'])} |")
    src = rows[0]["source"] if rows else "?"
    lines += ["", f"Peak: {src}. Models MB: every parameter and buffer of FP32 and the variants, each storage "
              "counted once (exact).", ""]
    lines += [p + "\n" for p in interpretation(res, rows)]
    lines += [f"Raw numbers: `{res['results_file']}`.", end, ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.variants", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="8 images per configuration (smoke run)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--images", type=int, default=None, help="evaluation images per configuration (default 16)")
    p.add_argument("--batch", type=int, default=8, help="evaluation batch size (default 8)")
    p.add_argument("--counts", default="1,2,4,8", help="numbers of variants (default 1,2,4,8)")
    p.add_argument("--no-separate", action="store_true", help="skip the separate-copies control")
    p.add_argument("--no-write", action="store_true", help="print the section, write no file")
    p.add_argument("--render", action="store_true", help="re-render the docs section from saved results")
    # internal: one configuration in a worker process
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--separate", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--data", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.images = args.images or (8 if args.quick else 16)
    if args.worker is not None:
        print(json.dumps(worker(args), default=str))
        return 0
    import torch

    device = torch.device(args.device)
    results_file = RESULTS / f"variants-{device.type}.json"
    if args.render:
        res = json.loads(results_file.read_text())
        section = render(res)
        if not args.no_write:
            write_marked(section, DOC)
        print(section)
        return 0
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA device is available")
    counts = [int(c) for c in args.counts.split(",") if c.strip()]
    if not counts or min(counts) < 1 or max(counts) > len(recipes(99)):
        p.error(f"--counts: numbers between 1 and {len(recipes(99))}")
    from bench.loader import generate_folder

    res: dict[str, Any] = new_record("variants", argv, results_file, device=str(device), threads=args.threads,
                                     images=args.images, batch=args.batch, machine=machine(), runs=[])
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="qc-variants-") as tmp:
        res["data"] = generate_folder(Path(tmp), max(args.images, CLASSES))  # every class folder
        configs = [(n, False) for n in counts] + ([] if args.no_separate else [(max(counts), True)])
        for n, separate in configs:
            log(f"{n} variant(s){' as separate copies' if separate else ''} ...")
            r = run_config(n, separate, args, tmp)
            log(f"  total {r['time']['total']['ms_per_image']:.1f} ms/img, models "
                f"{r['memory']['models_bytes'] / 2 ** 20:.0f} MB, peak {r['memory']['peak_bytes'] / 2 ** 20:.0f} MB")
            res["runs"].append(r)
    return finish(res, t0, render, results_file, lambda sec: write_marked(sec, DOC), args.no_write)


if __name__ == "__main__":
    sys.exit(main())
