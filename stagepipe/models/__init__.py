"""Model sources, architecture layout, per-layer execution and the low-rank model classes."""
