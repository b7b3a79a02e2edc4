"""Run folders: layout, atomic records, checkpoints, plots."""
