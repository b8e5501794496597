"""Training: the loop, its callbacks, checkpoints, data parallel and sweeps."""
