"""One name -> object registry, used by every extension point (quantizer kinds, calibrators, model
families): registration refuses a name another class holds, lookup errors list what is registered."""
from __future__ import annotations

import re
import warnings
from typing import Generic, TypeVar

T = TypeVar("T")


#: a registered name: what recipes, encodings and checkpoints write (no spaces, ':' or '/')
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")


def _class_id(obj: object) -> tuple[str, str]:
    return type(obj).__module__, type(obj).__qualname__


class Registry(Generic[T]):
    """``what`` names the thing in messages (``"quantizer format"``); ``reserved`` names can't be taken;
    ``base``: the class every registered object must be an instance of."""

    def __init__(self, what: str, reserved: tuple[str, ...] = (), base: type | None = None) -> None:
        self.what, self.reserved, self.base = what, reserved, base
        self._items: dict[str, T] = {}

    def register(self, obj: T, *names: str) -> T:
        """Register ``obj`` under ``names`` (default: ``obj.name``). The same class (by module and
        qualified name) registering again replaces its entry, with a warning: a module reload, or a
        plug-in re-registering itself with other settings. ``ValueError`` naming the reason for an
        object that is not a ``base`` instance, an empty, malformed or reserved name, or a name another
        class holds."""
        if self.base is not None and not isinstance(obj, self.base):
            raise ValueError(f"{self.what}: {obj!r} is a {type(obj).__qualname__}, not a {self.base.__qualname__} "
                             f"(subclass {self.base.__module__}.{self.base.__qualname__})")
        for n in names or (getattr(obj, "name", ""),):
            if not isinstance(n, str) or not n:
                raise ValueError(f"{self.what} name {n!r}: empty (set the class's name attribute)")
            if not _NAME.fullmatch(n):
                raise ValueError(f"{self.what} name {n!r}: use letters, digits, '_', '.', '-' (it is written "
                                 "into recipes, encodings and checkpoints)")
            if n in self.reserved:
                raise ValueError(f"{self.what} name {n!r} is reserved")
            old = self._items.get(n)
            if old is not None and old is not obj:
                if _class_id(old) != _class_id(obj):
                    m, q = _class_id(old)
                    raise ValueError(f"{self.what} name {n!r} is already registered by {m}.{q}")
                warnings.warn(f"{self.what} {n!r}: {_class_id(obj)[0]}.{_class_id(obj)[1]} registered again; "
                              "the new instance replaces the old one", stacklevel=3)
            self._items[n] = obj
        return obj

    def unregister(self, name: str) -> None:
        """Remove ``name`` (tests; plug-ins that unload)."""
        self._items.pop(name, None)

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            extra = "".join(f" or {r!r}" for r in self.reserved)
            raise ValueError(f"unknown {self.what} {name!r} (registered: {self.names()}{extra}; a plug-in's: import "
                             f"the module that registers it first, the CLI: QUANTCORE_PLUGINS=module)") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def items(self) -> list[tuple[str, T]]:
        return list(self._items.items())
