"""Data sources: Fashion-MNIST images and labels."""
from .fashion_mnist import CLASSES, DEFAULT_DIR, load_fashion_mnist

__all__ = ["CLASSES", "DEFAULT_DIR", "load_fashion_mnist"]
