"""The package's shape: no import cycle between its modules, each module says its job first, light commands stay light."""

from __future__ import annotations

import ast
import subprocess
import sys

from conftest import REPO

PACKAGE = REPO / "hf_transfer"


def imports_of(path) -> set[str]:
    """The hf_transfer modules `path` imports, at the top or inside functions (a lazy import is still a dependency)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module} if node.module else {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hf_transfer."):
            found.add(node.module.split(".")[1])
    return {name.split(".")[0] for name in found}


def test_no_import_cycle_inside_the_package():
    graph = {path.stem: imports_of(path) for path in PACKAGE.glob("*.py")}
    cycles, state = [], {}

    def visit(module, trail):
        state[module] = "open"
        for imported in sorted(graph.get(module, ())):
            if state.get(imported) == "open":
                cycles.append(trail[trail.index(imported):] + [imported])
            elif imported not in state:
                visit(imported, trail + [imported])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(cycle) for cycle in cycles)


def test_every_module_says_its_job_on_its_first_line():
    for path in PACKAGE.glob("*.py"):
        docstring = ast.get_docstring(ast.parse(path.read_text()))
        assert docstring and docstring.splitlines()[0].strip(), f"{path.name} has no first line saying its job"


def test_push_and_demo_help_load_no_training_stack():
    for command in ("push", "demo"):
        code = ("import sys\nfrom hf_transfer.cli import main\ntry:\n    main([" + repr(command) + ", '--help'])\n"
                "except SystemExit:\n    pass\nprint(sorted(m for m in ('torch', 'transformers', 'datasets', 'gradio') if m in sys.modules))")
        shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
        assert shown.returncode == 0, shown.stderr
        assert shown.stdout.strip().splitlines()[-1] == "[]", f"`{command} --help` imported {shown.stdout.strip().splitlines()[-1]}"
