"""Record schemas -> Example / Problem, the r1_zero template, and every bad input a user can give."""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path

import pytest

from lit_sft.errors import UserError
from lit_sft.formats import (
    Example,
    Problem,
    detect_schema,
    last_boxed,
    load_examples,
    load_problems,
    r1_zero_prompt,
    read_jsonl,
    to_example,
    to_problem,
)

GSM8K_ANSWER = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nAltogether 48+24 = <<48+24=72>>72.\n#### 72"
MATH_SOLUTION = "We have $\\frac{a}{b} = \\boxed{2}$ first, then $x = \\boxed{\\frac{\\sqrt{3}}{2}}$."


def write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# ---- r1_zero template ------------------------------------------------------------------------


def test_template_is_packaged_with_one_placeholder() -> None:
    text = resources.files("lit_sft").joinpath("prompts/r1_zero.prompt").read_text(encoding="utf-8")
    assert text.count("{question}") == 1
    assert text.rstrip("\n").endswith("\nAssistant: <think>")


def test_r1_zero_prompt_inserts_question_verbatim() -> None:
    prompt = r1_zero_prompt("  Solve $x^{2} = {4}$ for {x}.\n")
    assert "\n\nUser: Solve $x^{2} = {4}$ for {x}.\nAssistant: <think>" in prompt
    assert prompt.endswith("Assistant: <think>")
    assert prompt.startswith("A conversation between User and Assistant.")


def test_r1_zero_prompt_reproduces_every_real_prompt(shared_data: Path) -> None:
    head, tail = "\n\nUser: ", "\nAssistant: <think>"
    for line, record in read_jsonl(shared_data / "math" / "sft.jsonl"):
        prompt = record["prompt"]
        question = prompt[prompt.index(head) + len(head) : prompt.rindex(tail)]
        assert r1_zero_prompt(question) == prompt, f"sft.jsonl:{line}"


# ---- read_jsonl ------------------------------------------------------------------------------


def test_read_jsonl_numbers_lines_and_skips_blank_ones(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1}\n\n   \n{"a": 2}', encoding="utf-8")
    assert read_jsonl(path) == [(1, {"a": 1}), (4, {"a": 2})]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", r"d\.jsonl: empty file"),
        (b"\n  \n", r"d\.jsonl: empty file"),
        (b'{"a": 1}\n{"a": \n', r"d\.jsonl:2: invalid JSON: Expecting value \(column 7, end of line\)"),
        (b'{"a": 1}\n{"a": 1 "b": 2}\n{"a": 3}\n', r"d\.jsonl:2: invalid JSON: Expecting ',' delimiter \(column 9\)"),
        (b'{"a": 1}\n[1, 2]\n', r"d\.jsonl:2: expected a JSON object per line, got an array"),
        (b'"text"\n', r"d\.jsonl:1: expected a JSON object per line, got a string"),
        (b'{"a": 1}\n{"a": "\xff"}\n', r"d\.jsonl:2: not UTF-8 text"),
    ],
)
def test_read_jsonl_bad_content_names_file_and_line(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        read_jsonl(path)


def test_read_jsonl_accepts_a_byte_order_mark_and_crlf(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\r\n{"a": 2}\r\n')
    assert read_jsonl(path) == [(1, {"a": 1}), (2, {"a": 2})]


def test_read_jsonl_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"nope\.jsonl: no such file"):
        read_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(UserError, match="is a directory"):
        read_jsonl(tmp_path)


# ---- schema detection --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("record", "schema"),
    [
        ({"prompt": "p", "response": "r"}, "prompt_response"),
        ({"prompt": "p", "response": "r", "ground_truth": "1"}, "prompt_response"),
        ({"problem": "p", "answer": "1", "level": "Level 3"}, "problem_answer"),
        ({"question": "q", "answer": "steps\n#### 3"}, "question_answer"),
        ({"problem": "p", "solution": "s \\boxed{1}"}, "problem_solution"),
        ({"problem": "p", "solution": "s \\boxed{1}", "answer": "1"}, "problem_solution"),
    ],
)
def test_detect_schema_by_field_names(record: dict, schema: str) -> None:
    assert detect_schema(record) == schema


def test_detect_schema_unknown_fields_lists_them() -> None:
    with pytest.raises(UserError, match=r"cannot tell the record schema from its fields \['input', 'output'\]"):
        detect_schema({"input": "x", "output": "y"})


def test_unknown_fields_in_file_name_file_and_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"input": "x", "output": "y"}])
    with pytest.raises(UserError, match=r"d\.jsonl:1: cannot tell the record schema"):
        load_examples(path)


# ---- conversions -------------------------------------------------------------------------------


def test_prompt_response_is_kept_verbatim() -> None:
    record = {"prompt": "P <think>", "response": " r </think> <answer> 1 </answer>", "ground_truth": "1"}
    assert to_example(record, where="x") == Example("P <think>", " r </think> <answer> 1 </answer>", "1")
    assert to_problem(record, where="x") == Problem("P <think>", "1")
    without_truth = {"prompt": "P", "response": "R"}
    assert to_example(without_truth, where="x").answer is None
    with pytest.raises(UserError, match=r"f\.jsonl:3: missing field 'ground_truth' \(schema prompt_response"):
        to_problem(without_truth, where="f.jsonl:3")


def test_question_answer_strips_calculator_annotations() -> None:
    example = to_example({"question": " How many clips? ", "answer": GSM8K_ANSWER}, where="x")
    assert example.prompt == r1_zero_prompt("How many clips?")
    assert example.response == (
        " Natalia sold 48/2 = 24 clips in May.\nAltogether 48+24 = 72. </think> <answer>72</answer>"
    )
    assert example.answer == "72"
    assert to_problem({"question": "q", "answer": GSM8K_ANSWER}, where="x").answer == "72"


def test_question_answer_drops_thousands_separators() -> None:
    problem = to_problem({"question": "q", "answer": "so 1,200 - 0 = 1,200\n#### 1,200"}, where="x")
    assert problem.answer == "1200"


@pytest.mark.parametrize("answer", ["72", "steps without a final line", "steps\n####   ", "a\n#### 1\nmore text"])
def test_question_answer_without_final_number_is_an_error(answer: str) -> None:
    with pytest.raises(UserError, match=r"g\.jsonl:5: field 'answer' does not end with '#### N'"):
        to_example({"question": "q", "answer": answer}, where="g.jsonl:5")


def test_problem_solution_uses_last_boxed_with_nested_braces() -> None:
    record = {"problem": "Find x.", "solution": MATH_SOLUTION}
    example = to_example(record, where="x")
    assert example.answer == "\\frac{\\sqrt{3}}{2}"
    assert example.response == f" {MATH_SOLUTION} </think> <answer>\\frac{{\\sqrt{{3}}}}{{2}}</answer>"
    assert example.prompt == r1_zero_prompt("Find x.")
    assert to_problem(record, where="x") == Problem(r1_zero_prompt("Find x."), "\\frac{\\sqrt{3}}{2}")


@pytest.mark.parametrize("solution", ["no box at all", "unclosed \\boxed{\\frac{1}{2}", "empty \\boxed{ }"])
def test_problem_solution_without_boxed_answer_is_an_error(solution: str) -> None:
    with pytest.raises(UserError, match=r"m\.jsonl:2: field 'solution' has no \\boxed\{\.\.\.\} answer"):
        to_problem({"problem": "p", "solution": solution}, where="m.jsonl:2")


def test_problem_answer_is_a_problem_but_not_an_example() -> None:
    record = {"problem": "What is $1+1$?", "answer": "2"}
    assert to_problem(record, where="x") == Problem(r1_zero_prompt("What is $1+1$?"), "2")
    with pytest.raises(UserError, match=r"v\.jsonl:1: schema problem_answer .* no worked solution"):
        to_example(record, where="v.jsonl:1")


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"prompt": "p", "response": 3}, r"d\.jsonl:2: field 'response' must be a string, got a number \(schema"),
        ({"prompt": "p", "response": None}, r"d\.jsonl:2: missing field 'response' \(schema prompt_response\)"),
        ({"prompt": "p", "response": "  "}, r"d\.jsonl:2: field 'response' is empty \(schema prompt_response\)"),
        ({"prompt": ["p"], "response": "r"}, r"d\.jsonl:2: field 'prompt' must be a string, got an array"),
        ({"prompt": "p", "response": "r", "ground_truth": 16}, r"field 'ground_truth' must be a string, got a number"),
    ],
)
def test_bad_field_names_file_line_and_field(tmp_path: Path, record: dict, message: str) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "response": "r"}, record])
    with pytest.raises(UserError, match=message):
        load_examples(path)


def test_later_record_missing_field_is_reported_against_the_files_schema(tmp_path: Path) -> None:
    records = [{"prompt": "p", "response": "r"}] * 11 + [{"prompt": "p", "responze": "r"}]
    path = write_jsonl(tmp_path / "file.jsonl", records)
    with pytest.raises(UserError, match=r"file\.jsonl:12: missing field 'response' \(schema prompt_response\)"):
        load_examples(path)


def test_explicit_schema_overrides_detection(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "m.jsonl", [{"problem": "p", "solution": "so \\boxed{3}", "answer": "3.0"}])
    assert load_problems(path)[0].answer == "3"
    assert load_problems(path, schema="problem_answer")[0].answer == "3.0"
    with pytest.raises(UserError, match=r"m\.jsonl:1: missing field 'question' \(schema question_answer\)"):
        load_problems(path, schema="question_answer")
    with pytest.raises(UserError, match=r"unknown schema 'gsm8k' for .*m\.jsonl; expected one of prompt_response"):
        load_problems(path, schema="gsm8k")


def test_empty_dataset_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "e.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"e\.jsonl: empty file"):
        load_examples(tmp_path / "e.jsonl")
    with pytest.raises(UserError, match=r"e\.jsonl: empty file"):
        load_problems(tmp_path / "e.jsonl")


# ---- last_boxed --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "content"),
    [
        ("\\boxed{5}", "5"),
        ("a \\boxed{1} b \\boxed{\\frac{1}{2}} c", "\\frac{1}{2}"),
        ("$\\boxed{\\{1, 2\\}}$", "\\{1, 2\\}"),
        ("\\boxed{\\text{(C)}}", "\\text{(C)}"),
        ("so $\\boxed 7$.", "7"),
        ("\\fbox{8}", "8"),
        ("none here", None),
        ("\\boxed{1} then \\boxed{2", None),
        ("\\boxedx", None),
    ],
)
def test_last_boxed(text: str, content: str | None) -> None:
    assert last_boxed(text) == content


# ---- the real files ----------------------------------------------------------------------------


def test_real_sft_traces(shared_data: Path) -> None:
    path = shared_data / "math" / "sft.jsonl"
    examples = load_examples(path)
    records = read_jsonl(path)
    assert len(examples) == len(records) == 1767
    assert examples == [Example(r["prompt"], r["response"], r["ground_truth"]) for _, r in records]
    problems = load_problems(path)
    assert [p.answer for p in problems] == [r["ground_truth"] for _, r in records]


def test_real_math_validation(shared_data: Path) -> None:
    path = shared_data / "math" / "validation.jsonl"
    problems = load_problems(path)
    assert len(problems) == 5000
    assert all(p.prompt.endswith("Assistant: <think>") and p.answer for p in problems)
    question = "Two fair 6-sided dice are rolled.  What is the probability the sum rolled is 9?"
    assert problems[1] == Problem(r1_zero_prompt(question), "\\dfrac{1}{9}")
    with pytest.raises(UserError, match=r"validation\.jsonl:1: schema problem_answer"):
        load_examples(path)


@pytest.mark.parametrize("name", ["train", "test"])
def test_real_gsm8k(shared_data: Path, name: str) -> None:
    path = shared_data / "gsm8k" / f"{name}.jsonl"
    examples = load_examples(path)
    problems = load_problems(path)
    assert len(examples) == len(problems) == {"train": 7473, "test": 1319}[name]
    for example, problem in zip(examples, problems):
        assert example.answer == problem.answer
        assert re.fullmatch(r"-?\d+(\.\d+)?", problem.answer), problem.answer
        assert example.response.endswith(f" </think> <answer>{problem.answer}</answer>")
        assert "<<" not in example.response and "####" not in example.response
        assert example.prompt == problem.prompt and problem.prompt.endswith("Assistant: <think>")
