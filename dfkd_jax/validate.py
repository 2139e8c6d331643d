"""Config validation: every field with a meaningful range is checked before a run writes anything.

A rule names what a field must be; `check` raises a `ConfigError` naming the field, the value and the allowed range.
The shared fields are ruled here (`SHARED_RULES`, plus every `*_weight` of the synthesis and student sections); a
method adds its own fields in `Method.CONFIG_RULES`. Fields a config does not have are not checked, so one table
serves every method.

    config.student.lr = -1.0 is out of range: it must be a number > 0 (--config.student.lr=...)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

from flax import traverse_util

from dfkd_jax import distill, pool, transfer
from dfkd_jax.models.zoo import INIT_CHOICES


class ConfigError(ValueError):
    """A config value out of its range; the message is one line naming the field, the value and the range."""


@dataclasses.dataclass(frozen=True)
class Rule:
    description: str  # completes "it must be ..."
    accepts: Callable[[Any], bool]


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def positive() -> Rule:
    return Rule("a number > 0", lambda v: _is_number(v) and v > 0)


def non_negative() -> Rule:
    return Rule("a number >= 0", lambda v: _is_number(v) and v >= 0)


def fraction() -> Rule:
    """Momenta, betas: [0, 1)."""
    return Rule("a number in [0, 1)", lambda v: _is_number(v) and 0 <= v < 1)


def unit_interval() -> Rule:
    return Rule("a number in [0, 1]", lambda v: _is_number(v) and 0 <= v <= 1)


def integer(minimum: int, maximum: int | None = None) -> Rule:
    bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
    return Rule(f"an integer {bound}",
                lambda v: _is_integer(v) and v >= minimum and (maximum is None or v <= maximum))


def choice(options) -> Rule:
    options = tuple(options)
    return Rule(f"one of {', '.join(map(repr, options))}", lambda v: v in options)


def boolean() -> Rule:
    return Rule("True or False", lambda v: isinstance(v, bool))


def distinct_subset_of(options) -> Rule:
    options = tuple(options)
    return Rule(f"a non-empty list of distinct values from {', '.join(map(repr, options))}",
                lambda v: isinstance(v, (tuple, list)) and len(v) > 0 and len(set(v)) == len(v)
                and all(x in options for x in v))


def subset_of(options) -> Rule:
    options = tuple(options)
    return Rule(f"a list of distinct values from {', '.join(map(repr, options))} (empty: none)",
                lambda v: isinstance(v, (tuple, list)) and len(set(v)) == len(v) and all(x in options for x in v))


def pair_of(rule: Rule) -> Rule:
    return Rule(f"two values, each {rule.description}",
                lambda v: isinstance(v, (tuple, list)) and len(v) == 2 and all(rule.accepts(x) for x in v))


def increasing_fractions() -> Rule:
    return Rule("increasing fractions of training in (0, 1]",
                lambda v: isinstance(v, (tuple, list)) and all(_is_number(x) and 0 < x <= 1 for x in v)
                and list(v) == sorted(set(v)))


def increasing_integers(minimum: int) -> Rule:
    """Milestones in epochs: strictly increasing integers >= minimum (possibly none)."""
    return Rule(f"strictly increasing integers >= {minimum}",
                lambda v: isinstance(v, (tuple, list)) and all(_is_integer(x) and x >= minimum for x in v)
                and list(v) == sorted(set(v)))


def image_shape() -> Rule:
    # The generators upsample twice by 2, so height and width must be multiples of 4; the zoo's stems take RGB.
    return Rule("(height, width, 3) with height and width positive multiples of 4",
                lambda v: isinstance(v, (tuple, list)) and len(v) == 3 and all(_is_integer(x) for x in v)
                and v[0] > 0 and v[1] > 0 and v[0] % 4 == 0 and v[1] % 4 == 0 and v[2] == 3)


SHARED_RULES: dict[str, Rule] = {
    "seed": integer(0),
    "student.batch_size": integer(1), "student.lr": positive(), "student.momentum": fraction(),
    "student.weight_decay": non_negative(), "student.temperature": positive(), "student.eta_min": non_negative(),
    "student.schedule": choice(distill.SCHEDULES), "student.milestones": increasing_fractions(),
    "student.warmup_epochs": integer(0), "student.init": choice(INIT_CHOICES),
    "synthesis.batch_size": integer(1), "synthesis.lr": positive(), "synthesis.betas": pair_of(fraction()),
    "synthesis.g_steps": integer(1), "synthesis.bn_momentum": fraction(),
    "schedule.epochs": integer(1), "schedule.warmup": integer(0), "schedule.kd_steps": integer(0),
    "schedule.cycles": integer(1),
    "data.image_shape": image_shape(),
    "pool.capacity": integer(0), "pool.dtype": choice(pool.DTYPES), "pool.sampling": choice(pool.SAMPLING),
    "eval.every_epochs": integer(1), "eval.batch_size": integer(1),
    "checkpoint.every_epochs": integer(1), "checkpoint.keep": integer(1),
    "transfer.modes": subset_of(transfer.MODES), "transfer.features": choice(transfer.FEATURES),
    "transfer.limit_train": integer(0), "transfer.limit_test": integer(0), "transfer.epochs": integer(1),
    "transfer.lr": positive(), "transfer.batch_size": integer(1), "transfer.weight_decay": non_negative(),
}


def _flat(config) -> dict[str, Any]:
    tree = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {k: v for k, v in traverse_util.flatten_dict(tree, sep=".").items()}


def _fail(field: str, value, requirement: str) -> None:
    raise ConfigError(f"config.{field} = {value!r} is out of range: it must be {requirement} "
                      f"(--config.{field}=...)")


def check(config, device_count: int = 1, method_rules: Mapping[str, Rule] | None = None) -> None:
    """Raise a ConfigError for the first field out of range (fields the config lacks are skipped)."""
    flat = _flat(config)
    rules = dict(SHARED_RULES) | dict(method_rules or {})
    for field, value in flat.items():
        section, _, name = field.rpartition(".")
        if section in ("synthesis", "student") and name.endswith("_weight") and field not in rules:
            rules[field] = non_negative()
    for field, rule in rules.items():
        if field in flat and not rule.accepts(flat[field]):
            _fail(field, flat[field], rule.description)

    # Relations between fields.
    if "student.eta_min" in flat and "student.lr" in flat and flat["student.eta_min"] > flat["student.lr"]:
        _fail("student.eta_min", flat["student.eta_min"], f"<= config.student.lr ({flat['student.lr']!r})")
    if "schedule.warmup" in flat and "schedule.epochs" in flat and flat["schedule.warmup"] > flat["schedule.epochs"]:
        _fail("schedule.warmup", flat["schedule.warmup"], f"<= config.schedule.epochs ({flat['schedule.epochs']})")
    for field in ("synthesis.batch_size", "student.batch_size"):
        if field in flat and flat[field] % device_count:
            _fail(field, flat[field], f"a multiple of the {device_count} devices of the mesh")
    if flat.get("pool.sampling") == "label_pairs" and flat.get("student.batch_size", 0) % 2:
        _fail("student.batch_size", flat["student.batch_size"], "even with config.pool.sampling='label_pairs'")
    for field in ("transfer.train", "transfer.test"):
        if flat.get("transfer.modes") and not flat.get(field):
            _fail(field, flat.get(field), "a data source (digits, an .npz or a tfds name) when "
                                          "config.transfer.modes is set")
