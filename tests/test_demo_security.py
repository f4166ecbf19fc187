"""The demo's classify API reads only what Gradio received for the request, through real HTTP.

Each test runs against two real servers in their own processes: `hf-transfer demo` and spaces_demo/app.py staged
and started the way a Space runs it (`python app.py`, no hf_transfer importable), bound to 127.0.0.1 here. Requests
are raw httpx POSTs to the Gradio API that name files on the server, with and without Gradio's FileData marker,
and normal uploads through gradio_client.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import RUN_SPACE, free_port, wait_for_server
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from hf_transfer.demo import load_app, stage_space
from hf_transfer.examples import examples_from_run

REPO_ROOT = Path(__file__).resolve().parent.parent
CAT = Path(__file__).parent / "fixtures" / "cat.jpg"
FILE_DATA = {"_type": "gradio.FileData"}  # the marker Gradio's own client puts on file payloads
SECRET = "password=hunter2"
# Enough for one CPU classification on a loaded 2-core machine; a request that blocks on a FIFO never returns.
REQUEST_TIMEOUT = 30


@pytest.fixture(scope="module")
def refusal() -> str:
    return load_app().NOT_UPLOADED_MESSAGE


@pytest.fixture(scope="module", params=["hf-transfer demo", "Space app.py"])
def server(request, quickstart_model_dir, tmp_path_factory):
    """A running demo: its URL, its Gradio upload folder, and files outside that folder."""
    work = tmp_path_factory.mktemp("demo-server")
    cache = work / "gradio-cache"  # GRADIO_TEMP_DIR: the only folder the app may read requests' files from
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_TEMP_DIR": str(cache), "GRADIO_ANALYTICS_ENABLED": "False"}
    port = free_port()
    if request.param == "hf-transfer demo":
        command, cwd = [sys.executable, "-m", "hf_transfer.cli", "demo", str(quickstart_model_dir), "--port", str(port)], REPO_ROOT
    else:
        examples = examples_from_run(quickstart_model_dir, work / "examples")
        space = stage_space(work / "space", "user/cats-model", examples)
        # A Space sets GRADIO_SERVER_NAME=0.0.0.0; the test binds loopback only.
        env.update(GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port))
        command, cwd = [sys.executable, "-c", RUN_SPACE, "--model", str(quickstart_model_dir)], space
    log = work / "server.log"
    with log.open("w") as output:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=output, stderr=subprocess.STDOUT)
    try:
        wait_for_server(process, port, log, timeout=180)
        outside = work / "outside"
        outside.mkdir()
        (outside / "secret.txt").write_text(SECRET + "\n")
        (outside / "cat.jpg").write_bytes(CAT.read_bytes())
        yield {"url": f"http://127.0.0.1:{port}/", "cache": cache, "outside": outside, "model": quickstart_model_dir,
               "log": log}
    finally:
        process.kill()
        process.wait(timeout=30)


def classify(server: dict, payload) -> tuple[str, object]:
    """POST one payload to the classify endpoint as raw JSON; return the final SSE event and its data.

    The deadline covers the whole answer: Gradio sends a heartbeat every 15 s, so a per-read timeout never fires.
    """
    base = f"{server['url']}gradio_api/call/classify"
    event_id = httpx.post(base, json={"data": [payload]}, timeout=REQUEST_TIMEOUT).json()["event_id"]
    deadline = time.monotonic() + REQUEST_TIMEOUT
    event = None
    with httpx.stream("GET", f"{base}/{event_id}", timeout=REQUEST_TIMEOUT) as stream:
        for line in stream.iter_lines():
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: ") and event in ("complete", "error"):
                return event, json.loads(line.removeprefix("data: "))
            if time.monotonic() > deadline:
                break
    raise TimeoutError(f"no answer to {payload} within {REQUEST_TIMEOUT} s")


def top_label(event: str, data) -> str:
    assert event == "complete", data
    return data[0]["label"]


def test_an_upload_through_gradio_client_is_classified(server):
    client = Client(server["url"], verbose=False)
    assert client.predict(handle_file(str(CAT)), api_name="/classify")["label"] == "cat"
    assert any(server["cache"].rglob("cat.jpg"))  # Gradio stored the upload in its own folder


def test_examples_still_classify(server):
    """The page sends an example's cached copy, as a click on it does."""
    client = Client(server["url"], verbose=False)
    (gallery,) = [c for c in client.config["components"] if c["type"] == "dataset"]
    samples = [sample[0] for sample in gallery["props"]["samples"]]
    assert len(samples) == 4
    for sample in samples:
        assert Path(sample["path"]).resolve().is_relative_to(server["cache"].resolve())
        assert top_label(*classify(server, sample)) in {"cat", "dog"}


def test_image_data_in_the_request_is_classified(server):
    data_url = "data:image/jpeg;base64," + base64.b64encode(CAT.read_bytes()).decode()
    assert top_label(*classify(server, {"url": data_url})) == "cat"
    too_big = "data:image/jpeg;base64," + base64.b64encode(CAT.read_bytes() + bytes(11 * 2**20)).decode()
    event, data = classify(server, {"url": too_big})
    assert event == "error" and "the limit is 10 MB" in data["error"]


def _server_paths(server: dict) -> dict[str, str]:
    """Paths a request may name that Gradio did not receive for it: each must get the same refusal."""
    cache, outside = server["cache"], server["outside"]
    planted = cache / "planted"  # as if another process or an earlier bug left these in the upload folder
    planted.mkdir(parents=True, exist_ok=True)
    links = {"link-to-cat.jpg": outside / "cat.jpg", "link-to-secret.txt": outside / "secret.txt"}
    for name, target in links.items():
        if not (planted / name).is_symlink():
            (planted / name).symlink_to(target)
    if not (cache / "linked-folder").is_symlink():
        (cache / "linked-folder").symlink_to(outside, target_is_directory=True)
    return {
        "text file elsewhere": str(outside / "secret.txt"),
        "image elsewhere": str(outside / "cat.jpg"),
        "missing file elsewhere": str(outside / "missing.jpg"),
        "the model's weights": str(server["model"] / "model.safetensors"),
        "a device": "/dev/null",
        "a relative path": "tests/fixtures/cat.jpg",
        "a path escaping the cache": f"{cache}/planted/../../outside/cat.jpg",
        "a link in the cache to an image": str(planted / "link-to-cat.jpg"),
        "a link in the cache to a text file": str(planted / "link-to-secret.txt"),
        "an image below a linked folder": str(cache / "linked-folder" / "cat.jpg"),
        "a folder in the cache": str(planted),
        "a missing file in the cache": str(cache / "no-such-upload" / "cat.jpg"),
    }


def test_server_files_are_refused_alike(server, refusal):
    for name, path in _server_paths(server).items():
        # Without the marker the payload reaches the app as is: the app refuses it, in the same words every time.
        event, data = classify(server, {"path": path})
        assert (event, data["error"]) == ("error", refusal), (name, data)
        # With it, Gradio refuses paths outside its folder (no message); the app refuses what lies inside.
        event, data = classify(server, {"path": path, "meta": FILE_DATA})
        assert event == "error" and data["error"] in (None, refusal), (name, data)
    # gradio_client passes a dict it did not upload through unchanged: the same refusal.
    with pytest.raises(AppError) as refused:
        Client(server["url"], verbose=False).predict({"path": str(server["outside"] / "secret.txt")}, api_name="/classify")
    assert str(refused.value) == refusal
    assert SECRET not in server["log"].read_text()


def test_a_fifo_in_the_cache_is_never_opened(server, refusal):
    """Opening a FIFO for reading waits for a writer: one request would stall the queue for every visitor."""
    fifo = server["cache"] / "planted-fifo.jpg"
    os.mkfifo(fifo)
    try:
        for payload in ({"path": str(fifo)}, {"path": str(fifo), "meta": FILE_DATA}):
            event, data = classify(server, payload)
            assert (event, data["error"]) == ("error", refusal), data
    finally:
        try:  # on a build that blocks in open(), a writer lets it go so the server can be stopped
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
    client = Client(server["url"], verbose=False)
    assert client.predict(handle_file(str(CAT)), api_name="/classify")["label"] == "cat"  # the queue still runs
