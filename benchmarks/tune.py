"""Choose one method option on the validation split, then report the test perplexity of the choice.

The base pipeline must have ``calibration.validation`` (windows from held-out *train* articles,
never the test articles). For each candidate value the grid point (``METHOD[:POLICY]`` at a kept
fraction, as ``benchmarks/quality.py`` builds it; without ``--entry`` the base file as it is, e.g. a
byte budget) runs through the real pipeline; the assembled
model's perplexity on the validation windows — same function and protocol as ``evaluate`` —
picks the value, and the paired bootstrap over those windows says whether the choice is outside
the noise against each other value (``stagepipe.intervals``). Only the chosen value's test
perplexity is printed: the test split reports, it never chooses.

    python benchmarks/tune.py --base pipelines/smollm2_gfwsvd_paper.yaml --entry kfac_svd:global_greedy \\
        --option shrinkage --values 0 0.05 0.2 --kept 0.8 --workspace workspace/paper --out docs/gfwsvd_paper
    python benchmarks/tune.py --base pipelines/methods/aasvd.yaml --entry aasvd_kfac+refine:global_greedy \
        --option refine_metric --values euclidean kfac_out --kept 0.6 --workspace workspace/aasvd_tune --out docs/aasvd
    python benchmarks/tune.py --base pipelines/methods/aasvd.yaml --entry aasvd_kfac+refine:global_greedy \
        --option calibration.n_samples --values 32 128 --kept 0.6 --workspace workspace/aasvd_tune --out docs/aasvd
    python benchmarks/tune.py --base pipelines/gemma3_rank_bits.yaml --option allocation.truncation_scale \
        --values 1 10 100 1000 --workspace workspace/gemma --out docs/quantize
    python benchmarks/tune.py --base pipelines/gemma3_rank_bits.yaml --set target.bits_per_weight=2.13 \
        --option allocation.truncation_scale --values 1 10 --workspace workspace/gemma --out docs/quantize
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
import yaml
from provenance import head_commit
from quality import ROOT, grid_config, method_block  # benchmarks/quality.py (this directory)
from transformers import AutoModelForCausalLM

from stagepipe.config import parse_pipeline
from stagepipe.engine.stage import ALL, PartitionRef
from stagepipe.intervals import Comparison, compare
from stagepipe.perplexity import perplexity
from stagepipe.stagekit import artifacts
from stagepipe.stagekit.artifacts import VALIDATION
from stagepipe.stages import make_runner


def option_value(text: str) -> float | str:
    """A ``--values`` item: a number when it reads as one (``1e-4``), else a word (``kfac_out``)."""
    try:
        return float(text)
    except ValueError:
        return text


def _show(value: float | str) -> str:
    return f"{value:g}" if isinstance(value, float) else value


def with_option(base: dict, option: str, value: float | str) -> tuple[dict, dict]:
    """(base file, method options) with ``option`` set: a method option by its name (``refine_lr``),
    any other pipeline key by its dotted path (``calibration.n_samples``)."""
    if "." not in option:
        return base, {option: value}
    *path, key = option.split(".")
    changed = copy.deepcopy(base)
    node = changed
    for part in path:
        node = node.setdefault(part, {})
    node[key] = int(value) if isinstance(value, float) and value.is_integer() else value
    return changed, {}


def validation_point(base: dict, entry: str | None, kept: float, option: str, value: float | str,
                     workspace: Path) -> dict:
    if entry is not None:
        base, method_options = with_option(base, option, value)
        config = grid_config(base, entry, kept, method_options)
    else:  # the base file as it is (its own target), with the option set; a bare name is a method option
        changed, _ = with_option(base, option if "." in option else f"method.{option}", value)
        config = parse_pipeline(changed, "tune", ROOT / "pipelines")
    runner = make_runner(config, workspace)
    runner.run()
    states = {e.ref: e.state.output for e in runner.states()}
    if PartitionRef("tokenize", VALIDATION) not in states:
        raise SystemExit(f"{base['name']}: the base pipeline has no calibration.validation split to tune on")
    windows = artifacts.read_windows(states[PartitionRef("tokenize", VALIDATION)])
    model = AutoModelForCausalLM.from_pretrained(artifacts.model_dir(states[PartitionRef("assemble", ALL)]),
                                                 trust_remote_code=True, dtype=torch.float32)
    result = perplexity(model, windows, config.evaluation.batch_size, torch.device("cpu"))
    report = json.loads((states[PartitionRef("report", ALL)] / "report.json").read_text())
    return {"value": value, "validation": result.to_dict(), "test": report["perplexity"]["compressed"],
            "kept": report["ratios"]["kept_over_target_matrices"],
            "bits_per_weight": (report["ratios"].get("memory") or {}).get("bits_per_weight")}


def against(point: dict, chosen: dict) -> Comparison:
    """``point``'s validation perplexity over the chosen value's, paired on the same windows."""
    v, c = point["validation"], chosen["validation"]
    return compare(v["window_nll"], c["window_nll"], v["seq_len"] - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True)
    parser.add_argument("--entry", metavar="METHOD[:POLICY]", help="a grid point at --kept (default: the base file as it is)")
    parser.add_argument("--option", required=True,
                        help="a method option (shrinkage), or any pipeline key by its dotted path (calibration.n_samples)")
    parser.add_argument("--values", nargs="+", type=option_value, required=True, help="numbers or words")
    parser.add_argument("--kept", type=float, default=0.8, help="with --entry")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="fixed changes of the base file by dotted path (target.bits_per_weight=2.13)")
    parser.add_argument("--workspace", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(2)
    base = yaml.safe_load(Path(args.base).read_text())
    for item in args.set:
        key, _, value = item.partition("=")
        if "." not in key or not value:  # with_option keeps a bare name aside as a method option: it would be lost
            raise SystemExit(f"--set {item}: expected a dotted pipeline key and a value (target.bits_per_weight=2.13)")
        base, _ = with_option(base, key, option_value(value))
    points = [validation_point(base, args.entry, args.kept, args.option, v, Path(args.workspace)) for v in args.values]
    chosen = min(points, key=lambda p: p["validation"]["ppl"])
    commit = head_commit()
    what = f"`{args.entry}` at kept {args.kept}" if args.entry else f"`{Path(args.base).name}`"
    call = (f"--entry {args.entry} " if args.entry else "") + (f"--set {' '.join(args.set)} " if args.set else "")
    tail = f" --kept {args.kept}" if args.entry else ""
    lines = [f"# Tuning `{args.option}` of {what} on the validation split", "",
             f"`python benchmarks/tune.py --base {Path(args.base).name} {call}--option {args.option} "
             f"--values {' '.join(map(_show, args.values))}{tail}` at commit `{commit}`. Validation: "
             f"{chosen['validation']['n_windows']} windows of {chosen['validation']['seq_len']} tokens from held-out train "
             "articles; the test split is read only for the chosen value.", "",
             # the entry's own block, not the base file's, when the entry is a named variant: say which ran
             f"Method block of every run (`{args.option}` aside): "
             f"`{json.dumps(method_block(base, args.entry.partition(':')[0]) if args.entry else base['method'])}`.", "",
             "| value | kept (targets) | validation PPL [95 % interval] | PPL over the chosen's, paired [95 %] |",
             "|---|---|---|---|"]
    for p in points:
        p["against_chosen"] = against(p, chosen)
        v = p["validation"]
        versus = "—" if p is chosen else p["against_chosen"].describe()
        bits = f" ({p['bits_per_weight']:.4f} bits/weight)" if p.get("bits_per_weight") else ""
        lines.append(f"| {_show(p['value'])} | {p['kept']:.4f}{bits} | {v['ppl']:.3f} [{v['ppl_low']:.3f}, {v['ppl_high']:.3f}]"
                     f"{' ← chosen' if p is chosen else ''} | {versus} |")
    others = [p for p in points if p is not chosen]
    resolved = all(p["against_chosen"].resolved for p in others)
    lines += ["", ("The choice is outside the noise against every other value" if resolved else
                   "The choice is **inside the noise** against "
                   + ", ".join(_show(p["value"]) for p in others if not p["against_chosen"].resolved)
                   + ": the validation split cannot tell them apart")
              + " (paired bootstrap over the validation windows, `stagepipe.intervals`).",
              "", f"Test perplexity of the chosen value ({_show(chosen['value'])}): "
              + ", ".join(f"{d} **{v:.3f}**" for d, v in chosen["test"].items()), ""]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fixed = "".join(f"_{item.replace('=', '')}" for item in args.set)
    stem = f"tuning_{(args.entry or base['name']).replace(':', '_')}_{args.option}{fixed}"
    (out / f"{stem}.md").write_text("\n".join(lines))
    # the other values' test numbers are not written anywhere: they would invite choosing on them
    (out / f"{stem}.json").write_text(json.dumps({"commit": commit, "base": Path(args.base).name, "entry": args.entry,
                                                   "option": args.option, "kept": args.kept, "chosen": chosen["value"],
                                                   "test_of_chosen": chosen["test"],
                                                   "choice_outside_noise": resolved,
                                                   "validation": [{**{k: p[k] for k in ("value", "kept", "validation")},
                                                                   "against_chosen": p["against_chosen"].to_dict()}
                                                                  for p in points]}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
