"""How many processes a run trains on, and which device training uses (the evaluator's:
`lit_sft.evaluator.config.place`)."""

from __future__ import annotations

from typing import Any

import torch


def count_devices(devices: Any, accelerator: str) -> int:
    if isinstance(devices, (list, tuple)):
        return len(devices)
    text = str(devices).strip()
    if "," in text:
        return len([d for d in text.split(",") if d.strip()])
    if text in ("auto", "-1"):
        return 1 if accelerator == "cpu" or not torch.cuda.is_available() else torch.cuda.device_count()
    try:
        return max(int(text), 1)
    except ValueError:
        return 1  # Lightning reports what it cannot parse when the trainer is built


def trial_world_size(trainer_cfg: dict[str, Any]) -> int:
    """Processes one trial runs on: its devices on this machine."""
    accelerator = str(trainer_cfg.get("accelerator") or "auto")
    return count_devices(trainer_cfg.get("devices", 1), accelerator)


def train_device(trainer_cfg: dict[str, Any]) -> str:
    accelerator = str(trainer_cfg.get("accelerator") or "auto")
    if accelerator == "cpu" or not torch.cuda.is_available():
        return "cpu"
    devices = trainer_cfg.get("devices")
    if isinstance(devices, (list, tuple)) and devices:
        return f"cuda:{devices[0]}"
    return "cuda:0"
