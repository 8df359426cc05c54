"""The layers of the project, read from the source: the method (``lit_transfusion/``) imports nothing of the data
(``datamodules/``), the callbacks (``callbacks/``) or the commands (``lit_transfusion/commands/``); nothing but the
commands imports the commands; no module imports itself through others (no import circle). Imports inside
functions count too, and so do import strings (``import_module("datamodules...")``, ``"pkg.mod:fn"``)."""

from __future__ import annotations

import ast
import itertools
import re
from pathlib import Path

from tests.conftest import ROOT

PACKAGES = ("lit_transfusion", "datamodules", "callbacks")
COMMANDS = "lit_transfusion.commands"
# A string naming a module of the project, as import strings do ("datamodules.files.prepare:main").
IMPORT_STRING = re.compile(r"^(lit_transfusion|datamodules|callbacks)(\.\w+)+(:\w+)?$")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}


def imports(path: Path, name: str) -> set[str]:
    """Every project module ``path`` imports, anywhere in it, by statement or by string."""
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and IMPORT_STRING.match(node.value):
            found.add(node.value.split(":")[0])
    return {m for m in found if m.split(".")[0] in PACKAGES}


def resolve(target: str, modules: dict[str, Path]) -> str | None:
    """The project module ``target`` names (``pkg.mod.function`` -> ``pkg.mod``)."""
    while target and target not in modules:
        target = target.rpartition(".")[0]
    return target or None


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: {m for t in imports(path, name) if (m := resolve(t, modules)) and m != name}
            for name, path in modules.items()}


def is_command(name: str) -> bool:
    """The top layer: the commands and ``python -m lit_transfusion``'s entry point."""
    return name in (COMMANDS, "lit_transfusion.__main__") or name.startswith(COMMANDS + ".")


def test_the_method_imports_no_data_callbacks_or_commands():
    bad = {name: sorted(t for t in targets if t.split(".")[0] in ("datamodules", "callbacks") or is_command(t))
           for name, targets in graph().items() if name.startswith("lit_transfusion") and not is_command(name)}
    assert not {k: v for k, v in bad.items() if v}


def test_nothing_below_the_commands_imports_them():
    bad = {name: sorted(t for t in targets if is_command(t))
           for name, targets in graph().items() if not is_command(name)}
    assert not {k: v for k, v in bad.items() if v}


def test_no_import_circle():
    edges = graph()
    circles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                circles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for start in sorted(edges):
        if start not in state:
            visit(start, [start])
    # A package's __init__ that re-exports its submodules is not a circle of two files.
    circles = [c for c in circles if not all(a.startswith(b) or b.startswith(a) for a, b in itertools.pairwise(c))]
    assert not circles, "\n".join(" -> ".join(c) for c in circles)
