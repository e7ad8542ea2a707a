"""helpers.experiments.attacks: PGD glue, ASMA, pixel-space kernels, colliding adversarial examples and the Fig. 3
study and decision rules (small seeded models)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pytest
import torch
from torch import nn

from helpers import stats
from helpers.book import verdict
from helpers.data import normalization, photos
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


def test_pgd_twins_stay_within_the_attacks_own_eps() -> None:
    model = normalization.PixelSpace(_patch_classifier())
    images = _images(n=6)
    labels = model(images).argmax(1).detach()  # the model is "right" on every image
    run = attacks.pgd_twins(model, images[:1], eps=0.1, alpha=0.01, steps=3, random_start=False, n=4, seed=0)
    assert torch.equal(run.label, labels[:1]) and run.adversarial.shape == (1, 3, 16, 16)
    assert run.report["n"] == run.report["keep_adversarial_prediction"] == 4 and run.report["within_eps"]
    assert run.report["eps"] == 0.1 and run.report["max_linf_to_clean"] <= 0.1 + 1e-6
    assert run.report["saturated_pixels"] == 0.0  # 3 steps of 0.01 from the clean image never reach 0.1
    fig = attacks.twins_figure(model, run, attack="PGD", shown=2, k=3)
    assert [ax.get_title() for ax in fig.axes[:4]] == ["clean", "PGD", "twin 0", "twin 1"]
    plt.close(fig)


def test_pgd_reach() -> None:
    assert attacks.pgd_reach(0.3, 0.02, 10, False) == pytest.approx(0.2)
    assert attacks.pgd_reach(0.3, 0.1, 10, False) == 0.3 and attacks.pgd_reach(0.3, 0.01, 1, True) == 0.3
    with pytest.raises(normalization.PixelInputError):
        attacks.pgd_reach(0.0, 0.1, 1, True)


def test_largest_beta_respects_the_ball_and_the_range() -> None:
    clean = torch.full((1, 1, 2, 2), 0.5)
    adv = clean + torch.tensor([0.1, -0.1, 0.0, 0.0]).view(1, 1, 2, 2)
    d = torch.tensor([1.0, 1.0, -1.0, 0.0]).view(1, 1, 2, 2)
    # eps 0.3: pixel 0 may go up 0.2, pixel 1 up 0.4, pixel 2 down 0.3 -> 0.2
    assert attacks.largest_beta(clean, adv, d, 0.3) == pytest.approx(0.2)
    # a pixel at the budget with the direction pointing out pins beta to 0
    assert attacks.largest_beta(clean, adv, d, 0.1) == 0.0
    # the range [0, 1] binds before the ball: x' = 0.95 may go up 0.05 only
    top = torch.full((1, 1, 2, 2), 0.95)
    assert attacks.largest_beta(top, top, torch.ones_like(top), 0.3) == pytest.approx(0.05)
    with pytest.raises(normalization.PixelInputError, match="same shape"):
        attacks.largest_beta(clean, adv, d[0], 0.3)


def test_twin_study_over_a_set() -> None:
    model = normalization.PixelSpace(_patch_classifier())
    images = _images(n=5)
    labels = model(images).argmax(1).detach()
    labels[0] = (labels[0] + 1) % 5  # the model is wrong on input 0: not attacked, no twins
    study = attacks.pgd_twin_study(
        model, images, labels, eps=0.2, alpha=0.05, steps=3, random_start=False, n_twins=6, seed=0
    )
    assert study.n_inputs == 5 and study.correct[0] is False and study.fooled[0] is False
    assert study.reach == pytest.approx(0.15) and study.fooling.n == 4
    assert all(r["index"] != 0 for r in study.reports) and len(study.reports) == sum(study.fooled)
    assert study.kept.n == 6 * len(study.reports) and study.kept.k == study.kept.n
    assert study.spread("max_linf_to_clean").worst <= 0.2 + 1e-6 and study.spread("reach").worst <= 0.15 + 1e-6
    assert study.spread("outside_unit_range").worst == 0.0 and study.distinct_share.worst == 1.0
    assert study.kept_after_png.n == study.kept.n and study.adversarial_png.n == len(study.reports)
    assert study.collapsed.k == 0 and study.example is not None and study.example.twins.images.shape[0] == 6
    summary = study.summary()
    assert summary["inputs"] == 5 and summary["eps"] == 0.2 and "after PNG" in summary
    # an attack that changes nothing fools nobody: no twins, and the rates say so
    idle = attacks.twin_study(model, images, images.clone(), eps=0.2, n_twins=2, labels=labels)
    assert idle.fooling.k == 0 and idle.summary() == {"inputs": 5, "fooled": idle.fooling.text()}
    with pytest.raises(ValueError, match="fooled none"):
        _ = idle.kept


def test_png_predictions_see_the_quantised_image() -> None:
    seg = _threshold_segmenter()
    x = torch.full((1, 1, 4, 4), 0.5 + 1e-4)  # just above the threshold: 8 bits round it to 128/255 > 0.5
    assert attacks.png_predictions(seg, x).shape == (1, 4, 4)
    below = torch.full((1, 1, 4, 4), 0.5 - 3e-3)  # rounds to 127/255 < 0.5: still background
    assert attacks.png_predictions(seg, below).eq(0).all() and attacks.png_predictions(seg, x).eq(1).all()


def test_imagenet_inputs_adds_flips_to_reach_the_minimum() -> None:
    names, pixels = attacks.imagenet_inputs(32, minimum=21)
    assert len(names) == 21 == pixels.shape[0] and pixels.shape[1:] == (3, 32, 32)
    flipped = [n for n in names if n.endswith("(flipped)")]
    assert len(flipped) == 21 - len(photos.NATURAL_IMAGES)
    assert torch.equal(pixels[len(photos.NATURAL_IMAGES)], pixels[0].flip(-1))


def test_asma_batch_matches_asma_on_one_image_and_runs_a_batch() -> None:
    seg = _threshold_segmenter()
    x = _images(n=3, c=1, size=8)
    targets = torch.stack([attacks.square_target(8, 1)] * 3)
    single = attacks.asma(seg, x[:1], targets[0], iterations=6, tau=1e-2, beta=1e-1, eps=0.2, stop_iou=None)
    batch = attacks.asma_batch(seg, x, targets, iterations=6, tau=1e-2, beta=1e-1, eps=0.2, stop_iou=None)
    assert torch.allclose(batch.adversarial[:1], single.adversarial, atol=1e-6)
    assert batch.iou_start[0] == pytest.approx(single.iou[0]) and batch.iou_end[0] == pytest.approx(single.final_iou)
    assert (batch.adversarial - x).abs().max() <= 0.2 + 1e-6 and batch.masks.shape == (3, 8, 8)
    assert batch.summary()["images"] == 3 and batch.summary()["IoU end (mean)"] > batch.summary()["IoU start (mean)"]
    with pytest.raises(normalization.PixelInputError, match="targets"):
        attacks.asma_batch(seg, x, targets[:2], iterations=1)


def test_tiled_twin_study_on_an_overlapping_conv() -> None:
    torch.manual_seed(0)
    seg = normalization.PixelSpace(
        nn.Sequential(nn.Conv2d(1, 2, 3, stride=2, padding=1), nn.Upsample(scale_factor=2)).eval()
    )
    x = _images(n=2, c=1, size=8)
    rows = attacks.tiled_twin_study(seg, x, x.clone(), eps=0.05, seed=0)
    assert len(rows) == 2 and all(r["linf_to_clean"] <= 0.05 + 1e-6 and r["outside_unit_range"] == 0 for r in rows)
    assert all({"first_layer_rel", "beta", "same_mask", "same_mask_after_png"} <= set(r) for r in rows)


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


def _rep(n: int = 10, **changes: object) -> dict:
    base = {
        "n": n,
        "distinct": n,
        "keep_adversarial_prediction": n,
        "keep_after_png": n,
        "adversarial_survives_png": True,
        "max_linf_to_clean": 0.3,
        "outside_unit_range": 0.0,
        "max_rel_output_change": 1e-7,
        "reach": 0.2,
        "saturated_pixels": 0.0,
        "linf_after_png": 0.3,
        "largest_tiled_beta": 0.0,
    }
    return {**base, **changes}


def _study(reports: list | None = None, eps: float = 0.3, reach: float = 0.2, inputs: int = 20) -> attacks.TwinStudy:
    reports = [_rep() for _ in range(inputs)] if reports is None else reports
    fooled = [True] * len(reports) + [False] * (inputs - len(reports))
    return attacks.TwinStudy(eps, [True] * inputs, fooled, reports, None, reach=reach)


def _mobilenet(**changes: object) -> list[dict]:
    row = {"first_layer_rel": 0.02, "beta": 0.05, "linf_to_clean": 8 / 255, "outside_unit_range": 0.0}
    return [{**row, "same_mask": True, "same_mask_after_png": True, **changes} for _ in range(20)]


def _fig3(**changes: object) -> attacks.Fig3Results:
    values: dict = {
        "mnist": {"patch": _study(), "mlp": _study()},
        "mnist_whole": {"patch": _study([_rep(5, distinct=1)] * 20, reach=0.3)},
        "imagenet": _study(eps=8 / 255, reach=4 / 255, reports=[_rep(max_linf_to_clean=0.03, reach=0.015)] * 20),
        "model": "deit_tiny_patch16_224",
        "model_weights": "random",
        "is_paper_model": False,
        "segmenter": _study(reach=0.3),
        "asma": attacks.ASMABatch(torch.zeros(2, 1, 4, 4), torch.zeros(2, 4, 4), [0.1, 0.2], [0.5, 0.6]),
        "mobilenet": _mobilenet(),
        "mobilenet_eps": 8 / 255,
        "mobilenet_weights": "random",
        "mobilenet_trained": False,
        "benchmark": [{"n": 100, "speedup": 30.0, "extrapolated": False}] * 3,
    }
    return attacks.Fig3Results(**{**values, **changes})


def _statuses(r: attacks.Fig3Results) -> dict[str, str]:
    from helpers.book import results

    claims = attacks.fig3_claims(r, "same prediction", ("ViT-B", "MobileNet-V3"))
    assert all("status" not in c for c in claims)
    return {c["id"]: results.judge(**c).status for c in claims}


def test_fig3_claims_are_judged_by_their_criteria() -> None:
    good = _statuses(_fig3())
    assert good == {
        "fig3.pgd_twins_keep_prediction_vitb": verdict.NOT_CHECKABLE,  # DeiT-Tiny measured, ViT-B needed
        "fig3.pgd_twins_mnist": verdict.REPRODUCED,
        "fig3.pgd_twins_beyond_vitb": verdict.BEYOND_HOLDS,
        "fig3.twins_are_numerous": verdict.REPRODUCED,
        "fig3.whole_budget_leaves_no_room": verdict.BEYOND_HOLDS,
        "fig3.twins_survive_png": verdict.BEYOND_HOLDS,
        "fig3.asma_twins_mnist": verdict.REPRODUCED,
        "fig3.asma_twins_mobilenet": verdict.DIFFERS,  # 0.02 > round-off
        "fig3.asma_mask_mobilenet": verdict.NOT_CHECKABLE,
        "fig3.twins_cheaper_than_pgd": verdict.BEYOND_HOLDS,
    }
    # the same claims on measurements that violate each criterion
    one_lost = [_rep(keep_adversarial_prediction=9)] + [_rep()] * 19
    bad = _statuses(
        _fig3(
            mnist={"patch": _study(one_lost), "mlp": _study([_rep(distinct=3)] * 20)},
            mnist_whole={"patch": _study([_rep(5, distinct=2)] + [_rep(5, distinct=1)] * 19, reach=0.3)},
            segmenter=_study([_rep(keep_after_png=4)] * 20, reach=0.3),
            mobilenet=_mobilenet(first_layer_rel=1e-7, same_mask=False),
            mobilenet_trained=True,
            is_paper_model=True,
            benchmark=[{"n": 100, "speedup": 0.8, "extrapolated": True}],
        )
    )
    assert bad["fig3.pgd_twins_mnist"] == verdict.DIFFERS
    assert bad["fig3.twins_are_numerous"] == verdict.DIFFERS
    assert bad["fig3.whole_budget_leaves_no_room"] == verdict.BEYOND_FAILS
    assert bad["fig3.twins_survive_png"] == verdict.BEYOND_FAILS
    assert bad["fig3.asma_twins_mobilenet"] == verdict.REPRODUCED  # exact to round-off would reproduce it
    assert bad["fig3.asma_mask_mobilenet"] == verdict.DIFFERS  # decided once the weights are trained
    assert bad["fig3.pgd_twins_keep_prediction_vitb"] == verdict.REPRODUCED  # ViT-B, trained, all kept
    assert bad["fig3.twins_cheaper_than_pgd"] == verdict.BEYOND_FAILS


def test_fig3_mobilenet_claims_leave_out_pinned_photos() -> None:
    rows = _mobilenet()
    rows[0] = {**rows[0], "beta": 0.0, "first_layer_rel": 0.0}  # the twin is x' itself: no evidence either way
    claims = {c["id"]: c for c in attacks.fig3_claims(_fig3(mobilenet=rows), "p", ("ViT-B", "MobileNet-V3"))}
    assert claims["fig3.asma_twins_mobilenet"]["measured"].n == 19
    assert "1 photo(s) left out" in claims["fig3.asma_twins_mobilenet"]["reason"]


def test_fig3_checks_pass_and_each_fails_on_a_violating_input() -> None:
    assert all(r.ok for r in attacks.fig3_checks(_fig3()))
    violations = {
        "stays within its reach": _fig3(mnist={"patch": _study([_rep(reach=0.25)] * 20), "mlp": _study()}),
        "every twin within the attack's eps": _fig3(
            mnist={"patch": _study([_rep(max_linf_to_clean=0.31)] * 20), "mlp": _study()}
        ),
        "and in [0, 1]": _fig3(segmenter=_study([_rep(outside_unit_range=0.01)] * 20, reach=0.3)),
        "to round-off": _fig3(mnist={"patch": _study(), "mlp": _study([_rep(max_rel_output_change=1e-2)] * 20)}),
        "raises the mean IoU": _fig3(asma=attacks.ASMABatch(torch.zeros(1), torch.zeros(1), [0.5], [0.4])),
        "tiled twins within eps": _fig3(mobilenet=_mobilenet(linf_to_clean=0.05)),
        "fools at least one input": _fig3(mnist={"patch": _study([], inputs=20), "mlp": _study()}),
    }
    for what, r in violations.items():
        failed = [req.what for req in attacks.fig3_checks(r) if not req.ok]
        assert len(failed) == 1 and what in failed[0], (what, failed)


def test_fig3_extra_is_plain_data() -> None:
    import json

    extra = _fig3().extra()
    assert list(extra) == ["studies", "whole_budget", "asma_mnist", "mobilenet", "benchmark"]
    assert list(extra["studies"]) == ["MNIST patch", "MNIST mlp", "deit_tiny_patch16_224", "MNIST segmenter (ASMA)"]
    json.dumps(extra)
    assert isinstance(stats.Rate(1, 2).text(), str)


def test_wide_tables_are_transposed() -> None:
    narrow = attacks.table({"a": {"x": 1}, "b": {"x": 2}})
    wide = attacks.table({"a": {f"c{i}": i for i in range(attacks.WIDE_TABLE_COLUMNS + 1)}, "b": {"c0": 5}})
    text = lambda t: getattr(t, "data", t)  # noqa: E731
    assert "<th>x</th>" in text(narrow) and "<th>c0</th>" not in text(wide)
    assert "<th>a</th>" in text(wide) and "<td>c8</td>" in text(wide)
