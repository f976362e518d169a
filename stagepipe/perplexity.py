"""Honest perplexity: fp32, every window counted, any non-finite window makes the result ``inf``.

Token-mean NLL over non-overlapping windows (each window predicts its tokens 2..T from the ones
before), accumulated in float64; the window count and the count of non-finite windows are part of
the result so nothing can be skipped silently. Each window's summed NLL is kept too
(``window_nll``): the 95 % interval (``ppl_low``, ``ppl_high``) is the bootstrap over windows
(``intervals.py``), and two models on the same windows are compared pairwise from them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from stagepipe.intervals import ppl_interval


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    nll: float
    n_windows: int
    n_tokens: int
    n_nonfinite_windows: int
    seq_len: int
    ppl_low: float  # 95 % bootstrap interval over windows
    ppl_high: float
    window_nll: list[float]  # each window's NLL summed over its seq_len − 1 predicted tokens

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device) -> Perplexity:
    """Perplexity of ``model`` (run in float32) over ``windows`` (n × T token ids)."""
    if any(p.dtype != torch.float32 for p in model.parameters() if p.is_floating_point()):
        model = model.float()  # (a quantised model loads in float32 already: transformers refuses .float() on it)
    model = model.to(device).eval()
    per_window: list[float] = []
    tokens = 0
    for start in range(0, len(windows), batch_size):
        ids = windows[start : start + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits.float()
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
        ).view(ids.shape[0], -1).double()
        per_window += nll.sum(dim=1).tolist()
        tokens += nll.numel()
    nonfinite = sum(not math.isfinite(v) for v in per_window)
    low, high = ppl_interval(per_window, windows.shape[1] - 1)
    if nonfinite:
        return Perplexity(math.inf, math.inf, len(windows), tokens, nonfinite, windows.shape[1], low, high, per_window)
    mean = math.fsum(per_window) / tokens
    return Perplexity(math.exp(mean) if mean < 700 else math.inf, mean, len(windows), tokens, 0, windows.shape[1],
                      low, high, per_window)
