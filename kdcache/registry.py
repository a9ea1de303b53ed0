"""One registry for everything created by name (datasets, view policies, methods, teacher sources): a name
maps to an entry and its metadata; an unknown name is an error that lists the choices and the closest one.
Torch-free; imports nothing from kdcache."""
from __future__ import annotations

import difflib
from typing import Any, Callable, Iterator


def did_you_mean(name: str, names) -> str:
    """' (did you mean 'x'?)' for the closest of `names`, or ''."""
    close = difflib.get_close_matches(str(name), sorted(names), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class Registry:
    """name -> entry, with a dict of metadata per name. `kind` names what is registered in errors."""

    def __init__(self, kind: str, error: type[Exception] = ValueError):
        self.kind, self.error = kind, error
        self._entries: dict[str, Any] = {}
        self._meta: dict[str, dict] = {}

    def register(self, name: str, **meta: Any) -> Callable:
        """Decorator: `@REGISTRY.register("name", key=value)` records the decorated function or class."""

        def deco(entry):
            self.add(name, entry, **meta)
            return entry

        return deco

    def add(self, name: str, entry: Any, **meta: Any) -> None:
        self._entries[name] = entry
        self._meta[name] = meta

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def unknown(self, name: Any, what: str | None = None) -> Exception:
        """The error for a name that is not registered: the choices, and the closest one."""
        return self.error(f"unknown {what or self.kind} {name!r}; choose one of: {', '.join(self.names())}"
                          + did_you_mean(name, self.names()))

    def get(self, name: str, what: str | None = None) -> Any:
        """The entry of `name`; `what` names it in the error (e.g. `--method`)."""
        if name not in self._entries:
            raise self.unknown(name, what)
        return self._entries[name]

    def meta(self, name: str) -> dict:
        return self._meta.get(name, {})
