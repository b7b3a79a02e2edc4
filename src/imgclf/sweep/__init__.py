"""Sweeps: grid / list / random / Optuna studies whose trials are ordinary run folders.

`spec` (the typed sweep file), `space` (search space → slots and trial configs), `storage` (the
Optuna storage and its file lock), `study` (the study and its queue), `trial` (one trial as one
run), `workers` (processes that work the queue), `runner` (`run_sweep`, the entry point on top
of those), `report` (run folders of a sweep, table, HTML page).
"""
