"""SoCo (``methods/soco.py``, ``models/spectral.py``, ``stages/train.py``) on the tiny model: the
schedule and the budget-filling selection, the spectral linear at "keep all", the budget pressure
reaching the target, a SIGKILL mid-training resuming to bit-identical scores, and the HF reload."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from stagepipe.cli import main
from stagepipe.config import load_pipeline
from stagepipe.engine.stage import ALL, PartitionRef
from stagepipe.methods.base import METHODS
from stagepipe.methods.soco import Schedule, SoCoConfig, penalty_units, select, shrink_to_budget, soft_kept
from stagepipe.models.sources import load_model
from stagepipe.models.spectral import dense_mode, install
from stagepipe.stagekit import artifacts
from stagepipe.stages import make_runner
from tests.conftest import TINY, learned_pipeline, learned_run, merge, train_killed_and_resumed

# prior 0: the penalty weighs parameters only, so which components survive is the learned scores' doing
SOCO = {"name": "soco", "base": "svdllm", "explore_epochs": 2, "refine_epochs": 2, "sparsify_epochs": 1,
        "tune_epochs": 1, "lr": 0.1, "prior": 0, "checkpoint_every": 2}


def soco_pipeline(tmp: Path, name: str, kept: float, **method) -> Path:
    return learned_pipeline(tmp, name, kept, {**SOCO, **method})


def outputs(pipeline: Path, ws: Path) -> dict[PartitionRef, Path]:
    return {e.ref: e.state.output for e in make_runner(load_pipeline(pipeline), ws).states()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    return learned_run(tmp_path_factory.mktemp("soco"), "soco", 0.6, SOCO)


# --------------------------------------------------------------------------- pure parts
def test_schedule_phases_and_rates() -> None:
    cfg = SoCoConfig(name="soco", explore_epochs=1, refine_epochs=2, sparsify_epochs=1, tune_epochs=1, batch=2, lr=0.1)
    schedule = Schedule.of(cfg, windows=5)  # 3 steps per epoch
    assert schedule.total == 15
    assert [schedule.phase(s) for s in (0, 2, 3, 8, 9, 11, 12, 14)] == [
        "explore", "explore", "refine", "refine", "sparsify", "sparsify", "tune", "tune"]
    assert schedule.rate(0) == schedule.rate(2) == 0.1 and schedule.rate(3) == pytest.approx(0.1)
    assert schedule.rate(11) < schedule.rate(3) and schedule.rate(12) == pytest.approx(0.1)
    assert schedule.hard_budget(9, 100.0, 40.0) == pytest.approx(80.0)
    assert schedule.soft_budget(0, 1.6, 0.6) == pytest.approx(1.6 - 1.0 / 3) and schedule.soft_budget(2, 1.6, 0.6) == pytest.approx(0.6)
    assert schedule.hard_budget(11, 100.0, 40.0) == 40.0  # reached on the last sparsify step


def test_select_spends_the_budget_by_score_with_caps_and_one_per_matrix() -> None:
    scores = [torch.tensor([0.9, 0.1, 0.5, 0.8]), torch.tensor([0.05, 0.01]), torch.tensor([0.7, 0.6, 0.3])]
    masks = [torch.ones(4), torch.ones(2), torch.tensor([1.0, 0.0, 1.0])]  # matrix 2's second is pruned
    costs, caps = [10, 3, 7], [2, 2, 3]
    units = [torch.ones(4, dtype=torch.float64), torch.ones(2, dtype=torch.float64), torch.ones(3, dtype=torch.float64)]
    new = select(scores, masks, costs, units, caps, budget=30)
    # each matrix's best first (10 + 3 + 7 = 20), then by score: 0.8 (cost 10, fits: 30), nothing else fits
    assert [m.tolist() for m in new] == [[1, 0, 0, 1], [1, 0], [1, 0, 0]]
    new = select(scores, masks, costs, units, caps, budget=45)
    # 0.8 → 30, 0.5 is over matrix 0's cap, 0.3 → 37, 0.1 over the cap, 0.01 → 40; no skipped one fits in 5
    assert [m.tolist() for m in new] == [[1, 0, 0, 1], [1, 1], [1, 0, 1]]
    assert all(((n > 0) <= (m > 0)).all() for n, m in zip(new, masks, strict=True))  # pruned stays pruned
    units[0] = torch.tensor([1.0, 1.0, 0.1, 1.0], dtype=torch.float64)  # value d/unit: 0.5 → 5, the best of matrix 0
    assert select(scores, masks, costs, units, caps, budget=30)[0].tolist() == [1, 0, 1, 0]


def test_shrinkage_lands_on_the_budget_and_weights_by_cost_over_prior() -> None:
    scores = [torch.tensor([0.5, 1.2, 0.0]), torch.tensor([0.9, 0.7])]
    masks = [torch.tensor([1.0, 1.0, 0.0]), torch.ones(2)]
    costs, dense = [1, 3], 10.0
    sigmas = [torch.tensor([2.0, 1.0, 1.0]), torch.tensor([1.0, 1.0])]
    units = penalty_units(sigmas, costs, prior=2.0)
    # c / (c̄·π): c̄ = 9/5 per component, π = σ² / mean σ² (mean 8/5)
    assert units[0].tolist() == pytest.approx([1 / (1.8 * 2.5), 1 / (1.8 * 0.625), 1 / (1.8 * 0.625)])
    assert units[1].tolist() == pytest.approx([3 / (1.8 * 0.625)] * 2)
    assert penalty_units(sigmas, costs, prior=0.0)[1].tolist() == pytest.approx([3 / 1.8] * 2)
    local = penalty_units(sigmas, costs, prior=2.0, scope="matrix")  # π normalised within each matrix
    assert local[0].tolist() == pytest.approx([1 / (1.8 * 2), 1 / (1.8 * 0.5), 1 / (1.8 * 0.5)])
    assert local[1].tolist() == pytest.approx([3 / 1.8] * 2)
    assert soft_kept(scores, masks, costs, dense) == pytest.approx((0.5 + 1.0 + 3 * 1.6) / 10)
    assert shrink_to_budget(scores, masks, costs, units, dense, budget=0.7) == 0.0  # already under: untouched
    assert scores[0].tolist() == [0.5, pytest.approx(1.2), 0.0]
    theta = shrink_to_budget(scores, masks, costs, units, dense, budget=0.4)
    assert float(soft_kept(scores, masks, costs, dense)) == pytest.approx(0.4, abs=1e-6)  # float32 scores
    # every score moves by θ·unit, none below 0, and the pruned one stays 0
    expected = [[max(0.0, d - theta * float(u)) * m for d, u, m in zip(s0, u0, m0, strict=True)]
                for s0, u0, m0 in zip([[0.5, 1.2, 0.0], [0.9, 0.7]], units, [[1, 1, 0], [1, 1]], strict=True)]
    assert scores[0].tolist() == pytest.approx(expected[0], abs=1e-6)
    assert scores[1].tolist() == pytest.approx(expected[1], abs=1e-6)


def test_base_must_be_a_plain_metric_pair_method() -> None:
    assert SoCoConfig(name="soco", base="kfac_svd")
    for bad in ("aasvd", "modegpt", "ressvd", "soco", "nope"):
        with pytest.raises(ValueError, match="unsupported base"):
            SoCoConfig(name="soco", base=bad)
    assert METHODS["soco"](SoCoConfig(name="soco")).training_options()["prior_scope"] == "matrix"  # svdllm: output units
    soco = METHODS["soco"](SoCoConfig(name="soco", base="kfac_svd", shrinkage=0.1))
    assert soco.training_options()["prior_scope"] == "global"  # K-FAC: loss units
    base = METHODS["kfac_svd"](METHODS["kfac_svd"].config(name="kfac_svd", shrinkage=0.1))
    assert soco.key_options() == base.key_options()  # decompose (and capture, fisher) shared with the base's rows


# --------------------------------------------------------------------------- the model
def test_keep_all_is_the_dense_model_and_a_fixed_point_of_the_kl(tmp_path: Path) -> None:
    """With every component at score 1 the spectral model computes the dense model, so the KL is 0
    and its gradient on the scores vanishes: training at "keep all" stays there."""
    config = load_pipeline(soco_pipeline(tmp_path, "all", 0.9))
    model, _ = load_model(config.model)
    model = model.double()
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    dense = model(input_ids=ids).logits
    svds = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            u, s, vh = torch.linalg.svd(module.weight.detach(), full_matrices=False)
            svds[name] = (u, s, vh)
    modules = install(model, svds)
    logits = model(input_ids=ids).logits
    assert torch.allclose(logits, dense, atol=1e-10, rtol=0)
    with torch.no_grad(), dense_mode(modules):
        assert torch.equal(model(input_ids=ids).logits, dense)
    kl = torch.nn.functional.kl_div(torch.log_softmax(logits, -1), torch.log_softmax(dense, -1), log_target=True,
                                    reduction="sum")
    kl.backward()
    assert abs(kl.item()) < 1e-10
    assert max(float(m.scores.grad.abs().max()) for m in modules.values()) < 1e-8


def test_budget_pressure_reaches_the_target_and_allocate_reports_it(trained) -> None:
    pipeline, ws = trained
    found = outputs(pipeline, ws)
    history = artifacts.read_history(found[PartitionRef("train", ALL)])
    explore = [h for h in history if h["phase"] == "explore"]
    assert explore[0]["kept_soft"] > 1.2  # from ~1.6: every component offered
    assert all(h["kept_soft"] == pytest.approx(0.6, abs=1e-6) for h in history if h["phase"] == "refine")
    assert history[-1]["kept_hard"] <= 0.6
    ratios = json.loads((found[PartitionRef("report", ALL)] / "report.json").read_text())["ratios"]
    assert ratios["kept_over_target_matrices"] == pytest.approx(history[-1]["kept_hard"])
    assert 0.6 - 0.02 < ratios["kept_over_target_matrices"] <= 0.6  # the budget is spent: within one component
    info = artifacts.read_diagnostics(found[PartitionRef("train", ALL)])
    assert info["share_outside_sigma_order"] > 0  # pruned by learned score, not by σ order


def test_debias_restarts_the_kept_scores_at_one(tmp_path: Path) -> None:
    pipeline, ws = learned_run(tmp_path, "debias", 0.6, {**SOCO, "debias": True})
    history = artifacts.read_history(outputs(pipeline, ws)[PartitionRef("train", ALL)])
    last = [h for h in history if h["phase"] == "sparsify"][-1]
    assert last["kept_soft"] == pytest.approx(last["kept_hard"], abs=1e-6)  # every kept score is 1


def test_reloads_with_the_learned_ranks_and_factors(trained) -> None:
    pipeline, ws = trained
    found = outputs(pipeline, ws)
    ranks = artifacts.read_learned_ranks(found[PartitionRef("train", ALL)])
    model_dir = artifacts.model_dir(found[PartitionRef("assemble", ALL)])
    model, info = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.lowrank_ranks == ranks
    learned = artifacts.read_learned(found[PartitionRef("train", ALL)], 1)
    for name, (up, down) in learned.items():
        module = model.model.layers[1].get_submodule(name)
        assert module.up.weight.shape[1] == ranks[f"model.layers.1.{name}"]
        assert torch.equal(module.up.weight.detach(), up.float()) and torch.equal(module.down.weight.detach(), down.float())


def test_sigkill_mid_training_resumes_to_identical_scores(tmp_path: Path) -> None:
    # killed after the 13th checkpoint (every 2 steps): step 26 of 36, mid-sparsify
    done, reference = train_killed_and_resumed(soco_pipeline(tmp_path, "kill_soco", 0.6), tmp_path, skip=12)
    assert done.telemetry["resumed_from_step"] == 26
    assert done.content_digest() == reference.content_digest()


def test_an_allocation_block_is_refused_in_one_line(tmp_path: Path) -> None:
    data = merge(TINY, {"name": "bad", "method": SOCO})  # TINY's allocation block stays
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(main, ["run", str(path), "-w", str(tmp_path / "ws")])
    assert result.exit_code == 2
    assert "allocation: soco learns its ranks" in result.output and len(result.output.strip().splitlines()) == 1
