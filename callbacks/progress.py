"""Lightning's rich progress bar, labelled for step-budgeted runs."""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar
from typing_extensions import override


class StepProgressBar(RichProgressBar):
    """Reads "Epoch 3 · 500 steps max" rather than Lightning's "Epoch 3/-2" when max_epochs is -1."""

    @override
    def _get_train_description(self, current_epoch: int) -> str:
        if self.trainer.max_epochs not in (None, -1):
            return super()._get_train_description(current_epoch)
        # Set once per epoch by Lightning, so it names the step budget, not the current step.
        text = f"Epoch {current_epoch} · {self.trainer.max_steps} steps max"
        return f"{text:{len(self.validation_description)}}"
