"""SFTDataModule: fixed eval split, exact step batches, counted truncation, bad input."""

from __future__ import annotations

import json

import pytest

from lit_sft.data import SFTDataModule, batch_problem
from lit_sft.errors import UserError


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _records(n):
    return [{"prompt": f"User: what is {i}+1?\nAssistant: <think>", "response": f" {i}+1={i + 1} </think> <answer>{i + 1}</answer>", "ground_truth": str(i + 1)} for i in range(n)]


def _dm(tiny_model_path, **kw):
    kw.setdefault("eval_size", 4)
    kw.setdefault("batch_size", 4)
    return SFTDataModule(tokenizer_name_or_path=tiny_model_path, **kw)


def test_eval_split_is_fixed_across_runs_and_disjoint(tiny_model_path, tmp_path):
    path = _write(tmp_path / "sft.jsonl", _records(40))
    a, b = _dm(tiny_model_path, train_path=path), _dm(tiny_model_path, train_path=path)
    a.setup("fit"), b.setup("fit")
    assert [r["input_ids"] for r in a.eval_set] == [r["input_ids"] for r in b.eval_set]
    train_ids = {tuple(r["input_ids"]) for r in a.train_set}
    assert not train_ids & {tuple(r["input_ids"]) for r in a.eval_set}
    assert len(a.eval_set) == 4 and len(a.train_set) == 36


def test_each_train_batch_is_one_step_of_exactly_batch_size_examples(tiny_model_path, tmp_path):
    dm = _dm(tiny_model_path, train_path=_write(tmp_path / "sft.jsonl", _records(40)), batch_size=8, micro_batch_size=3)
    dm.setup("fit")
    steps = list(dm.train_dataloader())
    assert len(steps) == 36 // 8
    for step in steps:
        assert [mb["num_examples"] for mb in step] == [3, 3, 2]


def test_truncation_is_counted_or_refused(tiny_model_path, tmp_path):
    long = _records(20)
    long[3]["response"] = " " + "1+1=2 " * 200 + "</think> <answer>2</answer>"
    path = _write(tmp_path / "sft.jsonl", long)
    cut = _dm(tiny_model_path, train_path=path, max_length=64)
    cut.setup("fit")
    assert cut.stats.truncated == 1 and max(cut.stats.lengths) == 64
    drop = _dm(tiny_model_path, train_path=path, max_length=64, truncation="drop")
    drop.setup("fit")
    assert drop.stats.dropped == 1 and drop.stats.examples == 19
    with pytest.raises(UserError, match="max_length"):
        _dm(tiny_model_path, train_path=path, max_length=64, truncation="error").setup("fit")


def test_prompt_longer_than_max_length_is_a_user_error(tiny_model_path, tmp_path):
    records = _records(20)
    records[5]["prompt"] = "User: " + "long question " * 100 + "\nAssistant: <think>"
    with pytest.raises(UserError, match=r"sft\.jsonl:6: prompt is \d+ tokens"):
        _dm(tiny_model_path, train_path=_write(tmp_path / "sft.jsonl", records), max_length=64).setup("fit")


@pytest.mark.parametrize(
    "content, needle",
    [
        ("", "empty"),
        ('{"prompt": "a", "response": "b"}\n{not json\n', ":2"),
        ('{"prompt": "a"}\n', "response"),
    ],
)
def test_bad_files_name_the_file_and_line(tiny_model_path, tmp_path, content, needle):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(UserError, match=needle) as err:
        _dm(tiny_model_path, train_path=str(path)).setup("fit")
    assert "bad.jsonl" in str(err.value)


def test_batch_larger_than_dataset_and_bad_numbers(tiny_model_path, tmp_path):
    path = _write(tmp_path / "s.jsonl", _records(20))
    with pytest.raises(UserError) as err:
        _dm(tiny_model_path, train_path=path, batch_size=64, eval_size=4).setup("fit")
    assert str(err.value) == (f"data.batch_size=64 is larger than the 16 training records (20 usable in {path}, 4 held out "
                              "for eval/loss: data.eval_size=4, at most data.eval_max_fraction=0.2 of them)")
    generated = _dm(tiny_model_path, num_generated=8, batch_size=64)
    with pytest.raises(UserError, match=r"^data.batch_size=64 is larger than the 8 training records$"):
        generated.setup("fit")
    with pytest.raises(UserError, match="batch_size.*micro_batch_size"):
        SFTDataModule(batch_size=0, micro_batch_size=0)


def test_unknown_tokenizer_path_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="nonexistent"):
        SFTDataModule(tokenizer_name_or_path=str(tmp_path / "nonexistent"), num_generated=40).setup("fit")


def test_real_sft_traces_load_and_mask(tiny_model_path, shared_data):
    dm = _dm(tiny_model_path, train_path=str(shared_data / "math/sft.jsonl"), max_length=8192, eval_size=50)
    dm.setup("fit")
    assert dm.stats.examples + dm.stats.dropped == 1767
    assert len(dm.eval_set) == 50
    row = dm.train_set[0]
    assert row["labels"][0] == -100 and row["labels"][-1] != -100
    problems = SFTDataModule(validation_path=str(shared_data / "math/validation.jsonl"), num_validation_problems=20).validation_problems
    assert len(problems) == 20 and all(p.prompt.rstrip().endswith("<think>") for p in problems)


def test_batch_problem_names_the_per_device_share_only_when_it_differs():
    assert batch_problem(64, 64, "the 8 training records") == "data.batch_size=64 is larger than the 8 training records"
    assert batch_problem(64, 32, "the 8 training records") == "data.batch_size=64 (32 per device) is larger than the 8 training records"


def test_usable_records_are_training_plus_held_out(tiny_model_path, tmp_path):
    dm = _dm(tiny_model_path, train_path=_write(tmp_path / "s.jsonl", _records(20)), eval_size=4)
    assert dm.n_usable == 0
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.eval_set), dm.n_usable, dm.held_out(dm.n_usable)) == (16, 4, 20, 4)


def test_filter_correct_drops_wrong_and_unformatted_traces_and_counts_them(tiny_model_path, tmp_path):
    records = _records(20)
    for i in (0, 1, 2):  # a wrong answer
        records[i]["response"] = records[i]["response"].replace(f"<answer>{i + 1}<", f"<answer>{i + 7}<")
    records[3]["response"] = " no answer block"  # a format failure
    del records[4]["ground_truth"]  # nothing to grade against: kept
    path = _write(tmp_path / "s.jsonl", records)
    kept = _dm(tiny_model_path, train_path=path, filter_correct=True, eval_size=2)
    kept.setup("fit")
    assert kept.stats.filtered_wrong == 4 and kept.n_usable == 16
    everything = _dm(tiny_model_path, train_path=path, eval_size=2)
    everything.setup("fit")
    assert everything.stats.filtered_wrong == 0 and everything.n_usable == 20


def test_generated_validation_problems_are_the_recorded_ones(tiny_model_path):
    """The embedded task's validation sample (seed + 1 of the validation split): the recorded
    curves (bench/curves_embedded.json) and every benchmark were graded on exactly these."""
    from lit_sft.formats import r1_zero_prompt

    problems = SFTDataModule(num_validation_problems=50, seed=0).validation_problems
    assert len(problems) == len({p.prompt for p in problems}) == 50
    assert [(p.prompt, p.answer) for p in problems[:3]] == [
        (r1_zero_prompt("What is 1 - 3 + 0?"), "-2"), (r1_zero_prompt("What is 7 + 1 - 4?"), "4"), (r1_zero_prompt("What is 9 - 2 - 8?"), "-1")]
    assert SFTDataModule(num_validation_problems=50, seed=0).validation_problems == problems
    assert SFTDataModule(num_validation_problems=50, seed=1).validation_problems != problems


def test_a_generated_record_too_long_is_named_by_its_number(tiny_model_path):
    with pytest.raises(UserError, match=r"^record 1 of the generated data: prompt is \d+ tokens, which leaves no room for a response within data.max_length=8$"):
        _dm(tiny_model_path, num_generated=8, max_length=8).setup("fit")


def test_the_token_budget_at_its_edges(tiny_model_path, tmp_path, caplog):
    """A record of exactly max_length tokens fits whole; one token over is cut to fit; each cut or
    dropped record is counted; a prompt that fills max_length is refused; every response ends in EOS."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    short, long = _records(2)[1], _records(101)[100]  # "1+1=2" and "100+1=101": the long one is longer
    length = {id(r): len(tok(r["prompt"], add_special_tokens=False).input_ids) + len(tok(r["response"], add_special_tokens=False).input_ids) + 1
              for r in (short, long)}
    path = _write(tmp_path / "s.jsonl", [short] * 10 + [long] * 10)
    whole = _dm(tiny_model_path, train_path=path, max_length=length[id(long)], eval_size=2)
    whole.setup("fit")
    assert whole.stats.truncated == whole.stats.dropped == 0
    assert sorted(set(whole.stats.lengths)) == sorted(length.values())
    assert all(r["labels"][-1] == tok.eos_token_id == r["input_ids"][-1] for r in whole.train_set + whole.eval_set)
    prompt_tokens = len(tok(short["prompt"], add_special_tokens=False).input_ids)
    assert all(r["labels"][:prompt_tokens] == [-100] * prompt_tokens for r in whole.train_set)
    caplog.set_level("WARNING")
    for truncation in ("truncate", "drop"):
        cut = _dm(tiny_model_path, train_path=path, max_length=length[id(long)] - 1, eval_size=2, truncation=truncation)
        cut.setup("fit")
        counted = cut.stats.truncated if truncation == "truncate" else cut.stats.dropped
        assert counted == 10 and max(cut.stats.lengths) == (length[id(long)] - 1 if truncation == "truncate" else length[id(short)])
        verb = "truncated" if truncation == "truncate" else "dropped"
        assert f"data: 10 of 20 records longer than data.max_length={length[id(long)] - 1} were {verb}" in caplog.text
    with pytest.raises(UserError, match=f"prompt is {prompt_tokens} tokens, which leaves no room"):
        _dm(tiny_model_path, train_path=path, max_length=prompt_tokens).setup("fit")
