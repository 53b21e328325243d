"""Generated arithmetic problems with short worked solutions: the embedded default task.

Each problem sums three single-digit numbers with + and - ("What is 7 - 9 + 4?"); its worked
solution takes one step per operator, in the r1_zero format, e.g.
``" 7 - 9 = -2, -2 + 4 = 2 </think> <answer>2</answer>"``. The task was chosen with
``bench/calibrate_task.py`` so that the tiny model (`lit_sft.tiny`) learns it on 2 CPU cores in
about a minute at a good learning rate and not at a poor one, which gives the tuner a real
question to answer (docs/BENCHMARKS.md has the numbers).

Train, validation and test are disjoint in the exact question: the problem space (4,000
questions) is split once by a hash of the question text, one in `VALIDATION_MODULUS` held out,
whatever the seeds; the held-out questions are halved by another bit of the same hash into
validation (eval/loss, the accuracy every trial is selected on) and test (graded once, on the
study's best model, after every selection is made). Every step of a held-out problem is an operation on digits that training problems use too,
so validation measures whether the model learned the procedure, not whether it recalls the
question. A split holds far fewer questions than a long run draws, so records of one split repeat
questions; `make_problems` repeats one only once its split is exhausted.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from dataclasses import dataclass
from functools import cache
from typing import Literal

from lit_sft.formats import r1_zero_prompt

Split = Literal["train", "validation", "test"]
SPLITS = ("train", "validation", "test")

VALIDATION_MODULUS = 5
"""One question in this many (by hash) is held out from training: half validation, half test."""

_DIGITS = range(10)
_OPERATORS = ("+", "-")


@dataclass(frozen=True)
class Exercise:
    """One generated problem with its worked solution."""

    question: str
    """What the user asks, e.g. "What is 7 - 9 + 4?"."""
    steps: str
    """The reasoning inside <think>, one operation at a time, e.g. "7 - 9 = -2, -2 + 4 = 2"."""
    answer: str
    """The integer result as a string, e.g. "2" or "-5"."""

    @property
    def response(self) -> str:
        """The r1_zero continuation of a prompt that ends with "<think>"."""
        return f" {self.steps} </think> <answer>{self.answer}</answer>"


def _apply(left: int, operator: str, right: int) -> int:
    return left + right if operator == "+" else left - right


def _exercise(a: int, op1: str, b: int, op2: str, c: int) -> Exercise:
    first = _apply(a, op1, b)
    result = _apply(first, op2, c)
    return Exercise(
        question=f"What is {a} {op1} {b} {op2} {c}?",
        steps=f"{a} {op1} {b} = {first}, {first} {op2} {c} = {result}",
        answer=str(result),
    )


def split_of(question: str) -> Split:
    """The split a question belongs to: fixed by its text alone, so no seed can mix them."""
    # blake2b, not hash(): str hashes are salted per process, and the split must never move.
    digest = int.from_bytes(hashlib.blake2b(question.encode("utf-8"), digest_size=8).digest(), "big")
    if digest % VALIDATION_MODULUS:
        return "train"  # the training questions are those of the two-way split before test existed
    return "validation" if (digest // VALIDATION_MODULUS) % 2 == 0 else "test"


@cache
def exercises(split: Split) -> tuple[Exercise, ...]:
    """Every question of one split, in a fixed order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    space = itertools.product(_DIGITS, _OPERATORS, _DIGITS, _OPERATORS, _DIGITS)
    return tuple(ex for ex in itertools.starmap(_exercise, space) if split_of(ex.question) == split)


def sample_exercises(n: int, seed: int, split: Split, *, distinct: bool) -> list[Exercise]:
    """n exercises of one split, the same for the same arguments.

    distinct: draw without replacement, the split reshuffled each time it runs out (validation
    sets); otherwise draw independently with replacement (a training stream).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    pool, rng = exercises(split), random.Random(seed)
    if not distinct:
        return [rng.choice(pool) for _ in range(n)]
    drawn: list[Exercise] = []
    while len(drawn) < n:
        drawn.extend(rng.sample(pool, min(len(pool), n - len(drawn))))
    return drawn


def make_sft_records(n: int, seed: int, *, split: Split = "train") -> list[dict]:
    """n r1_zero SFT records {"prompt", "response", "ground_truth"} drawn from one split.

    split="validation" gives held-out records (an `eval/loss` set disjoint from training).
    """
    return [
        {"prompt": r1_zero_prompt(ex.question), "response": ex.response, "ground_truth": ex.answer}
        for ex in sample_exercises(n, seed, split, distinct=split == "validation")
    ]


def make_problems(n: int, seed: int, *, split: Split = "validation") -> list[dict]:
    """n problems {"problem", "answer"} for accuracy, distinct while the split lasts."""
    return [{"problem": ex.question, "answer": ex.answer} for ex in sample_exercises(n, seed, split, distinct=True)]
