"""The shipped YAML configs (``configs/*.yaml``), installed as ``loctex.configs`` so that commands
find them from an installed package as well as from a checkout."""
from __future__ import annotations

from pathlib import Path

DIR = Path(__file__).resolve().parent


def path(name: str) -> Path:
    """The shipped config ``name`` (``embedded`` or ``embedded.yaml``)."""
    name = name if name.endswith((".yaml", ".yml")) else name + ".yaml"
    found = DIR / name
    if not found.is_file():
        shipped = ", ".join(sorted(p.name for p in DIR.glob("*.yaml")))
        raise FileNotFoundError(f"no shipped config {name!r} (shipped: {shipped})")
    return found


def names() -> list[str]:
    return sorted(p.stem for p in DIR.glob("*.yaml"))
