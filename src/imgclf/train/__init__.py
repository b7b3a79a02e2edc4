"""Training parts: optimizers, schedules, losses and the LR range test."""
