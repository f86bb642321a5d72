"""Per-worker training loop, Ray Train wiring and checkpoints."""
