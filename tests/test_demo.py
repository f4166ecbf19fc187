"""The demo app and its Space: server-side input checks, model card summary, example export, and a Space
pushed to a local Hub that then runs from its own files, with no hf_transfer installed."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from bad_images import build_corpus
from conftest import RUN_SPACE, free_port, side_by_side, wait_for_server
from datasets import Image as ImageFeature
from datasets import load_dataset
from gradio_client import Client, handle_file
from hub_server import LocalHub
from huggingface_hub import ModelCard, SpaceCard, constants
from PIL import Image

from hf_transfer.demo import (
    SHIPPED_MODULES,
    SPACE_DIR,
    DemoError,
    check_model,
    load_app,
    stage_space,
)
from hf_transfer.examples import examples_from_run
from hf_transfer.precision import native_bf16

REPO_ROOT = Path(__file__).resolve().parent.parent
CAT = Path(__file__).parent / "fixtures" / "cat.jpg"
SAMPLE_DATASET = REPO_ROOT / "recipes" / "data" / "cats_vs_dogs_sample"  # what the quickstart recipe trains on

# The bad-image corpus makes Pillow warn (corrupt EXIF, decompression bombs); those files are meant to be odd.
pytestmark = [pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning"),
              pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")]


@pytest.fixture(scope="module")
def app():
    return load_app()


def test_every_unreadable_file_gets_a_message_naming_the_problem(app, tmp_path):
    cases = [case for case in build_corpus(tmp_path) if case.kind == "unreadable"]
    for case in cases:
        with pytest.raises(gr.Error) as error:
            app.read_upload({"path": str(tmp_path / case.filename)}, tmp_path)
        # A bomb whose header Pillow still parses hits the app's own, lower pixel limit first.
        expected = [case.reason] + (["the limit is 40 megapixels"] if case.reason == "decompression bomb" else [])
        assert any(phrase in error.value.message for phrase in expected), (case.filename, error.value.message)


def test_readable_files_decode_to_rgb(app, tmp_path):
    cases = [case for case in build_corpus(tmp_path) if case.kind == "readable"]
    for case in cases:
        image = app.read_upload({"path": str(tmp_path / case.filename)}, tmp_path)
        assert image.mode == "RGB" and image.size == case.expected.shape[1::-1], case.filename


def test_size_limits_are_enforced_on_the_server(app, tmp_path):
    too_big = tmp_path / "big.jpg"
    too_big.write_bytes(CAT.read_bytes() + bytes(app.MAX_IMAGE_BYTES))  # a valid JPEG with padding after it
    with pytest.raises(gr.Error) as error:
        app.read_upload({"path": str(too_big)}, tmp_path)
    assert f"limit is {app.MAX_IMAGE_BYTES // 2**20} MB" in error.value.message

    width = 8000
    height = app.MAX_IMAGE_PIXELS // width + 1
    too_many_pixels = tmp_path / "wide.png"
    Image.new("1", (width, height)).save(too_many_pixels)  # a real PNG, only a few kB
    assert too_many_pixels.stat().st_size < app.MAX_IMAGE_BYTES
    with pytest.raises(gr.Error) as error:
        app.read_upload({"path": str(too_many_pixels)}, tmp_path)
    assert f"{width}×{height} pixels" in error.value.message and "the limit is 40 megapixels" in error.value.message


def test_card_summary_reports_base_model_and_test_accuracy(app, quickstart_model_dir):
    results = json.loads((quickstart_model_dir / "all_results.json").read_text())
    card = ModelCard.load(quickstart_model_dir / "README.md").data
    summary = app.card_summary(str(quickstart_model_dir), ["cat", "dog"])
    assert f"**Base model:** `{card.base_model}`" in summary
    assert f"**Test accuracy:** {results['test_accuracy']:.1%}" in summary
    assert "**Classes:** cat, dog" in summary


def test_model_is_chosen_by_flag_then_environment(app, monkeypatch):
    monkeypatch.setenv(app.MODEL_ENV, "someone/from-env")
    assert app.resolve_model("someone/from-flag") == "someone/from-flag"
    assert app.resolve_model(None) == "someone/from-env"
    monkeypatch.delenv(app.MODEL_ENV)
    # The repository's template pins no model: without flag or variable the app says what to do.
    with pytest.raises(SystemExit, match=app.MODEL_ENV):
        app.resolve_model(None)


def test_examples_come_from_the_test_split_the_run_was_scored_on(quickstart_model_dir, tmp_path):
    assert examples_from_run(quickstart_model_dir, tmp_path) == tmp_path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat_1.jpg", "cat_2.jpg", "dog_1.jpg", "dog_2.jpg"]
    test_split = load_dataset(str(SAMPLE_DATASET), split="test").cast_column("image", ImageFeature(decode=False))
    first_cat = test_split[test_split["labels"].index(0)]["image"]["bytes"]
    assert (tmp_path / "cat_1.jpg").read_bytes() == first_cat


def test_no_examples_when_the_run_dataset_is_gone(quickstart_model_dir, tmp_path, capsys):
    run_config = json.loads((quickstart_model_dir / "run_config.json").read_text())
    run_config["data"]["dataset"] = str(tmp_path / "moved_away")
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    (output_dir / "run_config.json").write_text(json.dumps(run_config))
    assert examples_from_run(output_dir, tmp_path / "examples") is None
    assert "No example images: Dataset folder" in capsys.readouterr().out
    assert examples_from_run(tmp_path, tmp_path / "examples") is None  # not a training output dir


def test_stage_space_pins_the_model_and_ships_the_app(tmp_path):
    examples = tmp_path / "examples_in"
    examples.mkdir()
    (examples / "cat_1.jpg").write_bytes(CAT.read_bytes())
    space = stage_space(tmp_path / "space", "user/cats-model", examples)
    card = SpaceCard.load(space / "README.md").data
    assert (card.sdk, card.app_file, card.models) == ("gradio", "app.py", ["user/cats-model"])
    assert (space / "app.py").read_bytes() == (SPACE_DIR / "app.py").read_bytes()
    for module, shipped_as in SHIPPED_MODULES.items():
        assert (space / shipped_as).read_bytes() == (REPO_ROOT / "hf_transfer" / module).read_bytes()
    assert "grad-cam" in (space / "requirements.txt").read_text()  # what the shipped explain module imports
    assert (space / "examples" / "cat_1.jpg").read_bytes() == CAT.read_bytes()


PUSH_SCRIPT = """
import sys
from pathlib import Path
from huggingface_hub import HfApi, snapshot_download
from hf_transfer.demo import push_space

model_dir, first_examples, second_examples, download_to = map(Path, sys.argv[1:])
api = HfApi()
api.create_repo("user/cats-model")
api.upload_folder(repo_id="user/cats-model", folder_path=model_dir)
push_space("user/cats-demo", "user/cats-model", examples_dir=first_examples)
url = push_space("user/cats-demo", "user/cats-model", examples_dir=second_examples)  # an update
snapshot_download("user/cats-demo", repo_type="space", local_dir=download_to)
print(url)
"""

def test_pushed_space_runs_from_its_own_files(quickstart_model_dir, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    for folder, names in ((first, ["cat_1.jpg", "cat_2.jpg"]), (second, ["cat_1.jpg"])):
        folder.mkdir()
        for name in names:
            (folder / name).write_bytes(CAT.read_bytes())
    space = tmp_path / "space"
    with LocalHub() as hub:
        pushed = subprocess.run(
            [sys.executable, "-c", PUSH_SCRIPT, str(quickstart_model_dir), str(first), str(second), str(space)],
            cwd=REPO_ROOT, env=hub.client_env(tmp_path / "hf_home_push", token="test-token"),
            capture_output=True, text=True, timeout=120)
        assert pushed.returncode == 0, pushed.stderr
        assert pushed.stdout.strip().endswith("spaces/user/cats-demo")
        assert SpaceCard.load(space / "README.md").data.models == ["user/cats-model"]
        assert sorted(p.name for p in (space / "examples").iterdir()) == ["cat_1.jpg"]  # the update removed cat_2

        port = free_port()
        env = hub.client_env(tmp_path / "hf_home_space")  # a fresh cache: the model comes from the local Hub
        env["GRADIO_SERVER_PORT"] = str(port)
        log = tmp_path / "space.log"
        with log.open("w") as output:
            server = subprocess.Popen([sys.executable, "-c", RUN_SPACE], cwd=space, env=env,
                                      stdout=output, stderr=subprocess.STDOUT)
        try:
            wait_for_server(server, port, log)
            client = Client(f"http://127.0.0.1:{port}", verbose=False)
            prediction = client.predict(handle_file(str(CAT)), api_name="/classify")
            assert prediction["label"] == "cat"
            results = json.loads((quickstart_model_dir / "all_results.json").read_text())
            page_config = json.dumps(client.config)
            assert f"Test accuracy:** {results['test_accuracy']:.1%}" in page_config  # read from the Hub repo
            # The Space decides its predictions' precision on its own hardware (here: this CPU).
            assert f"Predictions on this machine: {'bf16 autocast' if native_bf16('cpu')[0] else 'fp32'}" in page_config

            # The same maps as `hf-transfer demo`, from the shipped hf_transfer_explain.py.
            drawn, explained = client.predict(handle_file(str(CAT)), api_name="/explain")
            assert explained["label"] == "cat"
            with Image.open(drawn) as shown, Image.open(CAT) as photo:
                assert shown.format == "PNG" and shown.size == photo.size  # under the app's MAX_MAP_SIDE
                difference = np.abs(np.asarray(shown.convert("RGB"), np.int16) - np.asarray(photo.convert("RGB"), np.int16))
            assert difference.mean() > 20  # the map is drawn over the photo
        finally:
            server.terminate()
            server.wait(timeout=30)


def _demo_commands(*argvs: tuple[str, ...]) -> list[str]:
    """`hf-transfer demo ...` for each of `argvs`, each in its own process, offline, side by side; assert each stops with
    one error line, code 2, no traceback, and return those lines."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("HF_TRANSFER_DEBUG", None)
    messages = []
    for process in side_by_side(*([sys.executable, "-m", "hf_transfer.cli", "demo", *argv] for argv in argvs), timeout=180,
                                cwd=REPO_ROOT, env=env):
        assert process.returncode == 2 and "Traceback" not in process.stderr, process.stderr
        (message,) = [line for line in process.stderr.splitlines() if line.startswith("error: ")]
        messages.append(message)
    return messages


def test_demo_of_a_folder_that_is_not_a_model_says_what_to_pass(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    for not_a_model, message in zip((tmp_path, CAT), _demo_commands((str(tmp_path),), (str(CAT),))):
        assert f"'{not_a_model}' is not a model folder: it has no config.json" in message
        assert "output dir of a run" in message and "Hub model id" in message


def test_demo_of_a_missing_path_says_it_does_not_exist(tmp_path):
    # A relative path of two parts is also a valid Hub id: offline, the Hub cannot have it either.
    missing, relative = _demo_commands((str(tmp_path / "no-such-run"),), ("outputs/no-such-run",))
    assert f"The model folder '{tmp_path / 'no-such-run'}' does not exist" in missing
    assert "Cannot load the model 'outputs/no-such-run': there is no such folder here" in relative
    assert "output dir of a run" in relative


def test_offline_a_hub_id_is_refused_before_gradio_loads_unless_it_is_cached(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(DemoError, match="'user/absent': there is no such folder here, and the Hub is off"):
        check_model("user/absent")
    snapshot = tmp_path / "models--user--cached" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "models--user--cached" / "refs").mkdir()
    (tmp_path / "models--user--cached" / "refs" / "main").write_text("0" * 40)
    check_model("user/cached")  # in the cache: it loads offline, as transformers will find


def test_demo_on_a_busy_port_names_the_port_and_the_fix(quickstart_model_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        (message,) = _demo_commands((str(quickstart_model_dir), "--port", str(port)))
    assert f"Port {port} on 127.0.0.1 is in use" in message and "--port N" in message
