"""Imports point one way: the modules below the engine never import it back, lazily
(inside a function) or not. Read from the source with ast, so no import runs."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).parents[1] / "mixq"

# module -> modules it must never import (a prefix matches its submodules)
RULES = {
    "mixq.distributed.workers": ("mixq.engine.engine",),
    "mixq.engine.engine_config": ("mixq.engine.engine", "mixq.distributed.workers", "mixq.distributed.dp",
                                  "mixq.server"),
}


def imported_modules(module: str) -> set[str]:
    """Every module `module` imports anywhere in its file (absolute names)."""
    path = PKG.parent / (module.replace(".", "/") + ".py")
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the package
                base = ".".join(module.split(".")[: -node.level] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return found


@pytest.mark.parametrize("module", sorted(RULES))
def test_module_does_not_import_upwards(module):
    bad = sorted(m for m in imported_modules(module) for f in RULES[module] if m == f or m.startswith(f + "."))
    assert not bad, f"{module} imports {bad}"
