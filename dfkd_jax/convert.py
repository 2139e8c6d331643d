"""Convert a PyTorch checkpoint into a dfkd_jax network checkpoint.

    python -m dfkd_jax.convert --torch resnet56-4bfd9763.th --arch resnet56 --out teachers/resnet56 \\
        --normalisation imagenet      # or --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225

Reads zip and legacy-pickle files with `torch.load(weights_only=True)`; accepts a bare state_dict or one nested under
`state_dict` / `model_state_dict` / `model`, with or without DataParallel's `module.` prefix and `num_batches_tracked`.
Every Flax variable is named after its PyTorch key (`layer1.0.conv1.kernel` <- `layer1.0.conv1.weight`), so the
mapping is a rename of leaves plus the layout change of conv (OIHW -> HWIO) and linear ((out, in) -> (in, out))
weights. A checkpoint that does not fit the architecture fails before anything is written, listing the missing,
unexpected and wrongly shaped keys.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
import zipfile
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from dfkd_jax.models import (CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, IMAGENET_MEAN, IMAGENET_STD,
                             Network, NetworkSpec, Variables, count_params, default_normalisation, zoo)

# Flax leaf name -> PyTorch leaf name.
TORCH_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
NESTING_KEYS = ("state_dict", "model_state_dict", "model")
# Per family, regex renames from other published layouts onto ours (chenyaofo's option-B ResNets).
KEY_ALIASES = {"he_resnet": ((r"\.downsample\.", ".shortcut."), (r"^fc\.", "linear."))}
LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"  # pickled torch magic number
ZIP_MAGIC = b"PK\x03\x04"
MAX_LISTED = 25
# Named input normalisations (mean, std) for --normalisation; akamaster's CIFAR ResNets were trained with ImageNet's.
NORMALISATIONS = {"cifar10": (CIFAR10_MEAN, CIFAR10_STD), "cifar100": (CIFAR100_MEAN, CIFAR100_STD),
                  "imagenet": (IMAGENET_MEAN, IMAGENET_STD)}


class CheckpointFormatError(ValueError):
    """The file is not a readable PyTorch checkpoint (missing, truncated, or something else entirely)."""


class LayoutMismatchError(ValueError):
    """The checkpoint's keys or shapes do not fit the architecture."""

    def __init__(self, message: str, missing: dict, unexpected: dict, wrong_shape: dict):
        super().__init__(message)
        self.missing, self.unexpected, self.wrong_shape = missing, unexpected, wrong_shape


# ----------------------------------------------------------------------------------------------- reading PyTorch

def _import_torch():
    try:
        import torch
    except ImportError:
        raise ImportError("reading PyTorch checkpoints needs PyTorch: pip install 'dfkd_jax[torch]' "
                          "(on a CPU-only machine first: pip install torch==2.13.0)") from None
    return torch


def _diagnose_unreadable(path: str, error: Exception) -> CheckpointFormatError:
    with open(path, "rb") as f:
        head = f.read(len(LEGACY_MAGIC))
    reason = f"{type(error).__name__}: {error}".strip().splitlines()[0]
    if head.startswith(ZIP_MAGIC):
        if not zipfile.is_zipfile(path):
            what = "a zip-format PyTorch checkpoint that is truncated or corrupted (its zip directory is missing)"
        elif not any(name.endswith("data.pkl") for name in zipfile.ZipFile(path).namelist()):
            what = "a zip archive but not a PyTorch checkpoint (it has no data.pkl)"
        else:
            what = "a zip-format PyTorch checkpoint that could not be read"
    elif head == LEGACY_MAGIC:
        what = "a legacy-format PyTorch checkpoint that is truncated or corrupted"
    else:
        what = "not a PyTorch checkpoint (neither torch.save's zip format nor its legacy pickle format)"
    return CheckpointFormatError(f"{path} is {what} [{reason}]. If it was downloaded, download it again; "
                                 "if it is the wrong file, pass the .pth/.pt/.th file written by torch.save.")


def load_torch_file(path: str, *, trust_pickle: bool = False) -> Any:
    """`torch.load` on CPU with `weights_only=True` unless `trust_pickle`, with errors that say what is wrong."""
    torch = _import_torch()
    if not os.path.isfile(path):
        raise CheckpointFormatError(f"no checkpoint file at {path}")
    if os.path.getsize(path) == 0:
        raise CheckpointFormatError(f"{path} is empty (0 bytes); download or copy it again.")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as error:  # torch raises RuntimeError, UnpicklingError, EOFError, ... depending on the damage
        if not trust_pickle and "weights_only" in str(error) and "Unsupported global" in str(error):
            raise CheckpointFormatError(
                f"{path} contains Python objects that safe loading (weights_only=True) refuses: "
                f"{str(error).splitlines()[0]}. If you trust the file, pass --trust-pickle.") from error
        raise _diagnose_unreadable(path, error) from error


def extract_state_dict(checkpoint: Any, path: str = "checkpoint") -> dict[str, np.ndarray]:
    """The tensors of a (possibly nested, possibly DataParallel) state_dict as float32 NumPy arrays, without
    `num_batches_tracked` and without the `module.` prefix."""
    torch = _import_torch()
    for key in NESTING_KEYS:
        if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get(key), Mapping):
            checkpoint = checkpoint[key]
            break
    if not isinstance(checkpoint, Mapping) or not checkpoint:
        raise CheckpointFormatError(f"{path} holds a {type(checkpoint).__name__}, not a state_dict; expected a dict "
                                    f"of tensors, bare or under one of {NESTING_KEYS}.")
    tensors = {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointFormatError(f"{path} holds no tensors at its top level (keys: {sorted(checkpoint)[:10]}); "
                                    f"expected a state_dict, bare or under one of {NESTING_KEYS}.")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return {k: v.detach().to(torch.float32).cpu().numpy() for k, v in tensors.items()
            if not k.endswith("num_batches_tracked")}


def read_state_dict(path: str, *, trust_pickle: bool = False) -> dict[str, np.ndarray]:
    return extract_state_dict(load_torch_file(path, trust_pickle=trust_pickle), path)


# ---------------------------------------------------------------------------------------------- mapping onto Flax

def canonical_keys(state_dict: Mapping[str, np.ndarray], arch: str) -> dict[str, np.ndarray]:
    renamed = dict(state_dict)
    for pattern, replacement in KEY_ALIASES.get(zoo.get(arch).family, ()):
        renamed = {re.sub(pattern, replacement, k): v for k, v in renamed.items()}
    return renamed


def detect_options(state_dict: Mapping[str, np.ndarray], arch: str) -> dict[str, Any]:
    """He ResNets: option B (1x1 conv + BN projection) if the checkpoint has projection weights, else option A."""
    if zoo.get(arch).family != "he_resnet":
        return {}
    return {"shortcut": "B" if any(".shortcut." in k for k in state_dict) else "A"}


def infer_num_classes(state_dict: Mapping[str, np.ndarray], arch: str) -> int | None:
    head = state_dict.get(zoo.get(arch).head + ".weight")
    return int(head.shape[0]) if head is not None and head.ndim == 2 else None


def _last_linear_rows(state_dict: Mapping[str, np.ndarray]) -> int:
    linear_weights = [v for v in state_dict.values() if v.ndim == 2]
    return int(linear_weights[-1].shape[0]) if linear_weights else 10


def _torch_key(path: tuple) -> str:
    return ".".join(str(p) for p in path[:-1]) + "." + TORCH_LEAF[path[-1]]


def _to_torch_layout(shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(shape) == 4:  # HWIO -> OIHW
        return (shape[3], shape[2], shape[0], shape[1])
    if len(shape) == 2:  # (in, out) -> (out, in)
        return (shape[1], shape[0])
    return tuple(shape)


def _to_flax_layout(array: np.ndarray) -> np.ndarray:
    if array.ndim == 4:
        return np.ascontiguousarray(array.transpose(2, 3, 1, 0))
    if array.ndim == 2:
        return np.ascontiguousarray(array.T)
    return array


def expected_layout(abstract: Variables) -> dict[str, tuple[tuple, tuple[int, ...]]]:
    """PyTorch key -> ((collection, *flax path), PyTorch shape) for every variable of a network."""
    return {_torch_key(path): ((collection, *path), _to_torch_layout(tuple(variable.get_value().shape)))
            for collection, state in abstract.items() for path, variable in nnx.to_flat_state(state)}


def _layout_differences(state_dict, layout):
    missing = {k: shape for k, (_, shape) in layout.items() if k not in state_dict}
    unexpected = {k: tuple(v.shape) for k, v in state_dict.items() if k not in layout}
    wrong_shape = {k: (tuple(state_dict[k].shape), shape) for k, (_, shape) in layout.items()
                   if k in state_dict and tuple(state_dict[k].shape) != shape}
    return missing, unexpected, wrong_shape


def _group_by_module(items: dict[str, tuple]) -> dict[str, tuple]:
    """{"a.bn1.weight": s, "a.bn1.bias": s} -> {"a.bn1.{weight,bias}": s}: one line per module and shape."""
    groups: dict[tuple[str, tuple], list[str]] = {}
    for key, shape in items.items():
        module, _, leaf = key.rpartition(".")
        groups.setdefault((module, shape), []).append(leaf)
    return {(f"{module}.{leaves[0]}" if len(leaves) == 1 else f"{module}.{{{','.join(leaves)}}}"): shape
            for (module, shape), leaves in groups.items()}


def _listing(title: str, count: int, lines: list[str]) -> list[str]:
    if not count:
        return []
    shown = [f"  {title} ({count} tensors):"] + [f"    {line}" for line in lines[:MAX_LISTED]]
    if len(lines) > MAX_LISTED:
        shown.append(f"    ... and {len(lines) - MAX_LISTED} more lines")
    return shown


def matching_architectures(state_dict: Mapping[str, np.ndarray]) -> list[str]:
    """Architectures (with options) whose layout the checkpoint fits exactly, to suggest when --arch is wrong."""
    matches = []
    for arch in zoo.ARCHITECTURES:
        renamed = canonical_keys(state_dict, arch)
        num_classes = infer_num_classes(renamed, arch)
        if num_classes is None:
            continue
        options = detect_options(renamed, arch)
        _, abstract = Network.abstract(NetworkSpec(arch, num_classes, options))
        if not any(_layout_differences(renamed, expected_layout(abstract))):
            matches.append(arch + "".join(f" ({k} {v})" for k, v in options.items()))
    return matches


def to_flax_variables(state_dict: Mapping[str, np.ndarray], spec: NetworkSpec, source: str = "checkpoint"
                      ) -> Variables:
    """Map a canonical-key state_dict onto the network of `spec`; raises LayoutMismatchError listing every problem."""
    described = spec.arch + "".join(f", shortcut {v}" for v in spec.options.values())
    return state_dict_to_variables(state_dict, Network.abstract(spec)[1],
                                   f"{source} does not fit {described} with {spec.num_classes} classes",
                                   suggest=True)


def state_dict_to_variables(state_dict: Mapping[str, np.ndarray], abstract: Variables, problem: str,
                            suggest: bool = False) -> Variables:
    """Fill the (abstract) variables of any zoo module, classifier or generator, from a PyTorch state_dict whose
    keys follow the module's attribute names; raises LayoutMismatchError naming `problem` and every mismatch."""
    layout = expected_layout(abstract)
    missing, unexpected, wrong_shape = _layout_differences(state_dict, layout)
    if missing or unexpected or wrong_shape:
        lines = [f"{problem}:"]
        lines += _listing("missing (expected by the architecture, absent from the checkpoint)", len(missing),
                          [f"{k} {s}" for k, s in _group_by_module(missing).items()])
        lines += _listing("unexpected (in the checkpoint, unknown to the architecture)", len(unexpected),
                          [f"{k} {s}" for k, s in _group_by_module(unexpected).items()])
        lines += _listing("wrong shape", len(wrong_shape),
                          [f"{k}: checkpoint {s[0]}, expected {s[1]}" for k, s in wrong_shape.items()])
        if suggest:
            suggestions = matching_architectures(state_dict)
            lines.append(f"  The checkpoint fits: {', '.join(suggestions)}; pass that as --arch." if suggestions else
                         f"  It fits none of the known architectures ({', '.join(zoo.ARCHITECTURES)}).")
        raise LayoutMismatchError("\n".join(lines), missing, unexpected, wrong_shape)
    converted = traverse_util.unflatten_dict(
        {flax_key: jnp.asarray(_to_flax_layout(state_dict[torch_key])) for torch_key, (flax_key, _) in layout.items()})
    variables = jax.tree_util.tree_map(lambda x: x, abstract)  # fill a copy; the caller's abstract tree stays
    for collection, state in variables.items():
        nnx.replace_by_pure_dict(state, converted[collection])
    return variables


def convert(path: str, arch: str, *, num_classes: int | None = None, mean=None, std=None,
            trust_pickle: bool = False) -> tuple[NetworkSpec, Variables]:
    """Read a PyTorch checkpoint and return the spec and Flax variables of the network it holds."""
    zoo.get(arch)  # fail on an unknown name before reading anything
    state_dict = canonical_keys(read_state_dict(path, trust_pickle=trust_pickle), arch)
    # A checkpoint without this architecture's classifier still gets the full key listing from the layout check;
    # the class count for it is read off its last 2-D (linear) weight.
    num_classes = num_classes or infer_num_classes(state_dict, arch) or _last_linear_rows(state_dict)
    default_mean, default_std = default_normalisation(num_classes)
    spec = NetworkSpec(arch, num_classes, detect_options(state_dict, arch),
                       mean=tuple(mean or default_mean), std=tuple(std or default_std))
    return spec, to_flax_variables(state_dict, spec, source=path)


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# -------------------------------------------------------------------------------------------------------- CLI

def _three_floats(text: str) -> tuple[float, float, float]:
    values = tuple(float(v) for v in text.split(","))
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected three comma-separated numbers (R,G,B), got {text!r}")
    return values


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dfkd_jax.convert", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--torch", required=True, help="PyTorch checkpoint file (.pth/.pt/.th)")
    parser.add_argument("--arch", required=True, choices=list(zoo.ARCHITECTURES), metavar="NAME",
                        help=f"architecture: {', '.join(zoo.ARCHITECTURES)}")
    parser.add_argument("--out", required=True, help="new directory for the converted checkpoint")
    parser.add_argument("--num-classes", type=int, help="number of classes (default: read off the classifier)")
    parser.add_argument("--mean", type=_three_floats, help="input normalisation mean, R,G,B on the [0,1] scale "
                        "(default: CIFAR-10's, or CIFAR-100's for 100 classes)")
    parser.add_argument("--std", type=_three_floats, help="input normalisation std, R,G,B")
    parser.add_argument("--normalisation", choices=sorted(NORMALISATIONS),
                        help="a named mean/std instead of --mean/--std (akamaster checkpoints: imagenet)")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="load with weights_only=False (runs arbitrary code from the file: trusted files only)")
    return parser.parse_args(argv)


def main(argv=None) -> str:
    args = parse_args(argv)
    if args.normalisation:
        if args.mean or args.std:
            raise ValueError("pass either --normalisation or --mean/--std, not both")
        args.mean, args.std = NORMALISATIONS[args.normalisation]
    if (args.mean is None) != (args.std is None):
        raise ValueError("pass --mean and --std together (or --normalisation)")
    out = os.path.abspath(args.out)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise FileExistsError(f"{out} already exists and is not empty; choose a new --out directory.")
    spec, variables = convert(args.torch, args.arch, num_classes=args.num_classes, mean=args.mean, std=args.std,
                              trust_pickle=args.trust_pickle)
    from dfkd_jax.network_io import save_network  # orbax is slow to import; only needed once conversion worked
    provenance = {"torch_file": os.path.abspath(args.torch), "sha256": sha256(args.torch)}
    save_network(out, spec, variables, provenance)
    options = "".join(f", {k} {v}" for k, v in spec.options.items())
    normalisation = "" if (args.mean or args.std) else (" (the default for this class count; pass --normalisation or "
                                                        "--mean/--std if it was trained with other statistics)")
    print(f"converted {args.torch}\n  -> {out}\n  {spec.arch}{options}, {spec.num_classes} classes, "
          f"{count_params(variables['params']):,} parameters\n  input normalisation mean={list(spec.mean)} "
          f"std={list(spec.std)}{normalisation}")
    return out


def cli() -> None:
    try:
        main()
    except (CheckpointFormatError, LayoutMismatchError, FileExistsError, ImportError, ValueError) as error:
        print(f"error: {error}\nNothing was written.", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
