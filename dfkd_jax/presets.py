"""Presets shared by every method config in configs/: teachers, datasets, preset parsing and the fields of a run.

Presets come after ':' in --config, comma-separated: a dataset (`digits`, `cifar10`), a budget (per method, e.g.
`cpu20`, `paper`) and `key=value` pairs (`teacher=akamaster_resnet56`, `student=resnet20`, `budget=cpu20`):

    python -m dfkd_jax.main --config=configs/nayer.py:cifar10,teacher=akamaster_resnet56,budget=cpu20
"""

from __future__ import annotations

import copy
from typing import Any

import ml_collections

SHARED = "../shared"

TEACHERS: dict[str, dict[str, Any]] = {
    # The embedded default: trained by the project on scikit-learn's digits on first use (no files needed).
    "digits_resnet20": dict(source="digits", arch="resnet20", options={"shortcut": "A"}, train_epochs=8,
                            train_batch_size=64, train_lr=0.1),
    **{f"akamaster_resnet{d}": dict(source="torch", torch_file=f"{SHARED}/teachers/akamaster/resnet{d}-{tag}.th",
                                    arch=f"resnet{d}", normalisation="imagenet", options={})
       for d, tag in [(20, "12fca82f"), (32, "d509ac18"), (44, "014dd654"), (56, "4bfd9763")]},
    **{f"chenyaofo_resnet{d}": dict(source="torch", torch_file=f"{SHARED}/teachers/chenyaofo/cifar10_resnet{d}.pth",
                                    arch=f"resnet{d}", normalisation="cifar10", options={})
       for d in (20, 32, 44, 56)},
}

DATASETS: dict[str, dict[str, Any]] = {
    "digits": dict(image_shape=(16, 16, 3), eval_data="digits", teacher="digits_resnet20", student="wrn_16_1",
                   budget="digits"),
    "cifar10": dict(image_shape=(32, 32, 3), eval_data=f"{SHARED}/data/cifar10_test_exact932.npz",
                    teacher="akamaster_resnet56", student="resnet20", budget="paper"),
}


def parse_preset(arg: str | None, budgets: dict) -> dict[str, str]:
    """'cifar10,teacher=x,cpu20' -> {'dataset': 'cifar10', 'teacher': 'x', 'budget': 'cpu20'}."""
    chosen: dict[str, str] = {}
    for token in filter(None, (arg or "").split(",")):
        if "=" in token:
            key, value = token.split("=", 1)
            if key not in ("dataset", "teacher", "student", "budget"):
                raise ValueError(f"unknown preset key {key!r}; use dataset=, teacher=, student= or budget=")
            chosen[key] = value
        elif token in DATASETS:
            chosen["dataset"] = token
        elif token in budgets:
            chosen["budget"] = token
        else:
            raise ValueError(f"unknown preset {token!r}; datasets: {', '.join(DATASETS)}; "
                             f"budgets: {', '.join(budgets)}")
    dataset = DATASETS.get(chosen.setdefault("dataset", "digits"))
    if dataset is None:
        raise ValueError(f"unknown dataset {chosen['dataset']!r}; choose one of {', '.join(DATASETS)}")
    for key in ("teacher", "student", "budget"):
        chosen.setdefault(key, dataset[key])
    if chosen["teacher"] not in TEACHERS:
        raise ValueError(f"unknown teacher {chosen['teacher']!r}; choose one of {', '.join(TEACHERS)}")
    if chosen["budget"] not in budgets:
        raise ValueError(f"unknown budget {chosen['budget']!r}; choose one of {', '.join(budgets)}")
    return chosen


def _merge(config: ml_collections.ConfigDict, overrides: dict) -> None:
    for key, value in overrides.items():
        if isinstance(value, dict) and key in config and isinstance(config[key], ml_collections.ConfigDict):
            _merge(config[key], value)
        else:
            config[key] = value


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
        torch_file=teacher.get("torch_file", ""), normalisation=teacher.get("normalisation", "cifar10"),
        dir="", train_epochs=teacher.get("train_epochs", 0), train_batch_size=teacher.get("train_batch_size", 0),
        train_lr=teacher.get("train_lr", 0.1)))
    config.data = ml_collections.ConfigDict(dict(image_shape=dataset["image_shape"]))
    config.student = ml_collections.ConfigDict(dict(
        arch=preset["student"], options={"shortcut": "A"} if preset["student"] in _HE_RESNETS else {},
        batch_size=256, lr=0.1, momentum=0.9, weight_decay=1e-4, schedule="multistep", milestones=(0.6, 0.75, 0.9),
        eta_min=0.0, temperature=20.0, loss="kl"))
    config.synthesis = ml_collections.ConfigDict()
    config.schedule = ml_collections.ConfigDict(dict(epochs=200, warmup=0, kd_steps=400, cycles=1))
    config.pool = ml_collections.ConfigDict(dict(capacity=0, dtype="uint8"))  # capacity 0: all the schedule keeps
    config.eval = ml_collections.ConfigDict(dict(data=dataset["eval_data"], split="test", data_dir="",
                                                 every_epochs=1, batch_size=512))
    config.checkpoint = ml_collections.ConfigDict(dict(every_epochs=1, keep=2))
    _merge(config, copy.deepcopy(defaults))
    _merge(config, copy.deepcopy(budgets[preset["budget"]]))
    return config


_HE_RESNETS = {f"resnet{d}" for d in (20, 32, 44, 56, 110)}
