"""The layering rules of ARCHITECTURE.md, checked on every import in the package (top level or in a function)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mllm"
SCAFFOLDING = {"cli", "bench", "demo", "testing"}
"""Layers above the library: commands, benchmarks, the demo, test fixtures. The library imports none of them."""

# room → rooms (top-level names under mllm, or "deepspeed") it must never import.
FORBIDDEN: dict[str, set[str]] = {
    "__init__": {"train", "deepspeed"} | SCAFFOLDING,
    "__main__": set(),
    "config": {"*"},
    "registry": {"*"},
    "data": {"model", "vision", "connectors", "train", "inference", "eval", "export", "deepspeed"}
    | SCAFFOLDING,
    "vision": {"model", "connectors", "train", "inference", "eval", "export", "deepspeed"} | SCAFFOLDING,
    "connectors": {"model", "vision", "data", "train", "inference", "eval", "export", "deepspeed"}
    | SCAFFOLDING,
    "model": {"train", "inference", "eval", "export", "deepspeed"} | SCAFFOLDING,
    "checkpoint": {"train", "inference", "eval", "export", "deepspeed"} | SCAFFOLDING,
    "train": {"inference", "eval", "export"} | SCAFFOLDING,
    "inference": {"train", "deepspeed"} | SCAFFOLDING,
    "eval": {"train", "deepspeed"} | SCAFFOLDING,
    "export": {"train", "inference", "deepspeed"} | SCAFFOLDING,
    "fetch": {"*"},
    "fingerprint": {"*"},
    "testing": {"train", "deepspeed"} | (SCAFFOLDING - {"testing"}),
    "serve": {"train", "deepspeed"} | SCAFFOLDING,
    "harness": {"train", "deepspeed"} | SCAFFOLDING,
    "cli": set(),
    "bench": set(),
    "demo": set(),
}
DEEPSPEED_HOME = "train/distributed.py"


def imported_rooms(path: Path, source: str | None = None) -> set[str]:
    """Top-level mllm rooms (and 'deepspeed') that `path` (under mllm/) imports, relative imports resolved."""
    rel = path.relative_to(PACKAGE)
    source = path.read_text() if source is None else source
    rooms: set[str] = set()
    for node in ast.walk(ast.parse(source, filename=str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                base = list(rel.parent.parts)[: len(rel.parent.parts) - (node.level - 1)]
                names = [".".join(["mllm", *base, *([node.module] if node.module else [])])]
            else:
                names = [node.module or ""]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "deepspeed":
                rooms.add("deepspeed")
            elif parts[0] == "mllm" and len(parts) > 1:
                rooms.add(parts[1])
    return rooms


def room_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def package_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_room_is_in_the_table():
    unknown = {room_of(p) for p in package_files()} - set(FORBIDDEN)
    assert not unknown, f"new top-level room(s) {sorted(unknown)}: add them to FORBIDDEN and ARCHITECTURE.md"


@pytest.mark.parametrize("path", package_files(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_follow_the_layers(path: Path):
    room = room_of(path)
    rooms = imported_rooms(path) - {room}
    forbidden = FORBIDDEN.get(room, set())
    bad = rooms if "*" in forbidden else rooms & forbidden
    assert not bad, (
        f"mllm/{path.relative_to(PACKAGE)} ({room}) imports {sorted(bad)}, which ARCHITECTURE.md forbids"
    )


def test_only_one_module_knows_deepspeed():
    users = [str(p.relative_to(PACKAGE)) for p in package_files() if "deepspeed" in imported_rooms(p)]
    assert users == [DEEPSPEED_HOME], users


def test_the_rule_catches_a_violation():
    """The checker itself: imports inside a function, and relative ones, are seen."""
    fake = PACKAGE / "model" / "probe.py"
    source = (
        "def f():\n    from mllm.train import loop\n    import deepspeed\n    from ..inference import x\n"
    )
    assert imported_rooms(fake, source) == {"train", "deepspeed", "inference"}
    assert imported_rooms(fake, source) <= FORBIDDEN[room_of(fake)]
