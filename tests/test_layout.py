"""The package's floors: which wing may import which (README "How the code is laid out").

Read from the source with `ast` (every import, at module top or inside a function), so a
new import that breaks the layering fails here, not in a review.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "llava_jax"

# Wing -> the wings it may import (itself always). Arrows point down:
# tree <- models <- data <- checkpoint / sharding <- training / inference <- evaluation <- CLIs.
ALLOWED = {
    "tree": set(),
    "models": {"tree"},  # tree.py: nested-dict helpers, imports nothing of ours
    "data": set(),
    "sharding": {"tree"},
    "checkpoint": {"tree", "models", "data"},
    "convert": {"tree", "models", "data", "checkpoint"},
    "training": {"tree", "models", "data", "sharding", "checkpoint", "convert.projector"},
    "inference": {"tree", "models", "data"},
    "evaluation": {"tree", "models", "data", "checkpoint", "inference"},
    # The HTTP server (FastAPI app, request checking, CLI) over inference's engine.
    "serve": {"tree", "models", "data", "checkpoint", "inference"},
    # LLM-written instruction data: the data wing's constants and the OpenAI-compatible client
    # (jax-free) that the LLaVA-Bench judge uses too; nothing else of evaluation/.
    "datagen": {"data", "evaluation.openai_client", "evaluation.jsonl"},
}
# Command lines, the benchmarks and the package's lazy entry points may import anything.
UNRESTRICTED = {"train", "eval", "chat", "memory_plan", "bench", "__init__", "_moved"}
MAX_LINES = 600


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path, path.relative_to(PACKAGE).with_suffix("").parts


def _imports(path: Path) -> set[str]:
    """Every `llava_jax.X[.Y]` a module imports, as "X" or "X.Y" (relative to the package)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name.removeprefix("llava_jax.") for name in names if name.startswith("llava_jax.")}


def _wing(parts: tuple[str, ...]) -> str:
    return parts[0]


def _allowed(wing: str, target: str) -> bool:
    target_wing = target.split(".")[0]
    if target_wing == wing:
        return True
    return any(target == rule or target.startswith(rule + ".") or target_wing == rule
               for rule in ALLOWED[wing])


def test_every_wing_is_known():
    wings = {_wing(parts) for _, parts in _modules()}
    assert wings <= set(ALLOWED) | UNRESTRICTED, wings - set(ALLOWED) - UNRESTRICTED


@pytest.mark.parametrize("path,parts", list(_modules()), ids=lambda v: "/".join(v)
                         if isinstance(v, tuple) else "")
def test_imports_point_down(path, parts):
    wing = _wing(parts)
    if wing in UNRESTRICTED:
        return
    if parts == ("convert", "__main__"):
        return  # the conversion CLI
    wrong = sorted(target for target in _imports(path) if not _allowed(wing, target))
    assert not wrong, f"llava_jax/{'/'.join(parts)}.py ({wing}) imports {wrong}"


def test_only_clis_and_the_projector_path_import_convert():
    importers = set()
    for path, parts in _modules():
        if _wing(parts) in ("convert", *UNRESTRICTED):
            continue
        targets = {t for t in _imports(path) if t.split(".")[0] == "convert"}
        if any(not t.startswith("convert.projector") for t in targets):
            importers.add("/".join(parts))
    assert not importers, f"import llava_jax.convert beyond its projector I/O: {importers}"


def test_no_module_is_too_long():
    long = {"/".join(parts): n for path, parts in _modules()
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by concern): {long}"
