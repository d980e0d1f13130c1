"""Names that go into Ray's metric tags: Ray encodes tag values as ASCII, and a non-ASCII value
raises inside its metrics code (in the Train controller, or in a sweep task's progress bar)."""
from __future__ import annotations


def ascii_tag(text: str, fallback: str) -> str:
    """``text`` with every character that is not printable ASCII replaced by ``_`` (``ray 1+ü`` ->
    ``ray 1+_``); ``fallback`` when nothing is left."""
    tag = "".join(c if c.isascii() and c.isprintable() else "_" for c in text).strip()
    return tag if tag.strip("_") else fallback
