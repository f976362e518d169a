"""Allocation policies against independently computed ranks and budget properties."""

from __future__ import annotations

import math

import torch

from stagepipe.accounting import factored_params, max_useful_rank, rank_for_fraction
from stagepipe.allocation import POLICIES, MatrixSpectrum
from stagepipe.allocation.asvd_search import ASVDSearch


def spectra() -> list[MatrixSpectrum]:
    """3 blocks × 4 matrix types; members of a type have the same shape but differently decaying
    spectra (decay depends on the block), so type-wise policies have something to tell apart."""
    out = []
    for i, (m, n) in enumerate([(64, 64), (32, 64), (128, 64), (64, 128)] * 3):
        block, kind = divmod(i, 4)
        decay = torch.logspace(0, -(0.5 + 1.5 * block + 0.3 * kind), min(m, n), dtype=torch.float64)
        out.append(MatrixSpectrum(f"model.layers.{block}.lin{kind}", m, n, decay))
    return out


def kept(ranks, specs) -> float:
    return sum(factored_params(s.m, s.n, ranks[s.name]) for s in specs) / sum(s.m * s.n for s in specs)


def _assert_budget_spent(ranks, specs, target, align=8) -> None:
    """Never above the target, and one more aligned step of any factored matrix would exceed it."""
    total = sum(s.m * s.n for s in specs)
    spent = kept(ranks, specs) * total
    assert spent <= target * total + 1e-9
    for s in specs:
        rank = ranks[s.name]
        assert rank is None or (rank % align == 0 and align <= rank <= max_useful_rank(s.m, s.n, align))
        if rank is not None and rank + align <= max_useful_rank(s.m, s.n, align):
            assert spent + align * (s.m + s.n) > target * total, (s.name, rank, target)


def test_every_policy_spends_the_budget() -> None:
    specs = spectra()
    table = sensitivity_table(specs)
    for cls in POLICIES.values():
        if cls.allocates_bits:  # a byte budget, spent as tests/test_rank_bits.py checks
            continue
        policy = ASVDSearch(8, table) if cls.needs_sensitivity else cls(8)
        for target in (0.4, 0.6, 0.8):
            _assert_budget_spent(policy.allocate(specs, target), specs, target)


def test_uniform_starts_from_the_aligned_floor_and_buys_the_most_energy_per_parameter() -> None:
    specs = spectra()
    for target in (0.4, 0.6, 0.8):
        floor = {s.name: (int(target * s.m * s.n / (s.m + s.n)) // 8) * 8 for s in specs}
        assert POLICIES["uniform"](8).propose(specs, target) == floor
        ranks = POLICIES["uniform"](8).allocate(specs, target)
        bought = {n for n in ranks if ranks[n] != floor[n]}
        assert bought and all(ranks[n] - floor[n] >= 8 for n in bought)
        assert kept(ranks, specs) > kept(floor, specs)


def test_spend_budget_takes_back_the_cheapest_steps_when_a_policy_overshoots() -> None:
    from stagepipe.allocation.base import spend_budget

    specs = spectra()
    full = {s.name: max_useful_rank(s.m, s.n, 8) for s in specs}
    ranks = spend_budget(full, specs, 0.6, 8)
    _assert_budget_spent(ranks, specs, 0.6)
    cut = {s.name: (full[s.name] - ranks[s.name]) // 8 for s in specs}
    # the slow-decaying (lossy to cut) block 0 gives up fewer steps than the steep block 2
    assert sum(v for n, v in cut.items() if ".layers.0." in n) < sum(v for n, v in cut.items() if ".layers.2." in n)


def test_greedy_spends_the_budget_so_that_no_further_step_fits() -> None:
    specs = spectra()
    total = sum(s.m * s.n for s in specs)
    for target in (0.4, 0.6, 0.8):
        ranks = POLICIES["global_greedy"](8).allocate(specs, target)
        spent = kept(ranks, specs) * total
        assert spent <= target * total + 1e-9 and all(r is None or r % 8 == 0 for r in ranks.values())
        for s in specs:  # one more aligned step on any matrix (or turning it dense) would exceed the budget
            rank = ranks[s.name]
            if rank is None:
                continue
            step = min(8 * (s.m + s.n), s.m * s.n - rank * (s.m + s.n)) if rank + 8 <= max_useful_rank(s.m, s.n, 8) \
                else s.m * s.n - rank * (s.m + s.n)
            assert spent + step > target * total, (s.name, target)
        assert target - kept(ranks, specs) < max(8 * (s.m + s.n) for s in specs) / total


def test_greedy_gives_more_rank_to_slow_decaying_spectra() -> None:
    flat = MatrixSpectrum("model.layers.0.flat", 64, 64, torch.ones(64, dtype=torch.float64))
    steep = MatrixSpectrum("model.layers.0.steep", 64, 64, torch.logspace(0, -6, 64, dtype=torch.float64))
    ranks = POLICIES["global_greedy"](8).allocate([flat, steep], 0.5)
    assert ranks["model.layers.0.flat"] > ranks["model.layers.0.steep"]


def test_last_k_compresses_only_the_last_blocks_to_the_target() -> None:
    specs = spectra()  # 3 blocks
    total = sum(s.m * s.n for s in specs)
    ranks = POLICIES["last_k"](8).allocate(specs, 0.8)
    dense_blocks = {int(n.split(".")[2]) for n, r in ranks.items() if r is None}
    compressed = {int(n.split(".")[2]) for n, r in ranks.items() if r is not None}
    assert dense_blocks == {0, 1} and compressed == {2}  # the smallest k: ρ_l = 1 − 0.2·3 = 0.4 ≥ min_kept 0.1
    from stagepipe.allocation.last_k import LastK

    part = sum(s.m * s.n for s in specs if s.name.startswith("model.layers.2."))
    inner = 1 - 0.2 * total / part  # (1 − ρ_l) · P_last = (1 − ρ) · P_all
    proposed = POLICIES["last_k"](8).propose(specs, 0.8)
    assert all(r == (int(inner * s.m * s.n / (s.m + s.n)) // 8) * 8 for s in specs for r in [proposed[s.name]] if r)
    assert {n for n, r in ranks.items() if r is None} == {n for n, r in proposed.items() if r is None}  # dense stays dense
    given = LastK(8, last_k=3).allocate(specs, 0.8)
    assert given == POLICIES["uniform"](8).allocate(specs, 0.8)  # all blocks: uniform at the target


def _v2_scores(specs, target, paper: bool) -> dict[str, float]:
    """Per-matrix loss at the uniform rank and the group score: ours, or the paper's 1/log(L)."""
    losses = {s.name: math.sqrt(float((s.sigma[rank_for_fraction(s.m, s.n, target, 8):] ** 2).sum())) for s in specs}
    scores = {}
    for kind in {s.name.rsplit(".", 1)[1] for s in specs}:
        members = [s.name for s in specs if s.name.endswith(kind)]
        mean = sum(losses[n] for n in members) / len(members)
        scores.update({n: 1 / math.log(losses[n]) if paper else 1 / math.log(math.e + losses[n] / mean) for n in members})
    return scores


def test_svdllm_v2_is_scale_invariant_where_the_papers_score_is_not() -> None:
    specs = spectra()
    scaled = [MatrixSpectrum(s.name, s.m, s.n, s.sigma * 1e4) for s in specs]
    policy = POLICIES["svdllm_v2"](8)
    ranks = policy.allocate(specs, 0.6)
    assert ranks == policy.allocate(scaled, 0.6)
    assert ranks != POLICIES["uniform"](8).allocate(specs, 0.6)  # the groups are heterogeneous
    # the paper's 1/log(L) ranks the same matrices differently once the losses are rescaled (sign flip at L = 1)
    paper, paper_scaled = _v2_scores(specs, 0.6, True), _v2_scores(scaled, 0.6, True)
    assert any((paper[a] > paper[b]) != (paper_scaled[a] > paper_scaled[b]) for a in paper for b in paper
               if a.rsplit(".", 1)[1] == b.rsplit(".", 1)[1])


def test_svdllm_v2_on_a_hand_worked_example() -> None:
    """An independent reference, worked by hand. Two 20×20 ``q_proj`` (break-even rank 10), kept 0.5,
    align 1: the uniform rank is 5, so 15 components are dropped. Matrix A has σ = 1 (loss
    L_A = √15), B has σ = 2 (L_B = 2√15); the group mean is 1.5√15. Scores 1/ln(e + L/mean):
    A: 1/ln(e + 2/3) = 1/ln 3.38495 = 0.82011, B: 1/ln(e + 4/3) = 1/ln 4.05161 = 0.71474, sum
    1.53485. Removed shares |G|·R·score/Σ: A 2·0.5·0.82011/1.53485 = 0.53432, B 0.46568; kept
    0.46568 → ⌊4.66⌋ = rank 4 for A, 0.53432 → ⌊5.34⌋ = 5 for B: the lossier matrix keeps more.
    Spending the budget (400 parameters, 360 used): one more component of B (σ² = 4 per 40
    parameters) beats one of A (σ² = 1): B goes to 6, and 400 are used."""
    policy = POLICIES["svdllm_v2"](1)
    a = MatrixSpectrum("model.layers.0.self_attn.q_proj", 20, 20, torch.ones(20, dtype=torch.float64))
    b = MatrixSpectrum("model.layers.1.self_attn.q_proj", 20, 20, 2 * torch.ones(20, dtype=torch.float64))
    assert policy.propose([a, b], 0.5) == {a.name: 4, b.name: 5}
    assert policy.allocate([a, b], 0.5) == {a.name: 4, b.name: 6}


def test_svdllm_v2_keeps_more_of_the_lossier_matrix() -> None:
    policy = POLICIES["svdllm_v2"](8)
    flat = MatrixSpectrum("model.layers.0.mlp.x", 64, 64, torch.ones(64, dtype=torch.float64))
    steep = MatrixSpectrum("model.layers.1.mlp.x", 64, 64, torch.logspace(0, -6, 64, dtype=torch.float64))
    ranks = policy.allocate([flat, steep], 0.5)
    assert ranks["model.layers.0.mlp.x"] > ranks["model.layers.1.mlp.x"]


def sensitivity_table(specs, candidates=(0.4, 0.5, 0.6, 0.7, 0.8, 0.9), align=8):
    """A made-up table: harm grows as ρ falls, more for some matrices than for others."""
    from stagepipe.accounting import rank_for_fraction
    from stagepipe.allocation import Candidate

    table = []
    for i, s in enumerate(specs):
        for rho in candidates:
            rank = rank_for_fraction(s.m, s.n, rho, align)
            if rank is not None:
                table.append(Candidate(s.name, rho, rank, 10.0 + (1 + i % 5) * (1 - rho) ** 2 + 0.001 * i))
    return table


def test_asvd_search_meets_target_with_the_fewest_harmful_truncations() -> None:
    from stagepipe.allocation.asvd_search import ASVDSearch

    specs = spectra()
    table = sensitivity_table(specs)
    for target in (0.5, 0.6, 0.75, 0.9):
        policy = ASVDSearch(8, table)
        ranks = policy.allocate(specs, target)
        achieved = kept(ranks, specs)
        assert achieved <= target + 1e-12
        # brute force over every threshold: the search returns the largest feasible one
        feasible = [t for t in range(len(table) + 1) if kept(policy.ranks_at(t, specs), specs) <= target]
        assert policy.threshold == max(feasible)
        # one more harmful pair left out would miss the target: within one (matrix, ρ) step of it
        assert kept(policy.ranks_at(policy.threshold + 1, specs), specs) > target
        # every truncation used is no more harmful than any allowed-but-unused harsher option is ranked
        allowed = policy.pairs[policy.threshold:]
        assert all(ranks[c.matrix] is not None and ranks[c.matrix] <= c.rank for c in allowed)


def test_asvd_search_spares_the_sensitive_matrix_and_refuses_an_unreachable_target() -> None:
    import pytest

    from stagepipe.allocation.asvd_search import ASVDSearch, Candidate
    from stagepipe.errors import StagepipeError

    a = MatrixSpectrum("model.layers.0.a", 64, 64, torch.ones(64, dtype=torch.float64))
    b = MatrixSpectrum("model.layers.0.b", 64, 64, torch.ones(64, dtype=torch.float64))
    table = [Candidate(a.name, 0.5, 16, 50.0), Candidate(a.name, 0.9, 24, 20.0),
             Candidate(b.name, 0.5, 16, 11.0), Candidate(b.name, 0.9, 24, 10.5)]
    ranks = ASVDSearch(8, table).allocate([a, b], 0.75)
    assert ranks == {a.name: None, b.name: 16}  # the sensitive matrix stays dense; b carries the cut
    with pytest.raises(StagepipeError, match="out of reach"):
        ASVDSearch(8, table).allocate([a, b], 0.3)
