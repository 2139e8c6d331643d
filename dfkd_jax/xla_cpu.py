"""XLA:CPU's convolutions on Eigen, its matrix products on YNNPACK: `--xla_cpu_experimental_ynn_fusion_type=dot`.

XLA:CPU (jax 0.10 and 0.11) hands each convolution to YNNPACK by default (the `individual_convolution` library
fusion). On the 2-core CPU of the README's Speed section that path is the slow one: resnet20's 3×3 layers (32×32×16,
16×16×32, 8×8×64) at batch 256 run forward at 50 / 56 / 74 GFLOP/s against 63 / 140 / 147 on XLA's Eigen
convolution, and forward + weight gradient take 384 / 119 / 58 ms against 66 / 34 / 21 ms. Setting the list to `dot`
takes convolutions out of YNNPACK and keeps matrix products in it. Whole steps (akamaster resnet56 → resnet20, batch
256, float32): NAYER generator 28.8 → 47.1 image-steps/s, KD 64.2 → 94.0 images/s. Adding `eltwise` measured slower
for NAYER (0.91× PyTorch against 1.53×).

XLA reads XLA_FLAGS once, when JAX creates its first backend, so this runs when `dfkd_jax` is imported. A value the
user already put in XLA_FLAGS wins (`--xla_cpu_experimental_ynn_fusion_type=individual_convolution` restores XLA's
default). Other platforms ignore the flag.
"""

from __future__ import annotations

import os
import re
import warnings

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
YNN_DOTS = f"{YNN_FLAG}=dot"


def _backends_initialised() -> bool:
    try:
        from jax._src.xla_bridge import backends_are_initialized
    except ImportError:  # the private helper moved: assume the usual order, dfkd_jax imported before any jax call
        return False
    return backends_are_initialized()


def with_ynn_dots(xla_flags: str) -> str:
    """XLA_FLAGS with the YNN fusion types set to `dot`, unless the flags already choose them."""
    if YNN_FLAG in xla_flags:
        return xla_flags
    return f"{xla_flags} {YNN_DOTS}".strip()


def ynn_fusion_types(xla_flags: str) -> tuple[str, ...] | None:
    """The YNN fusion types XLA_FLAGS ask for (None: not set, XLA's default)."""
    match = re.search(rf"{YNN_FLAG}=(\S*)", xla_flags)
    if match is None:
        return None
    return tuple(kind.strip().lower() for kind in match.group(1).split(",") if kind.strip())


def eigen_convolutions() -> bool:
    """Whether this process's XLA_FLAGS keep convolutions out of YNNPACK (an explicit list without them)."""
    types = ynn_fusion_types(os.environ.get("XLA_FLAGS", ""))
    if types is None:
        return False
    if any(kind.startswith(("+", "-")) for kind in types):  # edits to XLA's default list, which has them
        return "-individual_convolution" in types
    return "individual_convolution" not in types


def use_eigen_convolutions() -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    if YNN_FLAG in flags:
        return
    if _backends_initialised():
        warnings.warn("JAX's backends were created before dfkd_jax was imported, so XLA:CPU keeps its default YNNPACK "
                      "convolutions (slower on CPU; results are the same). Import dfkd_jax first, or put "
                      f"{YNN_DOTS} in XLA_FLAGS.", stacklevel=3)
        return
    os.environ["XLA_FLAGS"] = with_ynn_dots(flags)
