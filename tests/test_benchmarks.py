"""The benchmark scripts stay runnable: they are not timed here, only checked to parse and to explain themselves."""

from __future__ import annotations

import py_compile
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


@pytest.mark.parametrize("name", ["overhead.py", "feature_cache.py", "freeze_strategies.py", "streaming.py", "cpu_levers.py"])
def test_benchmark_help(name):
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / name), "--help"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0 and "usage" in result.stdout.lower(), result.stderr[-2000:]
