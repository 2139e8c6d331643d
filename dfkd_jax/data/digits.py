"""scikit-learn's handwritten digits as RGB images: data that ships inside an installed package.

1797 greyscale 8×8 digits (values 0..16, 10 classes) become uint8 RGB images, upsampled by pixel repetition and
split into train/test deterministically and stratified by class. They let the project make its own teacher on a
machine with no files at hand.
"""

from __future__ import annotations

import functools

import numpy as np

from dfkd_jax.data.sources import ArraySource

DIGITS_SIZE = 8  # the native resolution of sklearn's digits
DIGITS_MAX = 16  # their largest pixel value


@functools.cache
def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images (1797, 8, 8) float64 in 0..16, labels (1797,) int32); cached: importing sklearn takes a second."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images, digits.target.astype(np.int32)


def to_rgb_uint8(images_bhw: np.ndarray, image_size: int) -> np.ndarray:
    """0..16 greys (B, 8, 8) -> uint8 RGB (B, size, size, 3), each pixel repeated into a size/8 square."""
    if image_size < DIGITS_SIZE or image_size % DIGITS_SIZE:
        raise ValueError(f"image_size must be a positive multiple of {DIGITS_SIZE} (the digits are 8×8 and are "
                         f"upsampled by pixel repetition), got {image_size}; try 16 or 32.")
    scale = image_size // DIGITS_SIZE
    grey = np.round(images_bhw * (255.0 / DIGITS_MAX)).astype(np.uint8)
    grey = grey.repeat(scale, axis=1).repeat(scale, axis=2)
    return np.repeat(grey[..., None], 3, axis=-1)


def split_indices(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and test indices, stratified by class; the same for the same seed."""
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction}")
    train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=test_fraction, stratify=labels,
                                           random_state=seed)
    return np.sort(train_idx), np.sort(test_idx)


def load_digits_split(image_size: int = 16, test_fraction: float = 0.25, seed: int = 0
                      ) -> tuple[ArraySource, ArraySource]:
    """(train, test) sources of uint8 RGB digits, `image_size`×`image_size`, labels int32."""
    images_bhw, labels = _raw_digits()
    images = to_rgb_uint8(images_bhw, image_size)
    train_idx, test_idx = split_indices(labels, test_fraction, seed)

    def source(indices: np.ndarray, split: str) -> ArraySource:
        return ArraySource(images[indices], labels[indices],
                           f"sklearn digits {split} ({len(indices)} images, {image_size}x{image_size})")

    return source(train_idx, "train"), source(test_idx, "test")


def training_mean_std() -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Per-channel mean and std of the default training split on the [0, 1] scale (equal: the digits are grey).

    Pixel repetition leaves both unchanged, so they hold for every image_size.
    """
    train, _ = load_digits_split(image_size=DIGITS_SIZE)
    pixels = train.images.reshape(-1, 3).astype(np.float64) / 255.0
    mean, std = pixels.mean(axis=0), pixels.std(axis=0)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


DIGITS_MEAN, DIGITS_STD = training_mean_std()
