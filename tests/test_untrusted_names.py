"""Names from outside (class names, folder and image names) read as themselves wherever they are shown: the model card,
the demo page and its Space, the figures and the terminal; config.json and the pipeline keep them intact. Image-folder
names that datasets cannot read are refused in one line that names them.

The hostile names are HTML that would load an image from elsewhere or link to it, a newline followed by a Markdown
heading and a YAML line, a backtick and unbalanced matplotlib mathtext. A real (random-init) model trains on real photos
labelled with them; its card is parsed by huggingface_hub and rendered by markdown-it-py, its demo pages are loaded in
Chromium.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlparse

import datasets
import httpx
import matplotlib.pyplot as plt
import pytest
import yaml
from conftest import IMAGE, TINY_RUN, photos, run_command, sample_rows, user_error, write_dataset
from huggingface_hub import ModelCard
from markdown_it import MarkdownIt
from PIL import Image

from hf_transfer import escape
from hf_transfer.data import load_image_dataset
from hf_transfer.errors import DatasetError
from hf_transfer.options import DataArguments
from hf_transfer.plots import plot_confusion_matrix

NAMES = ['<img src="http://example.invalid/pixel.png" onerror=alert(1)>', "cat\n# Injected\nlicense: evil", "a`b",
         r"$\alpha^$", '<a href="http://example.invalid">x</a>']
UNREADABLE_PATH = "<img src=x onerror=alert(3)>.jpg"  # an image that does not decode: the card names it
DATASET_FOLDER = "data <img src=x onerror=alert(2)>"  # shown in the card's hyperparameters
OUTPUT_FOLDER = "run <img src=x onerror=alert(4)>"  # the card's title and model-index name
FIGURES = ("confusion_matrix.png", "training_curves.png", "explanations.png", "data_suspects.png")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
WAIT_MS = 60_000  # the shared CI machine may render late


# ---- the escaping functions, on their own ---------------------------------------------------------------------------
class Elements(HTMLParser):
    """The elements (tag, attributes) and the text of an HTML document."""

    def __init__(self, document: str):
        super().__init__()
        self.elements, self.text, self.texts_in = [], "", {}
        self._open = []
        self.feed(document)

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))
        self._open.append([tag, ""])

    def handle_endtag(self, tag):
        while self._open:
            name, text = self._open.pop()
            self.texts_in.setdefault(name, []).append(text)
            if self._open:
                self._open[-1][1] += text
            if name == tag:
                break

    def handle_data(self, data):
        self.text += data
        if self._open:
            self._open[-1][1] += data


def render(markdown: str) -> str:
    """Markdown as the Hub renders a card: CommonMark with GFM tables and strikethrough, raw HTML passed through."""
    return MarkdownIt("commonmark").enable(["table", "strikethrough"]).render(markdown)


@pytest.mark.parametrize("name", NAMES + ["a|b", "*x* _y_ [l](u) ~~s~~", "http://example.invalid", "&lt; \x1b[31m"])
def test_each_place_shows_a_name_as_itself(name):
    shown = escape.one_line(name)
    assert "\n" not in shown and "\x1b" not in shown
    for markdown, tags in ((f"x {escape.markdown(name)} y", ["p"]), (f"x {escape.markdown_code(name)} y", ["p", "code"]),
                           (f"| h |\n|---|\n| {escape.markdown(name)} |", ["table", "thead", "tr", "th", "tbody", "tr", "td"])):
        found = Elements(render(markdown))
        assert [tag for tag, _ in found.elements] == tags, markdown
        assert shown in found.text, markdown
    # matplotlib draws the escaped name exactly as the name with math parsing off
    assert _drawn(escape.plot_text(name)) == _drawn(shown, parse_math=False)


def _drawn(text: str, **options) -> bytes:
    figure = plt.figure(figsize=(4, 0.5))
    figure.text(0.01, 0.3, text, **options)
    canvas = io.BytesIO()
    figure.savefig(canvas, format="rgba")
    plt.close(figure)
    return canvas.getvalue()


def test_confusion_matrix_draws_names_that_look_like_mathtext(tmp_path):
    matrix = [[2 if i == j else 0 for j in range(len(NAMES))] for i in range(len(NAMES))]
    assert Image.open(plot_confusion_matrix(matrix, NAMES, tmp_path / "cm.png")).format == "PNG"


def test_demo_examples_are_saved_for_names_too_long_for_a_file_name(tmp_path):
    from hf_transfer.examples import save_examples

    names = ["x" * 300, "\u732b" * 100, "dog"]  # 300 bytes, and 100 characters of 3 bytes each: a file name holds 255
    images, _ = photos("train", 6)
    split = datasets.Dataset.from_dict({"image": images, "labels": [0, 1, 2] * 2},
                                       features=datasets.Features({"image": IMAGE, "labels": datasets.ClassLabel(names=names)}))
    saved = save_examples(split, tmp_path, image_column="image", label_column="labels")
    assert len(saved) == 6 and all(Image.open(path).format == "JPEG" for path in saved)


# ---- image folders whose names datasets cannot read -----------------------------------------------------------------
def _image_folder(root: Path, classes: list[str], per_class: int = 8, file_name=lambda i: f"{i}.jpg") -> Path:
    rows = sample_rows("train")
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            (root / name / file_name(i)).write_bytes(rows[c * per_class + i]["image"]["bytes"])
    return root


@pytest.mark.usefixtures("offline_hub")
def test_a_class_folder_with_a_line_break_is_refused_naming_it(tmp_path, capsys):
    # Three folders: the third was left out with its 8 images, and the run trained on two classes.
    three = _image_folder(tmp_path / "three", ["cat", "dog", "bird\n"])
    with pytest.raises(DatasetError) as refused:
        load_image_dataset(DataArguments(dataset=str(three)))
    assert "the folder 'bird\\n' (8 files) has a line break in its name" in str(refused.value)
    assert "Rename it" in str(refused.value)
    # Two folders: the message said the images were all in one folder ('cat').
    two = _image_folder(tmp_path / "two", ["cat", "dog\nold"])
    message = user_error(capsys, "--dataset", str(two), "--output_dir", str(tmp_path / "out"), *TINY_RUN)
    assert "the folder 'dog\\nold' (8 files) has a line break in its name" in message and "one folder" not in message
    assert not (tmp_path / "out").exists()


@pytest.mark.usefixtures("offline_hub")
def test_an_image_with_a_line_break_or_a_backslash_in_its_name_is_refused(tmp_path):
    # A file with a line break was left out without a word; a backslash anywhere lost every image's class.
    for case, file_name, words in (("newline", lambda i: "a\nb.jpg" if i == 0 else f"{i}.jpg", "the file 'cat/a\\nb.jpg' has a line break"),
                                   ("backslash", lambda i: "a\\b.jpg" if i == 0 else f"{i}.jpg", "the file 'cat/a\\\\b.jpg' has a backslash")):
        folder = _image_folder(tmp_path / case, ["cat", "dog"], file_name=file_name)
        with pytest.raises(DatasetError, match="Rename it") as refused:
            load_image_dataset(DataArguments(dataset=str(folder)))
        assert words in str(refused.value), case


# ---- a run over hostile class names ---------------------------------------------------------------------------------
def _split(split: str, per_class: int, skip: int = 0) -> dict:
    images, _ = photos(split, per_class * len(NAMES) + skip)
    images = images[skip:]
    return {"image": images, "labels": [index % len(NAMES) for index in range(len(images))]}


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory) -> dict:
    """A tiny run (head only, on cached features, so the data doctor runs too) over classes named NAMES."""
    work = tmp_path_factory.mktemp("hostile")
    train = _split("train", 6)
    train["image"].append({"bytes": b"\xff\xd8 not a JPEG", "path": UNREADABLE_PATH})
    train["labels"].append(0)
    dataset = write_dataset(work / DATASET_FOLDER, {"train": train, "validation": _split("train", 1, skip=30),
                                                    "test": _split("test", 2)},
                            {"image": IMAGE, "labels": datasets.ClassLabel(names=NAMES)})
    output_dir = work / OUTPUT_FOLDER
    process = run_command("--dataset", dataset, "--output_dir", str(output_dir), *TINY_RUN, "--freeze", "head_only")
    assert process.returncode == 0, process.stderr[-3000:]
    return {"dir": output_dir, "output": process.stdout + process.stderr}


def test_card_shows_every_name_as_text(hostile_run):
    path = hostile_run["dir"] / "README.md"
    card = ModelCard.load(path)  # huggingface_hub's own parser
    front = yaml.safe_load(path.read_text().split("\n---\n", 1)[0].removeprefix("---\n"))
    assert set(front) <= {"base_model", "datasets", "library_name", "license", "metrics", "model-index", "pipeline_tag", "tags"}
    assert "evil" not in json.dumps(front) and front["model-index"][0]["name"] == OUTPUT_FOLDER
    assert card.data.license == "apache-2.0"  # test_efficientnet's, not the class name's

    tokens = MarkdownIt("commonmark").enable(["table", "strikethrough"]).parse(card.text)
    tokens += [child for token in tokens for child in token.children or []]
    assert not [token.content for token in tokens if token.type.startswith("html")]  # no raw HTML at all
    page = Elements(render(card.text))
    assert page.texts_in["h1"] == [OUTPUT_FOLDER] and not [h for h in page.texts_in["h2"] if "Injected" in h]
    images = [attrs["src"] for tag, attrs in page.elements if tag == "img"]
    links = [attrs["href"] for tag, attrs in page.elements if tag == "a"]
    assert set(images) <= set(FIGURES) and set(links) <= {"data_report.json", "data_suspects.png"}, (images, links)
    assert not [attrs for _, attrs in page.elements if "onerror" in attrs]
    shown = [escape.one_line(name) for name in NAMES]
    assert set(shown) <= set(page.texts_in["code"])  # "Classes (5): `...`"
    assert set(shown) <= set(page.texts_in["td"])  # the per-class table
    assert UNREADABLE_PATH in page.text and DATASET_FOLDER in page.text and OUTPUT_FOLDER in page.text


def test_figures_are_drawn_and_the_model_keeps_the_names(hostile_run):
    from transformers import pipeline

    output_dir = hostile_run["dir"]
    for figure in FIGURES:
        assert Image.open(output_dir / figure).format == "PNG", figure
    report = json.loads((output_dir / "data_report.json").read_text())
    assert report["label_issues"], "no label suspects: the contact sheet would show no class names"
    config = json.loads((output_dir / "config.json").read_text())
    # timm's layout (a timm backbone) stores `label_names`; transformers' `id2label`
    stored = config.get("label_names") or [config["id2label"][str(index)] for index in range(len(NAMES))]
    assert stored == NAMES
    cat = Image.open(Path(__file__).parent / "fixtures" / "cat.jpg")
    predictions = pipeline("image-classification", model=str(output_dir), device="cpu")(cat, top_k=len(NAMES))
    assert sorted(prediction["label"] for prediction in predictions) == sorted(NAMES)
    # In the terminal (the data doctor's summary) a name stays on its line.
    assert "cat\\n# Injected\\nlicense: evil" in hostile_run["output"]
    assert not [line for line in hostile_run["output"].splitlines() if line.startswith(("# Injected", "license: evil"))]


def _wait_for(url: str, process: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(log.read_text())


@pytest.fixture(scope="module", params=["hf-transfer demo", "Space app.py"])
def demo_url(request, hostile_run, tmp_path_factory):
    """The demo of the hostile run, served by `hf-transfer demo` or by the staged Space (no hf_transfer importable)."""
    from hf_transfer.demo import stage_space
    from hf_transfer.examples import examples_from_run

    work = tmp_path_factory.mktemp("demo")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    if request.param == "hf-transfer demo":
        command, cwd = [sys.executable, "-m", "hf_transfer.cli", "demo", str(hostile_run["dir"]), "--port", str(port)], None
    else:
        space = stage_space(work / "space", "user/model", examples_from_run(hostile_run["dir"], work / "examples"))
        env.update(GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port))
        run_space = "import runpy, sys; sys.modules['hf_transfer'] = None; runpy.run_path('app.py', run_name='__main__')"
        command, cwd = [sys.executable, "-c", run_space, "--model", str(hostile_run["dir"])], space
    log = work / "server.log"
    with log.open("w") as output:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=output, stderr=subprocess.STDOUT)
    try:
        _wait_for(f"http://127.0.0.1:{port}/", process, log)
        yield f"http://127.0.0.1:{port}/"
    finally:
        process.kill()
        process.wait(timeout=30)


def test_demo_page_shows_every_name_as_text(demo_url):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            requested, dialogs = [], []
            page.on("request", lambda request: requested.append(request.url))
            page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
            page.goto(demo_url)
            summary = page.locator("[data-testid=markdown]").first
            expect(summary).to_contain_text("Classes:", timeout=WAIT_MS)
            text = summary.inner_text()
            for name in NAMES:
                assert escape.one_line(name) in text, name
            assert page.locator("[data-testid=markdown] img, [data-testid=markdown] a").count() == 0
            # Anywhere on the page: no image from elsewhere or at `x`, no link to elsewhere (the gallery's images are
            # served by the demo, under file names made from the class names).
            images = page.eval_on_selector_all("img", "images => images.map(image => image.src)")
            foreign = [src for src in images if urlparse(src).scheme != "data"  # Gradio's own icons
                       and (urlparse(src).hostname != "127.0.0.1" or urlparse(src).path == "/x")]
            assert not foreign, foreign
            links = page.eval_on_selector_all("a[href]", "links => links.map(link => link.href)")
            assert not [href for href in links if urlparse(href).hostname == "example.invalid"], links

            page.set_input_files("input[type=file]", str(Path(__file__).parent / "fixtures" / "cat.jpg"))
            page.locator('#input-image img[src$="/cat.jpg"]').wait_for(timeout=WAIT_MS)
            page.click("#classify-button")
            top = page.locator("[data-testid=label-output-value]")
            top.wait_for(timeout=WAIT_MS)
            assert top.text_content() in NAMES  # shown as text, whole
            page.wait_for_timeout(500)  # time for any image the page holds to be requested
        finally:
            browser.close()
    assert not dialogs
    assert {urlparse(url).hostname for url in requested} == {"127.0.0.1"}, requested
    assert not [url for url in requested if urlparse(url).path in ("/x", "/pixel.png")]
