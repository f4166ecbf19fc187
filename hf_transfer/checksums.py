"""Bit-exact fingerprints of tensors: equal only for bit-identical weights (frozen-weight checks, feature-cache keys)."""

from __future__ import annotations

import hashlib

import torch


def checksum(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names and raw bytes in name order: equal only for bit-identical tensors."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].detach().reshape(-1).view(torch.uint8).cpu().numpy().tobytes())
    return digest.hexdigest()
