"""`hf-transfer select` with no `--candidates` against a Hub that answers (tests/hub_server.py): every id of HUB_CANDIDATES,
served under that id with timm's own files and random weights, is measured, and the report and selected recipe name one."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import timm
import yaml
from conftest import QUICKSTART, REPO
from hub_server import LocalHub

from hf_transfer.repo_files import SELECTED_RECIPE, SELECTION
from hf_transfer.selection import HUB_CANDIDATES

pytestmark = pytest.mark.slow  # six 224 px backbones, each loaded from the Hub, extracted and timed

# Each id built by timm under its own name (architecture and pretrained tag), random weights, saved as timm saves for the
# Hub (`save_for_hf`: config.json with architecture, num_classes, pretrained_cfg; model.safetensors) and uploaded there.
PUBLISH = """
import sys, timm, torch
from huggingface_hub import HfApi
from timm.models import save_for_hf
home = sys.argv[1]
for hub_id in sys.argv[2:]:
    torch.manual_seed(0)
    folder = f"{home}/{hub_id}"
    save_for_hf(timm.create_model(hub_id.removeprefix("timm/"), pretrained=False), folder, safe_serialization=True)
    HfApi().create_repo(hub_id, exist_ok=True)
    HfApi().upload_folder(repo_id=hub_id, folder_path=folder)
"""

# The select process may reach loopback only: any other connection or name lookup is logged and refused, so a run that
# needed the real internet fails here even on a machine that has it.
NO_INTERNET = """
import ipaddress, os, socket
def _local(host):
    host = host.decode() if isinstance(host, bytes) else str(host)
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return host == "localhost"
def _refuse(what):
    with open(os.environ["REFUSED_LOG"], "a") as log:
        log.write(what + "\\n")
    raise OSError(f"the test allows loopback only: {what}")
def _guard(method):
    def guarded(self, address, *args):
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _local(address[0]):
            _refuse(f"connect {address!r}")
        return method(self, address, *args)
    return guarded
socket.socket.connect, socket.socket.connect_ex = _guard(socket.socket.connect), _guard(socket.socket.connect_ex)
_getaddrinfo = socket.getaddrinfo
def _lookup(host, *args, **kwargs):
    if host is not None and not _local(host):
        _refuse(f"getaddrinfo {host!r}")
    return _getaddrinfo(host, *args, **kwargs)
socket.getaddrinfo = _lookup
import sys
from hf_transfer.cli import main
main(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def hub_select(tmp_path_factory):
    """The test Hub serving HUB_CANDIDATES, and `hf-transfer select` of the quickstart recipe, no candidates named, in a process
    pointed at it (HF_ENDPOINT) with HF_HUB_OFFLINE unset: (selection.json, output folder, published model folders, the Hub
    requests of the select process, its log of refused connections)."""
    home = tmp_path_factory.mktemp("hub_select")
    with LocalHub(username="timm") as hub:
        published = subprocess.run([sys.executable, "-c", PUBLISH, str(home / "published"), *HUB_CANDIDATES],
                                   env=hub.client_env(home / "publisher", token="hf_publisher"),
                                   capture_output=True, text=True, timeout=300)
        assert published.returncode == 0, published.stderr[-3000:]
        env = hub.client_env(home / "hf")
        env.pop("HF_HUB_OFFLINE")  # unset: the probe against HF_ENDPOINT alone decides that the Hub is reachable
        env.update(REFUSED_LOG=str(home / "refused.log"), PYTHONPATH=str(REPO))
        env.pop("HF_TRANSFER_DEBUG", None)
        output = home / "select"
        published_requests = len(hub.requests)
        # A tiny sample (16 train, 4 validation images) and batches of 4 for the timing: the models stay full size.
        done = subprocess.run([sys.executable, "-c", NO_INTERNET, "select", str(QUICKSTART), "--sample", "16",
                               "--per_device_eval_batch_size", "4", "--disable_tqdm", "true", "--output_dir", str(output)],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        requests = hub.requests[published_requests:]
        yield json.loads((output / SELECTION).read_text()), output, home / "published", requests, home / "refused.log"


def test_every_hub_candidate_is_measured_with_the_served_model(hub_select):
    report, _, published, _, _ = hub_select
    rows = {row["model"]: row for row in report["candidates"]}
    assert list(rows) == list(HUB_CANDIDATES), "the default candidates, in order, are HUB_CANDIDATES"
    for hub_id, row in rows.items():
        assert row["status"] == "measured", row
        assert math.isfinite(row["logme"]) and 0 <= row["probe_accuracy"] <= 1 and row["images_per_second"] > 0, row
        architecture = timm.create_model(hub_id.removeprefix("timm/"), pretrained=False, num_classes=report["classes"])
        assert row["parameters"] == sum(parameter.numel() for parameter in architecture.parameters()), hub_id
        served = json.loads((published / hub_id / "config.json").read_text())
        assert row["input_size"] == list(served["pretrained_cfg"]["input_size"][1:]), hub_id
        assert served["pretrained_cfg"]["input_size"] == list(architecture.pretrained_cfg["input_size"]), hub_id
    assert sorted(report["ranking"]) == sorted(HUB_CANDIDATES)


def test_the_chosen_model_is_a_hub_candidate_and_the_selected_recipe_names_it(hub_select):
    report, output, _, _, _ = hub_select
    assert report["chosen"] in HUB_CANDIDATES
    assert yaml.safe_load((output / SELECTED_RECIPE).read_text())["model"] == report["chosen"]
    assert json.loads((output / SELECTION).read_text())["chosen"] == report["chosen"]


def test_the_weights_came_from_the_test_hub_and_nothing_else_was_reached(hub_select):
    _, _, _, requests, refused = hub_select
    assert any(request["method"] == "HEAD" and request["path"] == "/" for request in requests), "hub_reachable()'s own probe"
    downloaded = {request["path"] for request in requests if request["method"] == "GET" and request["status"] in (200, 302)}
    for hub_id in HUB_CANDIDATES:
        assert any(path.startswith(f"/{hub_id}/resolve/") and path.endswith("/model.safetensors") for path in downloaded), hub_id
    assert not refused.exists(), refused.read_text()
