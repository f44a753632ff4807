"""Bit-packing of binary masks: 1 bit per parameter on disk.

Bits are packed with numpy's default big-endian bit order (element 0 is the most significant bit of
byte 0), over the mask flattened in C order; the last byte is zero-padded.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def is_binary(mask: torch.Tensor) -> bool:
    """True when every value is exactly 0 or 1 (bool masks always are)."""
    if mask.dtype == torch.bool:
        return True
    return bool(((mask == 0) | (mask == 1)).all())


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a binary mask into a flat uint8 tensor of ``ceil(numel / 8)`` bytes."""
    flat = mask.detach().reshape(-1).to("cpu") != 0
    return torch.from_numpy(np.packbits(flat.numpy()))


def unpack_bits(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: a bool tensor of ``shape``."""
    count = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (count + 7) // 8:
        raise ValueError(
            f"packed mask has {packed.numel()} {packed.dtype} values, "
            f"expected {(count + 7) // 8} uint8 for shape {list(shape)}"
        )
    bits = np.unpackbits(packed.numpy(), count=count)
    return torch.from_numpy(bits.astype(np.bool_)).reshape(shape)
