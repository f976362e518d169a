"""What compression buys at inference: prefill and decode throughput, latency per token and memory
of the dense model, a two-factor low-rank model and a MoDeGPT model at the same kept fraction.

The compressed models come from the quality grid's pipelines (``benchmarks/quality.py``; missing
stages run first). Each measurement runs in a fresh process (clean resident memory), and the
models take turns round by round, so every ratio to the dense model compares runs made back to
back on the same machine state; the table reports medians over rounds. Writes
``docs/inference.md``, ``docs/inference.json`` and ``docs/inference.png``.

    python benchmarks/inference.py [--kept 0.8 0.6] [--lowrank svdllm] [--rounds 5] [--threads 1] [--device cpu]
    python benchmarks/inference.py --models gptq3=DIR gptvq2=DIR --out docs/quantize --name inference_quantized

``--models`` measures the named model directories beside the dense one instead of running the grid
(quantised models: compressed-tensors loads dense weights; stagepipe's ``GridLinear`` / ``VQLinear``
keep the packed codes and decode them at each call).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: the model family named in the header when ``--label`` is not given (and in tables written before it)
DEFAULT_LABEL = "SmolLM2-135M (fp32)"
sys.path.insert(0, str(ROOT / "benchmarks"))


def model_dirs(base_file: Path, entries: list[str], fractions: list[float], workspace: Path) -> dict[str, Path]:
    """``dense`` (the snapshot) and one assembled model per grid entry, run through the pipeline."""
    import yaml
    from quality import grid_config

    from stagepipe.engine.stage import ALL, PartitionRef
    from stagepipe.stages import make_runner

    base = yaml.safe_load(base_file.read_text())
    dirs: dict[str, Path] = {}
    for kept in fractions:
        for entry in entries:
            runner = make_runner(grid_config(base, entry, kept), workspace)
            runner.run()
            states = {e.ref: e.state.output for e in runner.states()}
            dirs.setdefault("dense", states[PartitionRef("snapshot", ALL)] / "model")
            dirs[f"{entry}@{kept}"] = states[PartitionRef("assemble", ALL)] / "model"
    return dirs


def measure(model_dir: str, device: str, prompt: int, new_tokens: int, batch: int, threads: int, repeats: int) -> dict:
    """One fresh process: load, warm up, then the median of ``repeats`` prefills and cached greedy
    decodes; resident memory from psutil (``ru_maxrss`` would carry the parent's peak over exec)."""
    import threading
    import time

    import psutil
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    process = psutil.Process()
    before = process.memory_info().rss
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True, dtype=torch.float32).to(device).eval()
    loaded = process.memory_info().rss
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(10, model.config.vocab_size - 10, (batch, prompt), generator=generator).to(device)
    peak = [loaded]
    running = True

    def sample() -> None:
        while running:
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.01)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def timed(call) -> float:
        sync()
        start = time.perf_counter()
        call()
        sync()
        return time.perf_counter() - start

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    with torch.inference_mode():
        model(ids[:, :16])  # warm-up
        model.generate(ids[:, :16], max_new_tokens=4, min_new_tokens=4, do_sample=False)
        prefill = statistics.median(timed(lambda: model(ids)) for _ in range(repeats))
        decode = statistics.median(
            timed(lambda: model.generate(ids[:, :16], max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False))
            for _ in range(repeats))
    running = False
    sampler.join()
    return {"weights_mb": weights / 2**20, "rss_model_mb": (loaded - before) / 2**20, "peak_rss_mb": peak[0] / 2**20,
            "prefill_tok_s": batch * prompt / prefill, "decode_tok_s": batch * new_tokens / decode,
            "ms_per_token": 1000 * decode / new_tokens, "params": sum(p.numel() for p in model.parameters()),
            "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None}


def main() -> None:
    from provenance import head_commit  # benchmarks/provenance.py (this directory, on the path above)

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=str(ROOT / "pipelines" / "smollm2_demo.yaml"))
    parser.add_argument("--kept", type=float, nargs="+", default=[0.8, 0.6])
    parser.add_argument("--lowrank", default="svdllm", help="grid entry of the two-factor model (its ranks, not its "
                                                            "metric, decide the speed)")
    parser.add_argument("--structured", default="modegpt")
    parser.add_argument("--workspace", default=str(ROOT / "workspace" / "quality_grid"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="1 on a shared 2-core machine: less noise")
    parser.add_argument("--repeats", type=int, default=3, help="timed prefills and decodes per process (median)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(ROOT / "docs"))
    parser.add_argument("--models", nargs="+", default=[], metavar="NAME=DIR",
                        help="measure these model directories beside the dense snapshot (DENSE=DIR names it) instead of the grid")
    parser.add_argument("--name", default="inference", help="output file stem")
    parser.add_argument("--label", default=DEFAULT_LABEL, help="the model family named in the table's header")
    parser.add_argument("--render", action="store_true", help="rewrite OUT/NAME.md from OUT/NAME.json; measure nothing")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one model directory, print JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.device, args.prompt, args.new_tokens, args.batch, args.threads,
                                 args.repeats)))
        return
    if args.render:
        saved = json.loads((Path(args.out) / f"{args.name}.json").read_text())
        return render(saved["rows"], {**saved["setup"], "label": args.label}, saved["commit"], Path(args.out), args.name)
    if args.models:
        dirs = dict(item.split("=", 1) for item in args.models)
        if "dense" not in dirs:
            raise SystemExit("--models: name the dense model's directory as dense=DIR")
        dirs = {"dense": dirs.pop("dense"), **dirs}
    else:
        dirs = model_dirs(Path(args.base), [args.lowrank, args.structured], args.kept, Path(args.workspace))
    runs: dict[str, list[dict]] = {name: [] for name in dirs}
    for round_ in range(args.rounds):
        for name, directory in dirs.items():
            command = [sys.executable, __file__, "--one", str(directory), "--device", args.device, "--prompt",
                       str(args.prompt), "--new-tokens", str(args.new_tokens), "--batch", str(args.batch),
                       "--threads", str(args.threads), "--repeats", str(args.repeats)]
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            runs[name].append(json.loads(out))
            print(f"round {round_ + 1}/{args.rounds} {name}: {runs[name][-1]}", flush=True)
    rows = {name: {key: statistics.median(r[key] for r in results) if results[0][key] is not None else None
                   for key in results[0]} for name, results in runs.items()}
    commit = head_commit()
    setup = {key: getattr(args, key) for key in ("kept", "rounds", "repeats", "prompt", "new_tokens", "batch", "threads",
                                                 "device", "models", "label")}
    out = Path(args.out)
    (out / f"{args.name}.json").write_text(json.dumps({"commit": commit, "setup": setup, "rows": rows, "runs": runs}, indent=1))
    render(rows, setup, commit, out, args.name)


def short_dir(item: str) -> str:
    """``NAME=…/stages/STAGE/all/KEY/model`` shortened to ``NAME=STAGE/KEY`` (the workspace's own path
    is the machine's)."""
    name, _, directory = item.partition("=")
    parts = Path(directory).parts
    return f"{name}={parts[-4]}/{parts[-2]}" if len(parts) >= 4 and parts[-3] == "all" else item


def render(rows: dict[str, dict], setup: dict, commit: str, out: Path, name: str = "inference") -> None:
    dense = rows["dense"]
    lines = [
        "# Inference: what compression buys", "",
        f"Generated by `python benchmarks/inference.py` at commit `{commit}`: {setup.get('label', DEFAULT_LABEL)}, "
        f"{setup['device']}, {setup['threads']} threads, batch {setup['batch']}; prefill = one forward over "
        f"{setup['prompt']} tokens, decode = greedy generation of {setup['new_tokens']} tokens with the KV cache after a "
        f"16-token prompt. Medians of {setup['repeats']} timings per process and over {setup['rounds']} rounds, models "
        "taking turns, each run a fresh process; "
        "ratios are to the dense model of the same rounds. " + (
            "Models: " + ", ".join(f"`{short_dir(m)}`" for m in setup["models"]) + "; weights MB counts parameters and buffers "
            "(packed codes)." if setup.get("models") else
            f"Compressed models at kept {' / '.join(map(str, setup['kept']))} of the block linears (`METHOD@KEPT`, "
            "the grid's rows)."), "",
        "| model | parameters | weights MB | peak RSS MB | prefill tok/s | ×dense | decode tok/s | ×dense | ms/token |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row, r in rows.items():
        lines.append(f"| {row} | {r['params'] / 1e6:.1f} M | {r['weights_mb']:.0f} | {r['peak_rss_mb']:.0f} | "
                     f"{r['prefill_tok_s']:.0f} | {r['prefill_tok_s'] / dense['prefill_tok_s']:.2f} | "
                     f"{r['decode_tok_s']:.1f} | {r['decode_tok_s'] / dense['decode_tok_s']:.2f} | {r['ms_per_token']:.1f} |")
    lines += ["", f"![throughput relative to dense]({name}.png)", ""]
    (out / f"{name}.md").write_text("\n".join(lines))
    print("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = list(rows)
    for i, key in enumerate(("prefill_tok_s", "decode_tok_s")):
        ax.bar([j + 0.4 * i for j in range(len(names))], [rows[n][key] / dense[key] for n in names], width=0.4,
               label=key.split("_")[0])
    ax.axhline(1.0, color="k", linestyle="--", linewidth=0.8)
    ax.set_xticks([j + 0.2 for j in range(len(names))], names, fontsize=7)
    ax.set(ylabel="throughput / dense", title=f"{setup.get('label', DEFAULT_LABEL)} ({setup['device']}, {setup['threads']} threads)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=100)


if __name__ == "__main__":
    main()
