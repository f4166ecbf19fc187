"""Share a training output dir on the Hugging Face Hub and check the pushed model predicts like the local one.

Uses huggingface_hub's HfApi; the token comes from `token=`, HF_TOKEN or `hf auth login`, and is never printed.
"""

from __future__ import annotations

import importlib
import logging
import os
import reprlib
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token, snapshot_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from .card import write_model_card
from .errors import HFTransferError
from .images import ImageInput, load_image
from .repo_files import (
    ALL_RESULTS,
    CONFIG,
    EXPORT_REPORT,
    LOCK_FILE,
    MODEL_CARD,
    ONNX_DIR,
    ONNX_INT8_MODEL,
    ONNX_MODEL,
    RUN_CONFIG,
    RUN_OUTPUTS,
)

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")  # can run code when loaded: never shared
# Push uploads the files a run writes and nothing else: the output folder may hold the user's own files (or a link to
# any file). Trainer's checkpoints are resumable training state, not the model; hidden entries are staging or the lock.
UPLOADED = [name for name in RUN_OUTPUTS if name != LOCK_FILE]
NOT_UPLOADED = ["checkpoint-*", ".*"]  # passed over without a word


class HubError(HFTransferError, RuntimeError):
    """A push, pull or check against the Hub that cannot go on; the message says how to fix it."""


class VerificationError(HubError):
    """The model downloaded from the Hub does not predict like the local one."""


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The errors of a request that never got an answer: huggingface_hub 1.x sends with httpx, 2.x with httpx2."""
    errors = []
    for module in ("httpx2", "httpx"):
        with suppress(ImportError):
            errors.append(importlib.import_module(module).TransportError)
    return tuple(errors)


@contextmanager
def reaching_hub() -> Iterator[None]:
    """Turn "no answer from the Hub" (offline mode, a refused connection, a timeout) into a HubError."""
    try:
        yield
    except OfflineModeIsEnabled:
        raise HubError("HF_HUB_OFFLINE is set, so the Hub cannot be reached. Unset it (`unset HF_HUB_OFFLINE`) "
                       "and push again.") from None
    except _transport_errors() as error:
        raise HubError(f"Cannot reach the Hugging Face Hub at {constants.ENDPOINT} ({type(error).__name__}: "
                       f"{error}). Check your network connection, or HF_ENDPOINT if you set it, then try again.") from None


def check_repo_id(repo_id: str, repo_type: str = "model") -> None:
    """Refuse an id the Hub would refuse, before anything is sent."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise HubError(f"'{repo_id}' is not a valid {repo_type} repo id. Use `<user or org>/<name>` "
                       "(e.g. `your-username/lite0-cats-vs-dogs`): letters, digits, '-', '_' and '.', no spaces, "
                       "one '/'.") from None
    if repo_id.count("/") != 1:
        raise HubError(f"Give the full repo id, `<user or org>/<name>` (e.g. `your-username/{repo_id}`), "
                       f"not '{repo_id}'.")


def _files_to_upload(folder: Path) -> list[Path]:
    """The files push uploads, checked before anything is sent: the run's own (UPLOADED), each a regular file at the top of
    a folder `hf-transfer train` finished. Links and pickles are refused; the user's own files stay local, and are named."""
    if not (folder / CONFIG).is_file() or not any(folder.glob("*.safetensors")):
        raise HubError(f"{folder} holds no model to push (config.json and *.safetensors are required). "
                       "Train one first: `hf-transfer train <recipe.yaml>`.")
    missing = [name for name in (RUN_CONFIG, ALL_RESULTS) if not (folder / name).is_file()]
    if missing:  # the model card is written from them: a folder `save_pretrained` wrote has neither
        raise HubError(f"{folder} is not a finished training output dir: it has no {' and no '.join(missing)}, which "
                       "`hf-transfer train` writes with the model and its card. Push a run's folder, or upload any other "
                       f"model folder with `hf upload <repo-id> {folder}`.")
    entries = [entry for entry in sorted(folder.iterdir()) if not any(fnmatch(entry.name, p) for p in NOT_UPLOADED)]
    links = [entry for entry in entries if entry.is_symlink()]
    if links:
        listing = "; ".join(f"{entry.name!r} is a symbolic link (to {reprlib.repr(os.readlink(entry))})" for entry in links)
        raise HubError(f"Refusing to push: {listing}. Push uploads only files a run wrote into {folder}, never what a link "
                       "points to: remove the link (or put the file itself there) and push again.")
    pickles = [entry.name for entry in entries if entry.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise HubError(f"Refusing to push pickle files, which can run code when loaded: {', '.join(map(repr, pickles))}. "
                       "Only safetensors weights are shared; delete these files from the output dir and push again.")
    runs = [entry for entry in entries if any(fnmatch(entry.name, pattern) for pattern in UPLOADED)]
    odd = [entry.name for entry in runs if not entry.is_file()]
    if odd:
        raise HubError(f"Refusing to push: {', '.join(map(repr, odd))} in {folder} should be the run's file(s) of that name "
                       "but are not regular files. Move them away and push again.")
    others = [entry.name for entry in entries if entry not in runs and entry.name != ONNX_DIR]
    if others:
        logger.warning("Not uploaded (hf-transfer train did not write them): %s", ", ".join(map(repr, others)))
    return runs + _exported_graphs(folder)


def _exported_graphs(folder: Path) -> list[Path]:
    """`hf-transfer export`'s files in onnx/, each a regular file; a link there is refused like one at the top."""
    graphs = folder / ONNX_DIR
    if not graphs.is_dir():
        return []
    found = [folder / name for name in (ONNX_MODEL, ONNX_INT8_MODEL, EXPORT_REPORT)
             if (folder / name).exists() or (folder / name).is_symlink()]
    links = [path for path in (graphs, *found) if path.is_symlink() or not (path.is_dir() if path == graphs else path.is_file())]
    if links:
        raise HubError(f"Refusing to push: {', '.join(repr(path.relative_to(folder).as_posix()) for path in links)} in {folder} should "
                       "be what `hf-transfer export` wrote but is a link or not a regular file. Export again, then push.")
    return found


def _check_no_token_inside(files: list[Path], token: str, folder: Path) -> None:
    leaking = [str(p.relative_to(folder)) for p in files if token.encode() in p.read_bytes()]
    if leaking:
        raise HubError(f"Refusing to push: your Hub token appears inside {', '.join(leaking)}. "
                       "Remove it from those files (and revoke the token if it was shared).")


def push_to_hub(output_dir: str | Path, repo_id: str, private: bool = False, revision: str | None = None,
                commit_message: str | None = None, token: str | None = None) -> str:
    """Upload the run in the output dir (model, processor, card, logs, plots: the files a run writes) to `repo_id`; return
    the commit URL. The repo is created if needed (`private` applies only then); `revision` is a branch, created from main
    if missing. The model card is re-written with the real repo id before the upload."""
    check_repo_id(repo_id)
    folder = Path(output_dir)
    files = _files_to_upload(folder)
    token = token or get_token()
    if not token:
        raise HubError("No Hugging Face token found. Run `hf auth login` (or set HF_TOKEN) with a token that "
                       "has write access, then push again.")
    _check_no_token_inside(files, token, folder)
    api = HfApi(token=token)
    try:
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if revision not in (None, constants.DEFAULT_REVISION):
            api.create_branch(repo_id, branch=revision, exist_ok=True)
    except HfHubHTTPError as error:
        raise _hub_error(error, repo_id, f"when asked to create or open '{repo_id}': nothing was uploaded. Push again later.") from None
    write_model_card(folder, repo_id=repo_id)
    _check_no_token_inside([folder / MODEL_CARD], token, folder)
    commit = _upload(api, repo_id, revision, [file.relative_to(folder).as_posix() for file in files], folder,
                     commit_message or "Upload image classifier trained with hf_transfer")
    logger.info("Pushed %s to %s", folder, commit.commit_url)
    return commit.commit_url


def _upload(api: HfApi, repo_id: str, revision: str | None, names: list[str], folder: Path, commit_message: str):
    """Send the files one at a time (upload_folder sends them all at once: a failure could not say what was sent), then
    commit them. The Hub keeps the large files (LFS objects) it received, so a push that failed half-way resumes without
    sending them again: HfApi skips any the Hub already has."""
    where = f"'{repo_id}'" + (f" (branch {revision!r})" if revision not in (None, constants.DEFAULT_REVISION) else "")
    again = "Run the same push again: it resumes, and what the Hub already has is not sent twice."
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=folder / name) for name in names]
    for done, operation in enumerate(operations):
        try:
            api.preupload_lfs_files(repo_id, additions=[operation], revision=revision)
        except (HfHubHTTPError, RuntimeError) as error:  # RuntimeError: HfApi's wrapper of an LFS upload's failure
            after = f"after {', '.join(names[:done][:5])}{' and more' if done > 5 else ''}" if done else "the first"
            raise _hub_error(error, repo_id, f"while {operation.path_in_repo!r} was uploading to {where} (file {done + 1} of "
                             f"{len(names)}, {after}): nothing is committed, and the Hub keeps the large files it received. "
                             f"{again}") from None
    try:
        return api.create_commit(repo_id, operations, commit_message=commit_message, revision=revision)
    except HfHubHTTPError as error:
        raise _hub_error(error, repo_id, f"to the commit of {len(names)} files to {where}: their contents were uploaded (the Hub "
                         f"keeps the large ones), but nothing is committed. {again}") from None


def _hub_error(error: BaseException, repo_id: str, during: str) -> HubError:
    """The error of a failed request `during` something: the Hub's HTTP answer, or that none came; a refusal of write
    access (HTTP 401 or 403) says what to change. HfApi wraps LFS uploads' errors in a RuntimeError."""
    cause = error.__cause__ if isinstance(error, RuntimeError) and error.__cause__ is not None else error
    response = getattr(cause, "response", None)
    if response is None:
        return HubError(f"The Hub at {constants.ENDPOINT} gave no answer ({type(cause).__name__}: {reprlib.repr(str(cause))}) {during}")
    if response.status_code in (401, 403):
        return HubError(f"The Hub refused to write to '{repo_id}' (HTTP {response.status_code}). Use your own username or an "
                        "organization you belong to as namespace, and a token with write access (`hf auth login`).")
    return HubError(f"The Hub at {constants.ENDPOINT} answered HTTP {response.status_code} {during}")


def download_model(repo_id: str, revision: str | None = None, cache_dir: str | Path | None = None,
                   token: str | None = None) -> Path:
    """Download a model repo snapshot and return its folder; a missing repo gives an error saying what to do."""
    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, token=token))
    except RevisionNotFoundError:
        raise HubError(f"The repo '{repo_id}' exists but has no revision {revision!r}. "
                       "Use a branch, tag or commit it has (default: main).") from None
    except RepositoryNotFoundError:
        raise HubError(f"The model repo '{repo_id}' was not found on {constants.ENDPOINT}"
                       f"{f' at revision {revision!r}' if revision else ''}, or it is private and your token cannot read it. "
                       "Check the id (user/name); for a private repo log in with `hf auth login` or set HF_TOKEN; "
                       f"if it was never pushed, push it first: `hf-transfer push <output_dir> --repo-id {repo_id}`.") from None
    except LocalEntryNotFoundError:  # no answer from the Hub, and nothing in the cache
        raise HubError(f"Cannot download '{repo_id}': the Hugging Face Hub at {constants.ENDPOINT} did not answer. "
                       "Check your network connection, or HF_ENDPOINT and HF_HUB_OFFLINE if you set them.") from None


@dataclass
class ImageCheck:
    image: str
    local_label: str
    hub_label: str
    local_score: float
    hub_score: float
    max_score_difference: float  # over every class


@dataclass
class VerifyReport:
    repo_id: str
    commit: str
    checks: list[ImageCheck] = field(default_factory=list)

    @property
    def max_score_difference(self) -> float:
        return max((check.max_score_difference for check in self.checks), default=0.0)

    def __str__(self) -> str:
        lines = [f"{self.repo_id}@{self.commit[:10]}: {len(self.checks)} image(s), same labels, "
                 f"largest score difference {self.max_score_difference:.2e}"]
        lines += [f"  {c.image}: {c.hub_label} ({c.hub_score:.4f})" for c in self.checks]
        return "\n".join(lines)


def verify_push(repo_id: str, output_dir: str | Path, images: list[ImageInput], revision: str | None = None,
                token: str | None = None, atol: float = 1e-4, cache_dir: str | Path | None = None) -> VerifyReport:
    """Download `repo_id` into a fresh cache (`cache_dir`, or a temporary folder removed afterwards), classify `images` with
    it and with the local model; VerificationError when a top label differs or any class score differs by more than `atol`."""
    if not images:
        raise ValueError("verify_push needs at least one image (ideally held out from training).")
    with tempfile.TemporaryDirectory(prefix="hf-transfer-verify-") as scratch:
        cache_dir, output_dir = Path(cache_dir or scratch), Path(output_dir)
        commit = download_model(repo_id, revision=revision, cache_dir=cache_dir, token=token).name  # snapshots/<sha>
        from transformers import pipeline  # heavy: imported once the repo is known to exist

        hub_classifier = pipeline("image-classification", model=repo_id, revision=commit, token=token,
                                  model_kwargs={"cache_dir": str(cache_dir)})
        local_classifier = pipeline("image-classification", model=str(output_dir))
        top_k = max(len(local_classifier.model.config.id2label), len(hub_classifier.model.config.id2label))
        report = VerifyReport(repo_id, commit)
        for index, item in enumerate(images):
            name = Path(item).name if isinstance(item, (str, Path)) else f"image #{index}"
            image = load_image(item)
            local = {p["label"]: p["score"] for p in local_classifier(image, top_k=top_k)}
            hub = {p["label"]: p["score"] for p in hub_classifier(image, top_k=top_k)}
            if local.keys() != hub.keys():
                raise VerificationError(f"{repo_id}@{commit[:10]} has the labels {sorted(hub)}, {output_dir} has "
                                        f"{sorted(local)}: the pushed model is not this run.")
            local_top, hub_top = max(local, key=local.get), max(hub, key=hub.get)
            difference = max(abs(local[label] - hub[label]) for label in local)
            report.checks.append(ImageCheck(name, local_top, hub_top, local[local_top], hub[hub_top], difference))
            if local_top != hub_top or difference > atol:
                raise VerificationError(f"{repo_id}@{commit[:10]} predicts differently from {output_dir} on {name}: hub {hub_top} "
                                        f"({hub[hub_top]:.4f}) vs local {local_top} ({local[local_top]:.4f}), largest score difference "
                                        f"{difference:.2e} > {atol:.0e}. Push again, or check that --revision points at this run.")
        return report


def share_run(args) -> None:
    """`push_to_hub: true` in a recipe: after the run, the main process pushes its output folder to `hub_model_id`."""
    if args.push_to_hub and args.process_index == 0:
        share(args.output_dir, args.hub_model_id, private=bool(args.hub_private_repo), revision=args.hub_revision)


def share(output_dir: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
          commit_message: str | None = None, verify: bool = True, space: str | None = None) -> None:
    """`hf-transfer push` and `push_to_hub: true`: upload, check the Hub copy on held-out images, add a Space."""
    from .demo import push_space  # the demo pulls in gradio; only needed here
    from .examples import examples_from_run

    check_repo_id(repo_id)
    if space:
        check_repo_id(space, "Space")
    output_dir = Path(output_dir)
    with reaching_hub():
        print(f"Pushed {output_dir} -> {push_to_hub(output_dir, repo_id, private, revision, commit_message)}")
    with reaching_hub(), tempfile.TemporaryDirectory(prefix="hf_transfer_examples_") as scratch:
        examples = examples_from_run(output_dir, Path(scratch))
        if verify and examples is None:
            print("Not verified: no held-out images of this run could be found (--no-verify silences this).")
        elif verify:
            print(f"verified: {verify_push(repo_id, output_dir, sorted(examples.iterdir()), revision=revision)}")
        if space:
            print(f"Space: {push_space(space, repo_id, examples_dir=examples, private=private)}")
