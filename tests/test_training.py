"""The learned methods' guard (``stagekit/training.validation_guard``): the learned candidate replaces
the start only when its validation perplexity is lower outside the noise (a tie, a loss or a gain
inside the noise keep the start), and a trainer without candidates is recorded as unguarded."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from stagepipe.stagekit.training import validation_guard

WINDOWS = torch.randint(0, 5, (6, 9), generator=torch.Generator().manual_seed(0))


class Bigram(nn.Module):
    """Next-token logits from a table: the smallest model ``perplexity`` can run."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.zeros(5, 5))

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False) -> SimpleNamespace:
        return SimpleNamespace(logits=self.table[input_ids])


class TableTrainer:
    """Each candidate is one table of the bigram model."""

    def __init__(self, model: Bigram, tables: dict[str, torch.Tensor]) -> None:
        self.model, self.tables = model, tables
        self.candidates = tuple(tables)

    def use(self, candidate: str) -> None:
        with torch.no_grad():
            self.model.table.copy_(self.tables[candidate])


def _fitted(windows: torch.Tensor = WINDOWS) -> torch.Tensor:
    """The bigram log-frequencies of ``windows``: better than the uniform table on them."""
    counts = torch.ones(5, 5)
    for window in windows:
        for a, b in zip(window[:-1].tolist(), window[1:].tolist(), strict=True):
            counts[a, b] += 1
    return counts.log()


@pytest.mark.parametrize(("start", "learned", "kept"), [("fitted", "uniform", "start"), ("uniform", "fitted", "learned"),
                                                        ("uniform", "uniform", "start")])
def test_the_lower_validation_perplexity_is_kept(start: str, learned: str, kept: str) -> None:
    tables = {"fitted": _fitted(), "uniform": torch.zeros(5, 5)}
    model = Bigram()
    trainer = TableTrainer(model, {"start": tables[start], "learned": tables[learned]})
    chosen, record = validation_guard(trainer, model, WINDOWS, "validation", 4, torch.device("cpu"))  # type: ignore[arg-type]
    guard = record["guard"]
    assert chosen == kept == guard["chosen"]
    assert guard["ppl"]["start" if start == "uniform" else "learned"] == pytest.approx(5.0)  # uniform over 5 tokens
    assert (guard["ppl"]["start"] < 5.0 or guard["ppl"]["learned"] < 5.0) == (start != learned)
    ratio = guard["learned_over_start"]
    assert ratio["ratio"] == pytest.approx(guard["ppl"]["learned"] / guard["ppl"]["start"], rel=1e-9)
    assert ratio["low"] <= ratio["ratio"] <= ratio["high"]


def test_a_gain_inside_the_noise_keeps_the_start() -> None:
    """Each table fitted to half of the windows: each candidate wins on its own half, so the paired
    interval of their ratio straddles 1 whichever total is lower — the start stays."""
    model = Bigram()
    trainer = TableTrainer(model, {"start": _fitted(WINDOWS[3:]), "learned": _fitted(WINDOWS[:3])})
    chosen, record = validation_guard(trainer, model, WINDOWS, "validation", 4, torch.device("cpu"))  # type: ignore[arg-type]
    ratio = record["guard"]["learned_over_start"]
    assert not ratio["resolved"] and ratio["low"] < 1 < ratio["high"]
    assert chosen == "start"


def test_a_trainer_without_candidates_is_recorded_as_unguarded() -> None:
    model = Bigram()
    chosen, record = validation_guard(TableTrainer(model, {}), model, WINDOWS, "validation", 4, torch.device("cpu"))  # type: ignore[arg-type]
    assert chosen is None and record["guard"].startswith("off")
