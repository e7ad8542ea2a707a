"""helpers.experiments.attacks: PGD glue, ASMA, pixel-space kernels, colliding adversarial examples and the Fig. 3
study and decision rules (small seeded models)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pytest
import torch
from torch import nn

from helpers.data import normalization
from helpers.experiments import attacks, collisions
from helpers.linalg import kernels
from helpers.models import segmentation


def _patch_classifier(seed: int = 0, patch: int = 4, embed: int = 6) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, embed, patch, stride=patch), nn.ReLU(), nn.Flatten(), nn.Linear(embed * (16 // patch) ** 2, 5)
    ).eval()


def _images(seed: int = 1, n: int = 1, c: int = 3, size: int = 16) -> torch.Tensor:
    return torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(seed)) * 0.8 + 0.1


def test_pixel_space_kernel_accounts_for_std() -> None:
    model = normalization.PixelSpace(_patch_classifier(), mean=(0.4, 0.5, 0.6), std=(0.2, 0.5, 1.5))
    kernel = kernels.pixel_kernel(model, (3, 16, 16))
    assert kernel.patch == (4, 4) and kernel.nullity == 48 - 6
    layer = model.model[0]
    std = model.std.double().view(1, 3, 1, 1)
    v = kernel.basis[0].reshape(1, 3, 4, 4)
    w = layer.weight.double()
    # in the kernel of the layer as seen from pixels (W applied to p / std) ...
    assert torch.nn.functional.conv2d(v / std, w).abs().max() < 1e-12
    # ... while the layer's own kernel vector, used as a pixel perturbation unscaled, is not
    raw = kernels.kernel_basis(layer).vectors[:1]
    assert torch.nn.functional.conv2d(raw / std, w).abs().max() > 1e-3


def test_pgd_glue_stays_in_budget() -> None:
    model = normalization.PixelSpace(_patch_classifier())
    x = _images(n=4)
    y = model(x).argmax(1)
    adv = attacks.pgd(model, x, y, eps=8 / 255, alpha=2 / 255, steps=5)
    assert (adv - x).abs().max() <= 8 / 255 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    assert torch.nn.functional.cross_entropy(model(adv), y) > torch.nn.functional.cross_entropy(model(x), y)
    with pytest.raises(normalization.PixelInputError, match="pixels in"):
        attacks.pgd(model, x * 3, y)


def test_colliding_adversarials_are_exact_within_budget_and_distinct() -> None:
    model = normalization.PixelSpace(_patch_classifier(), mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 0.3))
    x = _images()
    adv = (x + 0.01 * torch.sign(torch.randn(x.shape, generator=torch.Generator().manual_seed(3)))).clamp(0, 1)
    eps = 0.03
    twins = collisions.colliding_adversarials(model, x, adv, eps=eps, n=20, seed=0)
    report = collisions.describe_colliding(model, twins)
    assert report["n"] == report["distinct"] == report["keep_adversarial_prediction"] == 20
    assert report["within_eps"] and report["in_range"]
    assert report["max_rel_output_change"] < 1e-5
    assert report["perturbation_linf_median"] > 0.005  # really perturbed, not just copies of x'
    res = collisions.collision_residuals(model, adv.expand(20, -1, -1, -1), twins.images)
    assert res["first_layer_rel"] < 1e-5


def test_linear_first_layer_and_pinned_pixels() -> None:
    torch.manual_seed(0)
    mlp = normalization.PixelSpace(nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.ReLU(), nn.Linear(10, 3)))
    x = _images(c=1, size=8)
    x[..., :2, :] = 0.0  # black rows: pixels at 0 can only go up, so they stay untouched
    adv = x.clone()
    twins = collisions.colliding_adversarials(mlp, x, adv, eps=0.05, n=5)
    assert twins.images[..., :2, :].eq(0).all()
    assert (twins.images - x).abs().max() <= 0.05 + 1e-6 and (twins.perturbations.abs().amax((1, 2, 3)) > 0).all()
    assert (mlp(twins.images) - mlp(adv)).abs().max() < 1e-5


def test_attack_that_uses_the_whole_budget_leaves_no_twin() -> None:
    model = normalization.PixelSpace(_patch_classifier())
    x = _images()
    eps = 0.02
    adv = x + eps * torch.sign(torch.randn(x.shape, generator=torch.Generator().manual_seed(5)))
    twins = collisions.colliding_adversarials(model, x, adv, eps=eps, n=3)
    assert twins.perturbations.abs().max() == 0  # every pixel sits at the budget: one-sided, pinned


def test_overlapping_conv_is_refused() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.Flatten())
    with pytest.raises(kernels.NotExactError, match="overlapping"):
        kernels.pixel_kernel(model, (3, 16, 16))


def test_mask_iou() -> None:
    a = torch.tensor([[0, 1], [1, 1]])
    b = torch.tensor([[1, 1], [0, 1]])
    assert attacks.mask_iou(a, b) == pytest.approx(2 / 4)
    assert attacks.mask_iou(torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 2, dtype=torch.long)) == 1.0
    with pytest.raises(normalization.PixelInputError):
        attacks.mask_iou(a, b[:1])


def _threshold_segmenter() -> normalization.PixelSpace:
    """Known weights: class 1 iff pixel > 0.5 (logits -5(x - 0.5), 5(x - 0.5))."""
    conv = nn.Conv2d(1, 2, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([-5.0, 5.0]).view(2, 1, 1, 1))
        conv.bias.copy_(torch.tensor([2.5, -2.5]))
    return normalization.PixelSpace(conv).eval()


def test_asma_moves_prediction_toward_target_mask() -> None:
    seg = _threshold_segmenter()
    x = _images(c=1, size=16)
    target = torch.zeros(16, 16, dtype=torch.long)
    target[4:12, 4:12] = 1
    before = attacks.mask_iou(seg(x).argmax(1)[0], target)
    result = attacks.asma(seg, x, target, iterations=100, tau=1e-2, beta=1e-1)
    # ASMA's loss vanishes on pixels already right, so pixels hover at the decision boundary (the l2 term
    # pulls them back): the IoU rises to near 1 and then oscillates below it
    assert before < 0.2 and max(result.iou) > 0.85 and result.final_iou > before + 0.4
    assert abs(result.loss[-1]) < 0.1 * abs(result.loss[0])  # Eq. 2 (maximised) climbs toward 0: few pixels left
    assert result.adversarial.min() >= 0 and result.adversarial.max() <= 1
    assert result.iou[0] == pytest.approx(before)
    bounded = attacks.asma(seg, x, target, iterations=10, tau=1e-2, beta=1e-1, eps=0.01)
    assert (bounded.adversarial - x).abs().max() <= 0.01 + 1e-6


def test_asma_rejects_bad_targets() -> None:
    seg = normalization.PixelSpace(segmentation.patch_segmenter(patch=4, embed=8, width=8))
    x = _images(c=1, size=16)
    with pytest.raises(normalization.PixelInputError, match="integer"):
        attacks.asma(seg, x, torch.zeros(16, 16), iterations=1)
    with pytest.raises(normalization.PixelInputError, match="one image"):
        attacks.asma(seg, torch.cat([x, x]), torch.zeros(16, 16, dtype=torch.long), iterations=1)


def test_pgd_twins_and_budget_study() -> None:
    model = normalization.PixelSpace(_patch_classifier())
    images = _images(n=6)
    labels = model(images).argmax(1).detach()  # the model is "right" on every image
    run = attacks.pgd_twins(model, images[:1], eps=0.1, pgd_eps=0.05, steps=3, n=4, seed=0)
    assert torch.equal(run.label, labels[:1]) and run.adversarial.shape == (1, 3, 16, 16)
    assert run.report["n"] == run.report["keep_adversarial_prediction"] == 4 and run.report["within_eps"]
    assert 0 <= run.report["saturated_pixels"] <= 1
    rows, smallest = attacks.pgd_budget_study(
        model, images, labels, eps=0.2, pgd_budgets=(0.2, 0.1), steps=5, n=3, seed=0
    )
    assert list(rows) == [0.2, 0.1] and rows[0.1]["pgd_eps"] == 0.1 and rows[0.2]["within_eps"]
    assert float((smallest.adversarial - smallest.clean).abs().max()) <= 0.1 + 1e-6
    assert smallest.twins.images.shape == (3, 3, 16, 16) and smallest.report["keep_adversarial_prediction"] == 3
    table = attacks.twin_table_rows({("patch", e): r for e, r in rows.items()})
    assert list(table) == ["patch, PGD eps 0.2", "patch, PGD eps 0.1"]
    assert list(table["patch, PGD eps 0.1"]) == list(attacks.TWIN_COLUMNS)
    fig = attacks.twins_figure(model, smallest, attack="PGD", shown=2, k=3)
    assert [ax.get_title() for ax in fig.axes[:4]] == ["clean", "PGD", "twin 0", "twin 1"]
    plt.close(fig)
    with pytest.raises(normalization.PixelInputError, match="<= eps"):
        attacks.pgd_budget_study(model, images, labels, eps=0.1, pgd_budgets=(0.2,), steps=1)


def test_asma_summary_square_target_and_mask_figure() -> None:
    seg = _threshold_segmenter()
    x = _images(c=1, size=8)
    target = attacks.square_target(8, 1)
    assert target.dtype == torch.long and int(target.sum()) == 16 and target[2:6, 2:6].eq(1).all()
    result = attacks.asma(seg, x, target, iterations=5, tau=1e-2, beta=1e-1)
    summary = attacks.asma_summary(result)
    assert summary["iterations"] == len(result.iou) - 1 and summary["IoU start"] == result.iou[0]
    assert summary["IoU best"] >= summary["IoU end"] == result.final_iou and summary["l_inf"] == result.linf[-1]
    masks = attacks.predicted_masks(seg, [x, result.adversarial])
    assert len(masks) == 2 and masks[0].shape == (8, 8)
    fig = attacks.mask_figure(seg, [x, result.adversarial], ["clean", "ASMA"], target=target)
    assert "IoU with target" in fig.axes[4].get_title()
    plt.close(fig)
    with pytest.raises(normalization.PixelInputError, match="size must be >= 4"):
        attacks.square_target(3, 1)


def _report(n: int = 100, **changes: object) -> dict:
    base = {
        "n": n,
        "distinct": n,
        "keep_adversarial_prediction": n,
        "adversarial_differs_from_clean": True,
        "max_rel_output_change": 1e-7,
        "max_linf_to_clean": 0.3,
        "within_eps": True,
        "in_range": True,
    }
    return {**base, **changes}


def _fig3(**changes: object) -> attacks.Fig3Results:
    values = {
        "mnist": {("patch", 0.3): _report(distinct=1), ("patch", 0.2): _report(), ("mlp", 0.2): _report()},
        "mnist_eps": 0.3,
        "mnist_pgd_eps": 0.2,
        "model": "deit_tiny_patch16_224",
        "classification": _report(8),
        "imagenet_eps": 8 / 255,
        "asma_iou": (0.1, 0.8),
        "segmenter": _report(),
        "mobilenet": {"linf_to_clean": 8 / 255, "first_layer_rel": 0.04},
        "benchmark": {"MNIST patch": {"n": 100, "seconds_colliding": 0.1, "seconds_pgd_loop": 2.0, "speedup": 20.0}},
    }
    return attacks.Fig3Results(**{**values, **changes})


def test_fig3_requirements_pass_and_fail() -> None:
    good = attacks.fig3_requirements(_fig3())
    assert list(good) == ["classification", "mnist", "segmenter", "mobilenet"]
    assert all(r.ok for group in good.values() for r in group)
    assert [len(group) for group in good.values()] == [2, 6 + 4 + 1, 2, 1]
    bad = _fig3(
        mnist={("patch", 0.2): _report(within_eps=False), ("mlp", 0.2): _report(distinct=40)},
        classification=_report(8, keep_adversarial_prediction=7),
        asma_iou=(0.5, 0.4),
        segmenter=_report(within_eps=False),
        mobilenet={"linf_to_clean": 0.05, "first_layer_rel": 0.04},
        benchmark={"MNIST patch": {"n": 100, "seconds_colliding": 3.0, "seconds_pgd_loop": 2.0, "speedup": 0.7}},
    )
    failed = [r.what for group in attacks.fig3_requirements(bad).values() for r in group if not r.ok]
    assert failed == [
        "deit_tiny_patch16_224: every twin within 8/255, in range, distinct, same prediction",
        "MNIST patch (PGD 0.2): twins within eps and in [0, 1]",
        "MNIST mlp: >= 100 distinct colliding adversarial examples",
        "100 twins are cheaper than 100 PGD runs (MNIST patch)",
        "ASMA raises the IoU with the target (MNIST segmenter)",
        "MNIST segmenter: every twin keeps the ASMA mask exactly, within eps",
        "MobileNet-V3 tiled twin within budget",
    ]


def test_fig3_table_and_extra() -> None:
    r = _fig3()
    rows = attacks.fig3_paper_vs_ours(r, "ViT-B", "MobileNet-V3")
    assert [row["paper"] for row in rows] == ["ViT-B", "—", "MobileNet-V3", "—"]
    assert rows[0]["ours"] == "deit_tiny_patch16_224: 8/8 within 8/255" and rows[1]["ours"] == "100/100, 100/100"
    extra = r.extra()
    assert list(extra) == ["mnist", "classification", "mnist_segmenter", "asma_mnist_iou", "mobilenet", "benchmark"]
    assert list(extra["mnist"]) == ["patch@0.3", "patch@0.2", "mlp@0.2"] and extra["asma_mnist_iou"] == [0.1, 0.8]
