"""Data sources through `datasets`: Parquet/JSON/CSV files, save_to_disk and Hub-layout folders,
Hub ids; split choice, column maps, and bad input named by source, row and column."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lit_sft import sources
from lit_sft.config import complete
from lit_sft.data import SFTDataModule, data_problems
from lit_sft.errors import UserError
from lit_sft.formats import r1_zero_prompt

datasets = pytest.importorskip("datasets")


def _math(n: int, start: int = 0) -> list[dict]:
    """MATH-shaped records: a worked solution ending in \\boxed{}, and the answer beside it."""
    return [{"problem": f"What is {i} + 1?", "solution": f"{i} + 1 = {i + 1}, so $\\boxed{{{i + 1}}}$.",
             "answer": str(i + 1), "level": "Level 1"} for i in range(start, start + n)]


def _parquet(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    return str(path)


def _hub_folder(root: Path, splits: dict[str, list[dict]]) -> str:
    """A folder as a Hub dataset download leaves it: data/<split>-00000-of-00001.parquet."""
    for name, rows in splits.items():
        _parquet(root / "data" / f"{name}-00000-of-00001.parquet", rows)
    return str(root)


def _dm(**kw) -> SFTDataModule:
    kw.setdefault("eval_size", 4)
    kw.setdefault("batch_size", 4)
    return SFTDataModule(**kw)


def test_parquet_json_and_csv_files_read_like_jsonl(tmp_path):
    rows = _math(6)
    paths = [_parquet(tmp_path / "m.parquet", rows), str(tmp_path / "m.json"), str(tmp_path / "m.csv")]
    datasets.Dataset.from_list(rows).to_json(paths[1])
    datasets.Dataset.from_list(rows).to_csv(paths[2], index=False)
    expected = [r1_zero_prompt(r["problem"]) for r in rows]
    for path in paths:
        examples = _dm(train_path=path, schema="problem_solution")._examples()
        assert [e.prompt for e in examples] == expected, path
        assert [e.answer for e in examples] == [r["answer"] for r in rows]
    # CSV has no types: an answer column of numbers is read as the text written, not as int.
    problems = _dm(validation_path=paths[2], validation_schema="problem_answer", num_validation_problems=6).validation_problems
    assert sorted(p.answer for p in problems) == sorted(r["answer"] for r in rows)


def test_save_to_disk_folders_pick_validation_else_test_else_the_only_split(tmp_path):
    train, val, test = datasets.Dataset.from_list(_math(8)), datasets.Dataset.from_list(_math(3, 100)), datasets.Dataset.from_list(_math(2, 200))
    datasets.DatasetDict(train=train, validation=val, test=test).save_to_disk(str(tmp_path / "all"))
    datasets.DatasetDict(train=train, test=test).save_to_disk(str(tmp_path / "no_val"))
    test.save_to_disk(str(tmp_path / "one"))
    answers = lambda path, **kw: sorted(int(p.answer) for p in _dm(validation_path=path, num_validation_problems=50, **kw).validation_problems)  # noqa: E731
    assert answers(str(tmp_path / "all")) == [101, 102, 103]
    assert answers(str(tmp_path / "no_val")) == [201, 202]
    assert answers(str(tmp_path / "one")) == [201, 202]
    assert answers(str(tmp_path / "all"), validation_split="train") == list(range(1, 9))
    assert len(_dm(train_path=str(tmp_path / "all"))._examples()) == 8  # train by default
    with pytest.raises(UserError, match=r"data.validation_split: .*all has no split 'dev'; its splits: test, train, validation"):
        _dm(validation_path=str(tmp_path / "all"), validation_split="dev").validation_problems  # noqa: B018


def test_hub_layout_folder_with_a_chosen_split(tmp_path):
    folder = _hub_folder(tmp_path / "math_full", {"train": _math(10), "test": _math(4, 50)})
    assert [e.answer for e in _dm(train_path=folder)._examples()] == [str(i) for i in range(1, 11)]
    assert [e.answer for e in _dm(train_path=folder, train_split="test")._examples()] == ["51", "52", "53", "54"]
    # No validation split there: validation takes test.
    assert sorted(p.answer for p in _dm(validation_path=folder, validation_schema="problem_answer").validation_problems) == ["51", "52", "53", "54"]
    # Several splits, none of the defaults: the key to set is named.
    odd = _hub_folder(tmp_path / "odd", {"dev": _math(2), "extra": _math(2)})
    with pytest.raises(UserError, match=r"data.train_split: .*odd has splits dev, extra and none of train; name the split with data.train_split"):
        _dm(train_path=odd)._examples()


def test_column_maps_rename_a_dataset_and_a_missing_column_is_named(tmp_path):
    renamed = [{"q": f"Tom has {i} apples and gets one more. How many?", "a": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(5)]
    path = _parquet(tmp_path / "gsm.parquet", renamed)
    examples = _dm(train_path=path, columns={"question": "q", "answer": "a"})._examples()
    assert examples[2].answer == "3" and examples[2].prompt == r1_zero_prompt(renamed[2]["q"])
    problems = _dm(validation_path=path, validation_columns={"question": "q", "answer": "a"}, num_validation_problems=5).validation_problems
    assert sorted(p.answer for p in problems) == ["1", "2", "3", "4", "5"]
    with pytest.raises(UserError, match=r"gsm\.parquet: no column 'qq' \(schema question_answer\); its columns are q, a \(name the ones to use with data.columns\)"):
        _dm(train_path=path, schema="question_answer", columns={"question": "qq", "answer": "a"})._examples()
    with pytest.raises(UserError, match=r"gsm\.parquet: cannot tell the record schema from its columns \['a', 'q'\]"):
        _dm(train_path=path)._examples()
    with pytest.raises(UserError, match=r"data.columns: unknown field\(s\) quest; the schemas' fields are prompt"):
        _dm(train_path=path, columns={"quest": "q"})


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"solution": "no box here"}, r"m\.parquet, row 3: column 'solution' has no \\boxed\{...\} answer \(schema problem_solution\)"),
        ({"solution": None}, r"m\.parquet, row 3: column 'solution' is null \(schema problem_solution\)"),
        ({"solution": "  "}, r"m\.parquet, row 3: column 'solution' is empty \(schema problem_solution\)"),
    ],
)
def test_a_bad_parquet_row_is_named_by_file_row_and_column(tmp_path, bad, message):
    rows = _math(6)
    rows[3].update(bad)
    path = _parquet(tmp_path / "m.parquet", rows)
    with pytest.raises(UserError, match=message):
        _dm(train_path=path)._examples()


def test_a_wrong_type_column_and_an_empty_split(tmp_path):
    path = _parquet(tmp_path / "n.parquet", [{"problem": "p", "answer": 4}, {"problem": "q", "answer": 5}])
    with pytest.raises(UserError, match=r"n\.parquet, row 0: column 'answer' must be a string, got a number \(schema problem_answer\)"):
        _dm(validation_path=path).validation_problems  # noqa: B018
    folder = _hub_folder(tmp_path / "hub", {"train": _math(4), "test": []})
    with pytest.raises(UserError, match=r"hub \(split test\): empty split \(no rows\)"):
        _dm(validation_path=folder).validation_problems  # noqa: B018


def test_a_hub_id_that_cannot_be_reached_says_so_in_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError) as err:
        _dm(train_path="rasbt/math_full_minus_math500")._examples()
    message = str(err.value)
    assert message.startswith("data.train_path: cannot reach Hugging Face dataset 'rasbt/math_full_minus_math500'")
    assert "\n" not in message


def test_paths_that_are_neither_files_folders_nor_hub_ids(tmp_path):
    assert sources.kind("owner/name") == "hub"
    assert sources.kind("data/sft.jsonl") is None  # a missing file, not a Hub id
    assert sources.spec_problem(str(tmp_path / "nope.parquet"), "data.train_path").startswith("data.train_path: no such file or folder")
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps({"problem": "p", "answer": "1"}) + "\n")
    with pytest.raises(UserError, match=r"data.validation_split: .*s\.jsonl is one JSONL file, it has no split 'test'"):
        _dm(validation_path=str(path), validation_split="test").validation_problems  # noqa: B018


def test_validation_from_the_training_data_is_held_out_of_training(tmp_path):
    """The reference study selects on training problems kept out of training, and tests on others."""
    folder = _hub_folder(tmp_path / "train", {"train": _math(30)})
    dm = _dm(train_path=folder, schema="problem_solution", validation_path=folder, validation_schema="problem_solution", num_validation_problems=8)
    held = {p.prompt for p in dm.validation_problems}
    trained = {e.prompt for e in dm._examples()}
    assert len(held) == 8 and len(trained) == 22 and not held & trained
    again = _dm(train_path=folder, validation_path=folder, num_validation_problems=8)
    assert {p.prompt for p in again.validation_problems} == held  # the same sample every run
    with pytest.raises(UserError, match=r"data.test_path: .*train is the training data"):
        _dm(train_path=folder, test_path=folder).test_problems  # noqa: B018
    with pytest.raises(UserError, match=r"holding out data.num_validation_problems=30 leaves none to train on"):
        _dm(train_path=folder, validation_path=folder, num_validation_problems=30)._examples()


def test_config_and_data_problems_are_reported_together(tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "p", "response": "r"}\n{not json\n')
    cfg = complete({"data": {"train_path": str(broken)}, "trainer": {"max_steps": 2, "val_check_interval": 25}})
    assert data_problems(cfg) == [f"{broken}:2: invalid JSON: Expecting property name enclosed in double quotes (column 2)"]
    from lit_sft.config import check

    with pytest.raises(UserError) as err:
        check(cfg)
    assert "trainer.val_check_interval (25 steps) > trainer.max_steps (2)" in str(err.value)
    assert f"{broken}:2: invalid JSON" in str(err.value)


def test_a_record_too_long_after_tokenizing_is_named_by_its_row(tiny_model_path, tmp_path):
    rows = _math(12)
    rows[5]["solution"] = "1 + 1 = 2. " * 200 + "$\\boxed{2}$"
    path = _parquet(tmp_path / "long.parquet", rows)
    with pytest.raises(UserError, match=r"long\.parquet, row 5: \d+ tokens > data.max_length=64"):
        _dm(train_path=path, tokenizer_name_or_path=tiny_model_path, max_length=64, truncation="error").setup("fit")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.json", '{"problem": "a", "answer": "1"}\n{"problem": "b", "answer": \n', r"bad\.json:2: invalid JSON: Expecting value"),
        ("bad.parquet", "not parquet", r"data.validation_path: cannot read .*bad\.parquet: ArrowInvalid: Parquet magic bytes not found"),
        ("bad.csv", 'problem,answer\n"a,1\nb,2\n', r"data.validation_path: cannot read .*bad\.csv: ParserError: .*EOF inside string"),
    ],
)
def test_a_file_datasets_cannot_read_is_one_line_with_the_cause(tmp_path, capfd, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(UserError, match=message) as err:
        _dm(validation_path=str(path)).validation_problems  # noqa: B018
    assert "\n" not in str(err.value)
    assert "Failed to" not in capfd.readouterr().err  # datasets' own ERROR log stays quiet: the one line says it


def test_split_and_column_map_from_the_command_line(tmp_path):
    from lit_sft.config import parse

    renamed = [{"q": f"What is {i} + 2?", "a": f"{i} + 2 = {i + 2}\n#### {i + 2}"} for i in range(6)]
    folder = _hub_folder(tmp_path / "gsm", {"train": renamed[:2], "test": renamed[2:]})
    cfg = parse(["--data.train_path", folder, "--data.train_split", "test", "--data.columns", "{question: q, answer: a}",
                 "--data.batch_size", "2"])  # 4 records: the default batch of 32 would be refused
    assert cfg["data"]["columns"] == {"question": "q", "answer": "a"}
    assert [e.answer for e in SFTDataModule(**cfg["data"])._examples()] == ["4", "5", "6", "7"]
    with pytest.raises(UserError, match=r"data.columns: unknown field\(s\) quest"):
        parse(["--data.train_path", folder, "--data.columns", "{quest: q}"])
