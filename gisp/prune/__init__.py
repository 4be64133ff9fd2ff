"""Pruning as pure functions and data: importance scores, activation statistics, rankings, schedules, masks,
methods, objectives and the on-disk trajectory. Nothing here reads a config or drives a training loop."""
