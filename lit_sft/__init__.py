"""lit-sft: tune SFT hyperparameters of causal LMs on math reasoning traces (Optuna + Lightning)."""

__version__ = "0.1.0"
