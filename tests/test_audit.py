"""The Table 1 audit: the matrix rule on hand-built layers with known ranks, fast == reference, the CLI."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers.experiments import audit, table1
from helpers.linalg import rank_rule


def _rank_r(rows: int, cols: int, r: int, seed: int = 0) -> torch.Tensor:
    """Exactly rank ``r`` (small integers: the product is exact in float32, so float64 sees the same rank)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(-3, 4, (rows, r), generator=g) @ torch.randint(-3, 4, (r, cols), generator=g)).float()


def test_conv_linear_and_attention_matrix_rule() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(10, 4))
    mats = audit.weight_matrices(model)
    assert [m.name for m in mats] == ["0.weight", "2.weight"]
    assert mats[0].shape == (8, 27) and mats[0].kind == "conv" and mats[0].structural_nullity == 19
    assert mats[1].shape == (4, 10) and mats[1].kind == "linear"
    mha = audit.weight_matrices(nn.MultiheadAttention(16, 4))
    assert [(m.name, m.shape, m.kind) for m in mha] == [
        ("in_proj_weight", (48, 16), "attention"),
        ("out_proj.weight", (16, 16), "attention"),
    ]


def test_grouped_conv_is_out_by_in_over_groups_times_kernel_with_known_rank() -> None:
    conv = nn.Conv2d(8, 6, 3, groups=2, bias=False)  # weight (6, 4, 3, 3) -> 6 x 36
    with torch.no_grad():
        conv.weight.copy_(_rank_r(6, 36, 2).reshape(6, 4, 3, 3))
    (w,) = audit.weight_matrices(conv)
    assert w.shape == (6, 36) and w.structural_nullity == 30
    result = audit.audit_model(conv, cache=False)
    assert result.rows[0].rank == 2 and result.nullity_w1 == 34 and result.mu == 1 and result.nu == 1


def test_rank_deficient_square_matrix_fast_equals_reference() -> None:
    lin = nn.Linear(64, 64, bias=False)
    with torch.no_grad():
        lin.weight.copy_(_rank_r(64, 64, 40))
    for method in ("fast", "reference"):
        a = audit.audit_model(lin, method=method, cache=False)
        assert (a.n, a.nu, a.mu, a.sum_nullity, a.nullity_w1) == (1, 1, 0, 24, 24)
    assert audit.audit_model(lin, cache=False).rows[0].method == "svd"  # not certifiable: falls back


def test_transposed_conv_rules_and_frozen_layers() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ConvTranspose2d(4, 2, 2, stride=2))
    model[0].weight.requires_grad_(False)
    assert [m.name for m in audit.weight_matrices(model)] == ["0.weight"]  # Table 1's reading: skipped
    assert audit.weight_matrices(model, conv_transpose="operator")[1].shape == (8, 4)
    assert audit.weight_matrices(model, conv_transpose="as_stored")[1].shape == (4, 8)
    assert audit.weight_matrices(model, conv_transpose="operator", trainable_only=True)[0].name == "1.weight"
    skipped = audit.structural_audit(model).skipped
    assert skipped[0][0] == "1.weight" and "transposed" in skipped[0][2]
    with pytest.raises(ValueError, match="valid: skip, operator, as_stored"):
        audit.weight_matrices(model, conv_transpose="adjoint")  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fast_equals_reference_near_the_threshold(dtype: torch.dtype) -> None:
    """Singular values placed just below, at and above the rank threshold: never a different rank."""
    mats = []
    for i, (rows, cols) in enumerate([(40, 90), (90, 40), (60, 60)]):
        p = min(rows, cols)
        tol = rank_rule.default_rtol((rows, cols), dtype)
        for factor in (0.3, 1.0, 3.0, 30.0, 1e4):
            sigma = torch.linspace(1.0, 0.5, p, dtype=torch.float64)
            sigma[-1] = factor * tol
            mats.append(table1.with_spectrum(rows, cols, sigma, torch.Generator().manual_seed(i)).to(dtype))
        mats.append(torch.randn(rows, cols, dtype=dtype))
        mats.append(torch.zeros(rows, cols, dtype=dtype))
    fast = rank_rule.matrix_ranks(mats, dtype=dtype, method="fast")
    ref = rank_rule.matrix_ranks(mats, dtype=dtype, method="reference")
    assert [f.rank for f in fast] == [r.rank for r in ref]
    assert any(f.method.startswith("certified") for f in fast) and any(f.method == "svd" for f in fast)


def test_reference_rank_matches_torch_matrix_rank() -> None:
    w = _rank_r(30, 50, 7).double()
    assert rank_rule.reference_rank(w)[0] == int(torch.linalg.matrix_rank(w)) == 7


def test_audit_is_cached_by_weight_fingerprint(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("COLLISIONS_CACHE", str(tmp_path))
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Linear(8, 8))
    first = audit.audit_model(model)
    assert list((tmp_path / "audit").glob("*.json"))
    second = audit.audit_model(model)
    assert second.summary()["sum_nullity"] == first.summary()["sum_nullity"] and second.fingerprint == first.fingerprint
    with torch.no_grad():
        model[1].weight.zero_()
    assert audit.audit_model(model).nu == 2  # new weights, new fingerprint, recomputed


def test_bad_input_is_rejected_clearly() -> None:
    with pytest.raises(ValueError, match="no weight matrices"):
        audit.audit_model(nn.ReLU(), cache=False)
    with pytest.raises(ValueError, match="valid: torch.float32, torch.float64"):
        audit.audit_model(nn.Linear(2, 2), dtype=torch.float16, cache=False)


def test_cli_audits_a_model_and_rejects_unknown_ones(capsys: pytest.CaptureFixture[str]) -> None:
    from helpers.cli import main

    assert main(["audit", "squeezenet1_1", "--weights", "random", "--json"]) == 0
    out = capsys.readouterr().out
    assert '"n": 26' in out and '"mu": 16' in out and '"w1_shape"' in out and "rtol" in out
    assert main(["audit", "resnet51", "--weights", "random"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'resnet51'" in err and "resnet50" in err
