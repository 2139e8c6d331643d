"""dfkd_jax: data-free knowledge distillation in JAX/Flax."""

__version__ = "0.1.0"

from dfkd_jax import xla_cpu as _xla_cpu

_xla_cpu.use_eigen_convolutions()
