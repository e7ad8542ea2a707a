"""An image is an image: pixels in [0, 1], and what survives being stored as an 8-bit PNG.

A colliding image x + beta*phi is only an image when every pixel stays in [0, 1]; :func:`beta_interval` gives the
betas for which it does, :func:`outside_unit_range` how far a tensor strays. :func:`png_round_trip` stores a
batch as 8-bit PNGs in memory and reads it back, as an image would be saved or sent.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from torch import Tensor


def outside_unit_range(pixels: Tensor) -> float:
    """Largest distance of any value from [0, 1] (0.0 when the tensor is a valid image)."""
    below = float((-pixels).max().clamp(min=0))
    above = float((pixels - 1).max().clamp(min=0))
    return max(below, above)


def beta_interval(pixels: Tensor, direction: Tensor) -> tuple[float, float]:
    """The betas (lo <= 0 <= hi) for which ``pixels + beta * direction`` stays in [0, 1], for one image.

    ``pixels`` must already be in [0, 1]; shapes match. A pixel at 0 or 1 with a direction pointing out pins
    the interval to 0 on that side.
    """
    x = pixels.double().flatten()
    d = direction.double().flatten()
    if x.shape != d.shape:
        raise ValueError(f"pixels {tuple(pixels.shape)} and direction {tuple(direction.shape)} differ in shape")
    if outside_unit_range(x) > 0:
        raise ValueError("beta_interval needs pixels in [0, 1]")
    pos, neg = d > 0, d < 0
    inf = torch.tensor(float("inf"), dtype=torch.float64)
    up = torch.where(pos, (1 - x) / d.where(pos, 1.0), torch.where(neg, x / (-d).where(neg, 1.0), inf))
    down = torch.where(pos, x / d.where(pos, 1.0), torch.where(neg, (1 - x) / (-d).where(neg, 1.0), inf))
    return (-float(down.min()), float(up.min()))


def quantize_8bit(pixels: Tensor) -> Tensor:
    """Round [0, 1] pixels to the 256 levels of an 8-bit image (values outside are clipped first)."""
    return (pixels.clamp(0, 1) * 255).round() / 255


def png_round_trip(pixels: Tensor) -> Tensor:
    """(N, C, H, W) or (C, H, W) pixels -> the same after saving each image as an 8-bit PNG and loading it.

    C is 1 or 3; values outside [0, 1] are clipped, as any image writer would. Same dtype and device back.
    """
    batch = pixels.unsqueeze(0) if pixels.dim() == 3 else pixels
    if batch.dim() != 4 or batch.shape[1] not in (1, 3):
        raise ValueError(f"png_round_trip needs (N, C, H, W) or (C, H, W) with C in (1, 3), got {tuple(pixels.shape)}")
    arrays = (quantize_8bit(batch).detach().cpu().double() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    back = []
    for arr in arrays:
        buf = io.BytesIO()
        Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(buf, format="PNG")
        buf.seek(0)
        img = np.asarray(Image.open(buf))
        back.append(torch.from_numpy(img.reshape(arr.shape).copy()))
    out = torch.stack(back).permute(0, 3, 1, 2).to(pixels.dtype) / 255
    out = out.to(pixels.device)
    return out[0] if pixels.dim() == 3 else out
