"""Shared by the benchmark scripts: the machine and library versions, markdown tables, results files.

Every script prints its table and appends it, with the date, machine and versions, to
`benchmarks/results/<name>.md` (or to `$BENCH_RESULTS_DIR/<name>.md` when that is set).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the scripts run as `python benchmarks/x.py` from a checkout
    sys.path.insert(0, str(REPO))

RESULTS_DIR = Path(os.environ.get("BENCH_RESULTS_DIR", REPO / "benchmarks" / "results"))
LIBRARIES = ("torch", "torchvision", "timm", "transformers", "accelerate", "datasets", "huggingface_hub")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> str:
    """The 1, 5 and 15 minute load averages: how busy the shared machine was around a measurement."""
    return " / ".join(f"{value:.1f}" for value in os.getloadavg())


def offline_logging() -> None:
    """Read only the local mirrors, and log as `hf-transfer train` does (the freeze plan, the cache's lines)."""
    from hf_transfer.cli import setup_logging

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    setup_logging(main_process=True)


def machine() -> str:
    """One line naming the machine: CPU, cores, torch threads, load, and the GPU if there is one."""
    text = f"{cpu_name()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, load average {load_average()}"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        text += f"; GPU {props.name} ({props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs, CUDA {torch.version.cuda})"
    return text


def versions() -> str:
    found = []
    for name in LIBRARIES:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return f"Python {platform.python_version()}, " + ", ".join(found)


# The offline mirrors beside the repo (../shared/datasets, see its README), or wherever CIFAR10 / CATS_VS_DOGS point.
MIRRORS = {
    "cifar10": Path(os.environ.get("CIFAR10", REPO.parent / "shared" / "datasets" / "cifar10")),
    "cats_vs_dogs": Path(os.environ.get("CATS_VS_DOGS", REPO.parent / "shared" / "datasets" / "cats_vs_dogs")),
}
# As in recipes/cifar10.yaml: CIFAR-10 has no validation split, 5,000 train images are carved out for it.
VALIDATION_SIZE = {"cifar10": 5000, "cats_vs_dogs": 0.1}


def git_commit() -> str:
    """The checkout's commit (a worktree's and a packed ref's too), or "unknown" outside git."""
    try:
        found = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
    except OSError:
        return "unknown"
    return found.stdout.strip() or "unknown"


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    columns = columns or list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(column, "")) for column in columns) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def report(name: str, title: str, rows: list[dict], notes: list[str] = (), columns: list[str] | None = None) -> str:
    """Print the table and append it, with date, machine and versions, to the results file `name`.md."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = "\n".join([
        f"## {title}",
        "",
        f"- date: {stamp}, commit {git_commit()}",
        f"- machine: {machine()}",
        f"- versions: {versions()}",
        *[f"- {note}" for note in notes],
        "",
        markdown_table(rows, columns),
        "",
        "",
    ])
    print("\n" + text, flush=True)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    with open(RESULTS_DIR / f"{name}.md", "a") as results:
        results.write(text)
    return text


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Stopwatch:
    """Wall-clock seconds, with the GPU's queued work finished at start and stop."""

    def __enter__(self):
        synchronize()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        synchronize()
        self.seconds = time.perf_counter() - self.start


def median(values) -> float:
    return statistics.median(values)


def alternating_rounds(contenders: dict, rounds: int, per: int = 1, after_round=None) -> dict[str, list[float]]:
    """Each contender's `round()` seconds divided by `per` (e.g. its steps), one list per contender, over `rounds` counted
    rounds after one warm-up round; the order rotates every round, so on a shared machine no contender always runs
    first or after the same one. `after_round(seconds)` runs after each counted round (progress, load)."""
    names = list(contenders)
    seconds = {name: [] for name in names}
    for round_index in range(rounds + 1):  # round 0 warms everything up and is not counted
        order = names[round_index % len(names):] + names[:round_index % len(names)]
        for name in order:
            elapsed = contenders[name].round()
            if round_index:
                seconds[name].append(elapsed / per)
        if round_index and after_round:
            after_round(seconds)
    return seconds
