"""Imports point one way across the packages: server -> engine -> models -> layers ->
kernels, with config/formats below the layers and nothing outside the front ends importing
the server (the data-parallel front is mixq.server.dp; a replica process,
mixq.distributed.replica, knows nothing of the server). Read from the source with ast,
lazy imports inside functions included, so no import runs."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).parents[1] / "mixq"

# the chain, lowest first: a package never imports one to its right
CHAIN = ("errors", "config", "formats", "kernels", "layers", "models", "engine", "server")
# the front ends: the only importers of mixq.server
FRONT = {"server", "cli", "launch_server", "__main__"}


def _area(module: str) -> str:
    """mixq.engine.scheduler -> engine; mixq.cli -> cli."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def import_edges() -> list[tuple[str, str]]:
    """(importing module, imported mixq module) for every import in every mixq file."""
    edges = []
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG.parent).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        package = module if rel.name == "__init__" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolve against the importing package
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                names = [base]
            else:
                continue
            edges += [(module, n) for n in names if n == "mixq" or n.startswith("mixq.")]
    return edges


def test_the_edges_are_read():
    """The scan sees the imports it must judge (a scan that finds nothing passes anything)."""
    edges = set(import_edges())
    assert ("mixq.server.dp", "mixq.distributed.replica") in edges
    assert ("mixq.server.launch", "mixq.server.dp") in edges  # a lazy import, inside serve()
    assert ("mixq.models.llama", "mixq.layers.linear") in edges


def test_chain_points_down():
    rank = {a: i for i, a in enumerate(CHAIN)}
    bad = [(m, n) for m, n in import_edges()
           if _area(m) in rank and _area(n) in rank and rank[_area(n)] > rank[_area(m)]]
    assert not bad, "imports pointing up the chain " + " -> ".join(CHAIN) + f": {bad}"


def test_only_front_ends_import_the_server():
    bad = [(m, n) for m, n in import_edges() if _area(n) == "server" and _area(m) not in FRONT]
    assert not bad, f"modules below the server importing it: {bad}"
