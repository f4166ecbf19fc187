"""Shared fixtures: real photos from the repo's cats-vs-dogs sample and one trained quickstart model."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import timm
import torch
from huggingface_hub import constants as hub_constants
from PIL import Image
from torch import nn
from transformers import AutoModelForImageClassification, TimmWrapperConfig, TimmWrapperForImageClassification

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
SAMPLE = REPO / "recipes" / "data" / "cats_vs_dogs_sample"
QUICKSTART = REPO / "recipes" / "quickstart.yaml"


def sample_rows(split: str) -> list[dict]:
    """Rows of the shipped sample: {'image': {'bytes', 'path'}, 'labels': 0 (cat) | 1 (dog)}."""
    return pq.read_table(SAMPLE / "data" / f"{split}-00000-of-00001.parquet").to_pylist()


def sample_tensors(count: int = 16, size: int = 64) -> tuple[list[torch.Tensor], list[int]]:
    """The first `count` training photos of the sample as `size` px float tensors in [0, 1], and their labels."""
    rows = sample_rows("train")[:count]
    images = [Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB").resize((size, size)) for row in rows]
    return [torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255 for image in images], [row["labels"] for row in rows]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A datasets cache of the module's own, offline: feature-cache entries start cold in each module."""
    path = tmp_path_factory.mktemp("datasets_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", str(path))
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield path


@pytest.fixture(scope="session")
def test_photos() -> list[tuple[Image.Image, str]]:
    """Held-out photos (never trained on) with their true label name."""
    names = ("cat", "dog")
    return [(Image.open(io.BytesIO(row["image"]["bytes"])), names[row["labels"]]) for row in sample_rows("test")[:12]]


@pytest.fixture(scope="session")
def quickstart_model_dir(tmp_path_factory) -> Path:
    """The README's main job, run once for the whole session (about a minute on 2 cores)."""
    from hf_transfer import finetune

    output_dir = tmp_path_factory.mktemp("quickstart") / "model"
    finetune(str(QUICKSTART), output_dir=str(output_dir))
    assert json.loads((output_dir / "all_results.json").read_text())["test_accuracy"] > 0.5
    return output_dir


# ---- the fast lane: `pytest -m "not slow"` trains nothing -------------------------------------------------------
# A helper that trains a model (in this process or through a command) is decorated `@trains`. A test that reaches one,
# directly or through test helpers and fixtures, is marked `slow` at collection; a test that trains anyway in the fast
# lane fails, naming itself (the guard below), so the lanes cannot drift apart as tests are added.
TRAINING: set = set()
TRAINING_NAMES = {"finetune", "run_training"}  # hf_transfer's own entry points that train


def trains(function):
    """Mark `function` (a test helper) as one that trains a model: the tests that call it are `slow`."""
    TRAINING.add(function)
    return function


def _referenced(function) -> tuple[set[str], dict]:
    """The global and attribute names `function` uses, and the entry points called in Python code it passes as text."""
    names, codes = set(), [function.__code__]
    while codes:
        code = codes.pop()
        names.update(code.co_names)
        codes.extend(const for const in code.co_consts if isinstance(const, types.CodeType))
        names.update(name for const in code.co_consts if isinstance(const, str) for name in TRAINING_NAMES if f"{name}(" in const)
    return names, function.__globals__


def _reaches_training(function, seen: set) -> bool:
    """Whether `function` calls a `@trains` helper or hf_transfer's training entry points, through test code."""
    if not isinstance(function, types.FunctionType) or function in seen:
        return False
    seen.add(function)
    if function in TRAINING:
        return True
    names, namespace = _referenced(function)
    if names & TRAINING_NAMES:  # `hf_transfer.finetune(...)`: an attribute, not a global
        return True
    for name in names:
        value = namespace.get(name)
        if isinstance(value, types.FunctionType) and value.__code__.co_filename.startswith(str(TESTS)) and _reaches_training(value, seen):
            return True
    return False


def pytest_collection_modifyitems(items):
    for item in items:
        functions = [getattr(item, "function", None)]
        functions += [definition.func for name in item.fixturenames
                      for definition in item._fixtureinfo.name2fixturedefs.get(name, ())]
        seen: set = set()
        if any(_reaches_training(function, seen) for function in functions):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _fast_lane_trains_nothing(request, monkeypatch):
    """In the fast lane, `Trainer.train` fails the test: it trains without going through a `@trains` helper."""
    if request.node.get_closest_marker("slow") is None:
        import transformers

        def refuse(*args, **kwargs):
            pytest.fail(f"{request.node.nodeid} trains a model but is not marked slow: train through a @trains helper of conftest.py")

        monkeypatch.setattr(transformers.Trainer, "train", refuse)
    yield


# A random-init test network and a handful of images: a run that gets past the checks takes seconds.
TINY_RUN = ("--model", "test_efficientnet", "--pretrained", "false", "--freeze", "full", "--validation_size", "4",
            "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8", "--num_train_epochs", "1",
            "--save_strategy", "no", "--load_best_model_at_end", "false", "--report_to", "none")
TINY_SAMPLE = ("--dataset", str(SAMPLE), "--max_train_samples", "8", "--max_eval_samples", "4", "--max_test_samples", "16")
CLASSES = ["cat", "dog"]


@trains
def train_command(*argv: str) -> list[str]:
    """The command line of `hf-transfer train ...` in a process of its own (to start, watch or kill it)."""
    return [sys.executable, "-m", "hf_transfer.cli", "train", *argv]


def run_command(*argv: str, env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    """`hf-transfer train ...` in its own process, offline unless `env` says otherwise."""
    env = env or {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("HF_TRANSFER_DEBUG", None)
    return subprocess.run(train_command(*argv), cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def side_by_side(*commands: list[str], timeout: float = 300, **options) -> list[subprocess.CompletedProcess]:
    """Run `commands` at once, each in its own process (`subprocess.Popen` `options` shared: cwd, env), and return each
    one's result, text output captured: a command-line test spends most of its time importing torch and transformers,
    one core's work, and this machine has two."""
    running = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **options) for command in commands]
    done = []
    try:
        for command, process in zip(commands, running):  # the others go on while one is read
            out, err = process.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(command, process.returncode, out, err))
    finally:  # a timeout leaves no process behind
        for process in running:
            if process.poll() is None:
                process.kill()
    return done


HUB_TOKEN = "hf_secret_sentinel_123"  # the test Hub owner's token: no output and no file may hold it
_CLIENT_RESULT = "RESULT-JSON:"


def run_hub_client(hub, code: str, home: Path, token: str | None = HUB_TOKEN, cwd: Path | None = None, **params) -> dict:
    """Run `code` in a fresh Python with the test Hub's client environment (HF_HOME `home`, `token`), in `cwd` (default:
    `home`'s parent); it reads `params` and calls `report(dict)`, whose dict comes back. The token must not be printed."""
    env = {**hub.client_env(hf_home=home, token=token), "PYTHONPATH": str(REPO)}
    prelude = ("import json, sys\nparams = json.loads(sys.stdin.read())\n"
               f"def report(result):\n    print({_CLIENT_RESULT!r} + json.dumps(result), flush=True)\n")
    process = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], input=json.dumps(params), env=env,
                             cwd=cwd or home.parent, capture_output=True, text=True, timeout=600)
    output = process.stdout + process.stderr
    assert token is None or token not in output, "the token was printed"
    assert process.returncode == 0, output[-4000:]
    return json.loads(next(line for line in process.stdout.splitlines() if line.startswith(_CLIENT_RESULT))[len(_CLIENT_RESULT):])


LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--dynamo_backend", "no"]
FINETUNE = str(TESTS / "finetune_checked.py")  # recipes/finetune.py, failing a run that ends with its process group alive


@trains
def launch_processes(*argv: str, env: dict, processes: int = 2, mixed_precision: str = "no", timeout: float = 300) -> subprocess.CompletedProcess:
    """`accelerate launch --multi_gpu --num_processes N recipes/finetune.py ...`: N CPU processes (gloo) on this machine."""
    launch = [*LAUNCH, "--mixed_precision", mixed_precision, "--num_processes", str(processes), "--num_machines", "1",
              "--main_process_port", str(free_port())]
    return subprocess.run([*launch, FINETUNE, *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@trains
def training_error(capsys, *argv: str) -> str:
    """`user_error` for a run that trains before it stops (a diverging loss, a shard that breaks mid-stream)."""
    return user_error(capsys, *argv)


@trains
def tiny_run(output_dir: Path, *options: str) -> Path:
    """A TINY_RUN on TINY_SAMPLE in this process, into `output_dir`, with `options` on top."""
    train_in_process(*TINY_SAMPLE, *TINY_RUN, "--output_dir", str(output_dir), *options)
    return output_dir


@trains
def train_in_process(*argv: str) -> None:
    """`hf-transfer train ...` in this process."""
    from hf_transfer.cli import main

    main(["train", *argv])


def free_port() -> int:
    """A TCP port nobody listens on now (other runs may hold accelerate's 29500 or Gradio's 7860)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# Runs a downloaded Space the way Spaces do (`python app.py`), with hf_transfer made unimportable.
RUN_SPACE = "import runpy, sys; sys.modules['hf_transfer'] = None; runpy.run_path('app.py', run_name='__main__')"


def wait_for_server(process: subprocess.Popen, port: int, log: Path, timeout: float = 90) -> None:
    """Wait until `process` listens on `port`; fail with its log if it exits or takes longer than `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the server exited:\n{log.read_text()}"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"the server did not start within {timeout} s:\n{log.read_text()}")


def user_error(capsys, *argv: str) -> str:
    """Run `hf-transfer train ...` here; assert it stops with exit code 2 and no traceback; return the message."""
    from hf_transfer.cli import main

    with pytest.raises(SystemExit) as stopped:
        main(["train", *argv])
    err = capsys.readouterr().err
    assert stopped.value.code == 2, err
    assert "Traceback" not in err
    message = [line[line.index("error: "):] for line in err.splitlines() if "error: " in line]  # after any progress bar
    assert len(message) == 1, err
    return message[0]


@pytest.fixture
def offline_hub(monkeypatch):
    """No Hub for this test: huggingface_hub answers as with HF_HUB_OFFLINE=1, and the reachability probe is reset."""
    monkeypatch.delenv("HF_TRANSFER_DEBUG", raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    from hf_transfer import offline

    offline.hub_reachable.cache_clear()
    yield
    offline.hub_reachable.cache_clear()


def write_dataset(folder: Path, splits: dict[str, dict[str, list]], features: dict) -> str:
    """Write a Hub-layout parquet dataset; label values are stored as given, even out of the ClassLabel's range."""
    stored = {name: datasets.Value("int64") if isinstance(feature, datasets.ClassLabel) else feature
              for name, feature in features.items()}
    for split, columns in splits.items():
        table = datasets.Dataset.from_dict(columns, features=datasets.Features(stored)).data
        dataset = datasets.Dataset(table, info=datasets.DatasetInfo(features=datasets.Features(features)))
        dataset.to_parquet(str(folder / "data" / f"{split}-00000-of-00001.parquet"))
    return str(folder)


def photos(split: str, count: int, label: int | None = None) -> tuple[list[dict], list[int]]:
    rows = [row for row in sample_rows(split) if label is None or row["labels"] == label][:count]
    return [row["image"] for row in rows], [row["labels"] for row in rows]


def labelled(split: str, count: int, label: int | None = None) -> dict:
    images, labels = photos(split, count, label)
    return {"image": images, "labels": labels}


IMAGE, LABEL = datasets.Image(), datasets.ClassLabel(names=CLASSES)


# ---- model folders and the tiny ViT run, shared by the freezing, DDP, card and hub tests ----------------------------

def model_photos(model: TimmWrapperForImageClassification, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` cat and dog photos from the repo's sample, preprocessed for `model`, with their labels."""
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model.timm_model))
    rows = sample_rows("train")[:count]
    from hf_transfer.images import load_image

    return torch.stack([transform(load_image(row["image"])) for row in rows]), torch.tensor([row["labels"] for row in rows])


def calibrate_batchnorm(model: TimmWrapperForImageClassification) -> None:
    """BatchNorm statistics of a fresh model are 0 / 1, and in eval mode its activations then vanish
    (features ~1e-14, no gradient). Set them from real photos, as pretraining would have."""
    norms = [module for module in model.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    images, _ = model_photos(model, 16)
    for module in norms:
        module.reset_running_stats()
        module.momentum = None  # a plain average over the batch
    model.train()
    with torch.no_grad():
        model(pixel_values=images)
    for module in norms:
        module.momentum = 0.1


def save_timm_model(path: Path, architecture: str, image_size: int = 32, **model_args) -> Path:
    """A randomly initialised timm model at a small input size, saved as a local model folder."""
    pretrained_cfg = timm.models.get_pretrained_cfg(architecture).to_dict()
    pretrained_cfg.pop("num_classes", None)
    pretrained_cfg["input_size"] = (3, image_size, image_size)
    config = TimmWrapperConfig(architecture=architecture, pretrained_cfg=pretrained_cfg, model_args=model_args or None, **dict(num_labels=2, id2label=dict(enumerate(CLASSES)), label2id={label: i for i, label in enumerate(CLASSES)}))
    torch.manual_seed(0)
    model = TimmWrapperForImageClassification(config)
    calibrate_batchnorm(model)
    model.save_pretrained(path)
    return path


def load(model_dir: Path) -> nn.Module:
    from hf_transfer.models import load_model
    from hf_transfer.options import ModelArguments

    return load_model(ModelArguments(model=str(model_dir)), CLASSES)[0]


def block_tensors(model_dir: Path) -> dict[str, list[str]]:
    """Block name -> its parameters and the buffers (BatchNorm statistics) of the modules holding them."""
    from hf_transfer.blocks import discover_blocks

    model = load(model_dir)
    buffers = [name for name, _ in model.named_buffers()]
    result = {}
    for block in discover_blocks(model):
        modules = {name.rsplit(".", 1)[0] for name in block.parameter_names}
        result[block.name] = block.parameter_names + [b for b in buffers if b.rsplit(".", 1)[0] in modules]
    return result


def changed_blocks(blocks: dict[str, list[str]], before: dict, after: dict) -> set[str]:
    return {name for name, tensors in blocks.items() if any(not torch.equal(before[t], after[t]) for t in tensors)}


def weights(path: Path) -> dict[str, torch.Tensor]:
    """Parameters and buffers of a saved model, by their in-memory names (transformers may rename them on disk)."""
    return AutoModelForImageClassification.from_pretrained(path).state_dict()


# --- block discovery ---------------------------------------------------------------------------


@trains
def train_tiny_run(workdir: Path) -> Path:
    """Fine-tune a ViT with hidden size 256 (a 6.5 MB model.safetensors, so a push takes the LFS path)."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    from hf_transfer import finetune

    dataset = workdir / "cats-dogs-40" / "data"
    dataset.mkdir(parents=True)
    train = pq.read_table(SAMPLE / "data" / "train-00000-of-00001.parquet")
    rows = train.slice(0, 40).to_pylist()
    rows[5]["image"]["bytes"] = rows[5]["image"]["bytes"][:300]  # a truncated JPEG, as real datasets have
    pq.write_table(pa.Table.from_pylist(rows, schema=train.schema), dataset / "train-00000-of-00001.parquet")
    pq.write_table(pq.read_table(SAMPLE / "data" / "test-00000-of-00001.parquet").slice(0, 16),
                   dataset / "test-00000-of-00001.parquet")

    base = workdir / "tiny-vit"  # a local "pretrained" model: random weights, real architecture and processor
    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=256, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=1024)
    ViTForImageClassification(config).save_pretrained(base)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(base)

    output_dir = workdir / "run"
    finetune(dataset=str(dataset.parent), model=str(base), output_dir=str(output_dir), freeze="fastai",
             num_train_epochs=2, validation_size=8, per_device_train_batch_size=8, seed=0, disable_tqdm=True)
    return output_dir


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory) -> Path:
    """One training run per session, shared by the card and hub tests (a fresh copy per module)."""
    workdir = tmp_path_factory.getbasetemp() / "tiny-vit-run"
    if not (workdir / "run" / "all_results.json").is_file():
        train_tiny_run(workdir)
    return workdir / "run"


def doctor_features(recipe, data=None) -> dict:
    """The data doctor's `{split: (features, labels)}` of a recipe's data, prepared as `hf-transfer doctor` prepares it
    (`data`: data already in hand instead of the recipe's dataset)."""
    from hf_transfer.data.source import MapSource
    from hf_transfer.data_check import split_features
    from hf_transfer.pipeline import prepare, run_arguments

    return split_features(prepare(recipe, run_arguments(recipe), MapSource(recipe), data).store)


@pytest.fixture(autouse=True)
def _strict_card_templates(monkeypatch):
    """Every card (and card section) a test renders in its process fails on a value its template reads but was not given:
    jinja2 renders one as nothing, and huggingface_hub's ModelCard.from_template takes no `undefined` to say otherwise."""
    import jinja2

    class StrictTemplate(jinja2.Template):
        def __new__(cls, source, **options):
            return super().__new__(cls, source, **{**options, "undefined": jinja2.StrictUndefined})

    monkeypatch.setattr(jinja2, "Template", StrictTemplate)
