"""Block discovery: layer distances (cosine/mse/cka and the functional swap distance) and max-cut segmentation."""

from raptor.discovery.distances import layer_distances, load_distances, swap_distances
from raptor.discovery.plot import plot_distances
from raptor.discovery.segment import (
    RandomBaseline,
    Segmentation,
    bisection,
    objective,
    random_baseline,
    segment,
)

__all__ = [
    "RandomBaseline",
    "Segmentation",
    "bisection",
    "layer_distances",
    "load_distances",
    "objective",
    "plot_distances",
    "random_baseline",
    "segment",
    "swap_distances",
]
