"""The pydantic base of every declarative section (recipes, quantizer specs, reconstruction, sweeps).

Pure data: no torch import (:mod:`quantcore.recon.config` and the sweep file use it too).
"""
from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel, ValidationInfo, field_validator


def wants_number(annotation: Any) -> bool:
    """Whether a field annotation takes an int or float and no bool (``int | None``, ``Annotated[float, ...]``)."""
    seen: set[Any] = set()

    def walk(t: Any) -> None:
        if t in seen:
            return
        seen.add(t)
        origin = typing.get_origin(t)
        if origin in (typing.Union, types.UnionType) or origin is typing.Annotated:
            for a in typing.get_args(t)[: 1 if origin is typing.Annotated else None]:
                walk(a)

    walk(annotation)
    return bool(seen & {int, float}) and bool not in seen


class Section(BaseModel):
    """Refuses YAML's ``true``/``false`` where a number is expected: pydantic's lax mode reads them as 1/0, so
    ``bits: true`` was told "should be >= 2" and ``percentile: true`` was accepted as 1 %."""

    @field_validator("*", mode="before")
    @classmethod
    def _number_not_boolean(cls, v: Any, info: ValidationInfo) -> Any:
        if isinstance(v, bool) and info.field_name is not None and wants_number(cls.model_fields[info.field_name].annotation):
            raise ValueError(f"{str(v).lower()} is a boolean (true/false); give a number")
        return v
