"""The embedded default model: a tiny Qwen2 with a byte-level BPE tokenizer trained here.

Nothing is downloaded. The tokenizer is trained on generated r1_zero records (`lit_sft.synthetic`)
and the model is randomly initialised from a seed; both are saved with ``save_pretrained`` into one
folder, so ``AutoTokenizer.from_pretrained`` and ``AutoModelForCausalLM.from_pretrained`` load it
exactly as they load Qwen/Qwen2.5-Math-1.5B, and every other module treats it as any model.

The tokenizer is a Qwen2Tokenizer: transformers 5 loads any folder whose config says qwen2 with
Qwen's own pre-tokenizer (words apart, digits one by one), whatever tokenizer.json says, so the
BPE is trained under that same pre-tokenizer. Merges cannot cross words there, so the fixed text
of the r1_zero template (before and after the question) and the format tags are added tokens, as
DeepSeek-R1's tokenizers add <think>: an example is then ~40 tokens, not ~130 (on 2 CPU cores,
sequence length is most of the cost of a step).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TINY_VERSION = 2
"""Part of the cache folder's name: bump it whenever the recipe (tokenizer corpus or settings,
model config, initialisation) changes, so no one keeps loading a model built the old way."""

CACHE_ENV = "LIT_SFT_CACHE"
"""Environment variable naming the cache root instead of ~/.cache/lit-sft."""

EOS = "<|endoftext|>"
SPECIAL_TOKENS = (EOS, "<|im_start|>", "<|im_end|>")
"""Qwen's names, so code that looks tokens up by name behaves the same on both models."""

DEFAULT_LAYERS = 2
DEFAULT_HIDDEN = 128


@dataclass(frozen=True)
class TokenizerRecipe:
    """How the BPE tokenizer is trained."""

    vocab_size: int = 1024
    """An upper bound: training stops earlier, once no pair repeats (~300 tokens on this corpus)."""
    corpus_records: int = 2000
    """Generated records the merges are learned from."""
    seed: int = 0
    """Seed of the generated corpus."""
    max_length: int = 4096
    """model_max_length written to the tokenizer config (= the model's position limit)."""


FORMAT_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def added_texts() -> tuple[str, ...]:
    """Texts that become one token each: the template around the question, and the r1_zero tags."""
    from lit_sft.formats import r1_zero_prompt

    before, after = r1_zero_prompt("{question}").split("{question}")
    return (before, after, *FORMAT_TAGS)


def _corpus(recipe: TokenizerRecipe, added: tuple[str, ...]) -> list[str]:
    """The generated records cut at the added texts, as the tokenizer will see them.

    Training does not skip added tokens itself: left in, they would teach merges that never apply
    and hide the ones that do (a question right after the template starts without a space).
    """
    from lit_sft.synthetic import make_sft_records

    cut = re.compile("|".join(re.escape(text) for text in sorted(added, key=len, reverse=True)))
    records = make_sft_records(recipe.corpus_records, recipe.seed)
    texts = (text for record in records for text in (record["prompt"], record["response"]))
    return [piece for text in texts for piece in cut.split(text) if piece]


def build_tokenizer(recipe: TokenizerRecipe = TokenizerRecipe()) -> Any:
    """A byte-level BPE tokenizer trained on the generated task, as a transformers Qwen2Tokenizer."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )
    from transformers.models.qwen2.tokenization_qwen2 import (
        PRETOKENIZE_REGEX,
        Qwen2Tokenizer,
    )

    # The same normalizer and pre-tokenizer Qwen2Tokenizer installs when it loads the folder.
    trainee = Tokenizer(models.BPE())
    trainee.normalizer = normalizers.NFC()
    trainee.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=recipe.vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        # Every byte stays encodable: text outside the corpus (real MATH data) still round-trips.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    added = added_texts()
    trainee.train_from_iterator(_corpus(recipe, added), trainer)
    model = json.loads(trainee.to_str())["model"]
    tokenizer = Qwen2Tokenizer(
        vocab=model["vocab"],
        merges=[tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]],
        extra_special_tokens=list(SPECIAL_TOKENS[1:]),
        model_max_length=recipe.max_length,
    )
    # normalized=False: matched on the raw text, before NFC; special=False: decoding keeps them.
    tokenizer.add_tokens([AddedToken(text, normalized=False, special=False) for text in added])
    return tokenizer


def tiny_config(tokenizer: Any, *, num_hidden_layers: int, hidden_size: int, **overrides: Any) -> Any:
    """A Qwen2 config scaled down: 32-dim heads, 4x MLP, tied embeddings."""
    from transformers import Qwen2Config

    heads = max(1, hidden_size // 32)
    settings: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden_size,
        "intermediate_size": 4 * hidden_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "max_position_embeddings": tokenizer.model_max_length,
        # Tied as in Qwen2.5-Math-1.5B, so the tiny model exercises the same save/load path.
        "tie_word_embeddings": True,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": None,
    }
    settings.update(overrides)
    return Qwen2Config(**settings)


def make_tiny(
    *,
    num_hidden_layers: int = DEFAULT_LAYERS,
    hidden_size: int = DEFAULT_HIDDEN,
    seed: int = 0,
    **config_overrides: Any,
) -> tuple[Any, Any]:
    """(tokenizer, model) in memory; the same arguments give the same tokens and weights."""
    import torch
    from transformers import GenerationConfig, Qwen2ForCausalLM

    tokenizer = build_tokenizer()
    config = tiny_config(tokenizer, num_hidden_layers=num_hidden_layers, hidden_size=hidden_size, **config_overrides)
    # A private RNG state: building the model must not move the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False
    )
    return tokenizer, model


def build_tiny_model(
    out_dir: str | Path,
    *,
    num_hidden_layers: int = DEFAULT_LAYERS,
    hidden_size: int = DEFAULT_HIDDEN,
    seed: int = 0,
    **config_overrides: Any,
) -> Path:
    """Train the tokenizer, initialise the model from `seed`, save both into out_dir (returned).

    config_overrides go to Qwen2Config (e.g. intermediate_size, num_key_value_heads).
    """
    tokenizer, model = make_tiny(
        num_hidden_layers=num_hidden_layers, hidden_size=hidden_size, seed=seed, **config_overrides
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)
    model.save_pretrained(out)
    return out


def cache_name() -> str:
    """The cache entry's folder name: the recipe version and a digest of the template.

    The template is baked into the tokenizer (added tokens), and formats.py reads it from a file
    anyone may edit: a changed template must not reuse a tokenizer made for the old one.
    """
    digest = hashlib.blake2b("\0".join(added_texts()).encode("utf-8"), digest_size=4).hexdigest()
    return f"tiny-qwen2-v{TINY_VERSION}-{digest}"


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """cache_dir, else $LIT_SFT_CACHE, else ~/.cache/lit-sft."""
    chosen = cache_dir or os.environ.get(CACHE_ENV) or "~/.cache/lit-sft"
    return Path(chosen).expanduser()


def tiny_model_path(cache_dir: str | Path | None = None) -> str:
    """The folder of the default-sized tiny model, built on first use and reused after.

    The folder is ``<cache root>/<cache_name()>``, e.g. ``~/.cache/lit-sft/tiny-qwen2-v2-b58bd585``
    (`cache_root` says where the root is).

    The model is built in a temporary folder beside the cache entry and renamed into place, so a
    process never sees a half-written folder; when two processes build at once, the first rename
    wins and the other discards its copy (both copies are identical).
    """
    root = cache_root(cache_dir)
    final = root / cache_name()
    if final.is_dir():
        return str(final)
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        build_tiny_model(staging)
        # mkdtemp makes the folder private (0700); the cache entry is for every process of the user.
        staging.chmod(0o755)
        try:
            staging.rename(final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(final)
