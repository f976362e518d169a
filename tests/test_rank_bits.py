"""The ``rank_bits`` policy (issue #33 item 3): ranks and bit widths per matrix by one predicted loss
under a byte budget — against brute force over every combination of options on three matrices, the
budget kept and spent, and through the real pipeline on the tiny model (per-matrix widths stored,
accounted and reloaded)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from stagepipe.accounting import factor_grid_memory_report
from stagepipe.allocation.base import MatrixSpectrum
from stagepipe.allocation.rank_bits import RankBits
from stagepipe.cli import main
from stagepipe.config import load_pipeline, parse_pipeline
from stagepipe.errors import ConfigError
from stagepipe.methods.base import FactorGridOptions
from stagepipe.models.layout import block_linear_shapes
from stagepipe.quantize import Grid
from stagepipe.stagekit import artifacts
from tests.conftest import TINY, finished_outputs, merge

SHAPES = [(64, 48), (96, 32), (64, 64)]
BUDGETS = [1.5, 2, 2.5, 3, 3.5, 4, 5, 6, 7]


def spectra() -> list[MatrixSpectrum]:
    g = torch.Generator().manual_seed(0)
    errors = {2: (0.12, 0.10), 4: (0.01, 0.008), 8: (4e-5, 3e-5)}
    out = []
    for i, (m, n) in enumerate(SHAPES):
        k = min(m, n)
        sigma = torch.sort(torch.rand(k, generator=g, dtype=torch.float64) * torch.logspace(0, -2, k, dtype=torch.float64),
                           descending=True).values
        own = {b: (f * (1 + 0.3 * i), d * (1 + 0.2 * i)) for b, (f, d) in errors.items()}
        out.append(MatrixSpectrum(f"model.layers.{i}.x", m, n, sigma, stored_rank=k, grid_errors=own))
    return out


def test_the_choice_fits_the_budget_spends_it_and_is_near_the_brute_force_optimum() -> None:
    """Every combination of every matrix's options (rank × width, or dense × width) enumerated: the
    policy's choice never exceeds the budget, no single upgrade that still fits would lower its loss,
    its loss is the optimum at most budgets (the Lagrangian's hull vertices) and within 20 % at all."""
    policy, items = RankBits(4, [2, 4, 8], True), spectra()
    tables = [policy.options(s, 16) for s in items]
    weights = sum(m * n for m, n in SHAPES)
    exact = 0
    for bpw in BUDGETS:
        budget = bpw * weights / 8
        best = min(sum(float(t[1][i]) for t, i in zip(tables, c, strict=True))
                   for c in itertools.product(*[range(len(t[0])) for t in tables])
                   if sum(float(t[2][i]) for t, i in zip(tables, c, strict=True)) <= budget)
        ranks, bits = policy.allocate_with_bits(items, bpw, 16)
        pick = [t[0].index((ranks[s.name], bits[s.name])) for s, t in zip(items, tables, strict=True)]
        spent = sum(float(t[2][i]) for t, i in zip(tables, pick, strict=True))
        loss = sum(float(t[1][i]) for t, i in zip(tables, pick, strict=True))
        assert spent <= budget and spent == policy.details()["stored_bytes"]
        assert loss == pytest.approx(policy.details()["predicted_loss"])
        for j, (_, option_loss, size) in enumerate(tables):  # spent: no upgrade that fits would help
            fits = size - size[pick[j]] <= budget - spent
            assert float(option_loss[fits].min()) >= float(option_loss[pick[j]]) - 1e-12
        assert loss <= 1.2 * best
        exact += loss == pytest.approx(best, rel=1e-12)
    assert exact >= 6, exact


def test_loss_and_bytes_of_an_option_follow_the_model() -> None:
    """loss(r, b) = dropped σ² + ε_f(b)·kept σ²; loss(dense, b) = ε_d(b)·Σσ²; bytes = the grid's stored bytes."""
    policy, (s, *_) = RankBits(4, [2, 4, 8], True), spectra()
    choices, loss, size = policy.options(s, 16)
    energy = s.sigma ** 2
    r, b = choices[3]
    assert (r, b) == (16, 2)
    assert float(loss[3]) == pytest.approx(float(energy[16:].sum() + s.grid_errors[2][0] * energy[:16].sum()))
    assert float(size[3]) == factor_grid_memory_report({"x": (s.m, s.n)}, {"x": 16}, Grid(2, 16, symmetric=True), None).stored_bytes
    dense = choices.index((None, 8))
    assert float(loss[dense]) == pytest.approx(s.grid_errors[8][1] * float(energy.sum()))
    _, scaled, same_size = RankBits(4, [2, 4, 8], True, truncation_scale=5.0).options(s, 16)  # κ weighs the tail only
    assert float(scaled[3]) == pytest.approx(float(5 * energy[16:].sum() + s.grid_errors[2][0] * energy[:16].sum()))
    assert float(scaled[dense]) == float(loss[dense]) and torch.equal(same_size, size)


def test_a_budget_below_the_least_storable_is_one_line() -> None:
    with pytest.raises(Exception, match="target.bits_per_weight: 0.5 is below the least rank_bits can store"):
        RankBits(4, [2, 4], True).allocate_with_bits(spectra(), 0.5, 16)


def pipeline(tmp: Path, name: str, bits_per_weight: float, **options) -> Path:
    data = merge(TINY, {"name": name, "allocation": {"policy": "rank_bits", "align": 4, "bits": [2, 3, 4, 8]},
                        "method": {"name": "svdllm", "quantize_factors": {"group_size": 16, **options}}})
    data["target"] = {"bits_per_weight": bits_per_weight}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.parametrize("change, message", [
    ({"target": {"kept_fraction": 0.8}}, "target.bits_per_weight"),
    ({"method": {"name": "svdllm"}}, "set method.quantize_factors"),
    ({"method": {"name": "svdllm", "quantize_factors": {"bits": 4}}}, "method.quantize_factors.bits"),
])
def test_a_pipeline_it_cannot_serve_is_refused_in_one_line(tmp_path: Path, change: dict, message: str) -> None:
    data = yaml.safe_load(pipeline(tmp_path, "bad", 5.0).read_text())
    data.update(change)
    with pytest.raises(ConfigError, match=message):
        parse_pipeline(data, "bad.yaml", tmp_path)


@pytest.mark.parametrize("method", ["svdllm", "kfac_svd"])  # Grams from capture; from fisher
def test_through_the_pipeline_each_matrix_is_stored_at_its_width_within_the_budget(tmp_path: Path, method: str) -> None:
    from transformers import AutoConfig

    from stagepipe.models.sources import load_checked

    path = pipeline(tmp_path, "rank_bits", 4.5)
    path.write_text(path.read_text().replace("name: svdllm", f"name: {method}"))
    result = CliRunner().invoke(main, ["run", str(path), "-w", str(tmp_path / "ws")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    outputs = finished_outputs(tmp_path / "ws")
    ranks, bits = artifacts.read_ranks(outputs["allocate@all"]), artifacts.read_bits(outputs["allocate@all"])
    assert set(bits) == set(ranks) and len(set(bits.values())) > 1  # widths differ between matrices
    shapes = block_linear_shapes(AutoConfig.from_pretrained(outputs["snapshot@all"] / "model"))
    accounted = factor_grid_memory_report(shapes, ranks, Grid(4, 16, symmetric=True), None, bits)
    report = json.loads((outputs["report@all"] / "report.json").read_text())
    assert report["ratios"]["memory"]["stored_bytes"] == accounted.stored_bytes
    assert accounted.bits_per_weight <= 4.5
    assert json.loads((outputs["allocate@all"] / artifacts.ALLOCATION).read_text())["search"]["stored_bytes"] == accounted.stored_bytes
    model = load_checked(outputs["assemble@all"] / "model")  # zero missing keys: every width as allocated
    for name, width in bits.items():
        module = model.get_submodule(name)
        assert (module.bits if ranks[name] is None else module.down.bits) == width, name
    assert load_pipeline(path).allocation.policy == "rank_bits"
    if method == "kfac_svd":  # the measured errors are in the spectra's currency: brute force, both K-FAC factors
        _dense_error_is_the_kfac_loss(outputs)


def _dense_error_is_the_kfac_loss(outputs: dict) -> None:
    """``ε_d(b)`` of layer 0's q_proj = ``tr(G E A Eᵀ) / tr(G W A Wᵀ)`` with ``E`` the matrix's own GPTQ
    error at ``b`` bits, ``G = E[δδᵀ]`` and ``A`` the input Gram as the fisher stage stored them — not
    ``tr(E A Eᵀ) / tr(W A Wᵀ)``, which ignores where the loss is sensitive on the output side (that one is
    ``error_metric: input_gram``'s, measured from the same quantised weights)."""
    from stagepipe.models.blocks import BlockRunner
    from stagepipe.models.layout import block_linears, weight_matrix

    _, measured = artifacts.read_grid_errors(outputs["grid_errors@layer-000"], "method")["self_attn.q_proj"]
    _, under_h = artifacts.read_grid_errors(outputs["grid_errors@layer-000"], "input_gram")["self_attn.q_proj"]
    stats = artifacts.read_layer_stats(None, outputs["fisher@layer-000"])
    w = weight_matrix(block_linears(BlockRunner(outputs["snapshot@all"] / "model", torch.device("cpu"), torch.float32)
                                    .load_block(0), None)["self_attn.q_proj"]).detach().double()
    g, a = stats.fisher["self_attn.q_proj"]["kfac_out"].double(), stats.gram["self_attn.q_proj"].double()
    options = FactorGridOptions(group_size=16)  # the test pipeline's quantize_factors
    for width, (_, dense) in measured.items():
        e = options.quantize(w, a, width).weight - w
        exact = float(torch.trace(g @ e @ a @ e.T) / torch.trace(g @ w @ a @ w.T))
        input_only = float(torch.trace(e @ a @ e.T) / torch.trace(w @ a @ w.T))
        assert dense == pytest.approx(exact, rel=1e-3), width  # the metrics' eigenvalue floor (1e-6) moves it 2e-5
        assert under_h[width][1] == pytest.approx(input_only, rel=1e-9)  # error_metric: input_gram
        assert abs(exact - input_only) > 1e-3 * exact  # the test can tell the two apart


def test_a_method_without_input_grams_is_refused_before_anything_runs(tmp_path: Path) -> None:
    data = yaml.safe_load(pipeline(tmp_path, "no_gram", 5.0).read_text())
    data["method"]["name"] = "svd"
    path = tmp_path / "no_gram.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    result = CliRunner().invoke(main, ["run", str(path), "-w", str(tmp_path / "ws")])
    assert result.exit_code != 0 and "measures each matrix's quantisation error under its input Gram" in result.output
    assert not (tmp_path / "ws" / "stages").exists()


def test_a_budget_nothing_spends_is_refused(tmp_path: Path) -> None:
    """bits_per_weight on a low-rank method under a parameter policy would be ignored: one error line."""
    data = merge(TINY, {"name": "unspent", "allocation": {"policy": "global_greedy", "align": 4}})
    data["target"] = {"kept_fraction": 0.8, "bits_per_weight": 4.0}
    with pytest.raises(ConfigError, match="target.bits_per_weight: svdllm with policy global_greedy spends "
                                          "target.kept_fraction, not bits_per_weight"):
        parse_pipeline(data, "unspent.yaml", tmp_path)
