"""The one learning-rate schedule of every trained parameter (SoCo's scores, Dobi-SVD's truncation
positions, AA-SVD's refined factors): an optional linear warm-up, then a cosine from the peak rate
down to a tenth of it."""

from __future__ import annotations

import math


def cosine_to_tenth(peak: float, step: int, start: int, stop: int, warmup: int = 0) -> float:
    """The rate of ``step`` in the span ``[start, stop)``: ``warmup`` steps rising linearly to
    ``peak``, then a cosine from ``peak`` to ``peak/10`` over the rest of the span."""
    if step - start < warmup:
        return peak * (step - start + 1) / warmup
    progress = (step - start - warmup) / max(1, stop - start - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
