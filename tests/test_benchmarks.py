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


HELP = ["overhead.py", "feature_cache.py", "freeze_strategies.py", "streaming.py", "cpu_levers.py"]


@pytest.fixture(scope="module")
def helps() -> dict[str, tuple[int, str, str]]:
    """Each script's `--help` (status, stdout, stderr), the processes side by side: each spends 8-10 s importing torch and
    transformers, one core's work, and one after the other they took 45 s of the fast lane."""
    running = {name: subprocess.Popen([sys.executable, str(REPO / "benchmarks" / name), "--help"], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, cwd=REPO) for name in HELP}
    found = {}
    for name, process in running.items():  # the others go on while one is read
        out, err = process.communicate()
        found[name] = (process.returncode, out, err)
    return found


@pytest.mark.parametrize("name", HELP)
def test_benchmark_help(helps, name):
    status, out, err = helps[name]
    assert status == 0 and "usage" in out.lower(), err[-2000:]
