"""Generators of the CMI / Fast / NAYER family, with PyTorch's module names and initialisation.

- `DCGANGenerator` ("DCGAN-small", upstream `Generator`): z → Linear → 128×s×s → BN → [×2 nearest upsample →
  conv3×3 → BN → LeakyReLU(0.2)] ×2 (128 then 64 channels) → conv3×3 → sigmoid; s = image_size / 4.
- `NayerGenerator` (upstream `NLGenerator`): a per-sample label embedding → BatchNorm1d → the *noisy layer* (one
  Linear per chunk of `chunk` samples, re-initialised N(0, 1) every synthesis round) → Linear → the same trunk.
- `CaeGenerator` (CAE-DFKD): NAYER's, its label embeddings first perturbed by learnable per-source noise (CEND).

Class-conditional generators take `(z, labels)` and see the labels at every layer that asks for them:
- `ConditionalDCGANGenerator`: DCGAN-small fed z ⊙ E[y], E a K×nz label embedding (CGDD, methods.md §6 [decided]).
- `CPSCGenerator` (CPSC-DFKD, methods.md §5): every BatchNorm is a `ConditionalBatchNorm`, convs have biases, and
  the output (tanh, then a 3-channel conditional BN) is the teacher's *normalised* input, not an image in [0, 1].

The others return NHWC images in [0, 1]. The linear projection is reshaped channel-first, as PyTorch's
`view(B, C, s, s)` does, so converted PyTorch generators produce the same images.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dfkd_jax.models.conv import Conv
from dfkd_jax.models.layers import INITS, BatchNorm, ConditionalBatchNorm, conv3x3, linear


# The generators keep PyTorch's default Conv2d / Linear initialisation (U(±1/sqrt(fan_in)), bias likewise), as
# upstream's generators and their `reinit()` do.
def torch_linear(in_features: int, out_features: int, *, rngs: nnx.Rngs) -> nnx.Linear:
    return linear(in_features, out_features, init=INITS["torch_default"], rngs=rngs)


def torch_conv3x3(in_channels: int, out_channels: int, *, use_bias: bool, rngs: nnx.Rngs) -> Conv:
    return conv3x3(in_channels, out_channels, use_bias=use_bias, init=INITS["torch_default"], rngs=rngs)


def upsample_nearest_2x(x_bhwc: jax.Array) -> jax.Array:
    return jnp.repeat(jnp.repeat(x_bhwc, 2, axis=1), 2, axis=2)


def leaky_relu(x: jax.Array) -> jax.Array:
    return jax.nn.leaky_relu(x, 0.2)


def _trunk(ngf: int, channels: int, rngs: nnx.Rngs) -> nnx.List:
    """Upstream's `conv_blocks`, index for index (parameter-free steps are plain functions)."""
    return nnx.List([
        BatchNorm(ngf * 2), upsample_nearest_2x,
        torch_conv3x3(ngf * 2, ngf * 2, use_bias=False, rngs=rngs), BatchNorm(ngf * 2), leaky_relu,
        upsample_nearest_2x,
        torch_conv3x3(ngf * 2, ngf, use_bias=False, rngs=rngs), BatchNorm(ngf), leaky_relu,
        torch_conv3x3(ngf, channels, use_bias=True, rngs=rngs), jax.nn.sigmoid,
    ])


def _run(layers: nnx.List, x: jax.Array, train: bool, labels: jax.Array | None = None) -> jax.Array:
    for layer in layers:
        if isinstance(layer, ConditionalBatchNorm):
            x = layer(x, labels, train=train)
        elif isinstance(layer, BatchNorm):
            x = layer(x, train=train)
        else:
            x = layer(x)
    return x


def _project(linear: nnx.Linear, x: jax.Array, ngf: int, init_size: int) -> jax.Array:
    out = linear(x)  # features ordered (C, H, W) as in PyTorch's view(B, C, s, s)
    return out.reshape(out.shape[0], ngf * 2, init_size, init_size).transpose(0, 2, 3, 1)


class DCGANGenerator(nnx.Module):
    def __init__(self, nz: int = 256, ngf: int = 64, image_size: int = 32, channels: int = 3, *, rngs: nnx.Rngs):
        if image_size % 4:
            raise ValueError(f"image_size must be a multiple of 4, got {image_size}")
        self.ngf, self.init_size = ngf, image_size // 4
        self.l1 = nnx.List([torch_linear(nz, ngf * 2 * self.init_size ** 2, rngs=rngs)])
        self.conv_blocks = _trunk(ngf, channels, rngs)

    def __call__(self, z_bn: jax.Array, labels=None, *, train: bool = True) -> jax.Array:
        return _run(self.conv_blocks, _project(self.l1[0], z_bn, self.ngf, self.init_size), train)


class NayerGenerator(nnx.Module):
    def __init__(self, embedding_size: int, batch_size: int, chunk: int, *, noisy_size: int = 1000,
                 ngf: int = 64, image_size: int = 32, channels: int = 3, rngs: nnx.Rngs):
        if image_size % 4:
            raise ValueError(f"image_size must be a multiple of 4, got {image_size}")
        self.ngf, self.init_size, self.chunk = ngf, image_size // 4, chunk
        self.n1 = BatchNorm(embedding_size)
        # One noisy linear per chunk of `chunk` samples (upstream: chunk = number of classes).
        self.le1 = nnx.List([torch_linear(embedding_size, noisy_size, rngs=rngs)
                             for _ in range(math.ceil(batch_size / chunk))])
        self.l1 = nnx.List([torch_linear(noisy_size, ngf * 2 * self.init_size ** 2, rngs=rngs)])
        self.conv_blocks = _trunk(ngf, channels, rngs)

    def __call__(self, embeddings_bd: jax.Array, labels=None, *, train: bool = True) -> jax.Array:
        batch = embeddings_bd.shape[0]
        if batch > len(self.le1) * self.chunk:
            raise ValueError(f"batch {batch} exceeds the {len(self.le1)} noisy chunks of {self.chunk} samples")
        normalised = self.n1(embeddings_bd, train=train)
        noisy = jnp.concatenate([self.le1[i](normalised[i * self.chunk:(i + 1) * self.chunk])
                                 for i in range(math.ceil(batch / self.chunk))])
        return _run(self.conv_blocks, _project(self.l1[0], noisy, self.ngf, self.init_size), train)


class ConditionalDCGANGenerator(nnx.Module):
    """DCGAN-small fed z ⊙ E[y]: E is a K×nz label embedding (PyTorch `nn.Embedding`'s N(0, 1) initialisation), the
    ACGAN-style conditioning methods.md §6 decides for CGDD."""

    def __init__(self, num_classes: int, nz: int = 256, ngf: int = 64, image_size: int = 32, channels: int = 3, *,
                 rngs: nnx.Rngs):
        if image_size % 4:
            raise ValueError(f"image_size must be a multiple of 4, got {image_size}")
        self.ngf, self.init_size = ngf, image_size // 4
        self.label_emb = nnx.Embed(num_classes, nz, embedding_init=jax.nn.initializers.normal(1.0), rngs=rngs)
        self.l1 = nnx.List([torch_linear(nz, ngf * 2 * self.init_size ** 2, rngs=rngs)])
        self.conv_blocks = _trunk(ngf, channels, rngs)

    def __call__(self, z_bn: jax.Array, labels: jax.Array, *, train: bool = True) -> jax.Array:
        conditioned = z_bn * self.label_emb(labels)
        return _run(self.conv_blocks, _project(self.l1[0], conditioned, self.ngf, self.init_size), train)


class CPSCGenerator(nnx.Module):
    """CPSC-DFKD's G(z, y): Linear(nz → 2·ngf·s·s) → CBN → ×2 → conv3×3(2ngf → 2ngf) → CBN → LeakyReLU(0.2) → ×2 →
    conv3×3(2ngf → ngf) → CBN → LeakyReLU(0.2) → conv3×3(ngf → C) → tanh → CBN(C), every conv with a bias, every
    CBN a `ConditionalBatchNorm` (epsilon 1e-3 upstream). Returns the teacher's normalised input."""

    def __init__(self, num_classes: int, nz: int = 256, ngf: int = 64, image_size: int = 32, channels: int = 3, *,
                 epsilon: float = 1e-3, rngs: nnx.Rngs):
        if image_size % 4:
            raise ValueError(f"image_size must be a multiple of 4, got {image_size}")
        self.ngf, self.init_size = ngf, image_size // 4

        def cbn(features):
            return ConditionalBatchNorm(features, num_classes, epsilon=epsilon)

        self.l1 = nnx.List([torch_linear(nz, ngf * 2 * self.init_size ** 2, rngs=rngs)])
        self.conv_blocks = nnx.List([
            cbn(ngf * 2), upsample_nearest_2x,
            torch_conv3x3(ngf * 2, ngf * 2, use_bias=True, rngs=rngs), cbn(ngf * 2), leaky_relu,
            upsample_nearest_2x,
            torch_conv3x3(ngf * 2, ngf, use_bias=True, rngs=rngs), cbn(ngf), leaky_relu,
            torch_conv3x3(ngf, channels, use_bias=True, rngs=rngs), jnp.tanh, cbn(channels),
        ])

    def __call__(self, z_bn: jax.Array, labels: jax.Array, *, train: bool = True) -> jax.Array:
        return _run(self.conv_blocks, _project(self.l1[0], z_bn, self.ngf, self.init_size), train, labels)


NOISE_SOURCES = ("gaussian", "uniform", "laplace", "bernoulli")


def draw_category_noise(key: jax.Array, batch: int, dim: int, sources=NOISE_SOURCES,
                        assign: str = "random") -> dict:
    """CAE-DFKD's noise draws for `batch` category embeddings of width `dim`: {"noise": q (B, D), "source": n (B,)}.

    Each sample's source n is drawn uniformly from `sources` (assign="random") or cycles through them
    (assign="cycle": sample i gets source i mod N), and q ~ NS_n: gaussian N(0, 1), uniform U(−1, 1), laplace
    Laplace(0, 1), bernoulli a dropout-style mask (m − 0.5)·2 with m ~ Bernoulli(0.5), i.e. ±1 (methods.md §4)."""
    samplers = {"gaussian": lambda k: jax.random.normal(k, (batch, dim)),
                "uniform": lambda k: jax.random.uniform(k, (batch, dim), minval=-1.0, maxval=1.0),
                "laplace": lambda k: jax.random.laplace(k, (batch, dim)),
                "bernoulli": lambda k: (jax.random.bernoulli(k, 0.5, (batch, dim)).astype(jnp.float32) - 0.5) * 2}
    source_key, *draw_keys = jax.random.split(key, 1 + len(sources))
    if assign == "cycle":
        source = jnp.arange(batch, dtype=jnp.int32) % len(sources)
    else:
        source = jax.random.randint(source_key, (batch,), 0, len(sources), jnp.int32)
    draws = jnp.stack([samplers[name](k) for name, k in zip(sources, draw_keys, strict=True)])  # (N, B, D)
    return {"noise": draws[source, jnp.arange(batch)], "source": source}


class CategoryNoise(nnx.Module):
    """CEND (category embedding noise diffusion): e_{n,c} = e_c + M_n ⊙ q_n, one magnitude vector M_n (D,) per
    noise source, initialised to `init_magnitude` and trained with the generator unless `learnable` is False."""

    def __init__(self, num_sources: int, dim: int, init_magnitude: float = 0.1, learnable: bool = True):
        self.magnitudes = nnx.Param(jnp.full((num_sources, dim), init_magnitude, jnp.float32))
        self.learnable = learnable

    def __call__(self, embeddings_bd: jax.Array, noise_bd: jax.Array, source_b: jax.Array) -> jax.Array:
        magnitudes = self.magnitudes[...]
        if not self.learnable:
            magnitudes = jax.lax.stop_gradient(magnitudes)
        return embeddings_bd + magnitudes[source_b] * noise_bd


class CaeGenerator(NayerGenerator):
    """CAE-DFKD's generator: NAYER's, fed category embeddings perturbed by `CategoryNoise`. Its input is
    {"embeddings": e_y (B, D), "noise": q (B, D), "source": n (B,)} (`draw_category_noise`)."""

    def __init__(self, embedding_size: int, batch_size: int, chunk: int, *, num_sources: int = 4,
                 init_magnitude: float = 0.1, learnable: bool = True, noisy_size: int = 1000, ngf: int = 64,
                 image_size: int = 32, channels: int = 3, rngs: nnx.Rngs):
        super().__init__(embedding_size, batch_size, chunk, noisy_size=noisy_size, ngf=ngf, image_size=image_size,
                         channels=channels, rngs=rngs)
        self.cend = CategoryNoise(num_sources, embedding_size, init_magnitude, learnable)

    def __call__(self, inputs: dict, labels=None, *, train: bool = True) -> jax.Array:
        perturbed = self.cend(inputs["embeddings"], inputs["noise"], inputs["source"])
        return super().__call__(perturbed, train=train)


def reinit_noisy_layer(params: nnx.State, key: jax.Array) -> nnx.State:
    """NAYER's `re_init_le`: every noisy linear gets weights N(0, 1) and zero bias (a pure function of params)."""
    pure = nnx.to_pure_dict(params)
    keys = jax.random.split(key, len(pure["le1"]))
    pure["le1"] = {i: {"kernel": jax.random.normal(keys[i], layer["kernel"].shape, layer["kernel"].dtype),
                       "bias": jnp.zeros_like(layer["bias"])} for i, layer in pure["le1"].items()}
    fresh = jax.tree_util.tree_map(lambda x: x, params)  # a copy to fill; params stays untouched
    nnx.replace_by_pure_dict(fresh, pure)
    return fresh


GENERATORS = {"dcgan": DCGANGenerator, "nayer": NayerGenerator, "cae": CaeGenerator,
              "conditional_dcgan": ConditionalDCGANGenerator, "cpsc": CPSCGenerator}
CONDITIONAL = frozenset({"conditional_dcgan", "cpsc"})  # these need `labels` in `Generator.apply`


@dataclasses.dataclass(frozen=True, eq=False)
class Generator:
    """A generator as pure functions: `apply(variables, inputs, labels, train)` -> (images, new batch statistics).
    `labels` (B,) int are required by the class-conditional kinds (`CONDITIONAL`) and ignored by the others."""

    kind: str
    kwargs: dict[str, Any]
    graphdef: nnx.GraphDef

    @classmethod
    def create(cls, kind: str, seed: int | jax.Array = 0, **kwargs) -> tuple["Generator", dict]:
        if kind not in GENERATORS:
            raise ValueError(f"unknown generator {kind!r}; choose one of {sorted(GENERATORS)}")
        rngs = nnx.Rngs(params=seed)
        graphdef, params, batch_stats = nnx.split(GENERATORS[kind](**kwargs, rngs=rngs), nnx.Param, nnx.BatchStat)
        return cls(kind, kwargs, graphdef), {"params": params, "batch_stats": batch_stats}

    def init(self, key: jax.Array) -> dict:
        """Fresh variables (upstream `reinit()`: a new generator with PyTorch's default initialisation); jittable."""
        _, params, batch_stats = nnx.split(GENERATORS[self.kind](**self.kwargs, rngs=nnx.Rngs(params=key)),
                                           nnx.Param, nnx.BatchStat)
        return {"params": params, "batch_stats": batch_stats}

    @property
    def conditional(self) -> bool:
        return self.kind in CONDITIONAL

    def apply(self, variables: dict, inputs: jax.Array, labels: jax.Array | None = None, *,
              train: bool = True) -> tuple[jax.Array, nnx.State]:
        if self.conditional and labels is None:
            raise ValueError(f"the {self.kind!r} generator is class-conditional: pass the labels to generate for")
        # copy=True: fresh Variables owned by this trace, so BatchNorm can update them under jax.grad too.
        model = nnx.merge(self.graphdef, variables["params"], variables["batch_stats"], copy=True)
        images, _ = nnx.capture(model, nnx.Intermediate)(inputs, labels, train=train)
        return images, nnx.state(model, nnx.BatchStat)
