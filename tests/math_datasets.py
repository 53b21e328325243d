"""Small datasets in the Hub layout and field names of the reference config's datasets
(rasbt/math_full_minus_math500, HuggingFaceH4/MATH-500), built in a test's folder."""

from __future__ import annotations

import json
from pathlib import Path

from lit_sft.synthetic import exercises
from tests.conftest import SHARED_DATA

TRAIN_ID, TEST_ID = "rasbt/math_full_minus_math500", "HuggingFaceH4/MATH-500"


def _card_row(problem: str, solution: str, answer: str, i: int, split: str) -> dict:
    """Every field the datasets' cards list, in their names."""
    return {"problem": problem, "solution": solution, "answer": answer, "subject": "Prealgebra",
            "level": f"Level {1 + i % 5}", "unique_id": f"{split}/prealgebra/{i}.json"}


def math_train(n: int) -> list[dict]:
    """MATH-shaped training problems whose worked solutions end in \\boxed{} (generated arithmetic)."""
    pool = exercises("train")[:n]
    return [_card_row(ex.question, f"{ex.steps}, so the answer is $\\boxed{{{ex.answer}}}$.", ex.answer, i, "train") for i, ex in enumerate(pool)]


def math500(n: int) -> list[dict]:
    """MATH-500-shaped test problems: real MATH problems from ../shared/data where present, else generated."""
    real = SHARED_DATA / "math/validation.jsonl"
    if real.is_file():
        rows = [json.loads(line) for line in real.read_text().splitlines()[:n]]
        return [_card_row(r["problem"], f"So the answer is $\\boxed{{{r['answer']}}}$.", r["answer"], i, "test") for i, r in enumerate(rows)]
    return [_card_row(ex.question, f"{ex.steps} $\\boxed{{{ex.answer}}}$", ex.answer, i, "test") for i, ex in enumerate(exercises("test")[:n])]


def hub_layout(root: Path, repo_id: str, split: str, rows: list[dict]) -> str:
    """What a download of `repo_id` leaves: <root>/<repo_id>/data/<split>-00000-of-00001.parquet."""
    import datasets

    folder = root / repo_id
    (folder / "data").mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(rows).to_parquet(str(folder / "data" / f"{split}-00000-of-00001.parquet"))
    return str(folder)


def reference_data(root: Path, train_rows: int = 800, test_rows: int = 12) -> dict[str, str]:
    """The reference config's data keys pointed at local copies: --data.train_path ... overrides."""
    train = hub_layout(root, TRAIN_ID, "train", math_train(train_rows))
    test = hub_layout(root, TEST_ID, "test", math500(test_rows))
    return {"data.train_path": train, "data.validation_path": train, "data.test_path": test}
