"""Gradio demo of an image classifier fine-tuned with hf_transfer, run locally or as a Hugging Face Space.

A Space installs requirements.txt only, never hf_transfer: besides those packages this file needs just a few modules
of hf_transfer (images, explain, escape, repo_files, precision), which `hf-transfer push --space` ships next to it as
hf_transfer_images.py, hf_transfer_explain.py and so on.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import io
import json
import os
import stat
import statistics
import time
from pathlib import Path, PurePath

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
# Class names, model and dataset ids come from the model repo: escaped for the page (Markdown) and the tab title.
try:
    from hf_transfer.escape import markdown, markdown_code, one_line
except ModuleNotFoundError:  # on a Space: shipped as hf_transfer_escape.py
    from hf_transfer_escape import markdown, markdown_code, one_line
# The names of the model repo's files, as the training run wrote them.
try:
    from hf_transfer.repo_files import ALL_RESULTS, MODEL_CARD
except ModuleNotFoundError:  # on a Space: shipped as hf_transfer_repo_files.py
    from hf_transfer_repo_files import ALL_RESULTS, MODEL_CARD
# Class-activation maps (Grad-CAM) of the pipeline's own model and preprocessing.
try:
    from hf_transfer.explain import Explainer, display_size, overlay
except ModuleNotFoundError as missing:
    if not (missing.name or "").startswith("hf_transfer"):  # grad-cam itself missing: say so, not "no hf_transfer_explain"
        raise
    from hf_transfer_explain import Explainer, display_size, overlay

# Predictions in bf16 autocast (+ channels_last for CNNs) where the CPU computes bf16 natively; gradients (Grad-CAM) untouched.
try:
    from hf_transfer.precision import prepare_for_inference
except ModuleNotFoundError:  # on a Space: shipped as hf_transfer_precision.py
    from hf_transfer_precision import prepare_for_inference
# The int8 ONNX graph `hf-transfer export` wrote and checked against the model's weights, served when there is one.
try:
    from hf_transfer.onnx_runtime import GRAPHS, OnnxClassifier, OnnxModelError, checked_graph, class_scores, top_k_ids
    from hf_transfer.repo_files import EXPORT_REPORT
except ModuleNotFoundError:  # on a Space: shipped as hf_transfer_onnx_runtime.py
    from hf_transfer_onnx_runtime import GRAPHS, OnnxClassifier, OnnxModelError, checked_graph, class_scores, top_k_ids
    from hf_transfer_repo_files import EXPORT_REPORT

APP_DIR = Path(__file__).resolve().parent
MODEL_ENV = "HF_TRANSFER_MODEL"
EXAMPLES_ENV = "HF_TRANSFER_EXAMPLES"
MAX_IMAGE_BYTES = 10 * 1024 * 1024
# One answer for every path a request names that Gradio did not store for it, so a caller learns nothing about the
# server's files: not whether one exists, nor its size or content.
NOT_UPLOADED_MESSAGE = "Only images uploaded to this page can be classified. Upload the image again."
MAX_IMAGE_PIXELS = 40_000_000
MAX_EXAMPLES = 12
# The map is drawn on a copy of the upload this large at most: about twice the width of its column on a laptop screen,
# and a 40-megapixel upload would otherwise come back as a PNG of tens of MB.
MAX_MAP_SIDE = 768
# classify and explain share one model, and explain hooks its layers for Grad-CAM while it runs: one event at a time.
MODEL_QUEUE = "model"
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
    card_path = _model_file(model_ref, MODEL_CARD)
    results_path = _model_file(model_ref, ALL_RESULTS)
    card = ModelCard.load(card_path).data if card_path else ModelCardData()
    results = json.loads(results_path.read_text()) if results_path else {}

    def listed(value: str | list[str] | None) -> str:
        values = [value] if isinstance(value, str) else value or []
        return ", ".join(map(markdown_code, values)) or "not stated"

    accuracy = _test_accuracy(results, card)
    accuracy_text = "not reported" if accuracy is None else f"{accuracy:.1%}"
    test_size = (results.get("split_sizes") or {}).get("test")
    if accuracy is not None and test_size:
        accuracy_text += f" on {test_size:,} test images"
    classes = ", ".join(map(markdown, label_names)) if len(label_names) <= 10 else f"{len(label_names)} classes"
    # A local dataset folder has no Hub id; the model-index still names it.
    dataset = listed(card.datasets) if card.datasets else next(
        (markdown_code(result.dataset_name) for result in card.eval_results or []), "not stated")
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


def _too_big(size_mb: float) -> gr.Error:
    return _bad_input(f"The file is {size_mb:.1f} MB; the limit is {MAX_IMAGE_BYTES // 2**20} MB.")


def _relative_parts(path: object, upload_dir: str | Path) -> tuple[str, ...] | None:
    """The names leading from upload_dir to `path` (absolute, lexically inside it, no `..`); None otherwise."""
    if not isinstance(path, str) or "\0" in path or not os.path.isabs(path):
        return None
    parts = PurePath(path).parts
    if ".." in parts:
        return None
    for root in {os.path.abspath(upload_dir), os.path.realpath(upload_dir)}:  # as configured, or resolved
        root_parts = PurePath(root).parts
        if parts[:len(root_parts)] == root_parts and len(parts) > len(root_parts):
            return parts[len(root_parts):]
    return None


def _open_regular_file(upload_dir: str | Path, parts: tuple[str, ...]) -> int:
    """A read-only descriptor of upload_dir/parts, reached without following any link; OSError unless it is a
    regular file. Devices and FIFOs are never opened (opening a FIFO waits for a writer, stalling the queue)."""
    if os.open not in os.supports_dir_fd:  # Windows: no openat(); check every step with lstat, then open
        current = Path(upload_dir)
        for name in parts:
            current = current / name
            if stat.S_ISLNK(os.lstat(current).st_mode):
                raise OSError(f"{current} is a link")
        if not stat.S_ISREG(os.lstat(current).st_mode):
            raise OSError(f"{current} is not a regular file")
        return os.open(current, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    no_follow = os.O_NOFOLLOW | os.O_CLOEXEC
    folder = os.open(upload_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # the cache itself: trusted config
    try:
        for name in parts[:-1]:
            inner = os.open(name, os.O_RDONLY | os.O_DIRECTORY | no_follow, dir_fd=folder)
            os.close(folder)
            folder = inner
        if not stat.S_ISREG(os.stat(parts[-1], dir_fd=folder, follow_symlinks=False).st_mode):
            raise OSError(f"{parts[-1]} is not a regular file")
        # O_NONBLOCK: should the name become a FIFO after the check, open() still returns at once.
        return os.open(parts[-1], os.O_RDONLY | os.O_NONBLOCK | no_follow, dir_fd=folder)
    finally:
        os.close(folder)


def read_uploaded_file(path: object, upload_dir: str | Path) -> bytes:
    """The bytes of a file Gradio stored under upload_dir, at most MAX_IMAGE_BYTES of them.

    Any other path (elsewhere, a link, a folder, a FIFO or device, a missing file) gets NOT_UPLOADED_MESSAGE.
    """
    parts = _relative_parts(path, upload_dir)
    try:
        if parts is None:
            raise OSError("not inside the upload folder")
        descriptor = _open_regular_file(upload_dir, parts)
    except OSError:
        raise _bad_input(NOT_UPLOADED_MESSAGE) from None
    try:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):  # replaced between the check and the open
            raise _bad_input(NOT_UPLOADED_MESSAGE)
        if info.st_size > MAX_IMAGE_BYTES:
            raise _too_big(info.st_size / 2**20)
        chunks, left = [], MAX_IMAGE_BYTES + 1  # bounded even if the file grows while it is read
        while left > 0 and (chunk := os.read(descriptor, min(left, 2**20))):
            chunks.append(chunk)
            left -= len(chunk)
    finally:
        os.close(descriptor)
    data = b"".join(chunks)
    if len(data) > MAX_IMAGE_BYTES:
        raise _too_big(len(data) / 2**20)
    return data


def _data_url_bytes(url: str) -> bytes:
    """The image of a `data:image/...;base64,...` URL, decoded only when it fits the size limit."""
    header, _, encoded = url.partition(",")
    if not header.startswith("data:image/") or not header.endswith(";base64"):
        raise _bad_input("Image data must be a base64 `data:image/...` URL.")
    if len(encoded) * 3 // 4 > MAX_IMAGE_BYTES + 2:  # 4 base64 characters per 3 bytes, up to 2 of padding
        raise _too_big(len(encoded) * 3 / 4 / 2**20)
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise _bad_input("This image data is not valid base64.") from None
    if len(data) > MAX_IMAGE_BYTES:
        raise _too_big(len(data) / 2**20)
    return data


def decode_image(data: bytes) -> Image.Image:
    """Decode an uploaded file's bytes into an RGB image, enforcing the pixel limit before decoding."""
    width, height = _header_size(data)
    if width * height > MAX_IMAGE_PIXELS:
        raise _bad_input(f"The image is {width}×{height} pixels ({width * height / 1e6:.1f} megapixels); "
                         f"the limit is {MAX_IMAGE_PIXELS / 1e6:.0f} megapixels.")
    try:
        return load_image(data)
    except UnreadableImageError as error:
        raise _bad_input(f"This file cannot be used as an image: {error.reason}.") from None


def read_upload(upload: object, upload_dir: str | Path) -> Image.Image:
    """The image of one classify request: a file Gradio stored under upload_dir for it, or a data URL.

    The payload comes raw (preprocess=False) and a caller can put any path in it, so nothing outside
    upload_dir is ever opened.
    """
    if not isinstance(upload, dict) or not (upload.get("path") or upload.get("url")):
        raise _bad_input("Please upload an image first.")
    if not upload.get("path") and isinstance(upload["url"], str) and upload["url"].startswith("data:"):
        return decode_image(_data_url_bytes(upload["url"]))
    return decode_image(read_uploaded_file(upload.get("path"), upload_dir))


def fast_graph(model_ref: str) -> tuple[OnnxClassifier | None, str]:
    """The int8 graph of the model that passed its export check against these weights, with its check in words; else None
    and why not (the demo then serves the PyTorch model)."""
    report = _model_file(model_ref, EXPORT_REPORT)
    if report is None:
        return None, "no int8 ONNX graph exported"
    folder = report.parent.parent  # <model>/onnx/export_report.json
    links_into = None if Path(model_ref).is_dir() else folder.parent.parent / "blobs"  # the Hub cache's own links
    try:
        path, entry = checked_graph(folder, "int8", links_into)  # refused, or from other weights: says so
        if _model_file(model_ref, GRAPHS["int8"]) is None:
            return None, "the int8 ONNX graph is missing"
        return OnnxClassifier(path, links_into), (f"export check: {entry['accuracy']:.1%} test accuracy on {entry['images']} images, "
                                                  f"{entry['agreement']:.1%} top-1 agreement with PyTorch")
    except OnnxModelError as error:
        print(f"Serving the PyTorch model: {error}")
        return None, str(error)


def _latency_ms(predict, image: Image.Image, runs: int = 5) -> float:
    """Median wall time of one prediction, after a warm-up one (kernels are prepared on first use)."""
    predict(image)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        predict(image)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def build_demo(model_ref: str, examples_dir: Path | None = None, top_k: int = 5) -> gr.Blocks:
    """The page: upload, top-k labels with confidences, on request a map of where the model looked, examples,
    and the model card summary.

    Gradio copies the example images into its cache here: examples_dir is not needed afterwards.
    """
    classifier = pipeline("image-classification", model=model_ref, device="cpu")
    precision = prepare_for_inference(classifier.model)  # what `inference_precision: auto` decides for a run's passes
    explainer = Explainer.from_pipeline(classifier)  # nothing runs until the first explanation
    label_names = list(classifier.model.config.id2label.values())
    graph, check = fast_graph(model_ref)
    config = classifier.model.config

    def predict(picture: Image.Image) -> dict[str, float]:
        if graph is None:
            return {p["label"]: p["score"] for p in classifier(picture, top_k=top_k)}
        # The pipeline's own preprocessing and scores (onnx_runtime.class_scores), the graph's logits.
        pixels = classifier.image_processor(images=picture, return_tensors="pt")["pixel_values"].numpy()
        scores = class_scores(graph.logits(pixels), config.num_labels, config.problem_type)[0]
        return {config.id2label[index]: float(scores[index]) for index in top_k_ids(scores[None], top_k)[0]}

    latency = _latency_ms(predict, Image.new("RGB", (256, 256), (128, 128, 128)))
    serving = (f"the int8 ONNX graph `{GRAPHS['int8']}` on onnxruntime ({check}), {latency:.1f} ms per image; explanations "
               f"use the PyTorch model, {precision.describe()}" if graph is not None
               else f"{precision.describe()}, the PyTorch model, {latency:.1f} ms per image")

    def classify(upload: dict | None) -> dict[str, float]:
        # Raw upload payload (preprocess=False): this app checks and decodes the file itself, with limits.
        # Uploads and the examples' copies both live in the image component's cache (Gradio's upload folder).
        return predict(read_upload(upload, image.GRADIO_CACHE))

    def explain(upload: dict | None) -> tuple[Image.Image, dict[str, float]]:
        """The upload with the Grad-CAM map of its top class drawn over it, and the prediction that map explains
        (from the same forward pass); the same checks as classify."""
        picture = read_upload(upload, image.GRADIO_CACHE)
        shown = picture.resize(display_size(picture.size, MAX_MAP_SIDE), Image.Resampling.BILINEAR)
        result = explainer.explain(picture, size=shown.size)  # computed on the full upload, drawn at the shown size
        top = sorted(result.probabilities.items(), key=lambda item: -item[1])[:top_k]
        return overlay(shown, result.heatmap), dict(top)

    model_name = Path(model_ref).name if Path(model_ref).is_dir() else model_ref
    with gr.Blocks(title=f"{one_line(model_name)} · image classifier", analytics_enabled=False) as demo:
        gr.Markdown(f"# Image classifier: {markdown_code(model_name)}\n{card_summary(model_ref, label_names)}\n\n"
                    f"Predictions on this machine: {serving}.")
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="filepath", sources=["upload", "clipboard"], label="Image",
                                 elem_id="input-image")
                with gr.Row():
                    clear = gr.ClearButton(value="Clear", elem_id="clear-button")
                    submit = gr.Button("Classify", variant="primary", elem_id="classify-button")
                    explain_button = gr.Button("Where did it look?", elem_id="explain-button")
            with gr.Column():
                label = gr.Label(num_top_classes=top_k, label="Prediction")
                explanation = gr.Image(label="Where it looked (Grad-CAM, top class)", format="png",
                                       interactive=False, elem_id="explanation")
        clear.add([image, label, explanation])
        gr.Markdown(
            f"Any image Pillow can read, up to {MAX_IMAGE_BYTES // 2**20} MB and "
            f"{MAX_IMAGE_PIXELS / 1e6:.0f} megapixels. Runs on CPU."
        )
        submit.click(classify, inputs=image, outputs=label, preprocess=False, api_name="classify", concurrency_id=MODEL_QUEUE)
        # A separate event: the plain prediction does not wait for a backward pass it did not ask for.
        explain_button.click(explain, inputs=image, outputs=[explanation, label], preprocess=False, api_name="explain",
                             concurrency_id=MODEL_QUEUE)
        image.change(None, outputs=explanation, js="() => null")  # in the browser: a new image hides the old map
        examples = example_images(examples_dir)
        if examples:
            gallery = gr.Examples(examples, inputs=image, label="Examples from the test split")
            # A click on an example classifies it at once, through the same raw-payload path as an upload.
            gallery.load_input_event.then(classify, inputs=image, outputs=label, preprocess=False,
                                          api_visibility="undocumented", concurrency_id=MODEL_QUEUE)
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
