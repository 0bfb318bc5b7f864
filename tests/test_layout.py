"""The package's imports run one way (README's Layout): no module imports a package above its own,
and no two modules import each other, directly or round a circle, counting imports inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

import mistral_tune

ROOT = Path(mistral_tune.__file__).parent
# From the top down; a package may import those on its level's right or below.
ORDER = [["cli", "__main__"], ["api"], ["plan", "quickstart"], ["train"], ["evaluate"], ["export", "serve"],
         ["generate"], ["data"], ["config", "config_axolotl", "models"], ["kernels", "chat", "fsutil"],
         ["errors", "dtypes", "htmlpage", "plots", "__init__"]]
LEVEL = {name: i for i, names in enumerate(ORDER) for name in names}


def _modules() -> dict[str, Path]:
    out = {}
    for f in ROOT.rglob("*.py"):
        parts = f.relative_to(ROOT.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _imports(mods: dict[str, Path]) -> list[tuple[str, int, str]]:
    """(module, line, imported module) for every import of one of our modules, at any depth."""
    found = []
    for mod, f in mods.items():
        package = mod.split(".") if f.name == "__init__.py" else mod.split(".")[:-1]
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
                for alias in node.names:
                    target = f"{base}.{alias.name}" if f"{base}.{alias.name}" in mods else base
                    if target in mods and target != mod:
                        found.append((mod, node.lineno, target))
            elif isinstance(node, ast.Import):
                found += [(mod, node.lineno, a.name) for a in node.names if a.name in mods and a.name != mod]
    return found


def _unit(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_package_has_a_level():
    assert {_unit(m) for m in _modules()} <= set(LEVEL), "a new package needs its place in ORDER (and README)"


def test_no_module_imports_a_package_above_its_own():
    upward = [f"{m}:{line} imports {t}" for m, line, t in _imports(_modules())
              if _unit(m) != _unit(t) and LEVEL[_unit(t)] < LEVEL[_unit(m)] and m != "mistral_tune.__main__"]
    assert not upward, "\n".join(upward)


def test_no_import_circle():
    graph: dict[str, set[str]] = {}
    for m, _, t in _imports(_modules()):
        graph.setdefault(m, set()).add(t)
    circles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                circles.append(" -> ".join(path[path.index(nxt):] + [node, nxt]) if nxt in path else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, path + [node])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not circles, "\n".join(circles)
