"""Run infrastructure shared by both trainers: configs, run folders, checkpoints, errors."""
