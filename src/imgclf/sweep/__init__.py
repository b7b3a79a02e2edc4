"""Sweeps: grid / list / random / Optuna studies whose trials are ordinary run folders.

`spec` (the typed sweep file), `space` (search space → slots and trial configs), `storage` (the
Optuna storage and its file lock), `runner` (the study and its queue; `run_sweep`), `workers`
(processes that work the queue), `trial` (one trial as one run), `report` (run folders of a
sweep, table, HTML page).
"""
