"""``benchmarks/memory_grid.py``'s table: paired ratios against each row's anchor, and the zero-shot
average beside the retention when a row was scored (a row without one says so, not a blank)."""

from __future__ import annotations

import pytest

from benchmarks.memory_grid import pair_line, table


def _row(name: str, nll: list[float], anchor: str | None, zeroshot: dict | None) -> dict:
    return {"row": name, "options": {}, "anchor": anchor, "bits_per_weight": 3.25, "kept_fraction": None,
            "ppl": 10.0, "ppl_interval": [9.0, 11.0], "window_nll": nll, "dense_ppl": 8.0, "zeroshot": zeroshot}


def test_table_pairs_rows_and_shows_the_zero_shot_average() -> None:
    zeroshot = {"average": {"dense": 0.5, "compressed": 0.4321}, "retention": 0.8, "retention_interval": [0.6, 1.0],
                "tasks": {"piqa": {"n_docs": 50}, "arc_challenge": {"n_docs": 50}}, "near_chance": ["arc_challenge"]}
    base = _row("gptq 3-bit", [2.0, 2.1, 2.2, 2.3], None, None)
    better = _row("combination", [1.9, 2.0, 2.1, 2.2], "gptq 3-bit", zeroshot)
    lines = table([base, better], "gemma3", 512)
    header = next(line for line in lines if line.startswith("| row"))
    assert "0-shot avg acc (dense 0.5000)" in header and "retained above chance" in header
    combined = next(line for line in lines if line.startswith("| combination"))
    assert "| 0.4321 | 0.800 [0.60, 1.00] |" in combined and "vs gptq 3-bit" in combined and "≈" not in combined
    anchor = next(line for line in lines if line.startswith("| gptq 3-bit"))
    assert anchor.endswith("| — | — | — |")
    assert any("left out as at chance for the dense model: arc_challenge" in line for line in lines)


def test_the_table_names_the_commits_its_rows_were_made_at() -> None:
    rows = [_row("old", [2.0, 2.1], None, None), {**_row("new", [1.9, 2.0], "old", None), "commit": "abc1234"}]
    assert table(rows, "gemma3", 512)[-1] == ("Made at commit abc1234 (each row's `commit` in the JSON); rows without "
                                             "one predate that field (git log of the JSON names their commits).")


def test_any_two_rows_pair_over_the_windows() -> None:
    rows = [_row("a", [2.0, 2.1, 2.2, 2.3], None, None), _row("b", [1.9, 2.0, 2.1, 2.2], None, None)]
    line = pair_line(rows, "b", "a", 11)
    assert line.startswith("b (3.2500 b/w, 10.000) / a (3.2500 b/w, 10.000): ×0.990") and "noise" not in line
    with pytest.raises(SystemExit, match="--pair: no row 'c' in the grid's JSON"):
        pair_line(rows, "c", "a", 11)
