"""Gradio demo of an image classifier fine-tuned with hf_transfer, run locally or as a Hugging Face Space.

A Space installs requirements.txt only, never hf_transfer: besides those packages this file needs just
hf_transfer/images.py, which `hf-transfer push --space` ships next to it as hf_transfer_images.py.
"""

from __future__ import annotations

import argparse
import io
import json
import os
from pathlib import Path

import gradio as gr
from huggingface_hub import ModelCard, ModelCardData, SpaceCard, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError
from PIL import Image
from transformers import pipeline

# The decoding policy the model was trained with (transparency onto white, EXIF rotation, 16-bit scaling).
try:
    from hf_transfer.images import UnreadableImageError, load_image
except ModuleNotFoundError:  # on a Space: `hf-transfer push --space` ships hf_transfer/images.py under this name
    from hf_transfer_images import UnreadableImageError, load_image

APP_DIR = Path(__file__).resolve().parent
MODEL_ENV = "HF_TRANSFER_MODEL"
EXAMPLES_ENV = "HF_TRANSFER_EXAMPLES"
MAX_IMAGE_BYTES = 10 * 1024 * 1024
MAX_IMAGE_PIXELS = 40_000_000
MAX_EXAMPLES = 12
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp"}


def resolve_model(flag: str | None) -> str:
    """The model to serve: --model, else $HF_TRANSFER_MODEL, else the first `models:` entry of the Space README."""
    pinned = SpaceCard.load(APP_DIR / "README.md").data.models or [None]
    model = flag or os.environ.get(MODEL_ENV) or pinned[0]
    if not model:
        raise SystemExit(f"No model to serve: pass --model <output dir | repo id> or set {MODEL_ENV}.")
    return model


def resolve_examples(flag: str | None) -> Path | None:
    """The example images folder: --examples, else $HF_TRANSFER_EXAMPLES, else examples/ next to this file."""
    folder = flag or os.environ.get(EXAMPLES_ENV)
    if folder:
        return Path(folder)
    default = APP_DIR / "examples"
    return default if default.is_dir() else None


def example_images(folder: Path | None) -> list[str]:
    if folder is None:
        return []
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return [str(p) for p in images[:MAX_EXAMPLES]]


def _model_file(model_ref: str, filename: str) -> Path | None:
    """A file of the model: from a local output dir or the Hub repo; None when the model has none."""
    if Path(model_ref).is_dir():
        path = Path(model_ref) / filename
        return path if path.is_file() else None
    try:
        return Path(hf_hub_download(model_ref, filename))
    except EntryNotFoundError:
        return None


def _test_accuracy(results: dict, card: ModelCardData) -> float | None:
    """The run's own all_results.json first, else the card's model-index."""
    if results.get("test_accuracy") is not None:
        return results["test_accuracy"]
    for result in card.eval_results or []:
        if result.metric_type == "accuracy" and result.dataset_split == "test":
            return result.metric_value
    return None


def card_summary(model_ref: str, label_names: list[str]) -> str:
    """Markdown lines on the model: base model, dataset, test accuracy and classes."""
    card_path = _model_file(model_ref, "README.md")
    results_path = _model_file(model_ref, "all_results.json")
    card = ModelCard.load(card_path).data if card_path else ModelCardData()
    results = json.loads(results_path.read_text()) if results_path else {}

    def listed(value: str | list[str] | None) -> str:
        values = [value] if isinstance(value, str) else value or []
        return ", ".join(f"`{v}`" for v in values) or "not stated"

    accuracy = _test_accuracy(results, card)
    accuracy_text = "not reported" if accuracy is None else f"{accuracy:.1%}"
    test_size = (results.get("split_sizes") or {}).get("test")
    if accuracy is not None and test_size:
        accuracy_text += f" on {test_size:,} test images"
    classes = ", ".join(label_names) if len(label_names) <= 10 else f"{len(label_names)} classes"
    # A local dataset folder has no Hub id; the model-index still names it.
    dataset = listed(card.datasets) if card.datasets else next(
        (result.dataset_name for result in card.eval_results or []), "not stated")
    return "\n".join([
        f"- **Base model:** {listed(card.base_model)}",
        f"- **Dataset:** {dataset}",
        f"- **Test accuracy:** {accuracy_text}",
        f"- **Classes:** {classes}",
    ])


def _bad_input(message: str) -> gr.Error:
    # The visitor's mistake, not the server's: show it in the page, log no traceback.
    return gr.Error(message, print_exception=False)


def _header_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the header alone, before any pixel is decoded; (0, 0) when it is unreadable."""
    try:
        with Image.open(io.BytesIO(data)) as header:
            return header.size
    except Exception:  # any Pillow failure: load_image then names the problem
        return 0, 0


def read_upload(path: Path) -> Image.Image:
    """Decode an uploaded file into an RGB image, enforcing the size limits on the server."""
    size = path.stat().st_size
    if size > MAX_IMAGE_BYTES:
        raise _bad_input(f"The file is {size / 2**20:.1f} MB; the limit is {MAX_IMAGE_BYTES // 2**20} MB.")
    data = path.read_bytes()
    width, height = _header_size(data)
    if width * height > MAX_IMAGE_PIXELS:
        raise _bad_input(f"The image is {width}×{height} pixels ({width * height / 1e6:.1f} megapixels); "
                         f"the limit is {MAX_IMAGE_PIXELS / 1e6:.0f} megapixels.")
    try:
        return load_image(data)
    except UnreadableImageError as error:
        raise _bad_input(f"This file cannot be used as an image: {error.reason}.") from None


def build_demo(model_ref: str, examples_dir: Path | None = None, top_k: int = 5) -> gr.Blocks:
    """The page: upload, top-k labels with confidences, examples, and the model card summary.

    Gradio copies the example images into its cache here: examples_dir is not needed afterwards.
    """
    classifier = pipeline("image-classification", model=model_ref, device="cpu")
    label_names = list(classifier.model.config.id2label.values())

    def classify(upload: dict | None) -> dict[str, float]:
        # Raw upload payload (preprocess=False): this app decodes the file itself, with limits.
        if not upload or not upload.get("path"):
            raise _bad_input("Please upload an image first.")
        predictions = classifier(read_upload(Path(upload["path"])), top_k=top_k)
        return {p["label"]: p["score"] for p in predictions}

    model_name = Path(model_ref).name if Path(model_ref).is_dir() else model_ref
    with gr.Blocks(title=f"{model_name} · image classifier", analytics_enabled=False) as demo:
        gr.Markdown(f"# Image classifier: `{model_name}`\n{card_summary(model_ref, label_names)}")
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="filepath", sources=["upload", "clipboard"], label="Image",
                                 elem_id="input-image")
                with gr.Row():
                    clear = gr.ClearButton(value="Clear", elem_id="clear-button")
                    submit = gr.Button("Classify", variant="primary", elem_id="classify-button")
            label = gr.Label(num_top_classes=top_k, label="Prediction")
        clear.add([image, label])
        gr.Markdown(
            f"Any image Pillow can read, up to {MAX_IMAGE_BYTES // 2**20} MB and "
            f"{MAX_IMAGE_PIXELS / 1e6:.0f} megapixels. Runs on CPU."
        )
        submit.click(classify, inputs=image, outputs=label, preprocess=False, api_name="classify")
        examples = example_images(examples_dir)
        if examples:
            gallery = gr.Examples(examples, inputs=image, label="Examples from the test split")
            # A click on an example classifies it at once, through the same raw-payload path as an upload.
            gallery.load_input_event.then(classify, inputs=image, outputs=label, preprocess=False,
                                          api_visibility="undocumented")
    return demo


def launch(demo: gr.Blocks, host: str, port: int | None = None, block: bool = True) -> None:
    """Serve with safe defaults: the given host only, no share link, uploads capped in size.

    No allowed_paths: Gradio serves only its own cache (the examples were copied there) and the uploads.
    """
    demo.launch(
        server_name=host,
        server_port=port,
        share=False,
        max_file_size=MAX_IMAGE_BYTES,
        prevent_thread_lock=not block,
        # System fonts: the default theme makes every visitor's browser fetch Google Fonts.
        theme=gr.themes.Soft(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "monospace"]),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help=f"output dir or Hub repo id (default: ${MODEL_ENV}, then README `models:`)")
    parser.add_argument("--examples", help=f"folder of example images (default: ${EXAMPLES_ENV}, then ./examples)")
    parser.add_argument("--top-k", type=int, default=5)
    # Spaces set GRADIO_SERVER_NAME=0.0.0.0 in their container; anywhere else, loopback only.
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, help="default: $GRADIO_SERVER_PORT, else the first free from 7860")
    args = parser.parse_args(argv)
    demo = build_demo(resolve_model(args.model), resolve_examples(args.examples), args.top_k)
    launch(demo, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
