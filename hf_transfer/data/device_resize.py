"""Small images of one size (CIFAR's 32 px) go to the training device at that size: the CPU only decodes
(and, in training, shifts and flips) them; resizing, centre crop and normalisation run there, batched."""

from __future__ import annotations

import contextlib
import io
import logging
import math

import timm.data
import torch
from PIL import ExifTags, Image
from torch.nn import functional as F
from torch.utils.hooks import RemovableHandle
from torchvision import transforms as T
from torchvision.transforms import v2

from ..errors import DatasetError
from ..options import DataArguments
from .splits import PreparedData, image_name
from .transforms import build_transforms, check_augmentation

logger = logging.getLogger(__name__)

SIZE_SAMPLE = 32  # images per split whose size decides `resize_on_device: auto` (file headers only)


def transforms_for_run(args: DataArguments, data: PreparedData, data_config: dict, device: torch.device):
    """`(train, eval, device_step)`: the CPU transforms, and the step that finishes their batches on `device`
    (a `DeviceResize`, to attach to the model), or None when the CPU does all the preprocessing."""
    image_size = device_resized_size(args.resize_on_device, data, data_config, device)
    if image_size is None:
        return (*build_transforms(data_config, args.augmentation, args.crop_min_scale), None)
    return device_transforms(data_config, image_size, args.augmentation)


def device_resized_size(mode: str, data: PreparedData, data_config: dict, device: torch.device) -> tuple[int, int] | None:
    """The (height, width) of the images when `mode` (`resize_on_device`) resizes them on `device`, else None. `auto`:
    on a CUDA device (a CPU gains nothing), for images of one size smaller than the model's input."""
    if mode == "false" or (mode == "auto" and device.type != "cuda"):
        return None
    problem = DeviceResize.unsupported(data_config)
    if problem and mode == "auto":
        logger.info("Resizing on the CPU: the model's preprocessing has %s.", problem)
        return None
    sizes = {}  # the distinct (height, width) of the first `SIZE_SAMPLE` images of every split, each with one image's name
    for split in data.splits.values():
        for index, cell in enumerate(split.select(range(min(SIZE_SAMPLE, len(split))))[data.image_column]):
            sizes.setdefault(_decoded_height_width(cell), image_name(cell, index))
    if len(sizes) > 1:
        if mode == "true":
            found = ", ".join(f"{height}x{width} ({name})" for (height, width), name in list(sizes.items())[:3])
            raise DatasetError(
                f"`resize_on_device: true` needs images of one size, to batch them before resizing; found {found}. "
                "Set `resize_on_device: false` (or `auto`) to resize every image on the CPU."
            )
        logger.info("Resizing on the CPU: the images have %d different sizes.", len(sizes))
        return None
    height, width = next(iter(sizes))
    _, input_height, input_width = data_config["input_size"]
    if mode == "auto" and (height >= input_height or width >= input_width):
        logger.info("Resizing on the CPU: the %dx%d px images are not smaller than the model's input.", height, width)
        return None
    logger.info("Resizing on the device: %dx%d px images are decoded on the CPU and resized to %s there.", height, width, data_config["input_size"][1:])
    return height, width


def _decoded_height_width(cell: dict) -> tuple[int, int]:
    """(height, width) as decoded (EXIF orientation applied), from the file's header: no pixels are decoded."""
    with Image.open(io.BytesIO(cell["bytes"]) if cell.get("bytes") else cell["path"]) as image:
        width, height = image.size
        if image.getexif().get(ExifTags.Base.Orientation) in (5, 6, 7, 8):  # turned by 90 degrees
            width, height = height, width
    return height, width


def device_transforms(data_config: dict, image_size: tuple[int, int], augmentation: str = "default"):
    """`(train, eval, device_step)` when `device_step` resizes on the device: the CPU decodes each `image_size` image to a
    uint8 tensor at its own size and, in training, augments it there (cheap at 32 px: a shift, a flip)."""
    check_augmentation(augmentation)
    device_step = DeviceResize(data_config)
    eval_transform = DecodeForDevice([T.PILToTensor()], device_step)
    if augmentation == "none":
        return eval_transform, eval_transform, device_step
    extra = {"randaugment": [T.RandAugment()], "trivialaugment": [T.TrivialAugmentWide()]}.get(augmentation, [])
    # a random shift by up to 1/8 of the side with reflected borders (CIFAR's pad-4-and-crop at 32 px), then a coin-flip mirror
    shift_and_flip = [v2.RandomCrop(image_size, padding=round(min(image_size) / 8), padding_mode="reflect"), v2.RandomHorizontalFlip()]
    return DecodeForDevice([T.PILToTensor(), *shift_and_flip, *extra], device_step), eval_transform, device_step


class DecodeForDevice(T.Compose):
    """The CPU half of a device-resized transform; its repr names the device half too (the feature cache keys on it)."""

    def __init__(self, transforms: list, device_step: DeviceResize):
        super().__init__(transforms)
        self.device_step = device_step

    def __repr__(self) -> str:
        return f"{super().__repr__()}\nthen on the device: {self.device_step!r}"


class DeviceResize:
    """uint8 image batches (B, 3, h, w) -> the model's input, on the batch's own device: timm's eval transform for this
    data config (resize by `crop_pct`, centre crop, normalise), computed as Pillow computes it on the CPU path."""

    MODES = ("bicubic", "bilinear")

    def __init__(self, data_config: dict, channels_last: bool = False):
        problem = self.unsupported(data_config)
        if problem:
            raise ValueError(f"Cannot resize on the device: {problem}. Set `resize_on_device: false`.")
        _, self.height, self.width = data_config["input_size"]
        self.crop_pct = data_config.get("crop_pct") or timm.data.DEFAULT_CROP_PCT
        self.squash = data_config.get("crop_mode") == "squash"
        self.mode = data_config.get("interpolation", "bilinear")
        self.mean, self.std = (torch.tensor(data_config[key], dtype=torch.float32).view(1, 3, 1, 1) for key in ("mean", "std"))
        self.channels_last = channels_last

    @classmethod
    def unsupported(cls, data_config: dict) -> str | None:
        """Why this data config's eval transform has no device version here, or None."""
        if data_config.get("interpolation", "bilinear") not in cls.MODES:
            return f"interpolation '{data_config['interpolation']}' (supported: {', '.join(cls.MODES)})"
        if data_config.get("crop_mode") not in (None, "center", "squash"):
            return f"crop_mode '{data_config['crop_mode']}' (supported: center, squash)"
        return None

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """The size timm's eval transform resizes an image to before its centre crop."""
        scale_height, scale_width = math.floor(self.height / self.crop_pct), math.floor(self.width / self.crop_pct)
        if self.squash:
            return scale_height, scale_width
        if scale_height == scale_width:  # torchvision's Resize(int): the shorter side to `scale`
            scale = scale_height
            return (scale, int(scale * width / height)) if height <= width else (int(scale * height / width), scale)
        ratio = min(height / scale_height, width / scale_width)  # timm's ResizeKeepRatio
        return round(height / ratio), round(width / ratio)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:  # floats are already the model's input
            return images
        height, width = self.resized_size(*images.shape[-2:])
        pixels = self._resize(images.float(), height, width)
        top, left = round((height - self.height) / 2), round((width - self.width) / 2)  # torchvision's centre crop
        pixels = pixels[..., top:top + self.height, left:left + self.width]
        if self.mean.device != pixels.device:  # moved once, not every batch
            self.mean, self.std = self.mean.to(pixels.device), self.std.to(pixels.device)
        pixels = (pixels / 255 - self.mean) / self.std
        return pixels.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)

    def _resize(self, pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Pillow resizes rows first, then columns, into uint8 after each pass; doing the same matches it
        to 1 level on 0.01% of pixels (one float pass differs by up to 8 levels on 20% of them)."""
        for size in ((pixels.shape[-2], width), (height, width)):
            if tuple(pixels.shape[-2:]) != size:  # antialias: Pillow's filter support, also when upsampling
                pixels = F.interpolate(pixels, size=size, mode=self.mode, antialias=True).clamp_(0, 255).round_()
        return pixels

    def attach(self, model: torch.nn.Module) -> RemovableHandle:
        """Preprocess `pixel_values` before every forward of `model` (training, evaluation, feature extraction)."""
        return model.register_forward_pre_hook(self._hook, with_kwargs=True)

    @contextlib.contextmanager
    def attached(self, model: torch.nn.Module):
        """`attach`, for the length of a `with` block: the saved model takes images preprocessed as usual."""
        with self.attach(model):
            yield self

    def _hook(self, _module, args, kwargs):
        if "pixel_values" in kwargs:
            kwargs["pixel_values"] = self(kwargs["pixel_values"])
        elif args:
            args = (self(args[0]), *args[1:])
        return args, kwargs

    def __repr__(self) -> str:
        return (f"DeviceResize(input_size={(self.height, self.width)}, crop_pct={self.crop_pct}, squash={self.squash}, "
                f"mode={self.mode}, mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})")
