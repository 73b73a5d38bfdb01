"""The trainer: the config tree, models, objectives and task, the DeepSpeed engine, the build of a
run, the loop, checkpoints and weights. Training's entry point is `trainer.train`."""
