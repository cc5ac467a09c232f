"""The house as DESIGN.md draws it: the import flow between subpackages, and small modules.

Every module of ``src/shoal`` is parsed (nothing is imported), and every ``import shoal.X`` /
``from shoal.X import ...`` counts, at module level or inside a function. The subpackage
graph must use only the edges below and have no cycle; no module may exceed 400 lines.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "shoal"
MAX_LINES = 400

# Top-level modules every part may use: errors, the progress callback type, transformers shims.
SHARED = {"errors", "progress", "hf_compat", "runtime"}

# subpackage -> the subpackages it may import (besides SHARED and itself). DESIGN.md: checkpoint at
# the bottom; merge uses checkpoint; flow uses merge; eval uses checkpoint; adapt uses eval; evolve
# uses merge, flow and eval; zoo uses merge and eval; studies and cli sit on top.
ALLOWED: dict[str, set[str]] = {
    "checkpoint": set(),
    "merge": {"checkpoint"},
    "flow": {"merge", "checkpoint"},
    "eval": {"checkpoint"},
    "adapt": {"eval", "checkpoint"},
    "evolve": {"merge", "flow", "eval", "checkpoint"},
    "zoo": {"merge", "eval", "checkpoint"},
    "studies": {"adapt", "evolve", "zoo", "merge", "flow", "eval", "checkpoint"},
    "cli": {"studies", "adapt", "evolve", "zoo", "merge", "flow", "eval", "checkpoint"},
}
# ``shoal/__init__.py`` (what ``import shoal`` runs) may register what the package provides.
ROOT_ALLOWED = {"flow", "checkpoint", "merge", "eval"}


def _modules() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def _part(path: Path) -> str:
    """The subpackage (or shared module) a file belongs to; ``""`` for ``shoal/__init__.py``."""
    relative = path.relative_to(SRC).parts
    if len(relative) == 1:
        return "" if relative[0] == "__init__.py" else relative[0][:-3]
    return relative[0]


def _imported_parts(path: Path, text: str | None = None) -> set[tuple[str, int]]:
    """(part of shoal imported, line) for every import of shoal code in ``path`` (or in ``text``
    read as if it were that file)."""
    source = path.read_text(encoding="utf-8") if text is None else text
    tree = ast.parse(source, filename=str(path))
    package = ".".join(("shoal", *path.relative_to(SRC).parts[:-1]))
    found: set[tuple[str, int]] = set()

    def add(module: str, line: int) -> None:
        parts = module.split(".")
        if parts[0] == "shoal" and len(parts) > 1:
            found.add((parts[1], line))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against this file's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module == "shoal":  # from shoal import X: X is the part
                for alias in node.names:
                    add(f"shoal.{alias.name}", node.lineno)
            else:
                add(module, node.lineno)
    return found


def _graph() -> dict[str, dict[str, list[str]]]:
    """part -> imported part -> the places (file:line) that import it."""
    graph: dict[str, dict[str, list[str]]] = {}
    for path in _modules():
        source = _part(path)
        for target, line in _imported_parts(path):
            if target == source or target == "__version__":
                continue
            where = f"{path.relative_to(SRC.parent)}:{line}"
            graph.setdefault(source, {}).setdefault(target, []).append(where)
    return graph


def test_every_subpackage_is_placed_in_the_flow() -> None:
    parts = {_part(p) for p in _modules()} - {""}
    assert parts - SHARED <= set(ALLOWED), f"subpackages missing from ALLOWED: {parts - SHARED - set(ALLOWED)}"


def test_imports_follow_the_design_flow() -> None:
    wrong = []
    for source, targets in _graph().items():
        if source in SHARED:
            allowed: set[str] = set()
        elif source == "":
            allowed = ROOT_ALLOWED | SHARED
        else:
            allowed = ALLOWED[source] | SHARED
        for target, places in sorted(targets.items()):
            if target not in allowed:
                wrong.append(f"{source or 'shoal/__init__'} -> {target} ({', '.join(sorted(places)[:3])})")
    assert not wrong, "imports against DESIGN.md's flow:\n" + "\n".join(wrong)


def test_the_subpackage_graph_has_no_cycle() -> None:
    graph = {source: set(targets) for source, targets in _graph().items() if source}
    visiting: list[str] = []
    done: set[str] = set()

    def visit(node: str) -> None:
        if node in done:
            return
        if node in visiting:
            cycle = visiting[visiting.index(node):] + [node]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        visiting.append(node)
        for target in sorted(graph.get(node, ())):
            visit(target)
        visiting.pop()
        done.add(node)

    for node in sorted(graph):
        visit(node)


def test_the_checker_sees_function_level_and_relative_imports() -> None:
    text = ("def f():\n    from shoal.zoo import build_zoo\n    from ..merge import plan\n"
            "import shoal.flow.build\nfrom shoal import adapt\nimport shoal\n")
    found = {part for part, _ in _imported_parts(SRC / "eval" / "loading.py", text)}
    assert found == {"zoo", "merge", "flow", "adapt"}


def test_no_module_is_over_400_lines() -> None:
    long = [f"{p.relative_to(SRC.parent)} ({n} lines)" for p in _modules()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES]
    assert not long, "modules over 400 lines: " + ", ".join(long)


def test_entry_point_targets_are_import_light() -> None:
    """The reference and task plug-ins are loaded by the resolver and the task registry; the
    reference ones must not drag torch, transformers or optuna into a process."""
    code = ("import sys\n"
            "import shoal.zoo.references, shoal.evolve.references, shoal.zoo, shoal.evolve\n"
            "heavy = [m for m in ('torch', 'transformers', 'optuna') if m in sys.modules]\n"
            "print(','.join(heavy))\n")
    env_path = str(SRC.parent)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"})
    assert result.stdout.strip() == ""


def test_library_errors_name_arguments_not_command_line_flags() -> None:
    """Below ``cli/`` an error message says ``pass resume=True``, not ``pass --resume``: the
    library is also called from Python, and the CLI maps arguments to its flags."""
    import re

    flag = re.compile(r"(?<![\w-])--[a-z][a-z-]*")
    found = []
    for path in _modules():
        if _part(path) == "cli":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Raise) or node.exc is None:
                continue
            for part in ast.walk(node.exc):
                if isinstance(part, ast.Constant) and isinstance(part.value, str) and flag.search(part.value):
                    found.append(f"{path.relative_to(SRC.parent)}:{part.lineno}: {flag.search(part.value)[0]}")
    assert not found, "error messages naming CLI flags:\n" + "\n".join(found)


def test_the_cli_maps_argument_names_to_its_flags() -> None:
    from shoal.cli._errors import cli_message

    assert cli_message("a study exists; pass resume=True to continue it") == \
        "a study exists; pass --resume to continue it"
    assert cli_message("no safetensors; pass allow_pickle=True to load them") == \
        "no safetensors; pass --allow-pickle to load them"
    assert cli_message("executor='ray' needs Ray") == "--executor ray needs Ray"


def test_one_table_of_architecture_families() -> None:
    """Layer paths use the families that ``checkpoint/architecture.py`` marks for them."""
    from shoal.checkpoint.architecture import FAMILIES, layer_path_families
    from shoal.flow.modeling_layer_path import FAMILIES as FLOW_FAMILIES

    assert layer_path_families() == {name: (f.modeling_module, f.class_prefix)
                                      for name, f in FAMILIES.items() if f.layer_path}
    assert dict(FLOW_FAMILIES) == layer_path_families()
