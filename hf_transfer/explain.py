"""Class-activation maps: where a classifier looked, for timm and transformers models.

Grad-CAM (the `grad-cam` package) on the model as `pipeline("image-classification")` loads it, fed by its own image
processor, so the map explains the very forward pass that made the prediction. It is drawn back onto the image the
user gave: the part of the image that the processor cropped away gets 0.

This module imports nothing else from hf_transfer (but for the model card's figure): `hf-transfer push --space` ships it
to a Space next to app.py, as hf_transfer_explain.py, where only spaces_demo/requirements.txt is installed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import nn

# The coordinate probe (see `_input_window`) is drawn at most this large: enough for 8-bit ramps (256 steps), small
# enough to preprocess in a few milliseconds, and any aspect ratio the processor sees stays within 1/1024 of the real one.
PROBE_SIDE = 1024
# Class tokens, distillation and register tokens that ViT-style models put before the patch tokens (DINOv2 with
# registers has 1 + 4); beyond this many the token count is not read as a patch grid.
MAX_PREFIX_TOKENS = 8


class ExplainError(ValueError):
    """A model whose class-activation map cannot be computed; the message says why."""


@dataclass
class Explanation:
    """A class-activation map of one image for one class."""

    heatmap: np.ndarray  # float32 (height, width) in [0, 1] at the image's size (or the size asked for); 0 = not used
    class_index: int
    label: str
    score: float  # the model's softmax probability of that class
    probabilities: dict[str, float]  # of every class, from the same forward pass
    layer: str  # the name of the layer whose activations were weighted, e.g. `timm_model.bn2`


@dataclass
class TargetLayer:
    """Where Grad-CAM reads activations and gradients, and how to lay them out as (batch, channels, rows, columns)."""

    name: str
    module: nn.Module
    layout: str  # "NCHW", "NHWC" (timm's Swin, MambaOut) or "tokens" (ViT-style: prefix tokens, then a patch grid)

    def reshape_transform(self, input_size: tuple[int, int]) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """grad-cam's `reshape_transform` for an input of input_size (rows, columns); None when already NCHW."""
        if self.layout == "NHWC":
            return lambda tensor: tensor.permute(0, 3, 1, 2)
        if self.layout == "tokens":
            return lambda tensor: tokens_to_grid(tensor, input_size)
        return None


def tokens_to_grid(tokens: torch.Tensor, input_size: tuple[int, int]) -> torch.Tensor:
    """(batch, tokens, channels) -> (batch, channels, rows, columns): grad-cam's ViT reshape transform, with the
    prefix tokens (class, distillation, registers) dropped and the patch grid read from the token count and the
    input's aspect ratio, so it fits any patch size, prefix and input size."""
    rows, columns, prefix = patch_grid(tokens.shape[1], input_size)
    grid = tokens[:, prefix:, :].reshape(tokens.shape[0], rows, columns, tokens.shape[2])
    return grid.permute(0, 3, 1, 2)


def patch_grid(n_tokens: int, input_size: tuple[int, int]) -> tuple[int, int, int]:
    """(rows, columns, prefix tokens) of n_tokens laid out as prefix tokens, then a rows x columns patch grid whose
    shape matches input_size (rows, columns); the fewest prefix tokens that fit win."""
    height, width = input_size
    for prefix in range(min(MAX_PREFIX_TOKENS, n_tokens - 1) + 1):
        patches = n_tokens - prefix
        rows = max(1, round(math.sqrt(patches * height / width)))
        if patches % rows == 0 and abs(rows / (patches // rows) - height / width) <= 0.5 * height / width:
            return rows, patches // rows, prefix
    raise ExplainError(f"{n_tokens} tokens do not form a patch grid for an input of {width}x{height} pixels")


class Logits(nn.Module):
    """The classifier as one tensor function, pixel values in, a (batch, classes) logits tensor out: grad-cam and an ONNX
    graph take tensors, not a ModelOutput."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        output = self.model(pixel_values=pixel_values)
        return output if isinstance(output, torch.Tensor) else output.logits


def find_target_layer(model: nn.Module, pixel_values: torch.Tensor) -> TargetLayer:
    """The layer whose map Grad-CAM weighs, found from one forward pass of pixel_values, for timm and transformers models
    alike. CNNs (and timm's NHWC models): the last module to output a spatial map before the head, i.e. the feature map
    that global pooling reads (timm's `forward_features` output: `bn2` of EfficientNet, `layer4` of ResNet). ViT-style
    models, whose last spatial map is the patch embedding: the first norm of the last transformer block (timm
    `blocks[-1].norm1`, transformers `encoder.layer[-1].layernorm_before`), grad-cam's recipe for ViTs, since the final
    norm's patch tokens get no gradient when the class token alone is classified."""
    names = {module: name for name, module in model.named_modules()}
    in_block_list = {child for module in model.modules() if isinstance(module, (nn.ModuleList, nn.Sequential))
                     for child in module.children()}
    # (module, output shape, whether the output is that tensor itself rather than a tuple holding it), in the order
    # modules finish: an outer module after its children.
    calls: list[tuple[nn.Module, torch.Size, bool]] = []

    def record(module, _inputs, output):
        first = output[0] if isinstance(output, (tuple, list)) and output else output
        if isinstance(first, torch.Tensor):
            calls.append((module, first.shape, first is output))

    hooks = [module.register_forward_hook(record) for module in model.modules()]
    try:
        with torch.no_grad():
            Logits(model)(pixel_values[:1])
    finally:
        for hook in hooks:
            hook.remove()

    def spatial(shape) -> bool:  # of the one image: two dims > 1 make a map, not pooled features
        return len(shape) == 4 and shape[0] == 1 and sorted(shape[1:])[1] > 1

    def tokens(shape) -> bool:
        return len(shape) == 3 and shape[0] == 1 and shape[1] > 1

    last_map = max((i for i, (_, shape, bare) in enumerate(calls) if bare and spatial(shape)), default=None)
    if last_map is None:
        raise ExplainError(f"{type(model).__name__} outputs no spatial feature map or patch tokens: no class-activation map")
    if not any(tokens(shape) for _, shape, _ in calls[last_map + 1:]):
        module, shape, _ = calls[last_map]
        # timm's Swin and MambaOut keep channels last: the head's first linear layer reads the pooled channels.
        channels = next((m.in_features for m, _, _ in calls[last_map + 1:] if isinstance(m, nn.Linear)), None)
        layout = "NHWC" if shape[-1] == channels and shape[1] != channels else "NCHW"
        return TargetLayer(names[module], module, layout)
    blocks = [module for module, shape, _ in calls[last_map + 1:] if module in in_block_list and tokens(shape)
              and any(_is_norm(m) for m in module.modules())]
    if not blocks:
        raise ExplainError(f"{type(model).__name__} has patch tokens but no transformer blocks with a norm layer")
    norm = next(m for m in blocks[-1].modules() if _is_norm(m))
    return TargetLayer(names[norm], norm, "tokens")


def _start_graph(_module, _inputs, output: torch.Tensor) -> torch.Tensor:
    # A copy of a leaf that requires grad: the backward pass ends here, and later in-place ops (an inplace ReLU) are allowed.
    return output.detach().requires_grad_(True).clone()


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith(("LayerNorm", "RMSNorm", "RmsNorm"))


class Explainer:
    """Grad-CAM of an image classifier as `pipeline("image-classification")` runs it: the same model object and
    the same preprocessing, so the map explains the pipeline's own prediction."""

    def __init__(self, model: nn.Module, image_processor):
        self.model, self.image_processor = model, image_processor
        self.labels = dict(model.config.id2label)
        self._target: TargetLayer | None = None
        self._calibration: tuple[np.ndarray, np.ndarray] | None = None

    @classmethod
    def from_pipeline(cls, classifier) -> Explainer:
        return cls(classifier.model, classifier.image_processor)

    @classmethod
    def from_pretrained(cls, model: str | Path, device: str = "cpu") -> Explainer:
        """From a model folder or Hub id, loaded as `pipeline("image-classification", model=...)` loads it."""
        from transformers import pipeline

        return cls.from_pipeline(pipeline("image-classification", model=str(model), device=device))

    def pixel_values(self, image: Image.Image) -> torch.Tensor:
        """The model's input for image: (1, channels, rows, columns), from the pipeline's image processor."""
        return self.image_processor(images=[image], return_tensors="pt")["pixel_values"]

    def target_layer(self, pixel_values: torch.Tensor) -> TargetLayer:
        self._target = self._target or find_target_layer(self.model, pixel_values)
        return self._target

    def explain(self, image: Image.Image, class_index: int | None = None, size: tuple[int, int] | None = None) -> Explanation:
        """The Grad-CAM map of class_index (default: the top class) on image, at size (width, height; default: the
        image's own), scaled to [0, 1]; where the processor cropped the image away, 0."""
        image = image if image.mode == "RGB" else image.convert("RGB")
        parameter = next(self.model.parameters())
        pixels = self.pixel_values(image).to(device=parameter.device, dtype=parameter.dtype)
        target = self.target_layer(pixels)
        was_training = self.model.training
        # grad-cam and OpenCV load with the first map: a run that keeps its figure (figures.draw) needs neither (1.3 s).
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        # Gradients are needed from the logits back to the target layer only: with every parameter frozen for the
        # call and the target's output made the start of the graph, the backward pass skips the backbone below it
        # (for EfficientNet-Lite0, all but the head: the backward pass costs less than the forward pass).
        flags = [(parameter, parameter.requires_grad) for parameter in self.model.parameters()]
        start = target.module.register_forward_hook(_start_graph)  # before grad-cam's hooks, which then see its output
        cam = GradCAM(Logits(self.model), [target.module], reshape_transform=target.reshape_transform(tuple(pixels.shape[-2:])))
        try:
            for parameter, _ in flags:
                parameter.requires_grad_(False)
            with torch.enable_grad():
                targets = None if class_index is None else [ClassifierOutputTarget(class_index)]
                grid = cam(pixels, targets=targets)[0]  # (rows, columns) of the model input, min-max scaled
                logits = cam.outputs[0].detach().float()
        finally:
            cam.activations_and_grads.release()
            start.remove()
            for parameter, requires_grad in flags:
                parameter.requires_grad_(requires_grad)
            self.model.train(was_training)
        index = int(logits.argmax()) if class_index is None else int(class_index)
        heatmap = self._to_image_frame(np.nan_to_num(grid.astype(np.float32)), image.size, size or image.size)
        probabilities = torch.softmax(logits, dim=-1).tolist()
        return Explanation(heatmap=heatmap, class_index=index, label=self.label(index), score=probabilities[index],
                           probabilities={self.label(i): p for i, p in enumerate(probabilities)}, layer=target.name)

    def label(self, index: int) -> str:
        return str(self.labels.get(index, self.labels.get(str(index), index)))

    # ---- the map, from the model's input back onto the image --------------------------------------------------------
    def input_window(self, image_size: tuple[int, int]) -> tuple[float, float, float, float]:
        """(left, top, width, height) of the model's input in the image, as fractions of the image's width and height.
        Found by preprocessing a probe image of that aspect ratio whose red channel ramps from left to right and green
        from top to bottom: what the processor makes of it says which part of the image each input pixel came from,
        for any image processor (timm's resize + center crop, a squashing ViT processor, ConvNeXt's crop_pct)."""
        probe_width, probe_height = (max(2, side) for side in display_size(image_size, PROBE_SIDE))
        ramp_x = np.floor(np.arange(probe_width) * 256 / probe_width).astype(np.uint8)
        ramp_y = np.floor(np.arange(probe_height) * 256 / probe_height).astype(np.uint8)
        probe = np.zeros((probe_height, probe_width, 3), np.uint8)
        probe[..., 0], probe[..., 1] = ramp_x[None, :], ramp_y[:, None]
        values = self._unnormalise(self.pixel_values(Image.fromarray(probe))[0].float().numpy())
        columns = _fit_ramp(values[0].mean(axis=0))  # red, averaged down each column
        rows = _fit_ramp(values[1].mean(axis=1))  # green, averaged along each row
        return columns[1], rows[1], columns[0] * values.shape[2], rows[0] * values.shape[1]

    def _unnormalise(self, values: np.ndarray) -> np.ndarray:
        """Processor output back to 0..255 per channel, from its output for a black and a white image."""
        if self._calibration is None:
            black, white = (self.pixel_values(Image.new("RGB", (64, 64), (v, v, v)))[0].float().numpy() for v in (0, 255))
            self._calibration = black.mean(axis=(1, 2)), white.mean(axis=(1, 2))
        black, white = self._calibration
        return 255 * (values - black[:, None, None]) / (white - black)[:, None, None]

    def _to_image_frame(self, grid: np.ndarray, image_size: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
        import cv2  # with the first map, as grad-cam

        left, top, window_width, window_height = self.input_window(image_size)
        width, height = size
        rows, columns = grid.shape
        # Output pixel x (centre x + 0.5 of `width`) lies at fraction u of the image, so at input column
        # (u - left) / window_width * columns; cv2 puts pixel centres on integers, hence the 0.5 shifts.
        scale_x, scale_y = columns / (window_width * width), rows / (window_height * height)
        to_grid = np.array([[scale_x, 0, 0.5 * scale_x - left / window_width * columns - 0.5],
                            [0, scale_y, 0.5 * scale_y - top / window_height * rows - 0.5]], np.float64)
        heatmap = cv2.warpAffine(grid, to_grid, (width, height), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                 borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        return np.clip(heatmap, 0, 1).astype(np.float32)


def _fit_ramp(profile: np.ndarray) -> tuple[float, float]:
    """(slope, offset) of u = slope * (i + 0.5) + offset: the image fraction u seen by input pixel i, from the probe's
    ramp values along one axis; the outer fifth on each side is left out, where edge clamping or padding bends it."""
    fraction = (profile + 0.5) / 256  # ramp value v covers the image from v / 256 to (v + 1) / 256
    n = len(fraction)
    inner = slice(n // 5, n - n // 5) if n >= 10 else slice(0, n)
    centres = np.arange(n, dtype=np.float64)[inner] + 0.5
    slope, offset = np.polyfit(centres, fraction[inner], 1)
    if slope <= 0:
        raise ExplainError("the image processor's output does not follow the image's geometry (flipped or constant)")
    return float(slope), float(offset)


def overlay(image: Image.Image, heatmap: np.ndarray, image_weight: float = 0.5) -> Image.Image:
    """image with heatmap drawn over it in grad-cam's jet colours (blue: not used, red: most used)."""
    if heatmap.shape != (image.height, image.width):
        raise ValueError(f"heatmap of shape {heatmap.shape} does not match the {image.width}x{image.height} image")
    from pytorch_grad_cam.utils.image import show_cam_on_image

    rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
    return Image.fromarray(show_cam_on_image(rgb, heatmap, use_rgb=True, image_weight=image_weight))


def display_size(image_size: tuple[int, int], longest: int) -> tuple[int, int]:
    """image_size shrunk (never enlarged) so that its longer side is at most `longest`."""
    width, height = image_size
    scale = min(1.0, longest / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


# ---- the model card's figure ---------------------------------------------------------------------------------------
def choose_examples(labels: Sequence[int], predictions: Sequence[int], per_group: int = 6) -> tuple[list[int], list[int]]:
    """Indices of up to per_group correctly and per_group wrongly predicted images, taking the classes in turn (by
    true class) so that one large class does not fill a group."""
    groups: tuple[list[int], list[int]] = ([], [])
    for wrong, chosen in enumerate(groups):
        by_class: dict[int, list[int]] = {}
        for index, (label, predicted) in enumerate(zip(labels, predictions)):
            if (int(label) != int(predicted)) == bool(wrong):
                by_class.setdefault(int(label), []).append(index)
        # the first image of each class (in class order), then the second of each, ...
        turns = zip_longest(*(by_class[label] for label in sorted(by_class)))
        chosen += [index for turn in turns for index in turn if index is not None][:per_group]
    return groups


def _open_image(value) -> Image.Image:
    """A PIL image, path, bytes or datasets image cell ({"bytes", "path"}) as RGB, EXIF rotation applied."""
    import io

    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        value = io.BytesIO(value)
    image = value if isinstance(value, Image.Image) else Image.open(value)
    return ImageOps.exif_transpose(image).convert("RGB")


def save_explanation_figure(model: Explainer | str | Path, images: Sequence, labels: Sequence[int],
                            predictions: Sequence[int], path: str | Path, per_group: int = 6, columns: int = 3,
                            load_image: Callable = _open_image, thumbnail: int = 224, metadata: dict | None = None) -> Path:
    """Draw Grad-CAM maps of the predicted class on test images, correctly classified ones on the left and misclassified
    ones on the right, into a PNG at path. model: an Explainer, or a model folder / Hub id loaded as the pipeline loads it.
    images, labels, predictions: the test split's images (any sequence; only the chosen ones are read, through load_image),
    true and predicted class indices. per_group images per side, `columns` per row. metadata: text for the PNG's own metadata."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and in tests
    import matplotlib.pyplot as plt

    from .escape import plot_text  # here, not above: a Space runs this module as hf_transfer_explain.py and draws no figure

    explainer = model if isinstance(model, Explainer) else Explainer.from_pretrained(model)
    correct, wrong = choose_examples(labels, predictions, per_group)
    rows = max(1, math.ceil(max(len(correct), len(wrong), 1) / columns))
    fig, axes = plt.subplots(rows, 2 * columns + 1, figsize=(2.2 * (2 * columns) + 0.4, 2.5 * rows + 0.9),
                             gridspec_kw={"width_ratios": [1] * columns + [0.15] + [1] * columns}, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    layer = None
    for side, (indices, first_column) in enumerate(((correct, 0), (wrong, columns + 1))):
        for n, index in enumerate(indices):
            image = load_image(images[index])
            shown = image.resize(display_size(image.size, thumbnail), Image.Resampling.BILINEAR)
            explanation = explainer.explain(image, class_index=int(predictions[index]), size=shown.size)
            layer = explanation.layer
            ax = axes[n // columns, first_column + n % columns]
            ax.imshow(overlay(shown, explanation.heatmap))
            ax.set_title(f"true: {plot_text(explainer.label(int(labels[index])))}\n"
                         f"predicted: {plot_text(explanation.label)} ({explanation.score:.0%})",
                         fontsize=8, color="darkgreen" if side == 0 else "darkred")
        if not indices:
            axes[0, first_column].text(0, 0.5, "none in the test split", fontsize=9, transform=axes[0, first_column].transAxes)
    fig.text(0.27, 0.995, f"correctly classified ({len(correct)} shown)", ha="center", va="top", fontsize=10, color="darkgreen")
    fig.text(0.75, 0.995, f"misclassified ({len(wrong)} shown)", ha="center", va="top", fontsize=10, color="darkred")
    fig.suptitle(f"Where the model looked: Grad-CAM of the predicted class at `{plot_text(layer or '-')}` (red: most weight)",
                 y=0.02, va="bottom", fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 0.96))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, format="png", metadata=metadata)
    plt.close(fig)
    return path
