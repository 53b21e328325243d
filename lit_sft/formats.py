"""Record schemas of training and validation files -> `Example` (SFT) and `Problem` (accuracy).

A file's schema is told by its first record's field names (or given explicitly):

- ``prompt_response``: ``{prompt, response[, ground_truth]}``, r1_zero traces (math/sft.jsonl).
- ``problem_answer``: ``{problem, answer}``, problems without a worked solution (MATH test split);
  usable for validation only.
- ``question_answer``: ``{question, answer}`` where ``answer`` is worked steps ending in
  ``#### N`` (GSM8K).
- ``problem_solution``: ``{problem, solution}`` with the answer in the solution's last
  ``\\boxed{}`` (MATH train split).

Records without a prompt are put into the r1_zero template (`r1_zero_prompt`).
"""

from __future__ import annotations

import json
import re
import dataclasses
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Callable, TypeVar

from lit_sft.errors import UserError

SCHEMAS: tuple[str, ...] = ("prompt_response", "problem_answer", "question_answer", "problem_solution")
FIELDS: tuple[str, ...] = ("prompt", "response", "ground_truth", "problem", "answer", "question", "solution")
"""Every field a schema reads; a column map (data.columns) may rename any of them."""
_NEEDS = {
    "example": {"prompt_response": ("prompt", "response"), "question_answer": ("question", "answer"),
                "problem_solution": ("problem", "solution")},
    "problem": {"prompt_response": ("prompt", "ground_truth"), "problem_answer": ("problem", "answer"),
                "question_answer": ("question", "answer"), "problem_solution": ("problem", "solution")},
}
"""The fields a record must have, per use and schema (a table is checked for the columns up front)."""
_EXPECTED = (
    "prompt+response[+ground_truth], problem+answer, question+answer (answer ending in '#### N'), "
    "problem+solution (answer in \\boxed{})"
)
# GSM8K's calculator annotations, e.g. "48/2 = <<48/2=24>>24": noise for a model that writes prose.
_CALCULATOR = re.compile(r"<<[^<>]*>>")
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")

T = TypeVar("T")


@dataclass(frozen=True)
class Example:
    """One SFT training record."""

    prompt: str
    """The text the model is conditioned on; ends with "Assistant: <think>" for r1_zero."""
    response: str
    """The text the model learns to produce: " ... </think> <answer>X</answer>" for r1_zero."""
    answer: str | None
    """The ground-truth answer when the record has one (to keep only correct traces, say)."""
    where: str = dataclasses.field(default="", compare=False)
    """Where the record is ("file:line", "dataset, row i"), for a message about it after conversion."""


@dataclass(frozen=True)
class Problem:
    """One validation problem for accuracy."""

    prompt: str
    """The r1_zero prompt (ends with "<think>")."""
    answer: str
    """The ground truth: an answer, or a full solution with \\boxed{} (grading accepts both)."""


class Fields(dict):
    """A record's values under the schema's field names, and how messages name each field: by the
    source's own column (a column map renames `q` to `question`), as a JSONL "field" or a table's
    "column"."""

    def __init__(self, record: dict, columns: dict[str, str] | None = None, noun: str = "field") -> None:
        columns = columns or {}
        # A mapped field hides a column of the same name: the map says which one is meant.
        values = {k: v for k, v in record.items() if k not in columns}
        values.update({f: record[c] for f, c in columns.items() if c in record})
        super().__init__(values)
        self.columns = columns
        self.noun = noun


def _name(record: dict, field: str) -> str:
    """How a message names `field` of `record`: "field 'answer'", or "column 'a'" under a map."""
    columns = getattr(record, "columns", {})
    return f"{getattr(record, 'noun', 'field')} '{columns.get(field, field)}'"


@cache
def _r1_zero_template() -> str:
    text = resources.files("lit_sft").joinpath("prompts/r1_zero.prompt").read_text(encoding="utf-8")
    # Editors append a newline; the prompt must end exactly at "<think>" for the response to continue it.
    return text.rstrip("\n")


def r1_zero_prompt(question: str) -> str:
    """The r1_zero prompt for one question; it ends with "Assistant: <think>"."""
    # replace, not str.format: a literal brace in the template must never be read as a field.
    return _r1_zero_template().replace("{question}", question.strip())


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``, ``\\boxed X``) in text, else None.

    Braces nest (``\\boxed{\\frac{1}{2}}``) and escaped braces (``\\{``) do not count.
    None also when the last box is not closed: an earlier box is not the stated final answer.
    """
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = start + len("\\boxed" if text.startswith("\\boxed", start) else "\\fbox")
    if text.startswith(" ", i):
        # "\boxed 5$": the old MATH form without braces runs to the closing dollar.
        return text[i:].split("$", 1)[0].strip() or None
    if not text.startswith("{", i):
        return None
    depth = 0
    k = i
    while k < len(text):
        char = text[k]
        if char == "\\":
            k += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : k]
        k += 1
    return None


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """The records of a JSON-lines file as (line number, record); blank lines are skipped.

    Raises UserError naming the file for a missing, unreadable or empty file, and file:line for a
    line that is not UTF-8, not JSON, or not a JSON object.
    """
    path = Path(path)
    try:
        with path.open("rb") as lines:
            records = [_parse_line(raw, path, number) for number, raw in enumerate(lines, start=1) if raw.strip()]
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, expected a .jsonl file") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e.strerror or e}") from None
    if not records:
        raise UserError(f"{path}: empty file (no records)")
    return records


def _parse_line(raw: bytes, path: Path, number: int) -> tuple[int, dict]:
    where = f"{path}:{number}"
    try:
        # A byte-order mark, which some editors write, is not JSON.
        text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{where}: not UTF-8 text (byte {e.start + 1})") from None
    # Without its line break: JSON would place an error at the end of the line on "line 2, column 1".
    text = text.rstrip("\r\n")
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        at_end = ", end of line" if e.pos >= len(text) else ""
        raise UserError(f"{where}: invalid JSON: {e.msg} (column {e.colno}{at_end})") from None
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object per line, got {_json_type(record)}")
    return number, record


def detect_schema(record: dict) -> str:
    """The schema name of a record, told by its field names (see the module docstring)."""
    return _detect(record, where="record")


def _detect(record: Any, *, where: str) -> str:
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object, got {_json_type(record)}")
    fields = record.keys()
    noun = getattr(record, "noun", "field")
    # Most specific first: a MATH record may carry both a solution and an answer.
    if "prompt" in fields and "response" in fields:
        return "prompt_response"
    if "problem" in fields and "solution" in fields:
        return "problem_solution"
    if "question" in fields and "answer" in fields:
        return "question_answer"
    if "problem" in fields and "answer" in fields:
        return "problem_answer"
    raise UserError(f"{where}: cannot tell the record schema from its {noun}s {sorted(fields)}; expected {_EXPECTED}")


def to_example(record: dict, *, where: str) -> Example:
    """One SFT example from a record of any schema but problem_answer (which has no worked solution)."""
    return _to_example(record, _detect(record, where=where), where)


def to_problem(record: dict, *, where: str) -> Problem:
    """One validation problem from a record of any schema (prompt_response needs ground_truth)."""
    return _to_problem(record, _detect(record, where=where), where)


def load_examples(path: str | Path, schema: str | None = None) -> list[Example]:
    """The SFT examples of a JSON-lines file; `schema` overrides detection from the first record."""
    return examples_from(_jsonl_records(path), str(path), schema)


def load_problems(path: str | Path, schema: str | None = None) -> list[Problem]:
    """The validation problems of a JSON-lines file; `schema` overrides detection from the first record."""
    return problems_from(_jsonl_records(path), str(path), schema)


def _jsonl_records(path: str | Path) -> list[tuple[str, dict]]:
    return [(f"{path}:{line}", record) for line, record in read_jsonl(path)]


Records = list[tuple[str, dict]]
"""(where, record) pairs: where is "file:line" or "dataset, row i", named in every message."""


def examples_from(records: Records, label: str, schema: str | None = None, *, columns: dict[str, str] | None = None,
                  table: tuple[str, ...] | None = None, columns_key: str = "a column map") -> list[Example]:
    """The SFT examples of `records` (from `label`). `columns` maps schema fields to the source's
    columns; `table` is the source's column names when it is a table (checked up front, and
    messages then say "column"); `columns_key` is the config key a message suggests for a map."""
    return _load(records, label, schema, _to_example, "example", columns, table, columns_key)


def problems_from(records: Records, label: str, schema: str | None = None, *, columns: dict[str, str] | None = None,
                  table: tuple[str, ...] | None = None, columns_key: str = "a column map") -> list[Problem]:
    """The validation problems of `records`; the arguments are those of `examples_from`."""
    return _load(records, label, schema, _to_problem, "problem", columns, table, columns_key)


def _load(records: Records, label: str, schema: str | None, convert: Callable[[dict, str, str], T], use: str,
          columns: dict[str, str] | None, table: tuple[str, ...] | None, columns_key: str) -> list[T]:
    noun = "field" if table is None else "column"
    rows = [(where, Fields(record, columns, noun)) for where, record in records]
    if not rows:
        raise UserError(f"{label}: no records")
    if schema is None:
        first_where, first = rows[0]
        # One schema per file, so a later record missing a field is reported as such, not as unknown.
        schema = _detect(first, where=first_where if table is None else label)
    elif schema not in SCHEMAS:
        raise UserError(f"unknown schema {schema!r} for {label}; expected one of {', '.join(SCHEMAS)}")
    if table is not None:
        _check_columns(rows[0][1], label, schema, use, table, columns_key)
    return [convert(record, schema, where) for where, record in rows]


def _check_columns(first: Fields, label: str, schema: str, use: str, table: tuple[str, ...], columns_key: str) -> None:
    """A table lacks a column for every row at once: say so once, with the columns it has."""
    missing = [_name(first, f) for f in _NEEDS[use].get(schema, ()) if f not in first]
    if missing:
        raise UserError(f"{label}: no {' or '.join(missing)} (schema {schema}); its columns are {', '.join(table)} "
                        f"(name the ones to use with {columns_key})")


def _to_example(record: dict, schema: str, where: str) -> Example:
    return dataclasses.replace(_example(record, schema, where), where=where)


def _example(record: dict, schema: str, where: str) -> Example:
    if schema == "prompt_response":
        return Example(
            prompt=_text(record, "prompt", schema, where),
            response=_text(record, "response", schema, where),
            answer=_optional_text(record, "ground_truth", schema, where),
        )
    if schema == "question_answer":
        prompt = r1_zero_prompt(_text(record, "question", schema, where))
        steps, answer = _gsm8k_answer(record, where)
        return Example(prompt, _r1_zero_response(steps, answer), answer)
    if schema == "problem_solution":
        prompt = r1_zero_prompt(_text(record, "problem", schema, where))
        solution = _text(record, "solution", schema, where)
        answer = _boxed_answer(solution, where, _name(record, "solution"))
        return Example(prompt, _r1_zero_response(solution, answer), answer)
    if schema == "problem_answer":
        raise UserError(
            f"{where}: schema problem_answer (fields problem, answer) has no worked solution to train on; "
            "use the file for validation, or give records with prompt+response, question+answer "
            "('#### N') or problem+solution"
        )
    raise UserError(f"unknown schema {schema!r}; expected one of {', '.join(SCHEMAS)}")


def _to_problem(record: dict, schema: str, where: str) -> Problem:
    if schema == "prompt_response":
        prompt = _text(record, "prompt", schema, where)
        answer = _optional_text(record, "ground_truth", schema, where)
        if answer is None:
            raise UserError(f"{where}: missing {_name(record, 'ground_truth')} (schema prompt_response; a problem needs it)")
        return Problem(prompt, answer)
    if schema == "problem_answer":
        prompt = r1_zero_prompt(_text(record, "problem", schema, where))
        return Problem(prompt, _text(record, "answer", schema, where))
    if schema == "question_answer":
        prompt = r1_zero_prompt(_text(record, "question", schema, where))
        return Problem(prompt, _gsm8k_answer(record, where)[1])
    if schema == "problem_solution":
        prompt = r1_zero_prompt(_text(record, "problem", schema, where))
        return Problem(prompt, _boxed_answer(_text(record, "solution", schema, where), where, _name(record, "solution")))
    raise UserError(f"unknown schema {schema!r}; expected one of {', '.join(SCHEMAS)}")


def _r1_zero_response(reasoning: str, answer: str) -> str:
    # Leading space: the prompt ends with "<think>", as in the r1_zero traces.
    return f" {reasoning.strip()} </think> <answer>{answer}</answer>"


def _gsm8k_answer(record: dict, where: str) -> tuple[str, str]:
    """(worked steps without calculator annotations, final answer N) of a GSM8K answer."""
    text = _text(record, "answer", "question_answer", where)
    steps, marker, final = text.rpartition("####")
    final = final.strip()
    if not marker or not final or "\n" in final:
        raise UserError(f"{where}: {_name(record, 'answer')} does not end with '#### N' (schema question_answer)")
    if _THOUSANDS.fullmatch(final):
        final = final.replace(",", "")
    return _CALCULATOR.sub("", steps).strip(), final


def _boxed_answer(solution: str, where: str, name: str = "field 'solution'") -> str:
    answer = last_boxed(solution)
    if answer is None or not answer.strip():
        raise UserError(f"{where}: {name} has no \\boxed{{...}} answer (schema problem_solution)")
    return answer.strip()


def _text(record: dict, field: str, schema: str, where: str) -> str:
    value = _optional_text(record, field, schema, where)
    if value is None:
        if getattr(record, "noun", "field") == "column" and field in record:
            raise UserError(f"{where}: {_name(record, field)} is null (schema {schema})")
        raise UserError(f"{where}: missing {_name(record, field)} (schema {schema})")
    return value


def _optional_text(record: dict, field: str, schema: str, where: str) -> str | None:
    value = record.get(field)
    if value is None:
        return None
    if not isinstance(value, str):
        raise UserError(f"{where}: {_name(record, field)} must be a string, got {_json_type(value)} (schema {schema})")
    if not value.strip():
        raise UserError(f"{where}: {_name(record, field)} is empty (schema {schema})")
    return value


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {dict: "an object", list: "an array", str: "a string"}.get(type(value), type(value).__name__)
