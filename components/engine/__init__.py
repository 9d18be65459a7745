"""The training engine shared by every stage and method: optimisers, AMP, DDP, checkpoints, validation."""
