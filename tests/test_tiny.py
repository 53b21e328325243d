"""The embedded tiny model: tokenizer and weights survive save/load, the cache builds once."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lit_sft import tiny
from lit_sft.synthetic import make_sft_records

TEXTS = (
    "What is 7 - 9 + 4?",
    " 7 - 9 = -2, -2 + 4 = 2 </think> <answer>2</answer>",
    "Prose outside the corpus: Ünïcode, \\frac{1}{2}, 31415926 and tabs\tand\nnewlines.",
)


@pytest.fixture(scope="module")
def loaded(tiny_model_path: str):
    return AutoTokenizer.from_pretrained(tiny_model_path), AutoModelForCausalLM.from_pretrained(tiny_model_path)


@pytest.fixture(scope="module")
def in_memory():
    """Built again with the fixture's arguments (conftest: 2 layers, 64 dims, seed 0)."""
    return tiny.make_tiny(num_hidden_layers=2, hidden_size=64)


def test_tokenizer_round_trips_through_save_pretrained(loaded, in_memory) -> None:
    tokenizer, _ = loaded
    fresh, _ = in_memory
    record = make_sft_records(1, seed=3)[0]
    for text in (*TEXTS, record["prompt"], record["prompt"] + record["response"]):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids == fresh(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text


def test_model_round_trips_through_save_pretrained(loaded, in_memory) -> None:
    tokenizer, model = loaded
    _, fresh = in_memory
    ids = tokenizer([TEXTS[0]], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, fresh(ids).logits)
    assert model.config.model_type == "qwen2"
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (2, 64)


def test_seed_changes_weights_and_nothing_else() -> None:
    _, a = tiny.make_tiny(num_hidden_layers=1, hidden_size=32, seed=0)
    _, b = tiny.make_tiny(num_hidden_layers=1, hidden_size=32, seed=1)
    assert a.config.to_dict() == b.config.to_dict()
    assert not torch.equal(a.model.embed_tokens.weight, b.model.embed_tokens.weight)


def test_digits_are_single_tokens(loaded) -> None:
    tokenizer, _ = loaded
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("12345 + 67", add_special_tokens=False)["input_ids"])
    assert [t for t in tokens if any(c.isdigit() for c in t)] == list("1234567")


def test_eos_is_pad_and_known_to_model_and_generation(loaded) -> None:
    tokenizer, model = loaded
    assert tokenizer.eos_token == "<|endoftext|>" == tokenizer.pad_token
    assert tokenizer.eos_token_id is not None
    assert model.config.eos_token_id == tokenizer.eos_token_id == model.generation_config.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    # Decoding for grading drops eos but must keep the r1_zero tags.
    ids = tokenizer(TEXTS[1], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert tokenizer.decode(ids, skip_special_tokens=True) == TEXTS[1]


def test_records_are_short_and_the_seam_is_stable(loaded) -> None:
    tokenizer, _ = loaded
    for record in make_sft_records(20, seed=0):
        prompt = tokenizer(record["prompt"], add_special_tokens=False)["input_ids"]
        response = tokenizer(record["response"], add_special_tokens=False)["input_ids"]
        # The ~400-character template is two tokens; the question and worked steps stay digit by digit.
        assert len(prompt) <= 16 and len(response) <= 30
        # Tokenized apart (data.py) or together (a grader re-tokenizing), the tokens agree.
        joint = tokenizer(record["prompt"] + record["response"], add_special_tokens=False)["input_ids"]
        assert joint == prompt + response


def test_greedy_generation_stops_within_the_limit(loaded) -> None:
    tokenizer, model = loaded
    tokenizer.padding_side = "left"
    prompts = [r["prompt"] for r in make_sft_records(3, seed=1)]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    width = batch["input_ids"].shape[1]
    out = model.generate(**batch, max_new_tokens=5)  # greedy by the saved generation config
    assert torch.equal(out[:, :width], batch["input_ids"])
    assert width < out.shape[1] <= width + 5
    again = model.generate(**batch, max_new_tokens=5)
    assert torch.equal(out, again)


def test_cache_builds_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(tiny.CACHE_ENV, str(tmp_path))
    first = Path(tiny.tiny_model_path())
    assert first.parent == tmp_path and first.name == tiny.cache_name()
    weights = first / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert Path(tiny.tiny_model_path()) == first
    assert weights.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no staging folder left behind
    config = AutoModelForCausalLM.from_pretrained(first).config
    assert (config.num_hidden_layers, config.hidden_size) == (tiny.DEFAULT_LAYERS, tiny.DEFAULT_HIDDEN)


def test_cache_keeps_the_first_of_two_concurrent_builds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    final = tmp_path / tiny.cache_name()

    def racing_build(out_dir: Path, **size) -> Path:
        # Another process finishes its build and renames it into place while this one builds.
        final.mkdir()
        (final / "winner").touch()
        (Path(out_dir) / "loser").touch()
        return Path(out_dir)

    monkeypatch.setattr(tiny, "build_tiny_model", racing_build)
    assert tiny.tiny_model_path(tmp_path) == str(final)
    assert [p.name for p in final.iterdir()] == ["winner"]
    assert [p.name for p in tmp_path.iterdir()] == [final.name]


def test_failed_build_leaves_no_cache_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_build(out_dir: Path, **size) -> Path:
        (Path(out_dir) / "half-written").touch()
        raise RuntimeError("disk full")

    monkeypatch.setattr(tiny, "build_tiny_model", broken_build)
    with pytest.raises(RuntimeError, match="disk full"):
        tiny.tiny_model_path(tmp_path)
    assert list(tmp_path.iterdir()) == []
