"""The zero-shot part of ``benchmarks/quality.py``'s tables: per row the average ``acc``, the
accuracy retained above chance with its 95 % interval, LAMBADA, and which tasks were left out
because dense is at chance on them (``stagepipe.zeroshot.summarize``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def retained_cell(row: dict) -> str:
    """``0.871 [0.80, 0.94]``: a row's accuracy retained above chance, or ``—`` when it has none."""
    return retained_text(row.get("zeroshot") or {})


def retained_text(z: dict) -> str:
    """``retained_cell`` of one zero-shot summary (``stagepipe.zeroshot.summarize``)."""
    if "retention" not in z:
        return "—"
    low, high = z["retention_interval"]  # ±inf: dense fell to chance in too many resamples (no bound there)
    return f"{z['retention']:.3f} [{'−∞' if low == float('-inf') else f'{low:.2f}'}, {'∞' if high == float('inf') else f'{high:.2f}'}]"


def zeroshot_lines(rows: list[dict], ppl_cell) -> list[str]:
    """The zero-shot table of every row that has one (with the dense model's line first)."""
    scored = [r for r in rows if r.get("zeroshot")]
    if not scored:
        return []
    first = scored[0]["zeroshot"]
    tasks = list(first["tasks"])
    docs = ", ".join(f"{t} {first['tasks'][t]['n_docs']} ({first['tasks'][t]['split']})" for t in tasks)
    near = ", ".join(first.get("near_chance", [])) or "none"
    dataset = next(iter(scored[0]["perplexity"]["compressed"]))
    lines = ["### Zero-shot accuracy (lm-eval-harness, installed data)", "",
             f"Documents scored per task: {docs}. Average = mean `acc` over all {len(tasks)} tasks; retained = "
             "mean over the tasks where dense is more than two standard errors above chance of "
             "`(acc − chance)/(acc_dense − chance)`, with its 95 % bootstrap interval over documents (paired). "
             f"Left out of the retention as at chance for the dense model: {near}.", "",
             "| method | kept | PPL | 0-shot avg acc | retained above chance | LAMBADA acc | LAMBADA PPL | suite wall s (compressed) |",
             "|---|---|---|---|---|---|---|---|"]
    dense = first["tasks"]
    lambada = dense.get("lambada", {}).get("dense")
    dense_wall = first.get("wall_s", {}).get("dense")
    lines.append(f"| dense | 1.00 | {ppl_cell(scored[0], dataset, 'dense')} | {first['average'].get('dense', float('nan')):.4f} | 1 | "
                 + (f"{lambada['acc']:.4f} ± {lambada['acc_stderr']:.4f} | {lambada['perplexity']:.2f} |" if lambada else "— | — |")
                 + (f" {dense_wall:.0f} |" if dense_wall is not None else " — |"))
    for r in scored:
        z = r["zeroshot"]
        lam = z["tasks"].get("lambada", {}).get("compressed")
        wall = z.get("wall_s", {}).get("compressed")  # the compressed model's seven partitions
        lines.append(f"| {r['method']} | {r['kept_requested']:.2f} | {ppl_cell(r, dataset, 'compressed')} | "
                     f"{z['average']['compressed']:.4f} | {retained_cell(r)} | "
                     + (f"{lam['acc']:.4f} ± {lam['acc_stderr']:.4f} | {lam['perplexity']:.2f} |" if lam else "— | — |")
                     + (f" {wall:.0f} |" if wall is not None else " — |"))
    return lines + ["", "![accuracy retained vs kept fraction](results_zeroshot.png)", ""]


def plot_retention(rows: list[dict], path: Path) -> bool:
    """Accuracy retained above chance against the achieved kept fraction, one line per grid entry."""
    scored = [r for r in rows if (r.get("zeroshot") or {}).get("retention") is not None]
    if not scored:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(r["method"] for r in scored):
        pts = sorted((r["ratios"]["kept_over_target_matrices"], r["zeroshot"]["retention"],
                      *(min(max(x, -2.0), 3.0) for x in r["zeroshot"]["retention_interval"]))  # unbounded: drawn to the frame
                     for r in scored if r["method"] == method)
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]],
                    marker="o", capsize=3, label=method)
    ax.axhline(1.0, color="k", linestyle="--", label="dense")
    ax.set(xlabel="kept fraction of target parameters (achieved)", ylabel="zero-shot accuracy retained above chance",
           title="retention (95 % interval over documents; clipped to [−2, 3])")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def finished_scores(runner: Any, name: str, workspace: Path, flag: str) -> dict[str, dict]:
    """A row's zero-shot results per task, from its ``zeroshot`` partitions (their manifests' results,
    read and checked as the stage's own summary reads them). One clear line unless every task is
    scored: a pairing over fewer tasks than the row has would be a different mean."""
    from stagepipe.stagekit.artifacts import read_results

    scored = [e for e in runner.states() if e.ref.stage == "zeroshot" and e.ref.partition.startswith("compressed-")]
    unfinished = [str(e.ref) for e in scored if e.state.status != "done"]
    if not scored or unfinished:
        raise SystemExit(f"{flag}: {name!r} has " + (f"unfinished {unfinished[0]}" if unfinished else "no zeroshot partition")
                         + f" for these --tasks in {workspace} (a deleted assembled model leaves them waiting until "
                         "it is re-assembled; else run the row first)")
    return {e.ref.partition.removeprefix("compressed-"): read_results(e.state.output) for e in scored}


def paired_lines(names: list[str], scores: list[dict[str, dict]]) -> list[str]:
    """``acc(a) − acc(b)`` per task and for the mean over tasks, paired over documents
    (``stagepipe.zeroshot.paired_difference``); ``≈`` where the interval holds 0."""
    from stagepipe.zeroshot import paired_difference

    found = paired_difference(*scores)
    return [f"acc({names[0]}) − acc({names[1]}), paired over documents, 95 % bootstrap:",
            *(f"  {task}: {d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}]" + ("" if d[1] > 0 or d[2] < 0 else " ≈")
              for task, d in found.items())]
