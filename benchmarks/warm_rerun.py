"""A warm rerun against the first run: the same cached `head_only` recipe twice, end to end, stage by stage.

Each run is the `hf-transfer train` command in its own process (what a user runs), timed from the process's start to its
exit. The first run starts with an empty datasets cache and output folder (so it converts the dataset and extracts the
features); the second is the identical command again, as a user reruns it: the same output folder (the folder holds
the same run, so no `--overwrite` is needed) and the same feature cache. Each stage's time is exclusive (a stage inside
another counts once, in the inner one); `exit` is the interpreter's shut-down after the command returns, `other` what no
stage covers (the run's own lines between stages).

    python benchmarks/warm_rerun.py                                         # this checkout
    git worktree add /tmp/warm-base abb8ae0
    python benchmarks/warm_rerun.py --checkouts before=/tmp/warm-base,after=.   # before and after, one after the other

Each checkout's hf_transfer is imported from that checkout (PYTHONPATH), with its own empty datasets cache. `python -X
importtime` lists what importing the command's modules costs, by top-level package (self time, summed).
"""

from __future__ import annotations

import sys

if __name__ == "__main__" and sys.argv[1:2] == ["--child"]:
    # The run itself, in the checkout's process: hf_transfer first, as `hf-transfer train` does (its __init__ sets
    # OMP_WAIT_POLICY before torch loads); nothing of the benchmark's own (common.py imports torch) comes before it.
    import time

    import hf_transfer.cli  # noqa: F401
    import hf_transfer.hub  # noqa: F401
    import hf_transfer.pipeline  # noqa: F401 - `hf-transfer train` imports these three before it runs the flow

    IMPORTED = time.time()

import argparse
import importlib
import json
import os
import re
import shutil
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The stages timed inside a run: (stage, where each function is looked up). A function a checkout lacks is left out.
STAGES = {
    "recipe parsing": ["hf_transfer.cli:_recipe_or_help"],
    "data preparation": ["hf_transfer.data.source:MapSource.load"],
    "model loading": ["hf_transfer.pipeline:load_model"],
    "prepare (transforms, freeze plan, precision, store)": ["hf_transfer.pipeline:prepare"],
    "feature cache (read and check / extract)": ["hf_transfer.feature_store:FeatureStore.features"],
    "data doctor": ["hf_transfer.pipeline:check_data"],
    "Trainer set-up": ["hf_transfer.pipeline:build_trainer"],
    "training (epochs, checkpoints)": ["hf_transfer.trainer:SafeTrainer.train"],
    "evaluation": ["hf_transfer.trainer:SafeTrainer.evaluate"],
    "test (cached features, full-model check)": ["hf_transfer.strategies:CachedHead._test"],
    "weights, reports, publishing": ["hf_transfer.pipeline:write_model_repo"],
    "doctor report and contact sheet": ["hf_transfer.data_check:DataCheck.write"],
    "plots": ["hf_transfer.model_repo:plot_training_curves", "hf_transfer.model_repo:plot_confusion_matrix"],
    "Grad-CAM figure": ["hf_transfer.model_repo:save_explanation_figure", "hf_transfer.model_repo:draw_explanations"],
    "model card": ["hf_transfer.model_repo:write_model_card"],
}
FIRST_LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d hf_transfer\.")


# ---- the child: one run, its stages timed ------------------------------------------------------------------------------
class Clock:
    """Exclusive seconds per stage: time spent in an inner timed stage counts for that stage only."""

    def __init__(self):
        self.seconds, self.stack = Counter(), []

    def wrap(self, stage: str, function):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            self.stack.append(0.0)
            try:
                return function(*args, **kwargs)
            finally:
                inner = self.stack.pop()
                elapsed = time.perf_counter() - started
                self.seconds[stage] += elapsed - inner
                if self.stack:
                    self.stack[-1] += elapsed

        return timed


def install(clock: Clock) -> None:
    for stage, targets in STAGES.items():
        for target in targets:
            module_name, _, qualname = target.partition(":")
            try:
                owner = importlib.import_module(module_name)
            except ImportError:
                continue
            *path, name = qualname.split(".")
            for part in path:
                owner = getattr(owner, part, None)
            if owner is not None and callable(getattr(owner, name, None)):
                setattr(owner, name, clock.wrap(stage, getattr(owner, name)))


def child(events: str, argv: list[str]) -> None:
    from hf_transfer.cli import main

    clock = Clock()
    install(clock)
    record = {"imported": IMPORTED}
    sys.argv = ["hf-transfer", "train", *argv]
    try:
        main()  # read from the command line, as the `hf-transfer` script calls it: the command's own process
    finally:
        record.update(finished=time.time(), stages=dict(clock.seconds))
        Path(events).write_text(json.dumps(record))


# ---- the parent: runs, import times, the table ------------------------------------------------------------------------
def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkouts", default="this=.", help="label=path,...: each checkout's runs, in this order")
    parser.add_argument("--recipe", default="recipes/cifar10.yaml")
    parser.add_argument("--dataset", default=None, help="default: the CIFAR-10 mirror (../shared/datasets/cifar10)")
    parser.add_argument("--max-train-samples", type=int, default=1000)
    parser.add_argument("--max-eval-samples", type=int, default=200)
    parser.add_argument("--max-test-samples", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--work", default="/tmp/hf_transfer_warm_rerun", help="datasets caches and output folders (emptied first)")
    parser.add_argument("--top", type=int, default=12, help="packages listed in the import table")
    parser.add_argument("--name", default="warm_rerun", help="results file: benchmarks/results/<name>.md")
    return parser.parse_args()


def one_run(label: str, checkout: Path, run: str, train_argv: list[str], env: dict, work: Path) -> dict:
    from common import load_average

    events = work / f"{label}-{run}.json"
    load = load_average()
    print(f"\n### {label}: {run} run ({checkout})", flush=True)
    started = time.time()
    child_process = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", str(events), *train_argv],
                                     cwd=checkout, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first_line = []

    def read():
        for line in child_process.stdout:
            if not first_line and FIRST_LOG_LINE.match(line):
                first_line.append(time.time())
            print(f"    {line.rstrip()[:150]}", flush=True)

    reader = threading.Thread(target=read)
    reader.start()
    code = child_process.wait()
    ended = time.time()
    reader.join()
    if code:
        raise SystemExit(f"{label}: the {run} run failed (exit code {code})")
    record = json.loads(events.read_text())
    row = {"imports": record["imported"] - started, **record["stages"], "exit": ended - record["finished"]}
    row["other"] = (ended - started) - sum(row.values())
    row["end to end"] = ended - started
    row["first log line"] = first_line[0] - started if first_line else float("nan")
    row["load"] = load
    print(f"### {label}: {run} run done in {ended - started:.1f} s", flush=True)
    return row


def import_costs(checkout: Path, env: dict, top: int) -> tuple[float, list[tuple[str, float, str]]]:
    """Seconds to import what `hf-transfer train` imports, and the `top` top-level packages by self time (summed over
    their modules), each with the hf_transfer module that first imports it."""
    found = subprocess.run([sys.executable, "-X", "importtime", "-c", "import hf_transfer.cli, hf_transfer.hub, hf_transfer.pipeline"],
                           cwd=checkout, env=env, capture_output=True, text=True, check=True)
    per_package, importer, stack, total = Counter(), {}, [], 0.0
    for line in found.stderr.splitlines():
        match = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if not match:
            continue
        self_us, cumulative_us, depth, name = int(match[1]), int(match[2]), len(match[3]), match[4]
        package = name.split(".")[0]
        per_package[package] += self_us / 1e6
        # importtime prints a module after the modules it imports, one level deeper: those are the last lines printed deeper.
        subtree = {package}
        while stack and stack[-1][0] > depth:
            subtree |= stack.pop()[1]
        if name.startswith("hf_transfer"):
            for inner in sorted(subtree - {"hf_transfer"}):
                importer.setdefault(inner, name)  # the innermost hf_transfer module is printed first
        stack.append((depth, subtree))
        if depth == 1:
            total += cumulative_us / 1e6
    return total, [(package, seconds, importer.get(package, "-")) for package, seconds in per_package.most_common(top)]


def main() -> None:
    from common import MIRRORS, RESULTS_DIR, load_average, markdown_table, report

    options = arguments()
    work = Path(options.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    columns, rows, notes, imports = ["stage"], {}, [], []
    for entry in options.checkouts.split(","):
        label, _, path = entry.partition("=")
        checkout = Path(path).resolve()
        cache, output = work / f"{label}-cache", work / f"{label}-out"
        env = {**os.environ, "PYTHONPATH": str(checkout), "HF_DATASETS_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
        train_argv = [str(checkout / options.recipe), "--dataset", str(options.dataset or MIRRORS["cifar10"]),
                      "--max_train_samples", str(options.max_train_samples), "--max_eval_samples", str(options.max_eval_samples),
                      "--max_test_samples", str(options.max_test_samples), "--num_train_epochs", str(options.epochs),
                      "--output_dir", str(output), "--disable_tqdm", "true"]
        first = one_run(label, checkout, "first", train_argv, env, work)
        again = one_run(label, checkout, "warm", train_argv, env, work)  # the identical command, the same folder and cache
        for run, row in (("first", first), ("warm rerun", again)):
            columns.append(f"{label}: {run} (s)")
            for stage, seconds in row.items():
                rows.setdefault(stage, {"stage": stage})[columns[-1]] = seconds
        ratio = again["end to end"] / first["end to end"]
        rows.setdefault("warm / first", {"stage": "warm / first"})[f"{label}: warm rerun (s)"] = round(ratio, 3)
        notes.append(f"{label} ({checkout}): warm rerun / first run = {again['end to end']:.1f} / {first['end to end']:.1f} s = "
                     f"**{ratio:.2f}x**; load average at the start of each run {first['load']} and {again['load']}")
        total, packages = import_costs(checkout, env, options.top)
        imports.append((label, total, packages))
    stage_order = ["first log line", "imports", *STAGES, "exit", "other", "end to end", "warm / first"]
    table_rows = [rows[stage] for stage in stage_order if stage in rows]
    import_tables = []
    for label, total, packages in imports:
        import_tables.append(f"Imports of `hf-transfer train` ({label}): {total:.2f} s in all (`python -X importtime`, self time "
                             f"summed per top-level package; load average {load_average()})\n\n" + markdown_table(
                                 [{"package": package, "seconds": round(seconds, 3), "first imported by": importer}
                                  for package, seconds, importer in packages]))
    notes.append(f"recipe {options.recipe}, CIFAR-10 mirror {options.max_train_samples} / {options.max_eval_samples} / "
                 f"{options.max_test_samples} images, {options.epochs} epochs; each run `hf-transfer train` in its own process; "
                 "the warm rerun is the identical command into the same output folder, with the same datasets cache")
    report(options.name, "A warm rerun against the first run, stage by stage", table_rows, notes, columns)
    addendum = "\n\n".join(import_tables) + "\n\n"
    print(addendum)
    with open(RESULTS_DIR / f"{options.name}.md", "a") as results:
        results.write(addendum)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2], sys.argv[3:])
    else:
        main()
