"""The floors of the README's Layout section hold: a package imports only from its own floor or
below (read from the source with ``ast``, so that a lazy import inside a function counts too)."""
import ast
import collections
from pathlib import Path

import pyamalgam

ROOT = Path(pyamalgam.__file__).parent
BASE = {"_checks", "_io", "_extension", "_testing", "_interrupts", "_flow"}  # _flow: the flow convention
# What each top-level module or package of pyamalgam may import (besides itself and BASE).
ALLOWED = {
    "data": set(),
    "metrics": set(),
    "ops": set(),
    "selfcheck": {"ops"},
    "nn": {"ops"},
    "losses": {"ops", "nn"},  # the holistic term holds its critic (nn.Discriminator)
    "models": {"ops", "nn", "losses"},
    "engine": set(),  # the training machinery knows no network, no loss, no data set
    "amalgamation": {"engine", "models", "nn", "losses", "ops", "distill"},  # structured.py: the Distiller's terms (same floor)
    "teachers": {"engine", "models", "nn", "losses", "ops", "data", "metrics"},  # a package: the trainer, its files, the command
    "report": {"metrics"},
    "demo": {"engine", "models", "nn", "losses", "ops", "data", "metrics", "amalgamation", "teachers", "report"},
    "distill": {"engine", "models", "nn", "losses", "ops", "data", "metrics", "teachers"},
    "multitask": {"engine", "models", "nn", "losses", "ops", "data", "metrics", "teachers", "amalgamation",
                  "distill"},  # a trainer and its table: the amalgamated row, distill's CLI argument types
    "deploy": {"engine", "models", "nn", "losses", "ops", "amalgamation", "teachers", "data", "cli"},
    "cli": {"demo", "teachers", "selfcheck", "data", "engine", "amalgamation", "distill", "deploy", "multitask"},
}


def _imports() -> dict:
    """Top-level module -> the pyamalgam top-level modules it imports."""
    graph = collections.defaultdict(set)
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        source, package = parts[0], list(parts[:-1])
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package[: len(package) - (node.level - 1)]
                target = base + (node.module.split(".") if node.module else [])
                graph[source].update([target[0]] if target else [a.name for a in node.names])
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pyamalgam."):
                graph[source].add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                graph[source].update(a.name.split(".")[1] for a in node.names if a.name.startswith("pyamalgam."))
    return graph


def test_every_package_imports_only_from_its_floor_or_below():
    graph = _imports()
    unknown = set(graph) - set(ALLOWED) - BASE - {"__init__", "__main__"}
    assert not unknown, f"new top-level modules {sorted(unknown)}: give them a floor in ALLOWED and the README"
    wrong = {src: sorted(deps - ALLOWED[src] - BASE - {src}) for src, deps in graph.items() if src in ALLOWED}
    assert not any(wrong.values()), {k: v for k, v in wrong.items() if v}


def test_the_checker_sees_imports():
    graph = _imports()
    assert {"engine", "models"} <= graph["amalgamation"] and "ops" in graph["losses"]
