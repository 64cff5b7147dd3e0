"""Training: schedules and optimizers, checkpoints, metrics and the one generic loop."""
