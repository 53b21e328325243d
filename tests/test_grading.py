"""r1_zero grading: categories, rewards, equivalences, odd input, time bounds, and the real traces."""

from __future__ import annotations

import multiprocessing
import signal
import os
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from lit_sft import grading
from lit_sft.formats import read_jsonl
from lit_sft.grading import Category, Grade, answers_match, extract_answer, gold_answer, grade, verify_equivalent

# A power sympy evaluates in one C call: the alarm interrupts it only in the main thread.
PATHOLOGICAL = "7^{123456789}"


def answered(answer: str) -> str:
    return f" some reasoning </think> <answer>{answer}</answer>"


# ---- format and categories ----------------------------------------------------------------------


def test_correct_answer_has_full_rewards() -> None:
    expected = Grade(Category.CORRECT, "16", format_reward=1.0, answer_reward=1.0, reward=1.0)
    assert grade(answered(" 16 "), "16") == expected


def test_wrong_answer_keeps_format_reward() -> None:
    expected = Grade(Category.WRONG_ANSWER, "17", format_reward=1.0, answer_reward=0.0, reward=0.0)
    assert grade(answered("17"), "16") == expected


@pytest.mark.parametrize(
    "response",
    [
        "",
        "16",
        " I think 16. <answer>16</answer>",  # no </think>
        " reasoning </think> 16",  # no answer block
        " reasoning </think> the answer: <answer>16</answer>",  # text between </think> and <answer>
        " reasoning </think> <answer>16",  # answer never closed
        " <answer>16</answer> then </think>",  # answer before the reasoning ends
        " reasoning </THINK> <ANSWER>16</ANSWER>",
    ],
)
def test_format_failures(response: str) -> None:
    expected = Grade(Category.FORMAT_FAILURE, None, format_reward=0.0, answer_reward=0.0, reward=0.0)
    assert grade(response, "16") == expected


@pytest.mark.parametrize(
    ("response", "answer"),
    [
        (" r </think> <answer>16</answer>", "16"),
        (" r </think><answer>16</answer>", "16"),
        (" r </think>\n\n<answer>\n16\n</answer>\n", "16"),
        (" r </think> <answer> \\boxed{16} </answer>", "16"),
        (" r </think> <answer>$\\boxed{16}$</answer>", "16"),
        (" r </think> <answer>\\(\\boxed{\\frac{1}{4}}\\)</answer>", "\\frac{1}{4}"),
        (" r </think> <answer>The answer is \\boxed{12} cm.</answer> trailing text", "12"),
        (" r </think> <answer>3</answer> <answer>16</answer>", "16"),  # the last block counts
        (" r </think> <answer>\\boxed{16</answer>", "\\boxed{16"),  # an unclosed box: the raw content
        (" r </think> <answer></answer>", ""),
    ],
)
def test_answer_extraction_is_as_tolerant_as_r1_zero(response: str, answer: str) -> None:
    assert extract_answer(response) == answer


def test_empty_answer_is_wrong_not_a_format_failure() -> None:
    assert grade(" r </think> <answer> </answer>", "16").category is Category.WRONG_ANSWER


def test_ground_truth_may_be_a_full_solution() -> None:
    solution = "First $\\boxed{3}$ is wrong; in fact $x = \\boxed{\\dfrac{9}{7}}$."
    assert gold_answer(solution) == "\\dfrac{9}{7}"
    assert grade(answered("9/7"), solution).category is Category.CORRECT
    assert grade(answered("3"), solution).category is Category.WRONG_ANSWER


def test_category_is_a_str_enum() -> None:
    assert Category.CORRECT == "correct" and Category("format_failure") is Category.FORMAT_FAILURE


# ---- equivalence ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("predicted", "gold"),
    [
        ("9/7", "\\dfrac{9}{7}"),
        ("\\frac12", "0.5"),
        ("180", "180 \\text{ miles}"),
        ("11880", "11,\\!880"),
        ("1,200", "1200"),
        ("54", "54^\\circ"),
        ("54^\\circ", "54"),
        ("54°", "54^\\circ"),
        ("[2, 5)", "[2,5)"),
        ("(-\\infty, 3]", "(-\\infty,3]"),
        ("(3, -1)", "(3,-1)"),
        ("1 - x", "1-x"),
        ("x = 3", "3"),
        ("3, 2", "2,3"),
        ("\\$30", "30"),
        ("12\\sqrt{13}", "12\\sqrt{13}\\text{ feet}"),
        ("4", "\\mbox{four}"),
        ("5⁄11", "\\dfrac{5}{11}"),  # the fraction slash U+2044 of a real trace
        ("4:30 p.m.", "\\text{4:30 p.m.}"),
        ("\\text{(C)}", "C"),
        ("\\left( 1, 2 \\right)", "(1,2)"),
        ("2.5", "2\\frac{1}{2}"),
    ],
)
def test_equivalent_answers_are_correct(predicted: str, gold: str) -> None:
    assert grade(answered(predicted), gold).category is Category.CORRECT


@pytest.mark.parametrize(
    ("predicted", "gold"),
    [
        ("6", "5"),
        ("72", "54^\\circ"),
        ("(2, 1)", "(1,2)"),
        ("(2, 5)", "[2,5)"),
        ("\\frac{7}{9}", "\\dfrac{9}{7}"),
        ("x + 1", "x - 1"),
        ("\\text{(B)}", "\\text{(C)}"),
        ("four", "\\mbox{five}"),
        ("\\leftarrow", "arrow"),  # \left is layout, \leftarrow is not
    ],
)
def test_different_answers_are_wrong(predicted: str, gold: str) -> None:
    assert grade(answered(predicted), gold).category is Category.WRONG_ANSWER


def test_fast_path_skips_math_verify(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> bool:
        raise AssertionError("math-verify called for an exact match")

    monkeypatch.setattr(grading, "verify_equivalent", fail)
    assert answers_match(" $\\dfrac{1}{4}$ ", "\\frac{1}{4}")
    assert answers_match("\\left(1,\\ 2\\right)", "(1,2)")
    assert answers_match("11,\\!880.", "11,880")


# ---- odd input never raises, never hangs ------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "ground_truth"),
    [
        (None, "5"),
        ("</think> <answer>5</answer>", None),
        (5, 5),
        ("", ""),
        ("</think> <answer>5</answer>", ""),
        ("</think> <answer>{{{{{\\frac{</answer>", "}}}}"),
        ("</think> <answer>\\boxed{\\boxed{\\boxed{</answer>", "\\boxed{"),
        ("</think> <answer>" + "(" * 400 + "1" + ")" * 400 + "</answer>", "1"),
        ("</think> <answer>" + "9" * 5000 + "</answer>", "9" * 5000),
        ("</think> <answer>\\frac{1}{0}</answer>", "\\infty"),
        ("</think> <answer>\x00\x01\udcff</answer>", "\x00"),
        ("</think>" * 20000 + " <answer>" * 20000, "1"),
        (" x" * 500_000 + " </think> <answer>1</answer>", "1"),
    ],
    ids=lambda value: repr(value)[:24],
)
def test_odd_input_is_graded_without_raising(response: object, ground_truth: object) -> None:
    started = time.monotonic()
    result = grade(response, ground_truth, timeout_s=1)  # type: ignore[arg-type]
    assert isinstance(result, Grade) and isinstance(result.category, Category)
    assert time.monotonic() - started < 10


def test_huge_identical_answers_match_by_text() -> None:
    assert grade(answered("7" * 100_000), "7" * 100_000).category is Category.CORRECT


def test_pathological_latex_is_bounded_in_the_main_thread() -> None:
    started = time.monotonic()
    assert grade(answered(PATHOLOGICAL), "5", timeout_s=1).category is Category.WRONG_ANSWER
    assert time.monotonic() - started < 8


def test_pathological_latex_is_bounded_in_another_thread() -> None:
    results: list[tuple[Grade, float]] = []

    def work() -> None:
        started = time.monotonic()
        results.append((grade(answered(PATHOLOGICAL), "5", timeout_s=1), time.monotonic() - started))

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), "grading hung in a non-main thread"
    (result, seconds), = results
    assert result.category is Category.WRONG_ANSWER and seconds < 8
    assert not multiprocessing.active_children()


def test_equivalence_still_works_in_another_thread() -> None:
    verdicts: list[bool] = []
    def work() -> None:
        verdicts.extend([verify_equivalent("\\dfrac{9}{7}", "9/7"), verify_equivalent("5", "6")])

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(30)
    assert verdicts == [True, False]


def test_math_verify_failing_in_the_child_is_never_a_correct_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(*args: object, **kwargs: object) -> bool:
        raise RuntimeError("math-verify broke")

    monkeypatch.setattr(grading, "_math_verify", crash)  # the forked child inherits it
    verdicts: list[bool] = []
    thread = threading.Thread(target=lambda: verdicts.append(verify_equivalent("\\dfrac{9}{7}", "9/7")))
    thread.start()
    thread.join(30)
    assert verdicts == [False]


def _verify_in_a_thread(timeout_s: float = 1) -> tuple[list[bool], float]:
    verdicts: list[bool] = []
    started = time.monotonic()
    thread = threading.Thread(target=lambda: verdicts.append(verify_equivalent("\\dfrac{9}{7}", "9/7", timeout_s)), daemon=True)
    thread.start()
    thread.join(30)
    return verdicts, time.monotonic() - started


def test_a_child_that_hangs_past_its_alarm_is_killed_and_graded_wrong(monkeypatch: pytest.MonkeyPatch) -> None:
    # What the alarm cannot interrupt (a C call holding the GIL) stands here as a sleep the child's
    # math-verify never arms an alarm for.
    monkeypatch.setattr(grading, "_math_verify", lambda *a, **k: time.sleep(60))
    verdicts, seconds = _verify_in_a_thread()
    assert verdicts == [False] and seconds < 10
    assert not multiprocessing.active_children()


def test_a_child_that_dies_without_a_verdict_is_graded_wrong(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(grading, "_math_verify", lambda *a, **k: os._exit(3))
    verdicts, seconds = _verify_in_a_thread()
    assert verdicts == [False] and seconds < 10


def test_callers_alarm_survives_grading() -> None:
    fired: list[float] = []
    previous = signal.signal(signal.SIGALRM, lambda *_: fired.append(time.monotonic()))
    try:
        signal.setitimer(signal.ITIMER_REAL, 30.0)
        assert grade(answered("\\frac{18}{14}"), "9/7", timeout_s=1).category is Category.CORRECT
        assert grade(answered(PATHOLOGICAL), "5", timeout_s=1).category is Category.WRONG_ANSWER
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 0 < remaining <= 30 and not fired
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_non_positive_timeout_compares_text_only() -> None:
    assert grade(answered("16"), "16", timeout_s=0).category is Category.CORRECT
    assert grade(answered("9/7"), "\\dfrac{9}{7}", timeout_s=0).category is Category.WRONG_ANSWER


# ---- the real traces ------------------------------------------------------------------------------

# Audited misses of math/sft.jsonl's own responses: every one reaches a wrong number (the 54° angle
# traces answer 72 or 108; the others miscount). Anything new here is grading's to explain.
KNOWN_WRONG_TRUTHS = {"54^\\circ", "57", "98", "19"}


def test_gold_answers_grade_correct(shared_data: Path) -> None:
    records = [r for _, r in read_jsonl(shared_data / "math" / "sft.jsonl")]
    grades = [grade("</think> <answer>" + r["ground_truth"] + "</answer>", r["ground_truth"]) for r in records]
    misses = [(r["ground_truth"], g) for r, g in zip(records, grades) if g.category is not Category.CORRECT]
    assert len(misses) <= 0.01 * len(records), misses


def test_math_verify_accepts_each_gold_answer_as_itself(shared_data: Path) -> None:
    """The fast path hides math-verify from the test above; here it must parse every gold alone."""
    truths = sorted({r["ground_truth"] for _, r in read_jsonl(shared_data / "math" / "sft.jsonl")})
    misses = [t for t in truths if not verify_equivalent(t, t)]
    assert not misses


def test_real_responses_rate(shared_data: Path) -> None:
    records = [r for _, r in read_jsonl(shared_data / "math" / "sft.jsonl")]
    grades = [grade(r["response"], r["ground_truth"]) for r in records]
    counts = Counter(g.category for g in grades)
    rate = counts[Category.CORRECT] / len(records)
    print(f"math/sft.jsonl responses: {rate:.2%} correct, {dict(counts)}")
    assert counts[Category.FORMAT_FAILURE] == 0
    assert grades[7] == Grade(Category.WRONG_ANSWER, "72", format_reward=1.0, answer_reward=0.0, reward=0.0)
    wrong_truths = {r["ground_truth"] for r, g in zip(records, grades) if g.category is not Category.CORRECT}
    assert wrong_truths == KNOWN_WRONG_TRUTHS
    assert rate >= 0.985


@pytest.mark.slow
def test_math_validation_answers_verify_as_themselves(shared_data: Path) -> None:
    answers = [r["answer"] for _, r in read_jsonl(shared_data / "math" / "validation.jsonl")]
    misses = [a for a in answers if not verify_equivalent(a, a)]
    boxed_misses = [a for a in answers if grade(answered(f"\\boxed{{{a}}}"), a).category is not Category.CORRECT]
    assert not misses and not boxed_misses
