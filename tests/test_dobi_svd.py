"""Dobi-SVD (``methods/dobi_svd.py``, ``models/truncation.py``, the ``train`` stage's DobiTrainer):
the mask and its gradient, the stabilised SVD backward against finite differences (separated and
degenerate spectra), the budget projection and rounding, the weight update against an explicit
activation PCA, "keep all" = dense, and the pipeline on the tiny model (ranks learned, budget spent,
SIGKILL mid-training resumes to identical ranks, HF reload)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from stagepipe.accounting import max_stored_rank, memory_report, rank_cost
from stagepipe.config import load_pipeline
from stagepipe.engine.stage import ALL, PartitionRef
from stagepipe.linalg import MetricCache, weighted_svd
from stagepipe.methods.dobi_svd import project_to_budget, round_to_budget
from stagepipe.models.modeling_lowrank import RemappedLinear, remap_factors
from stagepipe.models.truncation import TruncatedLinear, stable_svd, truncation_mask
from stagepipe.stagekit import artifacts
from stagepipe.stages import make_runner
from tests.conftest import learned_pipeline, learned_run, train_killed_and_resumed

DOBI = {"name": "dobi_svd", "epochs": 2, "lr": 0.05, "checkpoint_every": 2}


def dobi_pipeline(tmp: Path, name: str, kept: float) -> Path:
    return learned_pipeline(tmp, name, kept, DOBI)


def outputs(pipeline: Path, ws: Path) -> dict[PartitionRef, Path]:
    return {e.ref: e.state.output for e in make_runner(load_pipeline(pipeline), ws).states()}


def _matrix(singular_values: list[float], rows: int = 8) -> torch.Tensor:
    torch.manual_seed(0)
    cols = len(singular_values)
    u, _ = torch.linalg.qr(torch.randn(rows, cols, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, cols, dtype=torch.float64))
    return u @ torch.diag(torch.tensor(singular_values, dtype=torch.float64)) @ v.T


def _truncated_loss(a: torch.Tensor, svd, weights: torch.Tensor) -> torch.Tensor:
    u, s, v = svd(a)
    mask = truncation_mask(torch.tensor(3.5, dtype=torch.float64), len(s), 10.0)
    return (weights * ((u * (s * mask)) @ v.T)).sum()


def _autograd_svd(a: torch.Tensor):
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    return u, s, vh.T


def _gradients(a: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ours, autograd's, central finite differences) of the truncated product's loss."""
    x = a.clone().requires_grad_(True)
    (ours,) = torch.autograd.grad(_truncated_loss(x, stable_svd, weights), x)
    y = a.clone().requires_grad_(True)
    (native,) = torch.autograd.grad(_truncated_loss(y, _autograd_svd, weights), y)
    fd = torch.zeros_like(a)
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            step = torch.zeros_like(a)
            step[i, j] = 1e-6
            fd[i, j] = (_truncated_loss(a + step, _autograd_svd, weights) - _truncated_loss(a - step, _autograd_svd, weights)) / 2e-6
    return ours, native, fd


def test_mask_and_its_gradient() -> None:
    gamma = torch.tensor(2.3, dtype=torch.float64, requires_grad=True)
    mask = truncation_mask(gamma, 5, beta=10.0)
    assert mask[:2].tolist() == pytest.approx([1.0, 1.0], abs=1e-5) and mask[3:].tolist() == pytest.approx([0, 0], abs=1e-5)
    assert mask[2].item() == pytest.approx(0.5 * torch.tanh(torch.tensor(3.0)).item() + 0.5)
    (grad,) = torch.autograd.grad(mask.sum(), gamma)
    expected = sum(5.0 * (1 - torch.tanh(torch.tensor(10.0 * (2.3 - i), dtype=torch.float64)) ** 2) for i in range(5))
    assert float(grad) == pytest.approx(float(expected), rel=1e-12)
    step = 1e-6
    fd = (truncation_mask(gamma.detach() + step, 5, 10.0).sum() - truncation_mask(gamma.detach() - step, 5, 10.0).sum()) / (2 * step)
    assert float(grad) == pytest.approx(float(fd), rel=1e-6)


@pytest.mark.parametrize("shape", [(12, 30), (30, 12)])
def test_the_forward_svd_through_the_gram_is_the_svd(shape: tuple[int, int]) -> None:
    a = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    u, s, v = stable_svd(a)
    assert torch.allclose(s, torch.linalg.svdvals(a), rtol=1e-5, atol=0)
    assert torch.allclose((u * s) @ v.T, a, atol=1e-5, rtol=0)
    assert torch.allclose(u.T @ u, torch.eye(len(s)), atol=1e-5) and torch.allclose(v.T @ v, torch.eye(len(s)), atol=1e-5)


def test_svd_backward_is_exact_on_a_separated_spectrum() -> None:
    a = _matrix([5, 4, 3, 2, 1, 0.5])
    weights = torch.randn(a.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ours, native, fd = _gradients(a, weights)
    assert torch.allclose(ours, native, atol=1e-12, rtol=0)
    assert float((ours - fd).norm() / fd.norm()) < 1e-7


def test_svd_backward_stays_finite_on_a_degenerate_spectrum() -> None:
    """A repeated singular value inside the kept part: autograd's 1/(σ_j² − σ_i²) explodes (its
    gradient is off by ~100×); the series keeps ours finite, at the price of the pair's coupling."""
    a = _matrix([5, 4, 4, 2, 1, 0.5])
    weights = torch.randn(a.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ours, native, fd = _gradients(a, weights)
    assert torch.isfinite(ours).all() and float(ours.abs().max()) < 3 * float(fd.abs().max())
    # what the stabilisation is for: autograd's gradient is off by orders of magnitude, or not even
    # finite (1/0 where LAPACK returns the repeated σ bit-equal, which depends on the build)
    assert not torch.isfinite(native).all() or float((native - fd).norm() / fd.norm()) > 10
    assert float((ours - fd).norm() / fd.norm()) < 0.35  # the bias of dropping the degenerate pair's coupling


def test_projection_spends_the_budget_inside_the_box() -> None:
    g = torch.tensor([0.9, 0.2, 0.5, 0.05])
    w = torch.tensor([1.0, 2.0, 1.0, 4.0], dtype=torch.float64)
    low, high = torch.full((4,), 0.1, dtype=torch.float64), torch.tensor([0.8, 0.8, 0.8, 0.3], dtype=torch.float64)
    for budget in (1.0, 2.5, 3.2):
        p = project_to_budget(g, w, low, high, budget)
        assert float((w * p).sum()) == pytest.approx(budget, abs=1e-9)
        assert bool(((p >= low - 1e-12) & (p <= high + 1e-12)).all())
        theta = (g.double() - p) / w  # one common shift wherever the box does not bind
        free = (p > low + 1e-9) & (p < high - 1e-9)
        assert float(theta[free].max() - theta[free].min()) < 1e-9


def test_rounding_spends_the_budget() -> None:
    ranks = round_to_budget([3.7, 1.2, 5.5], costs=[10, 20, 5], caps=[4, 8, 6], budget=120)
    # floors 3, 1, 5 = 30 + 20 + 25 = 75; fractional .7 (→ 4, 85), .5 (→ 6, 90), .2 (→ 2, 110); nothing else fits
    assert ranks == [4, 2, 6]
    assert sum(r * c for r, c in zip(ranks, [10, 20, 5], strict=True)) <= 120


def test_the_weight_update_is_the_exact_activation_pca() -> None:
    """W' = V_k V_kᵀ W with V_k the top-k principal output directions of the stacked activations
    A = X Wᵀ equals the SVD-LLM factors at rank k that decompose stores for this method."""
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(10, 7, dtype=torch.float64, generator=generator)
    x = torch.randn(3, 40, 7, dtype=torch.float64, generator=generator) @ torch.diag(torch.linspace(0.2, 2, 7, dtype=torch.float64))
    acts = (x @ w.T).reshape(-1, 10)  # every window's activations, stacked
    _, _, vh = torch.linalg.svd(acts, full_matrices=False)
    gram = sum(xi.T @ xi for xi in x)
    for k in (2, 5):
        pca = vh[:k].T @ vh[:k] @ w
        svd = weighted_svd(w, None, MetricCache(1e-12, torch.device("cpu"))(gram, "x"))
        assert torch.allclose(svd.reconstruct(k), pca, atol=1e-10, rtol=0)


def test_keep_all_is_the_dense_linear() -> None:
    linear = torch.nn.Linear(6, 5)
    module = TruncatedLinear(linear, fraction=1.0, beta=10.0, gap=1e-3, terms=10)
    with torch.no_grad():
        module.fraction.fill_(2.0)  # γ = 2k: every component passes
    x = torch.randn(3, 16, 6)
    assert torch.allclose(module(x), linear(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("remap", [False, True])
def test_every_mask_is_live_at_the_uniform_start(remap: bool) -> None:
    """At every kept fraction the uniform start puts each matrix's mask inside its windows'
    spectrum, so every truncation position gets a gradient: matrices with more components than a
    window has tokens (q/o/MLP: k = 64 > t = 24) and with fewer (k/v: k = 16). Kept in weight units,
    g·k lies past a 24-token window's last component for the k = 64 matrices (issue #31)."""
    from stagepipe.config import TinyModel
    from stagepipe.methods.dobi_svd import DobiSVDConfig
    from stagepipe.models.tiny import build_tiny
    from stagepipe.stages.train.dobi_svd import DobiTrainer

    tokens = 24
    ids = torch.randint(0, 200, (1, tokens), generator=torch.Generator().manual_seed(0))
    for kept in (0.9, 0.8, 0.6, 0.4):
        model, _ = build_tiny(TinyModel(source="tiny", num_layers=2, hidden=64, intermediate=128, num_heads=4,
                                        num_kv_heads=1, seed=1))
        names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
        cfg = DobiSVDConfig(name="dobi_svd", remap=remap)
        trainer = DobiTrainer(cfg, model, dict.fromkeys(names), kept, 1, torch.float32)
        assert {trainer.modules[n].k for n in names} == {16, 64}
        logits = model(input_ids=ids).logits.float()
        torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).backward()
        grads = {n: float(trainer.modules[n].fraction.grad) for n in names}
        assert all(math.isfinite(g) and g != 0.0 for g in grads.values()), (kept, remap, grads)
        positions = {n: float(trainer.modules[n].window_position(tokens).detach()) for n in names}
        assert all(0 < p < min(tokens, trainer.modules[n].k) for n, p in positions.items()), (kept, remap, positions)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    return learned_run(tmp_path_factory.mktemp("dobi"), "dobi", 0.6, DOBI)


def test_ranks_are_learned_and_spend_the_budget(trained) -> None:
    pipeline, ws = trained
    found = outputs(pipeline, ws)
    info = artifacts.read_results(found[PartitionRef("train", ALL)])
    history = artifacts.read_history(found[PartitionRef("train", ALL)])
    assert all(h["kept_soft"] == pytest.approx(0.6, abs=1e-6) for h in history)  # projected every step
    ratios = artifacts.read_results(found[PartitionRef("allocate", ALL)])["ratios"]
    assert 0.6 - 0.02 < ratios["kept_over_target_matrices"] <= 0.6
    assert len(set(info["ranks"].values())) > 2  # not one uniform rank


def test_reloads_with_the_learned_ranks(trained) -> None:
    """The reloaded model's factors are SVD-LLM's (decompose's weighted SVD of the same pair: the
    exact activation PCA that Dobi-SVD's update computes) truncated at each learned rank."""
    pipeline, ws = trained
    found = outputs(pipeline, ws)
    ranks = artifacts.read_learned_ranks(found[PartitionRef("train", ALL)])
    model, info = AutoModelForCausalLM.from_pretrained(artifacts.model_dir(found[PartitionRef("assemble", ALL)]),
                                                       trust_remote_code=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.lowrank_ranks == ranks
    for layer in (0, 1):
        prefix = f"model.layers.{layer}."
        local = {full[len(prefix):]: rank for full, rank in ranks.items() if full.startswith(prefix)}
        spectra = artifacts.read_weighted_svd(found[PartitionRef("decompose", f"layer-{layer:03d}")], list(local))
        for name, rank in local.items():
            module = model.get_submodule(prefix + name)
            assert module.up.weight.shape[1] == rank
            product = (module.up.weight @ module.down.weight).detach().double()
            expected = spectra[name].reconstruct(rank)
            assert float((product - expected).norm() / expected.norm()) < 1e-6, name


@pytest.fixture(scope="module")
def guarded(tmp_path_factory) -> tuple[Path, Path]:
    validation = {"text": {"source": "synthetic", "n_words": 1500, "seed": 2}, "n_samples": 4}
    return learned_run(tmp_path_factory.mktemp("dobi_guard"), "dobi_guard", 0.6, DOBI, {"calibration": {"validation": validation}})


def test_the_guard_keeps_the_better_of_start_and_learned_as_assembled(guarded) -> None:
    """The guard scores the start's and the learned ranks on the validation windows; the ranks
    written are the learned ones only when better outside the noise, and the assembled model's validation perplexity is the one the
    guard measured for it (so ``use`` builds exactly what ``assemble`` builds)."""
    from stagepipe.io import manifest as manifest_io
    from stagepipe.perplexity import perplexity

    pipeline, ws = guarded
    found = outputs(pipeline, ws)
    train = manifest_io.read(found[PartitionRef("train", ALL)])
    guard = train.diagnostics["guard"]
    assert guard["windows"] == "validation" and guard["n_windows"] == 4
    ratio = guard["learned_over_start"]
    assert guard["chosen"] == ("learned" if ratio["resolved"] and ratio["ratio"] < 1 else "start")
    assert set(guard["ppl"]) == {"start", "learned"} and guard["learned_over_start"]["ratio"] == pytest.approx(
        guard["ppl"]["learned"] / guard["ppl"]["start"], rel=1e-9)
    ranks = artifacts.read_learned_ranks(found[PartitionRef("train", ALL)])
    assert ranks == train.diagnostics[f"{guard['chosen']}_ranks"]
    assert train.diagnostics["learned_ranks"] != train.diagnostics["start_ranks"]
    model = AutoModelForCausalLM.from_pretrained(artifacts.model_dir(found[PartitionRef("assemble", ALL)]), trust_remote_code=True)
    windows = artifacts.read_windows(found[PartitionRef("tokenize", "validation")])
    assert perplexity(model, windows, 2, torch.device("cpu")).ppl == pytest.approx(guard["ppl"][guard["chosen"]], rel=1e-5)


def test_without_validation_windows_the_guard_says_it_used_calibration(trained) -> None:
    from stagepipe.io import manifest as manifest_io

    pipeline, ws = trained
    guard = manifest_io.read(outputs(pipeline, ws)[PartitionRef("train", ALL)]).diagnostics["guard"]
    assert guard["windows"] == "calibration" and guard["n_windows"] == 6


def test_sigkill_mid_training_resumes_to_identical_ranks(tmp_path: Path) -> None:
    # killed after the 3rd checkpoint (every 2 steps): step 6 of 12
    done, reference = train_killed_and_resumed(dobi_pipeline(tmp_path, "kill_dobi", 0.6), tmp_path, skip=2)
    assert done.telemetry["resumed_from_step"] == 6
    assert done.content_digest() == reference.content_digest()


# --------------------------------------------------------------------------- remapping (8-bit square part)
def _factors(out_features: int, in_features: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    return torch.randn(out_features, rank, dtype=torch.float64), torch.randn(rank, in_features, dtype=torch.float64)


@pytest.mark.parametrize("shape", [(24, 10), (10, 24), (16, 16)])
def test_remapped_factors_decode_within_half_a_step_and_store_the_accounted_bytes(shape: tuple[int, int]) -> None:
    out_features, in_features = shape
    rank, square = 6, min(shape)
    up, down = _factors(out_features, in_features, rank)
    tensors = remap_factors(up, down)
    module = RemappedLinear(in_features, out_features, rank, bias=True)
    missing, unexpected = module.load_state_dict({**tensors, "bias": torch.zeros(out_features)}, strict=True)
    dec_up, dec_down = module.factors(torch.float64)
    # the square parts: at most half a code step (absmax / 254, with the fp16 scale's rounding)
    step_up = up[:square].abs().amax(0) / 127
    step_down = down[:, :square].abs().amax(1) / 127
    assert ((dec_up[:square] - up[:square]).abs() <= step_up * 0.5 * 1.001 + 1e-12).all()
    assert ((dec_down[:, :square] - down[:, :square]).abs() <= step_down[:, None] * 0.5 * 1.001 + 1e-12).all()
    # the rest of the longer factor: fp16 rounding only
    torch.testing.assert_close(dec_up[square:], up[square:].half().double(), rtol=0, atol=0)
    torch.testing.assert_close(dec_down[:, square:], down[:, square:].half().double(), rtol=0, atol=0)
    stored = sum(t.numel() * t.element_size() for t in tensors.values())
    assert stored == 2 * rank * rank_cost(out_features, in_features, "remap8")
    x = torch.randn(3, in_features, dtype=torch.float64)
    module.double()
    torch.testing.assert_close(module(x), x @ (dec_up @ dec_down).T)


def test_memory_report_counts_remapped_words() -> None:
    shapes = {"a": (24, 10), "b": (16, 16)}
    report = memory_report(shapes, {"a": 4, "b": None}, "remap8", 0.8)
    assert report.stored_bytes == 2 * (4 * 26 + 256) and report.dense_bytes_16bit == 2 * (240 + 256)
    assert report.kept_memory_over_target_matrices == pytest.approx((4 * 26 + 256) / (240 + 256))
    assert max_stored_rank(16, 16, "remap8") == 14 and max_stored_rank(16, 16, "16-bit") == 7  # 14·18 < 256


@pytest.fixture(scope="module")
def remapped(tmp_path_factory) -> tuple[Path, Path]:
    return learned_run(tmp_path_factory.mktemp("dobi_remap"), "dobi_remap", 0.6, {**DOBI, "remap": True})


def test_remap_spends_a_memory_budget_and_reports_both_fractions(remapped, trained) -> None:
    pipeline, ws = remapped
    found = outputs(pipeline, ws)
    ratios = artifacts.read_results(found[PartitionRef("allocate", ALL)])["ratios"]
    memory = ratios["memory"]
    assert memory["storage"] == "remap8" and memory["requested_kept_memory"] == 0.6
    assert 0.6 - 0.02 < memory["kept_memory_over_target_matrices"] <= 0.6
    # the same memory holds more components than 16-bit factors: the parameter fraction is larger
    plain = artifacts.read_results(outputs(*trained)[PartitionRef("allocate", ALL)])["ratios"]
    assert ratios["kept_over_target_matrices"] > 1.2 * plain["kept_over_target_matrices"]
    assert "memory" not in plain
    from click.testing import CliRunner

    from stagepipe.cli import main

    summary = CliRunner().invoke(main, ["run", str(pipeline), "-w", str(ws)], catch_exceptions=False).output
    assert "kept memory (remap8): requested 0.600" in summary and "kept parameters: " in summary


def test_remapped_model_reloads_in_8_bit_with_the_learned_ranks(remapped) -> None:
    pipeline, ws = remapped
    found = outputs(pipeline, ws)
    ranks = artifacts.read_learned_ranks(found[PartitionRef("train", ALL)])
    directory = artifacts.model_dir(found[PartitionRef("assemble", ALL)])
    model, info = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, dtype=torch.float32,
                                                       output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.lowrank_ranks == ranks and model.config.lowrank_remapped == sorted(ranks)
    module = model.get_submodule(next(iter(ranks)))
    assert type(module).__name__ == "RemappedLinear" and module.up_codes.dtype == torch.int8
    # the stage's perplexity is this 8-bit model's: recomputed here on the same windows
    from stagepipe.perplexity import perplexity

    evaluated = artifacts.read_results(found[PartitionRef("evaluate", "compressed")])["datasets"]
    windows = artifacts.read_windows(found[PartitionRef("tokenize", "eval-syn")])
    ours = perplexity(model, windows, 4, torch.device("cpu")).to_dict()
    assert math.isfinite(evaluated["syn"]["ppl"]) and evaluated["syn"]["ppl"] == pytest.approx(ours["ppl"], rel=1e-6)
    dense = artifacts.read_results(found[PartitionRef("evaluate", "dense")])["datasets"]["syn"]["ppl"]
    assert abs(evaluated["syn"]["ppl"] - dense) > 1e-3 * dense  # not the dense model's number
