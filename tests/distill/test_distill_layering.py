"""The Distiller itself sits on the trainers' floor (engine, models, nn, losses, ops); only the
ablation experiment behind ``pyamalgam distill`` (ablation*.py, command.py) also reads data sets,
metrics and trains a teacher (pyamalgam.teachers)."""
import ast
from pathlib import Path

import pyamalgam.distill

ROOT = Path(pyamalgam.distill.__file__).parent
BASE = {"_checks", "_io", "_extension", "_testing", "_interrupts", "distill"}
TRAINER = {"engine", "models", "nn", "losses", "ops"}
EXPERIMENT = {"ablation.py", "ablation_report.py", "command.py", "video_ablation.py", "video_report.py"}


def _imports(path: Path) -> set:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            if node.level == 1:
                found.add("distill")
            elif node.module:
                found.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pyamalgam."):
            found.add(node.module.split(".")[1])
    return found


def test_the_trainer_imports_only_the_trainer_floor():
    for path in ROOT.glob("*.py"):
        allowed = TRAINER | BASE | ({"data", "metrics", "teachers"} if path.name in EXPERIMENT else set())
        assert _imports(path) <= allowed, (path.name, sorted(_imports(path) - allowed))


def test_the_checker_sees_imports():
    assert {"engine", "models"} <= _imports(ROOT / "distiller.py") | _imports(ROOT / "setup.py")
    assert "teachers" in _imports(ROOT / "ablation.py")
