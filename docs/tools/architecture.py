"""Write ``docs/architecture.md`` from the package's real import graph.

Every ``import`` of every module counts, also those inside functions (made only when that path
runs): a cycle through a deferred import is still a cycle for whoever reads the code. Run
``python docs/tools/architecture.py`` after moving code between modules; ``tests/test_import_graph.py``
fails while the committed page differs from what this script writes.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "metabin_layers"
PAGE = ROOT / "docs" / "architecture.md"
RECIPE = f"{PACKAGE}.reid"


@dataclass
class Module:
    """One module of the package: its size, public names and imports."""

    name: str
    path: Path
    lines: int = 0
    docstring_lines: int = 0
    public: list[str] = field(default_factory=list)
    summary: str = ""
    eager: set[str] = field(default_factory=set)  # package modules imported when this one loads
    deferred: set[str] = field(default_factory=set)  # ... imported inside functions


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _docstring_lines(tree: ast.Module) -> int:
    """Lines of docstrings: of the module, classes and functions, and attribute docstrings."""
    total = 0
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for i, stmt in enumerate(node.body):
            is_text = isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str)
            if is_text and (i == 0 or isinstance(node.body[i - 1], (ast.Assign, ast.AnnAssign))):
                total += (stmt.end_lineno or stmt.lineno) - stmt.lineno + 1
    return total


def _public_names(tree: ast.Module) -> list[str]:
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) else node.target if isinstance(node, ast.AnnAssign) else None
        if isinstance(target, ast.Name) and target.id == "__all__" and node.value is not None:  # type: ignore[union-attr]
            return [n for n in ast.literal_eval(node.value) if not n.startswith("__")]  # type: ignore[union-attr]
    return []


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(tree: ast.Module) -> list[tuple[ast.stmt, bool]]:
    """Every import statement with whether it runs when the module loads (not inside a function)."""
    found: list[tuple[ast.stmt, bool]] = []

    def visit(node: ast.AST, eager: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if _type_checking_only(child):
                continue  # for type checkers only: never executed
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append((child, eager))
            inside_function = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(child, eager and not inside_function)

    visit(tree, True)
    return found


def _targets(stmt: ast.stmt, importer: str, is_package: bool, modules: set[str]) -> set[str]:
    """The package modules an import statement loads: ``from a import b`` is ``a.b`` when that is a module."""
    if isinstance(stmt, ast.Import):
        return {alias.name for alias in stmt.names if alias.name in modules}
    assert isinstance(stmt, ast.ImportFrom)
    if stmt.level:
        base = importer.split(".") if is_package else importer.split(".")[:-1]
        base = base[: len(base) - (stmt.level - 1)]
        source = ".".join(base + ([stmt.module] if stmt.module else []))
    else:
        source = stmt.module or ""
    out = set()
    for alias in stmt.names:
        sub = f"{source}.{alias.name}"
        if sub in modules:
            out.add(sub)
        elif source in modules:
            out.add(source)
    return out


def read_package(root: Path = ROOT, package: str = PACKAGE) -> dict[str, Module]:
    """Every module of ``package`` under ``root``, with its package-internal imports."""
    paths = sorted((root / package).rglob("*.py"))
    names = {module_name(p, root): p for p in paths}
    modules = {}
    for name, path in names.items():
        source = path.read_text()
        tree = ast.parse(source)
        doc = ast.get_docstring(tree) or ""
        mod = Module(name, path, len(source.splitlines()), _docstring_lines(tree), _public_names(tree), doc.split("\n\n")[0])
        for stmt, eager in _imports(tree):
            for target in _targets(stmt, name, path.name == "__init__.py", set(names)) - {name}:
                (mod.eager if eager else mod.deferred).add(target)
        modules[name] = mod
    for mod in modules.values():
        mod.deferred -= mod.eager
    return modules


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(max(1000, 10 * len(edges)))
    for v in sorted(edges):
        if v not in index:
            connect(v)
    return sorted(cycles)


def all_edges(modules: dict[str, Module]) -> dict[str, set[str]]:
    return {name: mod.eager | mod.deferred for name, mod in modules.items()}


def _node(name: str) -> str:
    """The diagram node of a module: core modules one each, the recipe one per sub-package."""
    if name == RECIPE or not name.startswith(RECIPE + "."):
        return name
    parts = name.split(".")
    return ".".join(parts[:3])


def _short(name: str) -> str:
    return name[len(PACKAGE) + 1 :] if name.startswith(PACKAGE + ".") else name


def _node_id(name: str) -> str:
    return _short(name).replace(".", "_") or "package"


def _diagram(modules: dict[str, Module]) -> list[str]:
    eager: set[tuple[str, str]] = set()
    deferred: set[tuple[str, str]] = set()
    for mod in modules.values():
        for targets, kind in ((mod.eager, eager), (mod.deferred, deferred)):
            for t in targets:
                a, b = _node(mod.name), _node(t)
                if a != b:
                    kind.add((a, b))
    deferred -= eager
    nodes = sorted({_node(n) for n in modules})
    lines = ["```mermaid", "flowchart LR"]
    for group, title in ((False, "core: needs only torch"), (True, "recipe: needs the reid extra")):
        lines.append(f'    subgraph {"recipe" if group else "core"}["{title}"]')
        for n in nodes:
            if (n == RECIPE or n.startswith(RECIPE + ".")) == group:
                lines.append(f'        {_node_id(n)}["{_short(n) or PACKAGE}"]')
        lines.append("    end")
    for a, b in sorted(eager):
        lines.append(f"    {_node_id(a)} --> {_node_id(b)}")
    for a, b in sorted(deferred):
        lines.append(f"    {_node_id(a)} -.-> {_node_id(b)}")
    lines.append("```")
    return lines


def _table(modules: list[Module]) -> list[str]:
    rows = ["| module | lines | docstrings | public names | what it holds |", "|---|---:|---:|---|---|"]
    for m in modules:
        share = f"{100 * m.docstring_lines / m.lines:.0f}%" if m.lines else "-"
        names = ", ".join(f"`{n}`" for n in m.public) or "-"
        rows.append(f"| `{_short(m.name) or PACKAGE}` | {m.lines} | {share} | {names} | {' '.join(m.summary.split())} |")
    return rows


def _totals(label: str, modules: list[Module]) -> str:
    lines = sum(m.lines for m in modules)
    doc = sum(m.docstring_lines for m in modules)
    public = sum(len(m.public) for m in modules if m.name not in (PACKAGE, RECIPE))
    return f"- {label}: {len(modules)} modules, {lines} lines, docstrings {100 * doc / max(lines, 1):.0f}% of them, {public} public names in the submodules' `__all__`."


def render(modules: dict[str, Module]) -> str:
    core = [m for m in modules.values() if not (m.name == RECIPE or m.name.startswith(RECIPE + "."))]
    recipe = [m for m in modules.values() if m not in core]
    cycles = find_cycles(all_edges(modules))
    text = [
        "# Architecture",
        "",
        "<!-- Written by docs/tools/architecture.py from the package's imports; do not edit by hand. -->",
        "",
        "The package is a torch-only core and a Re-ID recipe on top of it. An arrow points from a module to one it",
        "imports; a dashed arrow is an import made only inside a function, when that path runs (the Triton kernels,",
        "the synchronised layers), so `import metabin_layers` loads none of them. The recipe is drawn one node per",
        "sub-package.",
        "",
        *_diagram(modules),
        "",
        _totals("Core", core),
        _totals("Recipe", recipe),
        f"- Import cycles, deferred imports included: {'none' if not cycles else '; '.join(' <-> '.join(c) for c in cycles)}.",
        "",
        "## Core",
        "",
        *_table(sorted(core, key=lambda m: m.name)),
        "",
        "## Recipe",
        "",
        *_table(sorted(recipe, key=lambda m: m.name)),
        "",
    ]
    return "\n".join(text)


def main() -> None:
    PAGE.write_text(render(read_package()))
    print(f"wrote {PAGE.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
