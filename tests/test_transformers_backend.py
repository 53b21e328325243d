"""The transformers evaluator backend, in this process: batched greedy answers equal one-at-a-time
greedy answers, in the prompts' order, cut at EOS and at `</answer>`."""

from __future__ import annotations

import pytest
import torch

from lit_sft.evaluator.backends import STOP, Generation, TransformersBackend, truncate_at_stop

PROMPTS = ["What is 1 + 2?", "Hi", "A much longer prompt about seven minus nine plus four, and more words", "x y", "Why?"]


@pytest.fixture(scope="module")
def backend(tiny_model_path: str) -> TransformersBackend:
    return TransformersBackend.load(tiny_model_path, "cpu", max_new_tokens=8, batch_size=2)


def _reference(backend: TransformersBackend, prompt: str) -> Generation:
    """Plain greedy `generate` on one unpadded prompt, cut at the first EOS."""
    enc = backend.tokenizer([prompt], return_tensors="pt")
    with torch.inference_mode():
        out = backend.model.generate(**enc, max_new_tokens=8, do_sample=False, num_beams=1,
                                     pad_token_id=backend.tokenizer.pad_token_id, eos_token_id=backend._eos_ids)
    ids = out[0, enc["input_ids"].shape[1] :].tolist()
    ends = set(backend._eos_ids)
    ids = ids[: next((i for i, t in enumerate(ids) if t in ends), len(ids))]
    return Generation(truncate_at_stop(backend.tokenizer.decode(ids, skip_special_tokens=True)), tuple(ids))


def test_loads_in_float32_on_the_device_asked(backend: TransformersBackend) -> None:
    assert backend.device == "cpu" and backend.model.dtype == torch.float32
    assert backend.model.device.type == "cpu" and not backend.model.training
    assert backend.tokenizer.padding_side == "left" and backend.tokenizer.pad_token_id is not None


def test_batched_answers_are_the_one_at_a_time_greedy_answers_in_order(backend: TransformersBackend) -> None:
    got = backend.generate(PROMPTS)
    assert got == [_reference(backend, p) for p in PROMPTS]
    assert all(len(g.token_ids) > 0 for g in got)  # random weights still write something


def test_decoding_is_greedy_whatever_the_checkpoint_asks(tiny_model_path: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    model.generation_config.do_sample, model.generation_config.temperature = True, 5.0
    model.generation_config.num_beams = 3
    backend = TransformersBackend(model, AutoTokenizer.from_pretrained(tiny_model_path), "cpu", 8, batch_size=4)
    config = backend.generation_config
    assert (config.do_sample, config.num_beams, config.stop_strings, config.max_new_tokens) == (False, 1, [STOP], 8)
    torch.manual_seed(0)
    first = backend.generate(PROMPTS)
    torch.manual_seed(1)
    assert backend.generate(PROMPTS) == first == [_reference(backend, p) for p in PROMPTS]


def test_a_row_ends_at_its_eos_and_its_padding_is_not_an_answer(backend: TransformersBackend) -> None:
    first = backend.generate(PROMPTS)
    # The first token the model writes for prompt 1 becomes EOS: that row ends at once while the
    # other row of its batch goes on, and the first row's padding is no part of its answer.
    eos = first[1].token_ids[0]
    saved = backend.generation_config.eos_token_id
    try:
        backend.generation_config.eos_token_id = [eos]
        got = backend.generate(PROMPTS)
    finally:
        backend.generation_config.eos_token_id = saved
    assert got[1] == Generation("", ())
    assert [g for i, g in enumerate(got) if i != 1] == [g for i, g in enumerate(first) if i != 1 and eos not in g.token_ids]


def test_eos_ids_take_every_form_a_config_has(backend: TransformersBackend) -> None:
    saved = backend.generation_config.eos_token_id
    try:
        for eos, ids in ((None, []), (7, [7]), ([7, 9], [7, 9])):
            backend.generation_config.eos_token_id = eos
            assert backend._eos_ids == ids
    finally:
        backend.generation_config.eos_token_id = saved
    assert saved == backend.model.generation_config.eos_token_id is not None  # the model's own EOS, restored


def test_an_answer_is_cut_after_its_first_close_tag() -> None:
    assert truncate_at_stop("</answer> more") == "</answer>"
    assert truncate_at_stop("a </answer> b </answer>") == "a </answer>"
    assert truncate_at_stop("no tag") == "no tag"


def test_a_bfloat16_checkpoint_is_served_in_float32_on_the_cpu(tiny_model_path: str, tmp_path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(tiny_model_path).to(torch.bfloat16).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tiny_model_path).save_pretrained(tmp_path)
    assert TransformersBackend.load(str(tmp_path), "cpu", max_new_tokens=4, batch_size=2).model.dtype == torch.float32


def test_padding_and_eos_come_from_the_tokenizer_where_the_model_has_none(tiny_model_path: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    assert TransformersBackend(model, tokenizer, "cpu", 8, 2).generation_config.eos_token_id == model.generation_config.eos_token_id is not None
    model.generation_config.eos_token_id = None
    tokenizer.pad_token = None
    backend = TransformersBackend(model, tokenizer, "cpu", 8, 2)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id is not None
    assert backend.generation_config.eos_token_id == tokenizer.eos_token_id
    assert backend.generation_config.pad_token_id == tokenizer.pad_token_id
