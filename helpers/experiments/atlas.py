"""The atlas: every timm architecture and every torchvision classification, segmentation, detection and video
builder, audited by the matrix rule and read by the first-layer verdict.

Two atlases:

* **structural** (:func:`structural_atlas`): each architecture is built *without weights* (``torch.device("meta")``
  when its constructor allows it; otherwise on the CPU with every parameter moved to ``meta`` as it is registered;
  otherwise plainly on the CPU; :attr:`AtlasRow.build_device` says which), then :func:`audit.structural_audit`
  (n, mu, mu/n, the sum of nullities every full-rank set of weights has) and
  :func:`first_layer.first_layer_verdict` (the first layer in forward order, the paper's patch nullity of W1, the
  operator reading, the one-line answer). One process per core (``ProcessPoolExecutor``); one cache file per
  architecture and library version (``runtime.cache_dir()/atlas``, hash-verified). An architecture that fails to
  build stays in the atlas as a row with the reason.
* **trained** (:func:`trained_atlas`): per architecture, its pretrained checkpoint through the library's own
  download path, the full audit by the book's rank rule (:func:`audit.audit_model`) and the measured first-layer
  verdict. Hours of downloads and SVDs on one machine, so it runs on Dask (``engine="dask"``: a
  ``distributed.Client`` given, or a local cluster). Offline, every checkpoint that is not already on disk is
  recorded as not available offline; nothing is faked. ``weights="random"`` runs the same path at random weights
  of the same shapes (tests, and the cost measurement of :func:`trained_cost`).

Families: timm's model module (``timm/models/<family>.py``, where the entrypoint is registered), torchvision's
builder module relative to ``torchvision.models`` (``resnet``, ``detection.faster_rcnn``, ``video.resnet``).
Years per family: ``helpers/data/model_family_years.json`` (families not listed there have no year).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import inspect
import json
import math
import multiprocessing
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import nn

from helpers import runtime
from helpers.experiments import audit, first_layer
from helpers.progress import progress_bar

#: Bump when what a row holds or how it is computed changes: cached rows of another version are recomputed.
ATLAS_VERSION = 1

LIBRARIES: tuple[str, ...] = ("timm", "torchvision")

#: The torchvision model modules of the atlas, by task (optical flow and quantized models are left out).
TORCHVISION_TASKS: tuple[str, ...] = ("classification", "segmentation", "detection", "video")

#: How each architecture was built: meta device; CPU with every parameter moved to meta when registered; CPU.
BUILD_DEVICES: tuple[str, ...] = ("meta", "cpu, parameters on meta", "cpu")

Engine = Literal["dask", "serial"]
ENGINES: tuple[str, ...] = ("dask", "serial")
TrainedWeights = Literal["pretrained", "random"]
TRAINED_WEIGHTS: tuple[str, ...] = ("pretrained", "random")

#: What a trained row says when the checkpoint cannot be had here.
NOT_OFFLINE = "not available offline"

#: The bytes of one float32 parameter in a checkpoint.
FLOAT32_BYTES = 4


@dataclass(frozen=True)
class Architecture:
    """One buildable architecture: ``library`` (timm / torchvision), its ``name`` there, ``family`` and ``task``."""

    library: str
    name: str
    family: str
    task: str

    @property
    def label(self) -> str:
        return f"{self.library}:{self.name}"


def library_version(library: str) -> str:
    """The installed version of ``library`` (part of every cache key)."""
    if library == "timm":
        import timm

        return str(timm.__version__)
    if library == "torchvision":
        import torchvision

        return str(torchvision.__version__)
    raise ValueError(f"unknown library {library!r}; valid: {', '.join(LIBRARIES)}")


def timm_family(name: str) -> str:
    """The timm module that registers ``name`` (``resnet``, ``vision_transformer``, ...)."""
    from timm.models import model_entrypoint

    return str(model_entrypoint(name).__module__).rsplit(".", 1)[-1]


def torchvision_family(name: str) -> str:
    """The torchvision module of builder ``name`` relative to ``torchvision.models`` (``detection.mask_rcnn``)."""
    import torchvision

    module = str(torchvision.models.get_model_builder(name).__module__)
    return module.removeprefix("torchvision.models.")


def _torchvision_module(task: str) -> Any:
    import torchvision.models as tvm

    modules = {"classification": tvm, "segmentation": tvm.segmentation, "detection": tvm.detection, "video": tvm.video}
    if task not in modules:
        raise ValueError(f"unknown torchvision task {task!r}; valid: {', '.join(TORCHVISION_TASKS)}")
    return modules[task]


def architectures(libraries: Sequence[str] = LIBRARIES) -> list[Architecture]:
    """Every architecture of ``libraries``: ``timm.list_models()`` (task ``classification``, as timm builds them)
    and ``torchvision.models.list_models(module=...)`` for each of :data:`TORCHVISION_TASKS`, in that order."""
    unknown = [lib for lib in libraries if lib not in LIBRARIES]
    if unknown:
        raise ValueError(f"unknown libraries {unknown}; valid: {', '.join(LIBRARIES)}")
    found: list[Architecture] = []
    if "timm" in libraries:
        import timm

        found += [Architecture("timm", n, timm_family(n), "classification") for n in timm.list_models()]
    if "torchvision" in libraries:
        import torchvision

        for task in TORCHVISION_TASKS:
            names = torchvision.models.list_models(module=_torchvision_module(task))
            found += [Architecture("torchvision", n, torchvision_family(n), task) for n in sorted(names)]
    return found


def sample(archs: Sequence[Architecture], k: int, *, seed: int = 0, include: Sequence[str] = ()) -> list[Architecture]:
    """A deterministic sample of ``k`` architectures: those whose ``label`` or ``name`` is in ``include`` first (in
    ``archs`` order), then the rest ordered by the SHA-256 of ``"seed|label"`` (the same sample on every machine
    and Python version)."""
    if k < 0:
        raise ValueError(f"sample size must be >= 0, got {k}")
    chosen = [a for a in archs if a.label in include or a.name in include][:k]
    rest = sorted(
        (a for a in archs if a not in chosen), key=lambda a: hashlib.sha256(f"{seed}|{a.label}".encode()).hexdigest()
    )
    return chosen + rest[: k - len(chosen)]


# --- building without weights ---


def _builder(arch: Architecture, pretrained: bool) -> Callable[[], nn.Module]:
    """A no-argument constructor of ``arch``: random (library default initialisation) or pretrained weights.
    torchvision backbones are never downloaded behind the reader's back (``weights_backbone=None``)."""
    if arch.library == "timm":
        runtime.ensure_hub_mode()
        import timm

        return lambda: timm.create_model(arch.name, pretrained=pretrained)
    if arch.library == "torchvision":
        import torchvision

        fn = torchvision.models.get_model_builder(arch.name)
        kwargs: dict[str, Any] = {"weights": "DEFAULT" if pretrained else None}
        if "weights_backbone" in inspect.signature(fn).parameters:
            kwargs["weights_backbone"] = None
        return lambda: fn(**kwargs)
    raise ValueError(f"unknown library {arch.library!r}; valid: {', '.join(LIBRARIES)}")


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """While active, every parameter a module registers is moved to the ``meta`` device at once (buffers and
    other tensors stay on the CPU): a constructor that computes with tensors (``.item()``, ``.tolist()``) still
    runs, but no weight memory is kept and initialisers run on meta tensors (no time)."""
    original = nn.Module.register_parameter

    def register(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(self, name, param)
        if param is not None and param.device.type != "meta":
            kwargs = {"requires_grad": param.requires_grad}
            self._parameters[name] = type(param)(param.to("meta"), **kwargs)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def build_structural(arch: Architecture) -> tuple[nn.Module, str]:
    """``arch`` with its parameters on the ``meta`` device, and how it was built (one of :data:`BUILD_DEVICES`).

    Tries ``torch.device("meta")``, then the CPU with :func:`parameters_on_meta`, then the plain CPU; the model
    is moved to ``meta`` in the end (shapes only), in eval mode. Raises the last error when all three fail."""
    build = _builder(arch, pretrained=False)
    attempts: list[tuple[str, Callable[[], contextlib.AbstractContextManager[Any]]]] = [
        ("meta", lambda: torch.device("meta")),
        ("cpu, parameters on meta", parameters_on_meta),
        ("cpu", contextlib.nullcontext),
    ]
    for how, context in attempts:
        try:
            with context():
                model = build()
            return model.to("meta").eval(), how
        except Exception as err:  # every library raises its own errors; the last one is reported
            last = err
    raise last


def input_for(arch: Architecture, model: nn.Module) -> tuple[tuple[int, ...], Any]:
    """The input the first-layer verdict runs: ``(input_shape, example)``; the shape is
    :func:`any_model.input_shape_of`'s (the one home of "what a model of this name takes"); ``example`` is not
    None where the model takes something other than one batch tensor (detection: a list of ``(3, H, W)`` images)."""
    from helpers.models import any_model

    shape = any_model.input_shape_of(any_model.ModelName(arch.name, arch.library, arch.task), model)
    if arch.task == "detection":
        return shape, [torch.empty(*shape, device="meta")]
    return shape, None


# --- one row per architecture ---


def _one_line(err: BaseException, limit: int = 200) -> str:
    text = " ".join(str(err).split()) or "(no message)"
    line = f"{type(err).__name__}: {text}"
    return line if len(line) <= limit else line[: limit - 1] + "…"


@dataclass
class AtlasRow:
    """One architecture of the structural atlas. Numbers are ``None`` when it failed to build (``error`` says why).

    ``n``, ``mu``, ``mu_over_n``, ``structural_sum_nullity``: :func:`audit.structural_audit`; ``params``: parameter
    count; ``first_layer`` ... ``answer``: :func:`first_layer.first_layer_verdict` on the meta model
    (``first_layer_order`` "forward" or "registration"; ``patch_shape`` "rows x cols" of the paper's W1;
    ``patch_nullity`` its nullity forced by the shape; ``block_nullity`` the block-diagonal reading of a grouped
    first layer; ``operator`` the one-line operator reading, ``operator_forced`` whether the shape forces a
    kernel of the image -> feature-map operator). ``seconds``: wall time of build + audit + verdict.
    """

    library: str
    name: str
    family: str
    task: str
    build_device: str = ""
    n: int | None = None
    mu: int | None = None
    mu_over_n: float | None = None
    structural_sum_nullity: int | None = None
    params: int | None = None
    input_shape: list[int] = field(default_factory=list)
    first_layer: str | None = None
    first_layer_order: str | None = None
    first_layer_type: str | None = None
    patch_shape: str | None = None
    patch_nullity: int | None = None
    block_nullity: int | None = None
    operator: str | None = None
    operator_forced: bool | None = None
    answer: str | None = None
    seconds: float = 0.0
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error

    @property
    def label(self) -> str:
        return f"{self.library}:{self.name}"

    @property
    def patch_rule(self) -> bool:
        """The paper's rule: exact first-layer collisions exist iff the patch nullity of W1 is > 0."""
        return bool(self.patch_nullity)

    @property
    def operator_rule(self) -> bool:
        """The operator rule: the image -> feature-map operator of the first layer has a kernel for every weight."""
        return bool(self.operator_forced)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AtlasRow:
        return cls(**data)


def audit_architecture(arch: Architecture) -> AtlasRow:
    """Build ``arch`` without weights and read it (:class:`AtlasRow`); a failure at any stage becomes the row's
    one-line ``error`` ("build: ..." or "audit: ...") instead of an exception."""
    start = time.perf_counter()
    row = AtlasRow(arch.library, arch.name, arch.family, arch.task)
    try:
        model, row.build_device = build_structural(arch)
    except Exception as err:
        row.error, row.seconds = "build: " + _one_line(err), time.perf_counter() - start
        return row
    try:
        shape, example = input_for(arch, model)
        structural = audit.structural_audit(model)
        verdict = first_layer.first_layer_verdict(model, shape, example=example)
    except Exception as err:
        row.error, row.seconds = "audit: " + _one_line(err), time.perf_counter() - start
        return row
    row.n, row.mu, row.structural_sum_nullity = structural.n, structural.mu, structural.structural_sum_nullity
    row.mu_over_n = structural.mu_over_n if structural.n else None
    row.params = sum(p.numel() for p in model.parameters())
    row.input_shape = list(shape)
    row.first_layer, row.first_layer_order, row.first_layer_type = verdict.layer, verdict.order, verdict.module_type
    row.patch_shape = f"{verdict.patch_rows}x{verdict.patch_cols}" if verdict.layer else None
    row.patch_nullity = verdict.patch_nullity_structural if verdict.layer else None
    row.block_nullity = verdict.block_nullity_structural if verdict.layer else None
    row.operator, row.operator_forced, row.answer = verdict.operator_structural, verdict.operator_forced, verdict.answer
    row.seconds = time.perf_counter() - start
    return row


# --- the cache: one file per architecture, library version and atlas version ---


def cache_key(arch: Architecture) -> str:
    """What a cached row depends on: library, name, library and torch versions, the atlas and audit rule versions."""
    return (
        f"{arch.library}|{arch.name}|{library_version(arch.library)}|torch {torch.__version__}"
        f"|atlas v{ATLAS_VERSION}|audit v{audit.RULE_VERSION}"
    )


def cache_path(arch: Architecture) -> Path:
    """``runtime.cache_dir()/atlas/<library>/<name>.<hash of the key>.json``."""
    digest = hashlib.sha256(cache_key(arch).encode()).hexdigest()[:16]
    return runtime.cache_dir() / "atlas" / arch.library / f"{arch.name}.{digest}.json"


def read_cached(arch: Architecture) -> AtlasRow | None:
    """The cached row of ``arch``, or None (missing, failed verification, other key, or not a row: discarded)."""
    path = cache_path(arch)
    payload = runtime.read_json_cache(path)
    if payload is None:
        return None
    try:
        if payload["key"] != cache_key(arch):
            raise KeyError("key")
        return AtlasRow.from_json(payload["row"])
    except (KeyError, TypeError):
        runtime.discard_cache(path, "not a row of this architecture and version")
        return None


def write_cached(arch: Architecture, row: AtlasRow) -> Path:
    """Cache ``row`` atomically with its key (verified by :func:`read_cached`)."""
    return runtime.write_json_cache(cache_path(arch), {"key": cache_key(arch), "row": row.to_json()})


# --- the structural atlas: a local process pool ---


def _worker_init() -> None:
    torch.set_num_threads(1)
    runtime.ensure_hub_mode()
    import warnings

    warnings.filterwarnings("ignore")


@dataclass
class AtlasRun:
    """A structural atlas: its rows (in the order asked), how many came from the cache, the workers and seconds."""

    rows: list[AtlasRow]
    cached: int
    computed: int
    workers: int
    seconds: float

    @property
    def built(self) -> list[AtlasRow]:
        return [r for r in self.rows if r.ok]

    @property
    def failed(self) -> list[AtlasRow]:
        return [r for r in self.rows if not r.ok]


def structural_atlas(
    archs: Sequence[Architecture], *, workers: int | None = None, cache: bool = True, progress: bool = True
) -> AtlasRun:
    """:func:`audit_architecture` of every architecture, from the cache where possible, the rest on a local
    process pool of ``workers`` processes (default: one per core; 1 runs in this process)."""
    start = time.perf_counter()
    workers = workers or os.cpu_count() or 1
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    found: dict[Architecture, AtlasRow] = {}
    if cache:
        for a in archs:
            cached_row = read_cached(a)
            if cached_row is not None:
                found[a] = cached_row
    missing = [a for a in archs if a not in found]
    used = min(workers, len(missing))
    with contextlib.ExitStack() as stack:
        if used > 1:
            # fork: the workers inherit the imported libraries (spawn would import torch, timm and torchvision again
            # in each, seconds per worker); where fork does not exist, spawn
            methods = multiprocessing.get_all_start_methods()
            ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
            pool = stack.enter_context(
                concurrent.futures.ProcessPoolExecutor(used, mp_context=ctx, initializer=_worker_init)
            )
            computed = pool.map(audit_architecture, missing, chunksize=max(1, min(8, len(missing) // (4 * used))))
        else:
            computed = map(audit_architecture, missing)
        # each row is cached as it arrives, so an interrupted run keeps what it computed
        for a, row in zip(missing, progress_bar(computed, total=len(missing), desc="atlas", disable=not progress)):
            found[a] = row
            if cache and not row.error.startswith(("build: MemoryError", "audit: MemoryError")):
                write_cached(a, row)
    return AtlasRun(
        [found[a] for a in archs], len(archs) - len(missing), len(missing), max(used, 1), time.perf_counter() - start
    )


# --- families and years ---


@dataclasses.dataclass(frozen=True)
class FamilyYears:
    """Year of the paper that introduced each family (``helpers/data/model_family_years.json``)."""

    years: dict[str, int]

    def year(self, family: str) -> int | None:
        """The family's year, or None when the data file does not list it (unknown, shown as such)."""
        return self.years.get(family)


def family_years() -> FamilyYears:
    """The data file, checked: every year an integer between 1989 and the current decade."""
    data = json.loads(resources.files("helpers.data").joinpath("model_family_years.json").read_text())
    return FamilyYears(check_years(data["years"]))


def check_years(years: dict[str, Any]) -> dict[str, int]:
    """``years`` if every value is an int in [1989, 2030]; else ``ValueError`` naming the first bad entry."""
    for fam, year in years.items():
        if not isinstance(year, int) or isinstance(year, bool) or not 1989 <= year <= 2030:
            raise ValueError(f"family {fam!r}: year {year!r} is not an integer in [1989, 2030]")
    return dict(years)


# --- the page: counts, table, figures ---


@dataclass(frozen=True)
class AtlasCounts:
    """The atlas in numbers: architectures listed, audited (built and read), failed, and with exact first-layer
    collisions by the patch rule (patch nullity of W1 > 0) and by the operator rule (forced by the shape)."""

    listed: int
    audited: int
    failed: int
    patch_rule: int
    operator_rule: int
    registration_order: int


def counts(rows: Sequence[AtlasRow]) -> AtlasCounts:
    """:class:`AtlasCounts` of ``rows``."""
    built = [r for r in rows if r.ok]
    return AtlasCounts(
        len(rows),
        len(built),
        len(rows) - len(built),
        sum(r.patch_rule for r in built),
        sum(r.operator_rule for r in built),
        sum(r.first_layer_order == "registration" for r in built),
    )


#: The columns of the page's table, and their headers.
TABLE_COLUMNS: dict[str, str] = {
    "library": "library",
    "name": "architecture",
    "family": "family",
    "n": "n",
    "mu": "μ",
    "mu_over_n": "μ/n",
    "structural_sum_nullity": "Σ nullity (shape)",
    "first_layer": "first layer",
    "patch_shape": "W1",
    "patch_nullity": "patch nullity",
    "answer": "operator verdict",
}


def table_rows(rows: Sequence[AtlasRow]) -> list[dict[str, Any]]:
    """The built rows as dicts of :data:`TABLE_COLUMNS` (mu/n rounded to 3 decimals)."""
    out = []
    for r in rows:
        if r.ok:
            d = {k: getattr(r, k) for k in TABLE_COLUMNS}
            d["mu_over_n"] = None if r.mu_over_n is None else round(r.mu_over_n, 3)
            out.append(d)
    return out


def searchable_table_html(rows: Sequence[AtlasRow], table_id: str = "atlas") -> str:
    """The atlas as an HTML table with a filter box, sortable by any column: ``_static/atlas_table.js`` (loaded by
    the book) makes it interactive; without scripts it is a plain table. Numbers sort as numbers
    (``data-value``)."""
    import html as html_lib

    head = "".join(f"<th>{html_lib.escape(label)}</th>" for label in TABLE_COLUMNS.values())
    body = []
    for d in table_rows(rows):
        cells = []
        for key in TABLE_COLUMNS:
            v = d[key]
            shown = "—" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))
            num = f' data-value="{v}"' if isinstance(v, (int, float)) and not isinstance(v, bool) else ""
            cells.append(f"<td{num}>{html_lib.escape(shown)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (
        f'<div class="atlas-table-box"><input type="search" class="atlas-filter" data-table="{table_id}" '
        f'placeholder="filter (name, family, layer, verdict)" aria-label="filter the atlas">'
        f'<span class="atlas-count" data-table="{table_id}"></span>'
        f'<div class="collisions-table atlas-scroll"><table class="atlas-table" id="{table_id}">'
        f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div></div>"
    )


def failed_rows(rows: Sequence[AtlasRow]) -> list[dict[str, Any]]:
    """The architectures that did not build or could not be read, with the one-line reason."""
    return [{"library": r.library, "architecture": r.name, "reason": r.error} for r in rows if not r.ok]


def share_by(rows: Sequence[AtlasRow], key: Callable[[AtlasRow], Any], min_count: int = 1) -> list[dict[str, Any]]:
    """Per value of ``key`` (None values left out), over built rows: count and the shares with exact first-layer
    collisions by the patch rule and by the operator rule; groups smaller than ``min_count`` left out; sorted by
    the group."""
    groups: dict[Any, list[AtlasRow]] = {}
    for r in rows:
        if r.ok and key(r) is not None:
            groups.setdefault(key(r), []).append(r)
    return [
        {
            "group": g,
            "count": len(rs),
            "patch_share": sum(r.patch_rule for r in rs) / len(rs),
            "operator_share": sum(r.operator_rule for r in rs) / len(rs),
        }
        for g, rs in sorted(groups.items(), key=lambda kv: str(kv[0]))
        if len(rs) >= min_count
    ]


def plot_share_by_family(rows: Sequence[AtlasRow], min_count: int = 5) -> plt.Figure:
    """Horizontal bars: per family with at least ``min_count`` built architectures, the share admitting exact
    first-layer collisions by the patch rule and by the operator rule (count in the label)."""
    data = sorted(share_by(rows, lambda r: r.family, min_count), key=lambda d: (d["patch_share"], d["count"]))
    fig, ax = plt.subplots(figsize=(7.5, max(2.5, 0.22 * len(data) + 1)))
    y = np.arange(len(data))
    ax.barh(y + 0.2, [d["patch_share"] for d in data], 0.4, label="patch rule: nullity(W1) > 0")
    ax.barh(y - 0.2, [d["operator_share"] for d in data], 0.4, label="operator rule: forced by the shape")
    ax.set_yticks(y, [f"{d['group']} ({d['count']})" for d in data], fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of the family's architectures")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def plot_map(
    rows: Sequence[AtlasRow], years: FamilyYears, table1: Sequence[dict[str, Any]] = (), seed: int = 0
) -> plt.Figure:
    """The map: left, every built architecture with a family year (x: year, jittered; y: patch nullity of W1,
    symlog), coloured by the operator rule; the Table 1 models as labelled stars. Right: per year, the share
    admitting exact first-layer collisions by each rule (marker size: count)."""
    rng = np.random.default_rng(seed)
    dated = [(r, y) for r in rows if r.ok for y in [years.year(r.family)] if y is not None]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    for forced, colour, label in [(False, "tab:blue", "operator: not forced"), (True, "tab:red", "operator: forced")]:
        pts = [(y + rng.uniform(-0.3, 0.3), r.patch_nullity) for r, y in dated if r.operator_rule == forced]
        if pts:
            ax.scatter(*zip(*pts), s=8, alpha=0.5, c=colour, label=f"{label} ({len(pts)})")
    for t in table1:
        if t.get("year") is not None and t.get("patch_nullity") is not None:
            ax.scatter(t["year"], t["patch_nullity"], marker="*", s=110, c="black", zorder=3)
            ax.annotate(
                t["row"], (t["year"], t["patch_nullity"]), fontsize=6, xytext=(3, 3), textcoords="offset points"
            )
    ax.set_yscale("symlog", linthresh=1)
    ax.set_xlabel("year of the family's paper")
    ax.set_ylabel("patch nullity of W1 (shape)")
    ax.legend(fontsize=7, loc="upper left")
    by_year = share_by([r for r, _ in dated], lambda r: years.year(r.family))
    xs = [d["group"] for d in by_year]
    sizes = [8 + 2 * d["count"] ** 0.8 for d in by_year]
    bx.plot(xs, [d["patch_share"] for d in by_year], "-", c="tab:green", lw=1)
    bx.scatter(xs, [d["patch_share"] for d in by_year], s=sizes, c="tab:green", label="patch rule")
    bx.plot(xs, [d["operator_share"] for d in by_year], "-", c="tab:red", lw=1)
    bx.scatter(xs, [d["operator_share"] for d in by_year], s=sizes, c="tab:red", label="operator rule")
    bx.set_ylim(-0.03, 1.03)
    bx.set_xlabel("year of the family's paper")
    bx.set_ylabel("share with exact first-layer collisions")
    bx.legend(fontsize=7)
    fig.tight_layout()
    return fig


# --- Table 1 on the map, and the registry check ---


def table1_points(rows_by_label: dict[str, AtlasRow], years: FamilyYears) -> list[dict[str, Any]]:
    """The Table 1 rows of the registry (``registry.TABLE1_ROWS``), read through the registry path
    (:func:`audit.build_on_meta` + :func:`audit.structural_audit` + the first-layer verdict): row label, registry
    name, n, mu, structural sum of nullities, patch nullity, operator answer, the atlas row it matches (same
    library and builder, no extra constructor arguments) and the year of its family (from that atlas row)."""
    from helpers.models import any_model, registry

    out = []
    for row, name in registry.TABLE1_ROWS.items():
        spec = registry.spec(name)
        model = audit.build_on_meta(name)
        structural = audit.structural_audit(model)
        shape = any_model.input_shape_of(any_model.resolve(name), model)
        example = [torch.empty(*shape, device="meta")] if spec.task == "localization" else None
        verdict = first_layer.first_layer_verdict(model, shape, example=example)
        label = f"{spec.source}:{spec.builder}"
        match = rows_by_label.get(label) if not spec.kwargs else None
        family = match.family if match is not None else None
        out.append(
            {
                "row": row,
                "model": name,
                "n": structural.n,
                "mu": structural.mu,
                "structural_sum_nullity": structural.structural_sum_nullity,
                "patch_nullity": verdict.patch_nullity_structural,
                "operator_verdict": verdict.answer,
                "atlas": label if match is not None else None,
                "year": years.year(family) if family else None,
            }
        )
    return out


def registry_mismatches(points: Sequence[dict[str, Any]], rows_by_label: dict[str, AtlasRow]) -> list[str]:
    """For each Table 1 point with an atlas row: the columns (n, mu, structural sum of nullities, patch nullity)
    where the atlas and the registry path differ, as ``"label: column atlas != registry"``; empty when they agree."""
    out = []
    for p in points:
        row = rows_by_label.get(p["atlas"]) if p["atlas"] else None
        if row is None:
            continue
        for col in ("n", "mu", "structural_sum_nullity", "patch_nullity"):
            if getattr(row, col) != p[col]:
                out.append(f"{p['atlas']}: {col} {getattr(row, col)} != {p[col]}")
    return out


def table1_names() -> list[str]:
    """The atlas names of the Table 1 models built by a plain library builder (used to seed the quick sample)."""
    from helpers.models import registry

    specs = [registry.spec(n) for n in registry.TABLE1_ROWS.values()]
    return [s.builder for s in specs if s.source in LIBRARIES and not s.kwargs]


# --- the trained-weights atlas (Dask) ---


@dataclass
class TrainedRow:
    """One architecture with real weights: ``weights`` "pretrained" or "random" (same shapes), or "" when none
    were loaded (``error`` says why: :data:`NOT_OFFLINE`, no published weights, a failure). Numbers: the audit by
    the book's rank rule (:func:`audit.audit_model`, float64, fast method) and the measured first-layer verdict.
    ``checkpoint_bytes``: float32 bytes of the parameters; seconds of the build (with the download) and of the
    audit (SVDs and the verdict)."""

    library: str
    name: str
    weights: str = ""
    params: int | None = None
    checkpoint_bytes: int | None = None
    n: int | None = None
    nu: int | None = None
    mu: int | None = None
    sum_nullity: int | None = None
    first_layer: str | None = None
    patch_nullity: int | None = None
    answer: str | None = None
    build_seconds: float = 0.0
    audit_seconds: float = 0.0
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error


def local_checkpoint(arch: Architecture) -> Path | None:
    """Where the library would find ``arch``'s pretrained checkpoint on this disk without a download, or None."""
    if arch.library == "torchvision":
        import torchvision

        from helpers.models import registry

        enum = torchvision.models.get_model_weights(arch.name).DEFAULT
        path = registry._torchvision_checkpoint(enum)
        return path if path.exists() else None
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(arch.name)
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
            hit = try_to_load_from_cache(cfg.hf_hub_id.split("@")[0], filename)
            if isinstance(hit, str):
                return Path(hit)
    if isinstance(cfg.url, str) and cfg.url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url)
        return path if path.exists() else None
    return None


def pretrained_unavailable(arch: Architecture) -> str | None:
    """Why ``arch``'s pretrained weights cannot be had here (one line), or None when they can be tried: online,
    or the checkpoint is on disk. timm architectures without a pretrained tag have none to download."""
    if arch.library == "timm":
        from timm.models import is_model_pretrained

        if not is_model_pretrained(arch.name):
            return "no pretrained weights published (timm lists no pretrained tag)"
    if runtime.network_available() or local_checkpoint(arch) is not None:
        return None
    return f"{NOT_OFFLINE} (no network, no local checkpoint)"


def trained_row(arch: Architecture, weights: TrainedWeights = "pretrained") -> TrainedRow:
    """Load ``arch`` with ``weights`` (the library's own pretrained path, or random initialisation of the same
    shapes) on the CPU, audit it by the book's rank rule and read its first layer from the weights. Never raises:
    failures and unavailable checkpoints become the row's one-line ``error``."""
    if weights not in TRAINED_WEIGHTS:
        raise ValueError(f"unknown weights {weights!r}; valid: {', '.join(TRAINED_WEIGHTS)}")
    row = TrainedRow(arch.library, arch.name)
    if weights == "pretrained":
        why = pretrained_unavailable(arch)
        if why is not None:
            row.error = why
            return row
    start = time.perf_counter()
    try:
        model = _builder(arch, pretrained=weights == "pretrained")().eval()
    except Exception as err:
        row.error, row.build_seconds = "build: " + _one_line(err), time.perf_counter() - start
        return row
    row.build_seconds, row.weights = time.perf_counter() - start, weights
    row.params = sum(p.numel() for p in model.parameters())
    row.checkpoint_bytes = row.params * FLOAT32_BYTES
    start = time.perf_counter()
    try:
        result = audit.audit_model(model, cache=False)
        with torch.device("meta"):
            shape, example = input_for(arch, model)
        example = [torch.zeros(3, *shape[1:])] if example is not None else None
        verdict = first_layer.first_layer_verdict(model, shape, example=example)
    except Exception as err:
        row.error, row.audit_seconds = "audit: " + _one_line(err), time.perf_counter() - start
        return row
    row.audit_seconds = time.perf_counter() - start
    row.n, row.nu, row.mu, row.sum_nullity = result.n, result.nu, result.mu, result.sum_nullity
    row.first_layer, row.patch_nullity, row.answer = verdict.layer, verdict.patch_nullity, verdict.answer
    return row


def trained_atlas(
    archs: Sequence[Architecture],
    *,
    weights: TrainedWeights = "pretrained",
    engine: Engine = "dask",
    client: Any | None = None,
) -> list[TrainedRow]:
    """:func:`trained_row` of every architecture, in order. ``engine="dask"``: one task per architecture on
    ``client`` (a ``distributed.Client``, e.g. ``Client("tcp://scheduler:8786")`` for a real cluster) or, when
    None, on a ``distributed.LocalCluster`` in this process (threads, one per core) that is closed afterwards;
    ``engine="serial"``: one after another here."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; valid: {', '.join(ENGINES)}")
    if weights not in TRAINED_WEIGHTS:
        raise ValueError(f"unknown weights {weights!r}; valid: {', '.join(TRAINED_WEIGHTS)}")
    if engine == "serial":
        return [trained_row(a, weights) for a in archs]
    from distributed import Client, LocalCluster

    with contextlib.ExitStack() as stack:
        if client is None:
            cluster = stack.enter_context(
                LocalCluster(
                    processes=False, n_workers=1, threads_per_worker=os.cpu_count() or 1, dashboard_address=None
                )
            )
            client = stack.enter_context(Client(cluster))
        futures = client.map(trained_row, list(archs), weights=weights, pure=False)
        return list(client.gather(futures))


# --- what a full trained run costs, measured on a sample ---


def cost_sample(rows: Sequence[AtlasRow], k: int, max_params: int) -> list[Architecture]:
    """``k`` built architectures spread evenly over the parameter counts up to ``max_params`` (sorted by count;
    every ``len/k``-th one), deterministic."""
    built = sorted((r for r in rows if r.ok and r.params and r.params <= max_params), key=lambda r: (r.params, r.label))
    if k < 1 or not built:
        return []
    picks = sorted({round(i * (len(built) - 1) / max(k - 1, 1)) for i in range(min(k, len(built)))})
    return [Architecture(r.library, r.name, r.family, r.task) for r in (built[i] for i in picks)]


def trained_table(rows: Sequence[TrainedRow]) -> list[dict[str, Any]]:
    """The trained atlas for the page, one short row per architecture: the weights used (or why none were), the
    parameters in millions, the audit's n, nu, mu and sum of nullities, W1's patch nullity, the operator verdict and
    the seconds spent (build + audit); numbers are None where no weights were loaded."""
    return [
        {
            "architecture": f"{r.library}:{r.name}",
            "weights": r.weights if r.ok else f"none ({r.error.split(':')[0]})",
            "params (M)": round(r.params / 1e6, 1) if r.params else None,
            "n": r.n,
            "nu": r.nu,
            "mu": r.mu,
            "sum_nullity": r.sum_nullity,
            "patch_nullity": r.patch_nullity,
            "operator_verdict": r.answer,
            "seconds": round(r.build_seconds + r.audit_seconds, 2) if r.ok else None,
        }
        for r in rows
    ]


@dataclass(frozen=True)
class TrainedCost:
    """The cost of the full trained atlas, extrapolated from a measured sample.

    ``sample``: architectures measured (random weights of the real shapes, build + audit, one core);
    ``seconds_per_mparam``: their total seconds over their total parameters (millions), the rate the estimate
    applies to every architecture; ``hours``: that rate times the parameters of ``architectures`` (every built row
    with a parameter count), one core; ``checkpoint_bytes``: float32 bytes of all those parameters (what the
    downloads weigh, before compression)."""

    sample: int
    sample_seconds: float
    sample_params: int
    seconds_per_mparam: float
    architectures: int
    hours: float
    checkpoint_bytes: int

    def text(self) -> str:
        return (
            f"{self.hours:.1f} CPU-core hours of build + SVD audit for {self.architectures} architectures "
            f"({self.seconds_per_mparam:.3g} s per million parameters, measured on a sample of {self.sample} "
            f"in {self.sample_seconds:.0f} s) and {self.checkpoint_bytes / 1e9:.0f} GB of float32 checkpoints"
        )


def trained_cost(measured: Sequence[TrainedRow], rows: Sequence[AtlasRow]) -> TrainedCost:
    """:class:`TrainedCost` from ``measured`` (rows of :func:`trained_row`; at least one loaded) over the built
    ``rows`` of the structural atlas: seconds per parameter of the sample, times every architecture's parameters."""
    ok = [m for m in measured if m.ok and m.params]
    if not ok:
        raise ValueError("need at least one measured architecture with weights loaded, got none")
    seconds = sum(m.build_seconds + m.audit_seconds for m in ok)
    params = sum(m.params or 0 for m in ok)
    total = sum(r.params for r in rows if r.ok and r.params)
    rate = seconds / (params / 1e6)
    return TrainedCost(
        len(ok),
        seconds,
        params,
        rate,
        sum(1 for r in rows if r.ok and r.params),
        rate * total / 1e6 / 3600,
        total * FLOAT32_BYTES,
    )


@dataclass(frozen=True)
class ConstructionBenchmark:
    """Building the same architectures on the ``meta`` device and with random initialisation on the CPU, once."""

    architectures: int
    meta_seconds: float
    random_seconds: float

    @property
    def ratio(self) -> float:
        """How many times longer the random-initialised construction takes."""
        return self.random_seconds / self.meta_seconds if self.meta_seconds > 0 else math.nan

    def text(self) -> str:
        return (
            f"{self.architectures} architectures: meta device {self.meta_seconds:.2f} s, random initialisation "
            f"{self.random_seconds:.2f} s, ratio {self.ratio:.1f}× (one run)"
        )


def construction_benchmark(archs: Sequence[Architecture]) -> ConstructionBenchmark:
    """Time :func:`build_structural` and the library's random-initialised CPU construction of each architecture
    (one run each, this process); architectures whose build fails either way are left out."""
    meta = rand = 0.0
    done = 0
    for a in archs:
        try:
            start = time.perf_counter()
            build_structural(a)
            mid = time.perf_counter()
            model = _builder(a, pretrained=False)()
            end = time.perf_counter()
        except Exception:
            continue
        del model
        meta, rand, done = meta + mid - start, rand + end - mid, done + 1
    return ConstructionBenchmark(done, meta, rand)


def rows_by_label(rows: Sequence[AtlasRow]) -> dict[str, AtlasRow]:
    """``{"library:name": row}``."""
    return {r.label: r for r in rows}


def family_table(rows: Sequence[AtlasRow], years: FamilyYears, min_count: int = 1) -> list[dict[str, Any]]:
    """Per family: library, year (None when unknown), architectures, and the shares by both rules."""
    libs = {r.family: r.library for r in rows}
    return [
        {
            "family": d["group"],
            "library": libs[d["group"]],
            "year": years.year(d["group"]),
            "architectures": d["count"],
            "patch rule": round(d["patch_share"], 3),
            "operator rule": round(d["operator_share"], 3),
        }
        for d in share_by(rows, lambda r: r.family, min_count)
    ]


def build_devices(rows: Sequence[AtlasRow]) -> dict[str, int]:
    """How many architectures were built each way (:data:`BUILD_DEVICES`)."""
    return dict(Counter(r.build_device for r in rows if r.ok))


def missing_rows(archs: Sequence[Architecture], rows: Sequence[AtlasRow]) -> list[str]:
    """Labels of the architectures asked for that have no row, or whose row has neither numbers nor a reason
    (dropped or half-filled); empty when every architecture is accounted for."""
    have = {r.label: r for r in rows}
    out = []
    for a in archs:
        r = have.get(a.label)
        if r is None or (r.ok and r.n is None) or (not r.ok and not r.error.strip()):
            out.append(a.label)
    return out
