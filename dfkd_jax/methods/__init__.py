"""DFKD methods: each makes synthetic images its own way and tells the trainer what the student trains on."""

from __future__ import annotations

from dfkd_jax.methods.base import EpochPlan, Method
from dfkd_jax.methods.cae import Cae
from dfkd_jax.methods.cgdd import Cgdd
from dfkd_jax.methods.cpsc import Cpsc
from dfkd_jax.methods.deepinversion import DeepInversion
from dfkd_jax.methods.generative import GenerativeAdversarial
from dfkd_jax.methods.mvn import Mvn
from dfkd_jax.methods.nayer import Nayer
from dfkd_jax.validate import ConfigError

METHODS: dict[str, type[Method]] = {
    "cae": Cae,
    "cgdd": Cgdd,
    "cpsc": Cpsc,
    "deepinv": DeepInversion,
    "dafl": GenerativeAdversarial,
    "dfad": GenerativeAdversarial,
    "mvn": Mvn,
    "nayer": Nayer,
}


def register(method_class: type[Method], name: str | None = None) -> type[Method]:
    """Make a method defined outside this package available as `config.method = name` (default: its `name`);
    a config file that imports the method's module can then run it (see tests/toy_method.py)."""
    METHODS[name or method_class.name] = method_class
    return method_class


def get(name: str) -> type[Method]:
    if name not in METHODS:
        raise ConfigError(f"config.method = {name!r} is not a method: it must be one of {', '.join(sorted(METHODS))}")
    return METHODS[name]


def config_rules(name: str) -> dict:
    """The method's own config ranges (`Method.CONFIG_RULES`), checked with the shared ones."""
    return get(name).CONFIG_RULES


def build(config, teacher, student, mesh) -> Method:
    method = get(config.method)(config, teacher, student, mesh)
    method.name = config.method
    return method


__all__ = ["EpochPlan", "Method", "METHODS", "build", "config_rules", "get", "register"]
