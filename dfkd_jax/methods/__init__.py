"""DFKD methods: each makes synthetic images its own way and tells the trainer what the student trains on."""

from __future__ import annotations

from dfkd_jax.methods.base import EpochPlan, Method
from dfkd_jax.methods.deepinversion import DeepInversion
from dfkd_jax.methods.generative import GenerativeAdversarial
from dfkd_jax.methods.nayer import Nayer

METHODS: dict[str, type[Method]] = {
    "deepinv": DeepInversion,
    "dafl": GenerativeAdversarial,
    "dfad": GenerativeAdversarial,
    "nayer": Nayer,
}


def build(config, teacher, student, mesh) -> Method:
    if config.method not in METHODS:
        raise ValueError(f"config.method must be one of {sorted(METHODS)}, got {config.method!r}")
    method = METHODS[config.method](config, teacher, student, mesh)
    method.name = config.method
    return method


__all__ = ["EpochPlan", "Method", "METHODS", "build"]
