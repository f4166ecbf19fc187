"""`hf-transfer demo` and `hf-transfer push --space`: run spaces_demo/app.py locally, or publish it as a Space.

Both use the very app.py a Space runs, found next to this package in the repository checkout.
"""

from __future__ import annotations

import importlib.util
import pickle
import shutil
import socket
import tempfile
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from huggingface_hub import HfApi, SpaceCard, try_to_load_from_cache
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from .errors import HFTransferError
from .examples import examples_from_run
from .repo_files import CONFIG

if TYPE_CHECKING:
    import gradio as gr

PACKAGE_DIR = Path(__file__).resolve().parent
SPACE_DIR = PACKAGE_DIR.parent / "spaces_demo"
SPACE_FILES = ("app.py", "requirements.txt")
# A Space runs app.py with no hf_transfer installed: these modules travel beside it as `hf_transfer_<name>.py`, each of
# them importable alone: the training's image decoding policy, Grad-CAM, the model repo's file names, the precision of
# predictions on the Space's hardware, the classifier head, the escaping of names shown, and the checked ONNX graph.
SHIPPED_MODULES = {f"{name}.py": f"hf_transfer_{name}.py"
                   for name in ("images", "explain", "repo_files", "precision", "blocks", "escape", "onnx_runtime")}
EXAMPLES_IN_SPACE = "examples"
MODEL_HINT = ("Pass the output dir of a run (`hf-transfer train` writes config.json and model.safetensors there) "
              "or a Hub model id (user/name).")


class DemoError(HFTransferError):
    """`hf-transfer demo` cannot start; the message says what to pass instead."""


def load_app() -> ModuleType:
    """Import spaces_demo/app.py as a module: one copy of the app for local runs and Spaces."""
    app_path = SPACE_DIR / "app.py"
    if not app_path.is_file():
        raise FileNotFoundError(f"{app_path} is missing: `hf-transfer demo` runs from a checkout of the repository (pip install -e .).")
    spec = importlib.util.spec_from_file_location("hf_transfer_space_app", app_path)
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    return app


def check_model(model: str) -> None:
    """Refuse, before anything loads, a path that is not a model folder, and a Hub id that cannot load offline; the
    download says what else is wrong with a Hub id."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / CONFIG).is_file():
            raise DemoError(f"'{model}' is not a model folder: it has no config.json. {MODEL_HINT}")
        return
    try:
        validate_repo_id(model)
        looks_like_repo_id = model.count("/") == 1 and not model.startswith((".", "~"))
    except HFValidationError:
        looks_like_repo_id = False
    if not looks_like_repo_id:
        raise DemoError(f"The model folder '{model}' does not exist. {MODEL_HINT}")
    if hub_constants.HF_HUB_OFFLINE and not isinstance(try_to_load_from_cache(model, CONFIG), str):  # said before Gradio loads
        raise DemoError(f"Cannot load the model '{model}': there is no such folder here, and the Hub is off "
                        f"(HF_HUB_OFFLINE=1) with no copy of it in the local cache. {MODEL_HINT}")


def check_port(port: int | None) -> None:
    """Refuse a busy --port before the model loads (Gradio binds 127.0.0.1 with SO_REUSEADDR the same way)."""
    if port is None:
        return
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            raise DemoError(_busy_port_message(port)) from None


def _busy_port_message(port: int | None) -> str:
    if port is None:  # Gradio tries 7860 and the next 99 ports
        return "No free port between 7860 and 7959 on 127.0.0.1. Pick a free one with --port N."
    return (f"Port {port} on 127.0.0.1 is in use. Stop the program that holds it, or pick another port with "
            "--port N (without --port the demo takes the first free port from 7860).")


def start_demo(model: str, *, examples_dir: Path | None = None, port: int | None = None, top_k: int = 5) -> gr.Blocks:
    """Serve the demo of `model` (output dir or Hub repo id) on 127.0.0.1 without blocking; close() stops it. Without
    examples_dir, an output dir's examples are a few images of the test split its run was scored on."""
    check_model(model)
    check_port(port)
    app = load_app()
    with tempfile.TemporaryDirectory(prefix="hf_transfer_examples_") as scratch:
        if examples_dir is None and Path(model).is_dir():
            examples_dir = examples_from_run(Path(model), Path(scratch))
        try:
            demo = app.build_demo(model, examples_dir=examples_dir, top_k=top_k)  # copies the examples away
        except pickle.UnpicklingError as error:  # transformers opens pytorch_model.bin with torch.load(weights_only=True)
            from .models import unsafe_pickle_message  # torch and timm: loaded by the app already, not by `push --space`

            raise DemoError(unsafe_pickle_message(model, error)) from None
        except OSError as error:  # transformers: not on the Hub, the Hub unreachable, or offline and not cached
            if Path(model).exists():
                raise
            raise DemoError(f"Cannot load the model '{model}': there is no such folder here, and it could not be "
                            f"loaded from the Hub ({str(error).splitlines()[0]}). {MODEL_HINT}") from None
    try:
        app.launch(demo, host="127.0.0.1", port=port, block=False)
    except OSError:  # Gradio found no free port: taken since check_port, or all of 7860-7959
        demo.close()
        raise DemoError(_busy_port_message(port)) from None
    return demo


def run_demo(model: str, *, examples_dir: Path | None = None, port: int | None = None, top_k: int = 5) -> None:
    """`hf-transfer demo`: serve on 127.0.0.1 until Ctrl+C."""
    start_demo(model, examples_dir=examples_dir, port=port, top_k=top_k).block_thread()


def stage_space(dest: Path, model_repo_id: str, examples_dir: Path | None = None) -> Path:
    """Lay out the Space in dest: app files, the image decoding and explanation modules, README pinned to
    model_repo_id, examples."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in SPACE_FILES:
        shutil.copy2(SPACE_DIR / name, dest / name)
    for module, shipped_as in SHIPPED_MODULES.items():
        shutil.copy2(PACKAGE_DIR / module, dest / shipped_as)
    card = SpaceCard.load(SPACE_DIR / "README.md")
    # `models:` is what app.py serves by default; it also links the Space from the model page.
    card.data.models = [model_repo_id]
    # Spaces download preload_from_hub repos at build time, so the first visitor does not wait.
    card.data.preload_from_hub = [model_repo_id]
    card.save(dest / "README.md")
    if examples_dir is not None:
        shutil.copytree(examples_dir, dest / EXAMPLES_IN_SPACE, dirs_exist_ok=True)
    return dest


def push_space(space_id: str, model_repo_id: str, *, examples_dir: Path | None = None, private: bool | None = None,
               token: str | None = None) -> str:
    """`hf-transfer push ... --space user/space`: create or update a Gradio Space serving model_repo_id; return its URL.
    Stale example images from an earlier push are removed."""
    api = HfApi(token=token)
    url = api.create_repo(space_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as staging:
        stage_space(Path(staging), model_repo_id, examples_dir)
        api.upload_folder(repo_id=space_id, repo_type="space", folder_path=staging, commit_message=f"Demo of {model_repo_id}",
                          delete_patterns=[f"{EXAMPLES_IN_SPACE}/*"])
    return str(url)
