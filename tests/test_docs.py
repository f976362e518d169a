"""The README is an entry page whose numbers come from generated tables, and the docs link to
files that exist: docs/results.md's generated part, and the README's best-rows table (from the
headline table, ``quality.README_SOURCE``), are what ``benchmarks/quality.py --render`` writes from
their results.json, every decimal number in the README stands in a generated part, and every
relative link resolves."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from benchmarks import quality
from scripts import render_docs

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])


def _block(text: str, name: str) -> str:
    return text.split(quality.marker(name, "start"))[1].split(quality.marker(name, "end"))[0].strip("\n")


def _saved(directory: Path = ROOT / "docs") -> dict:
    return json.loads((directory / "results.json").read_text())


def test_the_readme_is_a_short_entry_page() -> None:
    assert len((ROOT / "README.md").read_text().splitlines()) <= 120


def test_the_generated_tables_are_what_quality_renders() -> None:
    for directory in (ROOT / "docs", quality.README_SOURCE):
        saved = _saved(directory)
        commits = sorted({r["commit"] for r in saved["rows"]})
        results = (directory / "results.md").read_text()
        assert _block(results, quality.GENERATED) == "\n".join(
            quality.results_lines(saved["rows"], commits, saved["base"], directory)).strip("\n")
    readme = (ROOT / "README.md").read_text()
    assert _block(readme, quality.BEST_ROWS) == "\n".join(quality.best_table(_saved(quality.README_SOURCE)["rows"], link_prefix=""))


def test_the_architecture_page_shows_the_dag_the_code_derives() -> None:
    """The stage catalogue and the DAGs of docs/architecture.md are what scripts/render_docs.py
    derives from the registered stages (no hand-drawn copy to drift)."""
    text = render_docs.ARCHITECTURE.read_text()
    for name, render in render_docs.BLOCKS.items():
        assert _block(text, name) == render(), f"run python scripts/render_docs.py ({name})"


def test_every_number_in_the_readme_is_in_a_generated_table() -> None:
    generated = "\n".join(_block((directory / "results.md").read_text(), quality.GENERATED)
                          for directory in (ROOT / "docs", quality.README_SOURCE))
    numbers = set(re.findall(r"(?<![\w.])\d+\.\d+(?:e[+-]\d+)?", (ROOT / "README.md").read_text()))
    assert numbers, "the README shows the best rows"
    assert {n for n in numbers if n not in generated} == set()


def test_the_best_row_of_a_method_is_its_lowest_geometric_mean() -> None:
    rows = [{"method": entry, "kept_requested": kept, "ratios": {"kept_over_target_matrices": kept},
             "perplexity": {"compressed": {"t": ppl}, "dense": {"t": 10.0}}}
            for entry, values in {"svdllm": (20, 30, 90), "svdllm:global_greedy": (15, 40, 80),
                                  "aasvd+refine": (12, 13, 14), "aasvd": (11, 12, 200)}.items()
            for kept, ppl in zip(quality.BEST_FRACTIONS, values, strict=True)]
    table = quality.best_table(rows, link_prefix="")
    assert [line.split("|")[2].strip() for line in table[3:]] == ["`aasvd+refine`", "`svdllm:global_greedy`"]


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path: Path) -> None:
    text = path.read_text()
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    missing = [t for t in targets if "://" not in t and not (path.parent / t).exists()]
    assert missing == []


def _row(method: str, kept: float, window_nll: list[float]) -> dict:
    from stagepipe.intervals import ppl_interval

    tokens = 511
    ppl = 2.718281828459045 ** (sum(window_nll) / (len(window_nll) * tokens))
    return {"method": method, "kept_requested": kept, "ratios": {"kept_over_target_matrices": kept},
            "perplexity": {"compressed": {"t": ppl}, "dense": {"t": 20.0}},
            "perplexity_interval": {"compressed": {"t": list(ppl_interval(window_nll, tokens))}, "dense": {"t": [19.0, 21.0]}},
            "test_windows": {"t": len(window_nll)}, "window_nll": {"t": window_nll}, "window_tokens": {"t": tokens}}


def test_best_rows_carry_intervals_and_mark_differences_inside_the_noise() -> None:
    """With per-window losses each cell shows its 95 % interval, and a method whose paired
    difference from the column's lowest is inside the noise is marked ≈; a clear gap is not."""
    import numpy as np

    rng = np.random.default_rng(0)
    base = list(rng.normal(3.5, 0.4, 64) * 511)
    noise = rng.normal(0, 0.02, 64) * 511
    rows = []
    for kept in quality.BEST_FRACTIONS:
        rows += [_row("kfac_svd", kept, base), _row("svdllm", kept, [b + e for b, e in zip(base, noise, strict=True)]),
                 _row("svd", kept, [b + 0.3 * 511 for b in base])]
    table = quality.best_table(rows, link_prefix="")
    line = {m: next(row for row in table if f"[{m}]" in row) for m in ("kfac_svd", "svdllm", "svd")}
    assert "≈" in line["svdllm"] and "≈" not in line["svd"] and "≈" not in line["kfac_svd"]
    assert re.search(r"\| \d+\.\d{3} \[\d+\.\d{3}, \d+\.\d{3}\]", line["svd"])
    assert "inside the noise" in table[-1]
    assert quality.n_test_windows(rows[0]) == 64 and quality.n_test_windows({}) == quality.LEGACY_TEST_WINDOWS


def test_pair_lines_give_the_paired_ratio_and_bold_only_a_resolved_winner() -> None:
    """``quality.py --pair``: per kept fraction both rows have, the paired ratio with its interval;
    the lower row in bold when the interval excludes 1, "(noise)" when it does not."""
    import numpy as np

    rng = np.random.default_rng(1)
    base = list(rng.normal(3.5, 0.4, 64) * 511)
    rows = [_row("a", 0.8, base), _row("b", 0.8, [b - 0.2 * 511 for b in base]),
            _row("a", 0.6, base), _row("b", 0.6, [b + e for b, e in zip(base, rng.normal(0, 0.01, 64) * 511, strict=True)]),
            _row("b", 0.9, base)]  # no "a" at 0.9: no line
    lines = quality.pair_lines(rows, "b", "a")
    assert len(lines) == 4 and lines[2].startswith("| 0.8 |") and lines[3].startswith("| 0.6 |")
    cells = lines[2].split("|")
    assert "**" in cells[3] and "**" not in cells[2] and float(cells[4].split()[0].lstrip("×")) < 1
    assert "(noise)" in lines[3] and "**" not in lines[3]
