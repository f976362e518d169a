"""GPTVQ speed: the k-means / sweep assignments in cache-sized chunks against one pass over all vectors.

``stagepipe.gptvq.assign`` computes each vector's distances to its codebook's K centroids; in one pass
the N × K distance matrix of every group (tens of MB) goes through memory four times per k-means
round. Chunks of ``ASSIGN_CHUNK_ELEMENTS`` keep it in cache. This script quantises random matrices of
the models' shapes with the bundled grids, the two variants alternating back to back in one process
(1 thread, so a second job on the machine slows both alike), checks they give the same codes and
codebooks bit for bit, and prints the median ratio. Writes ``docs/gptvq_speed.json``. With
``--device cuda`` the same on a GPU (the quantise stage runs its sweeps on the model's device):
each device's default chunk (``gptvq.chunk_elements_for``) against one pass.

    python benchmarks/gptvq_assign.py [--repeats 2] [--device cuda --out gptvq_speed_cuda.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from stagepipe import gptvq

ROOT = Path(__file__).resolve().parent.parent
#: (label, matrix shape, grid): memory_grid.py's rows on a matrix of each model's shape
CASES = [
    ("SmolLM2 576×576, 4-D 2-bit, 36,864 per codebook", (576, 576),
     gptvq.VQGrid(dim=4, bits_per_dim=2, group_columns=192, group_weights=36864)),
    ("SmolLM2 576×576, 2-D 3-bit, 6,144 per codebook", (576, 576),
     gptvq.VQGrid(dim=2, bits_per_dim=3, group_columns=192, group_weights=6144)),
    ("Gemma-3 1024×640, 2-D 3-bit, 8,192 per codebook", (1024, 640),
     gptvq.VQGrid(dim=2, bits_per_dim=3, group_columns=128, group_weights=8192)),
]
ONE_PASS = 1 << 62


def problem(shape: tuple[int, int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A random weight and a correlated input Gram (as tests/test_gptvq.py builds them)."""
    m, n = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, n, generator=g, dtype=torch.float64) @ torch.randn(n, 4 * n, generator=g, dtype=torch.float64)
    return torch.randn(m, n, generator=g, dtype=torch.float64), x @ x.T / (4 * n)


def timed(w: torch.Tensor, h: torch.Tensor, grid: gptvq.VQGrid, chunk: int) -> tuple[float, gptvq.VectorQuantized]:
    name = "ASSIGN_CHUNK_ELEMENTS" if w.device.type == "cpu" else "DEVICE_CHUNK_ELEMENTS"
    saved = getattr(gptvq, name)
    setattr(gptvq, name, chunk)
    try:
        start = time.perf_counter()
        result = gptvq.gptvq(w, h, grid)
        if w.is_cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start, result
    finally:
        setattr(gptvq, name, saved)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "docs" / "gptvq_speed.json"))
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the GPU's first run of a case warms it up)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for label, shape, grid in CASES:
        w, h = (t.to(args.device) for t in problem(shape))
        if w.is_cuda:
            timed(w, h, grid, ONE_PASS)  # kernels loaded, allocator warm: not timed
        one_pass, chunked = [], []
        chunk = gptvq.chunk_elements_for(w.device)  # the default the quantiser uses on this device
        for _ in range(args.repeats):
            t_one, a = timed(w, h, grid, ONE_PASS)
            t_chunk, b = timed(w, h, grid, chunk)
            one_pass.append(t_one)
            chunked.append(t_chunk)
            same = all(torch.equal(x, y) for x, y in ((a.codes, b.codes), (a.codebooks, b.codebooks), (a.scales, b.scales)))
            if not same:
                raise SystemExit(f"{label}: chunked assignment changed the result")
        rows.append({"case": label, "one_pass_s": statistics.median(one_pass), "chunked_s": statistics.median(chunked),
                     "ratio": statistics.median(c / o for c, o in zip(chunked, one_pass, strict=True)), "identical": True,
                     "repeats": args.repeats})
    print("| case | one pass s | chunked s | chunked / one pass | identical |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['one_pass_s']:.1f} | {r['chunked_s']:.1f} | ×{r['ratio']:.2f} | {r['identical']} |")
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    Path(args.out).write_text(json.dumps({"threads": 1, "device": device,
                                          "chunk_elements": gptvq.chunk_elements_for(torch.device(args.device)),
                                          "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
