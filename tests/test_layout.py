"""The import direction README's "How the code is laid out" promises, checked on the source (AST), not by hand.

Every library module has a pipeline stage; a module may import its own stage or an earlier one, never a later one.
Function-level (lazy) imports count too. The CLI, ``compare`` and the integrations sit on top: no library module
imports them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "diffora"

#: modules every stage may use (errors, lazy public names, seeds/threads, atomic files, checkpoints)
UTILITIES = (
    "diffora",
    "diffora.errors",
    "diffora.lazy",
    "diffora.runtime",
    "diffora.store.io",
    "diffora.store.checkpoint",
)

#: pipeline order; a module's stage is the first entry that is it or one of its packages
STAGES = (
    "diffora.method.candidates",
    "diffora.select.quota",
    "diffora.select.strategies",
    "diffora.method.config",
    "diffora.method.gates",
    "diffora.method.second_order",
    "diffora.method.parallel",
    "diffora.method.schedule",
    "diffora.method",  # the search and its helpers
    "diffora.select",  # what a finished search keeps, and the ranks
    "diffora.method.export",
    "diffora.method.handoff",  # search -> fine-tune: the carried optimiser state and schedule
    "diffora.store",
    "diffora.train",
    "diffora.evaluation",
    "diffora.data",
    "diffora.integrations",
    ("diffora.cli", "diffora.compare"),  # the two front ends: the CLI dispatches `diffora compare`
)
TOP_LEVEL = ("diffora.integrations", "diffora.cli", "diffora.compare")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def stage(module: str) -> int:
    # longest match first, so "diffora.method.export" is not read as "diffora.method"
    matches = [
        (len(prefix), i)
        for i, entry in enumerate(STAGES)
        for prefix in ((entry,) if isinstance(entry, str) else entry)
        if module == prefix or module.startswith(prefix + ".")
    ]
    if not matches:
        raise AssertionError(f"{module} has no stage in tests/test_layout.py: add it to STAGES")
    return max(matches)[1]


def imports_of(path: Path, module: str) -> set[str]:
    """Every diffora module ``path`` imports, at any depth (lazy imports included)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "diffora")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "diffora":
                continue
            for alias in node.names:  # `from .pkg import module` imports that module
                candidate = f"{target}.{alias.name}"
                found.add(candidate if _is_module(candidate) else target)
    return found


def _is_module(name: str) -> bool:
    path = SRC.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


MODULES = sorted((module_name(p), p) for p in PACKAGE.rglob("*.py") if p.name != "__main__.py")


@pytest.mark.parametrize("module,path", MODULES, ids=[m for m, _ in MODULES])
def test_no_module_imports_a_later_stage(module: str, path: Path) -> None:
    if module == "diffora":  # the package's lazy public names point everywhere by design
        return
    own = stage(module) if module not in UTILITIES else -1
    later = []
    for target in sorted(imports_of(path, module)):
        if target in UTILITIES or target == module:
            continue
        if module in UTILITIES or stage(target) > own:
            later.append(target)
    assert not later, f"{module} imports later stage(s) {later}"


def test_library_does_not_import_the_cli_or_compare() -> None:
    offenders = []
    for module, path in MODULES:
        if module.startswith(TOP_LEVEL):
            continue
        for target in imports_of(path, module):
            if target.startswith(("diffora.cli", "diffora.compare")):
                offenders.append(f"{module} -> {target}")
    assert not offenders, offenders


def test_the_checker_sees_lazy_and_relative_imports(tmp_path: Path) -> None:
    """The check must be able to fail: lazy relative imports of later stages are found and ranked later."""
    path = tmp_path / "candidates.py"  # read as if it were diffora/method/candidates.py
    path.write_text("def f():\n    from ..select.choose import choose_modules\n    from . import export\n")
    found = imports_of(path, "diffora.method.candidates")
    assert found == {"diffora.select.choose", "diffora.method.export"}
    assert all(stage(t) > stage("diffora.method.candidates") for t in found)
