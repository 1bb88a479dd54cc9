"""The layout shows the pipeline, and no import runs back up it (docs/architecture.md).

Each module of ``ntkcompile`` belongs to a stage; a module may import modules of
its own stage or of earlier ones, never of a later one.  Checked on the source
(every ``import`` statement, also those inside functions), so a new module or a
new import is checked as soon as it exists.
"""
import ast
import pathlib

import pytest

import ntkcompile
from ntkcompile.passes import lower

ROOT = pathlib.Path(ntkcompile.__file__).parent

# The stages in pipeline order; a module's stage is the first component of its path.
STAGES = [
    {"errors", "resources"},
    {"ir"},
    {"trace", "export"},
    {"passes"},
    {"plan"},
    {"kernels"},
    {"codegen"},
    {"ops"},
    {"compiled", "diagnose", "tiling", "batched", "progress", "distinct"},
    {"parametrize", "empirical", "training", "stability"},
    {"blocks", "dynamics"},
    {"harness"},
    {"demo", "cli", "__init__", "__main__"},
]
RANK = {name: i for i, names in enumerate(STAGES) for name in names}
MAX_LINES = 600


def _modules():
    return sorted(p for p in ROOT.rglob("*.py"))


def _stage(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: pathlib.Path):
    """Stages of the ``ntkcompile`` modules that ``path`` imports, with their line numbers."""
    tree = ast.parse(path.read_text())
    package = path.relative_to(ROOT.parent).with_suffix("").parts[:-1]     # e.g. ("ntkcompile", "ops")
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = list(base) + (node.module.split(".") if node.module else [])
                names = [target] if node.module else [target + [a.name] for a in node.names]
            else:
                names = [node.module.split(".")] if node.module else []
        elif isinstance(node, ast.Import):
            names = [a.name.split(".") for a in node.names]
        else:
            continue
        for parts in names:
            if parts and parts[0] == "ntkcompile" and len(parts) > 1:
                yield parts[1], node.lineno


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_import_runs_back_up_the_pipeline(path):
    stage = _stage(path)
    assert stage in RANK, f"{path.name}: add its stage to STAGES (and to docs/architecture.md)"
    for imported, line in _imports(path):
        assert imported in RANK, f"{path.name}:{line} imports unknown ntkcompile.{imported}"
        assert RANK[imported] <= RANK[stage], (
            f"{path.relative_to(ROOT)}:{line} ({stage}) imports ntkcompile.{imported}, a later stage")


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_stay_small(path):
    assert len(path.read_text().splitlines()) <= MAX_LINES


def test_the_checker_sees_relative_and_function_level_imports(tmp_path):
    """The oracle itself: a later-stage import inside a function of an ir module is found."""
    fake = ROOT / "ir" / "_probe_for_test.py"
    fake.write_text("def f():\n    from ..kernels import planner\n    from . import nodes\n")
    try:
        found = list(_imports(fake))
    finally:
        fake.unlink()
    assert ("kernels", 2) in found and ("ir", 3) in found


def test_registering_a_rule_twice_is_an_error():
    with pytest.raises(ValueError, match="already registered"):
        lower.rule("relu")(lambda lw, node, x: x)
