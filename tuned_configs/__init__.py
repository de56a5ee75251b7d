"""Tuned winners shipped with nf4-explorer: one JSON file per GPU model (see variants/_cache.py)."""
