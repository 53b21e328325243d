"""Shared fixtures: a tiny model built in code, the real data folder when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# LIT_SFT_SHARED_DATA: for a copy of the tests run elsewhere (tools/mutation.sh runs them in a scratch folder).
SHARED_DATA = Path(os.environ.get("LIT_SFT_SHARED_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data from the project root; tests that need it skip where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder not present: {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 2-layer, 64-dim Qwen2 model and its tokenizer, saved with save_pretrained."""
    from lit_sft.tiny import build_tiny_model

    out = tmp_path_factory.mktemp("tiny-qwen2")
    build_tiny_model(out, num_hidden_layers=2, hidden_size=64)
    return str(out)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Two threads on two busy cores make torch many times slower than one; restore afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """GPU tests are skipped by their marker where no CUDA device exists, never by hand."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
