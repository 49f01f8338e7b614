"""The package's imports point one way: lower layers never import higher ones.

Read with `ast` (nothing is imported). The rules are ARCHITECTURE.md's: models and data know
nothing above them; infra knows no stage; stages never import each other's training code;
inference composes stages' artefacts; pipeline composes everything; no library module imports
a command-line entry point.
"""

import ast
import shutil
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "meg_jax"
STAGES = ("encoder", "router", "collect", "diffusion")
ABOVE_STAGES = ("inference", "evaluation", "baselines", "pipeline", "train", "evaluate", "plan")
# (importer prefix, forbidden prefix)
RULES = (
    *[("models", x) for x in ("checkpoints", "data", "infra", *STAGES, *ABOVE_STAGES)],
    *[("data", x) for x in ("models", "checkpoints", *STAGES, *ABOVE_STAGES)],
    *[("infra", x) for x in ("models", "data", "checkpoints", *STAGES, *ABOVE_STAGES)],
    *[("checkpoints", x) for x in (*STAGES, *ABOVE_STAGES)],
    *[(s, x) for s in STAGES for x in ABOVE_STAGES],
    *[(s, f"{t}.train") for s in STAGES for t in STAGES if s != t],
    ("diffusion", "encoder"),
    ("diffusion", "router"),
    ("router", "encoder"),
    *[
        ("inference", x)
        for x in ("evaluation", "baselines", "pipeline", "train", "evaluate", "plan")
    ],
    *[("evaluation", x) for x in ("baselines", "pipeline", "train", "evaluate", "plan")],
    *[("baselines", x) for x in ("pipeline", "train", "evaluate", "plan", *STAGES)],
    *[("pipeline", x) for x in ("train", "evaluate", "plan")],
)


def _module(path: Path, root: Path) -> str:
    parts = [p for p in path.relative_to(root).with_suffix("").parts if p != "__init__"]
    return ".".join(parts)


def _imports(path: Path, root: Path) -> set[str]:
    here = _module(path, root).split(".")
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                keep = len(here) - node.level + (1 if path.name == "__init__.py" else 0)
                mod = ".".join(["meg_jax", *here[:keep], *([node.module] if node.module else [])])
            else:
                mod = node.module or ""
            out |= {mod} | {f"{mod}.{a.name}" for a in node.names}
    return {m.removeprefix("meg_jax.") for m in out if m.startswith("meg_jax.")}


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def violations(root: Path) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        src = _module(path, root)
        for dst in sorted(_imports(path, root)):
            for low, high in RULES:
                if _under(src, low) and _under(dst, high):
                    found.append(f"{path.relative_to(root.parent)}: {src} imports {dst}")
    return found


def test_imports_point_one_way():
    assert violations(PACKAGE) == []


@pytest.mark.parametrize(
    "module, line",
    [
        ("data/records.py", "from meg_jax.evaluation.metrics import percent"),
        ("models/decoder.py", "from meg_jax.infra.files import write_json_atomic"),
        ("router/gate.py", "from meg_jax.encoder.train import train_infonce"),
        ("inference/runner.py", "from meg_jax.pipeline import run"),
        ("diffusion/train.py", "from ..pipeline.config import PipelineConfig"),
    ],
)
def test_a_back_pointing_import_is_caught(tmp_path, module, line):
    copy = tmp_path / "meg_jax"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / module
    target.write_text(target.read_text() + f"\n{line}\n")
    assert any(module.replace("/", ".").removesuffix(".py") in v for v in violations(copy))
