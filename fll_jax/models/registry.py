"""Look-up by name with an error that lists the known names."""
from __future__ import annotations

from typing import Any, Mapping


def lookup(registry: Mapping, name: Any, kind: str) -> Any:
    """registry[name], or a ValueError naming the kind and listing the known names."""
    try:
        return registry[name]
    except (KeyError, TypeError):
        known = ", ".join(str(k) for k in registry)
        raise ValueError(f"unknown {kind} {name!r}; known: {known}") from None
