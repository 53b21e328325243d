"""Lightning's model summary without its FLOPs, which it cannot count for SFTModule.

Lightning counts FLOPs only by running the module on `example_input_array`; SFTModule has none
(its batches are lists of micro-batches whose shapes vary), so the column and the total read 0,
which says something untrue about the model.
"""

from __future__ import annotations

import logging
from typing import Any

from lightning.pytorch.callbacks import ModelSummary, RichModelSummary
from lightning.pytorch.utilities.model_summary.model_summary import _format_summary_table, get_formatted_model_size, get_human_readable_count
from typing_extensions import override

from lit_sft.available import has_module

log = logging.getLogger(__name__)

FLOPS = "FLOPs"


def _without_flops(summary_data: list[tuple[str, list[str]]]) -> list[tuple[str, list[str]]]:
    return [(name, values) for name, values in summary_data if name != FLOPS]


class PlainSummary(ModelSummary):
    """The text table, without FLOPs."""

    @staticmethod
    @override
    def summarize(summary_data: list[tuple[str, list[str]]], total_parameters: int, trainable_parameters: int, model_size: float,
                  total_training_modes: dict[str, int], total_flops: int, **summarize_kwargs: Any) -> None:
        table = _format_summary_table(total_parameters, trainable_parameters, model_size, total_training_modes, total_flops,
                                      *_without_flops(summary_data))
        log.info("\n" + "\n".join(line for line in table.splitlines() if not line.endswith("Total Flops")))


class RichSummary(RichModelSummary):
    """The rich table Lightning shows beside its rich progress bar, without FLOPs."""

    @staticmethod
    @override
    def summarize(summary_data: list[tuple[str, list[str]]], total_parameters: int, trainable_parameters: int, model_size: float,
                  total_training_modes: dict[str, int], total_flops: int, **summarize_kwargs: Any) -> None:
        from rich import get_console
        from rich.table import Table

        columns = _without_flops(summary_data)
        table = Table(header_style=summarize_kwargs.get("header_style", "bold magenta"))
        for name, _ in columns:
            table.add_column(name, justify="right" if name in ("Params", "In sizes", "Out sizes") else "left", no_wrap=name == "Name")
        for row in zip(*(values for _, values in columns)):
            table.add_row(*row)
        totals = Table.grid(expand=True)
        totals.add_column()
        for label, value in (
            ("Trainable params", get_human_readable_count(int(trainable_parameters))),
            ("Non-trainable params", get_human_readable_count(int(total_parameters - trainable_parameters))),
            ("Total params", get_human_readable_count(int(total_parameters))),
            ("Total estimated model params size (MB)", get_formatted_model_size(model_size)),
            ("Modules in train mode", total_training_modes["train"]),
            ("Modules in eval mode", total_training_modes["eval"]),
        ):
            totals.add_row(f"[bold]{label}[/]: {value}")
        console = get_console()
        console.print(table)
        console.print(totals)


def model_summary() -> ModelSummary:
    """The summary callback for a run that shows one (rich where the rich progress bar is)."""
    return RichSummary() if has_module("rich") else PlainSummary()
