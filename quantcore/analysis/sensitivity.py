"""Sensitivity: what quantizing one group alone, or keeping it alone in float, does to the output."""
from __future__ import annotations

import time
from typing import Any, Iterable

from torch import nn

from .engine import Engine
from .groups import make_groups


def sensitivity(model: nn.Module, batches: Iterable | Engine, groups: Any = "module", workers: int = 1,
                progress=None, errors: dict[str, Any] | None = None) -> dict[str, Any]:
    """For every group (see :func:`~.groups.make_groups`): the metrics of ``alone_quantized`` (only
    that group acts, everything else float) and ``alone_float`` (everything acts except that group),
    each against FP32 (top-1 / ``delta_top1`` with labels, ``agreement`` %, ``kl`` nats per sample,
    ``sqnr_db``, ``cosine``), plus ``model`` (the model as given).

    ``ranking``: groups by how much keeping them float helps (KL of the model minus KL with the group
    float, largest first) -- the most sensitive first. Two (prefix-reused) forwards per group and
    batch; configurations are split over ``workers`` processes or the ranks of an active process
    group (:meth:`Engine.evaluate`). Raises :class:`~quantcore.errors.UserError` for an unknown
    grouping or a glob matching nothing (naming ``groups``)."""
    t0 = time.perf_counter()
    eng = batches if isinstance(batches, Engine) else Engine(model, batches)
    eng.require_quantized()
    grp = make_groups(eng, groups)
    reuse = (errors or {}).get("groups") or {}
    if {g: r["quantizers"] for g, r in reuse.items()} != grp:
        reuse = {}
    configs: dict[str, dict] = {"__base__": {}}
    for g, members in grp.items():
        mset = set(members)
        if not reuse:
            configs[f"q:{g}"] = {n: None for n in eng.active if n not in mset}
        configs[f"f:{g}"] = {n: None for n in members}
    m = eng.evaluate(configs, workers=workers, progress=progress)
    for g in reuse:
        m[f"q:{g}"] = reuse[g]["isolated"]
    base = m["__base__"]
    out = {g: {"quantizers": members, "alone_quantized": m[f"q:{g}"], "alone_float": m[f"f:{g}"],
               "kl_gain": base["kl"] - m[f"f:{g}"]["kl"]} for g, members in grp.items()}
    ranking = sorted(out, key=lambda g: -out[g]["kl_gain"])
    return {"model": base, "groups": out, "ranking": ranking,
            "group_by": groups if isinstance(groups, str) else list(groups), "workers": workers,
            "images": sum(x.shape[0] for x, _ in eng.batches), "seconds": time.perf_counter() - t0}
