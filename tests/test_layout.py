"""The layout stays navigable: small modules, a short README, no import cycles between modules, and
a comment on every import deferred into a function (why it is lazy). Read with `ast`, never imported.

(`runtime/` staying torch-free is tests/runtime/test_no_torch.py.)
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from functools import cache
from itertools import islice
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1]
# folder -> the package it installs as (pyproject.toml [tool.setuptools] package-dir)
PACKAGES = {"skiptree": "skiptree", "compiler": "skiptree.compiler", "passes": "skiptree.passes",
            "models": "skiptree.models", "runtime": "skiptree.runtime",
            "serve": "skiptree.serve"}  # fmt: skip
MAX_MODULE_LINES = 400
MAX_README_LINES = 350
MAX_CYCLES_LISTED = 100
HEAVY = ("tvm", "torch", "onnxruntime", "transformers", "matplotlib")  # lazy imports must say why
PRAGMA = re.compile(r"\b(noqa|fmt|type|pragma|isort)\b:?[^#]*")  # a comment for tools, not a reason


@cache
def package_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the installed packages."""
    modules = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


def line_count(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines())


def test_modules_and_readme_are_small():
    long_modules = {str(path.relative_to(ROOT)): line_count(path) for path in package_modules().values()
                    if line_count(path) > MAX_MODULE_LINES}  # fmt: skip
    readme = line_count(ROOT / "README.md")
    problems = [
        f"{name}: {lines} lines (at most {MAX_MODULE_LINES})" for name, lines in sorted(long_modules.items())
    ]
    if readme > MAX_README_LINES:
        problems.append(f"README.md: {readme} lines (at most {MAX_README_LINES})")
    assert not problems, "split these files:\n  " + "\n  ".join(problems)


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")  # fmt: skip


def module_level_imports(statements: list[ast.stmt]) -> list[ast.Import | ast.ImportFrom]:
    """The imports run when a module is imported: top level, in `if` / `try` / `with` blocks and
    class bodies, but not in functions (lazy) nor under `if TYPE_CHECKING:` (never run)."""
    found: list[ast.Import | ast.ImportFrom] = []
    for statement in statements:
        if isinstance(statement, ast.Import | ast.ImportFrom):
            found.append(statement)
        elif isinstance(statement, ast.If):
            if not is_type_checking(statement.test):
                found += module_level_imports(statement.body)
            found += module_level_imports(statement.orelse)
        elif isinstance(statement, ast.Try | ast.TryStar):
            for block in (statement.body, statement.orelse, statement.finalbody):
                found += module_level_imports(block)
            for handler in statement.handlers:
                found += module_level_imports(handler.body)
        elif isinstance(statement, ast.With | ast.ClassDef):
            found += module_level_imports(statement.body)
    return found


def source_module(module: str, statement: ast.ImportFrom) -> str:
    """The module a `from ... import` reads, relative imports resolved against `module`."""
    if not statement.level:
        return statement.module or ""
    parts = module.split(".")
    is_package = package_modules()[module].name == "__init__.py"
    parent = parts[: len(parts) - statement.level + is_package]
    return ".".join([*parent, statement.module] if statement.module else parent)


def dependencies(module: str, statements: list[ast.Import | ast.ImportFrom]) -> set[str]:
    """The package modules that importing `module` imports: `from a.b import c` depends on a.b, or on
    a.b.c when that is a module itself; a package name stands for its __init__."""
    modules, found = package_modules(), set()
    for statement in statements:
        if isinstance(statement, ast.Import):
            names = [alias.name for alias in statement.names]
        else:
            base = source_module(module, statement)
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in statement.names]
        found.update(name for name in names if name in modules)
    return found


@cache
def parsed(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def import_graph() -> nx.DiGraph:
    graph = nx.DiGraph()
    for module, path in package_modules().items():
        graph.add_node(module)
        for target in dependencies(module, module_level_imports(parsed(path).body)):
            graph.add_edge(module, target)
    return graph


def test_import_graph_resolves():
    """The checker itself: known edges are found (so an empty cycle list means something)."""
    graph = import_graph()
    assert graph.has_edge("skiptree.passes.skip_layers", "skiptree.compiler.ir.pass_manager")
    assert graph.has_edge("skiptree.compiler.ir.pass_manager", "skiptree.compiler.ir.graph")
    assert not graph.has_edge("skiptree", "skiptree.runtime.artifact")  # under TYPE_CHECKING only
    assert not graph.has_edge("skiptree", "skiptree.compiler.compile")  # inside a function: lazy


def test_no_import_cycles():
    graph = import_graph()
    cycles = sorted(islice(nx.simple_cycles(graph), MAX_CYCLES_LISTED), key=lambda cycle: (len(cycle), cycle))
    listed = [" -> ".join([*cycle, cycle[0]]) for cycle in cycles]
    if len(cycles) == MAX_CYCLES_LISTED:
        listed.append(f"... (the first {MAX_CYCLES_LISTED} found)")
    assert not cycles, "module-level import cycles (import one side lazily, or move the shared part):\n  " + (
        "\n  ".join(listed)
    )


def comment_lines(source: str) -> set[int]:
    """Lines holding a comment that says something (not only a pragma such as `# noqa: E402`)."""
    lines = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT and PRAGMA.sub("", token.string.lstrip("#")).strip(" #"):
            lines.add(token.start[0])
    return lines


def lazy_imports(path: Path, module: str) -> list[tuple[int, ast.Import | ast.ImportFrom]]:
    """Imports inside functions of heavy libraries or of skiptree's own modules."""
    found = []
    for function in ast.walk(parsed(path)):
        if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for statement in ast.walk(function):
            if isinstance(statement, ast.Import):
                roots = {alias.name.split(".")[0] for alias in statement.names}
            elif isinstance(statement, ast.ImportFrom):
                roots = {source_module(module, statement).split(".")[0]}
            else:
                continue
            if roots & {*HEAVY, "skiptree"}:
                found.append((statement.lineno, statement))
    return sorted(set(found), key=lambda item: item[0])  # nested functions: each import once


def has_comment(node: ast.stmt, commented: set[int], import_ending_at: dict[int | None, ast.stmt]) -> bool:
    if commented & set(range(node.lineno - 1, (node.end_lineno or node.lineno) + 1)):
        return True
    above = import_ending_at.get(node.lineno - 1)  # an import right above: its comment covers both
    return above is not None and has_comment(above, commented, import_ending_at)


def uncommented_lazy_imports() -> list[str]:
    """Lazy imports with no comment on their lines or the line above; a comment above a run of
    imports on consecutive lines covers the whole run."""
    offenders = []
    for module, path in package_modules().items():
        commented = comment_lines(path.read_text(encoding="utf-8"))
        imports = [node for node in ast.walk(parsed(path)) if isinstance(node, ast.Import | ast.ImportFrom)]
        ending = {node.end_lineno: node for node in imports}
        for line, statement in lazy_imports(path, module):
            if not has_comment(statement, commented, ending):
                offenders.append(f"{path.relative_to(ROOT)}:{line}: {ast.unparse(statement)}")
    return offenders


def test_lazy_imports_are_commented():
    """An import inside a function (of torch, tvm, onnxruntime, transformers, matplotlib or a skiptree
    module) has a comment on its line or the line above (or above its run of imports) saying why it
    is deferred: heavy, optional, or breaking a cycle."""
    offenders = uncommented_lazy_imports()
    assert not offenders, (
        "say why these imports are lazy (a comment on the line or above):\n  " + "\n  ".join(offenders)
    )
