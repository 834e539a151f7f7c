"""Compression by pruning: masks (masks.py), the methods (sparsegpt.py), layer-by-layer
pruning into a new run folder (prune.py)."""
