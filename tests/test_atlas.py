"""The atlas (helpers/experiments/atlas.py): rows, cache, failures kept, Dask path, families and years, checks."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from helpers.experiments import atlas, audit

TINY = ("test_vit", "test_resnet")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("COLLISIONS_CACHE", str(tmp_path))
    monkeypatch.setenv("COLLISIONS_OFFLINE", "1")
    return tmp_path


def arch(name: str, library: str = "timm", task: str = "classification") -> atlas.Architecture:
    family = atlas.timm_family(name) if library == "timm" else atlas.torchvision_family(name)
    return atlas.Architecture(library, name, family, task)


def test_architectures_families_and_sample():
    archs = atlas.architectures()
    labels = {a.label for a in archs}
    assert (
        "timm:resnet50" in labels and "torchvision:maskrcnn_resnet50_fpn" in labels and "torchvision:r3d_18" in labels
    )
    by = {a.label: a for a in archs}
    assert by["timm:vit_base_patch16_224"].family == "vision_transformer"
    assert by["torchvision:maskrcnn_resnet50_fpn"].family == "detection.mask_rcnn"
    assert by["torchvision:maskrcnn_resnet50_fpn"].task == "detection"
    first = atlas.sample(archs, 10, include=["resnet50"])
    assert first == atlas.sample(archs, 10, include=["resnet50"]) and len(first) == 10
    assert first[0].name == "resnet50"
    with pytest.raises(ValueError, match="unknown libraries"):
        atlas.architectures(["keras"])
    with pytest.raises(ValueError, match=">= 0"):
        atlas.sample(archs, -1)


def test_family_years_and_bad_years():
    years = atlas.family_years()
    assert years.year("resnet") == 2015 and years.year("vision_transformer") == 2020
    assert years.year("no_such_family") is None
    for bad in ({"resnet": "2015"}, {"resnet": 1900}, {"resnet": True}):
        with pytest.raises(ValueError, match="resnet"):
            atlas.check_years(bad)


def test_row_matches_registry_path_and_first_layer(cache):
    row = atlas.audit_architecture(arch("resnet50", "torchvision"))
    assert row.ok and row.build_device == "meta"
    ref = audit.structural_audit(audit.build_on_meta("resnet50"))
    assert (row.n, row.mu, row.structural_sum_nullity) == (ref.n, ref.mu, ref.structural_sum_nullity)
    assert row.first_layer == "conv1" and row.patch_shape == "64x147" and row.patch_nullity == 83
    assert row.patch_rule and not row.operator_rule
    vit = atlas.audit_architecture(arch("test_vit"))
    assert vit.ok and vit.first_layer_order == "forward" and vit.operator_rule


def test_failed_build_is_kept_with_reason(cache):
    rows = atlas.structural_atlas([atlas.Architecture("timm", "no_such_model", "x", "classification")], workers=1)
    assert len(rows.rows) == 1 and not rows.rows[0].ok
    assert rows.rows[0].error.startswith("build: ") and "\n" not in rows.rows[0].error
    assert atlas.failed_rows(rows.rows)[0]["architecture"] == "no_such_model"
    assert atlas.missing_rows([atlas.Architecture("timm", "no_such_model", "x", "classification")], rows.rows) == []


def test_cache_round_trip_and_corrupted_file(cache, capsys):
    a = arch("test_resnet")
    first = atlas.structural_atlas([a], workers=1, progress=False)
    assert first.computed == 1 and atlas.cache_path(a).exists()
    again = atlas.structural_atlas([a], workers=1, progress=False)
    assert again.cached == 1 and again.rows[0] == first.rows[0]
    path = atlas.cache_path(a)
    path.write_text(path.read_text()[:-20])  # truncated
    third = atlas.structural_atlas([a], workers=1, progress=False)
    assert third.computed == 1 and third.rows[0].n == first.rows[0].n
    assert "discarded" in capsys.readouterr().err
    # a valid envelope holding another architecture's key is not taken either
    from helpers import runtime

    runtime.write_json_cache(path, {"key": "timm|other", "row": first.rows[0].to_json()})
    assert atlas.read_cached(a) is None and not path.exists()


def test_process_pool(cache):
    run = atlas.structural_atlas([arch(n) for n in TINY], workers=2, progress=False)
    assert run.workers == 2 and [r.name for r in run.rows] == list(TINY) and all(r.ok for r in run.rows)


def test_checks_fed_violating_inputs(cache):
    a = arch("test_resnet")
    row = atlas.audit_architecture(a)
    by = atlas.rows_by_label([row])
    point = {"atlas": a.label, "n": row.n, "mu": row.mu, "structural_sum_nullity": row.structural_sum_nullity}
    point["patch_nullity"] = row.patch_nullity
    assert atlas.registry_mismatches([point], by) == []
    assert atlas.registry_mismatches([{**point, "mu": (row.mu or 0) + 1}], by) == [
        f"{a.label}: mu {row.mu} != {(row.mu or 0) + 1}"
    ]
    assert atlas.missing_rows([a], [row]) == []
    assert atlas.missing_rows([a, arch("test_vit")], [row]) == ["timm:test_vit"]
    assert atlas.missing_rows([a], [dataclasses.replace(row, n=None)]) == [a.label]
    assert atlas.missing_rows([a], [dataclasses.replace(row, n=None, error=" ")]) == [a.label]


def test_counts_table_and_html(cache):
    rows = [atlas.audit_architecture(arch(n)) for n in TINY]
    rows.append(atlas.AtlasRow("timm", "broken", "x", "classification", error="build: ValueError: no"))
    c = atlas.counts(rows)
    assert (c.listed, c.audited, c.failed) == (3, 2, 1)
    assert c.operator_rule == sum(r.operator_rule for r in rows[:2])
    html = atlas.searchable_table_html(rows)
    assert html.count("<tr>") == 3 and 'class="atlas-filter"' in html and "data-value" in html
    assert json.loads(json.dumps(rows[0].to_json())) == rows[0].to_json()


def test_trained_atlas_on_dask_local_cluster(cache):
    archs = [arch(n) for n in TINY]
    rows = atlas.trained_atlas(archs, weights="random", engine="dask")
    assert [r.name for r in rows] == list(TINY) and all(r.ok and r.weights == "random" for r in rows)
    assert all(r.n and r.patch_nullity is not None and r.params for r in rows)
    serial = atlas.trained_atlas(archs, weights="random", engine="serial")
    assert [(r.n, r.nu, r.sum_nullity) for r in serial] == [(r.n, r.nu, r.sum_nullity) for r in rows]
    offline = atlas.trained_atlas(archs[:1], weights="pretrained", engine="serial")
    assert not offline[0].ok and offline[0].weights == "" and offline[0].n is None
    cost = atlas.trained_cost(rows, [atlas.audit_architecture(a) for a in archs])
    assert cost.sample == 2 and cost.hours > 0 and cost.checkpoint_bytes == 4 * sum(r.params or 0 for r in rows)
    with pytest.raises(ValueError, match="at least one"):
        atlas.trained_cost(offline, [])
    with pytest.raises(ValueError, match="unknown engine"):
        atlas.trained_atlas(archs, engine="ray")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown weights"):
        atlas.trained_row(archs[0], "imagenet")  # type: ignore[arg-type]


def test_offline_pretrained_is_recorded_not_faked(cache, monkeypatch):
    monkeypatch.setattr(atlas, "local_checkpoint", lambda a: None)
    row = atlas.trained_row(arch("resnet18", "torchvision"), "pretrained")
    assert row.error.startswith(atlas.NOT_OFFLINE) and row.n is None


def test_parameters_on_meta_and_benchmark():
    with atlas.parameters_on_meta():
        layer = torch.nn.Linear(4, 3)
    assert layer.weight.is_meta and not torch.nn.Linear(2, 2).weight.is_meta
    bench = atlas.construction_benchmark([arch("test_resnet")])
    assert bench.architectures == 1 and bench.meta_seconds > 0 and bench.random_seconds > 0
    assert atlas.ConstructionBenchmark(0, 0.0, 0.0).ratio != atlas.ConstructionBenchmark(0, 0.0, 0.0).ratio  # nan
