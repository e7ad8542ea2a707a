"""The MNIST patch segmenter of chapter 06: its shapes, its exact kernel, its targets, its IoU, its training."""

from __future__ import annotations

import pytest
import torch

from helpers.data.normalization import PixelInputError
from helpers.linalg import kernels
from helpers.models import segmentation
from tests.conftest import needs_mnist


def test_patch_segmenter_maps_pixels_to_per_pixel_logits() -> None:
    torch.manual_seed(0)
    model = segmentation.patch_segmenter().eval()
    with torch.no_grad():
        logits = model(torch.rand(3, 1, 28, 28))
    assert logits.shape == (3, segmentation.SEGMENTER_CLASSES, 28, 28) and logits.dtype == torch.float32
    wide = segmentation.patch_segmenter(patch=2, embed=3, width=4, classes=5).eval()
    with torch.no_grad():
        assert wide(torch.rand(1, 1, 8, 12)).shape == (1, 5, 8, 12)


def test_patch_embedding_has_the_promised_kernel() -> None:
    # embed < patch**2: the first layer is embed x patch**2, so patch**2 - embed exact kernel directions per patch
    model = segmentation.patch_segmenter(patch=4, embed=8)
    first = model[0]
    assert first.kernel_size == first.stride == (4, 4) and first.padding == (0, 0)
    basis = kernels.kernel_basis(first)
    assert basis.matrix_shape == (8, 16) and basis.nullity == 16 - 8
    x = torch.rand(2, 1, 28, 28)
    phi = basis.vectors[0].to(torch.float32)  # (1, 4, 4), tiled over the 7 x 7 patches
    x_hat = x + 3.0 * phi.repeat(1, 7, 7)
    with torch.no_grad():
        assert torch.allclose(model(x_hat), model(x), atol=1e-5)
        assert not torch.allclose(x_hat, x)


def test_digit_masks_threshold_the_pixels() -> None:
    images = torch.zeros(2, 1, 3, 3)
    images[0, 0, 1, 1] = 0.9
    images[0, 0, 0, 0] = 0.5  # not above the threshold
    images[1, 0, 2] = 1.0
    masks = segmentation.digit_masks(images)
    assert masks.shape == (2, 3, 3) and masks.dtype == torch.long
    assert masks[0].tolist() == [[0, 0, 0], [0, 1, 0], [0, 0, 0]]
    assert masks[1].tolist() == [[0, 0, 0], [0, 0, 0], [1, 1, 1]]
    assert segmentation.digit_masks(images, threshold=0.4)[0, 0, 0] == 1


def test_mask_iou_on_hand_made_masks() -> None:
    target = torch.tensor([[0, 1, 1], [0, 1, 0], [0, 0, 0]])
    assert segmentation.mask_iou(target, target) == 1.0
    assert segmentation.mask_iou(torch.zeros_like(target), target) == 0.0  # all background: nothing found
    assert segmentation.mask_iou(torch.ones_like(target), target) == pytest.approx(3 / 9)  # all foreground
    pred = torch.tensor([[0, 1, 0], [1, 1, 0], [0, 0, 0]])  # 2 of the 3 digit pixels, plus 1 false alarm
    assert segmentation.mask_iou(pred, target) == pytest.approx(2 / 4)
    # several classes: a foreground pixel counts only when the class agrees
    assert segmentation.mask_iou(torch.tensor([[2, 1]]), torch.tensor([[1, 1]])) == pytest.approx(1 / 2)
    # both empty: nothing to find, nothing wrongly found
    assert segmentation.mask_iou(torch.zeros(2, 2), torch.zeros(2, 2)) == 1.0


def test_mask_iou_rejects_a_shape_mismatch() -> None:
    with pytest.raises(PixelInputError, match=r"same shape, got \(3, 3\) and \(3, 4\)"):
        segmentation.mask_iou(torch.zeros(3, 3), torch.zeros(3, 4))
    with pytest.raises(ValueError):  # PixelInputError is a ValueError: the CLI's one-line error path catches it
        segmentation.mask_iou(torch.zeros(1, 3, 3), torch.zeros(3, 3))


@needs_mnist
def test_train_mnist_segmenter_beats_trivial_predictors(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 80 Adam steps of 128 digits: enough to leave the all-background plateau (about 60 steps on CPU, seed 0)
    monkeypatch.setenv("COLLISIONS_CACHE", str(tmp_path))
    from helpers.data import mnist_data

    model, iou = segmentation.train_mnist_segmenter("cpu", train_size=1280, epochs=8, progress=False)
    assert not model.training and next(model.parameters()).device.type == "cpu"
    test_images, _ = mnist_data.load(train=False)
    masks = segmentation.digit_masks(test_images[:2000])
    background = segmentation.mask_iou(torch.zeros_like(masks), masks)  # 0
    foreground = segmentation.mask_iou(torch.ones_like(masks), masks)  # the digit's share of the pixels, ~0.12
    assert background == 0.0 and foreground < 0.2
    assert iou > 0.4 and iou > 2 * foreground
    with torch.no_grad():
        pred = model(test_images[:2000]).argmax(1)
    assert segmentation.mask_iou(pred, masks) == pytest.approx(iou)
    assert len(list((tmp_path / "mnist-models").glob("segmenter-*.pt"))) == 1
    again, iou_again = segmentation.train_mnist_segmenter("cpu", train_size=1280, epochs=8, progress=False)
    assert iou_again == iou  # the second call loads the cached weights
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_train_mnist_segmenter_rejects_a_train_size_below_one_batch(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from helpers.data import mnist_data

    monkeypatch.setenv("COLLISIONS_CACHE", str(tmp_path))
    fake = (torch.rand(200, 1, 28, 28), torch.zeros(200, dtype=torch.long))
    monkeypatch.setattr(mnist_data, "load", lambda train=True: fake)
    with pytest.raises(ValueError, match="train_size"):
        segmentation.train_mnist_segmenter("cpu", train_size=64, progress=False)


def test_mask_iou_batch_agrees_with_mask_iou() -> None:
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randint(0, 3, (4, 5, 5), generator=g), torch.randint(0, 3, (4, 5, 5), generator=g)
    pred[3], target[3] = 0, 0  # both empty: 1.0, as mask_iou
    batch = segmentation.mask_iou_batch(pred, target)
    assert batch.shape == (4,) and batch.dtype == torch.float32
    assert batch.tolist() == pytest.approx([segmentation.mask_iou(p, t) for p, t in zip(pred, target)])
    with pytest.raises(PixelInputError, match="same shape"):
        segmentation.mask_iou_batch(pred, target[:, :4])
    with pytest.raises(PixelInputError):
        segmentation.mask_iou_batch(pred[0], target[0])  # not a batch


@needs_mnist
@pytest.mark.parametrize("fault", ["garbage", "truncated", "zeroed", "edited_iou", "no_metadata"])
def test_a_bad_segmenter_cache_entry_is_discarded_and_retrained(
    fault: str, tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from helpers import runtime

    monkeypatch.setenv("COLLISIONS_CACHE", str(tmp_path))
    model, iou = segmentation.train_mnist_segmenter("cpu", train_size=256, epochs=1, progress=False)
    (path,) = (tmp_path / "mnist-models").glob("segmenter-*.pt")
    meta = path.with_suffix(".json")
    if fault == "garbage":
        path.write_bytes(b"not a checkpoint")
    elif fault == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    elif fault == "zeroed":  # weights zeroed and their hash rewritten to match: only the IoU re-measure catches it
        zeroed = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
        torch.save(zeroed, path)
        import hashlib

        stored = runtime.read_json_cache(meta)
        runtime.write_json_cache(meta, {**stored, "weights_sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
    elif fault == "edited_iou":
        envelope = json.loads(meta.read_text())
        envelope["payload"] = envelope["payload"].replace('"iou": ', '"iou": 1')
        meta.write_text(json.dumps(envelope))
    else:
        meta.unlink()
    capsys.readouterr()
    again, iou_again = segmentation.train_mnist_segmenter("cpu", train_size=256, epochs=1, progress=False)
    err = capsys.readouterr().err
    assert iou_again == pytest.approx(iou, abs=1e-6)  # retrained from the same seed: the same segmenter
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    if fault != "no_metadata":  # an unfinished entry (weights without metadata) is simply absent
        assert err.count("[cache]") == 1 and "discarded" in err, err
    assert runtime.read_json_cache(meta) is not None  # healed: a verified entry again
