"""Decompose speed against the official SVD-LLM code, same statistics, same machine, back to back.

``stagepipe``'s ``decompose`` stage (SVD-LLM metric pair: input Gram on the right) runs on every
layer of a pipeline whose ``capture`` outputs are in the workspace; the official code's per-linear
work for one kept fraction runs on the *same* input Grams: its profiling tail (float64 Cholesky of
each linear's Gram, with its eigenvalue shift when Cholesky fails — ``profle_svdllm`` in
``SVDLLM.py``, three lines re-typed here because they sit inside the hook loop) and then its own
``whitening`` function, imported unmodified from a checkout of ``AIoT-MLSys-Lab/SVD-LLM``. The two
alternate ``--repeats`` times; the table gives medians and the ratio. Perplexity equality of the two
was measured separately (issue 13: 140.74 vs 140.79 at matched ranks).

    python benchmarks/official_whitening.py --official /path/to/SVD-LLM --workspace workspace/quality_grid

Writes ``docs/decompose_vs_official.json``. Not a test: it needs the official checkout and minutes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import types
from pathlib import Path

import torch
import yaml
from decompose import run_unsaved  # benchmarks/decompose.py (this directory)

from stagepipe.config import parse_pipeline
from stagepipe.stagekit import artifacts
from stagepipe.stages import make_runner

ROOT = Path(__file__).resolve().parent.parent


def import_official(path: Path):
    """``SVDLLM`` from a checkout; its Mistral module imports a transformers helper that no longer
    exists, which only the Mistral path uses, so a placeholder module stands in for it."""
    shim = types.ModuleType("transformers.modeling_attn_mask_utils")
    shim._prepare_4d_causal_attention_mask = None
    sys.modules.setdefault(shim.__name__, shim)
    sys.path.insert(0, str(path))
    argv, sys.argv = sys.argv, [sys.argv[0]]
    try:
        import SVDLLM  # noqa: PLC0415
    finally:
        sys.argv = argv
    return SVDLLM


def stagepipe_decompose(runner, layers: list[int]) -> float:
    entries = {str(e.ref): e for e in runner.states()}
    started = time.perf_counter()
    for layer in layers:
        entry = entries[f"decompose@layer-{layer:03d}"]
        if entry.key is None:
            raise SystemExit(f"decompose@layer-{layer:03d}: its inputs are not done in the workspace")
        run_unsaved(runner, entry)
    return time.perf_counter() - started


def official_whitening(official, runner, layers: list[int], ratio: float) -> float:
    from transformers import AutoModelForCausalLM

    entries = {str(e.ref): e for e in runner.states()}
    snapshot = next(Path(v) for k, v in entries["decompose@layer-000"].inputs.items() if k.startswith("snapshot"))
    model = AutoModelForCausalLM.from_pretrained(artifacts.model_dir(snapshot), dtype=torch.float32).eval()
    model.model.layers = model.model.layers[: max(layers) + 1]
    grams = {}
    for layer in layers:
        capture = Path(entries[f"capture@layer-{layer:03d}"].state.output)
        grams[layer] = artifacts.read_input_stats(capture).gram
    started = time.perf_counter()
    profiling = {}
    for layer in layers:  # the profiling tail: one float64 Cholesky per linear (SVDLLM.py, profle_svdllm)
        profiling[layer] = {}
        for name, gram in grams[layer].items():
            raw = gram.double()
            try:
                root = torch.linalg.cholesky(raw)
            except Exception:  # noqa: BLE001 — the official shift, as written there
                eigenvalues = torch.linalg.eigvalsh(raw)
                raw += (-eigenvalues[0] + 1e-6) * torch.eye(raw.shape[0])
                root = torch.linalg.cholesky(raw)
            profiling[layer][name] = root.cpu()
    official.whitening("llama", model, profiling, ratio, "cpu")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", required=True, help="a checkout of AIoT-MLSys-Lab/SVD-LLM")
    parser.add_argument("--pipeline", default=str(ROOT / "pipelines" / "smollm2_demo.yaml"))
    parser.add_argument("--workspace", required=True)
    parser.add_argument("--ratio", type=float, default=0.8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "docs" / "decompose_vs_official.json"))
    args = parser.parse_args()
    data = yaml.safe_load(Path(args.pipeline).read_text())
    data["allocation"] = {"policy": "uniform", "align": 8}
    runners = {}
    for dtype in ("float64", "float32"):
        data["method"] = {"name": "svdllm", "svd_dtype": dtype}
        runners[f"stagepipe svd {dtype}"] = make_runner(parse_pipeline(data, args.pipeline, Path(args.pipeline).parent),
                                                        Path(args.workspace))
    official = import_official(Path(args.official))
    first = next(iter(runners.values()))
    first.states()  # discovers the model's facts
    layers = list(range(int(first.ctx.facts.num_hidden_layers)))
    times: dict[str, list[float]] = {name: [] for name in [*runners, "official"]}
    for _ in range(args.repeats):
        for name, runner in runners.items():
            times[name].append(stagepipe_decompose(runner, layers))
        times["official"].append(official_whitening(official, first, layers, args.ratio))
        print("   ".join(f"{name} {values[-1]:.1f} s" for name, values in times.items()))
    medians = {name: statistics.median(values) for name, values in times.items()}
    lines = ["| variant | wall s (median) | ratio to official |", "|---|---|---|"]
    lines += [f"| {name} | {value:.1f} | {value / medians['official']:.2f} |" for name, value in medians.items()]
    print(f"{len(layers)} layers, {args.repeats} alternating repeats\n" + "\n".join(lines))
    env = {"threads": torch.get_num_threads(), "torch": torch.__version__, "pipeline": args.pipeline, "layers": len(layers)}
    Path(args.out).write_text(json.dumps({"env": env, "times": times, "median_s": medians,
                                          "ratio_to_official": {k: v / medians["official"] for k, v in medians.items()}},
                                         indent=1))


if __name__ == "__main__":
    main()
