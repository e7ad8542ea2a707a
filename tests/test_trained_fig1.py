"""The trained-substitute studies of the Fig. 1 and Sec. 6 chapters: equal taps of a trained first layer, the
operator's spectrum summary and its comparison with random initialisations, probes through a network, and the
substitute's claims; every check is fed a violating input."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from helpers.book import verdict
from helpers.experiments import collision_figures, collisions
from helpers.linalg import conv_operator, kernels


def _conv_with_equal_taps() -> nn.Conv2d:
    """A 3x3 / stride 2 conv (32 filters, 3 channels) whose taps (1, 1, 1) and (1, 1, 2) carry equal weights."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 32, 3, stride=2, padding=1, bias=False).double()
    with torch.no_grad():
        conv.weight[:, 1, 1, 2] = conv.weight[:, 1, 1, 1]
    return conv


def test_equal_taps_finds_the_duplicated_pair_and_its_kernel_vector() -> None:
    conv = _conv_with_equal_taps()
    pairs = conv_operator.equal_taps(conv, 1e-12)
    assert pairs == [((1, 1, 1), (1, 1, 2))]
    phi = torch.zeros(3, 3, 3, dtype=torch.float64)
    phi[1, 1, 1], phi[1, 1, 2] = 1.0, -1.0
    assert float((kernels.weight_matrix(conv) @ phi.flatten()).norm()) == 0.0
    assert kernels.kernel_basis(conv, rtol=1e-12).nullity == 1
    torch.manual_seed(1)
    assert conv_operator.equal_taps(nn.Conv2d(3, 32, 3, stride=2, padding=1).double(), 1e-12) == []
    assert "account for the whole kernel" in collision_figures.equal_taps_text(pairs, 1)
    assert "1 of the 2" in collision_figures.equal_taps_text(pairs, 2)
    assert "trivial kernel" in collision_figures.equal_taps_text([], 0)


def test_equal_taps_at_the_border_make_the_zero_padded_operator_singular() -> None:
    """Equal middle and right taps, stride 2, padding 1, even width: the last two columns are seen by the last
    window only, through those two taps, so their difference is an exact null image direction."""
    conv = _conv_with_equal_taps()
    summary = conv_operator.spectrum_summary(conv, (3, 16, 16))
    assert summary.zero_padded < 1e-6 and summary.circular > 1e-3
    assert summary.zero_padded * summary.sigma_max <= conv_operator.sigma_min_dense(conv, (3, 16, 16)) + 1e-6
    gains, _ = conv_operator.boundary_near_null(conv, (3, 16, 16), k=1, crop=6)
    assert float(gains[0]) < 1e-12 * summary.sigma_max
    assert summary.evidence(float(gains[0]) + 1e-9).consistent()[0]


def test_spectrum_summary_agrees_with_the_dense_operator_and_its_check_catches_violations() -> None:
    torch.manual_seed(2)
    conv = nn.Conv2d(3, 32, 3, stride=2, padding=1, bias=False).double()
    summary = conv_operator.spectrum_summary(conv, (3, 16, 16))
    exact = conv_operator.sigma_min_dense(conv, (3, 16, 16))
    assert abs(summary.zero_padded * summary.sigma_max - exact) <= 1e-6 * summary.sigma_max
    spectrum = conv_operator.polyphase_spectrum(conv, (3, 16, 16))
    assert summary.circular == pytest.approx(spectrum.sigma_min() / spectrum.sigma_max)
    corner = float(conv_operator.boundary_near_null(conv, (3, 16, 16), k=1, crop=6)[0][0])
    assert summary.evidence(corner).consistent()[0]
    assert not summary.evidence(0.5 * exact).consistent()[0]  # a corner gain below the Lanczos value
    unconverged = dataclasses.replace(summary, residual=1e-3)
    assert not unconverged.evidence(corner).consistent()[0]


def test_ratio_comparison_and_its_criterion() -> None:
    below = conv_operator.RatioComparison("ratio", 0.01, (0.1, 0.2, 0.12))
    assert below.below_every_random() and below.value == pytest.approx(0.1)
    criterion = verdict.at_most(1.0, "trained over smallest random", kind="beyond")
    assert verdict.status_of(criterion, below) == verdict.BEYOND_HOLDS
    inside = conv_operator.RatioComparison("ratio", 0.15, (0.1, 0.2))
    assert not inside.below_every_random() and verdict.status_of(criterion, inside) == verdict.BEYOND_FAILS
    assert conv_operator.RatioComparison("ratio", 0.0, (0.0,)).value == 1.0
    assert "trained 0.01" in below.text()
    with pytest.raises(ValueError):
        conv_operator.RatioComparison("ratio", 0.1, ())
    rows = collision_figures.spectrum_comparison_rows(
        conv_operator.SpectrumSummary((3, 8, 8), 1.0, 0.1, 0.05, 1e-9),
        [conv_operator.SpectrumSummary((3, 8, 8), 1.0, 0.2, 0.1, 1e-9)],
    )
    assert [r["weights"] for r in rows] == ["trained", "random, seed 0"] and rows[1]["image"] == "3x8x8"


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 4, stride=4)  # patch embedding: exact kernel (16 < 48)
        self.block = nn.Conv2d(16, 8, 3, padding=1)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.block(torch.relu(self.stem(x)))).mean((2, 3)))


def test_collide_set_probes_measure_every_layer_from_the_same_passes() -> None:
    torch.manual_seed(0)
    net = _Net().eval()
    basis = kernels.kernel_basis(net.stem)
    pixels = 0.25 + 0.5 * torch.rand(4, 3, 16, 16)
    names = [f"im{i}" for i in range(4)]
    probes = {"stem": net.stem, "block": net.block}
    exact = collisions.null_space_perturbation(net.stem, (3, 16, 16), basis.vectors[0], 0.05)
    s = collision_figures.collide_set(net, net.stem, pixels, exact, names, probes=probes)
    assert list(s.layer_rel) == ["stem", "block", "output"]
    assert all(float(v.max()) < 1e-5 for v in s.layer_rel.values())  # invisible at the stem: nowhere visible
    visible = 0.05 * torch.randn(3, 16, 16, dtype=torch.float64)
    v = collision_figures.collide_set(net, net.stem, pixels, visible, names, probes=probes)
    assert all(float(t.min()) > 1e-4 for t in v.layer_rel.values())
    assert v.layer_spread("stem").values == pytest.approx(v.first_layer_rel.tolist(), rel=1e-5)
    rows = collision_figures.layer_rows({"exact": s, "visible": v})
    assert [r["layer"] for r in rows] == ["stem", "block", "output"] and set(rows[0]) == {"layer", "exact", "visible"}
    plain = collision_figures.collide_set(net, net.stem, pixels, exact, names)
    assert plain.layer_rel == {}
    with pytest.raises(KeyError, match="no probes"):
        plain.layer_spread("stem")


def test_singular_value_rows_mark_what_the_rule_counts_as_null() -> None:
    conv = _conv_with_equal_taps()
    basis = kernels.near_null_basis(conv, 3)
    rows = collision_figures.singular_value_rows(basis, k=3)
    assert len(rows) == 3 and rows[-1]["index"] == min(basis.matrix_shape)
    assert [r["counted as null"] for r in rows] == [False, False, True]
    assert rows[-1]["sigma_i / sigma_max"] < rows[-1]["rank rule threshold"]


def test_random_first_layers_follow_their_seed_and_restore_the_random_state() -> None:
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    a, b = collisions.random_first_layers("efficientnet_lite0", [0, 1])
    assert torch.equal(torch.rand(1), expected)  # the global random state is untouched
    (again,) = collisions.random_first_layers("efficientnet_lite0", [0])
    assert torch.equal(a.weight, again.weight) and not torch.equal(a.weight, b.weight)
    assert tuple(a.weight.shape) == (32, 3, 3, 3)


def test_sec6_substitute_claims_rest_on_the_substitute_and_need_trained_weights() -> None:
    torch.manual_seed(0)
    layer = _conv_with_equal_taps()
    rows = collisions.kernel_precision_rows({"sub": layer})
    curves = {("sub", "float32"): [1e-2, 1e-1], ("sub", "float64"): [1e-2, 1e-1]}  # geometry: not precision
    claims = collisions.sec6_substitute_claims(
        rows, curves, bound32=1e-7, bound64=1e-15, paper_claim="precision", model="m", label="Sub"
    )
    assert [c["id"] for c in claims] == [
        "sec6.precision_bounds.trained_substitute",
        "sec6.precision_limits.trained_substitute",
    ]
    for c in claims:
        assert c["models"] == ("m",) and c["criterion"].needs_trained and "trained substitute: Sub" in c["description"]
        assert "trained" not in c and "weights" not in c
    assert verdict.status_of(claims[1]["criterion"], claims[1]["measured"]) == verdict.DIFFERS


def test_operator_conclusion_without_dense_sizes_and_with_a_null_corner_mode() -> None:
    ev = conv_operator.InjectivityEvidence((3, 8, 8), {}, {}, 0.3, 1e-9, 0.31, 1.0)
    assert "not on a proof" in collision_figures.operator_conclusion(ev, 1.0, 1e-5)
    null_corner = dataclasses.replace(ev, corner=1e-9)  # a directly measured direction below the tolerance
    assert "reaches" in collision_figures.operator_conclusion(null_corner, 1.0, 1e-5)
    assert not null_corner.consistent()[0]  # Lanczos 0.3 far above a corner gain of 1e-9: not converged


def test_collision_conclusion_follows_the_numbers() -> None:
    torch.manual_seed(0)
    net = _Net().eval()
    basis = kernels.kernel_basis(net.stem)
    pixels = 0.25 + 0.5 * torch.rand(3, 3, 16, 16)
    exact = collisions.null_space_perturbation(net.stem, (3, 16, 16), basis.vectors[0], 0.05)
    s = collision_figures.collide_set(net, net.stem, pixels, exact, ["a", "b", "c"])
    assert "invisible" in collision_figures.collision_conclusion("tiled phi", s, 1e-6)
    assert "kept on every photo" in collision_figures.collision_conclusion("tiled phi", s, 1e-6)
    leaky = dataclasses.replace(s, first_layer_rel64=s.first_layer_rel64 + 0.1, same_top5=torch.tensor([1, 0, 1]) > 0)
    text = collision_figures.collision_conclusion("tiled phi", leaky, 1e-6)
    assert "is visible" in text and "only 2 of 3" in text
