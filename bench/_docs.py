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
