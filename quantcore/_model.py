"""The pydantic base of every declarative section (recipes, quantizer specs, reconstruction, sweeps).

Pure data: no torch import (:mod:`quantcore.recon.config` and the sweep file use it too).
"""
from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel, ValidationInfo, field_validator

_SEQUENCES = (list, tuple, set, frozenset)


def _kinds(annotation: Any) -> tuple[set[Any], set[Any]]:
    """The scalar types a field annotation takes, itself and as items of a list/tuple/set: ``(scalars, items)``.
    A ``Literal`` of numbers counts as ``int``/``float``."""
    scalars: set[Any] = set()
    items: set[Any] = set()

    def walk(t: Any, into: set[Any]) -> None:
        origin = typing.get_origin(t)
        args = typing.get_args(t)
        if origin in (typing.Union, types.UnionType):
            for a in args:
                walk(a, into)
        elif origin is typing.Annotated:
            walk(args[0], into)
        elif origin is typing.Literal:
            into.update(type(a) for a in args)
        elif origin in _SEQUENCES:
            for a in args:
                if a is not Ellipsis:
                    walk(a, items)
        else:
            into.add(t)

    walk(annotation, scalars)
    return scalars, items


def wants_number(annotation: Any) -> bool:
    """Whether a field annotation takes an int or float and no bool (``int | None``, ``Literal[1]``)."""
    scalars, _ = _kinds(annotation)
    return bool(scalars & {int, float}) and bool not in scalars


def wants_numbers(annotation: Any) -> bool:
    """Whether a field annotation takes a list/tuple of ints or floats and no bools (``tuple[float, float]``)."""
    _, items = _kinds(annotation)
    return bool(items & {int, float}) and bool not in items


class Section(BaseModel):
    """Refuses YAML's ``true``/``false`` where a number is expected, alone or in a list: pydantic's lax mode
    reads them as 1/0, so ``bits: true`` was told "should be >= 2", ``percentile: true`` was accepted as
    1 % and ``betas: [true, 0.999]`` as (1.0, 0.999)."""

    @field_validator("*", mode="before")
    @classmethod
    def _number_not_boolean(cls, v: Any, info: ValidationInfo) -> Any:
        if info.field_name is None:
            return v
        ann = cls.model_fields[info.field_name].annotation
        if isinstance(v, bool) and wants_number(ann):
            raise ValueError(f"{str(v).lower()} is a boolean (true/false); give a number")
        if isinstance(v, _SEQUENCES) and any(isinstance(e, bool) for e in v) and wants_numbers(ann):
            raise ValueError("a boolean (true/false) in a list of numbers; give numbers")
        return v
