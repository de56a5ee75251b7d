"""The house's rules, read from the source: the runtime's modules import each other without a circle
(lazy imports inside functions count), and the tuner reaches the runtime only through its public
API and the tools' door, ``nf4_explorer.tuning``."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _imports(path: Path, package: str) -> set[str]:
    """Absolute names of the nf4_explorer modules ``path`` imports anywhere in it."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.startswith("nf4_explorer"):
                names.add(base)
                names.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names if alias.name.startswith("nf4_explorer"))
    return names


def test_runtime_imports_have_no_circle():
    modules = {f"nf4_explorer.{p.stem}": p for p in (ROOT / "variants").glob("*.py") if p.stem != "__init__"}
    graph = {name: {m for m in _imports(path, "nf4_explorer") if m in modules and m != name}
             for name, path in modules.items()}
    state = {}

    def visit(node, trail):
        state[node] = "open"
        for nxt in graph[node]:
            if state.get(nxt) == "open":
                raise AssertionError("import circle: " + " -> ".join(trail + [node, nxt]))
            if nxt not in state:
                visit(nxt, trail + [node])
        state[node] = "done"

    for node in graph:
        if node not in state:
            visit(node, [])


def test_tuner_uses_no_private_runtime_module():
    offenders = []
    for path in (ROOT / "tuner").glob("*.py"):
        for name in _imports(path, "nf4_explorer.tuner"):
            parts = name.split(".")
            if len(parts) > 1 and parts[1].startswith("_"):
                offenders.append(f"{path.name}: {name}")
    assert not offenders, "the tuner imports private runtime modules (use nf4_explorer.tuning): " + ", ".join(offenders)
