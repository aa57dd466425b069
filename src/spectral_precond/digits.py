"""Handwritten digits with a class-keyed spurious feature, for the OOD chapter.

The paper's second experiment adds to every image a fixed noise pattern chosen by a
class (one pattern per class, drawn once), so that a network can predict the label
from the digit (a high-variance feature) or from the pattern (a low-variance one).
Training and in-distribution validation use the pattern of the true label; two test
sets break one of the two cues:

- ``"invariant digit"`` (the paper's Case High test): true label, pattern of another
  class (a fixed derangement), so only the digit predicts the label;
- ``"invariant noise"`` (Case Low): labels drawn at random and independently of the
  image, pattern of that random label, so only the pattern predicts the label.

The authors' code replaces *every* test label by a random one in both tests, which
leaves its invariant-digit test without a label that the digit predicts. That
variant is built too, as ``"authors' invariant digit"``, to show what it measures.

Images come from scikit-learn's bundled 8x8 digits (1,797 images, no download) or,
optionally, from the MNIST files in the standard IDX format (read by :func:`read_idx`;
:func:`download_mnist` fetches them and is only ever called explicitly).
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ._checks import finite_real, positive_int
from .seeding import generator

N_CLASSES = 10

#: Names of the evaluation sets built by :func:`make_ood_digits`, in display order.
TEST_SETS = ("in-distribution", "invariant digit", "invariant noise", "authors' invariant digit")

_IDX_DTYPES = {
    0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8"),
}
_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled 8x8 digits, pixels scaled from 0..16 to [0, 1].

    Returns ``images: (1797, 64)`` float64 and ``labels: (1797,)`` int64.
    """
    from sklearn.datasets import load_digits as _load

    bunch = _load()
    images = torch.tensor(bunch.data, dtype=torch.float64) / 16.0
    return images, torch.tensor(bunch.target, dtype=torch.int64)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one file in the IDX format of MNIST (gzip-compressed or raw).

    The header is two zero bytes, a type code, the number of dimensions and one
    big-endian 32-bit size per dimension; the data follow in row-major order.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file {path} does not exist")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(
            f"{path} is not an IDX file: its first bytes {raw[:4].hex()} should be 0000, "
            f"a type code in {sorted(hex(k) for k in _IDX_DTYPES)} and a dimension count"
        )
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(s) for s in np.frombuffer(raw[4:header], dtype=">u4"))
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: header announces shape {shape} ({expected} bytes of data) but the "
            f"file holds {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"neither {stem} nor {stem}.gz found in {folder}")


def load_mnist(folder: str | os.PathLike, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST images and labels from the standard IDX files in ``folder``.

    ``split`` is ``"train"`` (``train-images-idx3-ubyte`` and labels) or ``"test"``
    (``t10k-...``); each file may be gzip-compressed (``.gz``). Returns
    ``images: (n, 784)`` float64 in [0, 1] and ``labels: (n,)`` int64.
    """
    if split not in _MNIST_FILES:
        raise ValueError(f"split must be one of {sorted(_MNIST_FILES)}, got {split!r}")
    folder = Path(folder)
    image_stem, label_stem = _MNIST_FILES[split]
    images = read_idx(_find(folder, image_stem))
    labels = read_idx(_find(folder, label_stem))
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"MNIST files in {folder} disagree: images {images.shape}, labels {labels.shape}"
        )
    X = torch.tensor(images.reshape(images.shape[0], -1), dtype=torch.float64) / 255.0
    return X, torch.tensor(labels, dtype=torch.int64)


def download_mnist(folder: str | os.PathLike, base_url: str) -> Path:
    """Fetch the four gzip IDX files of MNIST from ``base_url`` into ``folder``.

    For readers online (Colab). Nothing in the book or the tests calls it; files
    already present are kept.
    """
    from urllib.request import urlretrieve

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for stems in _MNIST_FILES.values():
        for stem in stems:
            target = folder / f"{stem}.gz"
            if not target.exists():
                urlretrieve(f"{base_url.rstrip('/')}/{stem}.gz", target)
    return folder


def noise_patterns(dim: int, seed: int, std: float = 0.1, n_classes: int = N_CLASSES) -> torch.Tensor:
    """One fixed Gaussian pattern per class, ``(n_classes, dim)``, pixel std ``std``."""
    positive_int("dim", dim)
    positive_int("n_classes", n_classes, minimum=2)
    std = finite_real("std", std)
    if std < 0:
        raise ValueError(f"std must be >= 0, got {std}")
    gen = generator(seed, "noise-patterns")
    return std * torch.randn(n_classes, dim, generator=gen, dtype=torch.float64)


def add_pattern(images: torch.Tensor, keys: torch.Tensor, patterns: torch.Tensor) -> torch.Tensor:
    """``clamp(image + patterns[key], 0, 1)`` for every row of ``images: (n, dim)``."""
    return (images + patterns[keys]).clamp(0.0, 1.0)


def swap_pairs(labels: torch.Tensor) -> torch.Tensor:
    """The fixed derangement 0<->1, 2<->3, ..., 8<->9 (no class maps to itself)."""
    return labels ^ 1


@dataclass
class OODDigits:
    """One seeded draw of the shifted-digits experiment.

    ``X_*: (n, dim)`` float64 in [0, 1], ``y_*: (n,)`` int64. ``tests`` maps each name
    of :data:`TEST_SETS` to ``(X, y)`` built from the held-out images; the
    ``"in-distribution"`` test uses the training rule on those images.
    ``patterns: (10, dim)`` holds the class noise patterns; ``info`` the sizes and
    the rows of the source images used by each part (``info["indices"]``).
    """

    X_train: torch.Tensor
    y_train: torch.Tensor
    X_val: torch.Tensor
    y_val: torch.Tensor
    tests: dict[str, tuple[torch.Tensor, torch.Tensor]]
    patterns: torch.Tensor
    seed: int
    info: dict = field(default_factory=dict)


def make_ood_digits(
    images: torch.Tensor,
    labels: torch.Tensor,
    n_train: int,
    n_val: int,
    seed: int,
    noise_std: float = 0.1,
    n_test: int | None = None,
) -> OODDigits:
    """Split ``images: (n, dim)`` in [0, 1] into train / validation / test and add
    the class patterns by the rules of the module docstring.

    The split, the patterns and the random test labels all come from ``seed``.
    ``n_test`` images (all that remain by default) form every test set, so the
    tests differ only in labels and patterns, never in the digits shown.
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 2:
        raise ValueError(f"images must be a 2-D tensor (n, dim), got {getattr(images, 'shape', images)!r}")
    if not isinstance(labels, torch.Tensor) or labels.shape != images.shape[:1]:
        raise ValueError(f"labels must be a tensor of shape ({images.shape[0]},), got {getattr(labels, 'shape', labels)!r}")
    if labels.min() < 0 or labels.max() >= N_CLASSES:
        raise ValueError(f"labels must lie in 0..{N_CLASSES - 1}, got {labels.min()}..{labels.max()}")
    if images.min() < 0 or images.max() > 1:
        raise ValueError(f"images must be scaled to [0, 1], got [{images.min():.3g}, {images.max():.3g}]")
    positive_int("n_train", n_train)
    positive_int("n_val", n_val)
    n = images.shape[0]
    rest = n - n_train - n_val
    n_test = rest if n_test is None else positive_int("n_test", n_test)
    if n_test < 1 or n_test > rest:
        raise ValueError(
            f"n_train={n_train} + n_val={n_val} leave {rest} of {n} images for testing; "
            f"n_test must be between 1 and {rest}, got {n_test}"
        )
    images = images.to(torch.float64)
    order = torch.randperm(n, generator=generator(seed, "digits-split"))
    tr, va = order[:n_train], order[n_train : n_train + n_val]
    te = order[n_train + n_val : n_train + n_val + n_test]
    patterns = noise_patterns(images.shape[1], seed, noise_std)

    X_te, y_te = images[te], labels[te]
    random_labels = torch.randint(0, N_CLASSES, (n_test,), generator=generator(seed, "test-labels"))
    tests = {
        "in-distribution": (add_pattern(X_te, y_te, patterns), y_te),
        "invariant digit": (add_pattern(X_te, swap_pairs(y_te), patterns), y_te),
        "invariant noise": (add_pattern(X_te, random_labels, patterns), random_labels),
        "authors' invariant digit": (
            add_pattern(X_te, swap_pairs(random_labels), patterns), random_labels),
    }
    return OODDigits(
        X_train=add_pattern(images[tr], labels[tr], patterns), y_train=labels[tr],
        X_val=add_pattern(images[va], labels[va], patterns), y_val=labels[va],
        tests=tests, patterns=patterns, seed=seed,
        info={"n_train": n_train, "n_val": n_val, "n_test": n_test, "noise_std": noise_std,
              "indices": {"train": tr, "val": va, "test": te}},
    )
