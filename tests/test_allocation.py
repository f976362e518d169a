"""Allocation policies: achieved kept fraction within one alignment step; greedy follows the spectra."""

from __future__ import annotations

import torch

from stagepipe.accounting import factored_params
from stagepipe.allocation import POLICIES, MatrixSpectrum


def spectra() -> list[MatrixSpectrum]:
    out = []
    for i, (m, n) in enumerate([(64, 64), (32, 64), (128, 64), (64, 128)] * 3):
        decay = torch.logspace(0, -(1 + i % 4), min(m, n), dtype=torch.float64)
        out.append(MatrixSpectrum(f"model.layers.{i // 4}.lin{i % 4}", m, n, decay))
    return out


def kept(ranks, specs) -> float:
    return sum(factored_params(s.m, s.n, ranks[s.name]) for s in specs) / sum(s.m * s.n for s in specs)


def test_policies_meet_target_within_one_step() -> None:
    specs = spectra()
    total = sum(s.m * s.n for s in specs)
    # uniform rounds every matrix down by < one alignment step; greedy misses by < one step overall
    per_matrix = sum(8 * (s.m + s.n) for s in specs) / total
    steps = {"uniform": per_matrix, "svdllm_v2": per_matrix, "last_k": per_matrix,
             "global_greedy": max(8 * (s.m + s.n) for s in specs) / total}
    for name, policy in POLICIES.items():
        for target in (0.4, 0.6, 0.8):
            ranks = policy(8).allocate(specs, target)
            assert all(r is None or r % 8 == 0 for r in ranks.values()), name
            assert abs(target - kept(ranks, specs)) <= steps[name], (name, target, kept(ranks, specs))
            if name != "svdllm_v2":  # v2 may keep a little more where a share is capped at 100 %
                assert kept(ranks, specs) <= target + 1e-9


def test_greedy_gives_more_rank_to_slow_decaying_spectra() -> None:
    flat = MatrixSpectrum("model.layers.0.flat", 64, 64, torch.ones(64, dtype=torch.float64))
    steep = MatrixSpectrum("model.layers.0.steep", 64, 64, torch.logspace(0, -6, 64, dtype=torch.float64))
    ranks = POLICIES["global_greedy"](8).allocate([flat, steep], 0.5)
    assert ranks["model.layers.0.flat"] > ranks["model.layers.0.steep"]


def test_last_k_leaves_first_blocks_dense() -> None:
    specs = spectra()  # 3 blocks
    ranks = POLICIES["last_k"](8).allocate(specs, 0.8)
    dense_blocks = {int(n.split(".")[2]) for n, r in ranks.items() if r is None}
    compressed = {int(n.split(".")[2]) for n, r in ranks.items() if r is not None}
    assert dense_blocks and compressed and max(dense_blocks) < min(compressed)
    from stagepipe.allocation.last_k import LastK

    given = LastK(8, last_k=3).allocate(specs, 0.8)
    assert all(r is not None for r in given.values())


def test_svdllm_v2_is_scale_invariant_and_favours_lossy_matrices() -> None:
    specs = spectra()
    scaled = [MatrixSpectrum(s.name, s.m, s.n, s.sigma * 1e4) for s in specs]
    policy = POLICIES["svdllm_v2"](8)
    assert policy.allocate(specs, 0.6) == policy.allocate(scaled, 0.6)
    flat = MatrixSpectrum("model.layers.0.mlp.x", 64, 64, torch.ones(64, dtype=torch.float64))
    steep = MatrixSpectrum("model.layers.1.mlp.x", 64, 64, torch.logspace(0, -6, 64, dtype=torch.float64))
    ranks = policy.allocate([flat, steep], 0.5)
    assert ranks["model.layers.0.mlp.x"] > ranks["model.layers.1.mlp.x"]
