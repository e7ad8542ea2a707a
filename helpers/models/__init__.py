"""Models: the registry (torchvision, timm, smp, the book's own), MNIST training, forward-pass utilities."""
