"""Small images (CIFAR-10's 32 px) go to the GPU at their own size; upsampling and normalisation run there.

hf_transfer's data path resizes every image to the model's input size on the CPU (32 -> 256 ->
crop 224 for Lite0), which costs 49x the pixels in decoding, cropping and host-to-device copies.
Here the workers only decode and augment at 32 px; `DeviceResize.attach(model)` upsamples each uint8
batch on the device, in a forward pre-hook, so Trainer, evaluation and the feature cache all see it.
A proposal for hf_transfer, kept in the benchmarks until the library has it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision import transforms as T


def small_image_transforms(size: int, pad: int = 4):
    """(train, eval) transforms from PIL to uint8 CHW tensors at the images' own size.

    Train: the usual CIFAR augmentation, a random crop from the image padded by `pad` px (reflect)
    and a horizontal flip; done before the upsampling, so it is cheap.
    """
    train = T.Compose([
        T.RandomCrop(size, padding=pad, padding_mode="reflect"),
        T.RandomHorizontalFlip(),
        T.PILToTensor(),
    ])
    return train, T.Compose([T.CenterCrop(size), T.PILToTensor()])


class DeviceResize:
    """uint8 (B, 3, h, w) on the device -> normalised float (B, 3, H, W) at the model's input size."""

    def __init__(self, data_config: dict, channels_last: bool = False):
        _, self.height, self.width = data_config["input_size"]
        self.mode = data_config.get("interpolation", "bilinear")
        if self.mode not in ("bilinear", "bicubic", "nearest"):
            self.mode = "bilinear"
        self.mean = torch.tensor(data_config["mean"]).view(1, 3, 1, 1)
        self.std = torch.tensor(data_config["std"]).view(1, 3, 1, 1)
        self.channels_last = channels_last

    def attach(self, model: torch.nn.Module):
        """Resize `pixel_values` before every forward of `model`; returns the hook's handle."""
        return model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, _module, args, kwargs):
        if "pixel_values" in kwargs:
            kwargs["pixel_values"] = self(kwargs["pixel_values"])
        elif args:
            args = (self(args[0]), *args[1:])
        return args, kwargs

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:  # already float and sized (e.g. a cached batch): leave it
            return images
        mean, std = self.mean.to(images.device), self.std.to(images.device)
        pixels = images.float().div_(255)
        if pixels.shape[-2:] != (self.height, self.width):
            pixels = F.interpolate(pixels, size=(self.height, self.width), mode=self.mode, align_corners=False).clamp_(0, 1)
        pixels = pixels.sub_(mean).div_(std)
        return pixels.contiguous(memory_format=torch.channels_last) if self.channels_last else pixels
