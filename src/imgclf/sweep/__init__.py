"""Sweeps: grid / list / random / Optuna studies whose trials are ordinary run folders.

`spec` (the typed sweep file), `space` (search space → slots and trial configs), `runner` (the
study, its queue, workers, trials), `report` (run folders of a sweep, table, HTML page).
"""
