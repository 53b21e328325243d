"""How many processes a run trains on, and which devices training and the evaluator use."""

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


def evaluator_device(cfg: dict[str, Any]) -> str:
    """evaluator.device, with `auto` kept off the GPUs of a multi-GPU trial when it can be."""
    device = str(cfg["evaluator"]["device"])
    world = trial_world_size(cfg["trainer"])
    if device != "auto" or world <= 1 or train_device(cfg["trainer"]) == "cpu":
        return device
    devices = cfg["trainer"].get("devices")
    used = {int(d) for d in devices} if isinstance(devices, (list, tuple)) else set(range(world))
    free = [i for i in range(torch.cuda.device_count()) if i not in used]
    return f"cuda:{free[0]}" if free else f"cuda:{min(used)}"
