"""The search space: a YAML mapping of hyperparameters to ranges and the config keys they set.

```yaml
learning_rate: {kind: float, low: 5.0e-6, high: 1.0e-4, log: true, key: model.learning_rate}
batch_size:    {kind: categorical, choices: [32, 64, 128, 256], key: data.batch_size}
```

Kinds map one-to-one onto Optuna's `suggest_float`, `suggest_int` and `suggest_categorical`,
so a space file says exactly what the sampler does. Every problem in the file is collected and
raised once, naming the file, line and entry.

A float entry may be searched normalised by another entry (`scale`):

```yaml
learning_rate:
  kind: float
  low: 1.0e-4
  high: 3.0e-2
  log: true
  key: model.learning_rate
  scale: {with: batch_size, rule: sqrt, reference: 32}   # applied = sampled x sqrt(batch_size / 32)
```

The sampler proposes (and Optuna records in `trial.params`) the normalised value; the trial's
config gets `sampled x (batch_size / reference) ** p`, p = 1/2 for `sqrt`, 1 for `linear`.
Square-root scaling is the usual rule for Adam-type optimisers: the best learning rate grows
with the square root of the batch, so one region of the normalised value suits every batch
size and the sampler need not find it again per batch size. The range is that of the value at
the reference batch; the config's range checks run on the applied values.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lit_sft.errors import UserError

KINDS = ("float", "int", "categorical")
_RANGE_FIELDS = {"low", "high", "log", "step"}
_FIELDS = {"float": _RANGE_FIELDS | {"scale"}, "int": _RANGE_FIELDS, "categorical": {"choices"}}
_COMMON = {"kind", "key"}
SCALE_RULES = {"sqrt": 0.5, "linear": 1.0}
"""The exponent each `scale.rule` raises (with / reference) to."""
_SCALE_FIELDS = ("with", "rule", "reference")


@dataclass(frozen=True)
class Scale:
    """A float entry searched normalised: applied = sampled x (value of `with` / reference) ** exponent."""

    with_: str
    """Name of the entry (in the same file) whose value scales this one, e.g. batch_size."""
    rule: str
    """sqrt or linear (SCALE_RULES)."""
    reference: float
    """The value of `with` at which the applied value equals the sampled one."""

    def factor(self, other: Any) -> float:
        return (float(other) / self.reference) ** SCALE_RULES[self.rule]

    def describe(self, name: str) -> str:
        """`learning_rate = sampled x sqrt(batch_size / 32)`: the rule in the report's words."""
        ratio = f"{self.with_} / {self.reference:g}"
        return f"{name} = sampled x {'sqrt(' + ratio + ')' if self.rule == 'sqrt' else '(' + ratio + ')'}"


@dataclass(frozen=True)
class Param:
    """One hyperparameter: its Optuna distribution and the dotted config key it sets."""

    name: str
    kind: str
    key: str
    """Dotted path into the config, e.g. model.learning_rate."""
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] = ()
    scale: Scale | None = None
    """Searched normalised: the config gets the sampled value times this factor."""
    line: int | None = None
    """Line of the entry in its file, for messages."""

    def suggest(self, trial: Any) -> Any:
        if self.kind == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            return trial.suggest_int(self.name, self.low, self.high, log=self.log, step=self.step or 1)
        return trial.suggest_categorical(self.name, list(self.choices))

    @property
    def corners(self) -> tuple[Any, ...]:
        """The values that bound what the sampler can propose: low and high, or every choice."""
        return self.choices if self.kind == "categorical" else (self.low, self.high)

    @property
    def largest(self) -> Any:
        """The largest value this parameter can take (for sizing the pruner's first rung)."""
        return max(self.choices) if self.kind == "categorical" else self.high


@dataclass(frozen=True)
class SearchSpace:
    path: Path
    params: tuple[Param, ...]

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.params]

    def by_key(self, key: str) -> Param | None:
        return next((p for p in self.params if p.key == key), None)

    def suggest(self, trial: Any) -> dict[str, Any]:
        """Ask the trial for a value of every parameter, in file order."""
        return {p.name: p.suggest(trial) for p in self.params}

    @property
    def scaled(self) -> bool:
        """Whether any entry is searched normalised (its applied value differs from the sampled)."""
        return any(p.scale is not None for p in self.params)

    def scales(self) -> dict[str, str]:
        """Each normalised entry's rule in words, by name (empty when none is normalised)."""
        return {p.name: p.scale.describe(p.name) for p in self.params if p.scale is not None}

    def applied(self, values: dict[str, Any]) -> dict[str, Any]:
        """The values the config gets: sampled ones, with every `scale` applied."""
        out = dict(values)
        for param in self.params:
            if param.scale is not None:
                out[param.name] = float(values[param.name]) * param.scale.factor(values[param.scale.with_])
        return out

    def apply(self, cfg: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
        """A deep copy of `cfg` with each parameter's applied value (`applied`) at its dotted key;
        `values` are the sampled ones, as in `trial.params`."""
        out = copy.deepcopy(cfg)
        for name, value in self.applied(values).items():
            param = next(p for p in self.params if p.name == name)
            *parents, leaf = param.key.split(".")
            node = out
            for part in parents:
                node = node[part]
            node[leaf] = value
        return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number(value: Any) -> Any:
    # YAML 1.1 (PyYAML) reads `5e-6` (no dot) as a string; accept what is plainly a number.
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _has_key(cfg: dict[str, Any], dotted: str) -> bool:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return not isinstance(node, dict)


def _line_numbers(text: str) -> dict[str, int]:
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return {}
    if not isinstance(root, yaml.MappingNode):
        return {}
    return {key.value: key.start_mark.line + 1 for key, _ in root.value if isinstance(key, yaml.ScalarNode)}


def _check_entry(name: str, entry: Any, cfg: dict[str, Any] | None) -> tuple[Param | None, list[str]]:
    """A Param from one entry, or the problems that prevent it."""
    if not isinstance(entry, dict):
        return None, [f"expected a mapping with kind, key and a range or choices, got {entry!r}"]
    problems: list[str] = []
    kind = entry.get("kind")
    if kind not in KINDS:
        problems.append(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    key = entry.get("key")
    if not isinstance(key, str) or not key:
        problems.append("key is missing: the dotted config key this parameter sets, e.g. model.learning_rate")
    elif cfg is not None and not _has_key(cfg, key):
        problems.append(f"key {key!r} maps to no config key")
    allowed = _COMMON | _FIELDS.get(kind, set().union(*_FIELDS.values()))
    for unknown in sorted(set(entry) - allowed, key=str):
        problems.append(f"unknown field {unknown!r} (allowed for kind {kind}: {', '.join(sorted(allowed))})")
    if kind == "categorical":
        choices = entry.get("choices")
        if not isinstance(choices, list) or not choices:
            problems.append("choices must be a non-empty list")
        else:
            bad = [c for c in choices if not (c is None or isinstance(c, (bool, int, float, str)))]
            if bad:
                problems.append(f"choices must be numbers, strings, booleans or null, got {bad!r}")
            if len({repr(c) for c in choices}) != len(choices):
                problems.append(f"choices repeat a value: {choices!r}")
        if problems:
            return None, problems
        return Param(name, kind, key, choices=tuple(choices)), []
    if kind in ("float", "int"):
        low, high, step = (_number(entry.get(f)) for f in ("low", "high", "step"))
        log = entry.get("log", False)
        number_ok = _is_number if kind == "float" else (lambda v: isinstance(v, int) and not isinstance(v, bool))
        for field_name, value in (("low", low), ("high", high)):
            if value is None:
                problems.append(f"{field_name} is missing")
            elif not number_ok(value):
                problems.append(f"{field_name} must be {'a number' if kind == 'float' else 'an integer'}, got {value!r}")
        if step is not None and (not number_ok(step) or step <= 0):
            problems.append(f"step must be a positive {'number' if kind == 'float' else 'integer'}, got {step!r}")
        if not isinstance(log, bool):
            problems.append(f"log must be true or false, got {log!r}")
        ranged = number_ok(low) and number_ok(high)
        if ranged and low > high:
            problems.append(f"low ({low}) > high ({high})")
        if log is True and ranged and low <= 0:
            problems.append(f"log scale needs low > 0, got low={low}")
        if log is True and step is not None:
            problems.append("log and step cannot be combined (Optuna samples either on a log scale or on a grid)")
        scale, scale_problems = _check_scale(entry["scale"]) if "scale" in entry else (None, [])
        problems += scale_problems
        if problems:
            return None, problems
        if kind == "float":
            low, high = float(low), float(high)
        return Param(name, kind, key, low=low, high=high, log=log, step=step, scale=scale), []
    return None, problems


def _check_scale(raw: Any) -> tuple[Scale | None, list[str]]:
    """The fields of one `scale` mapping; whether `with` names a usable entry is checked once all
    entries are read (`_scale_problems`)."""
    wanted = "scale must be a mapping {with: <entry>, rule: sqrt | linear, reference: <number > 0>}"
    if not isinstance(raw, dict):
        return None, [f"{wanted}, got {raw!r}"]
    problems = [f"scale: unknown field {k!r} (allowed: {', '.join(_SCALE_FIELDS)})" for k in sorted(set(raw) - set(_SCALE_FIELDS), key=str)]
    problems += [f"scale.{k} is missing ({wanted})" for k in _SCALE_FIELDS if k not in raw]
    other, rule, reference = raw.get("with"), raw.get("rule"), _number(raw.get("reference"))
    if "with" in raw and (not isinstance(other, str) or not other):
        problems.append(f"scale.with must name another entry of this file, got {other!r}")
    if "rule" in raw and rule not in SCALE_RULES:
        problems.append(f"scale.rule must be one of {', '.join(SCALE_RULES)}, got {rule!r}")
    if "reference" in raw and not (_is_number(reference) and math.isfinite(reference) and reference > 0):
        problems.append(f"scale.reference must be a number > 0, got {raw.get('reference')!r}")
    if problems:
        return None, problems
    return Scale(with_=other, rule=rule, reference=float(reference)), []


def _scale_problems(name: str, with_: str, raw: dict[str, Any]) -> list[str]:
    """What keeps entry `with_` from scaling entry `name`: it must be another entry of the file,
    not normalised itself, and take only positive numbers."""
    other = raw.get(with_)
    if with_ == name:
        return [f"scale.with names the entry itself ({name!r}), not another entry such as batch_size"]
    if with_ not in raw:
        known = ", ".join(str(n) for n in raw if n != name)
        return [f"scale.with {with_!r} is no entry of this file (entries: {known})"]
    if not isinstance(other, dict):
        return []  # that entry's own problem is reported there
    if isinstance(other.get("scale"), dict):
        return [f"scale.with {with_!r} is normalised itself: scale by an entry that is searched as it is"]
    if other.get("kind") == "categorical":
        values = other.get("choices") if isinstance(other.get("choices"), list) else []
    elif other.get("kind") in ("float", "int"):
        values = [_number(other.get("low")), _number(other.get("high"))]
    else:
        return []
    bad = [v for v in values if not (_is_number(v) and v > 0)]
    if bad:
        return [f"scale.with {with_!r} can take {', '.join(repr(v) for v in bad)}, and a scale needs positive numbers"]
    return []


def load_search_space(path: str | Path, cfg: dict[str, Any] | None = None) -> SearchSpace:
    """Read and validate a search space file; with `cfg`, every key must exist in it."""
    from lit_sft.yamlfile import read_yaml

    path = Path(path)
    text, raw = read_yaml(path, "search space")
    if not isinstance(raw, dict) or not raw:
        raise UserError(f"{path}: expected a mapping of hyperparameter names to entries, got {type(raw).__name__}")
    lines = _line_numbers(text)
    params: list[Param] = []
    problems: list[str] = []
    for name, entry in raw.items():
        param, entry_problems = _check_entry(str(name), entry, cfg)
        where = f"line {lines[name]}, {name}" if name in lines else str(name)
        problems.extend(f"{where}: {p}" for p in entry_problems)
        scaled = isinstance(entry, dict) and entry.get("kind") == "float" and isinstance(entry.get("scale"), dict)
        other = entry["scale"].get("with") if scaled else None
        if isinstance(other, str) and other:
            # Checked even when the entry has other problems, so one run reports everything.
            scale_problems = _scale_problems(str(name), other, raw)
            problems.extend(f"{where}: {p}" for p in scale_problems)
            param = None if scale_problems else param
        if param is not None:
            params.append(dataclasses.replace(param, line=lines.get(name)))
    # Checked over all entries, valid or not, so one run reports everything.
    keys = {name: entry["key"] for name, entry in raw.items() if isinstance(entry, dict) and isinstance(entry.get("key"), str)}
    for key in sorted({k for k in keys.values() if list(keys.values()).count(k) > 1}):
        names = [str(name) for name, k in keys.items() if k == key]
        problems.append(f"{', '.join(names)}: all set {key}, and each config key may be searched once")
    _raise(path, problems)
    space = SearchSpace(path=path, params=tuple(params))
    if cfg is not None:
        _raise(path, corner_problems(space, cfg))
    return space


def _raise(path: Path, problems: list[str]) -> None:
    if problems:
        count = f"{len(problems)} problems" if len(problems) > 1 else "1 problem"
        raise UserError(f"search space {path}: {count}: " + "; ".join(problems))


MAX_CORNERS = 4096
"""Beyond this many combinations, each parameter's corners are checked with the others at the config's values."""


def corner_problems(space: SearchSpace, cfg: dict[str, Any]) -> list[str]:
    """What the config's range checks say of every corner of the space (each combination of
    bounds and choices), so a value that would kill a trial is refused before the study starts."""
    from lit_sft.checks import range_problems

    combos = 1
    for param in space.params:
        combos *= len(param.corners)
    if combos <= MAX_CORNERS:
        points = [dict(zip(space.names, values)) for values in itertools.product(*(p.corners for p in space.params))]
    else:
        points = [{param.name: value} for param in space.params for value in param.corners]
    base = set(range_problems(cfg))
    problems: dict[str, str] = {}
    for point in points:
        values = {p.name: point.get(p.name, _current(cfg, p.key)) for p in space.params}
        applied = space.applied(values)
        # The checks run on the applied values: a normalised entry's corner is only out of range
        # at some value of the entry that scales it.
        for problem in range_problems(space.apply(cfg, values)):
            if problem in base or problem in problems:
                continue
            # Name the entries the problem is about (its key), else every entry of the corner.
            involved = [p for p in space.params if p.name in point and p.key in problem] or [p for p in space.params if p.name in point]
            for param in list(involved):
                if param.scale is not None:  # the entry that scales it is part of the corner
                    involved += [p for p in space.params if p.name == param.scale.with_ and p not in involved]
            named = ", ".join(f"{p.name}={values[p.name]!r}{_applied_note(p, applied)}{_where(p)}" for p in involved)
            problems[problem] = f"{named}: {problem}"
    return list(problems.values())


def _applied_note(param: Param, applied: dict[str, Any]) -> str:
    return f" (applied {applied[param.name]:.6g})" if param.scale is not None else ""


def _current(cfg: dict[str, Any], key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = node[part]
    return node


def _where(param: Param) -> str:
    return f" (line {param.line})" if param.line else ""
