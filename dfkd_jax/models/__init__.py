"""The model zoo: CIFAR networks in Flax NNX whose parameters map 1:1 onto the PyTorch checkpoints."""

from dfkd_jax.models.network import (BNInput, CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, IMAGENET_MEAN,
                                     IMAGENET_STD, Network, NetworkSpec, Output, Variables, count_params,
                                     default_normalisation, normalise)
from dfkd_jax.models.zoo import ARCHITECTURES, Architecture

__all__ = [
    "ARCHITECTURES", "Architecture", "BNInput", "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN", "CIFAR100_STD",
    "IMAGENET_MEAN", "IMAGENET_STD", "Network", "NetworkSpec", "Output", "Variables", "count_params",
    "default_normalisation", "normalise",
]
