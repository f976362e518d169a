"""Delta methods × compression ratio on the SmolLM2-135M Shakespeare fine-tune (issue #34), through the
real pipeline (``pipelines/delta/smollm2_shakespeare.yaml``; make the fine-tune first with
``scripts/finetune_shakespeare.py``).

Every row shares one workspace: the snapshots, tokenization and the base / fine-tuned evaluations run
once. ImPart's two hyperparameters (β, C) are chosen first, on the *validation* works at ratio 32 (the
evaluation datasets swapped for the validation split; the test works never seen); the choice and
whether it is outside the noise are written beside the table. Writes ``docs/delta/table.{md,json}``.

    python benchmarks/delta.py [--ratios 8 16 32] [--workspace workspace/impart] [--out docs/delta]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import yaml

try:  # run as a script (this directory on the path) or imported as benchmarks.delta
    from provenance import head_commit
    from zeroshot_rows import retained_text
except ModuleNotFoundError:
    from benchmarks.provenance import head_commit
    from benchmarks.zeroshot_rows import retained_text

from stagepipe.config import parse_pipeline
from stagepipe.engine.stage import ALL, PartitionRef
from stagepipe.intervals import compare
from stagepipe.stages import make_runner

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "pipelines" / "delta" / "smollm2_shakespeare.yaml"
#: the methods of the table (ImPart's options come from the validation search)
METHODS = {"impart": {"name": "impart"}, "dare": {"name": "dare"}, "lowrank": {"name": "delta_lowrank"},
           "lowrank_whitened": {"name": "delta_lowrank", "metric": "whitened"},
           "impart_qt": {"name": "impart_qt"}}  # with ImPart's β and C (the paper's search is over ImPart's own)
#: BitDelta's one ratio: one bit per weight and a 16-bit scale per matrix (2mn / (mn/8 + 2) just under 16)
BITDELTA_RATIO = 15.99
#: ImPart's search space on the validation works (β: the weakest share dropped whole; C: the importance exponent)
IMPART_GRID = [{"beta": b, "exponent": c} for b in (0.0, 0.5, 0.8) for c in (0.5, 1.0)]


def config(base: dict, method: dict, ratio: float, validation: bool = False, tasks: list[str] | None = None,
           task_limit: int | None = None):
    data = json.loads(json.dumps(base))
    if tasks:  # the zero-shot suite beside perplexity (a zeroshot partition per model and task)
        data["evaluation"].update(tasks=tasks, task_limit=task_limit)
    data["method"], data["target"] = dict(method), {"delta_ratio": ratio}
    data["name"] = f"delta_{method['name']}_{ratio:g}"
    if validation:  # choose on the validation works: they become the evaluated set, the test works are not read
        data["evaluation"]["datasets"] = [{"name": "shakespeare-validation", "text": data["calibration"]["validation"]["text"]}]
        data["evaluation"]["max_windows"] = 32
        del data["calibration"]["validation"]
    return parse_pipeline(data, data["name"], str(BASE.parent))


def run(cfg, workspace: Path) -> dict:
    runner = make_runner(cfg, workspace)
    started = time.time()
    runner.run()
    entries = {e.ref: e for e in runner.states()}
    report = json.loads((entries[PartitionRef("report", ALL)].state.output / "report.json").read_text())
    data = {p: r["datasets"] for p, r in report["evaluation"].items()}
    return {"method": cfg.method.model_dump(mode="json", exclude={"floor_rel", "svd_dtype", "refit", "quantize_factors"}),
            "ratio_requested": cfg.target.delta_ratio, "ratio": report["ratios"]["delta_ratio"]["achieved"],
            "stored_bytes": report["ratios"]["memory"]["stored_bytes"],
            "perplexity": report["perplexity"], "interval": report["perplexity_interval"],
            "gain_retained": report["gain_retained"], "zeroshot": report.get("zeroshot"), "window_nll": {p: {d: r["window_nll"] for d, r in v.items()}
                                                                     for p, v in data.items()},
            "wall_s": time.time() - started}


def choose_impart(base: dict, workspace: Path) -> tuple[dict, list[dict], str]:
    """The ImPart options with the lowest validation perplexity at ratio 32, all tried, and whether the
    choice beats the runner-up outside the noise (paired over the validation windows)."""
    tried = [run(config(base, {"name": "impart", **options}, 32, validation=True), workspace) for options in IMPART_GRID]
    dataset = "shakespeare-validation"
    ranked = sorted(tried, key=lambda r: r["perplexity"]["compressed"][dataset])
    best, second = ranked[0], ranked[1]
    tokens = 511
    verdict = compare(best["window_nll"]["compressed"][dataset], second["window_nll"]["compressed"][dataset], tokens)
    note = (f"β={best['method']['beta']:g}, C={best['method']['exponent']:g}: validation PPL "
            f"{best['perplexity']['compressed'][dataset]:.3f} against {second['perplexity']['compressed'][dataset]:.3f} for "
            f"β={second['method']['beta']:g}, C={second['method']['exponent']:g}, ×{verdict.ratio:.4f} "
            f"[{verdict.low:.4f}, {verdict.high:.4f}] ({'outside' if verdict.resolved else 'inside'} the noise)")
    return {k: best["method"][k] for k in ("beta", "exponent")}, tried, note


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", nargs="+", type=float, default=[8, 16, 32])
    parser.add_argument("--workspace", type=Path, default=ROOT / "workspace" / "impart")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "delta")
    parser.add_argument("--render", action="store_true", help="only rewrite table.md from table.json")
    parser.add_argument("--tasks", nargs="+", default=[], help="zero-shot tasks scored for the rows at --zeroshot-ratio")
    parser.add_argument("--task-limit", type=int, default=50)
    parser.add_argument("--zeroshot-ratio", type=float, default=32)
    args = parser.parse_args()
    if args.render:
        saved = json.loads((args.out / "table.json").read_text())
        lines = render(saved["rows"], saved["impart_choice"], saved["impart_note"], saved["commit"])
        (args.out / "table.md").write_text("\n".join(lines) + "\n")
        return
    base = yaml.safe_load(BASE.read_text())
    chosen, tried, note = choose_impart(base, args.workspace)
    rows = []
    for ratio in args.ratios:
        for label, method in METHODS.items():
            options = {**method, **chosen} if label.startswith("impart") else method
            scored = args.tasks if ratio == args.zeroshot_ratio else None
            rows.append({"label": label, **run(config(base, options, ratio, tasks=scored, task_limit=args.task_limit),
                                               args.workspace)})
            print(f"{label:18s} ratio {ratio:g}: {rows[-1]['perplexity']['compressed']}", flush=True)
    rows.append({"label": "bitdelta", **run(config(base, {"name": "bitdelta"}, BITDELTA_RATIO, tasks=args.tasks or None,
                                                   task_limit=args.task_limit), args.workspace)})
    commit = head_commit()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.json").write_text(json.dumps({"commit": commit, "impart_choice": chosen, "impart_note": note,
                                                       "impart_tried": tried, "rows": rows}, indent=1))
    (args.out / "table.md").write_text("\n".join(render(rows, chosen, note, commit)) + "\n")
    print((args.out / "table.md").read_text())


def render(rows: list[dict], chosen: dict, note: str, commit: str) -> list[str]:
    dataset = "shakespeare-test"
    first = rows[0]
    ppl = first["perplexity"]

    def cell(value: float, bounds: list[float]) -> str:
        return f"{value:.3f} [{bounds[0]:.3f}, {bounds[1]:.3f}]" if math.isfinite(value) else "inf"

    lines = [
        "<!-- generated by benchmarks/delta.py -->",
        f"Generated by `python benchmarks/delta.py` at commit `{commit}`. Base: SmolLM2-135M (GGUF, dequantised); "
        f"fine-tuned: `scripts/finetune_shakespeare.py`; test: the first 64 windows of 512 tokens of the Shakespeare "
        f"test works. Base PPL **{cell(ppl['base'][dataset], first['interval']['base'][dataset])}**, fine-tuned "
        f"**{cell(ppl['dense'][dataset], first['interval']['dense'][dataset])}**. Ratio = bytes of the dense 16-bit delta "
        "of the 210 target matrices over the bytes stored (every index, count, scale counted; achieved, after rounding). "
        "Gain retained = (NLL_base − NLL)/(NLL_base − NLL_fine-tuned), paired bootstrap over the same windows.",
        "",
        f"ImPart's options, chosen on the validation works at ratio 32: {note}.",
        "",
        "| method | ratio (requested) | ratio (achieved) | stored MB | PPL [95 %] | gain retained [95 %] |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        gain = row["gain_retained"][dataset]
        name = row["label"] + (f" (β={chosen['beta']:g}, C={chosen['exponent']:g})" if row["label"].startswith("impart") else "")
        lines.append(f"| {name} | {row['ratio_requested']:g} | {row['ratio']:.3f} | {row['stored_bytes'] / 1e6:.2f} | "
                     f"{cell(row['perplexity']['compressed'][dataset], row['interval']['compressed'][dataset])} | "
                     f"{gain['value']:.3f} [{gain['low']:.3f}, {gain['high']:.3f}] |")
    lines += ["", "Paired over the test windows (perplexity ratio, 95 % interval; ≈ inside the noise):", ""]
    for ratio in sorted({r["ratio_requested"] for r in rows if r["label"] == "impart"}):
        at = {r["label"]: r for r in rows if r["ratio_requested"] == ratio}
        for other in ("dare", "lowrank", "lowrank_whitened"):
            c = compare(at["impart"]["window_nll"]["compressed"][dataset], at[other]["window_nll"]["compressed"][dataset], 511)
            lines.append(f"- ratio {ratio:g}: ImPart over {other} ×{c.ratio:.4f} [{c.low:.4f}, {c.high:.4f}]"
                         + ("" if c.resolved else " ≈"))
        if "impart_qt" in at:
            c = compare(at["impart_qt"]["window_nll"]["compressed"][dataset], at["impart"]["window_nll"]["compressed"][dataset], 511)
            lines.append(f"- ratio {ratio:g}: ImPart-Qt over ImPart ×{c.ratio:.4f} [{c.low:.4f}, {c.high:.4f}]"
                         + ("" if c.resolved else " ≈"))
        c = compare(at["lowrank_whitened"]["window_nll"]["compressed"][dataset], at["lowrank"]["window_nll"]["compressed"][dataset], 511)
        lines.append(f"- ratio {ratio:g}: whitened low rank over plain low rank ×{c.ratio:.4f} [{c.low:.4f}, {c.high:.4f}]"
                     + ("" if c.resolved else " ≈"))
    bits = next((r for r in rows if r["label"] == "bitdelta"), None)
    sixteen = next((r for r in rows if r["label"] == "impart" and r["ratio_requested"] == 16), None)
    if bits and sixteen:
        c = compare(bits["window_nll"]["compressed"][dataset], sixteen["window_nll"]["compressed"][dataset], 511)
        lines.append(f"- BitDelta (ratio {bits['ratio']:.3f}) over ImPart at ratio 16 ({sixteen['ratio']:.3f}) "
                     f"×{c.ratio:.4f} [{c.low:.4f}, {c.high:.4f}]" + ("" if c.resolved else " ≈"))
    return lines + zeroshot_table(rows)


def zeroshot_table(rows: list[dict]) -> list[str]:
    """Zero-shot accuracy of the base, the fine-tuned model and each scored row (lm-eval on installed data):
    what the fine-tune and the delta's compression changed outside its domain."""
    scored = [r for r in rows if r.get("zeroshot")]
    if not scored:
        return []
    first = scored[0]["zeroshot"]
    tasks = list(first["tasks"])

    def acc(entry: dict, model: str) -> str:
        return f"{entry[model]['acc']:.2f} ± {entry[model]['acc_stderr']:.2f}"

    lines = ["", f"Zero-shot `acc` (0-shot, lm-eval-harness on the installed data, the first "
             f"{first['tasks'][tasks[0]]['n_docs']} documents of each task, ± lm-eval's standard error). Outside its "
             "domain the fine-tune has no gain to retain: this shows what it and the delta's compression changed there. "
             "Average over the tasks; against the fine-tuned model, paired over the same documents.", "",
             "| model | ratio | " + " | ".join(tasks) + " | average | retained above chance [95 %] |",
             "|---|---|" + "---|" * (len(tasks) + 2)]

    base = first["base"]
    lines.append("| base | — | " + " | ".join(acc(base["tasks"][t], "compressed") for t in tasks)
                 + f" | {base['average']['compressed']:.3f} | {retained_text(base)} |")
    lines.append("| fine-tuned | 1 | " + " | ".join(acc(first["tasks"][t], "dense") for t in tasks)
                 + f" | {first['average']['dense']:.3f} | — |")
    for row in scored:
        z = row["zeroshot"]
        lines.append(f"| {row['label']} | {row['ratio']:.2f} | " + " | ".join(acc(z["tasks"][t], "compressed") for t in tasks)
                     + f" | {z['average']['compressed']:.3f} | {retained_text(z)} |")
    kept = ", ".join(first.get("retention_tasks", []))
    lines += ["", f"Retained above chance: `(acc − chance)/(acc_fine-tuned − chance)` averaged over the tasks where the "
              f"fine-tuned model is more than two standard errors above chance ({kept}; the others: "
              f"{', '.join(first.get('near_chance', [])) or 'none'})."]
    return lines


if __name__ == "__main__":
    main()
