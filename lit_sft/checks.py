"""Range checks for every numeric config value a user sets, before any model, study or W&B run exists.

The type of each key is checked by the parser (jsonargparse, from the signatures); what a type
cannot say lives here: a learning rate must be positive, a ratio lies in [0, 1], a micro-batch
divides its batch. Each rule names its dotted key, so the one line a user sees says what to fix.
The same rules run on the parsed config and on every corner of a search space
(`lit_sft.search_space.check_corners`), so a choice that would kill a trial is refused up front.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Check = Callable[[Any], bool]


@dataclass(frozen=True)
class Rule:
    key: str
    """Dotted config key, e.g. model.learning_rate."""
    ok: Check
    """Whether a (non-null) value is acceptable."""
    wants: str
    """What an acceptable value is, for the message: "> 0", "in [0, 1]"."""
    nullable: bool = False


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def positive(key: str, nullable: bool = False) -> Rule:
    return Rule(key, lambda v: _number(v) and v > 0, "> 0", nullable)


def non_negative(key: str, nullable: bool = False) -> Rule:
    return Rule(key, lambda v: _number(v) and v >= 0, ">= 0", nullable)


def at_least(key: str, low: int, nullable: bool = False) -> Rule:
    return Rule(key, lambda v: _integer(v) and v >= low, f"an integer >= {low}", nullable)


def within(key: str, low: float, high: float, *, open_low: bool = False, open_high: bool = False) -> Rule:
    def ok(v: Any) -> bool:
        return _number(v) and (v > low if open_low else v >= low) and (v < high if open_high else v <= high)

    return Rule(key, ok, f"in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}")


RULES: tuple[Rule, ...] = (
    positive("model.learning_rate"),
    non_negative("model.weight_decay"),
    within("model.warmup_ratio", 0, 1),
    within("model.min_lr_ratio", 0, 1),
    Rule("model.betas", lambda v: len(v) == 2 and all(_number(b) and 0 <= b < 1 for b in v), "two numbers in [0, 1)"),
    positive("model.gradient_clip_val", nullable=True),
    at_least("data.batch_size", 1),
    at_least("data.micro_batch_size", 1, nullable=True),
    at_least("data.max_length", 8),
    at_least("data.eval_size", 1),
    within("data.eval_max_fraction", 0, 1, open_low=True, open_high=True),
    at_least("data.num_validation_problems", 1),
    at_least("data.num_test_problems", 1),
    at_least("data.num_generated", 1),
    at_least("data.num_workers", 0),
    at_least("trainer.max_steps", 1),
    Rule("trainer.val_check_interval", lambda v: (_integer(v) and v >= 1) or (isinstance(v, float) and 0 < v <= 1),
         "an integer >= 1 (optimizer steps) or a fraction in (0, 1]", nullable=True),
    at_least("trainer.log_every_n_steps", 1, nullable=True),
    at_least("budget.examples", 1, nullable=True),
    at_least("budget.eval_every_examples", 1, nullable=True),
    at_least("budget.total_examples", 1, nullable=True),
    Rule("budget.eval_at_examples", lambda v: all(_integer(x) and x >= 1 for x in v), "a list of integers >= 1", nullable=True),
    at_least("early_stopping.patience", 1),
    non_negative("early_stopping.min_delta"),
    Rule("early_stopping.mode", lambda v: v in ("min", "max"), "min or max"),
    Rule("wandb.mode", lambda v: v in ("offline", "online", "disabled"), "offline, online or disabled"),
)
"""The evaluator and study sections are checked by their own dataclasses (EvaluatorConfig,
StudyConfig), which the tuner and the evaluator build from the same values."""


def lookup(cfg: dict[str, Any], key: str) -> tuple[bool, Any]:
    """(found, value) of a dotted key."""
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _shown(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def range_problems(cfg: dict[str, Any]) -> list[str]:
    """Every out-of-range value of `cfg`, one message each naming its key."""
    problems = []
    for rule in RULES:
        found, value = lookup(cfg, rule.key)
        if not found or (value is None and rule.nullable):
            continue
        try:
            good = value is not None and rule.ok(value)
        except TypeError:
            good = False
        if not good:
            problems.append(f"{rule.key} must be {rule.wants}, got {_shown(value)}")
    problems.extend(_relations(cfg))
    return problems


def _relations(cfg: dict[str, Any]) -> list[str]:
    """Rules over two keys. (data.micro_batch_size need not divide data.batch_size: a larger one
    is capped at the batch, a remainder makes a smaller last micro-batch, and the loss is
    weighted by target tokens, so the step's gradient is exact either way.)"""
    from lit_sft.config import apply_budget

    trainer = cfg.get("trainer") or {}
    steps, every = trainer.get("max_steps"), trainer.get("val_check_interval")
    if not (_integer(steps) and _integer(every) and steps >= 1 and every >= 1) or trainer.get("limit_val_batches") == 0:
        return []  # (limit_val_batches 0: validation is switched off on purpose)
    try:
        run = apply_budget(cfg)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return []  # a bad batch size: its own rule reports it
    steps, every = run["trainer"]["max_steps"], run["trainer"]["val_check_interval"]
    if every > steps:
        return [f"trainer.val_check_interval ({every} steps) > trainer.max_steps ({steps}): no evaluation would run, "
                "so there would be no eval/loss and no best model"]
    return []
