"""The package's shape: no import cycle between its modules, each module says its job first, light commands stay light."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest
from conftest import REPO

PACKAGE = REPO / "hf_transfer"


MODULES = sorted(path for path in PACKAGE.rglob("*.py") if path != PACKAGE / "__init__.py")


def module_name(path) -> str:
    """`data.stream` for hf_transfer/data/stream.py, `data` for hf_transfer/data/__init__.py."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path) -> set[str]:
    """The hf_transfer modules `path` imports, at the top or inside functions (a lazy import is still a dependency)."""
    package = module_name(path).split(".")[:-1] if path.name != "__init__.py" else module_name(path).split(".")
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[:len(package) - (node.level - 1)]
            if node.module:
                found.add(".".join([*base, node.module]))
            else:
                found |= {".".join([*base, alias.name]) for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hf_transfer."):
            found.add(node.module.removeprefix("hf_transfer."))
    known = {module_name(module) for module in MODULES}
    return {name for name in found if name in known}


def test_no_import_cycle_inside_the_package():
    graph = {module_name(path): imports_of(path) for path in MODULES}
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
    for path in PACKAGE.rglob("*.py"):
        docstring = ast.get_docstring(ast.parse(path.read_text()))
        assert docstring and docstring.splitlines()[0].strip(), f"{path.name} has no first line saying its job"


def test_push_and_demo_help_load_no_training_stack():
    for command in ("push", "demo"):
        code = ("import sys\nfrom hf_transfer.cli import main\ntry:\n    main([" + repr(command) + ", '--help'])\n"
                "except SystemExit:\n    pass\nprint(sorted(m for m in ('torch', 'transformers', 'datasets', 'gradio') if m in sys.modules))")
        shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
        assert shown.returncode == 0, shown.stderr
        assert shown.stdout.strip().splitlines()[-1] == "[]", f"`{command} --help` imported {shown.stdout.strip().splitlines()[-1]}"



@pytest.mark.parametrize("command", ["select", "train", "doctor", "export", "predict", "push", "demo"])
def test_every_command_answers_help(command, capsys):
    """`hf-transfer <command> --help` prints the command's usage and options and exits 0 (a literal % in a help text
    once ended `select --help` in argparse's TypeError)."""
    from hf_transfer.cli import main

    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0
    assert "usage" in capsys.readouterr().out
