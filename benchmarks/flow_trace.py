"""How far the recipe travels: follow the recipe object through a run, call by call, and count module hops.

A *stop* is a call, by the `hf_transfer` package itself (not by Trainer's loop), of a package function that receives the recipe, one of its sections
(data, model, freezing, run, doctor, training) or a copy of one (the run's TrainingArguments) as an argument; a *return* is a stop in a module the flow had
already left. Fewer of both means a reader can follow a run without jumping back and forth.

    python benchmarks/flow_trace.py [recipe.yaml] [--key value ...]   # default: the quickstart, 1 epoch

Prints the stops in order and appends the counts to benchmarks/results/flow.md.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from common import offline_logging, report

REPO = Path(__file__).resolve().parents[1]


def trace(argv: list[str]) -> list[tuple[str, str]]:
    from hf_transfer.options import ARGUMENT_CLASSES
    from hf_transfer.pipeline import run
    from hf_transfer.recipe import Recipe, parse_recipe

    recipe = parse_recipe(argv)
    followed = (Recipe, *ARGUMENT_CLASSES)  # the recipe, its sections and their copies (the run's TrainingArguments)
    stops: list[tuple[str, str]] = []

    def profile(frame, event, arg):
        if event != "call":
            return
        module = frame.f_globals.get("__name__", "")
        caller = frame.f_back.f_globals.get("__name__", "") if frame.f_back else ""
        if not (module.startswith("hf_transfer.") and caller.startswith("hf_transfer.")):
            return
        code = frame.f_code
        arguments = [frame.f_locals.get(name) for name in code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]]
        if any(isinstance(value, followed) for value in arguments):
            stops.append((module.removeprefix("hf_transfer."), code.co_qualname))

    stops.append(("pipeline", "run"))
    sys.setprofile(profile)
    try:
        run(recipe)
    finally:
        sys.setprofile(None)
    return stops


def count(stops: list[tuple[str, str]], packages: bool = False) -> tuple[int, int, int]:
    """(stops, modules, returns): a return is a stop in a module left earlier; with `packages`, the modules of a
    sub-package (`data.splits`, `data.stream`) count as one."""
    visited, returns, previous = set(), 0, None
    for module, _ in stops:
        module = module.split(".")[0] if packages else module
        if module != previous and module in visited:
            returns += 1
        visited.add(module)
        previous = module
    return len(stops), len(visited), returns


def main() -> None:
    offline_logging()
    argv = sys.argv[1:] or [str(REPO / "recipes" / "quickstart.yaml"), "--num_train_epochs", "1"]
    with tempfile.TemporaryDirectory() as tmp:
        stops = trace([*argv, "--output_dir", str(Path(tmp) / "out")])
    for module, function in stops:
        print(f"  {module}.{function}")
    total, modules, returns = count(stops)
    _, packages, package_returns = count(stops, packages=True)
    report("flow", "The recipe's path through a run", [{"run": " ".join(argv[1:]) or "defaults", "stops": total, "modules": modules,
                                                       "returns": returns, "packages": packages, "returns between packages": package_returns}],
           notes=[f"recipe: {Path(argv[0]).name}"])


if __name__ == "__main__":
    main()
