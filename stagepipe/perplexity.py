"""Honest perplexity: fp32, every window counted, any non-finite window makes the result ``inf``.

Token-mean NLL over non-overlapping windows (each window predicts its tokens 2..T from the ones
before), accumulated in float64; the window count and the count of non-finite windows are part of
the result so nothing can be skipped silently.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    nll: float
    n_windows: int
    n_tokens: int
    n_nonfinite_windows: int
    seq_len: int

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device) -> Perplexity:
    """Perplexity of ``model`` (run in float32) over ``windows`` (n × T token ids)."""
    model = model.float().to(device).eval()
    total = 0.0
    tokens = 0
    nonfinite = 0
    for start in range(0, len(windows), batch_size):
        ids = windows[start : start + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits.float()
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
        ).view(ids.shape[0], -1).double()
        per_window = nll.sum(dim=1)
        finite = torch.isfinite(per_window)
        nonfinite += int((~finite).sum())
        total += float(per_window.sum())
        tokens += nll.numel()
    if nonfinite:
        return Perplexity(math.inf, math.inf, len(windows), tokens, nonfinite, windows.shape[1])
    mean = total / tokens
    return Perplexity(math.exp(mean) if mean < 700 else math.inf, mean, len(windows), tokens, 0, windows.shape[1])
