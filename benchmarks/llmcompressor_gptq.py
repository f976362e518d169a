"""stagepipe's GPTQ beside llm-compressor's GPTQModifier on the same model, windows, bits and groups (issue #33).

llm-compressor 0.14 pins transformers 5.17 and compressed-tensors 0.19, so it runs in its own
environment (``--venv``; made by ``python -m venv .venv-llmcompressor && .venv-llmcompressor/bin/pip install
torch==2.13.0 llmcompressor==0.14.0``) through ``llmcompressor_driver.py``, on stagepipe's snapshot of the
model and stagepipe's calibration windows. Its compressed-tensors output is loaded here with
``from_pretrained`` and scored by stagepipe's perplexity on the same test windows; every row is
compared with llm-compressor's, paired over the windows (95 % interval).

Time: ``--time`` reruns stagepipe's ``quantize`` stage (``--force``) and llm-compressor's ``oneshot``
back to back, each doing the same work (the calibration passes, GPTQ, the propagation through the
quantised blocks; loading and saving the model excluded), and reports their ratio.

    python benchmarks/llmcompressor_gptq.py [--base pipelines/methods/gptq.yaml] [--time] [--out docs/quantize]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from stagepipe.config import parse_pipeline
from stagepipe.intervals import compare
from stagepipe.methods import METHODS
from stagepipe.models.sources import load_checked
from stagepipe.perplexity import perplexity
from stagepipe.stagekit import artifacts
from stagepipe.stages import make_runner

ROOT = Path(__file__).resolve().parent.parent
#: stagepipe's rows: (name, method options over the base file's)
VARIANTS = [
    ("gptq", {}),
    ("gptq scales=static (llm-compressor's scales)", {"scales": "static"}),
    ("gptq inputs=dense (capture's Grams)", {"inputs": "dense"}),
    ("rtn", {"name": "rtn"}),
]


def variant_config(base: dict, options: dict):
    """``base`` with method options changed; options the named method does not have are dropped (RTN has
    no ``damp``)."""
    data = json.loads(json.dumps(base))
    name = f"{base['name']}_{'_'.join(f'{k}{v}' for k, v in options.items()) or 'base'}"
    data["name"] = re.sub(r"[^A-Za-z0-9_.-]", "", name)  # nested options (compensate) as their plain characters
    method = {**data["method"], **options}
    data["method"] = {k: v for k, v in method.items() if k in METHODS[method["name"]].config.model_fields}
    return parse_pipeline(data, "benchmark", ROOT)


def stagepipe_row(name: str, config, workspace: Path, force: bool) -> dict:
    runner = make_runner(config, workspace)
    runner.run(force={"quantize"} if force else set())
    outputs = {str(e.ref): e.state.output for e in runner.states()}
    report = json.loads((outputs["report@all"] / "report.json").read_text())
    result = artifacts.read_results(outputs["evaluate@compressed"])["datasets"]
    dataset = next(iter(result))
    return {"row": name, "method": config.method.model_dump(exclude_defaults=True), "dataset": dataset,
            "ppl": result[dataset]["ppl"], "ppl_interval": [result[dataset]["ppl_low"], result[dataset]["ppl_high"]],
            "window_nll": result[dataset]["window_nll"], "memory": report["ratios"]["memory"],
            "seconds": quantize_seconds(runner), "dense_ppl": report["perplexity"]["dense"][dataset],
            "outputs": {k: str(v) for k, v in outputs.items() if k in ("snapshot@all", "tokenize@calibration")},
            "eval_windows": str(outputs[f"tokenize@eval-{dataset}"])}


def quantize_seconds(runner) -> float:
    """From the first quantize partition's start to the last one's finish (its manifests): the calibration
    passes, GPTQ and the propagation, as llm-compressor's ``oneshot`` does them."""
    from stagepipe.io import manifest as manifest_io

    manifests = [manifest_io.read(e.state.output) for e in runner.states() if e.ref.stage == "quantize"]
    return max(m.finished_at for m in manifests) - min(m.started_at for m in manifests)


def target_bytes(model_dir: Path) -> int:
    """Bytes of the decoder blocks' quantised linears in a compressed-tensors directory: packed codes,
    scales (llm-compressor keeps the model's dtype) and shapes."""
    from stagepipe.io import safetensors_io

    found = 0
    for file in model_dir.glob("*.safetensors"):
        found += sum(t.numel() * t.element_size() for k, t in safetensors_io.read(file).items()
                     if ".layers." in k and k.rsplit(".", 1)[1].startswith("weight_"))
    return found


def llmcompressor_row(reference: dict, method: dict, venv: Path, out: Path, rerun: bool) -> dict:
    """GPTQModifier on stagepipe's snapshot and calibration windows, scored on the same test windows."""
    scored = out / "scored.json"
    if scored.exists() and not rerun:
        return json.loads(scored.read_text())
    calibration = out.parent / "calibration.pt"
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(artifacts.read_windows(Path(reference["outputs"]["tokenize@calibration"])).long(), calibration)
    model_dir = artifacts.model_dir(Path(reference["outputs"]["snapshot@all"]))
    command = [str(venv / "bin" / "python"), str(ROOT / "benchmarks" / "llmcompressor_driver.py"), str(model_dir),
               str(calibration), str(out), str(method["bits"]), str(method.get("group_size") or 0),
               str(method.get("damp", 0.01))]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"llm-compressor failed: {done.stderr[-3000:]}")
    windows = artifacts.read_windows(Path(reference["eval_windows"]))
    model = load_checked(out)
    result = perplexity(model, windows, 4, torch.device("cpu"))
    stored = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    row = {"row": "llm-compressor GPTQModifier", "ppl": result.ppl, "ppl_interval": [result.ppl_low, result.ppl_high],
           "window_nll": result.window_nll, "seconds": json.loads((out / "timing.json").read_text())["oneshot_seconds"],
           "safetensors_bytes": stored, "timed_back_to_back": rerun, "quantization_config": json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]}
    scored.write_text(json.dumps(row))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=str(ROOT / "pipelines" / "methods" / "gptq.yaml"))
    parser.add_argument("--workspace", default=str(ROOT / "workspace" / "quant"))
    parser.add_argument("--venv", default=str(ROOT / ".venv-llmcompressor"))
    parser.add_argument("--out", default=str(ROOT / "docs" / "quantize"))
    parser.add_argument("--time", action="store_true", help="rerun stagepipe's quantize and llm-compressor back to back")
    args = parser.parse_args()
    base = yaml.safe_load(Path(args.base).read_text())
    out = Path(args.out)
    rows = [stagepipe_row(name, variant_config(base, options), Path(args.workspace), False) for name, options in VARIANTS]
    theirs_dir = Path(args.workspace) / "llmcompressor" / "model"
    if args.time:
        rows[0] = stagepipe_row(VARIANTS[0][0], variant_config(base, {}), Path(args.workspace), True)
    theirs = llmcompressor_row(rows[0], base["method"], Path(args.venv), theirs_dir, args.time)
    tokens = base["evaluation"]["seq_len"] - 1
    theirs["target_bytes"] = target_bytes(theirs_dir)
    theirs["bits_per_weight"] = 8 * theirs["target_bytes"] / (rows[0]["memory"]["dense_bytes_16bit"] // 2)
    for row in rows:
        row["vs_llmcompressor"] = compare(row["window_nll"], theirs["window_nll"], tokens).to_dict()
    write(rows, theirs, base, out, theirs.get("timed_back_to_back", False))


def write(rows: list[dict], theirs: dict, base: dict, out: Path, timed: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    method = base["method"]
    grid = f"{method['bits']}-bit symmetric, group {method.get('group_size') or 'per channel'}"
    lines = [f"# GPTQ: stagepipe beside llm-compressor ({grid})", "",
             f"SmolLM2-135M (dequantised from Q4_1), {base['calibration']['n_samples']} calibration windows of "
             f"{base['calibration']['seq_len']} tokens (the same ids for both tools), perplexity on "
             f"{len(rows[0]['window_nll'])} test windows of {base['evaluation']['seq_len']} tokens in fp32; dense "
             f"{rows[0]['dense_ppl']:.3f}. Ratio: perplexity over llm-compressor's, paired over the same windows "
             "(95 % interval); ≈ when the interval holds 1. Generated by `python benchmarks/llmcompressor_gptq.py`.", "",
             "| row | PPL [95 %] | over llm-compressor | bits per weight | seconds (calibrate + quantise) |",
             "|---|---|---|---|---|"]
    for row in rows:
        ratio = row["vs_llmcompressor"]
        mark = "" if ratio["resolved"] else " ≈"
        lines.append(f"| {row['row']} | {row['ppl']:.3f} [{row['ppl_interval'][0]:.2f}, {row['ppl_interval'][1]:.2f}] | "
                     f"×{ratio['ratio']:.3f} [{ratio['low']:.3f}, {ratio['high']:.3f}]{mark} | "
                     f"{row['memory']['bits_per_weight']:.4f} | {row['seconds']:.0f} |")
    lines.append(f"| {theirs['row']} | {theirs['ppl']:.3f} [{theirs['ppl_interval'][0]:.2f}, {theirs['ppl_interval'][1]:.2f}] "
                 f"| ×1 | {theirs['bits_per_weight']:.4f} (scales in the model's float32) | {theirs['seconds']:.0f} |")
    if timed:
        ratio = rows[0]["seconds"] / theirs["seconds"]
        lines += ["", f"Seconds: the first row's quantize stage and llm-compressor's oneshot ran back to back (`--time`, "
                      f"nothing else running): stagepipe takes ×{ratio:.2f} llm-compressor's time (GPTQ in float64 "
                      "against its float32, block outputs written to disk, every file hashed). Other rows: single "
                      "measurements, not a speed comparison."]
    else:
        lines += ["", "Seconds: single measurements, not a speed comparison."]
    (out / "gptq_vs_llmcompressor.md").write_text("\n".join(lines) + "\n")
    (out / "gptq_vs_llmcompressor.json").write_text(json.dumps({"rows": rows, "llmcompressor": theirs}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
