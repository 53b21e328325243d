"""Lightning callbacks, one job each (checkpoint posting, pruning, history).

Import them from their modules (`callbacks.checkpoint_poster`, ...): importing this package
stays free of Lightning and the evaluator.
"""
