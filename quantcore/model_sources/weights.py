"""Weights files given as ``model.checkpoint`` on top of any source: safetensors (detected by suffix or by
its header) next to torch ``state_dict`` files. Read with the ``safetensors`` package."""
from __future__ import annotations

import torch

SAFETENSORS_SUFFIX = ".safetensors"


def is_safetensors(data: bytes, uri: str) -> bool:
    """True for a ``.safetensors`` name or content that starts like one: an 8-byte little-endian header
    length followed by a JSON object that fits in the file (torch.save zips start with ``PK``, pickles
    with ``0x80``, so neither matches)."""
    if uri.lower().endswith(SAFETENSORS_SUFFIX):
        return True
    if len(data) < 10:
        return False
    n = int.from_bytes(data[:8], "little")
    return data[8:9] == b"{" and 8 + n <= len(data)


def read_safetensors(data: bytes, uri: str) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file's bytes (on CPU); ModelError naming ``uri`` when unreadable."""
    from safetensors.torch import load

    from ..models import ModelError

    try:
        return load(data)
    except Exception as err:  # SafetensorError / header errors: say which file
        why = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ModelError(f"model.checkpoint {uri}: not a readable safetensors file ({why})") from None
