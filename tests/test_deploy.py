"""Export, predict and the demo's fast path on trained models, offline: the quickstart model (its int8 graph kept, and refused
when its head is made to lose accuracy in int8), and a transformers backbone (the tiny ViT run) pushed to the loopback Hub
with its graphs and served from there. A re-trained or `--overwrite`n folder loses graphs that no longer match its weights."""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import HUB_TOKEN, REPO, TINY_RUN, TINY_SAMPLE, run_command, run_hub_client, sample_rows
from gradio_client import Client, handle_file
from hub_server import LocalHub
from safetensors.torch import load_file, save_file

from hf_transfer.demo import load_app, stage_space

pytestmark = pytest.mark.slow

CAT = Path(__file__).parent / "fixtures" / "cat.jpg"


def hf_transfer(*argv: str, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """`hf-transfer ...` in its own process, offline unless `env` says otherwise."""
    env = {**(env or {**os.environ, "HF_HUB_OFFLINE": "1"}), "PYTHONPATH": str(REPO)}
    env.pop("HF_TRANSFER_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "hf_transfer.cli", *argv], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    return line


def rows_of(path: Path) -> list[dict]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


@pytest.fixture(scope="module")
def held_out(tmp_path_factory) -> Path:
    """Twelve test photos of the sample, filed as <class>/<name>.jpg."""
    folder = tmp_path_factory.mktemp("held-out")
    for row in sample_rows("test")[:12]:
        (folder / ("cat", "dog")[row["labels"]]).mkdir(exist_ok=True)
        (folder / ("cat", "dog")[row["labels"]] / row["image"]["path"]).write_bytes(row["image"]["bytes"])
    return folder


@pytest.fixture(scope="module")
def quickstart_exported(quickstart_model_dir, tmp_path_factory) -> Path:
    folder = Path(shutil.copytree(quickstart_model_dir, tmp_path_factory.mktemp("exported") / "quickstart"))
    result = hf_transfer("export", str(folder), "--int8")
    assert result.returncode == 0, result.stderr[-3000:]
    return folder


def test_the_quickstart_model_exports_both_graphs_and_its_card_shows_them(quickstart_exported, held_out, tmp_path):
    report = json.loads((quickstart_exported / "onnx" / "export_report.json").read_text())
    results = json.loads((quickstart_exported / "all_results.json").read_text())
    assert report["check"]["images"] == results["split_sizes"]["test"]  # the run's whole test split
    assert report["check"]["pytorch_accuracy"] == pytest.approx(results["test_accuracy"], abs=0.011)  # eager fp32 vs the run's passes
    for graph in report["graphs"].values():
        assert graph["status"] == "kept" and graph["accuracy"] >= report["check"]["pytorch_accuracy"] - 0.01
    assert report["graphs"]["int8"]["quantization"].startswith("static")
    card = (quickstart_exported / "README.md").read_text()
    section = card.split("## Deployment", 1)[1].split("\n## ", 1)[0]
    assert "| `onnx/model_quantized.onnx` | int8 |" in section and "| ONNX int8 |" in section and "| PyTorch eager fp32 |" in section
    assert f"{report['graphs']['int8']['accuracy']:.2%}" in section and "--backend onnx-int8" in section

    # predict with the int8 graph labels held-out photos as the PyTorch pipeline does (this model is sure of them).
    from transformers import pipeline

    classifier = pipeline("image-classification", model=str(quickstart_exported))
    result = hf_transfer("predict", str(quickstart_exported), str(held_out), "--backend", "onnx-int8", "--output", str(tmp_path / "p.csv"))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = rows_of(tmp_path / "p.csv")
    assert len(rows) == 12 and all(row["label_1"] == classifier(str(held_out / row["image"]))[0]["label"] for row in rows)
    assert "Accuracy 100.00% on 12 images with a true label" in result.stdout


def lose_accuracy_in_int8(folder: Path) -> None:
    """Give every class a weight of 1e4 on a feature that is always 0 (its BatchNorm is set to -100 before ReLU6): fp32 computes
    what it computed without that feature, but int8 (a scale per class) gives the head's weights a step of 1e4 / 127, which
    rounds all the others to 0: every image gets the same logits."""
    weights = load_file(folder / "model.safetensors")
    weights["bn2.weight"][7], weights["bn2.bias"][7] = 0.0, -100.0
    weights["classifier.weight"][:, 7] = 1e4
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


def test_an_int8_graph_that_loses_accuracy_is_refused_unless_allowed(quickstart_model_dir, tmp_path):
    folder = Path(shutil.copytree(quickstart_model_dir, tmp_path / "model"))
    lose_accuracy_in_int8(folder)
    message = one_error_line(hf_transfer("export", str(folder), "--int8"))
    assert "The int8 graph was refused, and kept out of onnx/: its test accuracy is" in message and "allowed: 1)" in message
    assert "--allow_accuracy_drop X" in message
    assert sorted(path.name for path in (folder / "onnx").iterdir()) == ["export_report.json", "model.onnx"]
    report = json.loads((folder / "onnx" / "export_report.json").read_text())
    assert report["graphs"]["fp32"]["status"] == "kept" and report["graphs"]["int8"]["status"] == "refused"
    drop = 100 * (report["check"]["pytorch_accuracy"] - report["graphs"]["int8"]["accuracy"])
    assert drop > 1 and f"{drop:.2f} points lower" in message
    app = load_app()
    assert app.fast_graph(str(folder))[0] is None  # the demo serves PyTorch

    result = hf_transfer("export", str(folder), "--int8", "--allow_accuracy_drop", "100")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((folder / "onnx" / "export_report.json").read_text())["graphs"]["int8"]["status"] == "kept"
    assert app.fast_graph(str(folder))[0] is not None


def test_the_demo_serves_the_int8_graph_and_explains_with_pytorch(quickstart_exported):
    from hf_transfer.demo import start_demo

    demo = start_demo(str(quickstart_exported), port=_free_port())
    try:
        client = Client(demo.local_url, verbose=False)
        page = json.dumps(client.config)
        assert "Predictions on this machine: the int8 ONNX graph `onnx/model_quantized.onnx` on onnxruntime (export check: " in page
        assert " ms per image; explanations use the PyTorch model" in page
        assert client.predict(handle_file(str(CAT)), api_name="/classify")["label"] == "cat"
        _, explained = client.predict(handle_file(str(CAT)), api_name="/explain")
        assert explained["label"] == "cat"
    finally:
        demo.close()
    # Weights changed since the export: the graphs no longer belong to them, and the demo serves PyTorch.
    stale = Path(shutil.copytree(quickstart_exported, quickstart_exported.parent / "stale"))
    lose_accuracy_in_int8(stale)
    graph, why = load_app().fast_graph(str(stale))
    assert graph is None and "exported from other weights" in why


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_graphs_go_when_the_folder_gets_a_new_model(tmp_path):
    """A run publishing new weights removes onnx/ (it belongs to the old weights); `--overwrite` treats it as the run's own."""
    output_dir = tmp_path / "run"
    train = [*TINY_SAMPLE, *TINY_RUN, "--output_dir", str(output_dir)]
    for again in ([], ["--overwrite", "true"]):
        assert run_command(*train).returncode == 0
        result = hf_transfer("export", str(output_dir), "--check_images", "8")
        assert result.returncode == 0, result.stderr[-3000:]
        assert (output_dir / "onnx" / "model.onnx").is_file()
        retrained = run_command(*train, *again)
        assert retrained.returncode == 0, retrained.stderr[-3000:]
        assert not (output_dir / "onnx").exists(), again
        assert "## Deployment" not in (output_dir / "README.md").read_text()


PUSH = """
from hf_transfer.hub import push_to_hub
from huggingface_hub import list_repo_files, ModelCard
push_to_hub(params["run"], "user/tiny-vit-onnx")
report({"files": list_repo_files("user/tiny-vit-onnx"), "card": ModelCard.load("user/tiny-vit-onnx").text})
"""

FROM_THE_HUB = """
import numpy as np, onnxruntime as ort
from huggingface_hub import hf_hub_download
from PIL import Image
from transformers import AutoImageProcessor, pipeline
from hf_transfer.demo import load_app
images = params["images"]
classifier = pipeline("image-classification", model="user/tiny-vit-onnx")
session = ort.InferenceSession(hf_hub_download("user/tiny-vit-onnx", "onnx/model_quantized.onnx"))
processor = AutoImageProcessor.from_pretrained("user/tiny-vit-onnx")
pixels = processor(images=[Image.open(image).convert("RGB") for image in images], return_tensors="pt")["pixel_values"].numpy()
logits = session.run(["logits"], {"pixel_values": pixels})[0]
graph, check = load_app().fast_graph("user/tiny-vit-onnx")
report({"pipeline": [classifier(image, top_k=2) for image in images], "int8": np.exp(logits).tolist(), "fast": graph is not None,
        "check": check})
"""


def test_a_transformers_backbone_exported_pushed_and_served_from_the_loopback_hub(run_dir, held_out, tmp_path):
    run = Path(shutil.copytree(run_dir, tmp_path / "run"))
    # The tiny ViT trained 2 epochs on 40 photos: its accuracy is near chance, so any int8 drop is allowed here.
    result = hf_transfer("export", str(run), "--int8", "--allow_accuracy_drop", "100")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((run / "onnx" / "export_report.json").read_text())["graphs"]["fp32"]["agreement"] >= 0.999
    images = [str(path) for path in sorted(held_out.rglob("*.jpg"))]
    with LocalHub(tokens={HUB_TOKEN: "user"}) as hub:
        pushed = run_hub_client(hub, PUSH, tmp_path / "push-home", cwd=REPO, run=str(run))
        assert {"onnx/model.onnx", "onnx/model_quantized.onnx", "onnx/export_report.json"} <= set(pushed["files"])
        assert "## Deployment" in pushed["card"] and 'hf_hub_download("user/tiny-vit-onnx", "onnx/model_quantized.onnx")' in pushed["card"]

        home = tmp_path / "fresh-home"  # a fresh cache: everything comes from the Hub
        served = run_hub_client(hub, FROM_THE_HUB, home, cwd=REPO, images=images)
        assert served["fast"], served["check"]
        env = hub.client_env(hf_home=home)
        outputs = {}
        for backend in ("torch", "onnx", "onnx-int8"):
            extra = ["--inference_precision", "fp32"] if backend == "torch" else []
            result = hf_transfer("predict", "user/tiny-vit-onnx", str(held_out), "--backend", backend, "--top_k", "2", *extra,
                                 "--output", str(tmp_path / f"{backend}.csv"), env=env)
            assert result.returncode == 0, result.stderr[-3000:]
            outputs[backend] = {row["image"]: row for row in rows_of(tmp_path / f"{backend}.csv")}
    names = [Path(image).relative_to(held_out).as_posix() for image in images]
    for backend in ("torch", "onnx"):
        for name, expected in zip(names, served["pipeline"]):
            row = outputs[backend][name]
            assert [row["label_1"], row["label_2"]] == [p["label"] for p in expected]
            assert float(row["score_1"]) == pytest.approx(expected[0]["score"], abs=1e-4)
    for name, exponentials in zip(names, served["int8"]):
        scores = np.asarray(exponentials) / np.sum(exponentials)
        assert float(outputs["onnx-int8"][name]["score_1"]) == pytest.approx(float(scores.max()), abs=1e-5)

    # The Hub is gone: the cached model still predicts, offline.
    result = hf_transfer("predict", "user/tiny-vit-onnx", str(held_out), "--backend", "onnx-int8", "--output", str(tmp_path / "offline.csv"),
                         env={**env, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert rows_of(tmp_path / "offline.csv") == rows_of(tmp_path / "onnx-int8.csv")


RUN_SPACE = "import runpy, sys; sys.modules['hf_transfer'] = None; runpy.run_path('app.py', run_name='__main__')"


def test_the_generated_space_serves_the_int8_graph_from_its_own_files(quickstart_exported, tmp_path):
    space = stage_space(tmp_path / "space", "user/cats-model")
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port),
           "GRADIO_ANALYTICS_ENABLED": "False"}
    env.pop("PYTHONPATH", None)
    log = tmp_path / "space.log"
    with log.open("w") as output:
        server = subprocess.Popen([sys.executable, "-c", RUN_SPACE, "--model", str(quickstart_exported)], cwd=space, env=env,
                                  stdout=output, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert server.poll() is None, log.read_text()
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.5)
        client = Client(f"http://127.0.0.1:{port}", verbose=False)
        assert "the int8 ONNX graph `onnx/model_quantized.onnx` on onnxruntime" in json.dumps(client.config)
        assert client.predict(handle_file(str(CAT)), api_name="/classify")["label"] == "cat"
    finally:
        server.terminate()
        server.wait(timeout=30)
