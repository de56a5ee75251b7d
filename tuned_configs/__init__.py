"""Tuned winners shipped with nf4-explorer: one JSON file per GPU model (see nf4_explorer/_cache.py, in the repository variants/_cache.py)."""
