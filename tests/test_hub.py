"""Hub round trips against tests/hub_server.py with the real clients (huggingface_hub, transformers, datasets).

Clients run in subprocesses: HF_ENDPOINT and HF_HUB_DISABLE_XET must be set before huggingface_hub is imported,
and this pytest process has imported it already.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import HUB_TOKEN, REPO, SAMPLE, run_hub_client, train_command
from hub_server import LocalHub

from hf_transfer.hub import HubError, push_to_hub

OTHER_TOKEN = "hf_other_user_456"


@pytest.fixture(scope="module")
def hub():
    with LocalHub(tokens={HUB_TOKEN: "user", OTHER_TOKEN: "other"}) as server:
        yield server


@pytest.fixture(scope="module")
def held_out_images(tmp_path_factory) -> list[str]:
    """Four photos of the sample's test split that the tiny run never saw (it was tested on the first 16)."""
    folder = tmp_path_factory.mktemp("held-out")
    rows = pq.read_table(SAMPLE / "data" / "test-00000-of-00001.parquet").slice(16, 4).to_pylist()
    for row in rows:
        (folder / row["image"]["path"]).write_bytes(row["image"]["bytes"])
    return [str(folder / row["image"]["path"]) for row in rows]


def copy_run(run_dir: Path, tmp_path: Path, name: str) -> Path:  # noqa: F811
    target = tmp_path / name
    shutil.copytree(run_dir, target)
    return target


PUSH_AND_PULL = """
import os
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageClassification, pipeline
from hf_transfer.hub import VerificationError, push_to_hub, verify_push

run, repo, images = params["run"], params["repo"], params["images"]
first = push_to_hub(run, repo, commit_message="First push")
cache = os.path.join(os.environ["HF_HOME"], "verify-cache")
first_check = verify_push(repo, run, images, cache_dir=cache)
default_cache_untouched = not os.path.exists(os.path.join(os.environ["HF_HOME"], "hub"))

# An independent pull: from_pretrained and pipeline by repo id, into this process's fresh HF_HOME.
hub_model = AutoModelForImageClassification.from_pretrained(repo)
hub_pipe, local_pipe = pipeline("image-classification", model=repo), pipeline("image-classification", model=run)
first_predictions = [local_pipe(image, top_k=2) for image in images]

# Second push: new weights (the classifier leans to 'cat'), so new content and a new commit.
weights = load_file(f"{run}/model.safetensors")
weights["classifier.bias"] = weights["classifier.bias"] + torch.tensor([20.0, -20.0])
save_file(weights, f"{run}/model.safetensors", metadata={"format": "pt"})
second = push_to_hub(run, repo)
second_check = verify_push(repo, run, images)
try:  # the first commit holds the old weights: verifying the changed run against it must fail
    verify_push(repo, run, images, revision=first.rsplit("/", 1)[1])
    mismatch = None
except VerificationError as error:
    mismatch = str(error)
old = pipeline("image-classification", model=repo, revision=first.rsplit("/", 1)[1])
branch = push_to_hub(run, repo, revision="experiment", commit_message="On a branch")
branch_check = verify_push(repo, run, images, revision="experiment")
second_pipe = pipeline("image-classification", model=run)

report({
    "first": first, "second": second, "branch": branch,
    "first_check": [vars(c) for c in first_check.checks], "default_cache_untouched": default_cache_untouched,
    "verify_cache": sorted(os.listdir(cache)), "mismatch": mismatch,
    "second_check": [vars(c) for c in second_check.checks], "branch_commit": branch_check.commit,
    "id2label": {str(k): v for k, v in hub_model.config.id2label.items()},
    "hub_pipe": [hub_pipe(image, top_k=2) for image in images], "first_local": first_predictions,
    "old_revision": [old(image, top_k=2) for image in images],
    "second_local": [second_pipe(image, top_k=2) for image in images],
})
"""


@pytest.fixture(scope="module")
def pushed(hub, run_dir, held_out_images, tmp_path_factory):  # noqa: F811
    work = tmp_path_factory.mktemp("push")
    run = copy_run(run_dir, work, "run")
    result = run_hub_client(hub, PUSH_AND_PULL, work / "hf-home", run=str(run), repo="user/tiny-vit",
                        images=held_out_images)
    return {**result, "run": run}


def _commit_of(url: str) -> str:
    return url.rsplit("/", 1)[1]


def _close(a: list[dict], b: list[dict], tol: float = 1e-4) -> bool:
    return [p["label"] for p in a] == [p["label"] for p in b] and all(
        abs(x["score"] - y["score"]) <= tol for x, y in zip(a, b))


def test_push_then_pull_predicts_like_the_local_model(hub, pushed):
    assert pushed["id2label"] == {"0": "cat", "1": "dog"}
    for hub_preds, local_preds in zip(pushed["hub_pipe"], pushed["first_local"]):
        assert _close(hub_preds, local_preds)
    checks = pushed["first_check"]
    assert len(checks) == 4 and all(c["local_label"] == c["hub_label"] for c in checks)
    # verify_push downloaded into its own fresh cache, not into the default one of HF_HOME.
    assert "models--user--tiny-vit" in pushed["verify_cache"] and pushed["default_cache_untouched"]

    repo = hub.repos[("model", "user/tiny-vit")]
    files = repo.commits[_commit_of(pushed["first"])].files
    expected = {p.name for p in pushed["run"].iterdir() if not p.name.startswith("checkpoint-")}
    assert set(files) == expected | {".gitattributes"}  # Trainer's checkpoints stay local
    assert any(pushed["run"].glob("checkpoint-*/*"))
    assert {"model.safetensors", "config.json", "preprocessor_config.json", "README.md", "all_results.json",
            "trainer_state.json", "freeze_plan.json", "test_report.json", "run_config.json",
            "training_curves.png", "confusion_matrix.png"} <= set(files)
    weights = files["model.safetensors"]
    assert weights.lfs and weights.size > 5 * 1024 * 1024
    uploads = [r for r in hub.requests if r["method"] == "PUT" and r["path"].startswith("/lfs-upload/")]
    assert uploads and all(r["status"] == 200 for r in uploads)
    readme = hub.object_path(files["README.md"].sha256).read_text()
    assert 'pipeline("image-classification", model="user/tiny-vit")' in readme


def test_second_push_makes_a_new_commit_and_keeps_the_old_one(hub, pushed):
    first, second = _commit_of(pushed["first"]), _commit_of(pushed["second"])
    assert first != second and len(first) == len(second) == 40
    repo = hub.repos[("model", "user/tiny-vit")]
    assert repo.branches["main"] == second and repo.commits[second].parent == first
    old, new = repo.commits[first].files["model.safetensors"], repo.commits[second].files["model.safetensors"]
    assert old.sha256 != new.sha256
    assert all(c["hub_label"] == c["local_label"] == "cat" for c in pushed["second_check"])
    # The old revision still resolves, and predicts like the model before the change.
    for old_preds, first_preds in zip(pushed["old_revision"], pushed["first_local"]):
        assert _close(old_preds, first_preds)
    assert all(_close(a, b) is False for a, b in zip(pushed["second_local"], pushed["first_local"]))
    assert "predicts differently" in pushed["mismatch"] and "user/tiny-vit@" in pushed["mismatch"]
    # --revision pushes to a branch created from main.
    assert repo.branches["experiment"] == _commit_of(pushed["branch"]) == pushed["branch_commit"]
    assert repo.branches["main"] == second


def test_card_metadata_validates_and_matches_all_results(hub, pushed):
    readme = (pushed["run"] / "README.md").read_text()
    request = urllib.request.Request(f"{hub.url}/api/validate-yaml", method="POST",
                                     data=json.dumps({"content": readme, "repoType": "model"}).encode(),
                                     headers={"Content-Type": "application/json"})
    assert json.loads(urllib.request.urlopen(request).read()) == {"errors": [], "warnings": []}

    repo = hub.repos[("model", "user/tiny-vit")]
    card = LocalHub.card_data(readme)
    assert card == LocalHub.card_data(hub.object_path(repo.commits[repo.branches["main"]].files["README.md"].sha256)
                                      .read_text())
    results = json.loads((pushed["run"] / "all_results.json").read_text())
    metrics = {m["type"]: m["value"] for m in card["model-index"][0]["results"][0]["metrics"]}
    assert metrics == {"accuracy": results["test_accuracy"], "f1": results["test_f1"]}
    # The validator has teeth: a model-index without metric values is refused.
    broken = readme.replace(f"value: {results['test_accuracy']}", "name_only: 1")
    request.data = json.dumps({"content": broken, "repoType": "model"}).encode()
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request)
    assert refused.value.code == 400


READ_PRIVATE_AND_MISSING = """
from huggingface_hub import snapshot_download
from hf_transfer.hub import HubError, download_model, verify_push
errors = {}
for name, call in {
    "private_download": lambda: download_model(params["private"]),
    "missing_download": lambda: download_model("user/does-not-exist"),
    "missing_verify": lambda: verify_push("user/does-not-exist", params["run"], params["images"]),
}.items():
    try:
        call()
        errors[name] = None
    except HubError as error:
        errors[name] = str(error)
if params.get("push_to"):
    from hf_transfer.hub import push_to_hub
    try:
        push_to_hub(params["run"], params["push_to"])
        errors["push"] = None
    except HubError as error:
        errors["push"] = str(error)
if params["with_transformers"]:
    from transformers import pipeline
    try:
        pipeline("image-classification", model=params["private"])
        errors["pipeline"] = None
    except OSError as error:
        errors["pipeline"] = str(error)
report(errors)
"""


def test_private_repo_is_readable_with_the_owner_token_only(hub, run_dir, held_out_images, tmp_path):  # noqa: F811
    run = copy_run(run_dir, tmp_path, "run")
    owner = run_hub_client(hub, """
        from hf_transfer.hub import push_to_hub, download_model
        url = push_to_hub(params["run"], "user/private-vit", private=True)
        folder = download_model("user/private-vit")
        report({"url": url, "weights": open(f"{folder}/model.safetensors", "rb").read() ==
                open(params["run"] + "/model.safetensors", "rb").read()})
    """, tmp_path / "owner", run=str(run))
    assert owner["weights"] and hub.repos[("model", "user/private-vit")].private

    params = dict(private="user/private-vit", run=str(run), images=held_out_images[:1])
    anonymous = run_hub_client(hub, READ_PRIVATE_AND_MISSING, tmp_path / "anonymous", token=None,
                           with_transformers=True, **params)
    other = run_hub_client(hub, READ_PRIVATE_AND_MISSING, tmp_path / "other", token=OTHER_TOKEN,
                       with_transformers=False, push_to="user/private-vit", **params)
    assert "refused to write to 'user/private-vit' (HTTP 403)" in other["push"]
    assert len(hub.repos[("model", "user/private-vit")].commits) == 2  # initial + the owner's push
    for errors in (anonymous, other):
        assert "user/private-vit" in errors["private_download"] and "hf auth login" in errors["private_download"]
    assert "user/private-vit" in anonymous["pipeline"]
    statuses = {r["status"] for r in hub.requests if "private-vit" in r["path"] and r["status"] >= 400}
    assert {401, 404} <= statuses  # anonymous: 401, another user: 404, as the Hub answers


def test_missing_repo_error_names_the_repo_and_the_fix(hub, run_dir, held_out_images, tmp_path):  # noqa: F811
    errors = run_hub_client(hub, READ_PRIVATE_AND_MISSING, tmp_path / "home", private="user/does-not-exist",
                        run=str(run_dir), images=held_out_images[:1], with_transformers=False)
    for key in ("missing_download", "missing_verify"):
        assert "'user/does-not-exist' was not found" in errors[key]
        assert "hf-transfer push <output_dir> --repo-id user/does-not-exist" in errors[key]


def test_dataset_repo_loads_with_load_dataset(hub, tmp_path):
    folder = tmp_path / "cats-dogs-mini" / "data"
    folder.mkdir(parents=True)
    table = pq.read_table(SAMPLE / "data" / "train-00000-of-00001.parquet").slice(0, 20)
    pq.write_table(table, folder / "train-00000-of-00001.parquet")  # keeps the Image/ClassLabel features
    loaded = run_hub_client(hub, """
        import datasets
        from huggingface_hub import HfApi
        api = HfApi()
        api.create_repo("user/cats-dogs-mini", repo_type="dataset")
        api.upload_folder(folder_path=params["folder"], repo_id="user/cats-dogs-mini", repo_type="dataset")
        splits = datasets.load_dataset("user/cats-dogs-mini")
        train = splits["train"]
        report({"splits": list(splits), "rows": train.num_rows, "names": train.features["labels"].names,
                "labels": list(train["labels"]), "size": list(train[0]["image"].size)})
    """, tmp_path / "home", folder=str(folder.parent))
    assert loaded["splits"] == ["train"] and loaded["rows"] == 20
    assert loaded["names"] == ["cat", "dog"] and loaded["labels"] == table.column("labels").to_pylist()
    assert min(loaded["size"]) > 0
    assert ("dataset", "user/cats-dogs-mini") in hub.repos and ("model", "user/cats-dogs-mini") not in hub.repos


def test_a_hub_dataset_streams_without_being_downloaded(hub, tmp_path):
    folder = tmp_path / "cats-dogs-stream" / "data"
    folder.mkdir(parents=True)
    train = pq.read_table(SAMPLE / "data" / "train-00000-of-00001.parquet").slice(0, 24)
    for shard in range(2):
        pq.write_table(train.slice(12 * shard, 12), folder / f"train-0000{shard}-of-00002.parquet")
    pq.write_table(pq.read_table(SAMPLE / "data" / "test-00000-of-00001.parquet").slice(0, 6), folder / "test-00000-of-00001.parquet")
    streamed = run_hub_client(hub, """
        import os
        from huggingface_hub import HfApi
        from hf_transfer.options import DataArguments
        from hf_transfer.data.stream import load_streaming_dataset
        from hf_transfer.data.train_stream import train_stream
        api = HfApi()
        api.create_repo("user/cats-dogs-stream", repo_type="dataset")
        api.upload_folder(folder_path=params["folder"], repo_id="user/cats-dogs-stream", repo_type="dataset")
        data = load_streaming_dataset(DataArguments(dataset="user/cats-dogs-stream", streaming=True, validation_size=4))
        stream = iter(train_stream(data, lambda image: list(image.getdata())[:64], 0, 1, restore_position=True))
        first_pass = [next(stream) for _ in range(20)]  # 24 photos less the 4 carved for validation
        report({"sizes": data.sizes, "labels": data.labels, "distinct": len({str(e["pixel_values"]) for e in first_pass}),
                "train_labels": sorted(e["labels"] for e in first_pass),
                "downloaded": [name for root, _, names in os.walk(os.environ["HF_HOME"]) for name in names
                               if name.endswith(".parquet") or os.path.basename(root) == "blobs"]})
    """, tmp_path / "home", folder=str(folder.parent))
    assert streamed["sizes"] == {"train": None, "validation": 4, "test": 6} and streamed["labels"] == ["cat", "dog"]
    assert streamed["distinct"] == 20 and streamed["train_labels"] == sorted(train.column("labels").to_pylist()[4:])
    assert streamed["downloaded"] == [], "read over HTTP as it trains, never copied into the cache"
    parquet_reads = [r for r in hub.requests if "cats-dogs-stream/resolve" in r["path"] and r["path"].endswith(".parquet")]
    assert parquet_reads and all(r["status"] in (200, 206) for r in parquet_reads)


def test_token_never_leaves_the_client(hub, pushed, run_dir, tmp_path):  # noqa: F811
    # Every blob the Hub stored (model, card, logs, plots) and every pushed local file is free of the token.
    for blob in (hub.storage / "objects").iterdir():
        assert HUB_TOKEN.encode() not in blob.read_bytes(), blob
    for file in pushed["run"].rglob("*"):
        assert file.is_dir() or HUB_TOKEN.encode() not in file.read_bytes(), file
    # A run dir that somehow holds the token is refused before anything is sent; the message hides it.
    leaky = copy_run(run_dir, tmp_path, "leaky")
    (leaky / "run_config.json").write_text(json.dumps({"training": {"hub_token": HUB_TOKEN}}))
    error = run_hub_client(hub, """
        from hf_transfer.hub import HubError, push_to_hub
        try:
            push_to_hub(params["run"], "user/leaky")
            report({"error": None})
        except HubError as error:
            report({"error": str(error)})
    """, tmp_path / "home", run=str(leaky))["error"]
    assert "run_config.json" in error and HUB_TOKEN not in error
    assert not any(r["path"].startswith("/lfs-upload/") and "leaky" in r["path"] for r in hub.requests)
    assert ("model", "user/leaky") not in hub.repos


def test_push_refuses_pickles_and_ids_without_namespace(run_dir, tmp_path):  # noqa: F811
    run = copy_run(run_dir, tmp_path, "run")
    (run / "training_args.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(HubError, match=r"pickle files.*training_args\.bin"):
        push_to_hub(run, "user/never-pushed", token="unused")  # refused before any network call
    with pytest.raises(HubError, match="full repo id"):
        push_to_hub(run, "no-namespace", token="unused")


def _call(hub: LocalHub, method: str, path: str, body: bytes | None = None, token: str | None = HUB_TOKEN,
          headers: dict | None = None, chunked: bool = False):
    """One raw HTTP request: the protocol details no client of this huggingface_hub version sends."""
    import http.client

    connection = http.client.HTTPConnection(hub.url.removeprefix("http://"), timeout=10)
    headers = {**(headers or {}), **({"Authorization": f"Bearer {token}"} if token else {})}
    if chunked:
        connection.request(method, path, body=iter([body[:1000], body[1000:]]), headers=headers,
                           encode_chunked=True)
    else:
        connection.request(method, path, body=body, headers=headers)
    response = connection.getresponse()
    return response.status, dict(response.getheaders()), response.read()


def test_server_protocol_details(hub):
    import hashlib

    content = bytes(range(256)) * 40
    oid = hashlib.sha256(content).hexdigest()
    assert _call(hub, "POST", "/api/repos/create", json.dumps({"name": "raw", "type": "model"}).encode())[0] == 200
    status, _, body = _call(hub, "POST", "/user/raw.git/info/lfs/objects/batch",
                            json.dumps({"operation": "upload",
                                        "objects": [{"oid": oid, "size": len(content)}]}).encode())
    upload = json.loads(body)["objects"][0]["actions"]["upload"]["href"]
    # git-lfs clients may stream the PUT with chunked transfer encoding.
    assert _call(hub, "PUT", upload.removeprefix(hub.url), content, token=None, chunked=True)[0] == 200
    assert hub.requests[-1]["chunked"]
    assert _call(hub, "PUT", upload.removeprefix(hub.url), content, token=None)[0] == 403  # single use
    commit = b"\n".join(json.dumps(line).encode() for line in [
        {"key": "header", "value": {"summary": "raw LFS commit"}},
        {"key": "lfsFile", "value": {"path": "blob.bin", "algo": "sha256", "oid": oid, "size": len(content)}},
    ])
    assert _call(hub, "POST", "/api/models/user/raw/branch/feature%2Fx", b"{}")[0] == 200
    status, _, body = _call(hub, "POST", "/api/models/user/raw/commit/feature%2Fx", commit)
    commit_id = json.loads(body)["commitOid"]
    assert status == 200 and len(commit_id) == 40

    status, headers, _ = _call(hub, "HEAD", "/user/raw/resolve/feature%2Fx/blob.bin")
    assert status == 200 and headers["X-Repo-Commit"] == commit_id
    assert headers["X-Linked-Etag"] == f'"{oid}"' and headers["X-Linked-Size"] == str(len(content))
    status, headers, body = _call(hub, "GET", f"/user/raw/resolve/{commit_id}/blob.bin",
                                  headers={"Range": "bytes=10-19"})
    assert status == 206 and body == content[10:20] and headers["Content-Range"] == f"bytes 10-19/{len(content)}"
    for path, code in [("/user/nope/resolve/main/x", "RepoNotFound"), ("/user/raw/resolve/nope/x", "RevisionNotFound"),
                       ("/user/raw/resolve/main/blob.bin", "EntryNotFound")]:  # blob.bin is on the branch only
        status, headers, _ = _call(hub, "GET", path)
        assert (status, headers["X-Error-Code"]) == (404, code)
    assert _call(hub, "GET", "/api/models/user/nope", token=None)[0] == 401  # anonymous: 401, like the Hub
    status, _, body = _call(hub, "POST", "/api/repos/create", json.dumps({"name": "raw"}).encode())
    assert status == 409 and json.loads(body)["url"] == f"{hub.url}/user/raw"

    # Regular files (base64), deletions, and the tree and paths-info (form-encoded) views of the result.
    commit = b"\n".join(json.dumps(line).encode() for line in [
        {"key": "header", "value": {"summary": "reshuffle"}},
        {"key": "file", "value": {"path": "docs/a.txt", "encoding": "base64", "content": "aGVsbG8="}},
        {"key": "file", "value": {"path": "docs/old/b.txt", "encoding": "base64", "content": "Yg=="}},
        {"key": "deletedFile", "value": {"path": "blob.bin"}},
    ])
    assert _call(hub, "POST", "/api/models/user/raw/commit/feature%2Fx", commit)[0] == 200
    delete = b'{"key": "header", "value": {"summary": "rm"}}\n{"key": "deletedFolder", "value": {"path": "docs/old"}}'
    assert _call(hub, "POST", "/api/models/user/raw/commit/feature%2Fx", delete)[0] == 200
    status, _, body = _call(hub, "GET", "/api/models/user/raw/tree/feature%2Fx?recursive=true")
    assert [(e["type"], e["path"]) for e in json.loads(body)] == [
        ("directory", "docs"), ("file", ".gitattributes"), ("file", "docs/a.txt")]
    status, _, body = _call(hub, "POST", "/api/models/user/raw/paths-info/feature%2Fx",
                            b"paths=docs%2Fa.txt&paths=missing&expand=True",
                            headers={"Content-Type": "application/x-www-form-urlencoded"})
    (info,) = json.loads(body)
    assert info["path"] == "docs/a.txt" and info["size"] == 5 and info["lastCommit"]["title"] == "reshuffle"
    assert _call(hub, "GET", "/user/raw/resolve/feature%2Fx/docs/a.txt")[2] == b"hello"


def test_recipe_push_to_hub_uploads_and_verifies_at_the_end_of_training(hub, run_dir, tmp_path):  # noqa: F811
    """`push_to_hub: true` + `hub_model_id` in a recipe: the real `hf-transfer train` path, then a fresh pull."""
    base_model = run_dir.parent / "tiny-vit"  # a local model folder: this Hub holds no pretrained models
    env = hub.client_env(hf_home=tmp_path / "home", token=HUB_TOKEN)
    env["PYTHONPATH"] = str(REPO)
    output_dir = tmp_path / "run"
    process = subprocess.run(
        train_command(str(REPO / "recipes" / "quickstart.yaml"),
                      "--model", str(base_model), "--output_dir", str(output_dir), "--max_train_samples", "24", "--max_test_samples", "16",
                      "--num_train_epochs", "1", "--push_to_hub", "true", "--hub_model_id", "user/quickstart-pushed"),
        env=env, cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    output = process.stdout + process.stderr
    assert process.returncode == 0, output[-4000:]
    assert HUB_TOKEN not in output
    assert "verified: user/quickstart-pushed@" in output
    pulled = run_hub_client(hub, """
        from huggingface_hub import ModelCard, list_repo_files
        card = ModelCard.load("user/quickstart-pushed")
        report({"files": list_repo_files("user/quickstart-pushed"), "accuracy": card.data.eval_results[0].metric_value})
    """, tmp_path / "pull")
    assert {"model.safetensors", "config.json", "README.md", "all_results.json"} <= set(pulled["files"])
    assert not any(name.startswith("checkpoint-") for name in pulled["files"])
    assert pulled["accuracy"] == json.loads((output_dir / "all_results.json").read_text())["test_accuracy"]


@pytest.fixture(scope="module")
def unreachable_hub_env(tmp_path_factory) -> dict[str, str]:
    """A client environment whose HF_ENDPOINT is a loopback port that nothing listens on any more."""
    with LocalHub() as gone:
        env = gone.client_env(hf_home=tmp_path_factory.mktemp("unreachable-home"), token=HUB_TOKEN)
    env["PYTHONPATH"] = str(REPO)
    return env


def push_command(run: Path, *argv: str, env: dict[str, str]) -> str:
    """`hf-transfer push RUN ...` in its own process; assert one error line, exit code 2, no traceback, no token."""
    env = {k: v for k, v in env.items() if k != "HF_TRANSFER_DEBUG"}
    process = subprocess.run([sys.executable, "-m", "hf_transfer.cli", "push", str(run), *argv], env=env,
                             cwd=REPO, capture_output=True, text=True, timeout=180, check=False)
    output = process.stdout + process.stderr
    assert HUB_TOKEN not in output, "the token was printed"
    assert process.returncode == 2 and "Traceback" not in output, output[-4000:]
    (message,) = [line for line in process.stderr.splitlines() if line.startswith("error: ")]
    return message


def test_push_refuses_an_invalid_repo_id_with_the_form_to_use(run_dir, unreachable_hub_env):  # noqa: F811
    for repo_id in ("not a repo", "a/b/c"):
        message = push_command(run_dir, "--repo-id", repo_id, env=unreachable_hub_env)
        assert f"'{repo_id}' is not a valid model repo id. Use `<user or org>/<name>`" in message
    # A bad Space id is refused before the model is pushed, not after.
    message = push_command(run_dir, "--repo-id", "user/model", "--space", "my demo", env=unreachable_hub_env)
    assert "'my demo' is not a valid Space repo id" in message


def test_push_to_an_unreachable_hub_names_the_endpoint_and_the_fix(run_dir, unreachable_hub_env):  # noqa: F811
    endpoint = unreachable_hub_env["HF_ENDPOINT"]
    message = push_command(run_dir, "--repo-id", "user/model", env=unreachable_hub_env)
    assert f"Cannot reach the Hugging Face Hub at {endpoint}" in message and "HF_ENDPOINT" in message
    message = push_command(run_dir, "--repo-id", "user/model", env={**unreachable_hub_env, "HF_HUB_OFFLINE": "1"})
    assert "HF_HUB_OFFLINE is set" in message and "unset HF_HUB_OFFLINE" in message
