"""Decode benchmark: img/s per core of the PIL path vs. torchvision.io + tensor transform, and (on a GPU)
batched nvJPEG decode.

    python -m bench.decode [--quick] [--images N] [--reps R] [--batch B] [--device cpu|cuda] [--threads T]

1. Generates N ImageNet-like JPEGs in memory (``bench.loader.make_jpeg``: 500x375, smooth colour
   fields + blurred grain, ~100 KB at quality 90), the same images as the loader benchmark.
2. Times, single-threaded (``torch.set_num_threads(T)``, default 1) in this process, every image of the
   set through each contender, one repetition = every contender once in a rotated order (interleaved),
   after one warm-up repetition; medians over repetitions, ratios paired per repetition:
     * ``pil``        : ``eval_transform(model, decoder='pil').from_bytes`` = ``decode_image`` (PIL) +
                        the model's PIL transform (timm ``resnet50.tv_in1k``: resize 256 bilinear, center
                        crop 224, normalize): today's path;
     * ``torchvision``: ``eval_transform(model).from_bytes``: ``torchvision.io.decode_jpeg`` + the same
                        transform on the ``uint8`` tensor (``torchvision.transforms.v2.functional``);
     * ``batch_cpu``  : ``BatchDecoder(transform, 'cpu')`` on batches of B (the code the GPU path runs);
     * ``pil_decode`` / ``tv_decode``: decode only (PIL ``Image.open().load()`` vs ``decode_jpeg``):
                        the single-core decode limit;
     * with ``--device cuda``: ``gpu_decode`` (``decode_jpeg(list, device='cuda')`` per batch, nvJPEG) and
       ``gpu_full`` (``BatchDecoder(transform, 'cuda')``: decode + resize/crop/normalize on the GPU),
       synchronized; img/s are wall-clock (the CPU only feeds bytes).
   img/s per core = images / CPU seconds of this process (``time.process_time``), which other jobs on
   the machine disturb less than wall time; wall img/s is recorded too.
3. Pixel agreement with the PIL path on the same images (max / mean abs difference of the normalized
   tensors, in 255-levels too), for bilinear (``resnet50.tv_in1k``) and bicubic (``vit_small_patch16_224``)
   transforms, and for the device path when it runs; top-1 agreement of a small CNN trained here on
   Fashion-MNIST (``/usr/share/datasets/fashion-mnist``), its test images re-encoded as 224x224 RGB JPEGs.

Results: ``bench/results/decode-<device>.json`` (``-quick`` for ``--quick``) and the section between the
``bench:decode`` markers of ``docs/benchmarks.md`` (``--device cuda`` writes its own GPU section,
``bench:decode-gpu``). Nothing here asserts a timing threshold.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from bench._docs import markers, new_record, write_section

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
MODEL = "resnet50.tv_in1k"
MODEL_BICUBIC = "vit_small_patch16_224"
ISSUE_FIGURES = {"pil": 263, "torchvision": 386}  # img/s per core quoted by issue #10
LABELS = {"pil": "PIL decode + PIL transform (today)", "torchvision": "torchvision.io decode + tensor transform",
          "batch_cpu": "BatchDecoder, device=cpu", "pil_decode": "PIL decode only",
          "tv_decode": "torchvision.io decode only", "gpu_decode": "nvJPEG batched decode only",
          "gpu_full": "nvJPEG batched decode + transform on GPU"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def median(xs: list[float]) -> float:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return statistics.median(xs) if xs else math.nan


# ------------------------------------------------------------------------------------------------ data
def photo_jpegs(n: int, seed: int = 0) -> list[bytes]:
    """``n`` ImageNet-like 500x375 JPEGs (quality 90), the loader benchmark's generator."""
    from bench.loader import make_jpeg

    rng = np.random.default_rng(seed)
    return [make_jpeg(rng) for _ in range(n)]


def _fmnist() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from quantcore.demo import load_fashion_mnist

    return load_fashion_mnist()


class SmallCNN(torch.nn.Module):
    """A 1-channel Fashion-MNIST classifier that carries a timm-style ``pretrained_cfg``, so
    :func:`quantcore.data.eval_transform` builds its transform (resize 28, crop 28, mode ``'L'``)."""

    def __init__(self, interpolation: str = "bilinear") -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(16, 32, 3, padding=1)
        self.fc = torch.nn.Linear(32 * 7 * 7, 10)
        self.pretrained_cfg = {"input_size": (1, 28, 28), "interpolation": interpolation, "crop_pct": 1.0,
                               "mean": (0.286,), "std": (0.353,), "first_conv": "conv1", "num_classes": 10}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = torch.nn.functional
        x = f.max_pool2d(f.relu(self.conv1(x)), 2)
        x = f.max_pool2d(f.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


def train_fmnist_cnn(n_train: int = 12000, epochs: int = 2, seed: int = 0, interpolation: str = "bilinear") -> SmallCNN:
    """Train :class:`SmallCNN` on the first ``n_train`` Fashion-MNIST training images (28x28, seconds on a CPU)."""
    x, y = _fmnist()["train"]
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = SmallCNN(interpolation)
    xt = (torch.from_numpy(np.array(x[:n_train])).float()[:, None] / 255 - 0.286) / 0.353
    yt = torch.from_numpy(y[:n_train].astype(np.int64))
    opt = torch.optim.Adam(model.parameters(), 2e-3)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(n_train, generator=g).split(128):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    return model.eval()


def fmnist_jpegs(n: int, size: int = 224, quality: int = 90, offset: int = 0) -> tuple[list[bytes], np.ndarray]:
    """Fashion-MNIST test images ``offset..offset+n`` upscaled (bicubic) to ``size`` x ``size`` RGB JPEGs."""
    from PIL import Image

    x, y = _fmnist()["test"]
    out = []
    for a in x[offset:offset + n]:
        im = Image.fromarray(a).resize((size, size), Image.BICUBIC).convert("RGB")
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=quality)
        out.append(buf.getvalue())
    return out, y[offset:offset + n].astype(np.int64)


def agreement(t_ref: Any, t_new: Callable, blobs: list[bytes], std: list[float]) -> dict[str, Any]:
    """Max/mean abs difference of ``t_new(b)`` vs ``t_ref.from_bytes(b)``; max also in 255-levels."""
    mx = lv = tot = 0.0
    n = nd = 0
    s = torch.tensor(std).view(-1, 1, 1)
    for i, b in enumerate(blobs):
        a, c = t_ref.from_bytes(b, f"#{i}"), t_new(b, i).cpu()
        d = (a - c).abs()
        mx, lv = max(mx, float(d.max())), max(lv, float((d * s).max() * 255))
        tot += float(d.sum())
        n += d.numel()
        nd += int((d > 1e-6).sum())
    return {"max_abs": mx, "max_levels": lv, "mean_abs": tot / max(n, 1), "frac_differ": nd / max(n, 1),
            "images": len(blobs)}


def fmnist_agreement(n_test: int = 1000, n_train: int = 12000, interpolation: str = "bilinear",
                     seed: int = 0) -> dict[str, Any]:
    """Top-1 agreement (and accuracy) of a trained :class:`SmallCNN`: PIL path vs torchvision path."""
    from quantcore.data import eval_transform

    model = train_fmnist_cnn(n_train, seed=seed, interpolation=interpolation)
    blobs, y = fmnist_jpegs(n_test)
    t_pil, t_new = eval_transform(model, decoder="pil"), eval_transform(model)
    xp = torch.stack([t_pil.from_bytes(b, f"#{i}") for i, b in enumerate(blobs)])
    xn = torch.stack([t_new.from_bytes(b, f"#{i}") for i, b in enumerate(blobs)])
    with torch.no_grad():
        pp, pn = model(xp).argmax(1).numpy(), model(xn).argmax(1).numpy()
    d = (xp - xn).abs()
    return {"images": n_test, "agree": float((pp == pn).mean()), "acc_pil": float((pp == y).mean()),
            "acc_new": float((pn == y).mean()), "max_abs": float(d.max()), "mean_abs": float(d.mean()),
            "max_levels": float(d.max() * 0.353 * 255), "decoders": dict(t_new.counts), "interpolation": interpolation}


# ------------------------------------------------------------------------------------------------ timing
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], int], device: str = "cpu") -> dict[str, float]:
    _sync(device)
    c0, w0 = time.process_time(), time.perf_counter()
    n = fn()
    _sync(device)
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    return {"n": n, "wall_s": wall, "cpu_s": cpu, "img_s": n / wall, "img_s_per_core": n / cpu if cpu > 0 else math.nan}


def contenders(blobs: list[bytes], batch: int, device: str) -> dict[str, Callable[[], int]]:
    import timm

    from quantcore.data import decode_image, eval_transform
    from quantcore.data.decode import BatchDecoder, Encoded, _tv_decode_jpeg, as_uint8_tensor

    model = timm.create_model(MODEL, pretrained=False)
    t_pil, t_new = eval_transform(model, decoder="pil"), eval_transform(model)
    names = [f"#{i}" for i in range(len(blobs))]
    enc = [Encoded(as_uint8_tensor(b), w) for b, w in zip(blobs, names)]
    batches = [enc[i:i + batch] for i in range(0, len(enc), batch)]

    def each(f: Callable) -> Callable[[], int]:
        def run() -> int:
            for b, w in zip(blobs, names):
                f(b, w)
            return len(blobs)
        return run

    def batched(bd: BatchDecoder) -> Callable[[], int]:
        def run() -> int:
            return sum(int(bd(items)[0].shape[0]) for items in batches)
        return run

    def pil_decode(b: bytes, w: str) -> Any:
        return decode_image(b, w)

    def tv_decode(b: bytes, w: str) -> Any:
        return _tv_decode_jpeg(as_uint8_tensor(b))

    out = {"pil": each(t_pil.from_bytes), "torchvision": each(t_new.from_bytes),
           "batch_cpu": batched(BatchDecoder(t_new, "cpu")), "pil_decode": each(pil_decode),
           "tv_decode": each(tv_decode)}
    if device.startswith("cuda"):
        def gpu_decode() -> int:
            return sum(len(_tv_decode_jpeg([it.data for it in items], device)) for items in batches)

        out["gpu_decode"] = gpu_decode
        out["gpu_full"] = batched(BatchDecoder(t_new, device))
    return out


# ------------------------------------------------------------------------------------------------ report
def _f(x: Any, nd: int = 0) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:,.{nd}f}" if nd else f"{x:,.0f}"


def summarize(reps: list[dict[str, dict]]) -> dict[str, Any]:
    kinds = list(reps[0])
    out: dict[str, Any] = {}
    for k in kinds:
        per_core = [r[k]["img_s_per_core"] for r in reps]
        wall = [r[k]["img_s"] for r in reps]
        ratio = [r[k]["cpu_s"] and r["pil"]["cpu_s"] / r[k]["cpu_s"] * r[k]["n"] / r["pil"]["n"] for r in reps]
        out[k] = {"img_s_per_core": median(per_core), "img_s_wall": median(wall),
                  "ms_cpu_per_img": 1e3 / median(per_core), "vs_pil": median(ratio),
                  "vs_pil_min": min(ratio), "vs_pil_max": max(ratio)}
    return out


def render(res: dict[str, Any], gpu: bool) -> tuple[str, str, str]:
    start, end = markers("decode", "cuda" if gpu else "cpu")
    s, mc = res["summary"], res["machine"]
    title = ("## Image decoding on the GPU: batched nvJPEG (issue #10)" if gpu else
             "## Image decoding: PIL vs. torchvision.io (issue #10)")
    L = [start, title, ""]
    L.append(f"Generated by `{res['command']}` on {res['date']} ({'quick run, ' if res['quick'] else ''}"
             f"CPU: {mc['cpu']}, {mc['logical_cpus']} logical CPUs, {res['threads']} torch thread(s), "
             f"{'GPU: ' + res['gpu'] + ', ' if res.get('gpu') else ''}torch {mc['torch']}, torchvision "
             f"{mc.get('torchvision')}, timm {mc.get('timm')}, Pillow {mc.get('PIL')}; load average "
             f"{res['loadavg_start']} at start, {res['loadavg_end']} at the end).")
    L.append("")
    L.append(f"Data: {res['images']} generated ImageNet-like JPEGs (500x375, {_f(res['mean_kb'], 1)} KB mean, "
             f"quality 90) in memory. Transform: eval transform of timm `{MODEL}` (resize 256 bilinear, center "
             f"crop 224, normalize). {res['reps']} interleaved repetitions after one warm-up, medians; img/s per "
             "core = images / CPU seconds of the process (one thread); ratios paired per repetition (range).")
    L.append("")
    L.append("| path | img/s per core | ms CPU / img | wall img/s | vs PIL path (range) |")
    L.append("|---|---|---|---|---|")
    for k, r in s.items():
        L.append(f"| {LABELS[k]} | {_f(r['img_s_per_core'])} | {_f(r['ms_cpu_per_img'], 2)} | {_f(r['img_s_wall'])} "
                 f"| {_f(r['vs_pil'], 2)}x ({_f(r['vs_pil_min'], 2)}-{_f(r['vs_pil_max'], 2)}) |")
    L.append("")
    p, t = s["pil"], s["torchvision"]
    L.append(f"**Result.** The new path decodes + transforms {_f(t['img_s_per_core'])} img/s per core against "
             f"{_f(p['img_s_per_core'])} for PIL: **{_f(t['vs_pil'], 2)}x** (issue's figures: PIL "
             f"{ISSUE_FIGURES['pil']}, torchvision.io {ISSUE_FIGURES['torchvision']} img/s per core, 1.47x). "
             f"Single-core decode limit in the same run (decode only): PIL {_f(s['pil_decode']['img_s_per_core'])}, "
             f"torchvision.io {_f(s['tv_decode']['img_s_per_core'])} img/s per core; the rest of the new path's "
             f"{_f(t['ms_cpu_per_img'], 2)} ms/img is resize + crop + normalize on the tensor "
             f"({_f(t['ms_cpu_per_img'] - s['tv_decode']['ms_cpu_per_img'], 2)} ms, against "
             f"{_f(p['ms_cpu_per_img'] - s['pil_decode']['ms_cpu_per_img'], 2)} ms for Pillow's resize + ToTensor + "
             "normalize): both decoders are the same libjpeg-turbo, so the gain is in the transform on the uint8 "
             "tensor, and the decoder choice alone is worth little. `BatchDecoder` on the CPU "
             f"(the GPU path's code, batches of {res['batch']}) runs at {_f(s['batch_cpu']['img_s_per_core'])} "
             "img/s per core.")
    if gpu:
        L.append("")
        L.append(f"GPU: nvJPEG batched decode {_f(s['gpu_decode']['img_s_wall'])} img/s, decode + transform on "
                 f"the GPU {_f(s['gpu_full']['img_s_wall'])} img/s (wall, batches of {res['batch']}, bytes from host "
                 "memory, one process).")
    L.append("")
    L.append("Pixel agreement with the PIL path (normalized tensors; levels = difference x std x 255):")
    L.append("")
    L.append("| images | path | max abs | max (levels of 255) | mean abs | values that differ |")
    L.append("|---|---|---|---|---|---|")
    for name, a in res["agreement"].items():
        L.append(f"| {a['images']} {a.get('what', '')} | {name} | {a['max_abs']:.4f} | {a['max_levels']:.2f} | "
                 f"{a['mean_abs']:.2e} | {100 * a.get('frac_differ', math.nan):.2f}% |")
    fm = res.get("fmnist")
    if fm:
        L.append("")
        L.append(f"Top-1 of a small CNN trained here on Fashion-MNIST, {fm['images']} test images re-encoded as "
                 f"224x224 RGB JPEGs (model input 1x28x28, `'L'` by PIL's luma formula): agreement "
                 f"**{100 * fm['agree']:.2f}%**, accuracy PIL path {100 * fm['acc_pil']:.2f}%, new path "
                 f"{100 * fm['acc_new']:.2f}% (max abs difference {fm['max_abs']:.4f}, {fm['max_levels']:.2f} levels).")
    L.append("")
    L.append("CPU paths: decoded `uint8` pixels are bit-identical (both wheels use libjpeg-turbo with the same "
             "settings); the differences above come from the resize (torch vs Pillow rounding of the antialiased "
             "bilinear/bicubic kernels): mostly 1 level of 255, rarely 2, never more in 75 M values measured, "
             "the tolerance `quantcore.data.decode` states and `tests/test_decode.py` checks."
             + (" nvJPEG rows: its own IDCT and upsampling, and the resize on the GPU, differ by more (the table's "
                "maximum and mean); `quantcore.data.decode` states that tolerance, and `tests/test_decode.py` "
                "bounds the mean below 1 level and the maximum at 16." if gpu else ""))
    L.append("")
    cpu_kinds = [k for k in s if not k.startswith("gpu")]  # one thread: wall well below per-core = CPU taken away
    busy = bool(cpu_kinds) and statistics.median(s[k]["img_s_wall"] / s[k]["img_s_per_core"] for k in cpu_kinds) < 0.8
    L.append("**Caveats.** " + (f"Other jobs shared the {mc['logical_cpus']} CPUs (load average above; wall img/s "
             "far below the per-core figures shows it), so absolute figures are noisy: compare the paired ratios. "
             if busy else "Absolute figures vary from machine to machine and run to run: compare the paired ratios. ") +
             "TorchCodec's `decode_jpeg` (torchvision 0.29 deprecates `torchvision.io` decoding in its favour) was "
             "checked once outside this script: the same pixels and the same speed as `torchvision.io` here.")
    L.append("")
    L.append(f"Raw numbers: `{res['results_file']}`.")
    L.append(end)
    return "\n".join(L) + "\n", start, end


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=None, help="images per pass (default 300; quick 60)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (default 5; quick 2)")
    ap.add_argument("--batch", type=int, default=32, help="batch size of the batched paths")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda[:k] to add the nvJPEG rows")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: per-core figures)")
    ap.add_argument("--quick", action="store_true", help="small smoke run")
    ap.add_argument("--no-doc", action="store_true", help="do not rewrite docs/benchmarks.md")
    ap.add_argument("--no-fmnist", action="store_true", help="skip the Fashion-MNIST top-1 agreement")
    a = ap.parse_args(argv)
    n = a.images or (60 if a.quick else 300)
    reps = a.reps or (2 if a.quick else 5)
    gpu = a.device.startswith("cuda")
    if gpu and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked, but torch sees no CUDA device")
    torch.set_num_threads(a.threads)
    from bench.loader import machine

    res: dict[str, Any] = new_record("decode", argv, RESULTS / "decode.json", quick=a.quick, threads=a.threads,
                                     batch=a.batch, device=a.device, machine=machine())
    if gpu:
        res["gpu"] = torch.cuda.get_device_name(torch.device(a.device))
    log(f"generating {n} photo-like JPEGs")
    blobs = photo_jpegs(n)
    res["images"], res["mean_kb"], res["reps"] = n, sum(map(len, blobs)) / n / 1024, reps
    runs = contenders(blobs, a.batch, a.device)
    order = list(runs)
    log("warm-up")
    for k in order:
        timed(runs[k], a.device)
    rep_results = []
    for r in range(reps):
        rot = order[r % len(order):] + order[:r % len(order)]
        rep = {k: timed(runs[k], a.device) for k in rot}
        rep_results.append({k: rep[k] for k in order})
        log(f"rep {r + 1}/{reps}: " + ", ".join(f"{k} {rep[k]['img_s_per_core']:.0f}" for k in order))
    res["raw"] = rep_results
    res["summary"] = summarize(rep_results)

    log("pixel agreement")
    import timm

    from quantcore.data import eval_transform
    from quantcore.data.decode import BatchDecoder, Encoded, as_uint8_tensor

    agree: dict[str, Any] = {}
    for mname, what in ((MODEL, "bilinear"), (MODEL_BICUBIC, "bicubic")):
        m = timm.create_model(mname, pretrained=False)
        tp, tn = eval_transform(m, decoder="pil"), eval_transform(m)
        agree[f"torchvision ({what}, `{mname}`)"] = {**agreement(tp, lambda b, i: tn.from_bytes(b, f"#{i}"), blobs,
                                                                 tp.config["std"]), "what": "photos"}
        if gpu:
            bd = BatchDecoder(tn, a.device)
            agree[f"nvJPEG + GPU transform ({what})"] = {
                **agreement(tp, lambda b, i: bd([Encoded(as_uint8_tensor(b), f"#{i}")])[0][0], blobs,
                            tp.config["std"]), "what": "photos"}
    res["agreement"] = agree
    if not a.no_fmnist:
        log("Fashion-MNIST top-1 agreement")
        res["fmnist"] = fmnist_agreement(200 if a.quick else 1000)
    res["loadavg_end"] = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    dev = "cuda" if gpu else "cpu"
    out = RESULTS / f"decode-{dev}{'-quick' if a.quick else ''}.json"
    res["results_file"] = str(out.relative_to(ROOT))
    RESULTS.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1, default=str))
    section, start, end = render(res, gpu)
    print(section)
    if not a.no_doc and not a.quick:
        write_section(section, start, end)
        log(f"wrote the {start} section of docs/benchmarks.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
