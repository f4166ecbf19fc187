"""`hf-transfer demo` in a real browser: headless Chromium uploads a cat photo and a corrupt file to the demo
served on 127.0.0.1, and reads the prediction, the map of where the model looked and the error messages from the page."""

from __future__ import annotations

import json
import os
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest
from huggingface_hub import ModelCard
from PIL import Image
from playwright.sync_api import Page, expect, sync_playwright

from hf_transfer.demo import start_demo

REPO_ROOT = Path(__file__).resolve().parent.parent
CAT = Path(__file__).parent / "fixtures" / "cat.jpg"
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS_DIR", REPO_ROOT / "test-artifacts"))
# How long the page may take to show something: generous, as CI runs on a shared machine that once rendered
# the example gallery late.
WAIT_MS = 30_000
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def demo(quickstart_model_dir):
    served = start_demo(str(quickstart_model_dir))  # examples: from the run's test split
    yield served
    served.close()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, demo):
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    requested_hosts = set()
    page.on("request", lambda request: requested_hosts.add(urlparse(request.url).hostname))
    page.goto(demo.local_url)
    page.wait_for_selector("input[type=file]", state="attached")
    yield page
    # The page works offline: no fonts, scripts or analytics from anywhere but the demo server.
    assert requested_hosts == {"127.0.0.1"}
    page.close()


def _upload(page: Page, upload: Path) -> None:
    page.set_input_files("input[type=file]", str(upload))
    # Uploaded: the preview now shows the server's copy of this file.
    page.locator(f'#input-image img[src$="/{upload.name}"]').wait_for(timeout=WAIT_MS)


def _submit(page: Page, upload: Path | None) -> None:
    if upload is not None:
        _upload(page, upload)
    page.click("#classify-button")


def _error_message(page: Page, phrase: str) -> str:
    """The text of the error toast that contains `phrase`, once it has faded in completely."""
    toast = page.get_by_test_id("toast-text").filter(has_text=phrase)
    expect(toast).to_be_visible(timeout=WAIT_MS)  # Playwright counts opacity 0 as visible
    page.wait_for_function("toast => getComputedStyle(toast.closest('[data-testid=toast-body]')).opacity === '1'",
                           arg=toast.element_handle())
    return toast.inner_text()


def _screenshot(page: Page, name: str) -> None:
    """A test artifact: what a visitor sees."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=ARTIFACTS / name, full_page=True)


def test_cat_photo_then_corrupt_file(page, quickstart_model_dir, tmp_path):
    summary = page.locator("[data-testid=markdown]").first.inner_text()
    card = ModelCard.load(quickstart_model_dir / "README.md").data
    results = json.loads((quickstart_model_dir / "all_results.json").read_text())
    assert f"Base model: {card.base_model}" in summary
    assert f"Test accuracy: {results['test_accuracy']:.1%}" in summary

    _submit(page, CAT)
    top_label = page.locator("[data-testid=label-output-value]")
    top_label.wait_for(timeout=WAIT_MS)
    assert top_label.inner_text() == "cat"
    meter = page.locator("[data-testid=cat-confidence-set] meter")
    confidence = float(meter.get_attribute("value"))
    shown = page.locator("[data-testid=cat-confidence-set] .confidence").inner_text()
    assert confidence > 0.5 and shown == f"{round(confidence * 100)}%"
    _screenshot(page, "demo_cat.png")

    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(CAT.read_bytes()[: CAT.stat().st_size // 2])  # a download cut in half
    _submit(page, corrupt)
    message = _error_message(page, "truncated JPEG")
    assert message.startswith("This file cannot be used as an image") and "Traceback" not in page.content()
    _screenshot(page, "demo_corrupt_file.png")


def test_where_did_it_look_draws_the_map_over_the_upload(page, tmp_path):
    page.click("#explain-button")  # the same checks as Classify
    assert _error_message(page, "upload an image") == "Please upload an image first."

    _submit(page, CAT)
    top_label = page.locator("[data-testid=label-output-value]")
    top_label.wait_for(timeout=WAIT_MS)
    drawn = page.locator("#explanation img")
    assert drawn.count() == 0  # Classify alone computes no map: the plain prediction stays as fast as before

    page.click("#explain-button")
    drawn.wait_for(timeout=WAIT_MS)
    assert drawn.get_attribute("src").endswith(".png")
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=drawn.element_handle())
    with Image.open(CAT) as photo:
        assert drawn.evaluate("img => [img.naturalWidth, img.naturalHeight]") == list(photo.size)
    assert top_label.inner_text() == "cat"  # the prediction the map explains
    # Gradio's white veil over a busy output has faded out: the screenshot shows the map as a visitor sees it.
    page.wait_for_function("() => getComputedStyle(document.querySelector('#explanation .wrap')).opacity === '0'")
    _screenshot(page, "demo_explanation.png")

    other = tmp_path / "another_cat.jpg"
    other.write_bytes(CAT.read_bytes())
    _upload(page, other)
    expect(drawn).to_have_count(0)  # a new image: the old image's map is gone


def test_examples_come_from_the_test_split_and_classify_on_click(page):
    examples = page.locator("button.gallery-item img")
    # The gallery renders after the upload box; count() would read it before it exists on a loaded machine.
    expect(examples).to_have_count(4, timeout=WAIT_MS)  # two per class
    examples.first.click()
    top_label = page.locator("[data-testid=label-output-value]")
    top_label.wait_for(timeout=WAIT_MS)
    assert top_label.inner_text() in {"cat", "dog"}


def test_every_kind_of_bad_input_gets_a_message_in_the_page(page, tmp_path):
    _submit(page, None)
    assert _error_message(page, "upload an image") == "Please upload an image first."

    notes = tmp_path / "notes.jpg"
    notes.write_text("These are my holiday pictures.\n")
    _submit(page, notes)
    _error_message(page, "not an image (looks like text)")

    wide = tmp_path / "wide.png"
    Image.new("1", (8000, 5001)).save(wide)  # 40.008 megapixels in a few kB
    _submit(page, wide)
    _error_message(page, "8000×5001 pixels (40.0 megapixels); the limit is 40 megapixels")

    heavy = tmp_path / "heavy.jpg"
    heavy.write_bytes(CAT.read_bytes() + bytes(11 * 2**20))
    page.set_input_files("input[type=file]", str(heavy))  # refused before it is even uploaded
    _error_message(page, "exceed the maximum allowed size")
    assert "Traceback" not in page.content()


def test_server_is_local_only_and_serves_no_other_files(demo):
    assert urlparse(demo.local_url).hostname == "127.0.0.1" and demo.share is False and demo.share_url is None
    for outside in (REPO_ROOT / "pyproject.toml", Path("/etc/hostname"), CAT):
        response = httpx.get(f"{demo.local_url}gradio_api/file={outside}")
        assert response.status_code == 403, outside
    too_big = {"files": ("big.jpg", CAT.read_bytes() + bytes(11 * 2**20), "image/jpeg")}
    assert httpx.post(f"{demo.local_url}gradio_api/upload", files=too_big).status_code == 413
    # The API classifies and explains only files uploaded to it, never a path on the server.
    server_path = {"data": [{"path": str(CAT), "meta": {"_type": "gradio.FileData"}}]}
    for endpoint in ("classify", "explain"):
        event = httpx.post(f"{demo.local_url}gradio_api/call/{endpoint}", json=server_path).json()["event_id"]
        result = httpx.get(f"{demo.local_url}gradio_api/call/{endpoint}/{event}", timeout=30).text
        assert result.startswith("event: error") and "cat" not in result, endpoint
