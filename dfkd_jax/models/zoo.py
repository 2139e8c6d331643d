"""The architecture registry: names users pass on the command line, mapped to builders."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

from flax import nnx

from dfkd_jax.models import resnet, vgg, wrn
from dfkd_jax.models.layers import INITS


@dataclasses.dataclass(frozen=True)
class Architecture:
    name: str
    family: str  # "he_resnet", "resnet", "wrn" or "vgg"
    build: Callable[..., nnx.Module]  # build(num_classes, *, rngs, **options)
    head: str  # module name of the classifier in PyTorch checkpoints
    options: dict[str, tuple[Any, ...]] = dataclasses.field(default_factory=dict)  # option -> allowed values


def _he_resnet(depth: int) -> Architecture:
    return Architecture(f"resnet{depth}", "he_resnet", functools.partial(resnet.he_resnet, depth), "linear",
                        {"shortcut": ("A", "B")})


def _wrn(depth: int, width: int) -> Architecture:
    return Architecture(f"wrn_{depth}_{width}", "wrn", functools.partial(wrn.WideResNet, depth, width), "fc")


ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in [
    *(_he_resnet(depth) for depth in (20, 32, 44, 56, 110)),
    Architecture("resnet18", "resnet", resnet.resnet18, "linear"),
    Architecture("resnet34", "resnet", resnet.resnet34, "linear"),
    *(_wrn(depth, width) for depth in (16, 40) for width in (1, 2)),
    Architecture("vgg8_bn", "vgg", vgg.vgg8_bn, "classifier"),
    Architecture("vgg11_bn", "vgg", vgg.vgg11_bn, "classifier"),
]}


def get(arch: str) -> Architecture:
    try:
        return ARCHITECTURES[arch]
    except KeyError:
        raise ValueError(f"unknown architecture {arch!r}; choose one of: {', '.join(ARCHITECTURES)}") from None


def check_arch(arch: str, options: dict[str, Any]) -> None:
    allowed = get(arch).options
    for name, value in options.items():
        if name not in allowed:
            raise ValueError(f"architecture {arch!r} takes no option {name!r}"
                             + (f" (it takes: {', '.join(allowed)})" if allowed else ""))
        if value not in allowed[name]:
            raise ValueError(f"option {name}={value!r} of {arch!r} must be one of {allowed[name]}")


INIT_CHOICES = ("upstream", *INITS)  # "upstream": each family as its layout's code (see layers.INITS)


def build(arch: str, num_classes: int, *, rngs: nnx.Rngs, init: str = "upstream", **options) -> nnx.Module:
    """A fresh network; `init` = "upstream" initialises it as the PyTorch code of its layout does, a name of
    `layers.INITS` forces that scheme on every family."""
    check_arch(arch, options)
    if init not in INIT_CHOICES:
        raise ValueError(f"init must be one of {', '.join(INIT_CHOICES)}, got {init!r}")
    scheme = None if init == "upstream" else INITS[init]
    return get(arch).build(num_classes, rngs=rngs, init=scheme, **options)
