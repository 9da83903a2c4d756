"""The code's layout: imports go one way, and no module or function grows past its size.

Packages, lowest first: ``tiling``, ``clustering``, ``viz`` (never import wsi_explain), then inside
``wsi_explain``: ``core`` <- ``io``, ``explain`` <- ``metrics`` <- ``selftest``, ``report`` <- ``stages`` <- ``demo``
<- the CLI. Imports are read from the source with ``ast`` (also the ones inside functions), so a
lazy import cannot sneak past.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "wsi_explain"

# what each part of wsi_explain may import from the others
ALLOWED = {
    "core": set(),
    "io": {"core"},
    "explain": {"core"},
    "metrics": {"core", "explain"},
    "report": {"core", "io"},
    "selftest": {"core", "io", "explain", "metrics"},
    "stages": {"core", "io", "explain", "metrics", "report", "selftest"},
    "demo": {"core", "io", "explain", "stages"},
}
# inside stages/, a stage imports no other stage (shared pieces live in io/explain/core) but the
# per-slide driver; only the pipeline runs them all, and the score stage has its sampler beside it
STAGE_PEERS = {
    "pipeline": "*",
    "score": {"score_sample", "score_confounders", "driver"},
    "extract": {"extract_attributions", "driver"},
    # the self-test runs the audit's stages on its planted cohorts
    "selftest": {"tile", "extract", "cluster", "driver"},
}
SHARED_STAGE_MODULES = {"driver"}
# about 400 lines a module and 60 a function, as ruff format lays the code out
MAX_MODULE_LINES = 420
# lines of a function's body after its docstring (the CLI's option lists are in signatures)
MAX_FUNCTION_LINES = 60


def _imports(path: Path) -> list[str]:
    """Absolute module names imported by ``path`` (relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    parts = parts[:-1]  # the package the module is in (for __init__.py: the package itself)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = parts[: len(parts) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
                names = [f"{mod}.{a.name}" for a in node.names] if not node.module else [mod]
                out += names
            elif node.module:
                out.append(node.module)
                out += [f"{node.module}.{a.name}" for a in node.names if node.module == "wsi_explain"]
    return out


def _part(module: str) -> str | None:
    bits = module.split(".")
    if bits[0] != "wsi_explain" or len(bits) < 2:
        return None
    return bits[1] if bits[1] in ALLOWED else "top"


def _modules(root: Path):
    return sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_module_sits_in_a_known_part():
    top = {p.name for p in PKG.glob("*.py")}
    assert top == {"__init__.py"}, f"modules loose in wsi_explain/: {sorted(top - {'__init__.py'})}"
    dirs = {p.name for p in PKG.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert dirs <= set(ALLOWED) | {"cli"}, dirs - set(ALLOWED)


@pytest.mark.parametrize("part", sorted(ALLOWED))
def test_imports_go_one_way(part):
    bad = []
    for path in _modules(PKG / part):
        for mod in _imports(path):
            target = _part(mod)
            if target is None or target == part:
                continue
            if target not in ALLOWED[part]:
                bad.append(f"{path.relative_to(REPO)} imports {mod} ({part} -> {target})")
    assert not bad, "\n".join(bad)


def test_stages_do_not_import_each_other():
    bad = []
    for path in _modules(PKG / "stages"):
        allowed = STAGE_PEERS.get(path.stem, SHARED_STAGE_MODULES)
        for mod in _imports(path):
            bits = mod.split(".")
            if bits[:2] == ["wsi_explain", "stages"] and len(bits) > 2 and bits[2] != path.stem:
                if allowed != "*" and bits[2] not in allowed:
                    bad.append(f"{path.relative_to(REPO)} imports {mod}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("pkg", ["tiling", "clustering", "viz"])
def test_lower_packages_never_import_wsi_explain(pkg):
    bad = [
        f"{p.relative_to(REPO)}: {m}"
        for p in _modules(REPO / pkg)
        for m in _imports(p)
        if m.split(".")[0] == "wsi_explain"
    ]
    assert not bad, bad


def test_the_checker_sees_a_violation(tmp_path):
    """The rules above can fail: a core module importing a stage, lazily, is caught."""
    fake = PKG / "core" / "_layout_probe.py"
    fake.write_text("def f():\n    from wsi_explain.stages.tile import run_tile_stage\n    from ..io import slides\n")
    try:
        mods = _imports(fake)
        assert "wsi_explain.stages.tile" in mods and "wsi_explain.io" in mods
        assert {_part(m) for m in mods} >= {"stages", "io"}
    finally:
        fake.unlink()


def _body_start(node) -> int:
    """First line of a function's code after its docstring."""
    first = node.body[0]
    doc = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str)
    return node.body[1].lineno if doc and len(node.body) > 1 else first.lineno


def test_modules_and_functions_stay_small():
    long_modules, long_functions = [], []
    for root in ("wsi_explain", "tiling", "clustering", "viz"):
        for path in _modules(REPO / root):
            text = path.read_text()
            if text.count("\n") > MAX_MODULE_LINES:
                long_modules.append(f"{path.relative_to(REPO)}: {text.count(chr(10))} lines")
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    n = node.end_lineno - _body_start(node) + 1
                    if n > MAX_FUNCTION_LINES:
                        long_functions.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {n} lines")
    assert not long_modules, long_modules
    assert not long_functions, long_functions
