"""Data: natural sample images, MNIST, pixel <-> model-input normalisation, and the papers' numbers."""
