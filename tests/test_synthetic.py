"""The generated task: deterministic, correct, in r1_zero format, train and validation apart."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lit_sft.formats import r1_zero_prompt
from lit_sft.synthetic import (
    SPLITS,
    VALIDATION_MODULUS,
    exercises,
    make_problems,
    make_sft_records,
    split_of,
)

QUESTION = re.compile(r"What is (\d) ([+-]) (\d) ([+-]) (\d)\?")
RESPONSE = re.compile(r" (-?\d+) ([+-]) (\d) = (-?\d+), (-?\d+) ([+-]) (\d) = (-?\d+) </think> <answer>(-?\d+)</answer>")


def _evaluate(question: str) -> int:
    """The answer computed from the question text alone, independently of the generator."""
    a, op1, b, op2, c = QUESTION.fullmatch(question).groups()
    first = int(a) + int(b) if op1 == "+" else int(a) - int(b)
    return first + int(c) if op2 == "+" else first - int(c)


def test_same_seed_same_records_other_seed_other_records() -> None:
    assert make_sft_records(50, seed=7) == make_sft_records(50, seed=7)
    assert make_problems(50, seed=7) == make_problems(50, seed=7)
    assert make_sft_records(50, seed=7) != make_sft_records(50, seed=8)
    assert make_problems(50, seed=7) != make_problems(50, seed=8)
    # A longer stream starts like the shorter one: n does not reshuffle what comes first.
    assert make_sft_records(80, seed=7)[:50] == make_sft_records(50, seed=7)


def test_train_validation_and_test_never_share_a_question() -> None:
    train, validation, test = exercises("train"), exercises("validation"), exercises("test")
    assert len(train) + len(validation) + len(test) == 2 * 10 * 2 * 10 * 10
    questions = [{e.question for e in split} for split in (train, validation, test)]
    assert not questions[0] & questions[1] and not questions[0] & questions[2] and not questions[1] & questions[2]
    # About one in VALIDATION_MODULUS held out, half of it for test, whatever the hash gives.
    assert abs((len(validation) + len(test)) / 4000 - 1 / VALIDATION_MODULUS) < 0.03
    assert abs(len(test) / (len(validation) + len(test)) - 0.5) < 0.05
    tested = {r1_zero_prompt(p["problem"]) for p in make_problems(300, 0, split="test")}
    assert all(split_of(p["problem"]) == "test" for p in make_problems(100, 0, split="test"))
    assert not tested & {r1_zero_prompt(p["problem"]) for p in make_problems(300, 0)}
    trained_on = {r["prompt"] for r in make_sft_records(20_000, seed=0)}
    assert not trained_on & tested
    for seed in (0, 1, 2):
        assert not trained_on & {r1_zero_prompt(p["problem"]) for p in make_problems(500, seed)}
        assert not trained_on & {r["prompt"] for r in make_sft_records(200, seed, split="validation")}
    assert all(split_of(p["problem"]) == "validation" for p in make_problems(100, 0))


def test_problems_are_distinct_until_the_split_runs_out() -> None:
    size = len(exercises("validation"))
    problems = [p["problem"] for p in make_problems(size + 10, seed=0)]
    assert len(set(problems[:size])) == size
    assert len(set(problems)) == size


def test_ground_truths_are_integers_that_the_question_implies() -> None:
    for record in make_sft_records(500, seed=1):
        question = record["prompt"].split("User: ")[1].split("\nAssistant:")[0]
        assert re.fullmatch(r"-?\d+", record["ground_truth"])
        assert int(record["ground_truth"]) == _evaluate(question)
    for problem in make_problems(200, seed=1):
        assert int(problem["answer"]) == _evaluate(problem["problem"])


def test_responses_are_r1_zero_worked_solutions() -> None:
    for record in make_sft_records(500, seed=2):
        question = record["prompt"].split("User: ")[1].split("\nAssistant:")[0]
        assert record["prompt"] == r1_zero_prompt(question)
        assert record["prompt"].endswith("Assistant: <think>")
        steps = RESPONSE.fullmatch(record["response"])
        assert steps, record["response"]
        a, op1, b, first, again, op2, c, result, answer = steps.groups()
        assert [a, op1, b, op2, c] == list(QUESTION.fullmatch(question).groups())
        assert first == again and result == answer == record["ground_truth"]


def test_every_generated_response_grades_correct() -> None:
    grading = pytest.importorskip("lit_sft.grading")
    for record in make_sft_records(30, seed=3):
        assert grading.grade(record["response"], record["ground_truth"]).category == grading.Category.CORRECT


def test_prompt_and_spacing_match_the_real_traces(shared_data: Path) -> None:
    with (shared_data / "math" / "sft.jsonl").open() as lines:
        real = json.loads(lines.readline())
    ours = make_sft_records(1, seed=0)[0]
    assert ours["prompt"].split("User: ")[0] == real["prompt"].split("User: ")[0]
    assert ours["prompt"][-len("\nAssistant: <think>") :] == real["prompt"][-len("\nAssistant: <think>") :]
    # The response continues right after "<think>": a leading space, then " </think> <answer>".
    assert real["response"].startswith(" ") and ours["response"].startswith(" ")
    assert " </think> <answer>" in real["response"] and " </think> <answer>" in ours["response"]


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="^split must be one of train, validation, test, got 'holdout'$"):
        make_problems(3, 0, split="holdout")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n must be"):
        make_sft_records(-1, 0)


def test_the_split_of_each_question_never_moves() -> None:
    """The recorded curves (bench/curves_embedded.json), the benchmarks and every study's held-out
    sets depend on which questions are held out: a change to the hash is a change to the task."""
    assert {split: len(exercises(split)) for split in SPLITS} == {"train": 3216, "validation": 407, "test": 377}
    assert [e.question for e in exercises("validation")[:2]] == ["What is 0 + 0 + 2?", "What is 0 + 0 + 5?"]
    assert [e.question for e in exercises("test")[:2]] == ["What is 0 + 0 + 8?", "What is 0 + 0 - 4?"]
    assert split_of("What is 0 + 0 + 0?") == "train"
