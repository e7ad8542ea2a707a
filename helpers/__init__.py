"""collisions-book helpers: all the logic the book's chapters call, one home per concept.

Five subpackages in layers; a module imports only from its own layer or the layers listed before it (the
book's display modules ``page``, ``plotting`` and ``results`` sit below the experiments, which show tables,
figures and claims through them; ``chapter``, ``pipeline`` and ``reader`` sit on top of everything):

* ``helpers.runtime``, ``helpers.progress``: where the book runs (device, seeds, folders), progress bars;
* ``helpers.linalg``: the rank rule, kernel bases of a first layer, a convolution as an operator;
* ``helpers.data``: natural sample images, MNIST, pixel <-> model-input normalisation, the papers' numbers;
* ``helpers.models``: the model registry, the MNIST models and their training, forward-pass utilities;
* ``helpers.experiments``: one module per result (audit, Table 1, collisions, attacks, polytopes, gauge, ...);
* ``helpers.book``: a chapter's setup and page, figures, claims and results, building and reading the book;

and ``helpers.cli`` (``python -m helpers``), the only module that knows argparse. CONTRIBUTING.md has the map.
"""

__version__ = "0.1.0"
