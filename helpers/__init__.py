"""collisions-book helpers: all the logic the book's chapters call (one module per concept).

| module | holds |
|---|---|
| runtime | device, seeding, network detection, output/cache folders |
| models | the model registry and ``load`` with the offline fallback |
| data | MNIST, sample images, ImageNet preprocessing |
| mnist_models, train | the small MNIST models the book trains, cached by configuration |
| chapter, results, plotting, paper | chapter setup, claims/results/scoreboard, figures, the papers' numbers |
| book | the build (papermill, cache, scoreboard, Jupyter Book) |
| audit, nullspace, attacks, explain, similarity, polytope, gauge | the experiments (see the chapters) |
"""

__version__ = "0.1.0"
