"""One name -> object registry, used by every extension point (quantizer kinds, calibrators, model
families): registration refuses a name another class holds, lookup errors list what is registered."""
from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """``what`` names the thing in messages (``"quantizer format"``); ``reserved`` names can't be taken."""

    def __init__(self, what: str, reserved: tuple[str, ...] = ()) -> None:
        self.what, self.reserved = what, reserved
        self._items: dict[str, T] = {}

    def register(self, obj: T, *names: str) -> T:
        """Register ``obj`` under ``names`` (default: ``obj.name``). Re-registering an instance of the
        same class is allowed (module reloads); ``ValueError`` for an empty, reserved or taken name."""
        for n in names or (getattr(obj, "name", ""),):
            old = self._items.get(n)
            if not n or n in self.reserved or (old is not None and type(old) is not type(obj)):
                raise ValueError(f"{self.what} name {n!r} is empty, reserved or already registered")
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
            raise ValueError(f"unknown {self.what} {name!r} (registered: {self.names()}{extra})") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def items(self) -> list[tuple[str, T]]:
        return list(self._items.items())
