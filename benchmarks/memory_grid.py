"""Perplexity at equal bytes (issue #33): quantising methods at stored bits per weight of the target
matrices (every overhead counted, ``quantize.stored_bytes``), paired against the first row.

Each row is the base file (``pipelines/methods/gptq.yaml``; Gemma-3: ``pipelines/gemma3_gptq.yaml``
with ``--rows gemma3``) with method options changed; all share one workspace (snapshot, tokenize and
the dense evaluation run once). Writes ``OUT/<name>.{md,json}``; ``--only`` runs a subset of rows
(the others are kept from an earlier JSON); ``--render`` rewrites the table from the JSON alone;
``--model-dirs SHORT=ROW …`` prints the rows' model directories for ``benchmarks/inference.py --models``;
``--pair ROW AGAINST`` prints two rows' perplexity ratio paired over the test windows (from the JSON);
``--pair-zeroshot ROW AGAINST`` compares two rows' zero-shot accuracy paired over documents.

    python benchmarks/memory_grid.py [--base pipelines/methods/gptq.yaml] [--out docs/quantize]
    python benchmarks/memory_grid.py --rows gemma3 --base pipelines/gemma3_gptq.yaml --workspace workspace/gemma \
        --name memory_grid_gemma3
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

try:  # run as a script (this directory on the path) or imported as benchmarks.memory_grid (tests)
    from provenance import head_commit
except ModuleNotFoundError:
    from benchmarks.provenance import head_commit

from stagepipe.config import parse_pipeline
from stagepipe.intervals import compare
from stagepipe.stagekit.artifacts import read_results
from stagepipe.stages import make_runner

try:  # run as a script (this directory on the path) or imported as benchmarks.memory_grid
    from llmcompressor_gptq import variant_config
    from zeroshot_rows import finished_scores, paired_lines, retained_cell
except ModuleNotFoundError:
    from benchmarks.llmcompressor_gptq import variant_config
    from benchmarks.zeroshot_rows import finished_scores, paired_lines, retained_cell

ROOT = Path(__file__).resolve().parent.parent
#: (row, method options over the base file's, the row it is paired against: quantisation alone at as many
#: or more bytes). SmolLM2 is dequantised from Q4_1, so no 4-bit rows (docs/methods.md); its 576 inputs
#: take GPTVQ groups of 64 or 192 columns, Gemma-3's 640 groups of 128.
def lowrank(method: str, target: dict, policy: str, quantize_factors: dict | None = None, **allocation) -> dict:
    """A ``_pipeline`` row: a low-rank method with its own target and allocation (align 8, and the
    policy's ``allocation`` options), its final factors on ``quantize_factors``' grid when given."""
    block = {"name": method, **({"quantize_factors": quantize_factors} if quantize_factors is not None else {})}
    return {"_pipeline": {"method": block, "target": target, "allocation": {"policy": policy, "align": 8, **allocation}}}


def with_calibration(row: dict, calibration: dict) -> dict:
    """A ``_pipeline`` row on another calibration block than the base file's."""
    return {"_pipeline": {**row["_pipeline"], "calibration": calibration}}


#: Gemma-3's rank_bits rows: the calibration of pipelines/gemma3_rank_bits.yaml (validation articles held out)
#: and the truncation scale chosen there on the validation split (docs/quantize/tuning_gemma3_rank_bits_*.md)
GEMMA_HELD_OUT = yaml.safe_load((ROOT / "pipelines" / "gemma3_rank_bits.yaml").read_text())["calibration"]
GEMMA_KAPPA = 10.0


ROWS = {
    "smollm2": [
        ("gptq 3-bit g64", {"bits": 3, "group_size": 64}, None),
        ("rtn 3-bit g64", {"name": "rtn", "bits": 3, "group_size": 64}, "gptq 3-bit g64"),
        ("gptq 3-bit per channel", {"bits": 3, "group_size": None}, None),
        ("rtn 3-bit per channel", {"name": "rtn", "bits": 3, "group_size": None}, "gptq 3-bit per channel"),
        ("gptq 2-bit g64", {"bits": 2, "group_size": 64}, None),
        ("rtn 2-bit g64", {"name": "rtn", "bits": 2, "group_size": 64}, "gptq 2-bit g64"),
        ("gptvq 2-D 2-bit, 2,048 per codebook", {"name": "gptvq", "dim": 2, "bits_per_dim": 2, "group_columns": 64,
                                                  "group_weights": 2048}, "gptq 2-bit g64"),
        ("gptvq 2-D 3-bit, 6,144 per codebook", {"name": "gptvq", "dim": 2, "bits_per_dim": 3, "group_columns": 192,
                                                  "group_weights": 6144}, "gptq 3-bit g64"),
        ("gptvq 4-D 2-bit, 36,864 per codebook", {"name": "gptvq", "dim": 4, "bits_per_dim": 2, "group_columns": 192,
                                                   "group_weights": 36864}, "gptq 2-bit g64"),
        # combinations: the error's rank-r part in the input-whitened metric (EoRA), float16 factors counted
        ("gptq 2-bit g64 + EoRA rank 20", {"bits": 2, "group_size": 64, "compensate": {"rank": 20}}, "gptq 3-bit g64"),
        ("gptvq 2-D 2-bit + EoRA rank 2", {"name": "gptvq", "dim": 2, "bits_per_dim": 2, "group_columns": 64,
                                           "group_weights": 2048, "compensate": {"rank": 2}}, "gptq 2-bit g64"),
    ],
    # one protocol with the headline table (pipelines/methods/aasvd.yaml: 128 calibration windows, its
    # workspace's K-FAC factors): quantisation alone against a low-rank model whose factors are quantised
    "smollm2_headline": [
        ("gptq 3-bit g64", {"name": "gptq", "bits": 3, "group_size": 64}, None),
        ("kfac_svd 0.75 + gptq 4-bit g64 factors",
         lowrank("kfac_svd", {"kept_fraction": 0.75}, "global_greedy", {"bits": 4, "group_size": 64}),
         "gptq 3-bit g64"),
        ("kfac_svd 0.75 (16-bit factors)",
         lowrank("kfac_svd", {"kept_fraction": 0.75}, "global_greedy"),
         "kfac_svd 0.75 + gptq 4-bit g64 factors"),
        ("kfac_svd 0.5 + gptq 4-bit g64 factors",
         lowrank("kfac_svd", {"kept_fraction": 0.5}, "global_greedy", {"bits": 4, "group_size": 64}),
         "gptvq 2-D 2-bit, 2,048 per codebook"),
        ("gptvq 2-D 2-bit, 2,048 per codebook", {"name": "gptvq", "dim": 2, "bits_per_dim": 2, "group_columns": 64,
                                                  "group_weights": 2048}, None),
        ("gptvq 2-D 3-bit, 6,144 per codebook", {"name": "gptvq", "dim": 2, "bits_per_dim": 3, "group_columns": 192,
                                                  "group_weights": 6144}, "gptq 3-bit g64"),
        ("gptq 2-bit g64", {"name": "gptq", "bits": 2, "group_size": 64}, None),
        # ranks and widths chosen together (rank_bits) within the bytes of the quantisation row it is paired with;
        # ε measured under the input Gram alone (the first model), and in K-FAC's own metric pair (the default)
        *[(f"kfac_svd rank_bits ≤ {b} bits{label}",
           lowrank("kfac_svd", {"bits_per_weight": b}, "rank_bits", {"group_size": 64}, error_metric=metric),
           anchor) for metric, label in (("input_gram", ", ε under H"), ("method", ""))
          for b, anchor in ((3.25, "gptq 3-bit g64"), (2.13, "gptvq 2-D 2-bit, 2,048 per codebook"))],
    ],
    "gemma3": [
        ("gptq 4-bit g64", {"bits": 4, "group_size": 64}, None),
        ("rtn 4-bit g64", {"name": "rtn", "bits": 4, "group_size": 64}, "gptq 4-bit g64"),
        # 256 entries per codebook, as many as GPTQ 4-bit g64's bytes allow with 4,096-bit codebooks: 4.1255 bits
        ("gptvq 2-D 4-bit, 32,768 per codebook", {"name": "gptvq", "dim": 2, "bits_per_dim": 4,
                                                   "group_columns": [128, 512], "group_weights": 32768},
         "gptq 4-bit g64"),
        ("gptq 3-bit g64", {"bits": 3, "group_size": 64}, None),
        ("rtn 3-bit g64", {"name": "rtn", "bits": 3, "group_size": 64}, "gptq 3-bit g64"),
        ("gptvq 2-D 3-bit, 8,192 per codebook", {"name": "gptvq", "dim": 2, "bits_per_dim": 3, "group_columns": 128,
                                                  "group_weights": 8192}, "gptq 3-bit g64"),
        # twice the codebook group pays for a rank-1 EoRA branch within the 2-D 3-bit row's bytes: 3.1013 bits
        ("gptvq 2-D 3-bit, 16,384 per codebook + EoRA rank 1",
         {"name": "gptvq", "dim": 2, "bits_per_dim": 3, "group_columns": 128, "group_weights": 16384,
          "compensate": {"rank": 1}}, "gptvq 2-D 3-bit, 8,192 per codebook"),
        ("gptq 2-bit g64", {"bits": 2, "group_size": 64}, None),
        ("rtn 2-bit g64", {"name": "rtn", "bits": 2, "group_size": 64}, "gptq 2-bit g64"),
        ("gptvq 2-D 2-bit, 2,048 per codebook", {"name": "gptvq", "dim": 2, "bits_per_dim": 2, "group_columns": 128,
                                                  "group_weights": 2048}, "gptq 2-bit g64"),
        ("gptq 2-bit g64 + EoRA rank 24", {"bits": 2, "group_size": 64, "compensate": {"rank": 24}}, "gptq 3-bit g64"),
        ("gptvq 2-D 2-bit + EoRA rank 3", {"name": "gptvq", "dim": 2, "bits_per_dim": 2, "group_columns": 128,
                                           "group_weights": 2048, "compensate": {"rank": 3}}, "gptq 2-bit g64"),
        # 4-D needs a group per shape: no one group of 32,768 tiles 640 × 1024 and 1024 × 640 (candidates: the
        # first that tiles a matrix; o / down take 128 × 256, the rest 256 × 128) — 2.2505 bits per weight
        ("gptvq 4-D 2-bit, 32,768 per codebook", {"name": "gptvq", "dim": 4, "bits_per_dim": 2,
                                                   "group_columns": [256, 128], "group_weights": 32768},
         "gptq 2-bit g64"),
        # larger codebook groups pay for a rank-1 EoRA branch within the 4-D row's bytes (o / down 160 × 256, the
        # rest 128 × 320): 2.2383 bits per weight
        ("gptvq 4-D 2-bit, 40,960 per codebook + EoRA rank 1",
         {"name": "gptvq", "dim": 4, "bits_per_dim": 2, "group_columns": [256, 320], "group_weights": 40960,
          "compensate": {"rank": 1}}, "gptvq 4-D 2-bit, 32,768 per codebook"),
        ("svdllm 0.75 + gptq 4-bit g64 factors",
         lowrank("svdllm", {"kept_fraction": 0.75}, "uniform", {"bits": 4, "group_size": 64}),
         "gptq 3-bit g64"),
        ("svdllm 0.5 + gptq 4-bit g64 factors",
         lowrank("svdllm", {"kept_fraction": 0.5}, "uniform", {"bits": 4, "group_size": 64}),
         "gptq 2-bit g64"),
        ("svdllm rank_bits ≤ 3.25 bits",
         lowrank("svdllm", {"bits_per_weight": 3.25}, "rank_bits", {"group_size": 64}),
         "gptq 3-bit g64"),
        # K-FAC's factors on pipelines/gemma3_rank_bits.yaml's calibration (32 windows of the train split less
        # the 100 validation articles), where benchmarks/tune.py chose κ; κ = 1 is the one currency as it is
        *[(f"kfac_svd rank_bits ≤ {b} bits, κ={k:g}",
           with_calibration(lowrank("kfac_svd", {"bits_per_weight": b}, "rank_bits", {"group_size": 64},
                                    truncation_scale=k), GEMMA_HELD_OUT),
           anchor) for b, anchor in ((3.25, "gptq 3-bit g64"), (2.13, "gptvq 2-D 2-bit, 2,048 per codebook"))
          for k in (1.0, GEMMA_KAPPA)],
    ],
}


def row_config(base: dict, options: dict):
    """A quantising method's row: the base file with the method's options changed (no allocation, a
    loose bits budget: the row reports what it stores); a ``_pipeline`` row: the base file with whole
    top-level blocks replaced (a low-rank method with its own target and allocation)."""
    top = options.get("_pipeline")
    if top is None:
        data = {k: v for k, v in base.items() if k != "allocation"}
        return variant_config({**data, "target": {"bits_per_weight": 8}}, options)
    data = {**json.loads(json.dumps(base)), **top}
    target = top["target"].get("kept_fraction", f"{top['target'].get('bits_per_weight')}bpw")
    data["name"] = f"{base['name']}_{top['method']['name']}_{target}"
    return parse_pipeline(data, "benchmark", ROOT)


def own_calibration(row: dict) -> bool:
    """Whether a row runs on its own calibration block (``with_calibration``; marked † in the table)."""
    return "calibration" in row["options"].get("_pipeline", {})


def num(x: float) -> str:
    """Three decimals, or three significant digits for ratios far from 1 (×0.000971, ×1.9e+02)."""
    return f"{x:.3f}" if 0.01 <= x < 1000 else f"{x:.3g}"


def sixteen_bit_memory(runner, outputs: dict) -> dict:
    """A 16-bit low-rank row's stored bytes (its report has parameter fractions only): the one accounting,
    ``accounting.memory_report``, on its allocated ranks."""
    from transformers import AutoConfig

    from stagepipe.accounting import memory_report
    from stagepipe.models.layout import block_linear_shapes
    from stagepipe.stagekit import artifacts

    config = runner.ctx.config
    shapes = block_linear_shapes(AutoConfig.from_pretrained(outputs["snapshot@all"] / "model"), config.target.modules)
    ranks = artifacts.read_ranks(outputs["allocate@all"])
    return memory_report(shapes, ranks, "16-bit", config.target.kept_fraction).model_dump()


def table(rows: list[dict], rows_name: str, seq_len: int) -> list[str]:
    """The markdown table of a grid's rows (paired ratios to each row's anchor; zero-shot columns
    when any row was scored)."""
    tokens = seq_len - 1
    scored = any(r.get("zeroshot") for r in rows)
    model = {"smollm2": "SmolLM2-135M", "smollm2_headline": "SmolLM2-135M, the headline protocol",
             "gemma3": "Gemma-3-270M"}[rows_name]
    lines = [f"# Quantisation at equal bytes: {model}", "",
             f"Stored bits per weight of the target matrices (codes, float16 scales, shapes); perplexity on "
             f"{len(rows[0]['window_nll'])} test windows of {seq_len} tokens (dense "
             f"{rows[0]['dense_ppl']:.3f}), 95 % intervals; last column: over the row named (quantisation alone at "
             "as many bits per weight or more), paired over the windows (≈: inside the noise). Generated by `python "
             f"benchmarks/memory_grid.py --rows {rows_name}`.", "",
             "| row | bits per weight | kept parameters | PPL [95 %] | paired ratio |" + (
                 f" 0-shot avg acc (dense {dense_average(rows):.4f}) | retained above chance [95 %] |" if scored else ""),
             "|---|---|---|---|---|" + ("---|---|" if scored else "")]
    by_name = {r["row"]: r for r in rows}
    for row in rows:
        anchor = by_name.get(row.get("anchor") or "")
        if anchor is None:
            cell = "—"
        else:
            ratio = compare(row["window_nll"], anchor["window_nll"], tokens).to_dict()
            cell = f"×{num(ratio['ratio'])} [{num(ratio['low'])}, {num(ratio['high'])}] vs {anchor['row']}" + (
                "" if ratio["resolved"] else " ≈")
        kept = row.get("kept_fraction")
        lines.append(f"| {row['row']}{' †' if own_calibration(row) else ''} | {row['bits_per_weight']:.4f} | {'—' if kept is None else f'{kept:.3f}'} | "
                     f"{row['ppl']:.3f} [{row['ppl_interval'][0]:.2f}, {row['ppl_interval'][1]:.2f}] | {cell} |"
                     + (f" {average_cell(row)} | {retained_cell(row)} |" if scored else ""))
    marked = [r for r in rows if own_calibration(r)]
    if marked:
        text = marked[0]["options"]["_pipeline"]["calibration"]
        lines += ["", f"† Calibrated on `{json.dumps(text)}` (the same number of windows from a train split that "
                  "holds validation articles out, where the row's options were chosen), not the base file's; the "
                  "test windows, and so the pairing, are the same."]
    if scored:
        lines += ["", zeroshot_note(rows)]
    made = sorted({r["commit"] for r in rows if r.get("commit")})
    if made:
        lines += ["", f"Made at commit{'s' if len(made) > 1 else ''} {', '.join(made)} (each row's `commit` in the JSON)"
                  + ("; rows without one predate that field (git log of the JSON names their commits)."
                     if any(not r.get("commit") for r in rows) else ".")]
    return lines


def pair_line(rows: list[dict], name: str, against: str, seq_len: int) -> str:
    """``name``'s perplexity over ``against``'s, paired over the same test windows, with both rows'
    bits per weight (one clear line when a row is not in the JSON)."""
    by_name = {r["row"]: r for r in rows}
    missing = [n for n in (name, against) if n not in by_name]
    if missing:
        raise SystemExit(f"--pair: no row {missing[0]!r} in the grid's JSON (rows: {', '.join(by_name)})")
    a, b = by_name[name], by_name[against]
    ratio = compare(a["window_nll"], b["window_nll"], seq_len - 1)
    verdict = "" if ratio.resolved else " (inside the noise)"
    return (f"{name} ({a['bits_per_weight']:.4f} b/w, {a['ppl']:.3f}) / {against} ({b['bits_per_weight']:.4f} b/w, "
            f"{b['ppl']:.3f}): ×{num(ratio.ratio)} [{num(ratio.low)}, {num(ratio.high)}]{verdict}")


def dense_average(rows: list[dict]) -> float:
    """The dense model's mean ``acc`` over the tasks (the same for every scored row)."""
    return next(r["zeroshot"]["average"]["dense"] for r in rows if r.get("zeroshot"))


def average_cell(row: dict) -> str:
    z = row.get("zeroshot")
    return f"{z['average']['compressed']:.4f}" if z else "—"


def zeroshot_note(rows: list[dict]) -> str:
    """Which documents the zero-shot columns scored, and the tasks left out of the retention."""
    z = next(r["zeroshot"] for r in rows if r.get("zeroshot"))
    docs = ", ".join(f"{t} {v['n_docs']}" for t, v in z["tasks"].items())
    near = ", ".join(z.get("near_chance", [])) or "none"
    return (f"Zero-shot (lm-eval-harness on the installed data; documents per task: {docs}): average = mean `acc` over "
            "the tasks; retained = mean over the tasks where dense is more than two standard errors above chance of "
            "`(acc − chance)/(acc_dense − chance)`, 95 % bootstrap interval over documents (paired); left out as at "
            f"chance for the dense model: {near}. — : not scored.")


def base_with_tasks(args: argparse.Namespace) -> dict:
    """The base file, every row's evaluation scoring ``--tasks`` (with ``--task-limit``) when given."""
    base = yaml.safe_load(Path(args.base).read_text())
    if args.tasks:
        base["evaluation"] = {**base["evaluation"], "tasks": args.tasks,
                              **({"task_limit": args.task_limit} if args.task_limit else {})}
    return base


def row_runner(base: dict, rows_name: str, name: str, workspace: Path, flag: str):
    """The runner of the grid row ``name`` on ``base`` (one clear line if the grid has no such row)."""
    options = {row: row_options for row, row_options, _ in ROWS[rows_name]}
    if name not in options:
        raise SystemExit(f"{flag}: no row {name!r} in --rows {rows_name}")
    return make_runner(row_config(base, options[name]), workspace)


def zeroshot_pair_lines(base: dict, rows_name: str, pair: list[str], workspace: Path) -> str:
    """``acc(ROW) − acc(AGAINST)`` per task and for the mean over tasks, paired over documents, from
    the rows' finished ``zeroshot`` partitions."""
    scores = [finished_scores(row_runner(base, rows_name, name, workspace, "--pair-zeroshot"), name, workspace,
                              "--pair-zeroshot") for name in pair]
    return "\n".join(paired_lines(pair, scores))


def model_dirs(base: dict, rows_name: str, wanted: list[str], workspace: Path) -> list[str]:
    """``dense=DIR`` and ``SHORT=DIR`` of each ``SHORT=ROW``'s assembled model (its missing stages run)."""
    found: list[str] = []
    for item in wanted:
        short, _, name = item.partition("=")
        runner = row_runner(base, rows_name, name, workspace, "--model-dirs")
        runner.run()
        outputs = {str(e.ref): e.state.output for e in runner.states()}
        found += [] if found else [f"dense={outputs['snapshot@all'] / 'model'}"]
        found.append(f"{short}={outputs['assemble@all'] / 'model'}")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=str(ROOT / "pipelines" / "methods" / "gptq.yaml"))
    parser.add_argument("--workspace", default=str(ROOT / "workspace" / "quant"))
    parser.add_argument("--out", default=str(ROOT / "docs" / "quantize"))
    parser.add_argument("--rows", choices=sorted(ROWS), default="smollm2")
    parser.add_argument("--name", default="memory_grid", help="output file stem")
    parser.add_argument("--only", nargs="+", help="row names to run now (others kept from OUT/NAME.json)")
    parser.add_argument("--tasks", nargs="+", default=[], help="zero-shot tasks scored per row (evaluation.tasks)")
    parser.add_argument("--task-limit", type=int, help="documents per task (default: the config's)")
    parser.add_argument("--render", action="store_true", help="rewrite OUT/NAME.md from OUT/NAME.json; run nothing")
    parser.add_argument("--model-dirs", nargs="+", metavar="SHORT=ROW",
                        help="print `dense=DIR SHORT=DIR …` of these rows' assembled models (for benchmarks/inference.py "
                             "--models); runs what is missing, writes no table")
    parser.add_argument("--pair", nargs=2, metavar=("ROW", "AGAINST"),
                        help="print ROW's perplexity over AGAINST's, paired over the test windows, from OUT/NAME.json "
                             "(any two rows, not only a row and its anchor); runs nothing")
    parser.add_argument("--pair-zeroshot", nargs=2, metavar=("ROW", "AGAINST"),
                        help="print acc(ROW) − acc(AGAINST) per task and for the mean, paired over the documents the "
                             "finished zeroshot partitions scored (with --tasks and --task-limit as they ran); runs nothing")
    args = parser.parse_args()
    if args.pair:
        return print(pair_line(json.loads((Path(args.out) / f"{args.name}.json").read_text()), *args.pair,
                               yaml.safe_load(Path(args.base).read_text())["evaluation"]["seq_len"]))
    if args.pair_zeroshot:
        return print(zeroshot_pair_lines(base_with_tasks(args), args.rows, args.pair_zeroshot, Path(args.workspace)))
    if args.model_dirs:
        return print(" ".join(model_dirs(yaml.safe_load(Path(args.base).read_text()), args.rows, args.model_dirs,
                                         Path(args.workspace))))
    if args.render:
        if not (Path(args.out) / f"{args.name}.json").exists():
            raise SystemExit(f"--render: {Path(args.out) / (args.name + '.json')} does not exist; run the grid first")
        args.only = []
    base = base_with_tasks(args)
    commit = head_commit()
    out = Path(args.out)
    earlier = {r["row"]: r for r in json.loads((out / f"{args.name}.json").read_text())} if (
        args.only is not None and (out / f"{args.name}.json").exists()) else {}
    rows = []
    for name, options, anchor in ROWS[args.rows]:
        if args.only is not None and name not in args.only:
            if name in earlier and earlier[name]["options"] == json.loads(json.dumps(options)):  # the same row, not a namesake
                rows.append(earlier[name])
            continue
        runner = make_runner(row_config(base, options), Path(args.workspace))
        runner.run()
        outputs = {str(e.ref): e.state.output for e in runner.states()}
        report = json.loads((outputs["report@all"] / "report.json").read_text())
        result = read_results(outputs["evaluate@compressed"])["datasets"]
        dataset = next(iter(result))
        seconds = sum(e.state.manifest.wall_s for e in runner.states() if e.ref.stage == "quantize")
        memory = report["ratios"].get("memory") or sixteen_bit_memory(runner, outputs)
        rows.append({"row": name, "options": options, "anchor": anchor,
                     "bits_per_weight": memory["bits_per_weight"],
                     "stored_bytes": memory["stored_bytes"], "ppl": result[dataset]["ppl"],
                     "ppl_interval": [result[dataset]["ppl_low"], result[dataset]["ppl_high"]],
                     "window_nll": result[dataset]["window_nll"], "dense_ppl": report["perplexity"]["dense"][dataset],
                     "quantize_s": seconds, "zeroshot": report.get("zeroshot"),
                     "kept_fraction": report["ratios"]["kept_over_target_matrices"], "commit": commit})
        print(f"{name}: {rows[-1]['bits_per_weight']:.4f} b/w, PPL {rows[-1]['ppl']:.3f}", flush=True)
    lines = table(rows, args.rows, base["evaluation"]["seq_len"])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    (out / f"{args.name}.json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
