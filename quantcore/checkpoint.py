"""Calibrated checkpoints: weights + quantizer state + recipe + versions, safe to load.

The file is a plain ``torch.save`` of tensors and JSON-like values only, so it is read with
``torch.load(weights_only=True)`` (no pickled code). A SHA-256 digest over every tensor and every
metadata value detects tampering or corruption before anything reaches the model.
"""
from __future__ import annotations

import hashlib
import io
import json
from typing import Any

import torch
from torch import nn

from .errors import UserError

CHECKPOINT_FORMAT = "quantcore.checkpoint"
CHECKPOINT_VERSION = 1


class CheckpointError(UserError):
    """A checkpoint is unreadable, tampered with, or does not match the model."""


def _digest(meta: dict[str, Any], state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def checkpoint_bytes(model: nn.Module, meta: dict[str, Any]) -> bytes:
    """Serialize ``model.state_dict()`` with ``meta`` (JSON-like values only) and a digest."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    meta = json.loads(json.dumps(meta, default=str))  # only JSON types reach the file
    payload = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, "meta": meta,
               "state_dict": state, "sha256": _digest(meta, state)}
    buf = io.BytesIO()
    torch.save(payload, buf)
    return buf.getvalue()


def _load_failure(data: bytes, err: Exception) -> str:
    """One line on why ``torch.load`` refused ``data`` (torch's own text spans many lines and advises
    ``weights_only=False``, which a file that fails here must never be loaded with)."""
    if data[:4] != b"PK\x03\x04":  # torch.save's zip archive
        return f"not a PyTorch archive: it starts with {data[:12]!r}"
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    told = [line for line in lines if not line.startswith(("Weights only load failed", "Check the documentation"))]
    cause = (told or lines or [""])[0].split(". ")[0].rstrip(".")
    return f"{type(err).__name__}: {cause[:200]}"


def read_checkpoint(data: bytes, source: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Parse and verify; returns (meta, state_dict). Errors name ``source``."""
    if not data:
        raise CheckpointError(f"checkpoint {source} is empty (0 bytes): an interrupted copy?")
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"checkpoint {source} is corrupted or not a quantcore checkpoint "
                              f"({_load_failure(data, err)}); quantcore checkpoints are the model.qc.pt "
                              "files that calibrate, ptq and qat write") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {source} is not a quantcore checkpoint")
    if payload.get("format_version", 0) > CHECKPOINT_VERSION:
        raise CheckpointError(f"checkpoint {source} has format version {payload['format_version']}, newer "
                              f"than this quantcore reads ({CHECKPOINT_VERSION})")
    meta, state = payload.get("meta"), payload.get("state_dict")
    if not isinstance(meta, dict) or not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {source} lacks meta or state_dict")
    if _digest(meta, state) != payload.get("sha256"):
        raise CheckpointError(f"checkpoint {source} failed its SHA-256 check: the file was modified or "
                              "corrupted after it was written")
    return meta, state


def load_state_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches: another architecture or width
        first = str(err).strip().splitlines()
        detail = "; ".join(line.strip() for line in first[1:4]) or first[0]
        raise CheckpointError(f"checkpoint {source} does not fit the model: {detail}") from None
    if missing or unexpected:
        def few(keys: list[str]) -> str:
            return ", ".join(keys[:6]) + (f" (+{len(keys) - 6} more)" if len(keys) > 6 else "")

        raise CheckpointError(f"checkpoint {source} does not match the model built from its recipe: "
                              f"missing keys [{few(list(missing))}], unexpected keys [{few(list(unexpected))}]")
    refresh_eval_caches(model)


def refresh_eval_caches(model: nn.Module) -> None:
    """Drop what modules cached from their old weights, keeping every module's train/eval flag.

    Some modules cache tensors derived from parameters in eval mode and drop them when put in train
    mode (HF ``LevitAttention``'s relative-position biases): placement's probe forward fills that
    cache from the weights the model was built with, so weights loaded afterwards were not used.
    ``train()`` is the modules' own way to invalidate; the flags are then restored as they were."""
    modes = [(m, m.training) for m in model.modules()]
    model.train(True)
    for m, t in modes:
        m.training = t
