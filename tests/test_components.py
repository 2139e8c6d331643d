"""The small building blocks of the DFKD methods, each against an independent reference.

- augment: crop+flip against a NumPy loop, DeepInversion's jitter+flip against `torch.roll`/`torch.flip`;
- pool: ring-buffer bookkeeping by hand, uint8 storage against upstream's `(x.clamp(0, 1) * 255).astype('uint8')`;
- distill: the learning-rate schedules against PyTorch's schedulers, the optimizer against `torch.optim.SGD`;
- generators: converted PyTorch generators (written as CMI / NAYER write them) give the same images and running
  statistics; the noisy-layer re-initialisation and `init` are pure and keyed;
- methods.base: NAYER's class-balanced targets and the label embedding.
Every sharded case runs on the 8 fake CPU devices of conftest.py.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import torch
from flax import nnx

from dfkd_jax import augment, convert, parallel, pool
from dfkd_jax.distill import learning_rate_at_epoch, make_optimizer
from dfkd_jax.methods.base import class_balanced_targets, label_embedding
from dfkd_jax.models.generators import Generator, reinit_noisy_layer

from benchmarks import pairs
from benchmarks import torch_models as torch_reference

torch.set_num_threads(2)


def _images(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(size=shape).astype(np.float32)


def _nchw(x_bhwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.transpose(x_bhwc, (0, 3, 1, 2))))


def _bhwc(x_nchw: torch.Tensor) -> np.ndarray:
    return np.transpose(x_nchw.detach().numpy(), (0, 2, 3, 1))


# ============================================================================================== augment

def crop_flip_reference(images_bhwc: np.ndarray, offsets_b2: np.ndarray, flips_b: np.ndarray, padding: int):
    """torchvision's RandomCrop(padding) + RandomHorizontalFlip, one image at a time, with the draws given."""
    b, h, w, _ = images_bhwc.shape
    padded = np.pad(images_bhwc, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    out = np.empty_like(images_bhwc)
    for i in range(b):
        r, c = offsets_b2[i]
        crop = padded[i, r:r + h, c:c + w]
        out[i] = crop[:, ::-1] if flips_b[i] else crop
    return out


@pytest.mark.parametrize("padding", [4, 2])
def test_crop_flip_matches_a_numpy_crop_of_the_zero_padded_image(padding):
    images = _images((7, 5, 6, 2))  # H != W, so a swapped row/column offset or flip axis shows
    p2 = 2 * padding
    offsets = np.array([[0, 0], [p2, p2], [0, p2], [p2, 0], [1, padding], [padding, padding], [p2 - 1, 1]],
                       np.int32)
    flips = np.array([False, True, True, False, True, False, True])
    out = augment.crop_flip(jnp.asarray(images), augment.CropFlip(jnp.asarray(offsets), jnp.asarray(flips)),
                            padding)
    np.testing.assert_array_equal(np.asarray(out), crop_flip_reference(images, offsets, flips, padding))
    # The centre crop without flip is the identity; the extreme offsets bring in zero padding.
    np.testing.assert_array_equal(np.asarray(out)[5], images[5])
    assert np.all(np.asarray(out)[0, :padding] == 0) and np.all(np.asarray(out)[1, -padding:] == 0)


def test_random_crop_flip_draws_every_offset_in_range_and_both_flips():
    padding = 3
    key = jax.random.key(7)
    params = augment.crop_flip_params(key, 1024, padding)
    offsets, flips = np.asarray(params.offsets_b2), np.asarray(params.flips_b)
    assert offsets.shape == (1024, 2) and offsets.dtype == np.int32
    for axis in range(2):  # every offset from 0 to 2·padding, for rows and for columns, and nothing else
        assert set(offsets[:, axis].tolist()) == set(range(2 * padding + 1))
    assert set(flips.tolist()) == {False, True}
    assert 0.4 < flips.mean() < 0.6
    # random_crop_flip is crop_flip with those draws.
    images = _images((1024, 4, 5, 1), seed=1)
    np.testing.assert_array_equal(np.asarray(augment.random_crop_flip(jnp.asarray(images), key, padding)),
                                  crop_flip_reference(images, offsets, flips, padding))


def torch_jitter_and_flip(x_nchw: torch.Tensor, off1: int, off2: int, flip: bool) -> torch.Tensor:
    """Upstream DeepInversion's jitter_and_flip with its random draws given."""
    inputs_jit = torch.roll(x_nchw, shifts=(off1, off2), dims=(2, 3))
    if flip:
        inputs_jit = torch.flip(inputs_jit, dims=(3,))
    return inputs_jit


@pytest.mark.parametrize("dy, dx, flip", [(2, -3, True), (-4, 4, False), (0, 0, True), (1, 0, False)])
def test_jitter_flip_matches_numpy_roll_and_torch_roll(dy, dx, flip):
    images = _images((3, 6, 7, 2))
    out = np.asarray(augment.jitter_flip(jnp.asarray(images), augment.JitterFlip(jnp.asarray([dy, dx], jnp.int32),
                                                                                 jnp.asarray(flip))))
    expected = np.roll(images, (dy, dx), axis=(1, 2))
    if flip:
        expected = expected[:, :, ::-1]
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(out, _bhwc(torch_jitter_and_flip(_nchw(images), dy, dx, flip)))


def test_jitter_flip_draws_shifts_within_the_limit_and_both_flips():
    keys = jax.random.split(jax.random.key(0), 400)
    params = jax.jit(jax.vmap(lambda k: augment.jitter_flip_params(k, 3)))(keys)
    shifts, flips = np.asarray(params.shift_2), np.asarray(params.flip)
    assert set(shifts[:, 0].tolist()) == set(range(-3, 4)) and set(shifts[:, 1].tolist()) == set(range(-3, 4))
    assert set(flips.tolist()) == {False, True}


def test_augmentations_run_jitted_on_a_batch_sharded_over_eight_devices():
    mesh = parallel.make_data_mesh()
    assert mesh.devices.size == 8
    images = _images((16, 6, 5, 3))
    sharded = jax.device_put(images, parallel.batch_sharded(mesh))
    assert len(sharded.sharding.device_set) == 8

    jitter = augment.JitterFlip(jnp.asarray([-2, 3], jnp.int32), jnp.asarray(True))
    out = jax.jit(augment.jitter_flip)(sharded, jitter)
    np.testing.assert_array_equal(np.asarray(out), np.roll(images, (-2, 3), axis=(1, 2))[:, :, ::-1])

    params = augment.crop_flip_params(jax.random.key(3), 16, 2)
    out = jax.jit(functools.partial(augment.crop_flip, padding=2))(sharded, params)
    np.testing.assert_array_equal(np.asarray(out), crop_flip_reference(images, np.asarray(params.offsets_b2),
                                                                       np.asarray(params.flips_b), 2))


# ================================================================================================= pool

def _constant_batch(values, shape=(2, 2, 1)) -> np.ndarray:
    return np.stack([np.full(shape, v, np.float32) for v in values])


def test_pool_is_a_ring_buffer_that_overwrites_the_oldest_entries_in_order():
    p = pool.create(5, (2, 2, 1), "float32")
    assert int(p["count"]) == 0 and int(p["next"]) == 0 and p["images"].shape == (5, 2, 2, 1)

    def slot_values(p):
        return np.asarray(p["images"])[:, 0, 0, 0].astype(np.float64).round(6).tolist()

    p = pool.add(p, _constant_batch([0.1, 0.2, 0.3]))
    assert (int(p["count"]), int(p["next"])) == (3, 3)
    assert pool.images(p).shape == (3, 2, 2, 1)  # only the filled entries
    np.testing.assert_array_equal(pool.images(p)[:, 0, 0, 0], np.float32([0.1, 0.2, 0.3]))

    p = pool.add(p, _constant_batch([0.4, 0.5]))  # exactly full: next wraps to 0
    assert (int(p["count"]), int(p["next"])) == (5, 0)
    assert slot_values(p) == [0.1, 0.2, 0.3, 0.4, 0.5]

    p = pool.add(p, _constant_batch([0.6, 0.7, 0.8]))  # overwrites the three oldest
    assert (int(p["count"]), int(p["next"])) == (5, 3)  # count saturates at the capacity
    assert slot_values(p) == [0.6, 0.7, 0.8, 0.4, 0.5]

    p = pool.add(p, _constant_batch([0.11, 0.12, 0.13, 0.14, 0.15]))  # a full-capacity batch across the end
    assert (int(p["count"]), int(p["next"])) == (5, 3)
    assert slot_values(p) == [0.13, 0.14, 0.15, 0.11, 0.12]
    assert pool.images(p).shape == (5, 2, 2, 1)


def test_float32_pool_keeps_the_values_it_is_given():
    images = _images((4, 3, 3, 2), seed=5)
    p = pool.add(pool.create(4, (3, 3, 2), "float32"), images)
    assert p["images"].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(p["images"]), images)
    np.testing.assert_array_equal(pool.images(p), images)


def test_uint8_pool_truncates_as_upstream_writes_its_png_files():
    special = np.float32([0.999, 0.5, 1.2, -0.1, 0.0, 1.0, 0.7, 0.2, 1 / 255, 0.99999])
    values = np.concatenate([special, _images((990,), seed=2)]).reshape(250, 2, 2, 1)
    # Upstream (CMI / Fast / NAYER save_image_batch): (imgs.detach().clamp(0, 1).cpu().numpy() * 255).astype('uint8')
    expected = (torch.from_numpy(values).clamp(0, 1).numpy() * 255).astype("uint8")
    np.testing.assert_array_equal(expected.reshape(-1)[:4], [254, 127, 255, 0])  # truncation, not rounding

    p = pool.add(pool.create(250, (2, 2, 1), "uint8"), values)
    assert p["images"].dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(p["images"]), expected)
    loaded = pool.images(p)
    assert loaded.dtype == np.float32
    np.testing.assert_allclose(loaded, expected.astype(np.float32) / 255.0, rtol=1e-7)


def test_sample_draws_only_from_the_filled_entries():
    p = pool.add(pool.create(10, (2, 2, 1), "float32"), _constant_batch([0.25, 0.5, 0.75]))
    drawn = np.asarray(jax.jit(pool.sample, static_argnums=2)(p, jax.random.key(0), 300)["images"])
    assert drawn.shape == (300, 2, 2, 1) and drawn.dtype == np.float32
    per_image = drawn.reshape(300, -1)
    assert np.all(per_image == per_image[:, :1])  # whole images, not mixed pixels
    assert set(per_image[:, 0].tolist()) == {0.25, 0.5, 0.75}  # every filled entry, never an empty (zero) slot


def test_labels_and_groups_travel_with_their_images_through_wrap_around():
    p = pool.create(4, (2, 2, 1), "float32")
    assert np.asarray(p["labels"]).tolist() == [-1] * 4 and np.asarray(p["groups"]).tolist() == [-1] * 4
    p = pool.add(p, _constant_batch([0.1, 0.2, 0.3]), np.int32([1, 2, 3]), np.int32([10, 20, 30]))
    p = pool.add(p, _constant_batch([0.4, 0.5]), np.int32([4, 5]))  # no groups given: -1
    assert np.asarray(p["labels"]).tolist() == [5, 2, 3, 4] and np.asarray(p["groups"]).tolist() == [-1, 20, 30, -1]
    drawn = jax.device_get(pool.sample(p, jax.random.key(1), 200))
    value_of_label = {1: 0.1, 2: 0.2, 3: 0.3, 4: 0.4, 5: 0.5}
    np.testing.assert_allclose(drawn["images"][:, 0, 0, 0], [value_of_label[y] for y in drawn["labels"]], rtol=1e-6)
    assert set(drawn["labels"].tolist()) == {2, 3, 4, 5}  # label 1 was overwritten with its image
    np.testing.assert_array_equal(drawn["labels"], np.asarray(p["labels"])[drawn["indices"]])


def test_label_pair_sampling_gives_every_anchor_a_partner_of_its_label():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 100, 300).astype(np.int32)  # 100 classes, some with one image, some with none
    labels[labels == 42] = 41
    labels[2] = 42  # class 42: one image, so its partner is itself
    labels[200:260] = 7  # class 7: 60+ images, to see the partner distribution within a class
    values = np.arange(300, dtype=np.float32) / 300
    p = pool.add(pool.create(320, (2, 2, 1), "float32"), _constant_batch(values), labels)
    sample = jax.jit(pool.sample_label_pairs, static_argnums=(2, 3))
    drawn = jax.device_get(sample(p, jax.random.key(3), 512, 100))
    pairs = drawn["labels"].reshape(256, 2)
    assert np.all(pairs[:, 0] == pairs[:, 1])  # each anchor's partner has its label
    assert np.all(drawn["indices"] < 300)  # never an empty slot
    np.testing.assert_allclose(drawn["images"][:, 0, 0, 0], values[drawn["indices"]], rtol=1e-6)
    # Partners are uniform within the anchor's class (the anchor itself included): P(partner = anchor) = 1/n_class,
    # and within the 60+ images of class 7 each is drawn about equally often.
    many = jax.device_get(sample(p, jax.random.key(4), 40000, 100))
    anchors, partners = many["indices"].reshape(-1, 2).T
    counts = np.bincount(labels, minlength=100)
    assert np.all(anchors[counts[labels[anchors]] == 1] == partners[counts[labels[anchors]] == 1])
    expected_same = np.mean(1.0 / counts[labels[anchors]])
    assert abs(np.mean(anchors == partners) - expected_same) < 0.01  # binomial σ ≈ 0.002 over 20000 pairs
    in_class_7 = partners[labels[anchors] == 7]
    frequencies = np.bincount(in_class_7, minlength=300)[labels == 7] / len(in_class_7)
    assert frequencies.min() > 0.3 / counts[7] and frequencies.max() < 1.7 / counts[7]
    assert set(np.unique(labels[anchors])) == set(np.flatnonzero(counts))  # anchors reach every class present


def test_shuffled_sampling_draws_each_entry_once_per_pass_like_a_shuffled_data_loader():
    p = pool.add(pool.create(40, (1, 1, 1), "float32"), _constant_batch(np.arange(30) / 30, (1, 1, 1)),
                 np.arange(30, dtype=np.int32))
    draw = jax.jit(pool.sample_shuffled, static_argnums=2)
    passes, key = [], jax.random.key(0)
    for _ in range(3):  # three passes of three batches of 10 over the 30 entries
        seen = []
        for _ in range(3):
            key, step_key = jax.random.split(key)
            drawn, p = draw(p, step_key, 10)
            seen += np.asarray(drawn["labels"]).tolist()
            np.testing.assert_allclose(np.asarray(drawn["images"]).ravel(), np.asarray(drawn["labels"]) / 30,
                                       rtol=1e-6)
        assert sorted(seen) == list(range(30))  # without replacement, every entry once per pass
        passes.append(seen)
    assert passes[0] != passes[1] != passes[2]  # reshuffled for each pass
    # 30 entries in batches of 8: the short last batch (6) is dropped and a new order starts.
    seen = []
    for _ in range(3):
        key, step_key = jax.random.split(key)
        drawn, p = draw(p, step_key, 8)
        seen.append(np.asarray(drawn["labels"]).tolist())
    assert len(set(sum(seen, []))) == 24
    key, step_key = jax.random.split(key)
    _, p = draw(p, step_key, 8)
    assert int(p["cursor"]) == 8  # the 4th batch of 8 started a new pass
    # Adding a batch restarts the order (upstream rebuilds its loader after every round) and covers the new entries.
    p = pool.add(p, _constant_batch([0.99] * 10, (1, 1, 1)), np.full(10, 99, np.int32))
    labels = []
    for _ in range(4):
        key, step_key = jax.random.split(key)
        drawn, p = draw(p, step_key, 10)
        labels += np.asarray(drawn["labels"]).tolist()
    assert sorted(labels) == sorted(list(range(30)) + [99] * 10)
    # A pool smaller than a batch repeats its entries within the batch.
    small = pool.add(pool.create(8, (1, 1, 1), "float32"), _constant_batch([0.1, 0.2, 0.3], (1, 1, 1)),
                     np.int32([1, 2, 3]))
    drawn, _ = draw(small, jax.random.key(1), 6)
    assert sorted(np.asarray(drawn["labels"]).tolist()) == [1, 1, 2, 2, 3, 3]


def test_label_pair_sampling_needs_an_even_batch():
    with pytest.raises(ValueError, match="even batch"):
        pool.sample_label_pairs(pool.create(4, (2, 2, 1)), jax.random.key(0), 5, 10)


def test_pool_sharded_over_eight_devices_gives_the_single_device_results_under_jit():
    mesh = parallel.make_data_mesh()
    p = pool.create(16, (4, 4, 3), "uint8")
    shardings = parallel.state_shardings(p, mesh, ("images", "labels", "groups"))
    sharded = jax.device_put(p, shardings)
    assert len(sharded["images"].addressable_shards) == 8
    assert sharded["images"].addressable_shards[0].data.shape == (2, 4, 4, 3)  # split on capacity, not copied
    assert sharded["labels"].addressable_shards[0].data.shape == (2,)
    assert sharded["count"].sharding.is_fully_replicated

    add = jax.jit(pool.add, out_shardings=shardings)
    sample = jax.jit(pool.sample, static_argnums=2)
    batches = [_images((6, 4, 4, 3), seed=s) for s in range(4)]  # 24 images: wraps around the 16 slots
    for batch in batches:
        sharded = add(sharded, jax.device_put(batch, parallel.replicated(mesh)))
        p = pool.add(p, batch)
    assert (int(sharded["count"]), int(sharded["next"])) == (16, 8)
    np.testing.assert_array_equal(np.asarray(sharded["images"]), np.asarray(p["images"]))
    newest = (np.clip(batches[3], 0, 1) * 255).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(sharded["images"])[2:8], newest)  # slots 18..23 mod 16
    key = jax.random.key(4)
    np.testing.assert_array_equal(np.asarray(sample(sharded, key, 32)["images"]),
                                  np.asarray(pool.sample(p, key, 32)["images"]))


@pytest.mark.parametrize("make, message", [
    (lambda: pool.create(0, (2, 2, 1)), "capacity must be positive"),
    (lambda: pool.create(4, (2, 2, 1), "float16"), "dtype must be one of"),
    (lambda: pool.add(pool.create(4, (2, 2, 1)), np.zeros((5, 2, 2, 1), np.float32)), "does not fit"),
])
def test_pool_refuses_bad_arguments(make, message):
    with pytest.raises(ValueError, match=message):
        make()


# ============================================================================================== distill

def _student(**overrides) -> ml_collections.ConfigDict:
    config = dict(lr=0.2, eta_min=2e-4, schedule="cosine", milestones=(0.6, 0.75, 0.9), momentum=0.9,
                  weight_decay=1e-4)
    return ml_collections.ConfigDict(config | overrides)


def _torch_lrs(make_scheduler, lr: float, epochs: int) -> list[float]:
    """The learning rate in use during each epoch, the scheduler stepped once per epoch."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = make_scheduler(optimizer)
    rates = []
    for _ in range(epochs):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def _our_lrs(student, epochs: int) -> list[float]:
    at = jax.jit(lambda e: learning_rate_at_epoch(student, e, epochs))  # traced epoch, as in the optimizer
    eager = [float(learning_rate_at_epoch(student, e, epochs)) for e in range(epochs)]
    traced = [float(at(e)) for e in range(epochs)]
    np.testing.assert_allclose(traced, eager, rtol=1e-6)
    return eager


def test_cosine_schedule_matches_torch_cosine_annealing():
    student = _student(schedule="cosine", lr=0.2, eta_min=2e-4)
    expected = _torch_lrs(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=7, eta_min=2e-4), 0.2, 7)
    np.testing.assert_allclose(_our_lrs(student, 7), expected, rtol=1e-6)
    assert expected[0] == 0.2 and expected[-1] < 0.02  # the comparison spans the whole curve


def test_multistep_schedule_matches_torch_multistep_at_fractions_of_training():
    student = _student(schedule="multistep", lr=0.1, milestones=(0.6, 0.75, 0.9))
    expected = _torch_lrs(lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones=[12, 15, 18], gamma=0.1),
                          0.1, 20)
    np.testing.assert_allclose(_our_lrs(student, 20), expected, rtol=1e-6)
    assert expected[11] == 0.1 and expected[12] < 0.011 and expected[19] < 1.1e-4


def test_warmup_cosine_schedule_is_cpsc_linear_ramp_then_cosine():
    # CPSC-DFKD (methods.md §5): lr·e/W in epochs e = 1..W, then cosine from lr to eta_min over the rest. Worked
    # out by hand for lr 0.1, W = 3, 7 epochs, eta_min 0: 0.1/3, 0.2/3, 0.1, then 0.05·(1 + cos(πk/4)), k = 0..3.
    expected = [0.1 / 3, 0.2 / 3, 0.1] + [0.05 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    student = _student(schedule="warmup_cosine", lr=0.1, eta_min=0.0, warmup_epochs=3)
    np.testing.assert_allclose(_our_lrs(student, 7), expected, rtol=1e-6)


def test_constant_schedule_and_unknown_schedule():
    assert _our_lrs(_student(schedule="constant", lr=0.05), 4) == pytest.approx([0.05] * 4, rel=1e-7)
    with pytest.raises(ValueError, match="schedule must be one of cosine, warmup_cosine, cpsc_upstream, multistep, constant, "
                                         "got 'linear'"):
        learning_rate_at_epoch(_student(schedule="linear"), 0, 10)


def test_optimizer_matches_torch_sgd_with_weight_decay_momentum_and_an_epoch_boundary():
    rng = np.random.default_rng(0)
    params = {"w": rng.normal(size=(3, 2)).astype(np.float32), "b": rng.normal(size=(2,)).astype(np.float32)}
    grads = {"w": rng.normal(size=(3, 2)).astype(np.float32), "b": rng.normal(size=(2,)).astype(np.float32)}
    student = _student(schedule="cosine", lr=0.2, eta_min=0.02, momentum=0.9, weight_decay=0.05)
    optimizer, schedule = make_optimizer(student, kd_steps_per_epoch=2, distill_epochs=3)

    # PyTorch, as upstream: SGD(lr, momentum=0.9, weight_decay=wd), the scheduler stepped after each epoch.
    torch_params = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in params.items()}
    torch_opt = torch.optim.SGD(list(torch_params.values()), lr=0.2, momentum=0.9, weight_decay=0.05)
    torch_sched = torch.optim.lr_scheduler.CosineAnnealingLR(torch_opt, T_max=3, eta_min=0.02)

    jax_params = jax.tree_util.tree_map(jnp.asarray, params)
    opt_state = optimizer.init(jax_params)
    update = jax.jit(optimizer.update)
    rates = []
    for step in range(3):
        rates.append(torch_opt.param_groups[0]["lr"])
        np.testing.assert_allclose(float(schedule(step)), rates[-1], rtol=1e-6)
        for k, p in torch_params.items():
            p.grad = torch.from_numpy(grads[k].copy())
        torch_opt.step()
        if (step + 1) % 2 == 0:
            torch_sched.step()
        updates, opt_state = update(grads, opt_state, jax_params)
        jax_params = optax.apply_updates(jax_params, updates)
        for k, p in torch_params.items():
            np.testing.assert_allclose(np.asarray(jax_params[k]), p.detach().numpy(), rtol=1e-6, atol=1e-6,
                                       err_msg=f"{k} after step {step}")
    assert rates[0] == rates[1] == 0.2 and rates[2] < 0.2  # the third step uses epoch 1's rate


# =========================================================================================== generators

def _randomise_batchnorm(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    return torch_reference.randomise_batchnorm(model, torch.Generator().manual_seed(seed))


def _assert_trees_close(actual, expected, atol, what):
    actual, expected = nnx.to_pure_dict(actual), nnx.to_pure_dict(expected)
    assert jax.tree_util.tree_structure(actual) == jax.tree_util.tree_structure(expected), what
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=atol,
                                   err_msg=f"{what} {jax.tree_util.keystr(path)}")


def _check_parity(torch_model, run_torch, generator, abstract, inputs, what):
    """Eval mode (running statistics), then train mode (batch statistics and the running-statistics update)."""
    variables = convert.state_dict_to_variables(pairs.state_dict_numpy(torch_model), abstract, f"the {what} generator")
    apply = jax.jit(generator.apply, static_argnames="train")

    torch_model.eval()
    with torch.no_grad():
        expected = _bhwc(run_torch())
    images, batch_stats = apply(variables, inputs, train=False)
    assert images.shape == expected.shape
    np.testing.assert_allclose(np.asarray(images), expected, rtol=1e-5, atol=1e-5, err_msg=f"{what} eval")
    _assert_trees_close(batch_stats, variables["batch_stats"], 0, f"{what} eval leaves running stats")

    torch_model.train()
    with torch.no_grad():
        expected = _bhwc(run_torch())
    images, batch_stats = apply(variables, inputs, train=True)
    np.testing.assert_allclose(np.asarray(images), expected, rtol=1e-5, atol=1e-5, err_msg=f"{what} train")
    updated = convert.state_dict_to_variables(pairs.state_dict_numpy(torch_model), abstract, what)
    _assert_trees_close(batch_stats, updated["batch_stats"], 1e-6, f"{what} running stats after one train step")
    # The update is not a no-op: the check above would catch a missing one.
    assert not np.allclose(np.asarray(batch_stats["conv_blocks"][0]["var"].get_value()),
                           np.asarray(variables["batch_stats"]["conv_blocks"][0]["var"].get_value()))


# Building a generator costs seconds of eager dispatch and compiling its initialisers (each random draw is its own
# XLA program on CPU), so each kind is built once and shared by the tests below.
DCGAN = dict(nz=16, ngf=8, image_size=12, channels=3)  # init_size 3: a (C, H, W) vs (H, W, C) reshape would show
NAYER = dict(embedding_size=64, batch_size=25, chunk=10, noisy_size=512, ngf=8, image_size=8, channels=3)


@functools.cache
def _generator(kind: str):
    return Generator.create(kind, 0, **(DCGAN if kind == "dcgan" else NAYER))


def test_dcgan_generator_matches_the_upstream_pytorch_generator():
    torch.manual_seed(0)
    model = _randomise_batchnorm(torch_reference.Generator(nz=DCGAN["nz"], ngf=DCGAN["ngf"],
                                                           img_size=DCGAN["image_size"], nc=3), 1)
    generator, abstract = _generator("dcgan")
    z = np.random.default_rng(0).normal(size=(6, DCGAN["nz"])).astype(np.float32)
    _check_parity(model, lambda: model(torch.from_numpy(z)), generator, abstract, z, "dcgan")


def nayer_targets(batch: int, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """NAYER's generate_ys: the random remainder first, then each full round of classes prepended."""
    s, v = batch // num_classes, batch % num_classes
    target = torch.randint(num_classes, (v,), generator=generator)
    for _ in range(s):
        target = torch.cat((torch.tensor(range(0, num_classes)), target))
    return target


def test_nayer_generator_matches_the_upstream_pytorch_nlgenerator_with_a_short_last_chunk():
    torch.manual_seed(0)
    classes, batch = NAYER["chunk"], NAYER["batch_size"]  # 3 noisy chunks of 10, 10 and 5 samples
    label_emb = torch.randn(classes, NAYER["embedding_size"])
    model = torch_reference.NLGenerator(ngf=NAYER["ngf"], img_size=NAYER["image_size"], nc=3, nl=classes,
                                        label_emb=label_emb, le_emb_size=NAYER["noisy_size"],
                                        le_size=NAYER["embedding_size"], sbz=batch)
    model.re_init_le()  # as every NAYER synthesis round starts
    _randomise_batchnorm(model, 2)
    generator, abstract = _generator("nayer")
    targets = nayer_targets(batch, classes, torch.Generator().manual_seed(3))
    assert targets[:20].tolist() == list(range(10)) * 2
    embeddings = label_emb[targets].numpy()  # the Flax generator takes per-sample embeddings
    _check_parity(model, lambda: model(targets), generator, abstract, embeddings, "nayer")


def test_reinit_noisy_layer_redraws_only_the_noisy_linears_and_leaves_its_input_alone():
    _, variables = _generator("nayer")
    params = variables["params"]
    before = jax.tree_util.tree_map(np.array, nnx.to_pure_dict(params))
    reinit = jax.jit(reinit_noisy_layer)  # as the NAYER round start runs it
    fresh = reinit(params, jax.random.key(5))
    after = nnx.to_pure_dict(fresh)

    assert jax.tree_util.tree_structure(fresh) == jax.tree_util.tree_structure(params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, nnx.to_pure_dict(params), before)  # input untouched
    for name in before:
        if name != "le1":
            jax.tree_util.tree_map(np.testing.assert_array_equal, after[name], before[name])
    assert len(after["le1"]) == 3
    kernels = []
    for i, layer in after["le1"].items():
        kernel = np.asarray(layer["kernel"])
        assert kernel.shape == (64, 512)
        assert not np.allclose(kernel, before["le1"][i]["kernel"])
        assert np.all(np.asarray(layer["bias"]) == 0) and np.any(before["le1"][i]["bias"] != 0)
        assert abs(kernel.mean()) < 0.03 and 0.97 < kernel.std() < 1.03  # N(0, 1): 32768 draws
        assert 0.66 < np.mean(np.abs(kernel) < 1) < 0.70  # 68.3% within one sigma (uniform would be 100%)
        kernels.append(kernel)
    assert not np.allclose(kernels[0], kernels[1]) and not np.allclose(kernels[1], kernels[2])  # one draw each

    again = nnx.to_pure_dict(reinit(params, jax.random.key(5)))
    other = nnx.to_pure_dict(reinit(params, jax.random.key(6)))
    jax.tree_util.tree_map(np.testing.assert_array_equal, again, after)
    assert not np.allclose(other["le1"][0]["kernel"], after["le1"][0]["kernel"])


def test_generator_init_under_jit_is_keyed_and_reproducible():
    generator, _ = _generator("dcgan")
    # Compiled without backend optimisation: the random bits are integer arithmetic, identical at any level, and the
    # default level spends ~10 s of a 2-core machine optimising the unrolled threefry of each draw.
    init = jax.jit(generator.init).lower(jax.random.key(0)).compile({"xla_backend_optimization_level": 0})
    a, a_again, b = init(jax.random.key(1)), init(jax.random.key(1)), init(jax.random.key(2))
    eager = generator.init(jax.random.key(1))
    for collection in ("params", "batch_stats"):
        jax.tree_util.tree_map(np.testing.assert_array_equal, nnx.to_pure_dict(a[collection]),
                               nnx.to_pure_dict(a_again[collection]))
        # The same draws as eager execution (up to the last bit of the float scaling of the uniform draws).
        jax.tree_util.tree_map(functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-9),
                               nnx.to_pure_dict(a[collection]), nnx.to_pure_dict(eager[collection]))
    pa, pb = nnx.to_pure_dict(a["params"]), nnx.to_pure_dict(b["params"])
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(pa), jax.tree_util.tree_leaves(pb)):
        if path[0].key == "conv_blocks" and path[1].key in (0, 3, 7):
            # BatchNorm affine parameters: ones and zeros whatever the key.
            np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))
        else:
            assert not np.allclose(x, y), f"{jax.tree_util.keystr(path)} is the same for two keys"
    # PyTorch's default initialisation: U(±1/sqrt(fan_in)) for the linear weights and biases.
    kernel, bias = np.asarray(pa["l1"][0]["kernel"]), np.asarray(pa["l1"][0]["bias"])
    bound = 1 / np.sqrt(DCGAN["nz"])
    assert np.abs(kernel).max() <= bound and np.abs(bias).max() <= bound and np.abs(kernel).max() > 0.9 * bound


# =========================================================================================== methods.base

@pytest.mark.parametrize("batch, classes", [(25, 10), (20, 10), (7, 10), (400, 10), (250, 100)])
def test_class_balanced_targets_follow_nayer_generate_ys(batch, classes):
    targets = np.asarray(jax.jit(class_balanced_targets, static_argnums=(1, 2))(jax.random.key(0), batch, classes))
    assert targets.shape == (batch,) and targets.dtype == np.int32
    full = batch // classes * classes
    tail = targets[full:]
    assert np.all((tail >= 0) & (tail < classes))
    # NAYER's construction with its random remainder set to ours: everything else is fixed.
    np.testing.assert_array_equal(targets, _nayer_generate_ys(batch, classes, torch.from_numpy(tail.copy())).numpy())
    assert np.all(np.bincount(targets, minlength=classes) >= batch // classes)


def _nayer_generate_ys(batch, classes, remainder: torch.Tensor) -> torch.Tensor:
    s = batch // classes
    target = remainder.to(torch.int64)  # upstream: torch.randint(self.num_classes, (v,))
    for _ in range(s):
        tmp_label = torch.tensor(range(0, classes))
        target = torch.cat((tmp_label, target))
    return target


def test_class_balanced_remainder_is_random_over_all_classes():
    tails = np.stack([np.asarray(class_balanced_targets(jax.random.key(k), 29, 10))[20:] for k in range(40)])
    assert set(tails.ravel().tolist()) == set(range(10))
    assert len({tuple(t) for t in tails}) > 30  # different keys, different remainders


def test_random_label_embedding_is_orthonormal_and_seeded():
    q = label_embedding(10, 32, None, 0)
    assert q.shape == (10, 32) and q.dtype == np.float32
    np.testing.assert_allclose(q @ q.T, np.eye(10), atol=1e-5)
    np.testing.assert_array_equal(q, label_embedding(10, 32, None, 0))
    assert not np.allclose(q, label_embedding(10, 32, None, 1))
    square = label_embedding(16, 16, "", 3)  # an empty path is "no file"; K = D is allowed
    np.testing.assert_allclose(square @ square.T, np.eye(16), atol=1e-5)


def test_label_embedding_from_a_file(tmp_path):
    table = np.random.default_rng(0).normal(size=(10, 24))  # float64 on disk
    path = tmp_path / "clip.npy"
    np.save(path, table)
    loaded = label_embedding(10, 512, str(path), 0)  # the file's width wins over the configured one
    assert loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded, table.astype(np.float32))


@pytest.mark.parametrize("shape", [(9, 24), (10,), (10, 24, 1)])
def test_label_embedding_file_of_the_wrong_shape_is_refused(tmp_path, shape):
    path = tmp_path / "bad.npy"
    np.save(path, np.zeros(shape, np.float32))
    with pytest.raises(ValueError, match=r"must be \(num_classes=10, dim\)") as error:
        label_embedding(10, 24, str(path), 0)
    assert str(path) in str(error.value) and str(shape) in str(error.value)


def test_random_label_embedding_narrower_than_the_classes_is_refused():
    with pytest.raises(ValueError, match=r"needs dim >= num_classes \(5 < 10\)"):
        label_embedding(10, 5, None, 0)
