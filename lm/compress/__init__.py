"""Compression by pruning: masks (masks.py), the methods (sparsegpt.py), calibration rows and
what the projections read (calibrate.py), structured pruning (structured.py), pruning into a
new run folder (prune.py)."""
