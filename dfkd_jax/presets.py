"""Presets shared by every method config in configs/: teachers, datasets, preset parsing and the fields of a run.

Presets come after ':' in --config, comma-separated: a dataset (`digits`, `cifar10`, `cifar100`), a budget (per
method, e.g. `cpu20`, `paper`) and `key=value` pairs:

    teacher=NAME        a teacher below (default: the dataset's)
    teacher_root=DIR    where the CMI / Fast / NAYER zoo's `{dataset}_{arch}.pth` files are (checkpoints/pretrained)
    student=ARCH        the student's architecture (default: the dataset's)
    budget=NAME         the method's budget
    eval=tfds|shared    CIFAR evaluation: the tfds test split (default; prepare it with python -m dfkd_jax.data.build)
                        or the lossless test images in ../shared (exact932 / exact916)

    python -m dfkd_jax.main --config=configs/nayer.py:cifar10,teacher=akamaster_resnet56,budget=cpu20,eval=shared
    python -m dfkd_jax.main --config=configs/nayer.py:cifar10,teacher=cifar10_resnet34,student=resnet18

Teachers: the embedded `digits_resnet20`; the files in ../shared (`akamaster_resnet{20,32,44,56}`,
`chenyaofo_resnet{20,32,44,56}` for CIFAR-10, `chenyaofo_cifar100_resnet{20,56}`); and the zoo every CMI / Fast /
NAYER user has, `{cifar10,cifar100}_{resnet18,resnet34,wrn_16_1,wrn_16_2,wrn_40_1,wrn_40_2,vgg8_bn,vgg11_bn}`,
read from TEACHER_ROOT/{dataset}_{arch}.pth (their `state_dict` layout, docs/anchors.md). The upstream repositories
name the WRNs `wrn40_2` in their scripts; their files are `cifar10_wrn40_2.pth`, which `teacher=cifar10_wrn_40_2`
finds too.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import ml_collections

from dfkd_jax.validate import ConfigError

SHARED = "../shared"
TEACHER_ROOT = "checkpoints/pretrained"  # where CMI / Fast / NAYER keep their teachers
ZOO_ARCHS = ("resnet18", "resnet34", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2", "vgg8_bn", "vgg11_bn")
# chenyaofo's CIFAR-100 models were trained with these statistics (teachers/README.md), not the zoo's rounded ones.
CHENYAOFO_CIFAR100 = dict(mean=(0.5070, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762))

TEACHERS: dict[str, dict[str, Any]] = {
    # The embedded default: trained by the project on scikit-learn's digits on first use (no files needed).
    "digits_resnet20": dict(source="digits", arch="resnet20", options={"shortcut": "A"}, train_epochs=8,
                            train_batch_size=64, train_lr=0.1),
    **{f"akamaster_resnet{d}": dict(source="torch", torch_file=f"{SHARED}/teachers/akamaster/resnet{d}-{tag}.th",
                                    arch=f"resnet{d}", normalisation="imagenet", options={}, classes=10)
       for d, tag in [(20, "12fca82f"), (32, "d509ac18"), (44, "014dd654"), (56, "4bfd9763")]},
    **{f"chenyaofo_resnet{d}": dict(source="torch", torch_file=f"{SHARED}/teachers/chenyaofo/cifar10_resnet{d}.pth",
                                    arch=f"resnet{d}", normalisation="cifar10", options={}, classes=10)
       for d in (20, 32, 44, 56)},
    **{f"chenyaofo_cifar100_resnet{d}": dict(
        source="torch", torch_file=f"{SHARED}/teachers/chenyaofo/cifar100_resnet{d}.pth", arch=f"resnet{d}",
        normalisation="cifar100", options={}, classes=100, **CHENYAOFO_CIFAR100) for d in (20, 56)},
    # The CMI / Fast / NAYER zoo: {root} is filled in from teacher_root=.
    **{f"{dataset}_{arch}": dict(source="torch", torch_file=f"{{root}}/{dataset}_{arch}.pth", arch=arch,
                                 normalisation=dataset, options={}, classes=classes)
       for dataset, classes in (("cifar10", 10), ("cifar100", 100)) for arch in ZOO_ARCHS},
}

DATASETS: dict[str, dict[str, Any]] = {
    "digits": dict(image_shape=(16, 16, 3), classes=10, eval_data={"tfds": "digits", "shared": "digits"},
                   teacher="digits_resnet20", student="wrn_16_1", budget="digits", label_embedding=""),
    "cifar10": dict(image_shape=(32, 32, 3), classes=10,
                    eval_data={"tfds": "cifar10", "shared": f"{SHARED}/data/cifar10_test_exact932.npz"},
                    teacher="akamaster_resnet56", student="resnet20", budget="paper",
                    label_embedding=f"{SHARED}/data/label_embeddings/cifar10_clip_vitb32_text.npy"),
    "cifar100": dict(image_shape=(32, 32, 3), classes=100,
                     eval_data={"tfds": "cifar100", "shared": f"{SHARED}/data/cifar100_test_exact916.npz"},
                     teacher="chenyaofo_cifar100_resnet56", student="resnet20", budget="paper",
                     label_embedding=f"{SHARED}/data/label_embeddings/cifar100_clip_vitb32_text.npy"),
}

PRESET_KEYS = ("dataset", "teacher", "teacher_root", "student", "budget", "eval")


def parse_preset(arg: str | None, budgets: dict) -> dict[str, str]:
    """'cifar10,teacher=x,cpu20' -> {'dataset': 'cifar10', 'teacher': 'x', 'budget': 'cpu20', ...}."""
    chosen: dict[str, str] = {}
    for token in filter(None, (arg or "").split(",")):
        if "=" in token:
            key, value = token.split("=", 1)
            if key not in PRESET_KEYS:
                raise ConfigError(f"unknown preset key {key!r}; use {', '.join(k + '=' for k in PRESET_KEYS)}")
            chosen[key] = value
        elif token in DATASETS:
            chosen["dataset"] = token
        elif token in budgets:
            chosen["budget"] = token
        else:
            raise ConfigError(f"unknown preset {token!r}; datasets: {', '.join(DATASETS)}; "
                              f"budgets: {', '.join(budgets)}; or key=value with {', '.join(PRESET_KEYS)}")
    dataset = DATASETS.get(chosen.setdefault("dataset", "digits"))
    if dataset is None:
        raise ConfigError(f"unknown dataset {chosen['dataset']!r}; choose one of {', '.join(DATASETS)}")
    for key in ("teacher", "student", "budget"):
        chosen.setdefault(key, dataset[key])
    chosen.setdefault("teacher_root", TEACHER_ROOT)
    chosen.setdefault("eval", "tfds")
    if chosen["teacher"] not in TEACHERS:
        raise ConfigError(f"unknown teacher {chosen['teacher']!r}; choose one of {', '.join(TEACHERS)}")
    classes = TEACHERS[chosen["teacher"]].get("classes", dataset["classes"])
    if classes != dataset["classes"]:
        raise ConfigError(f"teacher {chosen['teacher']!r} has {classes} classes but dataset {chosen['dataset']!r} "
                          f"has {dataset['classes']}; pick a teacher of that dataset")
    if chosen["budget"] not in budgets:
        raise ConfigError(f"unknown budget {chosen['budget']!r}; choose one of {', '.join(budgets)}")
    if chosen["eval"] not in dataset["eval_data"]:
        raise ConfigError(f"unknown eval={chosen['eval']!r}; choose one of {', '.join(dataset['eval_data'])}")
    return chosen


def merge(config: ml_collections.ConfigDict, overrides: dict) -> None:
    for key, value in overrides.items():
        if isinstance(value, dict) and key in config and isinstance(config[key], ml_collections.ConfigDict):
            merge(config[key], value)
        else:
            config[key] = value


def _zoo_file(template: str, root: str) -> str:
    """TEACHER_ROOT/{dataset}_{arch}.pth; the upstream scripts' spelling `wrn40_2` is found too."""
    path = template.format(root=root)
    directory, name = os.path.split(path)
    upstream_name = name.replace("wrn_", "wrn")
    if not os.path.isfile(path) and os.path.isfile(os.path.join(directory, upstream_name)):
        return os.path.join(directory, upstream_name)
    return path


def base_config(method: str, arg: str | None, defaults: dict, budgets: dict[str, dict]) -> ml_collections.ConfigDict:
    """The run config: shared fields, then the method's `defaults`, then the chosen budget's overrides."""
    preset = parse_preset(arg, budgets)
    dataset = DATASETS[preset["dataset"]]
    teacher = copy.deepcopy(TEACHERS[preset["teacher"]])

    config = ml_collections.ConfigDict()
    config.job = "train"
    config.method = method
    config.name = f"{method}_{preset['dataset']}_{preset['teacher']}_{preset['student']}_{preset['budget']}"
    config.seed = 0
    config.progress = True

    config.teacher = ml_collections.ConfigDict(dict(
        source=teacher["source"], arch=teacher["arch"], options=teacher.get("options", {}),
        torch_file=_zoo_file(teacher.get("torch_file", ""), preset["teacher_root"]),
        normalisation=teacher.get("normalisation", "cifar10"),
        mean=tuple(teacher.get("mean", ())), std=tuple(teacher.get("std", ())),  # () = from `normalisation`
        dir="", train_epochs=teacher.get("train_epochs", 0), train_batch_size=teacher.get("train_batch_size", 0),
        train_lr=teacher.get("train_lr", 0.1)))
    config.data = ml_collections.ConfigDict(dict(image_shape=dataset["image_shape"],
                                                 label_embedding_file=dataset["label_embedding"]))
    config.student = ml_collections.ConfigDict(dict(
        arch=preset["student"], options={"shortcut": "A"} if preset["student"] in _HE_RESNETS else {},
        batch_size=256, lr=0.1, momentum=0.9, weight_decay=1e-4, schedule="multistep", milestones=(0.6, 0.75, 0.9),
        eta_min=0.0, warmup_epochs=0, temperature=20.0, loss="kl",
        init="upstream"))  # as the student's PyTorch layout initialises it (models/layers.py INITS)
    config.synthesis = ml_collections.ConfigDict()
    config.schedule = ml_collections.ConfigDict(dict(epochs=200, warmup=0, kd_steps=400, cycles=1))
    # capacity 0: all the schedule keeps; sampling: uniform, or label_pairs (every label at least twice per batch).
    config.pool = ml_collections.ConfigDict(dict(capacity=0, dtype="uint8", sampling="uniform"))
    config.eval = ml_collections.ConfigDict(dict(data=dataset["eval_data"][preset["eval"]], split="test",
                                                 data_dir="", every_epochs=1, batch_size=512))
    config.checkpoint = ml_collections.ConfigDict(dict(every_epochs=1, keep=2))
    # Probes of the final student on data it never saw, written to summary.json (dfkd_jax/transfer.py): a linear
    # probe and/or a fine-tune on `train`, scored on `test` (digits, an .npz, a tfds name). modes=() probes nothing.
    config.transfer = ml_collections.ConfigDict(dict(
        modes=(), train="", test="", train_split="train", test_split="test", data_dir="", limit_train=0,
        limit_test=0, features="penultimate", epochs=10, lr=0.01, batch_size=128, weight_decay=5e-4))
    merge(config, copy.deepcopy(defaults))
    merge(config, copy.deepcopy(budgets[preset["budget"]]))
    return config


_HE_RESNETS = {f"resnet{d}" for d in (20, 32, 44, 56, 110)}
