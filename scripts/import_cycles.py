"""Print import cycles among dstack modules: "top" counts module-level imports, "all" adds function ones.

TYPE_CHECKING blocks never count. Run from the repo root: `python scripts/import_cycles.py` (`--check`: exit 1
when module-level imports form a cycle; the tests run it so).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def modules(root: Path) -> dict[str, Path]:
    found = {}
    for path in root.joinpath("dstack").rglob("*.py"):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def graph(mods: dict[str, Path], with_functions: bool) -> dict[str, set[str]]:
    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():

        def visit(node: ast.AST, mod: str = mod) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                    continue
                is_function = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                if is_function and not with_functions:
                    continue
                names: list[str] = []
                if isinstance(child, ast.Import):
                    names = [a.name for a in child.names]
                elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                    names = [child.module] + [f"{child.module}.{a.name}" for a in child.names]
                for name in names:
                    target = resolve(name) if name.startswith("dstack") else None
                    if target and target != mod and not mod.startswith(target + "."):
                        edges[mod].add(target)
                visit(child)

        visit(ast.parse(path.read_text()))
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []
    sys.setrecursionlimit(10000)

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in edges:
        if v not in index:
            connect(v)
    return found


if __name__ == "__main__":
    mods = modules(Path(__file__).resolve().parent.parent)
    top_cycles = 0
    for label, with_functions in (("top", False), ("all", True)):
        groups = cycles(graph(mods, with_functions))
        top_cycles = top_cycles or (len(groups) if not with_functions else 0)
        print(f"{label}: {len(mods)} modules, {len(groups)} cycle group(s)")
        for group in groups:
            print("  " + " <-> ".join(group))
    sys.exit(1 if "--check" in sys.argv and top_cycles else 0)
