"""Per-layer output distortion of compressed models against the dense model.

For grid points of ``benchmarks/quality.py`` (``METHOD[:POLICY]`` at a kept fraction, same
workspace; whatever is missing is run first), loads the assembled low-rank model and the dense snapshot with
``from_pretrained`` and runs the calibration windows through both. Per decoder block it reports the
relative error of the block's output, ``Σ‖h_c − h_d‖² / Σ‖h_d‖²`` (float64 sums over every token),
where ``h_c`` is the compressed model's block output on its own (propagated) inputs — the error a
layer-wise method accumulates. Prints a table, writes JSON.

    python benchmarks/distortion.py --methods svdllm kfac_svd:global_greedy aasvd aasvd+refine --fractions 0.6
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import yaml
from provenance import head_commit
from quality import ROOT, grid_config  # benchmarks/quality.py (this directory)
from transformers import AutoModelForCausalLM

from stagepipe.engine.stage import ALL, PartitionRef
from stagepipe.models.layout import layout_for
from stagepipe.stagekit import artifacts
from stagepipe.stagekit.artifacts import CALIBRATION
from stagepipe.stages import make_runner


def block_outputs(model: torch.nn.Module, ids: torch.Tensor, batch: int):
    """Yield, per batch of windows, the list of every decoder block's output (float32)."""
    layers = model.get_submodule(layout_for(model.config.model_type.removeprefix("lowrank_")).layers_path)
    seen: dict[int, torch.Tensor] = {}
    hooks = [layer.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out[0] if isinstance(out, tuple) else out))
             for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            for start in range(0, len(ids), batch):
                model(input_ids=ids[start : start + batch], use_cache=False)
                yield [seen[i].float() for i in range(len(layers))]
    finally:
        for hook in hooks:
            hook.remove()


def distortion(config, workspace: Path, batch: int) -> list[float]:
    runner = make_runner(config, workspace)
    runner.run()  # a no-op for a point quality.py ran, but for a deleted (recomputable) assemble output
    states = {e.ref: e for e in runner.states()}
    ids = artifacts.read_windows(states[PartitionRef("tokenize", CALIBRATION)].state.output)
    dense = AutoModelForCausalLM.from_pretrained(artifacts.model_dir(states[PartitionRef("snapshot", ALL)].state.output),
                                                 dtype=torch.float32)
    low = AutoModelForCausalLM.from_pretrained(artifacts.model_dir(states[PartitionRef("assemble", ALL)].state.output),
                                               trust_remote_code=True, dtype=torch.float32)
    errors = norms = None
    for d, c in zip(block_outputs(dense, ids, batch), block_outputs(low, ids, batch), strict=True):
        err = [float(((a - b).double() ** 2).sum()) for a, b in zip(c, d, strict=True)]
        norm = [float((b.double() ** 2).sum()) for b in d]
        errors = err if errors is None else [x + y for x, y in zip(errors, err, strict=True)]
        norms = norm if norms is None else [x + y for x, y in zip(norms, norm, strict=True)]
    return [e / n for e, n in zip(errors, norms, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=str(ROOT / "pipelines" / "smollm2_demo.yaml"))
    parser.add_argument("--methods", nargs="+", metavar="METHOD[:POLICY]", required=True)
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.6])
    parser.add_argument("--workspace", default=str(ROOT / "workspace" / "quality_grid"))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--out", default=str(ROOT / "docs" / "distortion.json"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    base = yaml.safe_load(Path(args.base).read_text())
    rows = {f"{m}@{k}": distortion(grid_config(base, m, k), Path(args.workspace), args.batch)
            for k in args.fractions for m in args.methods}
    commit = head_commit()
    Path(args.out).write_text(json.dumps({"commit": commit, "base": Path(args.base).name, "measure":
                                          "sum ||h_c - h_d||^2 / sum ||h_d||^2 per block output, calibration windows",
                                          "rows": rows}, indent=1))
    layers = len(next(iter(rows.values())))
    shown = sorted({0, layers // 4, layers // 2, 3 * layers // 4, layers - 2, layers - 1})
    print("| point | " + " | ".join(f"block {i}" for i in shown) + " |")
    print("|---|" + "---|" * len(shown))
    for name, values in rows.items():
        print(f"| {name} | " + " | ".join(f"{values[i]:.4f}" for i in shown) + " |")


if __name__ == "__main__":
    main()
