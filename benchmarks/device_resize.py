"""Small images (CIFAR-10's 32 px) go to the GPU at their own size; upsampling and normalisation run there.

hf_transfer's data path resizes every image to the model's input size on the CPU (32 -> 256 ->
crop 224 for Lite0), which handles 49x the pixels in resizing, cropping, normalising and host-to-device copies.
Here the workers only decode, at 32 px; `DeviceResize.attach(model)` augments and upsamples each uint8
batch on the device, in a forward pre-hook, so Trainer, evaluation and the feature cache all see it.
A proposal for hf_transfer, kept in the benchmarks until the library has it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision import transforms as T


def small_image_transforms(size: int):
    """(train, eval) transforms from PIL to uint8 CHW tensors at the images' own size: decoding only.

    The augmentation (random crop from the image padded by 4 px, horizontal flip) runs on the device,
    batched, in `DeviceResize`: on the CPU the reflect padding alone cost twice the decoding.
    """
    to_tensor = T.Compose([T.CenterCrop(size), T.PILToTensor()])
    return to_tensor, to_tensor


class DeviceResize:
    """uint8 (B, 3, h, w) on the device -> normalised float (B, 3, H, W) at the model's input size.

    In training mode it first applies CIFAR's usual augmentation at the source size: a random
    crop of the image padded by `pad` px (reflect) and a random horizontal flip, per image.
    """

    def __init__(self, data_config: dict, channels_last: bool = False, pad: int = 4):
        _, self.height, self.width = data_config["input_size"]
        self.mode = data_config.get("interpolation", "bilinear")
        if self.mode not in ("bilinear", "bicubic", "nearest"):
            self.mode = "bilinear"
        self.mean = torch.tensor(data_config["mean"]).view(1, 3, 1, 1)
        self.std = torch.tensor(data_config["std"]).view(1, 3, 1, 1)
        self.channels_last, self.pad = channels_last, pad

    def attach(self, model: torch.nn.Module):
        """Resize `pixel_values` before every forward of `model`; returns the hook's handle."""
        return model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        if "pixel_values" in kwargs:
            kwargs["pixel_values"] = self(kwargs["pixel_values"], augment=module.training)
        elif args:
            args = (self(args[0], augment=module.training), *args[1:])
        return args, kwargs

    def __call__(self, images: torch.Tensor, augment: bool = False) -> torch.Tensor:
        if images.dtype != torch.uint8:  # already float and sized (e.g. a cached batch): leave it
            return images
        mean, std = self.mean.to(images.device), self.std.to(images.device)
        pixels = images.float().div_(255)
        if augment and self.pad:
            pixels = random_crop_and_flip(pixels, self.pad)
        if pixels.shape[-2:] != (self.height, self.width):
            pixels = F.interpolate(pixels, size=(self.height, self.width), mode=self.mode, align_corners=False).clamp_(0, 1)
        pixels = pixels.sub_(mean).div_(std)
        return pixels.contiguous(memory_format=torch.channels_last) if self.channels_last else pixels


def random_crop_and_flip(pixels: torch.Tensor, pad: int) -> torch.Tensor:
    """Per image: a random (h, w) window of the reflect-padded image, then a coin-flip mirror."""
    batch, _, height, width = pixels.shape
    padded = F.pad(pixels, (pad, pad, pad, pad), mode="reflect").permute(0, 2, 3, 1)
    top = torch.randint(0, 2 * pad + 1, (batch, 1, 1), device=pixels.device)
    left = torch.randint(0, 2 * pad + 1, (batch, 1, 1), device=pixels.device)
    rows = top + torch.arange(height, device=pixels.device).view(1, height, 1)
    columns = left + torch.arange(width, device=pixels.device).view(1, 1, width)
    flip = torch.rand(batch, 1, 1, device=pixels.device) < 0.5
    columns = torch.where(flip, 2 * left + width - 1 - columns, columns)  # mirror inside the window
    images = torch.arange(batch, device=pixels.device).view(batch, 1, 1)
    return padded[images, rows, columns].permute(0, 3, 1, 2).contiguous()
