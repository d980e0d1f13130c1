"""Shared by the benchmarks: each one owns a marked section of docs/benchmarks.md."""
from __future__ import annotations

import os
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def write_section(section: str, start: str, end: str, path: Path = DOC) -> None:
    """Replace the text between ``start`` and ``end`` (the section includes both markers), append it
    if absent, and leave every other section as it is. Written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        text = path.read_text()
        if start in text and end in text:
            a, b = text.index(start), text.index(end) + len(end)
            text = text[:a] + section.rstrip("\n") + text[b:]
        else:
            text = text.rstrip("\n") + "\n\n" + section
    else:
        text = ("# Benchmarks\n\nEach `##` section is written by its benchmark script under `bench/` "
                "(see `bench/README.md`); a script rewrites only its own section.\n\n" + section)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def markers(bench: str, device: str = "cpu") -> tuple[str, str]:
    """The start/end markers of ``bench``'s section for a run on ``device`` (``cpu``, ``cuda``,
    ``cuda:1``): GPU runs own ``bench:NAME-gpu``, so a GPU run never overwrites the CPU figures."""
    tag = bench if str(device).split(":")[0] == "cpu" else f"{bench}-gpu"
    return f"<!-- bench:{tag}:start -->", f"<!-- bench:{tag}:end -->"


def write_marked(section: str, path: Path = DOC) -> None:
    """:func:`write_section` into the section whose start marker opens ``section`` (the CPU or GPU
    one, :func:`markers`): the renderer chose it, so writers need not work it out again."""
    start = section.split("\n", 1)[0]
    write_section(section, start, start.replace(":start -->", ":end -->"), path)


def loadavg() -> str:
    """The 1/5/15-minute load averages, for the record of how busy the machine was."""
    return ", ".join(f"{x:.1f}" for x in os.getloadavg())


def new_record(bench: str, argv: list[str] | None, results_file: Path, **fields) -> dict:
    """The common head of a benchmark's results: command line, UTC date, load at the start."""
    import datetime as _dt
    import sys

    return {"command": " ".join([f"python -m bench.{bench}", *(sys.argv[1:] if argv is None else argv)]).rstrip(),
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "loadavg_start": loadavg(), "results_file": _rel(results_file), **fields}


def _rel(p: Path) -> str:
    try:
        return str(p.resolve().relative_to(DOC.parent.parent))
    except ValueError:
        return str(p)


def finish(res: dict, t0: float, render, results_file: Path, write_doc, no_write: bool, log=None,
           before_render=None) -> int:
    """The common tail: load at the end, wall time, render; then either print only (``no_write``) or
    write the JSON results and the doc section and print. Returns the exit status 0."""
    import json
    import time

    res["loadavg_end"] = loadavg()
    res["wall_s"] = time.perf_counter() - t0
    if before_render is not None:
        before_render(res)
    section = render(res)
    if no_write:
        print(section)
        return 0
    results_file.parent.mkdir(parents=True, exist_ok=True)
    results_file.write_text(json.dumps(res, indent=1, default=str) + "\n")
    write_doc(section)
    print(section)
    if log is not None:
        log(f"wrote {_rel(results_file)} and {_rel(DOC)} ({res['wall_s']:.0f}s)")
    return 0


def demo_store(store: str = "demo-store") -> tuple[str, str]:
    """``(data_uri, fp32_weights_uri)`` of the demo: packs Fashion-MNIST and installs the shipped demo
    ViT in ``store`` unless they are there already (what ``scripts/setup.sh demo`` leaves behind)."""
    from quantcore.demo import prepare_demo

    plan = prepare_demo(store, log=lambda m: print(m, flush=True))
    return plan.data_uri, plan.model_uri
