"""The trainer: config tree, models, task, DeepSpeed engine, loop, evaluation and the `slip` command."""
