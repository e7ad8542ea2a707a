"""What every chapter does first: resolve its parameters, load models with the banner, collect claims.

ch = chapter.setup("fig1_resnet50", device=device, weights=weights, quick=quick, seed=seed)
resnet = ch.load("resnet50")        # banner shown if the weights are random
ch.figure(fig, "fig1_tiled", "caption")  # shown on the page with its caption, saved to figures/
ch.claim("fig1.same_top5", "same top-5", verdict.every("same top-5").trained(), paper="same", ours=rate)
checks = results.Checks()
checks.require(residual < 1e-6, "residual below 1e-6", residual)
checks.finish()                     # shows the checks; raises if one fails
ch.save()                           # results/fig1_resnet50.json

Under the build (``python -m helpers.book``) results and figures go to a pending folder and are kept only when
the notebook ran to the end with every check passed; finishing the checks before saving keeps a failed chapter's
results out of ``results/`` when it runs by hand (Jupyter, Colab) too.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field
from typing import Any

import matplotlib.pyplot as plt
import torch

from helpers import runtime
from helpers.book import page, plotting, results
from helpers.book.verdict import Budget, Criterion
from helpers.models import registry


@dataclass
class Chapter:
    """A chapter's resolved parameters, loaded models and recorded claims."""

    name: str
    device: torch.device
    weights: str
    quick: bool
    seed: int
    loaded: dict[str, registry.LoadedModel] = field(default_factory=dict)
    claims: list[results.Claim] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)
    random_models: dict[str, registry.LoadedModel] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    def load(self, model_name: str, weights: str | None = None) -> registry.LoadedModel:
        """Load a registry model with the chapter's weights policy.

        A model that runs with random weights joins the chapter's one random-weights banner (shown where the
        first such model is loaded, and updated in place with every later one).
        """
        loaded = registry.load(model_name, weights or self.weights, self.device, seed=self.seed)  # type: ignore[arg-type]
        self.loaded[model_name] = loaded
        if not loaded.is_pretrained:
            self.random_models[model_name] = loaded
            page.show_html(
                results.banner_html(self.random_models.values()),
                f"RANDOM weights: {model_name} ({loaded.detail})",
                display_id=f"{self.name}-random-weights-{id(self)}",
            )
        return loaded

    @property
    def all_pretrained(self) -> bool:
        return all(m.is_pretrained for m in self.loaded.values())

    def weights_label(self, *names: str) -> str:
        """'pretrained' / 'random' for the named models (all loaded ones if none named)."""
        chosen = [self.loaded[n] for n in names] if names else list(self.loaded.values())
        kinds = sorted({m.weights for m in chosen})
        return "/".join(kinds) if kinds else "n/a"

    def claim(
        self,
        id: str,
        description: str,
        criterion: Criterion,
        *,
        paper: Any,
        ours: Any,
        measured: Any = results.SAME_AS_OURS,
        models: tuple[str, ...] = (),
        reason: str = "",
        budget: Budget | None = None,
    ) -> results.Claim:
        """Record a claim judged by ``criterion`` (stated before measuring) on ``measured`` (default ``ours``).

        ``models`` names the loaded models the claim rests on (default: all): their weights label the claim,
        and a criterion that needs trained weights is not checkable unless all of them are pretrained.
        """
        chosen = [self.loaded[n] for n in models] if models else list(self.loaded.values())
        c = results.judge(
            id,
            description,
            criterion,
            paper=paper,
            ours=ours,
            measured=measured,
            trained=all(m.is_pretrained for m in chosen),
            weights=self.weights_label(*models),
            reason=reason,
            budget=budget,
        )
        self.claims.append(c)
        return c

    def figure(self, fig: plt.Figure, name: str, caption: str) -> None:
        """Show ``fig`` on the page as "Figure k." with ``caption`` under it; save it as ``figures/<name>.png``."""
        self.figures.append(name)
        plotting.show_figure(fig, name, f"Figure {len(self.figures)}. {caption}")

    def save(self, extra: dict[str, Any] | None = None) -> None:
        """Write ``results/<name>.json``: the claims, the figures shown, ``extra`` (plus the models and seconds).

        Call it after ``checks.finish()``. Under the build this is a pending file, kept only if every check passed.
        Returns nothing, so that a chapter's last line echoes no path onto the page.
        """
        extra = dict(extra or {})
        extra.setdefault("models", {n: {"weights": m.weights, "detail": m.detail} for n, m in self.loaded.items()})
        extra.setdefault("seconds", round(time.perf_counter() - self.started, 2))
        results.save(
            self.name, self.claims, quick=self.quick, device=str(self.device), extra=extra, figures=self.figures
        )


def setup(name: str, *, device: str = "auto", weights: str = "auto", quick: bool = False, seed: int = 0) -> Chapter:
    """Resolve the papermill parameters, seed everything, set the figure style, print the environment."""
    if weights not in registry.WEIGHT_CHOICES:
        raise ValueError(f"unknown weights {weights!r}; valid: {', '.join(registry.WEIGHT_CHOICES)}")
    resolved = runtime.resolve_device(device)
    runtime.seed_everything(seed)
    runtime.ensure_hub_mode()
    plotting.use_book_style()
    gpu = f" ({torch.cuda.get_device_name(resolved)})" if resolved.type == "cuda" else ""
    print(
        f"chapter {name}: device={resolved}{gpu}, weights={weights}, quick={quick}, seed={seed}\n"
        f"torch {torch.__version__}, python {platform.python_version()}, "
        f"network {'available' if runtime.network_available() else 'unavailable (offline mode)'}"
    )
    return Chapter(name, resolved, weights, quick, seed)
