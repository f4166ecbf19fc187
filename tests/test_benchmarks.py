"""The benchmark scripts stay runnable: they are not timed here, only checked to parse and to explain themselves."""

from __future__ import annotations

import py_compile
import runpy
import subprocess
import sys

import pytest
from conftest import REPO

SCRIPTS = sorted((REPO / "benchmarks").glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_benchmark_script_compiles(script):
    py_compile.compile(str(script), doraise=True)


def test_gpu_script_is_valid_bash():
    result = subprocess.run(["bash", "-n", str(REPO / "benchmarks" / "gpu.sh")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


HELP = ["overhead.py", "feature_cache.py", "freeze_strategies.py", "streaming.py", "cpu_levers.py"]


@pytest.mark.parametrize("name", HELP)
def test_benchmark_help(name, monkeypatch, capsys):
    """Each script's `--help`, run as its own `__main__` in this process, where torch and transformers are loaded already:
    a second at most, against 8-10 s of imports in a process of its own."""
    script = REPO / "benchmarks" / name
    monkeypatch.syspath_prepend(str(script.parent))  # where `python benchmarks/<name>` finds `common`
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    with pytest.raises(SystemExit) as stopped:
        runpy.run_path(str(script), run_name="__main__")
    assert stopped.value.code == 0 and "usage" in capsys.readouterr().out.lower()
