"""The embedded teacher: sklearn's digits as RGB images, and a zoo network trained on them supervised."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from sklearn.datasets import load_digits

from dfkd_jax.data.digits import DIGITS_MEAN, DIGITS_STD, load_digits_split, split_indices
from dfkd_jax.data.sources import ArraySource
from dfkd_jax.evaluate import evaluate
from dfkd_jax.models import Network, NetworkSpec
from dfkd_jax.supervised import augment_batch, train_classifier

SPEC = NetworkSpec("resnet20", 10, {"shortcut": "A"}, mean=DIGITS_MEAN, std=DIGITS_STD)
# 2 epochs of 84 steps: 97.1% held-out on 8 fake devices; 35-55 s on 2 shared CPU cores, a third of it creating
# the network (eager threefry compiles) and compiling the step.
TEACHER_RECIPE = dict(epochs=2, batch_size=16, learning_rate=0.05, flip=False)


@pytest.fixture(scope="module")
def digits():
    return load_digits_split(image_size=16)


def test_split_is_deterministic_stratified_and_disjoint(digits):
    train, test = digits
    again_train, again_test = load_digits_split(image_size=16)
    for first, second in ((train, again_train), (test, again_test)):
        np.testing.assert_array_equal(first.images, second.images)
        np.testing.assert_array_equal(first.labels, second.labels)

    assert train.images.shape == (1347, 16, 16, 3) and test.images.shape == (450, 16, 16, 3)
    assert train.images.dtype == test.images.dtype == np.uint8
    assert train.labels.dtype == test.labels.dtype == np.int32
    assert train.images.min() == 0 and train.images.max() == 255
    assert train.description == "sklearn digits train (1347 images, 16x16)"

    labels = load_digits().target
    train_idx, test_idx = split_indices(labels, 0.25, seed=0)
    assert not set(train_idx) & set(test_idx) and len(train_idx) + len(test_idx) == len(labels)
    # Stratified: every class holds a quarter of its images out, to within one image.
    per_class_test = np.bincount(test.labels, minlength=10)
    np.testing.assert_allclose(per_class_test, 0.25 * np.bincount(labels), atol=1)
    assert not np.array_equal(split_indices(labels, 0.25, seed=1)[1], test_idx)


def test_upsampling_repeats_each_pixel_into_a_square(digits):
    train, _ = digits
    original = load_digits().images[split_indices(load_digits().target, 0.25, seed=0)[0][0]]  # 8×8, 0..16
    image = train.images[0]
    for row in range(16):
        for col in range(16):
            expected = round(original[row // 2, col // 2] * 255 / 16)
            assert list(image[row, col]) == [expected] * 3, (row, col)
    assert load_digits_split(image_size=8)[0].images.shape == (1347, 8, 8, 3)
    with pytest.raises(ValueError, match="multiple of 8"):
        load_digits_split(image_size=12)


def test_normalisation_is_the_training_images_statistics(digits):
    pixels = digits[0].images.astype(np.float64) / 255.0
    assert DIGITS_MEAN == pytest.approx((pixels.mean(),) * 3) and DIGITS_STD == pytest.approx((pixels.std(),) * 3)


def test_crop_without_flip_never_mirrors():
    images = np.random.default_rng(0).random((16, 8, 8, 3), dtype=np.float32)
    augment = jax.jit(augment_batch, static_argnames=("padding", "flip"))  # one compile each, not one per op
    np.testing.assert_array_equal(augment(images, jax.random.key(1), padding=0, flip=False), images)
    assert not np.array_equal(augment(images, jax.random.key(1), padding=0, flip=True), images)


def test_teacher_learns_the_digits(digits):
    train, test = digits
    variables = train_classifier(SPEC, train, seed=0, progress=False, **TEACHER_RECIPE)
    network, _ = Network.abstract(SPEC)
    result = evaluate(network, variables, test, progress=False)
    assert result["n"] == 450
    assert result["top1"] >= 90.0, f"teacher reached only {result['top1']:.2f}% on held-out digits"


def test_training_is_deterministic(digits):
    train, _ = digits
    subset = ArraySource(train.images[:128], train.labels[:128], "first 128 training digits")
    runs = [train_classifier(SPEC, subset, epochs=1, batch_size=16, flip=False, seed=3, progress=False)
            for _ in range(2)]
    for first, second in zip(jax.tree.leaves(runs[0]), jax.tree.leaves(runs[1]), strict=True):
        np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize("change, message", [
    (dict(epochs=0), "epochs must be at least 1"),
    (dict(batch_size=2000), "batch_size 2000 must lie between 1 and the 1347 images"),
    (dict(batch_size=1347), r"rounded up to 1352"),  # 8 devices
    (dict(num_classes=5), "has labels in \\[0, 9\\] but resnet20 has 5 classes"),
])
def test_bad_inputs_are_named(digits, change, message):
    spec = NetworkSpec("resnet20", change.get("num_classes", 10), {"shortcut": "A"})
    arguments = {name: value for name, value in (dict(epochs=1, batch_size=16) | change).items()
                 if name != "num_classes"}
    with pytest.raises(ValueError, match=message):
        train_classifier(spec, digits[0], progress=False, **arguments)
