"""r1_zero grading: format check, answer extraction, equivalence by math-verify -> `Grade`.

A response is the text generated after an r1_zero prompt (which ends with ``<think>``). Its format
is right when ``</think>`` is followed by an ``<answer> ... </answer>`` block (whitespace between
them allowed, as in the r1_zero reward); the answer is the block's content, or the content of the
last ``\\boxed{}`` inside it. It is correct when it equals the ground truth after light
normalisation, or when math-verify finds the two equivalent (``\\dfrac{9}{7}`` = ``9/7``,
``0.5`` = ``\\frac12``, ``180 \\text{ miles}`` = ``180``, intervals, tuples, degrees, ...).

`grade` never raises and never hangs. math-verify bounds its work with SIGALRM, which only works
in the main thread and would cancel a timer the caller armed; elsewhere (another thread, or an
armed timer) it runs in a forked child process that is killed when it overruns.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import re
import signal
import threading
import time
from dataclasses import dataclass
from enum import Enum
from multiprocessing.connection import Connection

from lit_sft.formats import last_boxed

logger = logging.getLogger(__name__)

# Answers are short; longer text is rambling, and math-verify's cost grows fast with length.
_MAX_VERIFY_CHARS = 1000
# Seconds a grading child gets beyond its own timeout to report, and to exit once killed.
_CHILD_GRACE_S = 1.0

_THINK_THEN_ANSWER = re.compile(r"</think>\s*<answer>")
_UNESCAPED_DOLLAR = re.compile(r"(?<!\\)\$")
# Layout-only LaTeX: spacing, \left/\right (not \leftarrow), display fractions.
_LAYOUT = re.compile(r"\\[!,;: ]|\\(?:left|right)(?![A-Za-z])|\s+")
_TEXT = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")
# Plain-text math a model writes for LaTeX; "5⁄11" uses the fraction slash U+2044 (math/sft.jsonl has it).
# Only unambiguous symbols: an en dash may be a range, so it stays.
_UNICODE = {
    "°": "^\\circ", "−": "-", "⁄": "/", "∕": "/", "÷": "\\div", "×": "\\times",
    "π": "\\pi", "∞": "\\infty", "√": "\\sqrt", "≤": "\\le", "≥": "\\ge",
}
# MATH writes some counts in words ("\mbox{four}"); a model that answers "4" is right.
_NUMBER_WORDS = {
    word: str(value)
    for value, word in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
        "sixteen seventeen eighteen nineteen twenty".split()
    )
}


class Category(str, Enum):
    """How one response fared."""

    CORRECT = "correct"
    WRONG_ANSWER = "wrong_answer"
    FORMAT_FAILURE = "format_failure"


@dataclass(frozen=True)
class Grade:
    """The grade of one response against its ground truth."""

    category: Category
    """correct, wrong_answer, or format_failure (no "</think> <answer>...</answer>")."""
    extracted_answer: str | None
    """The answer taken from the response (the last \\boxed{} content if boxed); None on format failure."""
    format_reward: float
    """1.0 when the r1_zero format is right, else 0.0."""
    answer_reward: float
    """1.0 when the answer is correct, else 0.0."""
    reward: float
    """The r1_zero reward: the answer reward when the format is right, else 0.0."""


def grade(response: str, ground_truth: str, timeout_s: float = 5) -> Grade:
    """Grade one response generated after an r1_zero prompt.

    ground_truth is an answer or a full solution with \\boxed{}. timeout_s bounds math-verify's
    work (in whole seconds per parse/compare step, as math-verify's alarm counts them, so a call
    may take about twice timeout_s at worst); <= 0 compares normalised text only.
    """
    response = response if isinstance(response, str) else ""
    ground_truth = ground_truth if isinstance(ground_truth, str) else ""
    answer = extract_answer(response)
    if answer is None:
        return Grade(Category.FORMAT_FAILURE, None, format_reward=0.0, answer_reward=0.0, reward=0.0)
    if answers_match(answer, gold_answer(ground_truth), timeout_s):
        return Grade(Category.CORRECT, answer, format_reward=1.0, answer_reward=1.0, reward=1.0)
    return Grade(Category.WRONG_ANSWER, answer, format_reward=1.0, answer_reward=0.0, reward=0.0)


def extract_answer(response: str) -> str | None:
    """The answer of an r1_zero response, or None when its format is wrong.

    The answer is the content of the last complete <answer> block after "</think> <answer>",
    or the content of the last \\boxed{} within it.
    """
    opened = _THINK_THEN_ANSWER.search(response)
    if opened is None:
        return None
    close = response.rfind("</answer>")
    if close < opened.end():
        return None
    content = response[response.rfind("<answer>", opened.start(), close) + len("<answer>") : close]
    boxed = last_boxed(content)
    return (boxed if boxed is not None else content).strip()


def gold_answer(ground_truth: str) -> str:
    """The answer of a ground truth: its last \\boxed{} content if it has one, else all of it."""
    boxed = last_boxed(ground_truth)
    return (boxed if boxed is not None else ground_truth).strip()


def answers_match(predicted: str, gold: str, timeout_s: float = 5) -> bool:
    """Whether an extracted answer equals the gold answer: by normalised text, else by math-verify."""
    predicted, gold = _plain(predicted), _plain(gold)
    if not predicted or not gold:
        return False
    if _normalise(predicted) == _normalise(gold):
        return True
    return verify_equivalent(gold, predicted, timeout_s)


def verify_equivalent(gold: str, predicted: str, timeout_s: float = 5) -> bool:
    """math-verify's verdict on two bare answers; False on error, timeout, or over-long input."""
    if timeout_s <= 0 or len(gold) > _MAX_VERIFY_CHARS or len(predicted) > _MAX_VERIFY_CHARS:
        return False
    try:
        if _alarm_usable():
            return _math_verify(gold, predicted, timeout_s, use_alarm=True)
        return _in_child_process(gold, predicted, timeout_s)
    except Exception:
        logger.debug("math-verify failed on gold %.80r vs %.80r", gold, predicted, exc_info=True)
        return False


def _plain(answer: str) -> str:
    for char, latex in _UNICODE.items():
        answer = answer.replace(char, latex)
    return answer.strip()


def _normalise(answer: str) -> str:
    """Text that differs only in layout maps to one string; nothing here changes a value."""
    text = answer.strip()
    if len(text) > 1 and text[0] == "$" and text[-1] == "$" and text[-2] != "\\":
        text = text.strip("$")
    if text.startswith("\\(") and text.endswith("\\)"):
        text = text[2:-2]
    text = _TEXT.sub(r"\1", text)
    text = _LAYOUT.sub("", text).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").rstrip(".")
    return _NUMBER_WORDS.get(text.lower(), text)


def _delimited(answer: str) -> str:
    # math-verify extracts LaTeX from math delimiters; a bare "\frac{9}{7}" or "72^\circ" needs them.
    if _UNESCAPED_DOLLAR.search(answer) or "\\(" in answer or "\\[" in answer:
        return answer
    return f"${answer}$"


def _math_verify(gold: str, predicted: str, timeout_s: float, *, use_alarm: bool) -> bool:
    from math_verify import parse, verify

    deadline = time.monotonic() + timeout_s

    def step_timeout() -> int | None:
        # signal.alarm counts whole seconds; None turns math-verify's alarm off.
        return max(1, math.ceil(deadline - time.monotonic())) if use_alarm else None

    gold_parsed = parse(_delimited(gold), parsing_timeout=step_timeout())
    if not gold_parsed or time.monotonic() >= deadline:
        return False
    predicted_parsed = parse(_delimited(predicted), parsing_timeout=step_timeout())
    if not predicted_parsed or time.monotonic() >= deadline:
        return False
    return bool(verify(gold_parsed, predicted_parsed, timeout_seconds=step_timeout()))


def _alarm_usable() -> bool:
    """math-verify's SIGALRM timeout works here and would not cancel a timer the caller armed."""
    return (
        os.name == "posix"
        and threading.current_thread() is threading.main_thread()
        and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    )


def _in_child_process(gold: str, predicted: str, timeout_s: float) -> bool:
    """math-verify in a forked child that is killed when it overruns.

    A thread cannot stand in for the alarm here: sympy spends its worst cases (7^{123456789}) in one
    C call that holds the GIL, so a helper thread could be neither joined with a timeout nor stopped.
    The child's own main thread has the alarm; the kill covers what the alarm cannot interrupt.
    """
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_child_main, args=(gold, predicted, timeout_s, sender), daemon=True)
    try:
        child.start()
        sender.close()
        # The alarm counts whole seconds; the grace lets a child that timed out say so.
        if receiver.poll(math.ceil(timeout_s) + _CHILD_GRACE_S):
            return bool(receiver.recv())
        return False
    except (EOFError, OSError):
        return False
    finally:
        if child.is_alive():
            child.kill()
        child.join(_CHILD_GRACE_S)
        receiver.close()


def _child_main(gold: str, predicted: str, timeout_s: float, sender: Connection) -> None:
    try:
        verdict = _math_verify(gold, predicted, timeout_s, use_alarm=_alarm_usable())
    except Exception:
        verdict = False
    sender.send(verdict)
    sender.close()
