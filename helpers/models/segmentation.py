"""The book's MNIST patch segmenter (digit vs background), its masks and the IoU that ASMA's figure reports.

A stand-in for the medical segmentation networks of the paper's Fig. 3 that trains offline in seconds; its
first layer is a non-overlapping patch embedding, so exact null-space collisions exist by construction.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from helpers.data.normalization import PixelInputError
from helpers.progress import progress_bar

SEGMENTER_BATCH = 128  # images per optimiser step
SEGMENTER_CLASSES = 2  # 0: background, 1: digit (binary, like ASMA's medical masks)


def mask_iou(pred: torch.Tensor, target: torch.Tensor, background: int = 0) -> float:
    """Foreground IoU with class agreement: |pred == target on foreground| / |foreground of either|.

    For binary masks this is ASMA's IoU (intersection / union of the foreground); (H, W) integer masks.
    """
    if pred.shape != target.shape:
        raise PixelInputError(f"masks must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    union = (pred != background) | (target != background)
    inter = (pred == target) & (target != background)
    total = union.sum().item()
    return inter.sum().item() / total if total else 1.0


def patch_segmenter(patch: int = 4, embed: int = 8, width: int = 32, classes: int = SEGMENTER_CLASSES) -> nn.Sequential:
    """A fully convolutional segmenter whose first layer is a patch embedding (stride = kernel = ``patch``):
    ``embed`` < patch**2 gives a kernel of dimension patch**2 - embed per patch, so exact colliding
    segmentations exist. (B, 1, H, W) pixels -> (B, classes, H, W) logits; H, W divisible by ``patch``."""
    return nn.Sequential(
        nn.Conv2d(1, embed, patch, stride=patch),
        nn.ReLU(),
        nn.Conv2d(embed, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, classes, 1),
        nn.Upsample(scale_factor=patch, mode="bilinear", align_corners=False),
    )


def digit_masks(images: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Binary segmentation targets for MNIST: (N, 1, H, W) pixels -> (N, H, W) long, 1 where the pixel is
    above ``threshold`` (the digit), 0 elsewhere."""
    return (images[:, 0] > threshold).long()


def train_mnist_segmenter(
    device: str | torch.device = "cpu",
    *,
    train_size: int = 12800,
    epochs: int = 1,
    seed: int = 0,
    progress: bool = True,
) -> tuple[nn.Sequential, float]:
    """Train ``patch_segmenter`` on binary MNIST digit masks (cached by its settings); returns (model in eval
    mode, foreground IoU on 2,000 test digits, 0..1)."""
    from helpers import runtime
    from helpers.data import mnist_data

    if train_size < SEGMENTER_BATCH or epochs < 1:
        raise ValueError(
            f"train_size={train_size}, epochs={epochs} would train for zero steps; valid: train_size >= "
            f"{SEGMENTER_BATCH} (one batch) and epochs >= 1"
        )
    key = hashlib.sha256(json.dumps([train_size, epochs, seed, "patch_segmenter-binary-v1"]).encode()).hexdigest()[:12]
    path = runtime.cache_dir() / "mnist-models" / f"segmenter-{key}.pt"
    device = torch.device(device) if isinstance(device, str) else device
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = patch_segmenter()
    test_images, _ = mnist_data.load(train=False)
    test_images, test_masks = test_images[:2000], digit_masks(test_images[:2000])
    cached = _load_segmenter(path, copy.deepcopy(model), test_images, test_masks, device)  # model stays fresh
    if cached is not None:
        return cached
    images, _ = mnist_data.load(train=True)
    images, masks = images[:train_size], digit_masks(images[:train_size])
    model = model.to(device).train()
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    steps = epochs * (train_size // SEGMENTER_BATCH)
    bar = progress_bar(total=steps, desc="train MNIST segmenter", disable=not progress, leave=False)
    for _ in range(epochs):
        for batch in torch.randperm(train_size, generator=generator).split(SEGMENTER_BATCH)[
            : train_size // SEGMENTER_BATCH
        ]:
            optimiser.zero_grad(set_to_none=True)
            F.cross_entropy(model(images[batch].to(device)), masks[batch].to(device)).backward()
            optimiser.step()
            bar.update()
    bar.close()
    model = model.eval()
    iou = _segmenter_iou(model, test_images, test_masks, device)
    _store_segmenter(path, model, iou)
    return model, iou


#: How far a cached segmenter's re-measured IoU may sit from the stored one (same digits; devices round differently).
SEGMENTER_IOU_TOLERANCE = 0.01


def _segmenter_iou(model: nn.Module, images: torch.Tensor, masks: torch.Tensor, device: torch.device) -> float:
    with torch.no_grad():
        pred = model.to(device)(images.to(device)).argmax(1).cpu()
    return mask_iou(pred, masks)


def _store_segmenter(path: Path, model: nn.Module, iou: float) -> None:
    """Weights (atomically), then their SHA-256 and IoU in a hashed JSON (``runtime.write_json_cache``), last."""
    from helpers import runtime

    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buffer)
    data = buffer.getvalue()
    meta = {"weights_sha256": hashlib.sha256(data).hexdigest(), "iou": iou}
    if runtime.write_cache_or_warn(path, lambda: runtime.write_atomically(path, lambda tmp: tmp.write_bytes(data))):
        runtime.write_cache_or_warn(path, lambda: runtime.write_json_cache(path.with_suffix(".json"), meta))


def _load_segmenter(
    path: Path, model: nn.Module, images: torch.Tensor, masks: torch.Tensor, device: torch.device
) -> tuple[nn.Sequential, float] | None:
    """The verified cached segmenter (model in eval mode on ``device``, IoU) or None: the weights must match their
    stored hash, load strictly, and re-measure the stored IoU within :data:`SEGMENTER_IOU_TOLERANCE`; an entry that
    fails is discarded with one line (``runtime.discard_cache``) and the segmenter retrained."""
    from helpers import runtime

    meta = runtime.read_json_cache(path.with_suffix(".json"))
    if meta is None or not path.exists():
        path.unlink(missing_ok=True)
        return None
    data = path.read_bytes()
    why = ""
    if hashlib.sha256(data).hexdigest() != meta.get("weights_sha256"):
        why = "weights do not match their stored hash"
    else:
        try:
            model.load_state_dict(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))
        except Exception as err:  # any unreadable or mismatched state dict is a bad entry
            why = f"weights do not load ({type(err).__name__})"
    if not why:
        iou = _segmenter_iou(model.eval(), images, masks, device)
        if abs(iou - float(meta.get("iou", -1.0))) <= SEGMENTER_IOU_TOLERANCE:
            return model, iou  # type: ignore[return-value]
        why = f"stored IoU {meta.get('iou')} but {iou:.4f} measured"
    runtime.discard_cache(path, why)
    path.with_suffix(".json").unlink(missing_ok=True)
    return None


def mask_iou_batch(pred: torch.Tensor, target: torch.Tensor, background: int = 0) -> torch.Tensor:
    """``mask_iou`` of each pair of a batch: (B, H, W) integer masks -> (B,) float (1.0 where both are empty)."""
    if pred.shape != target.shape or pred.dim() != 3:
        raise PixelInputError(
            f"masks must be two (B, H, W) batches of the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    union = ((pred != background) | (target != background)).flatten(1).sum(1)
    inter = ((pred == target) & (target != background)).flatten(1).sum(1)
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union, dtype=torch.float32)).float()
