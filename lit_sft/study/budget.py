"""The study's compute: examples trained over all trials (its budget), the rungs a trial is
judged at, and the baseline trial (the user's own configuration).

A study sized by `budget.total_examples` spends what ASHA saves on more configurations: a new
trial starts while the examples trained so far, by every worker, restart and retry, are below
the budget. The count is read from the storage: a finished trial's `examples_seen` attribute,
a running one's progress (the same attribute, updated at each evaluation by the pruning
callback, or its last report).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from lit_sft.search_space import Param, SearchSpace

BASELINE_ATTR = "baseline"
"""User attr of the enqueued trial that runs the config's own hyperparameters."""
MOVED_ATTR = "baseline_moved"
"""User attr: {name: [config value, value used]} for config values outside the search space."""


def trial_examples(trial: FrozenTrial) -> int:
    """Examples a trial has trained (so far, if it runs)."""
    seen = trial.user_attrs.get("examples_seen")
    last = max(trial.intermediate_values) if trial.intermediate_values else 0
    return int(max(int(seen or 0), int(last)))


@dataclass(frozen=True)
class Spent:
    """The study's examples trained against its budget."""

    examples: int
    total: int | None
    """budget.total_examples; None = no budget."""

    @property
    def left(self) -> int | None:
        return None if self.total is None else max(0, self.total - self.examples)

    @property
    def exhausted(self) -> bool:
        return self.total is not None and self.examples >= self.total

    def describe(self) -> str:
        if self.total is None:
            return f"{self.examples:,} examples trained"
        return f"{self.examples:,} of {self.total:,} examples spent ({self.left:,} left)"


def spent(trials: list[FrozenTrial], total: int | None) -> Spent:
    """What the study's trials have trained: every state but WAITING (a queued trial trained nothing)."""
    return Spent(sum(trial_examples(t) for t in trials if t.state != TrialState.WAITING), total)


def rungs(min_resource: int, reduction_factor: int, min_early_stopping_rate: int, budget: int) -> list[int]:
    """Examples seen at each ASHA rung that decides something: those below a trial's full budget
    (a trial at its full budget is done; a rung there would only mark a full run pruned)."""
    out, k = [], min_early_stopping_rate
    while (at := min_resource * reduction_factor**k) < budget:
        out.append(int(at))
        k += 1
    return out


def full_examples(run_cfg: dict[str, Any]) -> int | None:
    """A run's full length in examples (its max_steps x batch size), None if it has none."""
    steps = run_cfg["trainer"].get("max_steps")
    if not isinstance(steps, int) or steps < 1:
        return None
    return steps * int(run_cfg["data"]["batch_size"])


def first_rung(examples: int, reduction_factor: int, n_rungs: int = 3) -> int:
    """The first rung that puts `n_rungs` rungs at R / rf^(n-1), ..., R / rf, R (R = examples).

    With 3 rungs and a factor of 3, R/9, R/3 and R: a configuration costs about 0.26 R on
    average under successive halving (1/9 + 2/3 x 1/3 ... of the trials reach each rung), so a
    budget of 12 full trials buys about 46 configurations.
    """
    return max(1, math.ceil(examples / reduction_factor ** (n_rungs - 1)))


# ---- the baseline trial ----------------------------------------------------------------------


def _nearest(param: Param, value: Any) -> Any:
    """The value of the space nearest to `value`: the nearest choice, or the range clipped."""
    if param.kind == "categorical":
        if value in param.choices:
            return value
        numbers = [c for c in param.choices if isinstance(c, (int, float)) and not isinstance(c, bool)]
        if isinstance(value, (int, float)) and numbers:
            if param.log or all(c > 0 for c in numbers) and value > 0:
                return min(numbers, key=lambda c: abs(math.log(c) - math.log(value)))
            return min(numbers, key=lambda c: abs(c - value))
        return param.choices[0]
    clipped = min(max(value, param.low), param.high)
    if param.kind == "int":
        clipped = int(round(clipped))
    if param.step:
        clipped = param.low + round((clipped - param.low) / param.step) * param.step
        clipped = min(clipped, param.high)
    return clipped


def _config_value(cfg: dict[str, Any], key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = node[part]
    return node


def baseline_params(space: SearchSpace, cfg: dict[str, Any]) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """The config's hyperparameters as a point of the space (sampled values, as `trial.params`
    holds them), and the entries moved into the space: {name: [config value, value used]}.

    A normalised entry (`scale`) holds sampled = applied / factor, so the trial applies the
    config's own value.
    """
    params: dict[str, Any] = {}
    moved: dict[str, list[Any]] = {}
    plain = [p for p in space.params if p.scale is None]
    for param in plain + [p for p in space.params if p.scale is not None]:
        value = _config_value(cfg, param.key)
        if param.scale is not None:
            value = float(value) / param.scale.factor(params[param.scale.with_])
        near = _nearest(param, value) if value is not None else param.corners[0]
        if near != value:
            moved[param.name] = [value, near]
        params[param.name] = near
    return {p.name: params[p.name] for p in space.params}, moved


def is_baseline(trial: FrozenTrial | Any) -> bool:
    return bool(trial.user_attrs.get(BASELINE_ATTR))
